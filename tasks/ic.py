"""Intent classification (IC): Fluent Speech Commands; mean-pool + three linear heads; exact-match accuracy.

An intent is (action, object, location); as in SUPERB, one linear layer over the pooled features
gives the logits of all three slots at once (split per slot), the loss is the sum of the three
cross-entropies, and a prediction counts as right only when all three slots are right (``acc``).
The per-slot accuracies are logged too (``acc_action``, ...).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from rewiring.audio import duration_seconds
from rewiring.manifest import Record, write_manifest
from tasks.adapters import relative_audio, require_file
from tasks.classification import ClassificationTaskModule, PooledClassifier
from tasks.data import TaskBatch, TaskDataModule
from tasks.module import Stage

__all__ = ["SLOTS", "ExactMatch", "IntentClassification", "IntentClassificationData", "prepare"]

SLOTS = ("action", "object", "location")


class ExactMatch(Metric):
    """Share of rows whose every column is right: preds and target [B, K] (K = 1 gives plain accuracy)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        right = preds == target
        if right.dim() > 1:
            right = right.all(dim=1)
        self.correct += right.sum()
        self.total += right.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class IntentClassificationData(TaskDataModule):
    """{root}/ic/{train,dev,test}.jsonl with ``labels`` {action, object, location}.

    The values of each slot come from the train manifest (spec ``{"slots": {slot: [values]}}``);
    low-resource splits are stratified by action.
    """

    task: ClassVar[str] = "ic"
    stratify: ClassVar[str | None] = "labels.action"

    def _labels(self, record: Record) -> dict[str, str]:
        labels = record.labels or {}
        missing = [s for s in SLOTS if s not in labels]
        if missing:
            raise ValueError(f"ic: record {record.id!r} has no labels {missing} (needs {', '.join(SLOTS)})")
        return labels

    def build_spec(self, train_records: list[Record]) -> dict[str, Any]:
        values = {s: sorted({self._labels(r)[s] for r in train_records}) for s in SLOTS}
        return {"slots": values}

    def target(self, record: Record) -> list[int]:
        if getattr(self, "_index", None) is None:
            self._index = {s: {v: i for i, v in enumerate(vals)} for s, vals in self.spec["slots"].items()}
        labels = self._labels(record)
        out = []
        for s in SLOTS:
            if labels[s] not in self._index[s]:
                raise ValueError(
                    f"ic: record {record.id!r} has {s} {labels[s]!r}, which the train manifest never has"
                )
            out.append(self._index[s][labels[s]])
        return out


class IntentClassification(ClassificationTaskModule):
    """IC head: mean over frames, one linear layer split into the three slots; sum of cross-entropies.

    Args: as ClassificationTaskModule's (projector_dim, dropout, and TaskModule's); only the head is
    split into the three slots, and the metrics are exact match over all three plus one per slot.
    """

    task: ClassVar[str] = "ic"

    def build_head(self, spec: dict[str, Any]) -> None:
        self.slot_sizes = [len(spec["slots"][s]) for s in SLOTS]
        self.head = PooledClassifier(
            self.encoder.hidden_size,
            sum(self.slot_sizes),
            projector_dim=self.projector_dim,
            dropout=self.dropout,
        )

    def build_metrics(self) -> dict[str, Metric]:
        return {"acc": ExactMatch(), **{f"acc_{s}": ExactMatch() for s in SLOTS}}

    def forward(self, batch: TaskBatch) -> list[Tensor]:
        """Logits per slot: [B, n_action], [B, n_object], [B, n_location]."""
        out = self.encode(batch)
        return list(self.head(out.features, out.frame_mask).split(self.slot_sizes, dim=-1))

    def step(self, batch: TaskBatch, stage: Stage) -> Tensor:
        logits = self(batch)
        targets = batch.targets  # [B, 3]
        loss = sum(F.cross_entropy(lg.float(), targets[:, i]) for i, lg in enumerate(logits))
        metrics = self.metrics(stage)
        if metrics is not None:
            preds = torch.stack([lg.argmax(-1) for lg in logits], dim=1)
            metrics["acc"].update(preds, targets)
            for i, s in enumerate(SLOTS):
                metrics[f"acc_{s}"].update(preds[:, i], targets[:, i])
        return loss


# ======================================================================== the real corpus

CSV_FILES = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}
COLUMNS = ("path", "speakerId", "transcription", *SLOTS)


def _dataset_root(root: Path) -> Path:
    """ROOT itself, or ROOT/fluent_speech_commands_dataset: the folder that holds data/ and wavs/."""
    for candidate in (root, root / "fluent_speech_commands_dataset"):
        if (candidate / "data").is_dir():
            return candidate
    raise FileNotFoundError(
        f"Fluent Speech Commands not found at {root}: expected {root}/data/ or "
        f"{root}/fluent_speech_commands_dataset/data/ with train_data.csv, valid_data.csv, test_data.csv"
    )


def _read_csv(path: Path, dataset: Path, manifest_dir: Path) -> list[Record]:
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            empty = [c for c in COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise ValueError(f"{path}:{lineno}: empty value(s) for {empty}")
            wav = dataset / row["path"]
            if not wav.is_file():
                raise FileNotFoundError(f"{path}:{lineno}: audio file not found: {wav}")
            rel = Path(row["path"]).with_suffix("")
            parts = rel.parts[1:] if rel.parts and rel.parts[0] == "wavs" else rel.parts
            records.append(
                Record(
                    id="/".join(parts),
                    audio=relative_audio(wav, manifest_dir),
                    duration=duration_seconds(wav),
                    text=row["transcription"].strip(),
                    speaker=row["speakerId"].strip(),
                    labels={s: row[s].strip() for s in SLOTS},
                )
            )
    if not records:
        raise ValueError(f"{path}: no rows")
    return records


def prepare(root: str | Path, out: str | Path) -> dict[str, int]:
    """Fluent Speech Commands (ROOT) -> {out}/ic/{train,dev,test}.jsonl; counts per split.

    Reads data/{train,valid,test}_data.csv (columns: index, path, speakerId, transcription, action,
    object, location; `path` relative to the dataset folder, under wavs/). valid becomes dev.
    """
    dataset = _dataset_root(Path(root))
    manifest_dir = Path(out) / "ic"
    splits = {}
    for split, name in CSV_FILES.items():
        path = require_file(dataset / "data" / name, f"Fluent Speech Commands {name}")
        splits[split] = _read_csv(path, dataset, manifest_dir)
    counts = {}
    for split, records in splits.items():
        write_manifest(manifest_dir / f"{split}.jsonl", records)
        counts[split] = len(records)
    return counts
