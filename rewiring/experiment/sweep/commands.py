"""The processes a sweep starts, as command lines: the rewiring stage, a fit, its resume and its
test, each a `python -m rewiring ...`; and the encoder each arm fine-tunes.

A rewired run names its baseline at the same task, split, lr and seed through the
ConvergenceCallback's own group (`--convergence.reference_run`), and a test process writes its
metrics through `--test_json`: both are found by name, whatever the order of `trainer.callbacks`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewiring.experiment.layout import (
    BASELINE,
    encoder_source,
    lr_dir,
    parse_split,
    run_dir,
    source_ready,
    split_dir,
)
from rewiring.experiment.sweep.spec import Run, SweepSpec


def python() -> list[str]:
    """The start of every command: this interpreter, `-m rewiring`."""
    return [sys.executable, "-m", "rewiring"]


def _configs(paths: Sequence[str]) -> list[str]:
    return [a for p in paths for a in ("--config", p)]


def _logger(save_dir: Path, name: str, version: str) -> list[str]:
    return [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}",
    ]


def rewire_command(spec: SweepSpec, arm: str) -> list[str]:
    """The rewiring stage of one pairing, exporting the encoder to spec.encoder_dir(arm)."""
    return [
        *python(),
        "fit",
        *_configs([spec.base_config, spec.encoder, *(c.format(arm=arm) for c in spec.rewire_configs)]),
        f"--data.init_args.pairing={arm}",
        f"--model.init_args.export_dir={spec.encoder_dir(arm)}",
        *_logger(spec.root, "rewire", arm),  # progress: a line every tenth of the run in the log
        *spec.rewire_args,
    ]


def fit_command(spec: SweepSpec, run: Run) -> list[str]:
    """A fresh fine-tuning fit of one run."""
    kind, value = parse_split(run.split)
    data = []
    if kind == "fraction":
        data.append(f"--data.init_args.fraction={value}")
    elif kind == "amount":
        data.append(f"--data.init_args.amount={value}")
    data.append(f"--data.init_args.split_seed={run.seed if spec.split_seed is None else spec.split_seed}")
    if spec.data_root:
        data.append(f"--data.init_args.root={spec.data_root}")
    encoder = (
        []
        if run.arm == BASELINE
        else [f"--model.init_args.encoder.init_args.source={spec.encoder_dir(run.arm)}"]
    )
    reference = []
    if run.arm != BASELINE and BASELINE in spec.arms:
        base = run_dir(spec.root, run.task, run.split, BASELINE, run.lr, run.seed)
        reference = [f"--convergence.reference_run={base / 'convergence.json'}"]
    return [
        *python(),
        "fit",
        *_configs([spec.base_config, spec.encoder, spec.task_config.format(task=run.task),
                   *(c.replace("{task}", run.task) for c in spec.configs)]),
        *reference,
        f"--seed_everything={run.seed}",
        f"--{spec.lr_arg}={run.lr!r}",
        *data,
        *encoder,
        *_logger(spec.root / run.task / split_dir(run.split), run.arm, f"{lr_dir(run.lr)}/seed{run.seed}"),
        f"--test_json={run.dir / 'test.json'}",  # tested in the fit's process where it runs on one device
        *spec.args,
        *spec.task_args.get(run.task, []),
    ]


def resume_command(run_dir: Path, ckpt: Path) -> list[str]:
    """Continue a killed fit: its saved config (hyperparameters) plus its checkpoint (state)."""
    return [*python(), "fit", "--config", str(run_dir / "config.yaml"), f"--ckpt_path={ckpt}"]


def test_command(run_dir: Path, ckpt: Path) -> list[str]:
    """Test the run's best checkpoint on one device; metrics to <run>/test.json, logs to <run>/test/."""
    return [
        *python(),
        "test",
        "--config",
        str(run_dir / "config.yaml"),
        f"--ckpt_path={ckpt}",
        f"--trainer.logger.init_args.version={run_dir.parent.name}/{run_dir.name}/test",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        f"--test_json={run_dir / 'test.json'}",
    ]


# ---------------------------------------------------------------------------- the arms' encoders
def baseline_run(spec: SweepSpec) -> Run:
    """The baseline's first run (its first task, split, lr and seed), whether or not it is in the plan."""
    task, split, seed = spec.tasks[0], spec.splits[0], spec.seeds[0]
    lr = spec.lrs_for(task)[0]
    return Run(task, split, BASELINE, lr, seed, run_dir(spec.root, task, split, BASELINE, lr, seed))


def baseline_source(spec: SweepSpec) -> Any:
    """The baseline encoder's `source`, as the baseline's first fit resolves it: base config, encoder
    config, task config, `configs` and `args`, parsed by the project's own CLI (layout.encoder_source)."""
    return encoder_source(fit_command(spec, baseline_run(spec))[len(python()) :])


def encoder_path(spec: SweepSpec, arm: str) -> str | None:
    """Where an arm's encoder lives: the baseline's source, or the rewired export folder."""
    if arm == BASELINE:
        src = baseline_source(spec)
        return src if isinstance(src, str) else None
    return str(spec.encoder_dir(arm))


def encoder_ready(spec: SweepSpec, arm: str) -> bool:
    if arm == BASELINE:
        return source_ready(baseline_source(spec))
    return (spec.encoder_dir(arm) / "config.json").exists()
