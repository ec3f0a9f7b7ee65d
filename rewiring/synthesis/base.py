"""The one synthesis protocol every backend implements, and the text checks they share."""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


class SynthesisError(ValueError):
    """Text that a backend cannot say; the message names the text (truncated).

    Callers may skip a record on this error, so it must never stand for a broken backend:
    that is `BackendError`.
    """


class BackendError(RuntimeError):
    """The backend itself cannot run (not installed, crashed, timed out): never skipped silently."""


_ALLOWED = re.compile(r"^[a-z0-9 .,;:!?'\"()\-]*$")
_HAS_WORD = re.compile(r"[a-z0-9]")


def _excerpt(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def normalize_text(text: str, *, max_chars: int = 400) -> str:
    """Lower-case and collapse whitespace; reject what no English voice can say.

    Rejecting here (rather than inside each backend) means every backend, and the cache key,
    see the same text, and bad text fails the same way everywhere.
    """
    if text is None:
        raise SynthesisError("no text to synthesise (None)")
    if not isinstance(text, str):
        raise SynthesisError(f"text must be a string, got {type(text).__name__}")
    norm = unicodedata.normalize("NFKC", text).lower()
    norm = norm.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    norm = " ".join(norm.split())
    if not norm:
        raise SynthesisError(f"empty text: {text!r}")
    if not _HAS_WORD.search(norm):
        raise SynthesisError(f"text has no letters or digits to say: {_excerpt(text)!r}")
    if len(norm) > max_chars:
        raise SynthesisError(
            f"text too long to synthesise ({len(norm)} > {max_chars} chars): {_excerpt(text)!r}"
        )
    if not _ALLOWED.match(norm):
        bad = sorted({c for c in norm if not _ALLOWED.match(c)})
        raise SynthesisError(f"text has characters an English voice cannot say {bad}: {_excerpt(text)!r}")
    return norm


class Synthesizer(ABC):
    """`synthesize(text) -> (float32 mono waveform, sample_rate)`.

    Backends implement `_synthesize` on text that `synthesize` has already normalised and checked,
    so no backend can be reached with unchecked text, and every result passes the same
    post-condition. `cache_params()` must name everything that changes the sound (voice and
    settings), since the synthesis cache keys on it: two configurations that sound different must
    never share entries. Heavy resources (a loaded voice, a model) are loaded lazily and left out of
    the pickled state, so each data-loader worker loads its own.
    """

    name: str = "base"
    max_chars: int = 400

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Say `text`; SynthesisError for text that cannot be said, never an empty waveform."""
        norm = normalize_text(text, max_chars=self.max_chars)
        wav, sr = self._synthesize(norm)
        return self._checked(wav, sr, norm)

    def synthesize_many(self, texts: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        """Say several texts; backends with a per-call start-up cost override `_synthesize_many`.

        Raises on the first text that fails; the cache then falls back to one text at a time to
        find which.
        """
        norms = [normalize_text(t, max_chars=self.max_chars) for t in texts]
        if not norms:
            return []
        out = self._synthesize_many(norms)
        return [self._checked(w, sr, t) for (w, sr), t in zip(out, norms, strict=True)]

    @abstractmethod
    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Say normalised `text`: (waveform, sample_rate) at the backend's own rate."""

    def _synthesize_many(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        return [self._synthesize(t) for t in texts]

    @abstractmethod
    def cache_params(self) -> dict:
        """Voice and every parameter that changes the audio, JSON-serialisable."""

    def reseed(self, seed: int) -> None:
        """Restart the backend's sampling noise from `seed`, so that the texts said next sound the
        same on any machine and in any process; `fill_cache` calls it before each batch of texts.
        A no-op here: festival and espeak have no sampling noise, and coqui draws its noise from
        torch's global generator, which belongs to the training run."""
        return None

    def _checked(self, wav: np.ndarray, sr: int, text: str) -> tuple[np.ndarray, int]:
        """Common post-condition: a non-empty, finite, non-silent float32 mono waveform."""
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size == 0 or not np.isfinite(wav).all() or float(np.abs(wav).max()) < 1e-4:
            raise SynthesisError(f"{self.name} produced no usable audio for {_excerpt(text)!r}")
        return wav, int(sr)
