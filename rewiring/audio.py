"""Audio in, tensors out: load with soundfile, pick channels, 16 kHz, crop, check, pad and collate.

Every stage reads audio through `load_audio`, so every stage sees the same waveform for the same
file, and a bad file fails the same way everywhere: with an `AudioError` that names the file, says
why in words and gives a reason code (`REASONS`), or (with `on_bad_audio="skip"`) a logged warning
and a `Skipped` result carrying the same code, so that callers can count skips per reason.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Sampler

__all__ = [
    "SAMPLE_RATE",
    "BucketBatchSampler",
    "CANCEL_RATIO",
    "DURATION_TOLERANCE",
    "MIN_SAMPLES",
    "REASONS",
    "SILENCE_PEAK",
    "AudioError",
    "BadAudio",
    "Channel",
    "Reason",
    "Skipped",
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
# The wav2vec 2.0 CNN's receptive field at 16 kHz, the larger of the two encoder families (Whisper
# needs 160): shorter input crashes the conv stack. Callers pass their `SpeechEncoder.min_samples`.
MIN_SAMPLES = 400
# A manifest duration may differ from the file by this much (seconds, or this share of it if more):
# rounding, resampled headers. A 0.1 s claim for a 2.4 s file is a wrong manifest, not rounding.
DURATION_TOLERANCE = 0.1
DURATION_TOLERANCE_SHARE = 0.01
# Averaged channels whose RMS falls below this share of the loudest channel's cancel each other
# (antiphase): uncorrelated channels keep about 0.7 of it, one silent channel 0.5.
CANCEL_RATIO = 0.1

BadAudio = Literal["error", "skip"]
Channel = Literal["mean", "first"] | int
Reason = Literal[
    "not_found",  # no such file
    "unreadable",  # not audio soundfile can decode, or a folder
    "truncated",  # a WAV whose header promises more frames than the file holds
    "duration_mismatch",  # the manifest's duration (or segment) disagrees with the file
    "too_long",  # over max_seconds (checked from the header, before decoding)
    "too_short",  # fewer samples than the encoder's receptive field (min_samples), or none
    "nan",  # NaN or inf samples
    "silent",  # peak below SILENCE_PEAK
    "channels_cancel",  # each channel holds sound, their mean does not (antiphase)
    "no_channel",  # the channel policy names a channel the file does not have
    "bad_audio",  # a caller's own check (for example a feature-cache entry), no finer code
]
REASONS: tuple[str, ...] = get_args(Reason)


class AudioError(RuntimeError):
    """A file that cannot be used as audio: `path`, `reason` (words) and `code` (one of `REASONS`).

    The message always names the file, then the reason.
    """

    def __init__(self, path: str | Path, reason: str, code: Reason = "bad_audio") -> None:
        if code not in REASONS:
            raise ValueError(f"unknown bad-audio code {code!r}; one of {', '.join(REASONS)}")
        self.path = str(path)
        self.reason = reason
        self.code = code
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple:
        # survives pickling (worker processes): rebuilt from its fields, not from the message alone
        return (type(self), (self.path, self.reason, self.code))


@dataclass(frozen=True)
class Skipped:
    """What `load_or_skip` gives instead of a waveform for a bad file under `on_bad_audio="skip"`:
    the file, the reason code (for counting skips per reason) and the reason in words. A dataset
    adds the utterance's id (`named`), so that skips are counted per utterance (rewiring.skips)."""

    path: str
    code: Reason
    reason: str
    id: str | None = None

    @classmethod
    def of(cls, error: AudioError) -> Skipped:
        return cls(path=error.path, code=error.code, reason=error.reason)

    def named(self, id: str) -> Skipped:
        """The same skip, of utterance `id`."""
        return replace(self, id=id)


class _Segment(Protocol):
    """What `load_audio(record=...)` reads of a manifest record (`rewiring.manifest.Record`)."""

    duration: float
    offset: float | None


