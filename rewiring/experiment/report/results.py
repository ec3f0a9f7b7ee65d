"""A sweep's results read back from its run folders: the runs, the seed-paired comparison of each
rewired arm against the baseline, the encoders' isotropy and what each rewiring stage learned.

Run folders are found by their place (rewiring.experiment.layout): <runs_dir>/<task>/<split>/<arm>
[/lr<lr>]/seed<k>/ holding convergence.json (rewiring.convergence) and, once tested, test.json.
runs_dir/sweep.json (written by the sweep) adds the baseline's name, the order of tasks and splits
and the encoder folders.

The figures, per task, split and rewired arm:
- lr: for each arm its own choice from the shared grid, the best dev value (`best` of
  convergence.json) averaged over seeds; every other figure is at that lr.
- final: the last dev value, mean ± sd over seeds (sample sd).
- steps to the baseline's final value: for each seed, the first validation step where the curve
  reaches the baseline's final value at the same seed (rewiring.convergence.steps_to_reach with
  fraction 1, so "reach" means >= for max-metrics and <= for min-metrics); the mean over the seeds
  that reached it, with (reached/seeds) when some did not.
- speed-up: baseline steps / arm steps, both means over the seeds where the arm reached the value
  (> 1: the rewired arm got there sooner).
- area ratio: arm / baseline of the normalised area under the dev curve (the mean dev value over
  the step budget, rewiring.convergence.area); > 1 is better for max-metrics, < 1 for min-metrics.
- test: the test metric of the run's best checkpoint, mean ± sd over seeds, at the chosen lr.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewiring.convergence import area, steps_to_reach
from rewiring.experiment.layout import (
    BASELINE,
    run_name_pattern,
    saved_encoder_source,
    split_sort_key,
    test_metric,
)
from rewiring.files import read_json

SKIP_DIRS = {"encoders", "rewire", "slurm", "report", "test", "checkpoints"}


@dataclass
class RunResult:
    """One run folder's figures."""

    task: str
    split: str
    arm: str
    lr: str
    seed: int
    dir: Path
    metric: str
    mode: str
    steps: list[int]
    values: list[float]
    final: float | None
    best: float | None
    test: dict[str, float] = field(default_factory=dict)

    @property
    def test_value(self) -> float | None:
        return self.test.get(test_metric(self.metric))


def load_runs(runs_dir: str | Path) -> list[RunResult]:
    """Every run folder under runs_dir with a convergence.json, by its place in the layout."""
    root = Path(runs_dir)
    pattern = run_name_pattern()
    out = []
    for conv in sorted(root.rglob("convergence.json")):
        rel = conv.parent.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        m = pattern.match(rel.as_posix())
        if m is None:
            continue
        c = read_json(conv)
        curve = c.get("curve") or {}
        test_path = conv.parent / "test.json"
        test: dict[str, float] = {}
        if test_path.exists():
            t = read_json(test_path)
            t = t.get("metrics", t) if isinstance(t, dict) else {}
            test = {k: float(v) for k, v in t.items() if isinstance(v, int | float)}
        out.append(
            RunResult(
                task=m["task"],
                split=m["split"],
                arm=m["arm"],
                lr=m["lr"] or "-",
                seed=int(m["seed"]),
                dir=conv.parent,
                metric=c["metric"],
                mode=c["mode"],
                steps=[int(s) for s in curve.get("steps", [])],
                values=[float(v) for v in curve.get("values", [])],
                final=(c.get("final") or {}).get("value"),
                best=(c.get("best") or {}).get("value"),
                test=test,
            )
        )
    return out


# ---------------------------------------------------------------------------- statistics
def mean_sd(xs: list[float]) -> tuple[float, float] | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def choose_lr(runs: list[RunResult]) -> tuple[str, dict[str, float]]:
    """The lr with the best dev value averaged over seeds, and each lr's mean (one arm's runs)."""
    by_lr: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if r.best is not None:
            by_lr[r.lr].append(r.best)
    means = {lr: statistics.fmean(v) for lr, v in by_lr.items() if v}
    if not means:
        return runs[0].lr, {}
    mode = runs[0].mode
    chosen = None
    for lr in sorted(means, key=_lr_key):
        if chosen is None or _better(means[lr], means[chosen], mode):
            chosen = lr
    return chosen, means


def _lr_key(lr: str) -> float:
    try:
        return float(lr)
    except ValueError:
        return math.inf


@dataclass
class Comparison:
    """One rewired arm against the baseline at one task and split (each at its chosen lr)."""

    seeds: int
    base_final: tuple[float, float] | None
    arm_final: tuple[float, float] | None
    base_seeds: int
    base_steps: float | None
    base_reached: int
    arm_steps: float | None
    arm_reached: int
    paired: int
    speedup: float | None
    area_ratio: float | None
    base_test: tuple[float, float] | None
    arm_test: tuple[float, float] | None


