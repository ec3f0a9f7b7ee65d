"""Convergence measured, not eyeballed: curve measures and the callback that records them.

The pure functions (`threshold`, `steps_to_reach`, `area`, `best`, `summarize`) work on a plain
validation curve, so the report (`rewiring.experiment.report`) recomputes the same figures across arms and seeds.

Definitions (also written into every convergence.json under "definitions"):

- Curve: the monitored dev metric after each validation (every `trainer.val_check_interval` steps,
  the same K for every arm), against the optimizer step and against wall-clock seconds since the
  training loop started (validation time included; process start and setup excluded; a resumed run
  continues the clock of its checkpoint).
- Reaching a fraction f of a reference r: for a max-metric (accuracy, F1) the first validation with
  value >= f * r; for a min-metric (WER, DER, CER) the first with value <= r / f, so "90% of a WER
  of 20" means a WER of 22.2 or less. Both read "f of the reference performance" and f = 1 is the
  reference itself. Metrics are assumed non-negative (all of ours are). Never reached: null.
- Reference: `reference` if given, else the final value in `reference_run` (a baseline run's
  convergence.json; the sweep passes the baseline at the same task, split, lr and seed), else the
  run's own final value.
- Area: the trapezoidal area under the curve over steps divided by the step span, i.e. the mean
  metric value over training, in the metric's own units. With `end` (the callback passes
  max_steps) a curve that stopped early is extended flat at its last value up to `end`, so arms with
  equal step budgets compare. Higher is better for max-metrics, lower for min-metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from rewiring.console import clock
from rewiring.files import read_json, write_json_atomic

log = logging.getLogger(__name__)

Mode = Literal["max", "min"]
FRACTIONS: tuple[float, ...] = (0.8, 0.9, 0.95, 1.0)

DEFINITIONS = {
    "reach": "first validation with value >= f*reference (max-metric) or value <= reference/f (min-metric)",
    "reference": "given value, else final value of reference_run, else this run's own final value",
    "area": "trapezoidal area under value(step) divided by the step span (mean value over training); "
    "curves that stopped before `area_end` are extended flat at their last value",
    "seconds": "wall-clock seconds since the training loop started, validation included",
}


# ---------------------------------------------------------------------------- pure functions
def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def threshold(reference: float, fraction: float, mode: Mode) -> float:
    """The value that counts as reaching `fraction` of `reference` (see the module docstring)."""
    _check_mode(mode)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return reference * fraction if mode == "max" else reference / fraction


def reached(value: float, target: float, mode: Mode) -> bool:
    """Whether `value` is at least as good as `target`; NaN never reaches anything."""
    if not math.isfinite(value):
        return False
    return value >= target if mode == "max" else value <= target


def first_reach(xs: Sequence[float], values: Sequence[float], target: float, mode: Mode) -> float | None:
    """The first x (step or second) whose value reaches `target`, or None."""
    if len(xs) != len(values):
        raise ValueError(f"{len(xs)} x values but {len(values)} metric values")
    for x, v in zip(xs, values, strict=True):
        if reached(float(v), target, mode):
            return x
    return None


def steps_to_reach(
    steps: Sequence[int], values: Sequence[float], reference: float, mode: Mode = "max", fraction: float = 1.0
) -> int | None:
    """Steps needed to reach `fraction` of `reference` on a validation curve, or None if never.

    Pass seconds instead of steps to get the seconds needed.
    """
    return first_reach(steps, values, threshold(reference, fraction, mode), mode)


def area(steps: Sequence[float], values: Sequence[float], end: float | None = None) -> float | None:
    """Normalised area under the curve: the mean value over the validated step span.

    Non-finite values are dropped. One point gives its value. `end` past the last step extends the
    curve flat at its last value (an early-stopped run keeps its last score until the budget ends).
    """
    pts = sorted((float(s), float(v)) for s, v in zip(steps, values, strict=True) if math.isfinite(float(v)))
    if not pts:
        return None
    if end is not None and end > pts[-1][0]:
        pts.append((float(end), pts[-1][1]))
    if len(pts) == 1 or pts[-1][0] == pts[0][0]:
        return sum(v for _, v in pts) / len(pts)
    total = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False))
    return total / (pts[-1][0] - pts[0][0])


def best(steps: Sequence[int], values: Sequence[float], mode: Mode) -> tuple[float, int] | None:
    """The best finite value and the (first) step where it came, or None for an empty curve."""
    _check_mode(mode)
    pts = [(float(v), s) for s, v in zip(steps, values, strict=True) if math.isfinite(float(v))]
    if not pts:
        return None
    sign = 1.0 if mode == "max" else -1.0
    top = max(sign * v for v, _ in pts)
    return next((v, s) for v, s in pts if sign * v == top)


@dataclass
class Curve:
    """A validation curve: one point per validation."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, seconds: float, value: float) -> None:
        """Append a point; a second validation at the same step replaces the first."""
        if self.steps and self.steps[-1] == step:
            self.seconds[-1], self.values[-1] = seconds, value
            return
        self.steps.append(int(step))
        self.seconds.append(float(seconds))
        self.values.append(float(value))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Curve:
        return cls(list(d.get("steps", [])), list(d.get("seconds", [])), list(d.get("values", [])))


