"""The data side of a task: its manifests, a deterministic low-resource split, loading and padding.

A task's `TaskDataModule` subclass names ``task`` (manifests at {root}/{task}/{train,dev,test}.jsonl)
and ``stratify`` (the Record field the low-resource split is stratified by: "label", "speaker",
"labels.action", None), and writes two hooks: ``build_spec(train_records) -> dict`` (JSON-able:
class names, vocabulary; from the whole train manifest, so every low-resource split of a corpus has
the same head) and ``target(record)`` (one record's target, using ``self.spec``); optionally
``collate_targets(targets)`` (default: ``torch.tensor``), ``sample_weights(split)`` and
``train_crop_seconds``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from rewiring.audio import MIN_SAMPLES, BadAudio, BucketBatchSampler, Skipped, load_or_skip, pad_batch
from rewiring.corpus import ensure_corpus, is_embedded_root
from rewiring.manifest import Record, audio_path, ids_hash, read_manifest, select_subset
from rewiring.resume import ResumableWeightedSampler, resumable_loader
from rewiring.skips import SkippedBatch
from tasks.features import FeatureCache

__all__ = ["SPLITS", "Item", "ManifestDataset", "TaskBatch", "TaskDataModule"]

SPLITS = ("train", "dev", "test")


@dataclass
class Item:
    """One loaded utterance: its id, the 1-D waveform (16 kHz) and its encoded target."""

    id: str
    wav: Tensor
    target: Any


@dataclass
class TaskBatch:
    """A padded batch. ``targets`` is whatever the data module's ``collate_targets`` made of them."""

    waveforms: Tensor  # [B, T] float32, zero-padded
    attention_mask: Tensor  # [B, T] long, 1 = real sample
    lengths: Tensor  # [B] long, real samples per row
    ids: list[str]
    targets: Any
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of the items left out

    def __len__(self) -> int:
        return self.waveforms.shape[0]


class ManifestDataset(Dataset):
    """Records of one manifest, loaded through `rewiring.audio` (bad files skipped or raised as configured).

    ``crop_seconds`` (training only): a longer utterance is read as one random window of that length
    (only the window is decoded); ``None`` reads whole files (evaluation always does).
    ``min_samples``: the encoder's receptive field (`SpeechEncoder.min_samples`); shorter audio is
    bad audio ("too_short").
    """

    def __init__(
        self,
        manifest: Path,
        records: list[Record],
        target_fn,
        *,
        on_bad_audio: BadAudio = "skip",
        max_seconds: float | None = None,
        crop_seconds: float | None = None,
        min_samples: int = MIN_SAMPLES,
    ) -> None:
        self.manifest = Path(manifest)
        self.records = records
        self.target_fn = target_fn
        self.on_bad_audio = on_bad_audio
        self.max_seconds = max_seconds
        self.crop_seconds = crop_seconds
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.records)

    def load(self, rec: Record, **kw: Any) -> Tensor | Skipped:
        """`load_or_skip` of one record with this dataset's rules; a skip carries the record's id."""
        wav = load_or_skip(audio_path(self.manifest, rec), self.on_bad_audio, record=rec, min_samples=self.min_samples, **kw)
        return wav.named(rec.id) if isinstance(wav, Skipped) else wav

    def __getitem__(self, i: int) -> Item | Skipped:
        rec = self.records[i]
        if self.crop_seconds is not None and rec.duration > self.crop_seconds:
            # torch's RNG: seeded by seed_everything, and per worker by the DataLoader.
            offset = float(torch.rand(())) * (rec.duration - self.crop_seconds)
            wav = self.load(rec, offset=offset, duration=self.crop_seconds)
        else:
            wav = self.load(rec, max_seconds=self.max_seconds)
        if isinstance(wav, Skipped):
            return wav  # the bad file and its reason code, left out (and counted) by the collate
        return Item(id=rec.id, wav=wav, target=self.target_fn(rec))

    def crop_target(self, target: Any, offset: float, seconds: float) -> Any:
        """The target of the window [offset, offset + seconds) of an utterance; the feature cache crops
        cached frames with it. A per-utterance target (a class, a speaker) stays as it is."""
        return target


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message, flush=True)


