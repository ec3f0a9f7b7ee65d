"""Exact resume: a fit killed after a checkpoint and resumed from it ends as the uninterrupted fit does.

`fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt` continues on the same
batches with the same random draws, so the dev curve, convergence.json, the TensorBoard points and
the final weights equal those of the fit never killed (all but wall-clock times). Four pieces:

- **Checkpoints.** `ResumableCheckpoint` writes last.ckpt at every validation, at every
  `every_n_train_steps` (a stage with no validation) and at the end of training, whether or not the
  monitored metric improved (Lightning's `save_last` writes it only when it also wrote a top-k one).
- **Batches.** `resumable_loader` is torchdata's `StatefulDataLoader`: Lightning's fit loop saves
  its state in every checkpoint and loads it before it makes the resumed epoch's iterator. The
  loader takes a stateful sampler's state as it is and does not fast-forward it, so each training
  sampler resumes at the batch reached by itself (`BucketBatchSampler`, `HalfSampler`,
  `ResumableWeightedSampler`, `ResumableShuffle` for a plain shuffle); a finished pass gives the
  next epoch from its start, so an epoch resumed at its end is not an empty one (which would also
  make Lightning count an epoch too many). The loader has a generator of its own (`ResumableLoader`,
  saved with it), so making an iterator never draws from torch's. Lightning fetches no batch ahead
  from a loader with a length (it prefetches one from a loader without one, and the saved state
  would then count that batch, never trained on, as consumed): every training loader here has a
  length, so the state at a checkpoint counts exactly the batches trained on.
- **Random states.** `ExactResume` saves torch's (CPU and each CUDA device), numpy's and python's
  states in every checkpoint as they are when it is written, and puts them back at the resumed
  fit's `on_train_start`: after Lightning has built the loaders and the training iterator, right
  before the first batch is fetched (crops, masks, dropout draw from there on). Nothing draws
  between a checkpoint and the next fetch in the uninterrupted fit, so both continue from the same
  state. Iterators that a resumed fit makes at other points than the killed one did (the training
  one, and the tasks' evaluation ones, whose persistent workers start at the first validation
  after resuming) draw their workers' base seed from generators of their own, never from torch's.
- **TensorBoard.** The resumed fit's writer gets `purge_step` = the logging step of the first batch
  after the checkpoint (saved with the states), so the points the killed run wrote after its
  checkpoint are dropped (TensorBoard's Python reader purges on it; its Rust reader drops a
  series' points from a step written again), and the convergence curve's wall-clock points up to
  the checkpoint (their x is milliseconds, past any purge step) are written again. The folder is
  the one the run's config.yaml names (`trainer.logger.init_args.version`).

What holds where: exact with `num_workers=0`, and with DataLoader workers (persistent or not) for
map-style datasets: each worker's torch, numpy and python states travel with the batches it makes
(`WorkerRng`, in torchdata's per-batch worker snapshots) and are put back in the resumed workers
(tests/test_resume.py: task fits live, with workers and on the feature cache, killed mid-epoch and
at an epoch's end, and a rewiring fit, SIGKILLed and resumed; `torch.equal` weights). Not exact: under DDP (rank 0's states only are saved, and
Lightning's distributed sampler wrapper has no state); from a checkpoint without these states (an
older one, or one Lightning writes on an exception mid-step); and if a callback or module hook that
runs after ExactResume's `on_train_start` draws random numbers.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = [
    "ExactResume",
    "ResumableCheckpoint",
    "ResumableLoader",
    "ResumableShuffle",
    "ResumableWeightedSampler",
    "WorkerRng",
    "resumable_loader",
    "rng_state",
    "set_rng_state",
]


# ---------------------------------------------------------------------------- random states
def rng_state() -> dict[str, Any]:
    """Every generator the loop draws from by default: torch (CPU, each CUDA device), numpy, python.

    Tensors, numbers and tuples only, so that a checkpoint still loads with `weights_only=True` (as
    LightningCLI reads `--ckpt_path`)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class ExactResume(Callback):
    """Random states in every checkpoint, put back where the resumed fit continues; the TensorBoard
    writer of a resumed fit purges what the killed run logged after its checkpoint (module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self._restore: dict[str, Any] | None = None
        self._resumed = False
        # The logging step of the next training batch (Lightning logs against the batches that
        # stepped; it counts one up after a batch's validation and checkpoint): the purge step.
        self._log_step = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._log_step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_step = trainer.fit_loop.epoch_loop._batches_that_stepped  # counted up already

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(), "log_step": self._log_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict.get("rng")

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning made the writer before reading the checkpoint (in its setup hook), and nothing
        # has been logged since: close it, and the next one, made at the first point logged, purges.
        if trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        self._resumed = True
        step = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("log_step")
        if step is None:  # a checkpoint from before this callback: the step after the saved one
            epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            step = int(epoch_loop.get("_batches_that_stepped", checkpoint.get("global_step", 0))) + 1
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if logger._experiment is not None:
                    logger._experiment.close()
                    logger._experiment = None
                logger._kwargs["purge_step"] = int(step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restore is not None:
            set_rng_state(self._restore)
            self._restore = None
        if self._resumed:
            self._resumed = False
            _relog_walltime(trainer, pl_module)


def _relog_walltime(trainer: Trainer, pl_module: LightningModule) -> None:
    """The convergence curve against wall-clock milliseconds, up to the checkpoint, once more into
    the purged TensorBoard writers: the purge dropped it with the rest (its steps are milliseconds)."""
    from rewiring.convergence import ConvergenceCallback

    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    for cb in trainer.callbacks:
        spec = cb.resolve(pl_module) if isinstance(cb, ConvergenceCallback) else None
        if spec is None:
            continue
        for seconds, value in zip(cb.curve.seconds, cb.curve.values, strict=True):
            for logger in loggers:
                logger.log_metrics({f"walltime_ms/{spec[0]}": value}, step=int(round(seconds * 1000)))


# ---------------------------------------------------------------------------- checkpoints
class ResumableCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose last.ckpt is written whenever it could save: at every validation (or
    every `every_n_train_steps`, or epoch end for a stage with no validation) and at the end of
    training, whether or not a top-k checkpoint was saved there. `save_last` defaults to True.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_last", True)
        super().__init__(**kwargs)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: a checkpoint written by one resumes its best-model state into this
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's own (save_last when nothing was saved) writes one under fast_dev_run too
        self._save_last_now(trainer)

    def _save_last_now(self, trainer: Trainer) -> None:
        # not under fast_dev_run, in sanity checks or other stages, nor twice at one step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ---------------------------------------------------------------------------- loaders
class ResumableShuffle(Sampler[int]):
    """The plain shuffle of a training loader: a permutation from (seed, epoch) alone, resumable
    mid-epoch. Its state is the epoch of the pass and the indices yielded (a finished pass gives the
    next epoch from its start, so a resumed epoch is never empty)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch = 0  # the epoch of the next pass
        self._skip = 0
        self._pass: list[int] | None = None  # [epoch, indices yielded]

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # a generator: nothing moves before the first index is asked for
        epoch, skip = self.epoch, self._skip
        self.epoch, self._skip = epoch + 1, 0
        self._pass = [epoch, skip]
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        for i in torch.randperm(self.n, generator=g).tolist()[skip:]:
            self._pass[1] += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        epoch, yielded = self._pass if self._pass is not None else (self.epoch, self._skip)
        if yielded >= self.n:
            epoch, yielded = epoch + 1, 0
        return {"epoch": epoch, "yielded": yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip, self._pass = int(state["epoch"]), int(state["yielded"]), None


class ResumableWeightedSampler(WeightedRandomSampler):
    """torch's WeightedRandomSampler (the same draws), resumable mid-epoch: its state is the
    generator as the epoch's draw found it and the indices yielded since (a finished pass: the
    generator as the next draw finds it)."""

    def __init__(self, weights, num_samples: int, replacement: bool = True, generator=None) -> None:
        super().__init__(weights, num_samples, replacement, generator=generator or torch.Generator())
        self._resume: tuple[torch.Tensor, int] | None = None
        self._pass: list | None = None  # [generator state before the draw, indices yielded]

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self.generator.set_state(state)
            self._resume = None
        self._pass = [self.generator.get_state(), skip]
        draws = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=self.generator)
        for i in draws.tolist()[skip:]:
            self._pass[1] += 1
            yield i

    def state_dict(self) -> dict[str, Any]:
        if self._pass is not None and self._pass[1] >= self.num_samples:
            return {"generator": self.generator.get_state(), "yielded": 0}
        if self._pass is not None:
            return {"generator": self._pass[0], "yielded": self._pass[1]}
        if self._resume is not None:
            return {"generator": self._resume[0], "yielded": self._resume[1]}
        return {"generator": self.generator.get_state(), "yielded": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume, self._pass = (state["generator"], int(state["yielded"])), None


class WorkerRng(Dataset):
    """A map-style dataset that carries its DataLoader worker's random states (torch, numpy, python):
    torchdata snapshots a stateful dataset in the worker after each batch, and a resumed worker loads
    the snapshot of the last batch the main process took, so its draws go on as they would have. In
    the main process (no workers) the state is empty: ExactResume restores that one. Attributes
    other than these read through to the wrapped dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key]

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()} if torch.utils.data.get_worker_info() is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state and torch.utils.data.get_worker_info() is not None:
            set_rng_state(state["rng"])


class ResumableLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader with a generator of its own (seeded from the run's seed),
    saved with its state: making an iterator draws the workers' base seed from it, never from
    torch's, so the training's stream does not depend on how often a resumed fit makes one (it
    makes one more at an epoch end, or one fewer)."""

    def __init__(self, *args: Any, generator: torch.Generator | None = None, **kwargs: Any) -> None:
        generator = (
            generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed())
        )
        super().__init__(*args, generator=generator, **kwargs)
        self._generator_state = generator.get_state()  # as the current iterator found it

    def _get_iterator(self):
        self._generator_state = self.generator.get_state()
        return super()._get_iterator()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "generator": self._generator_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        if generator is not None:
            self.generator.set_state(generator)
        super().load_state_dict(state_dict)


def resumable_loader(dataset: Dataset, *, shuffle: bool = False, **kwargs: Any) -> ResumableLoader:
    """A training loader Lightning resumes mid-epoch (`ResumableLoader`, DataLoader's arguments):
    `shuffle=True` is a `ResumableShuffle` from the run's seed; with workers, their random states
    travel in its snapshots (`WorkerRng`)."""
    if shuffle:
        kwargs["sampler"] = ResumableShuffle(len(dataset), seed=torch.initial_seed() % 2**31)
    if kwargs.get("num_workers", 0) > 0:
        dataset = WorkerRng(dataset)
    return ResumableLoader(dataset, **kwargs)