def summarize(
    curve: Curve,
    mode: Mode,
    reference: float | None = None,
    fractions: Sequence[float] = FRACTIONS,
    area_end: float | None = None,
) -> dict[str, Any]:
    """Every figure of convergence.json from a curve: final, best, area, and reach per fraction."""
    _check_mode(mode)
    n = len(curve.values)
    final = (
        {"value": curve.values[-1], "step": curve.steps[-1], "seconds": curve.seconds[-1]}
        if n
        else {"value": None, "step": None, "seconds": None}
    )
    top = best(curve.steps, curve.values, mode)
    if top is None:
        best_d = {"value": None, "step": None, "seconds": None}
    else:
        i = curve.steps.index(top[1])
        best_d = {"value": top[0], "step": top[1], "seconds": curve.seconds[i]}
    ref = reference if reference is not None else final["value"]
    reach = {}
    for f in fractions:
        if ref is None or not math.isfinite(ref):
            reach[f"{f:g}"] = {"threshold": None, "step": None, "seconds": None}
            continue
        t = threshold(ref, f, mode)
        step = first_reach(curve.steps, curve.values, t, mode)
        secs = first_reach(curve.seconds, curve.values, t, mode)
        reach[f"{f:g}"] = {"threshold": t, "step": step, "seconds": secs}
    return {
        "final": final,
        "best": best_d,
        "area": area(curve.steps, curve.values, area_end),
        "area_end": area_end,
        "reference_value": ref,
        "reach": reach,
    }


# ---------------------------------------------------------------------------- callbacks
def _run_notes(pl_module: pl.LightningModule) -> dict[str, str]:
    """A module's own notes on how the run went (`run_notes()`, e.g. a task's feature cache on or off)."""
    notes = getattr(pl_module, "run_notes", None)
    return dict(notes()) if callable(notes) else {}


