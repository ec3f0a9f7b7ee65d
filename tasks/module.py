"""The model side of a task: a SpeechEncoder plus a head under one of two protocols (superb, finetune).

A task's `TaskModule` subclass sets ``task``, ``primary_metric`` ("val/acc") and ``metric_mode``
("max" | "min") and writes three hooks: ``build_head(spec)`` (the head modules; called once, from
``setup`` with the data module's spec or from a checkpoint's saved spec), ``build_metrics()``
(fresh metrics for one stage, logged as ``val/<name>`` and ``test/<name>``) and
``step(batch, stage) -> loss`` (forward, loss, ``self.metrics(stage)`` updates; None for "train").
The base does the rest, once: optimizer groups, the encoder warm-up, logging, the best value,
early stopping, checkpoints (the spec saved with them, a frozen encoder left out), skipping
non-finite training losses (counted as train/nonfinite_losses), and counting the utterances skipped
as bad audio per split and reason (rewiring.skips: ``data/skipped/<split>/<reason>``, the
``skipped`` section of convergence.json, a warning line per split at the end of a fit or test).
A training batch with nothing to learn from (every item skipped, or a non-finite loss) takes a step
that changes no weight, so validation stays on its grid of ``val_check_interval`` steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MaxMetric, Metric, MetricCollection, MinMetric

from rewiring.encoder import EncoderOutput, SpeechEncoder
from rewiring.resume import ResumableCheckpoint
from rewiring.skips import SkipLog, SkippableSteps, SkippedBatch
from tasks.data import TaskBatch, TaskDataModule
from tasks.features import FeatureBatch, FeatureCache

__all__ = ["EncoderWarmup", "Protocol", "Stage", "TaskModule"]

Protocol = Literal["superb", "finetune"]
Stage = Literal["train", "val", "test"]
SPLIT_OF: dict[str, str] = {"train": "train", "val": "dev", "test": "test"}  # the data split a stage reads


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


class TaskModule(SkippableSteps, LightningModule, ABC):
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
        self.skips = SkipLog()  # utterances skipped, per split and reason

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

    def run_notes(self) -> dict[str, str]:
        """How this run got its features, for convergence.json's ``notes`` (a sweep's progress line
        says when a run encoded live, and why: several times slower, e.g. on a nearly full disk)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        cache = getattr(datamodule, "features", None)
        if cache is None or not cache.opened:
            return {}
        return {"feature_cache": "on" if cache.store is not None else f"off: {cache.reason}"}

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
            # Audio shorter than the real encoder's receptive field is bad audio ("too_short").
            datamodule.min_samples = self.encoder.min_samples
            for split, records in datamodule.records.items():
                self.skips.track(split, [r.id for r in records], self.device)

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
        checkpoint["skipped"] = self.skips.state()  # a resumed fit goes on counting
        checkpoint["nonfinite_losses"] = self.nonfinite_losses
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
        self.skips.load(checkpoint.get("skipped"))
        self.nonfinite_losses = int(checkpoint.get("nonfinite_losses", 0))

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
    def _count(self, batch: TaskBatch | FeatureBatch | SkippedBatch, stage: Stage) -> None:
        self.skips.update(SPLIT_OF[stage], batch.ids, batch.skipped)

    def training_step(self, batch: TaskBatch | FeatureBatch | SkippedBatch, batch_idx: int) -> Tensor:
        self._count(batch, "train")
        if len(batch) == 0:  # every item of the batch was bad audio (each logged, and counted)
            return self.skip_step()  # a step without an update: validation stays on its grid
        loss = self.step(batch, "train")
        if not torch.isfinite(loss.detach()):
            self.nonfinite_losses += 1
            rank_zero_warn(
                f"non-finite training loss at step {self.global_step} "
                f"({self.nonfinite_losses} so far); the batch is skipped"
            )
            self.log("train/nonfinite_losses", float(self.nonfinite_losses), on_step=True, on_epoch=False)
            return self.skip_step()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch))
        return loss

    def _eval_step(self, batch: TaskBatch | FeatureBatch | SkippedBatch, stage: Stage) -> None:
        self._count(batch, stage)
        if len(batch) == 0:
            return
        loss = self.step(batch, stage)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch))
        self.log_dict(self.metrics(stage), on_step=False, on_epoch=True, batch_size=len(batch))

    def validation_step(self, batch: TaskBatch | None, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: TaskBatch | None, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Log the skip counts so far, and ``<primary>_best`` while fitting (best value so far, kept in
        checkpoints; direction from metric_mode)."""
        if not self.trainer.sanity_checking:
            if self.trainer.state.fn == "validate":  # the end of the run
                self.skips.finish(self.trainer, ("dev",))
            else:
                self.skips.log(self.trainer, ("train", "dev"))
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit" or self.primary_name == "loss":
            return
        metric = self.val_metrics[self.primary_name]
        if metric.update_count == 0:
            return
        value = metric.compute()
        if torch.is_tensor(value) and value.numel() == 1 and math.isfinite(float(value)):
            self.best_metric.update(value)
            self.log(f"{self.primary_metric}_best", self.best_metric.compute())

    # The end of a run (and, for validate, on_validation_epoch_end): the skip counts logged, kept for
    # convergence.json and test.json (written by callbacks' on_fit_end and on_test_end, which come
    # after these), and a warning line per split with skips.
    def on_train_end(self) -> None:
        self.skips.finish(self.trainer, ("train", "dev"))

    def on_test_epoch_end(self) -> None:
        self.skips.finish(self.trainer, ("test",))

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
        """Checkpoints (best by the primary metric, plus last.ckpt at every validation and at the end,
        for an exact resume: rewiring/resume.py) and early stopping follow the task's metric.

        No checkpoint callback under fast_dev_run: Lightning 2.6's ModelCheckpoint still writes
        last.ckpt at train end there (into the working directory, as the logger is a dummy).
        """
        callbacks: list[Callback] = []
        if not (self._trainer is not None and self._trainer.fast_dev_run):
            callbacks.append(
                ResumableCheckpoint(
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