def compare(baseline: list[RunResult], arm: list[RunResult]) -> Comparison:
    """Seed-paired comparison (see the module docstring for each figure's definition)."""
    mode = (baseline or arm)[0].mode
    base_by_seed = {r.seed: r for r in baseline}
    base_finals = [r.final for r in baseline if r.final is not None]
    fallback = statistics.fmean(base_finals) if base_finals else None
    base_steps, arm_steps, paired_b, paired_a = [], [], [], []
    base_areas, arm_areas = [], []
    for r in arm:
        b = base_by_seed.get(r.seed)
        ref = b.final if b is not None and b.final is not None else fallback
        end = max([*r.steps, *(b.steps if b else [])], default=None)
        a_area = area(r.steps, r.values, end) if r.steps else None
        if a_area is not None:
            arm_areas.append(a_area)
        if b is not None and b.steps:
            base_areas.append(area(b.steps, b.values, end))
        if ref is None:
            continue
        sa = steps_to_reach(r.steps, r.values, ref, mode) if r.steps else None
        sb = steps_to_reach(b.steps, b.values, ref, mode) if b is not None and b.steps else None
        if sb is not None:
            base_steps.append(sb)
        if sa is not None:
            arm_steps.append(sa)
            if sb is not None:
                paired_b.append(sb)
                paired_a.append(sa)
    speedup = None
    if paired_a and statistics.fmean(paired_a) > 0:
        speedup = statistics.fmean(paired_b) / statistics.fmean(paired_a)
    ratio = None
    if base_areas and arm_areas and statistics.fmean(base_areas) != 0:
        ratio = statistics.fmean(arm_areas) / statistics.fmean(base_areas)
    return Comparison(
        seeds=len(arm),
        base_seeds=len(baseline),
        base_final=mean_sd([r.final for r in baseline]),
        arm_final=mean_sd([r.final for r in arm]),
        base_steps=statistics.fmean(base_steps) if base_steps else None,
        base_reached=len(base_steps),
        paired=sum(1 for r in arm if r.seed in base_by_seed),
        arm_steps=statistics.fmean(arm_steps) if arm_steps else None,
        arm_reached=len(arm_steps),
        speedup=speedup,
        area_ratio=ratio,
        base_test=mean_sd([r.test_value for r in baseline]),
        arm_test=mean_sd([r.test_value for r in arm]),
    )


def mean_curve(runs: list[RunResult]) -> tuple[list[int], list[float], list[float]]:
    """Mean and sd over seeds at each validation step (steps line up: the same K for every run)."""
    at: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for s, v in zip(r.steps, r.values, strict=True):
            if math.isfinite(v):
                at[s].append(v)
    steps = sorted(at)
    means = [statistics.fmean(at[s]) for s in steps]
    sds = [statistics.stdev(at[s]) if len(at[s]) > 1 else 0.0 for s in steps]
    return steps, means, sds


# ---------------------------------------------------------------------------- isotropy
META_KEYS = {"items", "dim", "seed", "frames_total", "frames_sampled", "samples_per_dim", "skipped"}


def _leaves(obj: Any, prefix: str = ""):
    """(name, number or list of numbers) for every numeric leaf of a nested dict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in META_KEYS:
                continue
            yield from _leaves(v, f"{prefix}{k}/")
    elif isinstance(obj, bool):
        return
    elif isinstance(obj, int | float):
        yield prefix.rstrip("/"), float(obj)
    elif (
        isinstance(obj, list)
        and obj
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in obj)
    ):
        yield prefix.rstrip("/"), [float(x) for x in obj]


def isotropy_metrics(obj: Any) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Scalars (metric -> value) and per-layer series (metric -> [value per layer]) of an isotropy.json.

    Accepts a flat dict (metric -> value or list), an `encoder_profile` report ({"layers": {"0": ...,
    "average": ...}}) or a rewiring export's {"before": ..., "after": ...} (the "after" is used).
    """
    if isinstance(obj, dict) and isinstance(obj.get("after"), dict):
        obj = obj["after"]
    scalars: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    if not isinstance(obj, dict):
        return scalars, series
    layers = obj.get("layers")
    if isinstance(layers, dict):
        numeric = sorted((k for k in layers if re.fullmatch(r"-?\d+", str(k))), key=int)
        for k, v in layers.items():
            if k in numeric:
                continue
            for name, val in _leaves(v):
                if isinstance(val, float):
                    scalars[name if k == "features" else f"{k}/{name}"] = val
        per_layer = [dict(_leaves(layers[k])) for k in numeric]
        for name in per_layer[0] if per_layer else []:
            vals = [pl.get(name) for pl in per_layer]
            if all(isinstance(v, float) for v in vals):
                series[name] = vals
        return scalars, series
    for name, val in _leaves({k: v for k, v in obj.items() if k not in ("encoder", "manifest")}):
        (scalars if isinstance(val, float) else series)[name] = val
    return scalars, series


