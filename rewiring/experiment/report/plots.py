"""The report's plots (matplotlib, Agg): dev curves per task, speed-up against labelled data, and the
encoders' isotropy."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from rewiring.experiment.layout import split_label
from rewiring.experiment.report.results import Comparison, RunResult, mean_curve

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


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
