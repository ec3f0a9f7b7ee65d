"""The frozen-feature cache in a task's data path (protocol superb): cached hidden states in, not audio.

Three small hooks in tasks/data.py and tasks/module.py plug it in:
- `TaskModule.setup` hands its data module a `FeatureCache` when the protocol is superb and
  ``feature_cache`` names a folder (null: live encoding; finetune always encodes live).
- `TaskDataModule._loader` lets it wrap each split. The first call opens the cache (`FeatureCache.open`):
  by then a checkpoint has restored the weights and the model sits on its device (Lightning builds
  the loaders after both). It returns a `FeatureDataset` and its collate, or the live ones when the
  cache is off.
- `TaskModule.encode` passes a `FeatureBatch` to `SpeechEncoder.combine`, which still applies the
  learned layer weights and the pooling, instead of running the encoder.
The heads see the same `EncoderOutput` either way.

Opening fills `rewiring.features` entries for every record of the task's full train, dev and test
manifests, not only the low-resource subset, so the other splits, seeds and learning rates of a sweep
find them made. Under DDP each rank fills its share. The cache stays off, and the run encodes live,
with a printed reason, when:
- the size estimate is above ``feature_cache_max_gb``, or would leave the disk nearly full;
- the fill fails (a full disk, an utterance too long for the encoder as a whole, out of memory);
- training crops apply to a dataset that reads its own windows (a ManifestDataset subclass that
  overrides ``__getitem__``) without a ``crop_target`` to move its targets with a cached crop.

Random training crops (sid's 8 s windows, sd's 20 s chunks) become frame-aligned crops of the cached
whole utterance. They use the same random draw as the live window, snapped to the nearest frame, and
the same number of frames. The features differ, though. A live crop is encoded alone, while a
cached crop's frames were computed with the whole utterance around them: more context at the window's
edges, and other padding effects for wav2vec2-base-style encoders (see `rewiring.features.fill`).
Evaluation reads whole utterances on both paths.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import Dataset

from rewiring.audio import SAMPLE_RATE, AudioError, Reason, Skipped, load_audio
from rewiring.feature_fill import FillReport, fill
from rewiring.features import (
    GB,
    Entry,
    FeatureCacheError,
    FeatureStore,
    Utterance,
    estimate,
    room,
    source_of,
    unreadable,
    utterance,
)
from rewiring.manifest import Record, audio_path, read_manifest
from rewiring.skips import SkippedBatch

if TYPE_CHECKING:
    from tasks.data import ManifestDataset, TaskDataModule
    from tasks.module import TaskModule

__all__ = ["FeatureBatch", "FeatureCache", "FeatureCollate", "FeatureDataset", "FeatureItem"]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


@dataclass
class FeatureItem:
    """One utterance read from the cache: its id, [L, F, D] hidden states, the samples they stand for, its target."""

    id: str
    hidden: Tensor
    samples: int
    target: Any


@dataclass
class FeatureBatch:
    """A padded batch of cached hidden states: what `TaskModule.encode` combines instead of audio."""

    hidden: Tensor  # [L, B, F, D] in the cache's dtype (fp16 by default: half the bytes to the device), zero-padded
    frame_mask: Tensor  # [B, F] bool, True = real frame
    lengths: Tensor  # [B] long: the samples of audio each row stands for (as TaskBatch.lengths)
    ids: list[str]
    targets: Any
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of the items left out

    def __len__(self) -> int:
        return self.hidden.shape[1]

    def hidden_states(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The hidden states [L, B, F, D] in `dtype`, stacked as `SpeechEncoder.combine` takes them."""
        return self.hidden.to(dtype)


