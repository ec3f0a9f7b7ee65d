"""Read a sweep's run folders and compare rewired against baseline: report.md and PNG plots.

    python -m rewiring compare runs/<sweep> --out reports/<sweep>

results.py reads the runs and computes every figure (its docstring defines them), plots.py draws
them, and the prose of report.md lives in templates/ (report.md.j2, rewiring.md.j2), rendered by
markdown.py's small builder with this module's number formats.
"""

from __future__ import annotations

import math
from pathlib import Path

from rewiring.experiment.layout import BASELINE, split_label, test_metric
from rewiring.experiment.report.markdown import Markdown
from rewiring.experiment.report.plots import plot_curves, plot_isotropy, plot_speedup
from rewiring.experiment.report.results import (
    Comparison,
    RunResult,
    arm_encoders,
    choose_lr,
    compare,
    isotropy_metrics,
    load_isotropy,
    load_runs,
    rewiring_stages,
    split_order,
    task_table,
)
from rewiring.files import read_json

__all__ = ["Comparison", "RunResult", "choose_lr", "compare", "isotropy_metrics", "load_runs",
           "rewiring_section", "write_report"]  # fmt: skip

TEMPLATES = Path(__file__).parent / "templates"


# ---------------------------------------------------------------------------- number formats
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


def _markdown() -> Markdown:
    return Markdown(TEMPLATES, num=_num, ms=_ms, steps=_steps, split_label=split_label)


# ---------------------------------------------------------------------------- the report
def rewiring_section(encoders: dict[str, str | None], baseline: str) -> list[str]:
    """What each rewired arm's contrastive stage learned (rewiring.json) and, for Whisper, how well
    its kept decoder still transcribes (transcription.json), as report lines ([] for neither)."""
    return _markdown().lines("rewiring.md.j2", **rewiring_stages(encoders, baseline))


def write_report(runs_dir: str | Path, out: str | Path) -> Path:
    """report.md plus curves_<task>.png, speedup.png and isotropy.png in `out`; returns report.md."""
    runs_dir, out = Path(runs_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = read_json(runs_dir / "sweep.json") if (runs_dir / "sweep.json").exists() else None
    baseline = (plan or {}).get("baseline") or BASELINE
    runs = load_runs(runs_dir)
    report = out / "report.md"
    markdown = _markdown()
    if not runs:
        report.write_text(markdown.render("report.md.j2", runs_dir=runs_dir, tasks=[]))
        return report
    names = list(dict.fromkeys([*(plan or {}).get("tasks", []), *sorted({r.task for r in runs})]))
    names = [t for t in names if any(r.task == t for r in runs)]
    tasks, speed_rows, all_splits = [], [], set()
    for task in names:
        truns = [r for r in runs if r.task == task]
        splits = split_order({r.split for r in truns}, plan)
        all_splits |= set(splits)
        table = task_table(truns, splits, baseline)
        speed_rows += [(task, split, arm, c) for split, arm, c in table["comparisons"]]
        png = out / f"curves_{task}.png"
        plot_curves(png, task, splits, table["curves"], baseline, truns[0].metric)
        tasks.append({"name": task, "metric": truns[0].metric, "mode": truns[0].mode,
                      "test_metric": test_metric(truns[0].metric), "rows": table["rows"],
                      "lr_notes": table["lr_notes"], "png": png.name})  # fmt: skip
    plot_speedup(out / "speedup.png", split_order(all_splits, plan), speed_rows)
    encoders = arm_encoders(runs, plan)
    iso = load_isotropy(encoders, baseline)
    own = encoders.get(baseline)
    isotropy = None
    if iso:
        plot_isotropy(out / "isotropy.png", iso, baseline)
        metrics = list(dict.fromkeys(n for a in iso for n in iso[a][0]))
        isotropy = {"arms": list(iso), "names": [(n, [iso[a][0].get(n) for a in iso]) for n in metrics]}
    text = markdown.render(
        "report.md.j2",
        runs_dir=runs_dir,
        baseline=baseline,
        n_runs=len(runs),
        tested=sum(1 for r in runs if r.test_value is not None),
        tasks=tasks,
        baseline_before=baseline in iso and not (isinstance(own, str) and (Path(own) / "isotropy.json").is_file()),
        isotropy=isotropy,
        rewiring="\n".join(rewiring_section(encoders, baseline)),
    )
    report.write_text(text)
    return report
