"""Read a sweep's run folders and compare rewired against baseline: report.md and PNG plots.

    python -m rewiring compare runs/<sweep> --out reports/<sweep>

Run folders are found by their place: <runs_dir>/<task>/<split>/<arm>[/lr<lr>]/seed<k>/ holding
convergence.json (rewiring.convergence) and, once tested, test.json. runs_dir/sweep.json (written
by the sweep) adds the baseline's name, the order of tasks and splits and the encoder folders.

What the tables say, per task, split and rewired arm (see also the notes written into report.md):
- lr: for each arm its own choice from the shared grid, the best dev value (`best` of
  convergence.json) averaged over seeds; every other column is at that lr.
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
from rewiring.files import read_json
from rewiring.sweep import (
    BASELINE,
    encoder_source,
    run_name_pattern,
    split_label,
    split_sort_key,
    test_metric,
)

SKIP_DIRS = {"encoders", "rewire", "slurm", "report", "test", "checkpoints"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


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


# ---------------------------------------------------------------------------- formatting
def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.4g}"


def _ms(x: tuple[float, float] | None, n: int) -> str:
    if x is None:
        return "—"
    return _num(x[0]) if n < 2 else f"{_num(x[0])} ± {_num(x[1])}"


def _steps(x: float | None, reached: int, n: int) -> str:
    if reached == 0:
        return "never"
    s = f"{x:.0f}" if x is not None else "—"
    return s if reached == n else f"{s} ({reached}/{n})"


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


# ---------------------------------------------------------------------------- plots
def rewiring_section(encoders: dict[str, str | None], baseline: str) -> list[str]:
    """What each rewired arm's contrastive stage learned (rewiring.json) and, for Whisper, how well
    its kept decoder still transcribes (transcription.json), as report lines."""
    rows, wers, window = [], [], 10
    for arm, enc in encoders.items():
        folder = Path(enc) if arm != baseline and isinstance(enc, str) and enc else None
        if folder is None:
            continue
        if (folder / "rewiring.json").is_file():
            r = read_json(folder / "rewiring.json")
            if r.get("steps"):
                window = r.get("window", window)
                rows.append(
                    f"| {arm} | {r['steps']} | {r['pairs_per_step']} | {_num(r['match_acc_chance'])} | "
                    f"{_num(r['match_acc_first'])} → {_num(r['match_acc_last'])} | "
                    f"{_num(r['loss_first'])} → {_num(r['loss_last'])} |"
                )
        if (folder / "transcription.json").is_file():
            t = read_json(folder / "transcription.json")["models"]
            n = len(t["after"]["transcripts"])
            wers.append(f"| {arm} | {_num(t['before']['wer'])} | {_num(t['after']['wer'])} | {n} |")
    lines = []
    if rows:
        lines += [
            "## What the rewiring stage learned",
            "",
            f"In-batch matching of each view to its partner, mean of the first and of the last {window} steps, "
            "against chance (1 / (2n - 1) with n pairs per step).",
            "",
            "| arm | steps | pairs per step | chance | match accuracy (first → last) | loss (first → last) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    if wers:
        lines += [
            "## Transcription by the kept decoder",
            "",
            "Greedy transcription of piper sentences by the source Whisper (before) and by the same decoder "
            "on the rewired encoder (after); corpus WER after Whisper's English normaliser.",
            "",
            "| arm | WER before | WER after | sentences |",
            "|---|---|---|---|",
            *wers,
            "",
        ]
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(arms: list[str], baseline: str) -> dict[str, str]:
    others = [a for a in arms if a != baseline]
    c = {a: PALETTE[i % len(PALETTE)] for i, a in enumerate(others)}
    c[baseline] = "#444444"
    return c


def plot_curves(
    path: Path,
    task: str,
    splits: list[str],
    curves: dict[str, dict[str, list[RunResult]]],
    baseline: str,
    metric: str,
) -> None:
    """One panel per split: mean dev curve over seeds, ± sd shaded, baseline against each arm."""
    plt = _plt()
    arms = sorted({a for s in splits for a in curves.get(s, {})}, key=lambda a: (a != baseline, a))
    colors = _colors(arms, baseline)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for arm in arms:
            runs = curves.get(split, {}).get(arm)
            if not runs:
                continue
            steps, mean, sd = mean_curve(runs)
            if not steps:
                continue
            ls = "--" if arm == baseline else "-"
            ax.plot(steps, mean, ls, color=colors[arm], label=f"{arm} (lr {runs[0].lr}, {len(runs)} seeds)")
            lo = [m - s for m, s in zip(mean, sd, strict=True)]
            hi = [m + s for m, s in zip(mean, sd, strict=True)]
            ax.fill_between(steps, lo, hi, color=colors[arm], alpha=0.18, linewidth=0)
        ax.set_title(f"{task} {split_label(split)}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"dev {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(path: Path, splits: list[str], rows: list[tuple[str, str, str, Comparison]]) -> None:
    """Speed-up (steps to the baseline's final value) against the amount of labelled data."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = {s: i for i, s in enumerate(splits)}
    lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for task, split, arm, comp in rows:
        if comp.speedup is not None and split in x:
            lines[(task, arm)].append((x[split], comp.speedup))
    markers = "osD^v<>ph*"
    arms = sorted({a for _, a in lines})
    tasks = sorted({t for t, _ in lines})
    for (task, arm), pts in sorted(lines.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker=markers[tasks.index(task) % len(markers)],
            color=PALETTE[arms.index(arm) % len(PALETTE)],
            label=f"{task} {arm}",
        )
    ax.axhline(1.0, color="gray", lw=1, ls=":")
    ax.set_xticks(range(len(splits)), [split_label(s) for s in splits])
    ax.set_xlabel("labelled training data")
    ax.set_ylabel("speed-up (baseline steps / rewired steps)")
    ax.set_title("steps to reach the baseline's final dev value")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no arm reached the baseline's final value", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_isotropy(path: Path, iso: dict[str, tuple[dict, dict]], baseline: str) -> None:
    """A grouped bar chart per scalar metric (arms side by side) and a line per arm for per-layer ones."""
    plt = _plt()
    arms = list(iso)
    colors = _colors(arms, baseline)
    scalar_names = list(dict.fromkeys(n for a in arms for n in iso[a][0]))
    series_names = list(dict.fromkeys(n for a in arms for n in iso[a][1]))
    panels = len(scalar_names) + len(series_names)
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.9 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, name in zip(flat, scalar_names, strict=False):
        vals = [iso[a][0].get(name) for a in arms]
        ax.bar(range(len(arms)), [v if v is not None else 0 for v in vals], color=[colors[a] for a in arms])
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax, name in zip(flat[len(scalar_names) :], series_names, strict=False):
        for a in arms:
            if name in iso[a][1]:
                ax.plot(range(len(iso[a][1][name])), iso[a][1][name], marker="o", color=colors[a], label=a)
        ax.set_title(f"{name} per layer", fontsize=9)
        ax.set_xlabel("hidden state")
        ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- the report
def _arm_encoders(runs: list[RunResult], plan: dict | None) -> dict[str, str | None]:
    """Arm -> encoder folder: from sweep.json, else from a run's saved config.yaml."""
    if plan and plan.get("arms"):
        return {a["name"]: a.get("encoder") for a in plan["arms"]}
    out: dict[str, str | None] = {}
    for r in runs:
        if r.arm in out or not (r.dir / "config.yaml").exists():
            continue
        src = encoder_source(r.dir / "config.yaml")
        out[r.arm] = src if isinstance(src, str) else None
    return out


def _split_order(splits: set[str], plan: dict | None) -> list[str]:
    if plan and plan.get("runs"):
        order = list(dict.fromkeys(r["split_dir"] for r in plan["runs"]))
        return [s for s in order if s in splits] + sorted(splits - set(order))

    def key(s: str):
        try:
            return split_sort_key(s)
        except ValueError:
            return (2, 0.0)

    return sorted(splits, key=key)


def write_report(runs_dir: str | Path, out: str | Path) -> Path:
    """report.md plus curves_<task>.png, speedup.png and isotropy.png in `out`; returns report.md."""
    runs_dir, out = Path(runs_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = read_json(runs_dir / "sweep.json") if (runs_dir / "sweep.json").exists() else None
    baseline = (plan or {}).get("baseline") or BASELINE
    runs = load_runs(runs_dir)
    lines = [f"# Rewiring report: {runs_dir}", ""]
    if not runs:
        lines += ["No finished runs (no convergence.json) under this folder yet.", ""]
        (out / "report.md").write_text("\n".join(lines))
        return out / "report.md"
    tasks = list(dict.fromkeys([*(plan or {}).get("tasks", []), *sorted({r.task for r in runs})]))
    tasks = [t for t in tasks if any(r.task == t for r in runs)]
    tested = sum(1 for r in runs if r.test_value is not None)
    lines += [
        f"{len(runs)} runs with a dev curve ({tested} tested), {len(tasks)} task{'s' * (len(tasks) != 1)}. "
        f"Baseline arm: `{baseline}`.",
        "",
        "How to read the tables: each arm's lr is chosen on dev (best dev value averaged over seeds) from the "
        "same grid, and every column is at that lr. *final*: last dev value, mean ± sd over seeds. *steps*: "
        "first validation step where the curve reaches the baseline's final dev value at the same seed "
        "(>= for higher-is-better metrics, <= for lower-is-better ones), mean over the seeds that reached it "
        "(reached/seeds when not all did). *speed-up*: baseline steps / rewired steps over those seeds "
        "(> 1: rewired is faster). *area ratio*: rewired / baseline mean dev value over the step budget "
        "(the normalised area under the dev curve). *test*: the best checkpoint's test metric at the chosen lr.",
        "",
    ]
    speed_rows: list[tuple[str, str, str, Comparison]] = []
    all_splits: set[str] = set()
    for task in tasks:
        truns = [r for r in runs if r.task == task]
        metric, mode = truns[0].metric, truns[0].mode
        test_name = test_metric(metric)
        splits = _split_order({r.split for r in truns}, plan)
        all_splits |= set(splits)
        better = "higher" if mode == "max" else "lower"
        lines += [
            f"## {task}",
            "",
            f"Dev metric `{metric}` ({better} is better); test metric `{test_name}`.",
            "",
        ]
        header = (
            "| split | arm | lr (baseline / arm) | baseline final | arm final | steps: baseline | "
            "steps: arm | speed-up | area ratio | test: baseline | test: arm | seeds |"
        )
        lines += [header, "|" + "---|" * 12]
        curves: dict[str, dict[str, list[RunResult]]] = {}
        lr_notes = []
        for split in splits:
            sruns = [r for r in truns if r.split == split]
            arms = sorted({r.arm for r in sruns}, key=lambda a: (a != baseline, a))
            chosen: dict[str, list[RunResult]] = {}
            for arm in arms:
                aruns = [r for r in sruns if r.arm == arm]
                lr, means = choose_lr(aruns)
                chosen[arm] = sorted((r for r in aruns if r.lr == lr), key=lambda r: r.seed)
                if len(means) > 1:
                    grid = ", ".join(
                        f"{k}: {_num(v)}" for k, v in sorted(means.items(), key=lambda kv: _lr_key(kv[0]))
                    )
                    lr_notes.append(f"- {split_label(split)} {arm}: mean best dev per lr {grid}; chosen {lr}")
            curves[split] = chosen
            base = chosen.get(baseline, [])
            rewired = [a for a in arms if a != baseline]
            if not rewired:
                n = len(base)
                lines.append(
                    f"| {split_label(split)} | ({baseline} only) | {base[0].lr if base else '—'} | {_ms(mean_sd([r.final for r in base]), n)} "
                    f"| — | — | — | — | — | {_ms(mean_sd([r.test_value for r in base]), n)} | — | {n} |"
                )
            for arm in rewired:
                arm_runs = chosen[arm]
                c = compare(base, arm_runs)
                n = c.seeds
                no_base = not base
                seeds = (
                    str(n)
                    if c.paired == n == c.base_seeds
                    else f"{n} ({c.paired} paired, baseline {c.base_seeds})"
                )
                lines.append(
                    f"| {split_label(split)} | {arm} | {base[0].lr if base else '—'} / {arm_runs[0].lr} | "
                    f"{_ms(c.base_final, c.base_seeds)} | {_ms(c.arm_final, n)} | "
                    f"{'—' if no_base else _steps(c.base_steps, c.base_reached, c.base_seeds)} | "
                    f"{'—' if no_base else _steps(c.arm_steps, c.arm_reached, n)} | {_num(c.speedup)} | "
                    f"{_num(c.area_ratio)} | {_ms(c.base_test, c.base_seeds)} | {_ms(c.arm_test, n)} | {seeds} |"
                )
                speed_rows.append((task, split, arm, c))
        lines.append("")
        if lr_notes:
            lines += ["Learning-rate choice (dev):", "", *lr_notes, ""]
        png = out / f"curves_{task}.png"
        plot_curves(png, task, splits, curves, baseline, metric)
        lines += [f"![{task} dev curves]({png.name})", ""]
    splits_all = _split_order(all_splits, plan)
    plot_speedup(out / "speedup.png", splits_all, speed_rows)
    lines += ["## Speed-up against labelled data", "", "![speed-up](speedup.png)", ""]
    encoders = _arm_encoders(runs, plan)
    iso = load_isotropy(encoders, baseline)
    lines += ["## Isotropy of the encoders", ""]
    own = encoders.get(baseline)
    if baseline in iso and not (isinstance(own, str) and (Path(own) / "isotropy.json").is_file()):
        lines += [
            f'`{baseline}`: measured before rewiring (the "before" of a rewired export\'s isotropy.json).',
            "",
        ]
    if iso:
        plot_isotropy(out / "isotropy.png", iso, baseline)
        names = list(dict.fromkeys(n for a in iso for n in iso[a][0]))
        if names:
            lines += ["| metric | " + " | ".join(iso) + " |", "|" + "---|" * (len(iso) + 1)]
            lines += [f"| {n} | " + " | ".join(_num(iso[a][0].get(n)) for a in iso) + " |" for n in names]
            lines.append("")
        lines += ["![isotropy](isotropy.png)", ""]
    else:
        lines += ["No isotropy.json in the arms' encoder folders.", ""]
    lines += rewiring_section(encoders, baseline)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
