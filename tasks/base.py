"""What the six downstream tasks share: `TaskModule`, `TaskDataModule`, heads, CTC pieces, the protocols.

A task file (tasks/ks.py, ...) holds three things: a `TaskModule` subclass (the head, the loss and
the metrics), a `TaskDataModule` subclass (which manifest fields are the target) and a
`prepare(root, out)` adapter for the real corpus. Everything else lives here, once.

How a task plugs in (the API tasks-A and tasks-B build on):

TaskDataModule subclass
    class attributes: ``task`` ("ks": manifests at {root}/ks/{train,dev,test}.jsonl) and ``stratify``
    (the Record field the low-resource split is stratified by: "label", "speaker", "labels.action", None).
    hooks: ``build_spec(train_records) -> dict`` (JSON-able: class names, vocabulary; built from the
    whole train manifest, so every low-resource split of a corpus has the same head),
    ``target(record)`` (one record's target, using ``self.spec``), optionally
    ``collate_targets(targets)`` (default: ``torch.tensor``) and ``train_crop_seconds``.

TaskModule subclass
    class attributes: ``task``, ``primary_metric`` ("val/acc"), ``metric_mode`` ("max" | "min").
    hooks: ``build_head(spec)`` (create the head modules; called once, from ``setup`` with the data
    module's spec, or from a checkpoint's saved spec), ``build_metrics() -> dict[str, Metric]`` (fresh
    metrics for one stage; the base keeps a copy for val and one for test and logs them as
    ``val/<name>``, ``test/<name>``), ``step(batch, stage) -> loss`` (forward, loss, and
    ``self.metrics(stage)`` updates; stage is "train", "val" or "test"; metrics are None for "train").
    The base does the rest: protocol, optimizer groups, logging, best value, checkpoint spec, callbacks,
    and non-finite training losses (counted, logged as train/nonfinite_losses, the batch skipped).

Ready-made pairs: `ClassificationTaskModule` + `ClassificationDataModule` (mean-pool + linear,
cross-entropy, accuracy; ks and sid only name their task and label field), and for CTC tasks
(asr, sf) `CTCTaskModule` + `CTCTaskDataModule`, which add the vocabulary (`Vocabulary`, built from
the train manifest, saved with the checkpoint), the BiLSTM CTC head, the fp32 CTC loss with
``zero_infinity``, greedy decoding and the all-blank warning. Adapters use `require_file` and
`relative_audio`.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchmetrics import MaxMetric, Metric, MetricCollection, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from rewiring.audio import BadAudio, BucketBatchSampler, Skipped, load_or_skip, pad_batch
from rewiring.encoder import EncoderOutput, SpeechEncoder
from rewiring.manifest import Record, audio_path, ids_hash, read_manifest, select_subset
from tasks.features import FeatureBatch, FeatureCache
from tasks.rnn import FrameLSTM
from tasks.specaug import SpecAugment

__all__ = [
    "CTCHead",
    "ClassificationDataModule",
    "ClassificationTaskModule",
    "CTCTargets",
    "CTCTaskDataModule",
    "CTCTaskModule",
    "EncoderWarmup",
    "Item",
    "ManifestDataset",
    "PooledClassifier",
    "Protocol",
    "Stage",
    "TaskBatch",
    "TaskDataModule",
    "TaskModule",
    "Vocabulary",
    "ctc_loss",
    "greedy_decode",
    "relative_audio",
    "require_file",
]

log = logging.getLogger(__name__)

Protocol = Literal["superb", "finetune"]
Stage = Literal["train", "val", "test"]
SPLITS = ("train", "dev", "test")


# ======================================================================== data


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

    def __len__(self) -> int:
        return self.waveforms.shape[0]


class ManifestDataset(Dataset):
    """Records of one manifest, loaded through `rewiring.audio` (bad files skipped or raised as configured).

    ``crop_seconds`` (training only): a longer utterance is read as one random window of that length
    (only the window is decoded); ``None`` reads whole files (evaluation always does).
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
    ) -> None:
        self.manifest = Path(manifest)
        self.records = records
        self.target_fn = target_fn
        self.on_bad_audio = on_bad_audio
        self.max_seconds = max_seconds
        self.crop_seconds = crop_seconds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item | Skipped:
        rec = self.records[i]
        path = audio_path(self.manifest, rec)
        if self.crop_seconds is not None and rec.duration > self.crop_seconds:
            # torch's RNG: seeded by seed_everything, and per worker by the DataLoader.
            offset = float(torch.rand(())) * (rec.duration - self.crop_seconds)
            wav = load_or_skip(path, self.on_bad_audio, record=rec, offset=offset, duration=self.crop_seconds)
        else:
            wav = load_or_skip(path, self.on_bad_audio, record=rec, max_seconds=self.max_seconds)
        if isinstance(wav, Skipped):
            return wav  # the bad file and its reason code, left out by the collate
        return Item(id=rec.id, wav=wav, target=self.target_fn(rec))

    def crop_target(self, target: Any, offset: float, seconds: float) -> Any:
        """The target of the window [offset, offset + seconds) of an utterance; the feature cache crops
        cached frames with it. A per-utterance target (a class, a speaker) stays as it is."""
        return target


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message, flush=True)


