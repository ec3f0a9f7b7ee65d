"""A content-addressed disk cache in front of every synthesis backend.

An entry is `root/<2 hex>/<key>.wav`: 16 kHz (by default) mono float32, resampled once on the
miss. The key is the sha256 of the backend's name, its `cache_params()` (voice and every setting
that changes the sound), the stored sample rate and the normalised text. Writes go to a temporary
file in the same folder and then `os.replace`, so readers only ever see whole entries, whatever
the number of data-loader workers or processes writing at once. Each entry carries its length
and a checksum of its samples (in the WAV comment), so a truncated or damaged entry is detected,
logged and synthesised again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rewiring.files import atomic_file
from rewiring.synthesis.base import SynthesisError, Synthesizer, normalize_text

log = logging.getLogger(__name__)

# Bump when the stored format or the key recipe changes: old entries are then simply not found.
CACHE_FORMAT = 1
_TAG = "rewiring-tts"


def _digest(wav: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(wav, dtype="<f4").tobytes()).hexdigest()[:16]


class SynthesisCache:
    """Cached synthesis: `get(text)` returns a float32 mono tensor at `sample_rate`.

    Picklable when its synthesizer is (all backends are), so it can live in a Dataset that
    data-loader workers copy; the counters are then per process.

    Args:
        synthesizer: the backend behind the cache.
        root: cache folder (shared by every backend; the key keeps them apart).
        sample_rate: rate of the stored audio.
    """

    def __init__(self, synthesizer: Synthesizer, root: str = "cache/tts", sample_rate: int = 16000) -> None:
        self.synthesizer = synthesizer
        self.root = Path(root)
        self.sample_rate = int(sample_rate)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.synth_seconds = 0.0  # wall time spent in the backend
        self.synth_audio_seconds = 0.0  # audio it produced

    def stats(self) -> dict:
        rtf = self.synth_seconds / self.synth_audio_seconds if self.synth_audio_seconds else None
        return {
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
            "synth_seconds": round(self.synth_seconds, 3),
            "synth_audio_seconds": round(self.synth_audio_seconds, 3),
            "rtf": None if rtf is None else round(rtf, 4),
        }

    # --- keys and paths -------------------------------------------------------------------

    def _key_of_normalized(self, norm: str) -> str:
        payload = {
            "format": CACHE_FORMAT,
            "backend": self.synthesizer.name,
            "params": self.synthesizer.cache_params(),
            "sample_rate": self.sample_rate,
            "text": norm,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def key(self, text: str) -> str:
        """The entry's key; SynthesisError for text that cannot be said."""
        return self._key_of_normalized(self._normalize(text))

    def path(self, text: str) -> Path:
        key = self.key(text)
        return self.root / key[:2] / f"{key}.wav"

    def _path_of_key(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.wav"

    def _normalize(self, text: str) -> str:
        return normalize_text(text, max_chars=self.synthesizer.max_chars)

    # --- reading and writing --------------------------------------------------------------

    def _read(self, path: Path) -> torch.Tensor | None:
        """The entry at `path`, or None when absent; a damaged entry is logged and removed."""
        import soundfile as sf

        try:
            with sf.SoundFile(str(path)) as f:
                comment, frames, sr, channels = f.comment, f.frames, f.samplerate, f.channels
                wav = f.read(dtype="float32")
        except FileNotFoundError:
            return None
        except Exception as e:  # libsndfile cannot parse it: damaged
            reason = f"unreadable ({e})"
        else:
            reason = self._check_entry(wav, comment, frames, sr, channels)
            if reason is None:
                return torch.from_numpy(np.ascontiguousarray(wav.reshape(-1)))
        if not path.exists():
            return None
        self.corrupt += 1
        log.warning("synthesis cache entry %s is damaged (%s): synthesising it again", path, reason)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return None

    def _check_entry(self, wav: np.ndarray, comment: str, frames: int, sr: int, channels: int) -> str | None:
        fields = dict(item.split("=", 1) for item in comment.split()[1:] if "=" in item)
        if not comment.startswith(_TAG) or "n" not in fields or "sha" not in fields:
            return "no rewiring length/checksum tag"
        if sr != self.sample_rate or channels != 1:
            return f"{sr} Hz, {channels} channels; expected {self.sample_rate} Hz mono"
        if int(fields["n"]) != frames or wav.shape[0] != frames or frames == 0:
            return f"truncated: {wav.shape[0]} of {fields['n']} samples"
        if _digest(wav) != fields["sha"]:
            return "checksum mismatch"
        return None

    def _write(self, path: Path, wav: np.ndarray) -> None:
        """Atomic (`atomic_file`): workers and processes may write the same entry at once."""
        import soundfile as sf

        with atomic_file(path, "wb") as raw:
            with sf.SoundFile(raw, "w", samplerate=self.sample_rate, channels=1, subtype="FLOAT", format="WAV") as f:
                f.comment = f"{_TAG} n={wav.shape[0]} sha={_digest(wav)}"
                f.write(wav)

    def _store(self, key: str, wav: np.ndarray, sr: int, seconds: float) -> torch.Tensor:
        self.synth_seconds += seconds
        self.synth_audio_seconds += wav.shape[0] / sr
        t = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        if sr != self.sample_rate:
            import torchaudio.functional as AF

            t = AF.resample(t, sr, self.sample_rate).contiguous()
        self._write(self._path_of_key(key), t.numpy())
        return t

    # --- the public door ------------------------------------------------------------------

    def get(self, text: str) -> torch.Tensor:
        """Cached audio for `text`, synthesised (and stored) on a miss."""
        norm = self._normalize(text)
        key = self._key_of_normalized(norm)
        cached = self._read(self._path_of_key(key))
        if cached is not None:
            self.hits += 1
            return cached
        start = time.perf_counter()
        wav, sr = self.synthesizer.synthesize(norm)
        self.misses += 1
        return self._store(key, wav, sr, time.perf_counter() - start)

    def get_many(
        self, texts: Sequence[str | None], *, skip_errors: bool = False
    ) -> list[torch.Tensor | None]:
        """`get` for several texts, with the misses said in one backend batch (Festival's start-up
        is paid once). With `skip_errors`, text that cannot be said gives None (logged) instead of
        raising SynthesisError; backend failures always raise.
        """
        out: list[torch.Tensor | None] = [None] * len(texts)
        todo: dict[str, tuple[str, list[int]]] = {}  # key -> (normalised text, positions)
        for i, text in enumerate(texts):
            try:
                norm = self._normalize(text)
            except SynthesisError as e:
                if not skip_errors:
                    raise
                log.warning("skipping text that cannot be synthesised: %s", e)
                continue
            key = self._key_of_normalized(norm)
            if key in todo:  # a repeat within the batch: served by the first
                todo[key][1].append(i)
                continue
            cached = self._read(self._path_of_key(key))
            if cached is not None:
                self.hits += 1
                out[i] = cached
            else:
                todo[key] = (norm, [i])
        if not todo:
            return out
        keys = list(todo)
        norms = [todo[k][0] for k in keys]
        self.misses += len(keys)
        results: list[tuple[np.ndarray, int] | SynthesisError]
        start = time.perf_counter()
        try:
            results = list(self.synthesizer.synthesize_many(norms))
            seconds = [(time.perf_counter() - start) / len(norms)] * len(norms)
        except SynthesisError:
            # one text spoilt the batch: say them one at a time to find which
            results, seconds = [], []
            for norm in norms:
                t0 = time.perf_counter()
                try:
                    results.append(self.synthesizer.synthesize(norm))
                except SynthesisError as e:
                    results.append(e)
                seconds.append(time.perf_counter() - t0)
        for key, result, sec in zip(keys, results, seconds, strict=True):
            positions = todo[key][1]
            if isinstance(result, SynthesisError):
                if not skip_errors:
                    raise result
                self.misses -= 1
                log.warning("skipping text that cannot be synthesised: %s", result)
                continue
            wav = self._store(key, result[0], result[1], sec)
            for j, pos in enumerate(positions):
                out[pos] = wav if j == 0 else wav.clone()
                self.hits += 1 if j else 0
        return out

    def __repr__(self) -> str:
        return f"SynthesisCache({self.synthesizer.name}, root={str(self.root)!r}, sample_rate={self.sample_rate})"