def _tolerance(seconds: float) -> float:
    return max(DURATION_TOLERANCE, DURATION_TOLERANCE_SHARE * seconds)


def check_waveform(
    wav: torch.Tensor,
    path: str | Path,
    *,
    max_seconds: float | None = None,
    sample_rate: int = SAMPLE_RATE,
    min_samples: int = 0,
) -> None:
    """Raise `AudioError` (naming `path`) for a mono waveform that is empty or shorter than
    `min_samples`, holds NaN/inf, is silent, or is longer than `max_seconds`.

    `sample_rate` is the rate of `wav`, needed to turn `max_seconds` into samples.
    """
    n = wav.shape[-1] if wav.dim() > 0 else 0
    if wav.numel() == 0 or n == 0:
        raise AudioError(path, "empty audio (0 samples)", "too_short")
    if n < min_samples:
        raise AudioError(
            path,
            f"audio is {n} samples ({n / sample_rate:.3f} s) long, shorter than the encoder's "
            f"receptive field (min_samples={min_samples})",
            "too_short",
        )
    if not bool(torch.isfinite(wav).all()):
        bad = int((~torch.isfinite(wav)).sum())
        raise AudioError(path, f"audio holds {bad} NaN/inf samples", "nan")
    peak = float(wav.abs().max())
    if peak < SILENCE_PEAK:
        raise AudioError(path, f"silent audio (peak {peak:.2e} < {SILENCE_PEAK:.0e})", "silent")
    if max_seconds is not None and n / sample_rate > max_seconds:
        raise AudioError(
            path, f"audio is {n / sample_rate:.1f} s long, longer than max_seconds={max_seconds:g}", "too_long"
        )


def _info(path: str | Path) -> Any:
    """The file's header; a missing file says "not found" (libsndfile says "System error.")."""
    p = Path(path)
    if not p.exists():
        raise AudioError(path, "file not found", "not_found")
    if p.is_dir():
        raise AudioError(path, "unreadable audio: a folder, not a file", "unreadable")
    try:
        info = sf.info(str(path))
    except Exception as e:  # unknown formats, damaged headers
        raise AudioError(path, f"unreadable audio ({getattr(e, 'error_string', None) or e})", "unreadable") from e
    if info.samplerate <= 0:
        raise AudioError(path, f"unreadable audio: invalid sample rate {info.samplerate}", "unreadable")
    return info


# Writers that stream (to a pipe) put a placeholder here for "length unknown": 0, 0xFFFFFFFF, or
# SoX's 0x7FFFF000. No data chunk of a speech corpus is that large (2 GiB), so none counts as truncated.
_UNKNOWN_SIZE = 0x7FFFF000