class ConvergenceCallback(Callback):
    """Records the dev curve of the task's primary metric and writes convergence.json at the end of fit.

    The monitored metric and its direction come from the LightningModule (`primary_metric`,
    `metric_mode`, as every TaskModule declares them); `monitor`/`mode` are the fallback for other
    modules. A module with neither gets no curve; if it counts skipped inputs (rewiring,
    pre-training: a `rewiring.skips.SkipLog` as ``skips``), its convergence.json holds only those.

    convergence.json's ``skipped`` section: per split, the utterances in the split's manifest (the
    low-resource subset for train), how many were drawn and used, and the skipped ones per reason
    (``{"train": {"utterances": 40, "drawn": 40, "used": 37, "skipped": {"too_short": 2, ...}}}``).

    TensorBoard: the module itself logs `val/<metric>` against the global step. This callback adds
    `walltime_ms/val/<metric>`, the same values with wall-clock milliseconds since the training loop
    started as the x axis (TensorBoard steps are integers, hence milliseconds). View it with
    `tensorboard --logdir runs` (section "walltime_ms"); the "Relative" horizontal axis on `val/<metric>`
    also shows wall-clock time, but from the run's first event, setup included.

    The state (curve and elapsed seconds) travels in checkpoints, so a run resumed with `--ckpt_path`
    continues its curve and its clock.

    Args:
        reference: the value whose fractions the run is timed against (e.g. a baseline's final value).
        reference_run: a baseline run's convergence.json (or its run folder); its final value is the
            reference when `reference` is not given. Missing file: falls back to the run's own final.
        monitor: metric to follow when the module declares no `primary_metric`.
        mode: "max" or "min" when the module declares no `metric_mode`.
        fractions: fractions of the reference to time.
        filename: written into `trainer.log_dir`.
    """

    def __init__(
        self,
        reference: float | None = None,
        reference_run: str | None = None,
        monitor: str | None = None,
        mode: Mode | None = None,
        fractions: list[float] | None = None,
        filename: str = "convergence.json",
    ) -> None:
        super().__init__()
        self.reference = reference
        self.reference_run = reference_run
        self.monitor = monitor
        self.mode = mode
        self.fractions = list(fractions) if fractions is not None else list(FRACTIONS)
        for f in self.fractions:
            threshold(1.0, f, "max")  # validates the range early
        self.filename = filename
        self.curve = Curve()
        self._elapsed_before = 0.0  # seconds of earlier attempts (resume)
        self._t0: float | None = None
        self._warned = False

    # -- what to follow
    def resolve(self, pl_module: pl.LightningModule) -> tuple[str, Mode] | None:
        """(metric, mode): the module's declaration first, then the callback's arguments."""
        metric = getattr(pl_module, "primary_metric", None) or self.monitor
        mode = getattr(pl_module, "metric_mode", None) or self.mode or "max"
        if not metric:
            return None
        _check_mode(mode)
        return str(metric), mode

    def elapsed(self) -> float:
        if self._t0 is None:
            return self._elapsed_before
        return self._elapsed_before + time.monotonic() - self._t0

    # -- checkpoint state, so a resumed run keeps its curve and clock
    def state_dict(self) -> dict[str, Any]:
        return {"curve": asdict(self.curve), "elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = Curve.from_dict(state_dict.get("curve", {}))
        self._elapsed_before = float(state_dict.get("elapsed", 0.0))

    # -- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.resolve(pl_module) is None:
            log.info(
                "ConvergenceCallback: %s declares no primary_metric and no monitor was given; off",
                type(pl_module).__name__,
            )
        elif not isinstance(trainer.val_check_interval, int):
            log.warning(
                "ConvergenceCallback: val_check_interval=%s is not a step count; curves of "
                "different arms may not line up",
                trainer.val_check_interval,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        spec = self.resolve(pl_module)
        if spec is None:
            return
        metric, _ = spec
        value = trainer.callback_metrics.get(metric)
        if value is None:
            if not self._warned:
                log.warning(
                    "ConvergenceCallback: %s was not logged during validation (logged: %s)",
                    metric,
                    sorted(trainer.callback_metrics),
                )
                self._warned = True
            return
        value = float(value)
        seconds = self.elapsed()
        self.curve.add(trainer.global_step, seconds, value)
        for logger in trainer.loggers:
            logger.log_metrics({f"walltime_ms/{metric}": value}, step=int(round(seconds * 1000)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        spec = self.resolve(pl_module)
        if trainer.is_global_zero:
            print(self.summary_line(trainer, pl_module), flush=True)
        # fast_dev_run has no logger, so log_dir would be the working directory: write nothing
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        skips = getattr(pl_module, "skips", None)
        skipped = dict(skips.final) if skips is not None else None  # counted up to the end of training
        out_dir = _log_dir(trainer)
        if spec is None:
            if skipped is not None:
                write_json_atomic(out_dir / self.filename, {"metric": None, "global_step": trainer.global_step,
                                                            "skipped": skipped})  # fmt: skip
            return
        metric, mode = spec
        reference, source = self._reference()
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        summary = summarize(self.curve, mode, reference, self.fractions, area_end=max_steps)
        ckpt = trainer.checkpoint_callback
        result = {
            "metric": metric,
            "mode": mode,
            "val_check_interval": trainer.val_check_interval,
            "max_steps": max_steps,
            "global_step": trainer.global_step,
            "total_seconds": self.elapsed(),
            "reference": {"value": summary.pop("reference_value"), "source": source},
            **summary,
            "curve": asdict(self.curve),
            **({"skipped": skipped} if skipped is not None else {}),
            **({"notes": notes} if (notes := _run_notes(pl_module)) else {}),
            "checkpoint": {
                "best": _rel(getattr(ckpt, "best_model_path", "") or None, out_dir),
                "last": _rel(getattr(ckpt, "last_model_path", "") or None, out_dir),
            },
            "definitions": DEFINITIONS,
        }
        write_json_atomic(out_dir / self.filename, result)

    def summary_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """What a user needs at the end of a fit, in one line: the best dev value and where it came
        (or, for a stage with no dev metric, the last training loss), and the run folder."""
        spec = self.resolve(pl_module)
        what = type(pl_module).__name__
        top = best(self.curve.steps, self.curve.values, spec[1]) if spec is not None else None
        if top is not None:
            result = f"best {spec[0]} {top[0]:.4g} at step {top[1]} (final {self.curve.values[-1]:.4g})"
        elif spec is not None:
            result = f"no {spec[0]} recorded"
        else:
            loss = trainer.callback_metrics.get("train/loss")
            result = f"train/loss {float(loss):.4g}" if loss is not None else "no dev metric"
        where = (
            "fast_dev_run: nothing written"
            if trainer.fast_dev_run
            # the logger's own folder: trainer.log_dir is a collective under DDP, and only rank 0 prints
            else f"run folder {_log_dir(trainer)}"
        )
        return f"{what}: {result}; {trainer.global_step} steps in {clock(self.elapsed())}; {where}"

    def _reference(self) -> tuple[float | None, str]:
        if self.reference is not None:
            return float(self.reference), "given"
        if self.reference_run:
            path = Path(self.reference_run)
            if path.is_dir():
                path = path / self.filename
            if path.is_file():
                value = read_json(path).get("final", {}).get("value")
                if value is not None:
                    return float(value), str(path)
            log.warning(
                "ConvergenceCallback: reference run %s has no final value; using this run's own",
                self.reference_run,
            )
        return None, "own final value"


def _log_dir(trainer: pl.Trainer) -> Path:
    """`trainer.log_dir` without its broadcast: a collective under DDP, and only rank 0 writes."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    return Path(getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir)


def _rel(path: str | None, base: Path) -> str | None:
    """A checkpoint path relative to the run folder when it is inside it (run folders can move)."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


class TestResults(Callback):
    """Writes the test metrics (`test/...` of `trainer.callback_metrics`) to a JSON file after `test`,
    with the test split's skipped utterances when the module counts them (as convergence.json's
    ``skipped`` section).

    `--test_json=<run>/test.json` adds it (the fit tests itself after fitting; the test subcommand
    too), which is how the sweep gets each run's test.json.

    Args:
        path: the JSON file; default `<trainer.log_dir>/test.json`.
    """

    __test__ = False  # not a pytest class

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        out = Path(self.path) if self.path else _log_dir(trainer) / "test.json"
        ckpt = getattr(trainer, "ckpt_path", None)
        result = {"metrics": metrics, "ckpt_path": str(ckpt) if ckpt else None}
        skips = getattr(pl_module, "skips", None)
        if skips is not None and "test" in skips.final:
            result["skipped"] = {"test": skips.final["test"]}
        write_json_atomic(out, result)