def _embedded_root(root: Path) -> bool:
    """An embedded-corpus root looks like .../embedded/<size>; those are built on first use."""
    return root.name in ("tiny", "small", "full") and root.parent.name == "embedded"


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
        on_bad_audio: "skip" logs a warning naming the file and drops it from the batch; "error" raises.
        bucket_by_length: batch training utterances of similar length (less padding); False: plain shuffle.
    """

    task: ClassVar[str] = ""
    stratify: ClassVar[str | None] = "label"
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
        if missing and _embedded_root(self.root):
            from rewiring.corpus import ensure_corpus

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
    def dataset(self, split: str) -> ManifestDataset:
        if split not in self.records:
            raise RuntimeError(f"{self.task}: split {split!r} is not set up (call setup first)")
        return ManifestDataset(
            self.manifest(split),
            self.records[split],
            self.target,
            on_bad_audio=self.on_bad_audio,
            max_seconds=self.max_seconds,
            crop_seconds=self.train_crop_seconds if split == "train" else None,
        )

    def collate(self, items: list[Item | None]) -> TaskBatch | None:
        """Pad the loaded items; items dropped as bad audio are left out (a batch of none gives None)."""
        items = [it for it in items if it is not None and not isinstance(it, Skipped)]
        if not items:
            return None
        wb = pad_batch([it.wav for it in items])
        return TaskBatch(
            waveforms=wb.waveforms,
            attention_mask=wb.attention_mask,
            lengths=wb.lengths,
            ids=[it.id for it in items],
            targets=self.collate_targets([it.target for it in items]),
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
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=g)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)
        if shuffle and self.bucket_by_length:
            # Similar lengths in a batch: padding drops from ~1.3-2x the real audio to ~1.2-1.4x
            # (benchmarks/results.md). The run's seed (seed_everything) drives the shuffle.
            crop = self.train_crop_seconds
            durations = [min(r.duration, crop) if crop else r.duration for r in self.records[split]]
            sampler = BucketBatchSampler(durations, self.batch_size, seed=torch.initial_seed() % 2**31, drop_last=False)
            return DataLoader(dataset, batch_sampler=sampler, **common)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# ======================================================================== heads


class PooledClassifier(nn.Module):
    """Utterance-level head: mean over real frames, optional projection, dropout, linear.

    SUPERB's light head for ks/ic/sid is mean-pool + linear; ``projector_dim`` adds s3prl's
    frame-wise projection before pooling.
    """

    def __init__(self, in_dim: int, num_classes: int, projector_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.projector = nn.Linear(in_dim, projector_dim) if projector_dim else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(projector_dim or in_dim, num_classes)

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        x = self.projector(features)
        m = frame_mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.linear(self.dropout(pooled))


# ======================================================================== CTC


class Vocabulary:
    """CTC tokens: index 0 is the blank, then the tokens seen in the train manifest (sorted).

    Tokens are characters for asr; sf adds multi-character slot tags. ``encode`` takes a string
    (split into characters) or a sequence of tokens; tokens not in the vocabulary are dropped and
    counted in ``unknown`` (dev/test may hold a character that train never had).
    """

    BLANK = "<blank>"

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if not tokens or tokens[0] != self.BLANK:
            raise ValueError(f"a CTC vocabulary starts with {self.BLANK!r}, got {tokens[:3]!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.unknown = 0

    @classmethod
    def build(cls, sequences: Sequence[str | Sequence[str]]) -> Vocabulary:
        """From the train targets (strings: characters; lists: tokens)."""
        seen = {tok for seq in sequences for tok in seq}
        seen.discard(cls.BLANK)
        return cls([cls.BLANK, *sorted(seen)])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, seq: str | Sequence[str]) -> list[int]:
        out = [self.index.get(t, -1) for t in seq]
        bad = out.count(-1)
        if bad:
            self.unknown += bad
        return [i for i in out if i > 0]

    def decode(self, ids: Sequence[int], sep: str = "") -> str:
        return sep.join(self.tokens[i] for i in ids if 0 < i < len(self.tokens))


@dataclass
class CTCTargets:
    """Padded token ids [B, S] (0 = padding, never a target), their lengths [B], and the reference texts."""

    tokens: Tensor
    lengths: Tensor
    texts: list[str]


class CTCHead(nn.Module):
    """SUPERB's ASR head: a BiLSTM over frame features, then a linear layer to the tokens (log-probs, fp32).

    ``projector_dim`` adds s3prl's frame-wise Linear before the BiLSTM (its ``project_dim``: 1024 in the
    asr and snips recipes); None feeds the features straight in. ``dropout`` follows every BiLSTM
    layer, the last one included, as s3prl's RNNLayer does.
    """

    def __init__(
        self,
        in_dim: int,
        vocab_size: int,
        hidden: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        projector_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.projector = nn.Linear(in_dim, projector_dim) if projector_dim else nn.Identity()
        in_dim = projector_dim or in_dim
        # num_layers 0: no recurrence, a frame-wise probe (projector, GELU, linear): the cheapest head.
        self.lstm = (
            FrameLSTM(in_dim, hidden, num_layers=num_layers, bidirectional=True, dropout=dropout)
            if num_layers > 0
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(2 * hidden if self.lstm is not None else in_dim, vocab_size)

    def forward(self, features: Tensor, frame_lengths: Tensor) -> Tensor:
        out = self.projector(features)
        out = self.lstm(out, frame_lengths) if self.lstm is not None else F.gelu(out)
        logits = self.linear(self.dropout(out))
        return F.log_softmax(logits.float(), dim=-1)


def ctc_loss(log_probs: Tensor, frame_lengths: Tensor, targets: CTCTargets) -> Tensor:
    """CTC in fp32 (under bf16/fp16 it goes NaN) with ``zero_infinity`` (impossible alignments give 0)."""
    with torch.autocast(device_type=log_probs.device.type, enabled=False):
        return F.ctc_loss(
            log_probs.float().transpose(0, 1),  # [F, B, V]
            targets.tokens,
            frame_lengths,
            targets.lengths,
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )


def greedy_decode(log_probs: Tensor, frame_lengths: Tensor) -> list[list[int]]:
    """Best path: argmax per frame, repeats collapsed, blanks (0) removed; one id list per utterance."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, frame_lengths.cpu().tolist(), strict=True):
        ids = torch.unique_consecutive(row[: int(n)]).tolist()
        out.append([i for i in ids if i != 0])
    return out


