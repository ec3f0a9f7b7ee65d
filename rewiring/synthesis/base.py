"""The one synthesis protocol every backend implements, and the text checks they share."""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod

import numpy as np


class SynthesisError(ValueError):
    """Text that a backend cannot say, or a backend that cannot run; the message names the text."""


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
    norm = unicodedata.normalize("NFKC", text).lower()
    norm = norm.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    norm = " ".join(norm.split())
    if not norm:
        raise SynthesisError(f"empty text: {text!r}")
    if not _HAS_WORD.search(norm):
        raise SynthesisError(f"text has no letters or digits to say: {_excerpt(text)!r}")
    if len(norm) > max_chars:
        raise SynthesisError(f"text too long to synthesise ({len(norm)} > {max_chars} chars): {_excerpt(text)!r}")
    if not _ALLOWED.match(norm):
        bad = sorted({c for c in norm if not _ALLOWED.match(c)})
        raise SynthesisError(f"text has characters an English voice cannot say {bad}: {_excerpt(text)!r}")
    return norm


class Synthesizer(ABC):
    """`synthesize(text) -> (float32 mono waveform, sample_rate)`.

    `cache_params()` must name everything that changes the sound (voice and settings), since the
    synthesis cache keys on it: two configurations that sound different must never share entries.
    """

    name: str = "base"

    @abstractmethod
    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Say `text` (already normalised by the caller or not); never return an empty waveform."""

    @abstractmethod
    def cache_params(self) -> dict:
        """Voice and every parameter that changes the audio, JSON-serialisable."""

    def _checked(self, wav: np.ndarray, sr: int, text: str) -> tuple[np.ndarray, int]:
        """Common post-condition: a non-empty, finite, non-silent float32 mono waveform."""
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size == 0 or not np.isfinite(wav).all() or float(np.abs(wav).max()) < 1e-4:
            raise SynthesisError(f"{self.name} produced no usable audio for {_excerpt(text)!r}")
        return wav, int(sr)
