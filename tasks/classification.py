"""Utterance classification (ks, sid; ic reuses the head): mean-pool over real frames + linear,
cross-entropy, accuracy. A task only names its ``task`` and its ``label_field``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from rewiring.encoder import SpeechEncoder
from rewiring.frames import masked_mean
from rewiring.manifest import Record
from tasks.data import TaskBatch, TaskDataModule
from tasks.module import Stage, TaskModule

__all__ = ["ClassificationDataModule", "ClassificationTaskModule", "PooledClassifier"]


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
        pooled = masked_mean(self.projector(features), frame_mask)
        return self.linear(self.dropout(pooled))


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