# ======================================================================== protocols


class EncoderWarmup(BaseFinetuning):
    """Fine-tuning protocol: the encoder stays frozen for the first ``steps`` optimizer steps.

    The state follows ``trainer.global_step`` at every batch, so a resumed run freezes or not exactly
    as the killed one would have. The encoder is frozen at the first batch rather than in
    ``freeze_before_training``: DDP registers only parameters that require grad when it wraps the
    model (after setup), and parameters frozen then would never be synchronised after unfreezing.
    (Under DDP the warm-up needs ``strategy: ddp_find_unused_parameters_true``.) The optimizer holds
    the encoder's parameter group from the start; frozen parameters have no gradient and are skipped.
    """

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = int(steps)

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        """Nothing here: see the class docstring (the first batch decides)."""

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer) -> None:
        """Epoch-based in Lightning; the warm-up counts steps (see on_train_batch_start)."""

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        frozen = trainer.global_step < self.steps
        encoder: SpeechEncoder = pl_module.encoder
        if encoder.frozen != frozen:
            encoder.set_frozen(frozen)
            rank_zero_info(
                f"encoder {'frozen' if frozen else 'unfrozen'} at step {trainer.global_step} "
                f"(freeze_encoder_steps={self.steps})"
            )


# ======================================================================== module