def load_isotropy(arms: dict[str, str | None], baseline: str = BASELINE) -> dict[str, tuple[dict, dict]]:
    """Each arm's isotropy from <encoder dir>/isotropy.json; the baseline may come from a rewired
    arm's "before" (the same encoder, measured before rewiring). Arms without one are left out."""
    found: dict[str, tuple[dict, dict]] = {}
    before = None
    for arm, enc in arms.items():
        path = Path(enc) / "isotropy.json" if isinstance(enc, str) and enc else None
        if path is None or not path.is_file():
            continue
        try:
            obj = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
        scal, ser = isotropy_metrics(obj)
        if scal or ser:
            found[arm] = (scal, ser)
        if before is None and isinstance(obj, dict) and isinstance(obj.get("before"), dict):
            before = isotropy_metrics(obj["before"])
    if baseline in arms and baseline not in found and before is not None and (before[0] or before[1]):
        found[baseline] = before
    ordered = [a for a in arms if a in found]
    return {a: found[a] for a in ordered}


# ---------------------------------------------------------------------------- arms and splits
def arm_encoders(runs: list[RunResult], plan: dict | None) -> dict[str, str | None]:
    """Arm -> encoder folder: from sweep.json, else from a run's saved config.yaml."""
    if plan and plan.get("arms"):
        return {a["name"]: a.get("encoder") for a in plan["arms"]}
    out: dict[str, str | None] = {}
    for r in runs:
        if r.arm in out or not (r.dir / "config.yaml").exists():
            continue
        src = saved_encoder_source(r.dir / "config.yaml")
        out[r.arm] = src if isinstance(src, str) else None
    return out


def split_order(splits: set[str], plan: dict | None) -> list[str]:
    if plan and plan.get("runs"):
        order = list(dict.fromkeys(r["split_dir"] for r in plan["runs"]))
        return [s for s in order if s in splits] + sorted(splits - set(order))

    def key(s: str):
        try:
            return split_sort_key(s)
        except ValueError:
            return (2, 0.0)

    return sorted(splits, key=key)


# ---------------------------------------------------------------------------- the rewiring stages
def rewiring_stages(encoders: dict[str, str | None], baseline: str) -> dict[str, Any]:
    """What each rewired arm's contrastive stage learned (<encoder>/rewiring.json) and, for Whisper,
    how well its kept decoder still transcribes (<encoder>/transcription.json):
    {"learned": [(arm, rewiring.json)], "window": steps averaged, "transcription": [(arm, before WER,
    after WER, sentences)]}."""
    learned, transcription, window = [], [], 10
    for arm, enc in encoders.items():
        folder = Path(enc) if arm != baseline and isinstance(enc, str) and enc else None
        if folder is None:
            continue
        if (folder / "rewiring.json").is_file():
            r = read_json(folder / "rewiring.json")
            if r.get("steps"):
                window = r.get("window", window)
                learned.append((arm, r))
        if (folder / "transcription.json").is_file():
            t = read_json(folder / "transcription.json")["models"]
            transcription.append((arm, t["before"]["wer"], t["after"]["wer"], len(t["after"]["transcripts"])))
    return {"learned": learned, "window": window, "transcription": transcription}


# ---------------------------------------------------------------------------- one task's table
def task_table(runs: list[RunResult], splits: list[str], baseline: str) -> dict[str, Any]:
    """One task's runs, split by split, each arm at its chosen lr:
    {"rows": a row per rewired arm ({"split", "arm", "base_lr", "arm_lr", "no_base", "c": Comparison}; one
    {"split", "arm": None, "base_lr", "n", "base_final", "base_test"} when the split has only the
    baseline), "lr_notes": [{"split", "arm", "means": [(lr, mean best dev)], "lr"}] where an arm
    had several lrs, "curves": {split: {arm: runs at its lr}}, "comparisons": [(split, arm, c)]}."""
    rows: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[RunResult]]] = {}
    comparisons: list[tuple[str, str, Comparison]] = []
    for split in splits:
        sruns = [r for r in runs if r.split == split]
        arms = sorted({r.arm for r in sruns}, key=lambda a: (a != baseline, a))
        chosen: dict[str, list[RunResult]] = {}
        for arm in arms:
            aruns = [r for r in sruns if r.arm == arm]
            lr, means = choose_lr(aruns)
            chosen[arm] = sorted((r for r in aruns if r.lr == lr), key=lambda r: r.seed)
            if len(means) > 1:
                grid = sorted(means.items(), key=lambda kv: _lr_key(kv[0]))
                notes.append({"split": split, "arm": arm, "means": grid, "lr": lr})
        curves[split] = chosen
        base = chosen.get(baseline, [])
        base_lr = base[0].lr if base else "—"
        rewired = [a for a in arms if a != baseline]
        if not rewired:
            rows.append({"split": split, "arm": None, "base_lr": base_lr, "n": len(base),
                         "base_final": mean_sd([r.final for r in base]),
                         "base_test": mean_sd([r.test_value for r in base])})  # fmt: skip
        for arm in rewired:
            c = compare(base, chosen[arm])
            rows.append({"split": split, "arm": arm, "base_lr": base_lr, "arm_lr": chosen[arm][0].lr,
                         "no_base": not base, "c": c})  # fmt: skip
            comparisons.append((split, arm, c))
    return {"rows": rows, "lr_notes": notes, "curves": curves, "comparisons": comparisons}