class TaskDataModule(LightningDataModule, ABC):
    """Manifests of one task, a deterministic low-resource split of train, and the padding collate.

    Args:
        root: folder with {task}/{train,dev,test}.jsonl (embedded corpus or a `prepare` output). An
            embedded root (.../embedded/<size>) is built on first use.
        fraction: keep this fraction of the training manifest (stratified by ``stratify``).
        amount: or this much training audio ("10min", "1h"); at most one of fraction/amount.
        split_seed: seed of the low-resource split (its ids hash is printed and logged).
        batch_size: utterances per batch.
        num_workers: DataLoader workers.
        max_seconds: longer files count as bad audio (see on_bad_audio); None: no limit.
        on_bad_audio: "skip" logs a warning naming the file, drops it from the batch and counts it per
            reason (rewiring.skips); "error" raises `AudioError` naming the file.
        bucket_by_length: batch training utterances of similar length (less padding); False: plain shuffle.
    """

    task: ClassVar[str] = ""
    stratify: ClassVar[str | None] = "label"
    # What reads a split's records (a subclass may read its own windows, e.g. sd's turns move with a crop)
    dataset_class: ClassVar[type[ManifestDataset]] = ManifestDataset
    # Training utterances longer than this are read as one random window (sid); None: whole files.
    train_crop_seconds: float | None = None

    def __init__(
        self,
        root: str = "data/embedded/small",
        fraction: float | None = None,
        amount: str | None = None,
        split_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        max_seconds: float | None = 30.0,
        on_bad_audio: Literal["error", "skip"] = "skip",
        bucket_by_length: bool = True,
    ) -> None:
        super().__init__()
        if fraction is not None and amount is not None:
            raise ValueError("give at most one of fraction or amount for the low-resource split")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.fraction = fraction
        self.amount = amount
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_seconds = max_seconds
        self.on_bad_audio = on_bad_audio
        self.bucket_by_length = bucket_by_length
        self.spec: dict[str, Any] | None = None
        self.records: dict[str, list[Record]] = {}
        self.train_ids_hash: str | None = None
        # Set by TaskModule.setup under protocol superb: cached hidden states instead of audio.
        self.features: FeatureCache | None = None
        # The encoder's receptive field: TaskModule.setup sets it from the real encoder.
        self.min_samples = MIN_SAMPLES

    # ------------------------------------------------------------ hooks for the tasks
    @abstractmethod
    def build_spec(self, train_records: list[Record]) -> dict[str, Any]:
        """What the head needs to know about the data (class names, vocabulary), JSON-able."""

    @abstractmethod
    def target(self, record: Record) -> Any:
        """The encoded target of one record (uses ``self.spec``)."""

    def collate_targets(self, targets: list[Any]) -> Any:
        """Batch the targets of the loaded items (default: one tensor)."""
        return torch.tensor(targets)

    def sample_weights(self, split: str) -> list[float] | None:
        """Per-record draw weights of a split's training sampler (drawn with replacement, as s3prl's
        class-balanced KS loader); None (the default): the bucketed or plain shuffle."""
        return None

    # ------------------------------------------------------------ manifests and split
    def manifest(self, split: str) -> Path:
        """{root}/{task}/{split}.jsonl, split in train/dev/test."""
        return self.root / self.task / f"{split}.jsonl"

    def prepare_data(self) -> None:
        missing = [self.manifest(s) for s in SPLITS if not self.manifest(s).is_file()]
        if missing and is_embedded_root(self.root):
            ensure_corpus(self.root)
            missing = [p for p in missing if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.task}: manifest not found: {missing[0]} "
                f"(build it with `python -m rewiring prepare`, or point data.init_args.root at a corpus)"
            )

    def _read(self, split: str) -> list[Record]:
        path = self.manifest(split)
        if not path.is_file():
            self.prepare_data()
        records = read_manifest(path)
        if not records:
            raise ValueError(f"{path}: manifest is empty")
        return records

    def setup(self, stage: str | None = None) -> None:
        full_train = self._read("train")
        if self.spec is None:
            self.spec = self.build_spec(full_train)
        if stage in ("fit", None) and "train" not in self.records:
            train = full_train
            if self.fraction is not None or self.amount is not None:
                train = select_subset(
                    full_train,
                    fraction=self.fraction,
                    amount=self.amount,
                    seed=self.split_seed,
                    stratify=self.stratify,
                )
            self.records["train"] = train
            self._log_split(full_train, train)
        if stage in ("fit", "validate", None):
            self.records.setdefault("dev", self._read("dev"))
        if stage in ("test", None):
            self.records.setdefault("test", self._read("test"))
        if stage == "predict":
            self.records.setdefault("test", self._read("test"))

    def _log_split(self, full: list[Record], train: list[Record]) -> None:
        self.train_ids_hash = ids_hash(train)
        seconds = sum(r.duration for r in train)
        which = (
            f"fraction {self.fraction}"
            if self.fraction is not None
            else f"amount {self.amount}"
            if self.amount is not None
            else "all"
        )
        _print_rank_zero(
            f"[{self.task}] train split ({which}, seed {self.split_seed}): {len(train)} of {len(full)} "
            f"utterances, {seconds / 60:.1f} min, ids_hash {self.train_ids_hash}"
        )
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_hyperparams(
                {
                    "data/train_ids_hash": self.train_ids_hash,
                    "data/train_utterances": len(train),
                    "data/train_seconds": round(seconds, 2),
                }
            )

    # ------------------------------------------------------------ loaders
    def cached_crop_problem(self, train: list[Record]) -> str | None:
        """Why cached training crops would be wrong for this data module (`train`: its full train
        manifest), or None; the feature cache asks before it replaces the live datasets."""
        if "train" not in self.records:
            return None
        live = self.dataset("train")
        crop = live.crop_seconds
        if crop is None or not any(r.duration > crop for r in train):
            return None
        cls = type(live)
        if cls.__getitem__ is not ManifestDataset.__getitem__ and cls.crop_target is ManifestDataset.crop_target:
            return (
                f"{cls.__name__} reads its own {crop:g} s training windows and has no crop_target to move "
                "its targets with a crop of cached frames"
            )
        return None

    def dataset(self, split: str) -> ManifestDataset:
        if split not in self.records:
            raise RuntimeError(f"{self.task}: split {split!r} is not set up (call setup first)")
        return self.dataset_class(
            self.manifest(split),
            self.records[split],
            self.target,
            on_bad_audio=self.on_bad_audio,
            max_seconds=self.max_seconds,
            crop_seconds=self.train_crop_seconds if split == "train" else None,
            min_samples=self.min_samples,
        )

    def collate(self, items: list[Item | Skipped | None]) -> TaskBatch | SkippedBatch:
        """Pad the loaded items; items skipped as bad audio are left out and listed (id, reason) in the
        batch, to be counted; a batch of none is a `SkippedBatch` (never None: see rewiring.skips)."""
        skipped = [(it.id, it.code) for it in items if isinstance(it, Skipped)]
        items = [it for it in items if isinstance(it, Item)]
        if not items:
            return SkippedBatch(skipped)
        wb = pad_batch([it.wav for it in items])
        return TaskBatch(
            waveforms=wb.waveforms,
            attention_mask=wb.attention_mask,
            lengths=wb.lengths,
            ids=[it.id for it in items],
            targets=self.collate_targets([it.target for it in items]),
            skipped=skipped,
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset, collate = self.dataset(split), self.collate
        if self.features is not None:  # the frozen-feature cache (tasks/features.py); off: these stay live
            dataset, collate = self.features.wrap(dataset, collate, self.collate_targets)
        common = dict(num_workers=self.num_workers, collate_fn=collate, persistent_workers=self.num_workers > 0)
        weights = self.sample_weights(split) if shuffle else None
        if weights is not None:
            # One epoch = len(split) draws with replacement; it takes precedence over bucket_by_length.
            # Seeded from the run's seed; under DDP Lightning wraps it in a DistributedSamplerWrapper.
            g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
            sampler = ResumableWeightedSampler(weights, num_samples=len(weights), generator=g)  # with replacement
            return resumable_loader(dataset, batch_size=self.batch_size, sampler=sampler, **common)
        if shuffle and self.bucket_by_length:
            # Similar lengths in a batch: padding drops from ~1.3-2x the real audio to ~1.2-1.4x
            # (benchmarks/results.md). The run's seed (seed_everything) drives the shuffle.
            crop = self.train_crop_seconds
            durations = [min(r.duration, crop) if crop else r.duration for r in self.records[split]]
            sampler = BucketBatchSampler(durations, self.batch_size, seed=torch.initial_seed() % 2**31, drop_last=False)
            return resumable_loader(dataset, batch_sampler=sampler, **common)
        if shuffle:  # training loaders resume mid-epoch (rewiring/resume.py)
            return resumable_loader(dataset, batch_size=self.batch_size, shuffle=True, **common)
        # Evaluation ones start over, their workers' base seed from a generator of their own: a
        # resumed fit makes its (persistent) validation iterator later than the killed one did, and
        # that must not move the training's random stream.
        generator = torch.Generator().manual_seed(0)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, generator=generator, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
