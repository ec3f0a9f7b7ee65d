"""StepTimer: a Lightning callback that stamps every training step and the run's phases."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback

from benchmarks.common import batch_shape


class StepTimer(Callback):
    """Timestamps of every training step and of the run's phases, to split start-up from steady state.

    The interval between two `on_train_batch_end` is a whole step as the trainer runs it (data fetch,
    hooks, forward, backward, optimizer, logging); `on_train_batch_start` splits it into the part
    outside the step body (data fetch, loop bookkeeping, logger writes, checkpoints) and the body.
    The process's CPU time is stamped too: on a shared machine it leaves out the time other processes
    took the core. Wall-clock `time.time()` stamps line up with a parent process's clock (sweep
    overhead). Only the batch's padded shape is recorded (summing its masks would cost time inside
    the steps being measured).

    Inside `interleaved(fn)`, `fn(k, shape)` (the bare loop's step on the same batch) runs next to
    Lightning's step k, and its time is left out of Lightning's. The order alternates: before step k
    (in `on_train_batch_start`, after the batch is fetched) for even k, after it (in
    `on_train_batch_end`) for odd k. Whichever loop runs first on a batch of a new shape pays for the
    allocator's fresh memory (page faults; up to 20% of a tiny-encoder step here), so a fixed order
    would favour the loop that runs second.

    Args:
        out: write the timings as JSON here at teardown (for runs in a subprocess); None keeps them
            on the instance only.
    """

    # Set by `interleaved()` around one run; the callback is built by LightningCLI, so the bench
    # cannot hand it an argument that is not a plain config value.
    between_steps: ClassVar[Callable[[int, tuple[int, ...]], None] | None] = None

    def __init__(self, out: str | None = None) -> None:
        super().__init__()
        self.out = out
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        # When the next step's clock restarts: its end stamp, or when `between_steps` returned.
        self.resumes: list[float] = []
        self.cpu_resumes: list[float] = []
        # Seconds of `between_steps` inside step k's interval (run before its body), wall and CPU.
        self.before: list[float] = []
        self.cpu_before: list[float] = []
        self.shapes: list[tuple[int, ...]] = []
        self.wall: dict[str, float] = {}

    def _stamp(self, name: str) -> None:
        self.wall.setdefault(name, time.time())

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stamp("setup")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._stamp("fit_start")

    def on_train_start(self, trainer, pl_module) -> None:
        self._stamp("train_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._stamp("first_batch")
        k = len(self.ends)
        hook = type(self).between_steps
        if hook is not None and self.bare_first(k):
            t, c = time.perf_counter(), time.process_time()
            hook(k, batch_shape(batch))
            self.before.append(time.perf_counter() - t)
            self.cpu_before.append(time.process_time() - c)
        else:
            self.before.append(0.0)
            self.cpu_before.append(0.0)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        device = getattr(pl_module, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels have run, not just been queued
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.shapes.append(batch_shape(batch))
        k = len(self.ends) - 1
        hook = type(self).between_steps
        if hook is not None and not self.bare_first(k):
            hook(k, self.shapes[-1])
            self.resumes.append(time.perf_counter())
            self.cpu_resumes.append(time.process_time())
        else:
            self.resumes.append(self.ends[-1])
            self.cpu_resumes.append(self.cpu_ends[-1])

    @staticmethod
    def bare_first(k: int) -> bool:
        """Whether `between_steps` runs before Lightning's step k (else after it)."""
        return k % 2 == 0

    def on_train_end(self, trainer, pl_module) -> None:
        self._stamp("train_end")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stamp("teardown")
        if self.out:
            Path(self.out).write_text(json.dumps(self.timings()))

    def step_times(self) -> list[float]:
        """Seconds per step from the second step on (batch end to batch end, less `between_steps`)."""
        return [e - r - x for r, e, x in zip(self.resumes, self.ends[1:], self.before[1:], strict=False)]

    def cpu_step_times(self) -> list[float]:
        """CPU seconds of this process per step (all its threads), from the second step on."""
        return [
            e - r - x for r, e, x in zip(self.cpu_resumes, self.cpu_ends[1:], self.cpu_before[1:], strict=False)
        ]

    def gaps(self) -> list[float]:
        """Seconds between a step's end and the next step's start (data, bookkeeping, logging)."""
        return [s - r - x for r, s, x in zip(self.resumes, self.starts[1:], self.before[1:], strict=False)]

    def between_seconds(self) -> float:
        """Seconds spent in `between_steps` (not part of the Lightning run's own time)."""
        return sum(r - e for e, r in zip(self.ends, self.resumes, strict=True)) + sum(self.before)

    def bodies(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends, strict=False)]

    def timings(self) -> dict[str, Any]:
        return {
            "steps": self.step_times(),
            "cpu_steps": self.cpu_step_times(),
            "gaps": self.gaps(),
            "bodies": self.bodies(),
            "shapes": self.shapes,
            "wall": self.wall,
            # The training loop's own time: the first step's body and every later step.
            "loop_seconds": (self.bodies()[0] + sum(self.step_times())) if self.ends else None,
        }


@contextlib.contextmanager
def interleaved(fn: Callable[[int, tuple[int, ...]], None]) -> Iterator[None]:
    """Run `fn(k, padded_shape)` next to each Lightning step k of the runs inside, outside their timing."""
    StepTimer.between_steps = fn
    try:
        yield
    finally:
        StepTimer.between_steps = None
