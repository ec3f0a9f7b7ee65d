"""StepTimer: a Lightning callback that stamps every training step and the run's phases."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

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

    Args:
        out: write the timings as JSON here at teardown (for runs in a subprocess); None keeps them
            on the instance only.
    """

    def __init__(self, out: str | None = None) -> None:
        super().__init__()
        self.out = out
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
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
        self.starts.append(time.perf_counter())
        self._stamp("first_batch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.shapes.append(batch_shape(batch))

    def on_train_end(self, trainer, pl_module) -> None:
        self._stamp("train_end")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stamp("teardown")
        if self.out:
            Path(self.out).write_text(json.dumps(self.timings()))

    def step_times(self) -> list[float]:
        """Seconds per step from the second step on (batch end to batch end)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]

    def cpu_step_times(self) -> list[float]:
        """CPU seconds of this process per step (all its threads), from the second step on."""
        return [b - a for a, b in zip(self.cpu_ends, self.cpu_ends[1:], strict=False)]

    def gaps(self) -> list[float]:
        """Seconds between a step's end and the next step's start (data, bookkeeping, logging)."""
        return [s - e for e, s in zip(self.ends, self.starts[1:], strict=False)]

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
            "loop_seconds": (self.ends[-1] - self.starts[0]) if self.ends else None,
        }