def _wav_promised_frames(path: str | Path) -> int | None:
    """Frames a RIFF/WAVE header's data chunk promises, or None (not RIFF, streamed size, no data chunk).

    libsndfile quietly clamps a truncated data chunk to what is left, so a cut-off download reads
    as a shorter, valid file; the header still says how long it was meant to be.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(size + (size & 1))
                if len(fmt) < 14:
                    return None
                block_align = struct.unpack("<H", fmt[12:14])[0]
            elif cid == b"data":
                if not block_align or size == 0 or size >= _UNKNOWN_SIZE:
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), 1)


def _to_mono(data: np.ndarray, channel: Channel, path: str | Path, check: bool) -> torch.Tensor:
    """[frames, channels] -> [frames] by the channel policy; a mono file passes under any policy."""
    x = torch.from_numpy(data)
    channels = x.shape[1]
    if channels == 1:
        return x[:, 0]
    if channel == "first":
        return x[:, 0]
    if not isinstance(channel, str):
        if channel >= channels:
            raise AudioError(
                path, f"channel {channel} asked for, but the file has {channels} channels", "no_channel"
            )
        return x[:, channel]
    mono = x.mean(dim=1)
    if check and x.shape[0] > 0 and bool(torch.isfinite(x).all()):
        rms = x.pow(2).mean(dim=0).sqrt()
        loudest, mixed = float(rms.max()), float(mono.pow(2).mean().sqrt())
        if float(x.abs().max()) >= SILENCE_PEAK and mixed < CANCEL_RATIO * loudest:
            raise AudioError(
                path,
                f"the {channels} channels cancel out when averaged (RMS {mixed:.2e} of the mean vs "
                f"{loudest:.2e} in the loudest channel: antiphase?); choose channel='first' or an index",
                "channels_cancel",
            )
    return mono


def _check_channel(channel: Channel) -> None:
    if channel in ("mean", "first"):
        return
    if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
        raise ValueError(f"channel must be 'mean', 'first' or a channel index >= 0, got {channel!r}")


def load_audio(
    path: str | Path,
    *,
    sample_rate: int = SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    record: _Segment | None = None,
    max_seconds: float | None = None,
    min_samples: int = MIN_SAMPLES,
    channel: Channel = "mean",
    check: bool = True,
) -> torch.Tensor:
    """Read `path` as a 1-D float32 waveform at `sample_rate`, optionally cropped.

    `offset`/`duration` (seconds) crop; only the cropped frames are decoded, so a short window of a
    long recording is cheap. With `record` (a manifest record) they are relative to the record's
    segment (`record.offset`, `record.duration`; a record without an offset is the whole file), and
    the record is checked against the file's header: a wrong duration, or a segment past the end,
    is `duration_mismatch`. `channel` picks what a multi-channel file gives: the mean, the first
    channel or an index. `max_seconds` bounds the audio read, checked from the header before
    decoding; `min_samples` is the encoder's receptive field (`SpeechEncoder.min_samples`).
    With `check=True` every bad file raises `AudioError` (with its code); with `check=False` only
    files that cannot be read at all do.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0 seconds, got {offset}")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    _check_channel(channel)
    info = _info(path)
    src_rate = int(info.samplerate)
    file_seconds = info.frames / src_rate
    seg_start = 0.0 if record is None or record.offset is None else float(record.offset)
    start_s = seg_start + offset
    if duration is not None:
        span = duration
    elif record is not None and record.offset is not None:
        span = max(float(record.duration) - offset, 0.0)
    else:
        span = None  # to the end of the file
    if check:
        promised = _wav_promised_frames(path) if info.format == "WAV" else None
        if promised is not None and promised > info.frames:
            raise AudioError(
                path,
                f"truncated file: its header promises {promised / src_rate:.2f} s ({promised} frames), "
                f"but {info.frames} frames ({file_seconds:.2f} s) remain",
                "truncated",
            )
        if record is not None:
            if record.offset is None and abs(file_seconds - record.duration) > _tolerance(record.duration):
                raise AudioError(
                    path,
                    f"the manifest says {record.duration:g} s, the file holds {file_seconds:.2f} s",
                    "duration_mismatch",
                )
            end = seg_start + record.duration
            if record.offset is not None and end > file_seconds + _tolerance(record.duration):
                raise AudioError(
                    path,
                    f"the manifest's segment {seg_start:g}-{end:g} s runs past the file's end ({file_seconds:.2f} s)",
                    "duration_mismatch",
                )
        seconds = span if span is not None else file_seconds - start_s
        if max_seconds is not None and seconds > max_seconds:
            raise AudioError(
                path, f"audio is {seconds:.1f} s long, longer than max_seconds={max_seconds:g}", "too_long"
            )
    start = int(round(start_s * src_rate))
    stop = None if span is None else start + int(round(span * src_rate))
    if info.frames == 0 and check:
        raise AudioError(path, "empty audio (0 samples)", "too_short")
    if start >= info.frames and check:
        raise AudioError(
            path, f"no audio at offset {start_s:g} s: the file holds {file_seconds:.2f} s", "too_short"
        )
    try:
        data, _ = sf.read(str(path), start=min(start, info.frames), stop=stop, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, f"unreadable audio ({getattr(e, 'error_string', None) or e})", "unreadable") from e
    wav = _to_mono(data, channel, path, check)
    if check:
        # At the source rate: resampling repairs none of these, and fails on empty input.
        check_waveform(wav, path, sample_rate=src_rate)
    if wav.numel() == 0:
        return wav.to(torch.float32)
    if src_rate != sample_rate:
        wav = AF.resample(wav, orig_freq=src_rate, new_freq=sample_rate)
        if span is not None:
            wav = wav[: int(round(span * sample_rate))]
    if check and wav.shape[0] < min_samples:
        check_waveform(wav, path, sample_rate=sample_rate, min_samples=min_samples)
    return wav.to(torch.float32).contiguous()


