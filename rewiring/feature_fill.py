"""Filling the frozen-feature cache (`rewiring.features`): every missing or unsound entry of a set of
utterances, made by a frozen encoder in length-bucketed batches.

Audio is decoded in data-loader workers, the encoder runs in eval mode under inference_mode, and entries
are written by a small thread pool, each atomically. A fill holds the store's lock on its set of
utterances (a second job with the same set waits, then finds the entries made). `fill_manifests` is
the by-hand fill of whole manifests (`python -m rewiring features`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from rewiring.audio import SAMPLE_RATE, AudioError, Reason, load_audio
from rewiring.features import (
    FeatureCacheError,
    FeatureDtype,
    FeatureStore,
    Utterance,
    room,
    source_of,
    unreadable,
    utterance,
)

__all__ = ["FillReport", "fill", "fill_manifests", "plan_batches"]

log = logging.getLogger(__name__)


@dataclass
class FillReport:
    utterances: int = 0  # distinct entries asked for
    present: int = 0  # already there and sound
    made: int = 0  # newly written (remade ones included)
    remade: int = 0  # were there but failed their check
    bad: dict[str, tuple[Reason, str]] = field(default_factory=dict)  # source -> (code, why) of unusable audio
    bytes_written: int = 0
    audio_seconds: float = 0.0  # audio encoded
    seconds: float = 0.0
    removed_temporaries: int = 0

    def line(self) -> str:
        return (
            f"{self.utterances} entries: {self.present} present, {self.made} made"
            + (f" ({self.remade} of them remade after a failed check)" if self.remade else "")
            + (f", {len(self.bad)} bad audio files skipped" if self.bad else "")
            + (f", {self.audio_seconds / 60:.1f} min of audio encoded in {self.seconds:.1f} s "
               f"({self.bytes_written / 1e6:.1f} MB)" if self.made else "")  # fmt: skip
        )


class _Batches(Dataset):
    """Decoded, padded audio of one fill batch per item (decoding runs in the loader's workers)."""

    def __init__(self, batches: list[list[Utterance]], min_samples: int) -> None:
        self.batches = batches
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[list[Utterance], Tensor, Tensor, list[tuple[Utterance, AudioError]]]:
        good, wavs, bad = [], [], []
        for u in self.batches[i]:
            try:  # the record's segment and the same checks as the live path
                wavs.append(load_audio(u.path, record=u, min_samples=self.min_samples))
                good.append(u)
            except AudioError as e:
                bad.append((u, e))
        lengths = torch.tensor([w.shape[0] for w in wavs], dtype=torch.long)
        width = max([self.min_samples, *lengths.tolist()])
        padded = torch.zeros(len(wavs), width)
        for j, w in enumerate(wavs):
            padded[j, : w.shape[0]] = w
        return good, padded, lengths, bad


def _as_is(x):
    return x


def plan_batches(todo: Sequence[Utterance], budget_samples: int, same_length: bool, max_items: int = 64) -> list[list[Utterance]]:
    """Length-bucketed fill batches: sorted by length, each at most `budget_samples` of padded audio and
    `max_items` rows; with `same_length`, only utterances of the same length share a batch (no padding)."""
    order = sorted(todo, key=lambda u: (u.samples, u.key))
    batches: list[list[Utterance]] = []
    current: list[Utterance] = []
    for u in order:
        fits = (len(current) + 1) * max(u.samples, 1) <= budget_samples and len(current) < max_items
        if current and (not fits or (same_length and u.samples != current[0].samples)):
            batches.append(current)
            current = []
        current.append(u)
    if current:
        batches.append(current)
    return batches


def fill(
    store: FeatureStore,
    encoder,
    utterances: Iterable[Utterance],
    *,
    device: torch.device | str | None = None,
    batch_seconds: float | None = None,
    num_workers: int = 0,
    full_check: bool = False,
    progress: bool = True,
    desc: str = "features",
    announce: Callable[[str], None] = print,
    info: dict[str, Any] | None = None,
) -> FillReport:
    """Make every missing or unsound entry of `utterances` with `encoder` (a `SpeechEncoder`).

    Batched and length-bucketed (`batch_seconds` of padded audio a batch: 400 on a GPU, 60 on the CPU by
    default), on `device` (default: where the encoder is), with a tqdm progress bar. An encoder whose
    padded batches change the valid frames (wav2vec2-base style: GroupNorm over time, no attention mask)
    only gets utterances of one length per batch, so every entry is the utterance's own features.
    Runs in eval mode under inference_mode, and leaves torch's random state as it found it (a cached
    run draws the same random numbers as a live one). Bad audio is skipped and reported, not raised.
    """
    t0 = time.perf_counter()
    report = FillReport()
    unique = list({u.key: u for u in utterances}.values())
    report.utterances = len(unique)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    name = hashlib.blake2b("\n".join(sorted(u.key for u in unique)).encode(), digest_size=12).hexdigest()
    with store.lock(name, announce):
        report.removed_temporaries = store.remove_stale_temporaries()
        todo = []
        for u in unique:
            why = store.check(u.key, full=full_check)
            if why is None:
                report.present += 1
                continue
            if why != "missing":
                log.warning("feature cache: remaking %s (%s)", store.path(u.key), why)
                store.remove(u.key)
                report.remade += 1
            todo.append(u)
        if todo:
            store.describe(info or {})
            _encode_all(store, encoder, todo, report, device, batch_seconds, num_workers, progress, desc)
    report.seconds = time.perf_counter() - t0
    return report


def _encode_all(
    store: FeatureStore,
    encoder,
    todo: list[Utterance],
    report: FillReport,
    device: torch.device,
    batch_seconds: float | None,
    num_workers: int,
    progress: bool,
    desc: str,
) -> None:
    from tqdm import tqdm

    if batch_seconds is None:
        batch_seconds = 400.0 if device.type == "cuda" else 60.0
    # Padding-invariant encoders mask their padding (layer-norm wav2vec2, Whisper); GroupNorm ones don't.
    same_length = not bool(getattr(encoder, "uses_attention_mask", False))
    batches = plan_batches(todo, int(batch_seconds * SAMPLE_RATE), same_length)
    min_samples = int(getattr(encoder, "min_samples", 1))
    loader = DataLoader(_Batches(batches, min_samples), batch_size=None, collate_fn=_as_is,
                        num_workers=num_workers, generator=torch.Generator())  # fmt: skip
    was_training = encoder.training
    param_device = next(encoder.parameters()).device
    encoder.to(device).eval()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    pending: list[Future] = []
    bar = tqdm(total=len(todo), desc=desc, unit="utt", disable=not progress, mininterval=1.0, dynamic_ncols=True)
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(), ThreadPoolExecutor(4) as writer:
            for good, padded, lengths, bad in loader:
                for u, e in bad:
                    report.bad[u.source] = (e.code, e.reason)
                    log.warning("feature cache: skipping bad audio %s (%s): %s", u.source, e.code, e.reason)
                groups = [torch.arange(len(good))]
                if same_length and len(good) > 1:  # the manifest's lengths agreed; the decoded ones may not
                    groups = [torch.nonzero(lengths == n).flatten() for n in lengths.unique()]
                for rows in groups:
                    if len(rows) == 0:
                        continue
                    n_max = max(min_samples, int(lengths[rows].max()))
                    wav = padded[rows, :n_max].to(device, non_blocking=True)
                    mask = (torch.arange(n_max)[None, :] < lengths[rows][:, None]).to(device)
                    hidden, frame_mask = encoder.hidden(wav, mask.long())
                    frames = frame_mask.sum(1).tolist()
                    host = torch.stack(hidden).to(store.dtype).cpu()  # [L, B, F, D], one transfer
                    for j, r in enumerate(rows.tolist()):
                        u = good[r]
                        entry = host[:, j, : frames[j]].clone()
                        pending.append(writer.submit(store.write, u.key, entry, int(lengths[r])))
                        report.audio_seconds += int(lengths[r]) / SAMPLE_RATE
                while len(pending) > 64:  # bounded memory; errors (a full disk) surface here
                    report.bytes_written += pending.pop(0).result()
                    report.made += 1
                bar.update(len(good) + len(bad))
            for f in pending:
                report.bytes_written += f.result()
                report.made += 1
            pending.clear()
    finally:
        bar.close()
        for f in pending:
            f.cancel()
        encoder.to(param_device).train(was_training)


# ---------------------------------------------------------------------- by hand


def fill_manifests(
    encoder,
    manifests: Sequence[str | Path],
    cache_dir: str | Path = "cache/features",
    dtype: FeatureDtype = "float16",
    max_gb: float = 100.0,
    device: torch.device | str | None = None,
    batch_seconds: float | None = None,
    num_workers: int = 2,
    full_check: bool = True,
    progress: bool = True,
) -> FillReport:
    """Fill `encoder`'s entries for every utterance of `manifests` (what `python -m rewiring features`
    runs): the same entries a SUPERB task run of that encoder reads. Raises FeatureCacheError when the
    estimate is above `max_gb` or the disk has no room for it."""
    from rewiring.manifest import audio_path, read_manifest

    entries: dict[str, Utterance] = {}
    bad: dict[str, tuple[Reason, str]] = {}
    hashes: dict[str, str] = {}
    for manifest in manifests:
        for rec in read_manifest(manifest):
            path = str(audio_path(manifest, rec))
            try:
                u = utterance(path, rec.duration, rec.offset, hashes)
            except OSError as e:
                bad[source_of(path, rec.offset, rec.duration)] = unreadable(e)
                continue
            entries.setdefault(u.key, u)
    store = FeatureStore(cache_dir, encoder.feature_key(), encoder.num_hidden_states, encoder.hidden_size, dtype)
    space = room(store, list(entries.values()), encoder.frame_lengths, max_gb)
    if not space.ok:
        raise FeatureCacheError(f"{store.dir}: not filled: {space.reason}")
    print(f"feature cache {store.dir}: {space.reason}", flush=True)
    report = fill(store, encoder, entries.values(), device=device, batch_seconds=batch_seconds,
                  num_workers=num_workers, full_check=full_check, progress=progress,
                  info={"source": encoder.describe(), "family": encoder.family,
                        "samples_per_frame": encoder.samples_per_frame})  # fmt: skip
    report.bad.update(bad)
    return report
