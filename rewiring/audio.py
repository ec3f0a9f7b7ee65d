"""Audio in, tensors out: load with soundfile, mono, 16 kHz, crop, check, pad and collate.

Every stage reads audio through `load_audio`, so every stage sees the same waveform for the same
file, and a bad file fails the same way everywhere: with an `AudioError` that names it, or (with
`on_bad_audio="skip"`) a logged warning instead of a crash hours into a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Sampler

__all__ = [
    "SAMPLE_RATE",
    "BucketBatchSampler",
    "SILENCE_PEAK",
    "AudioError",
    "BadAudio",
    "WaveBatch",
    "check_waveform",
    "duration_seconds",
    "load_audio",
    "load_or_skip",
    "pad_batch",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# A peak below this (about -80 dBFS) is digital silence: no speech encoder learns anything from it.
SILENCE_PEAK = 1e-4

BadAudio = Literal["error", "skip"]


class AudioError(RuntimeError):
    """A file that cannot be used as audio; the message always names the file, then the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def check_waveform(
    wav: torch.Tensor,
    path: str | Path,
    *,
    max_seconds: float | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> None:
    """Raise `AudioError` (naming `path`) for an empty, non-finite, silent or too long waveform.

    `sample_rate` is the rate of `wav`, needed only to turn `max_seconds` into samples.
    """
    n = wav.shape[-1] if wav.dim() > 0 else 0
    if wav.numel() == 0 or n == 0:
        raise AudioError(path, "empty audio (0 samples)")
    if not bool(torch.isfinite(wav).all()):
        bad = int((~torch.isfinite(wav)).sum())
        raise AudioError(path, f"audio holds {bad} NaN/inf samples")
    peak = float(wav.abs().max())
    if peak < SILENCE_PEAK:
        raise AudioError(path, f"silent audio (peak {peak:.2e} < {SILENCE_PEAK:.0e})")
    if max_seconds is not None:
        seconds = n / sample_rate
        if seconds > max_seconds:
            raise AudioError(path, f"audio is {seconds:.1f} s long, longer than max_seconds={max_seconds:g}")


def load_audio(
    path: str | Path,
    *,
    sample_rate: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    max_seconds: float | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Read `path` as a 1-D float32 mono waveform at `sample_rate`, optionally cropped.

    Channels are averaged; other rates are resampled with `torchaudio.functional.resample`.
    `offset`/`duration` (seconds) crop the file; only the cropped frames are read, so a short
    segment of a long recording is cheap. `max_seconds` bounds the returned audio (for an uncropped
    file it is checked from the header, before reading). With `check=True` a bad file raises
    `AudioError`; with `check=False` only unreadable files do.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0 seconds, got {offset}")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile reports missing, unreadable and unknown formats alike
        raise AudioError(path, f"unreadable audio ({type(e).__name__}: {e})") from e
    src_rate = int(info.samplerate)
    if src_rate <= 0:
        raise AudioError(path, f"invalid sample rate {src_rate}")
    cropped = offset > 0 or duration is not None
    if check and max_seconds is not None and not cropped and info.frames / src_rate > max_seconds:
        raise AudioError(
            path, f"audio is {info.frames / src_rate:.1f} s long, longer than max_seconds={max_seconds:g}"
        )
    start = int(round(offset * src_rate))
    stop = None if duration is None else start + int(round(duration * src_rate))
    try:
        data, _ = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, f"unreadable audio ({type(e).__name__}: {e})") from e
    wav = torch.from_numpy(data).mean(dim=1)  # [frames, channels] -> [frames]
    if check:
        # Checked at the source rate: resampling cannot repair any of these, and fails on empty input.
        check_waveform(wav, path, max_seconds=max_seconds, sample_rate=src_rate)
    if wav.numel() == 0:
        return wav.to(torch.float32)
    if src_rate != sample_rate:
        wav = AF.resample(wav, orig_freq=src_rate, new_freq=sample_rate)
        if duration is not None:
            wav = wav[: int(round(duration * sample_rate))]
    return wav.to(torch.float32).contiguous()


def load_or_skip(path: str | Path, on_bad_audio: BadAudio, **kw) -> torch.Tensor | None:
    """`load_audio`, but with `on_bad_audio="skip"` a bad file is logged (file and reason) and gives None."""
    if on_bad_audio not in ("error", "skip"):
        raise ValueError(f"on_bad_audio must be 'error' or 'skip', got {on_bad_audio!r}")
    try:
        return load_audio(path, **kw)
    except AudioError as e:
        if on_bad_audio == "error":
            raise
        log.warning("skipping bad audio %s: %s", e.path, e.reason)
        return None


@dataclass
class WaveBatch:
    """Padded waveforms with what a wav2vec2-style encoder needs to ignore the padding."""

    waveforms: torch.Tensor  # [B, T] float32, zero-padded
    lengths: torch.Tensor  # [B] long, real samples per row
    attention_mask: torch.Tensor  # [B, T] long, 1 = real sample, 0 = padding

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    def to(self, device: torch.device | str) -> WaveBatch:
        return WaveBatch(self.waveforms.to(device), self.lengths.to(device), self.attention_mask.to(device))


def pad_batch(wavs: list[torch.Tensor]) -> WaveBatch:
    """Zero-pad 1-D waveforms to the longest in the batch; mask from lengths by one `arange` comparison."""
    if len(wavs) == 0:
        raise ValueError("pad_batch needs at least one waveform")
    bad = [i for i, w in enumerate(wavs) if w.dim() != 1]
    if bad:
        raise ValueError(
            f"pad_batch expects 1-D waveforms; items {bad[:5]} have shapes {[tuple(wavs[i].shape) for i in bad[:5]]}"
        )
    lengths = torch.tensor([w.shape[0] for w in wavs], dtype=torch.long)
    waveforms = torch.nn.utils.rnn.pad_sequence([w.to(torch.float32) for w in wavs], batch_first=True)
    t = waveforms.shape[1]
    attention_mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return WaveBatch(waveforms=waveforms, lengths=lengths, attention_mask=attention_mask)


def duration_seconds(path: str | Path) -> float:
    """Length of a file in seconds from its header (no decoding), for writing manifests."""
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(path, f"unreadable audio ({type(e).__name__}: {e})") from e
    if info.samplerate <= 0:
        raise AudioError(path, f"invalid sample rate {info.samplerate}")
    return info.frames / info.samplerate


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so padding stays small; a new shuffle every epoch.

    Shuffle, sort by duration inside windows of 50 batches, cut into batches, shuffle the batches.
    With `drop_last`, only full batches are kept (in rewiring every anchor needs the same number
    of negatives). The shuffle depends only on (seed, epoch): the same batches on every machine.
    """

    def __init__(
        self, durations: list[float], batch_size: int, seed: int, window: int = 50, drop_last: bool = True
    ) -> None:
        self.durations = torch.tensor(durations)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.window = window * batch_size
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.durations)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.durations), generator=g)
        batches = []
        for start in range(0, len(order), self.window):
            chunk = order[start : start + self.window]
            chunk = chunk[torch.argsort(self.durations[chunk], stable=True)]
            batches += [chunk[k : k + self.batch_size].tolist() for k in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for p in torch.randperm(len(batches), generator=g).tolist():
            yield batches[p]