def load_or_skip(path: str | Path, on_bad_audio: BadAudio, **kw: Any) -> torch.Tensor | Skipped:
    """`load_audio`; with `on_bad_audio="skip"` a bad file is logged (file, code, reason) and gives a
    `Skipped` carrying the code, so the caller can count it per reason; `"error"` raises `AudioError`."""
    if on_bad_audio not in ("error", "skip"):
        raise ValueError(f"on_bad_audio must be 'error' or 'skip', got {on_bad_audio!r}")
    try:
        return load_audio(path, **kw)
    except AudioError as e:
        if on_bad_audio == "error":
            raise
        log.warning("skipping bad audio %s (%s): %s", e.path, e.code, e.reason)
        return Skipped.of(e)


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
    """Length of a file in seconds from its header (no decoding), for writing manifests; `AudioError`
    (`not_found`, `unreadable`) names a file that cannot be read."""
    info = _info(path)
    return info.frames / info.samplerate


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so padding stays small; a new shuffle every epoch.

    Shuffle, sort by duration inside windows of 50 batches, cut into batches, shuffle the batches.
    With `drop_last`, only full batches are kept (in rewiring every anchor needs the same number
    of negatives). The shuffle depends only on (seed, epoch): the same batches on every machine.

    Resumable: `state_dict()` is the epoch of the pass in progress and the batches it has yielded
    (a finished pass gives the next epoch from its start); after `load_state_dict`, the next pass is
    that epoch from that batch on (torchdata's StatefulDataLoader calls both, and does not
    fast-forward a stateful sampler itself).
    """

    def __init__(
        self, durations: list[float], batch_size: int, seed: int, window: int = 50, drop_last: bool = True
    ) -> None:
        self.durations = torch.tensor(durations)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.window = window * batch_size
        self.epoch = 0  # the epoch of the next pass
        self._skip = 0  # batches of that pass already consumed (load_state_dict)
        self._pass: list[int] | None = None  # [epoch, batches yielded] of the pass in progress

    def __len__(self) -> int:
        n = len(self.durations)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in order."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(len(self.durations), generator=g)
        batches = []
        for start in range(0, len(order), self.window):
            chunk = order[start : start + self.window]
            chunk = chunk[torch.argsort(self.durations[chunk], stable=True)]
            batches += [chunk[k : k + self.batch_size].tolist() for k in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return [batches[p] for p in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self):
        # A generator: nothing moves until the first batch is asked for (DataLoader iterators call
        # iter() on their sampler more than once).
        epoch, skip = self.epoch, self._skip
        self.epoch, self._skip = epoch + 1, 0
        self._pass = [epoch, skip]
        for batch in self.batches(epoch)[skip:]:
            self._pass[1] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, yielded = self._pass if self._pass is not None else (self.epoch, self._skip)
        if yielded >= len(self):  # a finished pass: the next one, so a resumed epoch is never empty
            epoch, yielded = epoch + 1, 0
        return {"epoch": epoch, "yielded": yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip, self._pass = int(state["epoch"]), int(state["yielded"]), None