class FeatureCollate:
    """Pad `FeatureItem`s into a `FeatureBatch`; items skipped as bad audio are left out and listed
    (id, reason), to be counted, as the live collate does (none kept: a `SkippedBatch`)."""

    def __init__(self, collate_targets: Callable[[list[Any]], Any]) -> None:
        self.collate_targets = collate_targets

    def __call__(self, items: list[FeatureItem | Skipped | None]) -> FeatureBatch | SkippedBatch:
        skipped = [(it.id, it.code) for it in items if isinstance(it, Skipped)]
        items = [it for it in items if isinstance(it, FeatureItem)]
        if not items:
            return SkippedBatch(skipped)
        n_states, _, dim = items[0].hidden.shape
        frames = torch.tensor([it.hidden.shape[1] for it in items], dtype=torch.long)
        width = max(1, int(frames.max()))
        hidden = items[0].hidden.new_zeros(n_states, len(items), width, dim)
        for j, it in enumerate(items):
            hidden[:, j, : it.hidden.shape[1]] = it.hidden
        return FeatureBatch(
            hidden=hidden,
            frame_mask=torch.arange(width)[None, :] < frames[:, None],
            lengths=torch.tensor([it.samples for it in items], dtype=torch.long),
            ids=[it.id for it in items],
            targets=self.collate_targets([it.target for it in items]),
            skipped=skipped,
        )


class FeatureDataset(Dataset):
    """The cached twin of a `ManifestDataset`: the same records, targets, training crops and bad-audio
    rule, with hidden states read from the cache instead of audio.

    A crop (the live dataset's ``crop_seconds``, for an utterance longer than that) takes as many
    frames as the live window would give, at the live path's random offset snapped to a frame, and
    moves the target with the live dataset's ``crop_target``. An uncropped utterance longer than
    ``max_seconds`` is bad audio, as it is live. A missing entry, or one that fails its check (it is
    removed, so the next fill makes it again), is bad audio too: with the audio's own reason code when
    the fill's checks refuse the file (another DDP rank filled it, so this one has no report of it),
    else code "bad_audio". Bad audio gives a `Skipped`, as the live dataset does, or raises under
    ``on_bad_audio: error``.
    """

    # Entries stay in memory once read and checked (up to this many bytes a dataset): an epoch of a
    # low-resource split re-reads the same few files, and the read and its CRC cost a step as much
    # as the head's forward does. Each loader worker keeps its own.
    memo_bytes: int = 2 * GB

    def __init__(self, live: ManifestDataset, cache: FeatureCache) -> None:
        self._memo: dict[int, Entry] = {}
        self._memo_size = 0
        self.live = live
        self.store = cache.store
        self.paths = [str(audio_path(live.manifest, r)) for r in live.records]
        self.sources = [source_of(p, r.offset, r.duration) for p, r in zip(self.paths, live.records, strict=True)]
        self.keys = [None if s in cache.bad else cache.keys.get(s) for s in self.sources]
        self.reasons = {s: cache.bad[s] for s in self.sources if s in cache.bad}
        self.samples_per_frame = cache.samples_per_frame
        crop = live.crop_seconds
        self.crop_frames = None if crop is None else int(cache.frame_lengths(int(round(crop * SAMPLE_RATE))))

    def __len__(self) -> int:
        return len(self.live)

    def _bad(self, i: int, code: Reason, reason: str) -> Skipped:
        path = self.paths[i]
        if self.live.on_bad_audio == "error":
            raise AudioError(path, reason, code)
        log.warning("skipping bad audio %s (%s): %s", path, code, reason)
        return Skipped(path=path, code=code, reason=reason, id=self.live.records[i].id)

    def _missing(self, i: int, error: FeatureCacheError) -> Skipped:
        """No entry: the fill's checks (`load_audio`'s defaults, as `rewiring.feature_fill` reads) say
        why when the file is bad audio; a sound file simply has no entry ("bad_audio")."""
        try:
            load_audio(self.paths[i], record=self.live.records[i])
        except AudioError as e:
            return self._bad(i, e.code, e.reason)
        return self._bad(i, "bad_audio", f"no feature cache entry ({error})")

    def _read(self, i: int, key: str) -> Entry:
        entry = self.store.read(key)
        size = entry.hidden.numel() * entry.hidden.element_size()
        if self._memo_size + size <= self.memo_bytes:
            self._memo[i] = entry
            self._memo_size += size
        return entry

    def __getitem__(self, i: int) -> FeatureItem | Skipped:
        rec, key = self.live.records[i], self.keys[i]
        if key is None:  # the fill skipped the file (its reason code), or it is not in the cache
            return self._bad(i, *self.reasons.get(self.sources[i], ("bad_audio", "not in the feature cache")))
        try:
            entry = self._memo.get(i) or self._read(i, key)
        except FeatureCacheError as e:
            if self.store.path(key).exists():
                self.store.remove(key)
                why = f"its feature cache entry failed its check and was removed for the next fill to make again ({e})"
                return self._bad(i, "bad_audio", why)
            return self._missing(i, e)
        hidden, samples = entry.hidden, entry.samples
        target = self.live.target_fn(rec)
        crop = self.live.crop_seconds
        if crop is not None and rec.duration > crop:
            # The live window's draw (torch's RNG: seeded by seed_everything, and per worker), on frames.
            offset = float(torch.rand(())) * (rec.duration - crop)
            n, total = self.crop_frames, hidden.shape[1]
            if total > n:
                spf = self.samples_per_frame
                start = min(int(round(offset * SAMPLE_RATE / spf)), total - n)
                hidden = hidden[:, start : start + n]
                target = self.live.crop_target(target, start * spf / SAMPLE_RATE, n * spf / SAMPLE_RATE)
                samples = n * spf
        elif self.live.max_seconds is not None and samples > self.live.max_seconds * SAMPLE_RATE:
            seconds = samples / SAMPLE_RATE
            return self._bad(i, "too_long", f"audio is {seconds:.1f} s long, longer than max_seconds={self.live.max_seconds:g}")
        return FeatureItem(id=rec.id, hidden=hidden, samples=samples, target=target)


