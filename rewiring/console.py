"""What the console shows during a run: progress in optimizer steps out of the run's budget, the
metrics that matter, and plain lines instead of a bar when the output is not a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


def clock(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class StepProgressBar(TQDMProgressBar):
    """Progress in optimizer steps out of the run's budget (max_steps, or the steps of max_epochs),
    with the metrics that matter: those the module puts on the bar plus its dev metric
    (`primary_metric`), never `v_num`. When stdout is not a terminal (a log file, a sweep's fit.log),
    no bar: a plain line every `every_n_steps` steps (default: a tenth of the run) and at the end.

    Args:
        refresh_rate: update the bar every this many steps.
        every_n_steps: steps between plain lines; default a tenth of the run (100 when unknown).
        tty: draw the bar (True) or write lines (False); default: whether stdout is a terminal.
    """

    def __init__(
        self, refresh_rate: int = 1, every_n_steps: int | None = None, tty: bool | None = None
    ) -> None:
        super().__init__(refresh_rate=refresh_rate)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.tty = tty
        self._lines = False
        self._total: int | None = None
        self._start_step = 0
        self._t0 = 0.0
        self._last_line: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._lines = not (getattr(sys.stdout, "isatty", lambda: False)() if self.tty is None else self.tty)
        if self._lines:
            self.disable()  # no tqdm bar at all (validation and test ones included)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        metric = getattr(pl_module, "primary_metric", None)
        if metric and metric not in items and metric in trainer.callback_metrics:
            items[metric] = float(trainer.callback_metrics[metric])
        return items

    def _steps_total(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._total = self._steps_total(trainer)
        self._start_step = trainer.global_step  # a resumed run starts part-way
        self._t0 = time.monotonic()
        self._last_line = None
        bar = self.train_progress_bar
        bar.reset(total=self._total)
        bar.initial = bar.n = self._start_step
        bar.unit = "step"

    @property
    def train_description(self) -> str:
        return "steps"

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Deliberately empty: TQDMProgressBar resets its bar to the epoch's batches here; ours
        counts optimizer steps over the whole run, so it is made once and never reset."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._lines:
            every = self.every_n_steps or (max(1, self._total // 10) if self._total else 100)
            if step != self._last_line and (step % every == 0 or step == self._total):
                self._line(trainer, pl_module)
            return
        bar = self.train_progress_bar
        if bar.n != step and self._should_update(step, bar.total):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lines and self._last_line != trainer.global_step:
            self._line(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = self._last_line = trainer.global_step
        elapsed = time.monotonic() - self._t0
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        where = (
            f"step {step}/{self._total} ({100 * step / self._total:.0f}%)" if self._total else f"step {step}"
        )
        left = (
            f", about {clock((self._total - step) / rate)} left"
            if self._total and step < self._total and rate > 0
            else ""
        )
        metrics = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in self.get_metrics(trainer, pl_module).items()
        )
        print(
            f"{where}, {clock(elapsed)}, {rate:.2f} steps/s{left}" + (f": {metrics}" if metrics else ""),
            flush=True,
        )