class TaskModule(LightningModule, ABC):
    """A SpeechEncoder plus a task head, a loss and torchmetrics, under one of two protocols.

    Args:
        encoder: the backbone (conf/encoder/*.yaml).
        protocol: "superb" (the paper's: encoder frozen, learned softmax-weighted sum of all its hidden
            states, light head) or "finetune" (the whole encoder trains, the CNN as the encoder's
            freeze_feature_encoder says, with its own learning rate).
        optimizer: injected optimizer class; it gets two parameter groups, "head" and "encoder".
        lr_head: learning rate of the head (and of the layer weights).
        lr_encoder: learning rate of the encoder (finetune only).
        freeze_encoder_steps: finetune: keep the encoder frozen for the first N steps (EncoderWarmup).
        early_stopping_patience: stop after this many validations without improving the primary
            metric; None: no early stopping.
        save_frozen_encoder: copy a frozen (superb) encoder's weights into every checkpoint. By
            default they are left out when the encoder comes from a folder or a hub name (it can be
            rebuilt from there; a fingerprint checks it on load): a wav2vec2-base checkpoint is then
            0.1 MB, not 378 MB. A config-dict encoder (random weights) is always copied.
        feature_cache: superb only: the folder of the frozen-feature cache (tasks/features.py), which
            computes every hidden state of each utterance once and reads it from disk in every run;
            null encodes live at every step. finetune always encodes live.
        feature_cache_max_gb: above this estimated size of the task's entries the run encodes live.
        feature_cache_dtype: how the cached hidden states are stored.
    """

    task: ClassVar[str] = ""
    primary_metric: ClassVar[str] = "val/loss"
    metric_mode: ClassVar[Literal["max", "min"]] = "min"

    def __init__(
        self,
        encoder: SpeechEncoder,
        protocol: Protocol = "superb",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_head: float = 1e-3,
        lr_encoder: float = 5e-5,
        freeze_encoder_steps: int = 0,
        early_stopping_patience: int | None = None,
        save_frozen_encoder: bool = False,
        feature_cache: str | None = "cache/features",
        feature_cache_max_gb: float = 100.0,
        feature_cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    ) -> None:
        super().__init__()
        if protocol not in ("superb", "finetune"):
            raise ValueError(f"protocol must be 'superb' or 'finetune', got {protocol!r}")
        if freeze_encoder_steps < 0:
            raise ValueError(f"freeze_encoder_steps must be >= 0, got {freeze_encoder_steps}")
        if freeze_encoder_steps and protocol != "finetune":
            raise ValueError("freeze_encoder_steps applies to protocol 'finetune' (superb keeps it frozen)")
        self.save_hyperparameters(ignore=["encoder", "optimizer", "specaug"])
        self.encoder = encoder
        self.protocol = protocol
        self.optimizer = optimizer
        self.lr_head = lr_head
        self.lr_encoder = lr_encoder
        self.freeze_encoder_steps = freeze_encoder_steps
        self.early_stopping_patience = early_stopping_patience
        self.save_frozen_encoder = save_frozen_encoder
        self.feature_cache = feature_cache
        self.feature_cache_max_gb = feature_cache_max_gb
        self.feature_cache_dtype = feature_cache_dtype
        self._encoder_fingerprint: str | None = None
        if protocol == "superb":
            encoder.configure(layers="weighted", freeze=True)
        else:  # the encoder config's layer choice; the CNN as its freeze_feature_encoder says
            encoder.configure(layers=encoder.layers, freeze=False)
        self.spec: dict[str, Any] | None = None
        self.val_metrics: MetricCollection | None = None
        self.test_metrics: MetricCollection | None = None
        best = MaxMetric() if self.metric_mode == "max" else MinMetric()
        best.persistent(True)
        self.best_metric = best
        self.nonfinite_losses = 0

    # ------------------------------------------------------------ hooks for the tasks
    @abstractmethod
    def build_head(self, spec: dict[str, Any]) -> None:
        """Create the head modules from the data spec (``self.encoder.hidden_size`` is the input size)."""

    @abstractmethod
    def build_metrics(self) -> dict[str, Metric]:
        """Fresh metrics for one stage, keyed by name without the stage ("acc")."""

    @abstractmethod
    def step(self, batch: TaskBatch, stage: Stage) -> Tensor:
        """Forward, loss, metric updates (``self.metrics(stage)``, None for train); returns the loss."""

    # ------------------------------------------------------------ helpers for the tasks
    def encode(self, batch: TaskBatch | FeatureBatch) -> EncoderOutput:
        if isinstance(batch, FeatureBatch):  # hidden states from the frozen-feature cache
            return self.encoder.combine(batch.hidden_states(self.encoder.layer_weights.dtype), batch.frame_mask)
        return self.encoder(batch.waveforms, batch.attention_mask)

    def metrics(self, stage: Stage) -> MetricCollection | None:
        return {"val": self.val_metrics, "test": self.test_metrics}.get(stage)

    @property
    def primary_name(self) -> str:
        """The primary metric without its stage: "val/acc" -> "acc"."""
        return self.primary_metric.split("/", 1)[1]

    # ------------------------------------------------------------ data spec
    def install_spec(self, spec: dict[str, Any]) -> None:
        """Build the head and the metrics for this data (once)."""
        self.spec = spec
        self.build_head(spec)
        metrics = self.build_metrics()
        if self.primary_name not in metrics and self.primary_name != "loss":
            raise ValueError(
                f"{type(self).__name__}: primary_metric {self.primary_metric!r} is not among its metrics "
                f"{sorted(metrics)}"
            )
        self.val_metrics = MetricCollection(metrics, prefix="val/", compute_groups=False)
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "spec", None) is None:
            if self.spec is None:
                raise RuntimeError(
                    f"{type(self).__name__} builds its head from a TaskDataModule's spec "
                    f"(class names, vocabulary); none was given"
                )
            return
        if self.spec is None:
            self.install_spec(datamodule.spec)
        elif self.spec != datamodule.spec:
            raise ValueError(self._spec_mismatch(self.spec, datamodule.spec, "this model", "the data module"))
        if isinstance(datamodule, TaskDataModule):  # opened when the first loader is built, after a checkpoint
            cached = self.protocol == "superb" and self.feature_cache is not None
            datamodule.features = FeatureCache(self, datamodule) if cached else None

    @staticmethod
    def _spec_mismatch(a: dict, b: dict, name_a: str, name_b: str) -> str:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        details = "; ".join(f"{k}: {str(a.get(k))[:120]} vs {str(b.get(k))[:120]}" for k in keys)
        return f"the data spec of {name_a} and {name_b} differ ({details})"

    # The frozen encoder's tensors in the module's state dict (SpeechEncoder keeps the HF model in .model).
    FROZEN_PREFIX: ClassVar[str] = "encoder.model."

    def leaves_out_encoder(self) -> bool:
        """Whether checkpoints leave out the encoder's weights (see `save_frozen_encoder`)."""
        return self.protocol == "superb" and not self.save_frozen_encoder and isinstance(self.encoder.source, str)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["task_spec"] = {"task": self.task, "spec": self.spec}
        if self.leaves_out_encoder():
            state = checkpoint["state_dict"]
            keys = [k for k in state if k.startswith(self.FROZEN_PREFIX)]
            for k in keys:
                del state[k]
            if self._encoder_fingerprint is None:  # superb never trains the encoder: hash it once
                self._encoder_fingerprint = self.encoder.fingerprint()
            checkpoint["frozen_encoder"] = {
                "source": self.encoder.source,
                "tensors": len(keys),
                "fingerprint": self._encoder_fingerprint,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("task_spec")
        if saved is None:
            raise ValueError(f"checkpoint has no task_spec: not a {type(self).__name__} checkpoint")
        if saved.get("task") != self.task:
            raise ValueError(f"checkpoint is for task {saved.get('task')!r}, this module is {self.task!r}")
        if self.spec is None:  # load_from_checkpoint, outside a trainer: the head comes from the checkpoint
            self.install_spec(saved["spec"])
        elif saved["spec"] != self.spec:
            raise ValueError(self._spec_mismatch(saved["spec"], self.spec, "the checkpoint", "this data"))
        frozen = checkpoint.get("frozen_encoder")
        if frozen is not None:
            self._restore_frozen_encoder(checkpoint, frozen)

    def _restore_frozen_encoder(self, checkpoint: dict[str, Any], frozen: dict[str, Any]) -> None:
        """Put this module's own encoder weights where the checkpoint left them out, once their
        fingerprint matches (so strict loading still checks every other tensor)."""
        fingerprint = self.encoder.fingerprint()
        if fingerprint != frozen["fingerprint"]:
            raise ValueError(
                f"the checkpoint left out its frozen encoder ({frozen['source']}, fingerprint "
                f"{frozen['fingerprint'][:16]}), and the encoder built for this run from "
                f"{self.encoder.describe()} has other weights (fingerprint {fingerprint[:16]}): load it with "
                "the encoder it was trained on (or train with model.init_args.save_frozen_encoder=true)"
            )
        self._encoder_fingerprint = fingerprint
        state = checkpoint["state_dict"]
        for name, tensor in self.encoder.model.state_dict().items():
            state[self.FROZEN_PREFIX + name] = tensor

    # ------------------------------------------------------------ steps
    def training_step(self, batch: TaskBatch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every item of the batch was bad audio (skipped, and logged)
            return None
        loss = self.step(batch, "train")
        if not torch.isfinite(loss.detach()):
            self.nonfinite_losses += 1
            rank_zero_warn(
                f"non-finite training loss at step {self.global_step} "
                f"({self.nonfinite_losses} so far); the batch is skipped"
            )
            self.log("train/nonfinite_losses", float(self.nonfinite_losses), on_step=True, on_epoch=False)
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def _eval_step(self, batch: TaskBatch | None, stage: Stage) -> None:
        if batch is None:
            return
        loss = self.step(batch, stage)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch))
        self.log_dict(self.metrics(stage), on_step=False, on_epoch=True, batch_size=len(batch))

    def validation_step(self, batch: TaskBatch | None, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: TaskBatch | None, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Log ``<primary>_best`` while fitting (best value so far, kept in checkpoints; direction from metric_mode)."""
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit" or self.primary_name == "loss":
            return
        metric = self.val_metrics[self.primary_name]
        if metric.update_count == 0:
            return
        value = metric.compute()
        if torch.is_tensor(value) and value.numel() == 1 and math.isfinite(float(value)):
            self.best_metric.update(value)
            self.log(f"{self.primary_metric}_best", self.best_metric.compute())

    # ------------------------------------------------------------ optimizer and callbacks
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: "head" (head + layer weights, lr_head) and "encoder" (finetune only, lr_encoder)."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        layer_weights = getattr(self.encoder, "layer_weights", None)
        head = [p for p in self.parameters() if id(p) not in encoder_ids and p.requires_grad]
        if layer_weights is not None:
            head.append(layer_weights)
        groups = [{"name": "head", "params": head, "lr": self.lr_head}]
        if self.protocol == "finetune":
            # All of it, frozen or not yet: parameters without a gradient are skipped by the optimizer,
            # and the warm-up's unfreezing needs no new group.
            skip = {id(layer_weights)} if layer_weights is not None else set()
            encoder = [p for p in self.encoder.parameters() if id(p) not in skip]
            groups.append({"name": "encoder", "params": encoder, "lr": self.lr_encoder})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        return self.optimizer(self.parameter_groups())

    def configure_callbacks(self) -> list[Callback]:
        """Checkpoints (best by the primary metric, plus last) and early stopping follow the task's metric.

        No checkpoint callback under fast_dev_run: Lightning 2.6's ModelCheckpoint still writes
        last.ckpt at train end there (into the working directory, as the logger is a dummy).
        """
        callbacks: list[Callback] = []
        if not (self._trainer is not None and self._trainer.fast_dev_run):
            callbacks.append(
                ModelCheckpoint(
                    monitor=self.primary_metric,
                    mode=self.metric_mode,
                    save_last=True,
                    save_top_k=1,
                    filename="best-{step}",
                )
            )
        if self.early_stopping_patience is not None:
            callbacks.append(
                EarlyStopping(
                    monitor=self.primary_metric,
                    mode=self.metric_mode,
                    patience=self.early_stopping_patience,
                    check_on_train_epoch_end=False,
                )
            )
        if self.protocol == "finetune" and self.freeze_encoder_steps > 0:
            callbacks.append(EncoderWarmup(self.freeze_encoder_steps))
        return callbacks


# ======================================================================== CTC tasks


class CTCTaskDataModule(TaskDataModule):
    """A data module whose target is a token sequence (characters; sf adds slot tags).

    Hook: ``target_tokens(record) -> str | list[str]`` (default: the record's text). The vocabulary
    is built from the targets of the whole train manifest (spec ``{"vocab": [...]}``).
    """

    stratify: ClassVar[str | None] = None

    def target_tokens(self, record: Record) -> str | list[str]:
        if record.text is None:
            raise ValueError(f"{self.task}: record {record.id!r} has no text (CTC needs a transcript)")
        return record.text

    def build_spec(self, train_records: list[Record]) -> dict[str, Any]:
        return {"vocab": Vocabulary.build([self.target_tokens(r) for r in train_records]).tokens}

    @property
    def vocab(self) -> Vocabulary:
        if getattr(self, "_vocab", None) is None:
            self._vocab = Vocabulary(self.spec["vocab"])
        return self._vocab

    def target(self, record: Record) -> tuple[list[int], str]:
        seq = self.target_tokens(record)
        text = seq if isinstance(seq, str) else " ".join(seq)
        return self.vocab.encode(seq), text

    def collate_targets(self, targets: list[tuple[list[int], str]]) -> CTCTargets:
        lengths = torch.tensor([len(ids) for ids, _ in targets], dtype=torch.long)
        tokens = torch.zeros(len(targets), max(1, int(lengths.max())), dtype=torch.long)
        for i, (ids, _) in enumerate(targets):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return CTCTargets(tokens=tokens, lengths=lengths, texts=[t for _, t in targets])


class CTCTaskModule(TaskModule):
    """A TaskModule with the CTC head over ``spec["vocab"]``; subclasses write ``build_metrics`` and ``step``.

    In ``step``: ``log_probs, frame_lengths = self.ctc_forward(batch)``, ``loss = self.ctc_loss(...)``,
    and for val/test ``hyps = self.decode(log_probs, frame_lengths, stage)`` (strings), then the metrics.
    ``decode`` counts empty hypotheses; a validation epoch where every hypothesis is empty warns that
    the model predicts only blanks, and ``<stage>/blank_rate`` is logged.

    Args (besides TaskModule's): lstm_hidden, lstm_layers, dropout of the BiLSTM head; projector_dim
    (s3prl's Linear before the BiLSTM; None: none); specaug (`tasks.specaug.SpecAugment` over the
    features as they enter the head, training only, as s3prl's asr and snips recipes; None: none).
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        lstm_hidden: int = 256,
        lstm_layers: int = 2,
        dropout: float = 0.2,
        projector_dim: int | None = None,
        specaug: SpecAugment | None = None,
        **kwargs: Any,
    ) -> None:
        # TaskModule's arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(encoder, **kwargs)
        self.lstm_hidden = lstm_hidden
        self.lstm_layers = lstm_layers
        self.dropout = dropout
        self.projector_dim = projector_dim
        self.specaug = specaug
        self._decoded = {"val": [0, 0], "test": [0, 0]}  # [empty, total] this epoch

    def build_head(self, spec: dict[str, Any]) -> None:
        self.vocab = Vocabulary(spec["vocab"])
        self.head = CTCHead(
            self.encoder.hidden_size,
            len(self.vocab),
            hidden=self.lstm_hidden,
            num_layers=self.lstm_layers,
            dropout=self.dropout,
            projector_dim=self.projector_dim,
        )

    def ctc_forward(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Log-probabilities [B, F, V] (fp32) and the real frame count of each row."""
        out = self.encode(batch)
        frame_lengths = out.frame_mask.sum(1)
        features = out.features
        if self.specaug is not None:  # after encode: the same masks on live and cached features
            features = self.specaug(features, out.frame_mask)
        return self.head(features, frame_lengths), frame_lengths

    def ctc_loss(self, log_probs: Tensor, frame_lengths: Tensor, targets: CTCTargets) -> Tensor:
        return ctc_loss(log_probs, frame_lengths, targets)

    def decode(
        self, log_probs: Tensor, frame_lengths: Tensor, stage: Stage | None = None, sep: str = ""
    ) -> list[str]:
        """Greedy hypotheses as strings (tokens joined by ``sep``); counts all-blank outputs per stage."""
        ids = greedy_decode(log_probs, frame_lengths)
        if stage in self._decoded:
            self._decoded[stage][0] += sum(1 for x in ids if not x)
            self._decoded[stage][1] += len(ids)
        return [self.vocab.decode(x, sep=sep) for x in ids]

    def _blank_check(self, stage: Stage) -> None:
        empty, total = self._decoded[stage]
        self._decoded[stage] = [0, 0]
        if total == 0 or self.trainer.sanity_checking:
            return
        self.log(f"{stage}/blank_rate", empty / total)
        if empty == total:
            msg = (
                f"{self.task}: the model predicts only blanks on all {total} {stage} utterances "
                f"(step {self.global_step}); a CTC model often does early on; if it persists, "
                f"check the learning rate and that inputs are long enough for the targets"
            )
            rank_zero_warn(msg, category=RuntimeWarning)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._blank_check("val")

    def on_test_epoch_end(self) -> None:
        self._blank_check("test")


# ======================================================================== classification tasks


class ClassificationDataModule(TaskDataModule):
    """One label per utterance, read from the Record field ``label_field`` ("label"; sid: "speaker").

    The classes are the sorted label values of the whole train manifest (spec ``{"classes": [...]}``).

    Args (besides TaskDataModule's): class_balanced: draw training utterances with replacement,
    weighted by the inverse frequency of their class in the (low-resource) train split, so every
    class comes up equally often, as s3prl's KS loader does (a WeightedRandomSampler; it replaces
    bucket_by_length). False: the bucketed or plain shuffle.
    """

    label_field: ClassVar[str] = "label"

    def __init__(self, class_balanced: bool = False, **kwargs: Any) -> None:
        # TaskDataModule's arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(**kwargs)
        self.class_balanced = class_balanced

    def sample_weights(self, split: str) -> list[float] | None:
        if not self.class_balanced:
            return None
        labels = [self._label(r) for r in self.records[split]]
        counts = Counter(labels)
        return [len(labels) / counts[label] for label in labels]

    def _label(self, record: Record) -> str:
        value = getattr(record, self.label_field)
        if value is None:
            raise ValueError(
                f"{self.task}: record {record.id!r} has no {self.label_field!r} (needed as its class)"
            )
        return value

    def build_spec(self, train_records: list[Record]) -> dict[str, Any]:
        return {"classes": sorted({self._label(r) for r in train_records})}

    def target(self, record: Record) -> int:
        if getattr(self, "_class_index", None) is None:
            self._class_index = {c: i for i, c in enumerate(self.spec["classes"])}
        label = self._label(record)
        if label not in self._class_index:
            raise ValueError(
                f"{self.task}: record {record.id!r} has class {label!r}, which the train manifest never has"
            )
        return self._class_index[label]


class ClassificationTaskModule(TaskModule):
    """Mean-pool over real frames + linear (SUPERB's ks/sid head), cross-entropy, accuracy.

    Args (besides TaskModule's): projector_dim (optional frame-wise projection before pooling, as
    s3prl's), dropout before the linear layer.
    """

    primary_metric: ClassVar[str] = "val/acc"
    metric_mode: ClassVar[Literal["max", "min"]] = "max"

    def __init__(
        self,
        encoder: SpeechEncoder,
        projector_dim: int | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # TaskModule's arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(encoder, **kwargs)
        self.projector_dim = projector_dim
        self.dropout = dropout

    def build_head(self, spec: dict[str, Any]) -> None:
        self.classes = list(spec["classes"])
        self.head = PooledClassifier(
            self.encoder.hidden_size,
            len(self.classes),
            projector_dim=self.projector_dim,
            dropout=self.dropout,
        )

    def build_metrics(self) -> dict[str, Metric]:
        return {"acc": MulticlassAccuracy(num_classes=max(2, len(self.classes)), average="micro")}

    def forward(self, batch: TaskBatch) -> Tensor:
        """Class logits [B, C]."""
        out = self.encode(batch)
        return self.head(out.features, out.frame_mask)

    def step(self, batch: TaskBatch, stage: Stage) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch.targets)
        metrics = self.metrics(stage)
        if metrics is not None:
            metrics["acc"].update(logits.argmax(-1), batch.targets)
        return loss


# ======================================================================== adapter helpers


def require_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a file, else FileNotFoundError naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def relative_audio(path: str | Path, manifest_dir: str | Path) -> str:
    """The manifest's ``audio`` field: the file's path relative to the manifest's folder."""
    return Path(os.path.relpath(Path(path).absolute(), Path(manifest_dir).absolute())).as_posix()