class FeatureCache:
    """A task run's link to the frozen-feature cache: opened when the first loader is built.

    Picklable once opened (the store, the keys of the audio files and the frame arithmetic), so
    data-loader workers can hold what it hands out.
    """

    def __init__(self, module: TaskModule, datamodule: TaskDataModule) -> None:
        self._module: TaskModule | None = module
        self._datamodule: TaskDataModule | None = datamodule
        self.opened = False
        self.store: FeatureStore | None = None
        self.keys: dict[str, str] = {}  # source (file, and segment) -> entry key
        self.bad: dict[str, tuple[Reason, str]] = {}  # source -> (code, why) it has no entry
        self.frame_lengths: Callable[[Tensor | int], Tensor] | None = None
        self.samples_per_frame = 0
        self.report: FillReport | None = None  # this rank's fill, once open
        self.reason: str | None = None  # why the run encodes live, when it does

    def wrap(self, dataset: ManifestDataset, collate: Callable, collate_targets: Callable) -> tuple[Dataset, Callable]:
        """The cached dataset and collate of a split, or the live ones when the cache is off."""
        if not self.opened:
            self.open()
        if self.store is None:
            return dataset, collate
        return FeatureDataset(dataset, self), FeatureCollate(collate_targets)

    def open(self) -> None:
        """Decide (estimate, limits), fill what is missing (sharded over DDP ranks), and say what happened."""
        module, dm = self._module, self._datamodule
        self._module = self._datamodule = None  # nothing heavy travels to workers
        self.opened = True
        trainer = module.trainer
        strategy = trainer.strategy
        encoder = module.encoder
        t0 = time.perf_counter()
        store = FeatureStore(module.feature_cache, encoder.feature_key(), encoder.num_hidden_states,
                             encoder.hidden_size, module.feature_cache_dtype)  # fmt: skip
        records = {split: read_manifest(dm.manifest(split)) for split in SPLITS}
        reason = dm.cached_crop_problem(records["train"])
        # From the manifests' durations first: a task far above the cap never hashes its audio.
        samples = {source_of(audio_path(dm.manifest(split), r), r.offset, r.duration): round(r.duration * SAMPLE_RATE)
                   for split, recs in records.items() for r in recs}  # fmt: skip
        total, _, _ = estimate(store, list(samples.values()), encoder.frame_lengths)
        if reason is None and total > module.feature_cache_max_gb * GB:
            reason = f"estimated {total / GB:.2f} GB for {len(samples)} utterances, above max_gb={module.feature_cache_max_gb:g}"
        space = None
        if reason is None:
            utterances, keys, bad = _utterances(dm, records)
            space = room(store, utterances, encoder.frame_lengths, module.feature_cache_max_gb)
            reason = None if space.ok else space.reason
        if not strategy.reduce_boolean_decision(reason is None, all=True):
            self.reason = reason or "off on another rank"
            _say(f"[{dm.task}] feature cache off, encoding live at every step: {self.reason} "
                 f"(model.init_args.feature_cache_max_gb sets the cap; feature_cache=null turns the cache off)")  # fmt: skip
            return
        shard = utterances[strategy.global_rank :: strategy.world_size]
        error: Exception | None = None
        try:
            report = fill(
                store,
                encoder,
                shard,
                num_workers=dm.num_workers,
                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
                desc=f"{dm.task} features",
                announce=_say,
                info={"source": encoder.describe(), "family": encoder.family,
                      "samples_per_frame": encoder.samples_per_frame},  # fmt: skip
            )
        except (OSError, ValueError, RuntimeError) as e:
            # A full disk, a read-only folder, an utterance too long for the encoder as a whole (Whisper's
            # 30 s; a live run only sees its crops), out of memory: the run still trains, live.
            error = e
        strategy.barrier("feature_cache")
        if not strategy.reduce_boolean_decision(error is None, all=True):
            self.reason = f"the fill failed ({f'{type(error).__name__}: {error}' if error else 'on another rank'})"
            _say(f"[{dm.task}] feature cache off, encoding live at every step: {self.reason}")
            return
        # A bad file's reason goes to every source with its bytes (the fill reads each entry once).
        bad_keys = {keys[s]: why for s, why in report.bad.items() if s in keys}
        bad = {**bad, **report.bad, **{s: bad_keys[k] for s, k in keys.items() if k in bad_keys}}
        self.store, self.keys, self.bad, self.report = store, keys, bad, report
        self.frame_lengths = encoder.frame_layout
        self.samples_per_frame = encoder.samples_per_frame
        _say(f"[{dm.task}] feature cache {store.dir}: {report.line()}; {space.reason}; "
             f"ready in {time.perf_counter() - t0:.1f} s")  # fmt: skip


def _utterances(
    dm: TaskDataModule, records: dict[str, list[Record]]
) -> tuple[list[Utterance], dict[str, str], dict[str, tuple[Reason, str]]]:
    """Every utterance of the task's full train, dev and test manifests: the distinct entries to fill,
    each source's entry key (file, and segment), and the sources whose file cannot be read."""
    entries: dict[str, Utterance] = {}
    keys: dict[str, str] = {}
    bad: dict[str, tuple[Reason, str]] = {}
    hashes: dict[str, str] = {}  # each file's bytes are hashed once, however many segments it holds
    for split, recs in records.items():
        manifest = dm.manifest(split)
        for rec in recs:
            path = str(audio_path(manifest, rec))
            source = source_of(path, rec.offset, rec.duration)
            if source in keys or source in bad:
                continue
            try:
                u = utterance(path, rec.duration, rec.offset, hashes)
            except OSError as e:
                bad[source] = unreadable(e)
                continue
            keys[source] = u.key
            entries.setdefault(u.key, u)
    return list(entries.values()), keys, bad
