"""Plan and run the grid: encoder arms x tasks x low-resource splits x learning rates x seeds.

    python -m rewiring sweep --config conf/sweep/demo.yaml [--dry-run] [--launcher local|slurm]

The YAML is a `SweepSpec` (spec.py; `--help` lists every field). What the sweep does:

1. Rewiring stage: for each rewired arm (a pairing: twin, neutral, mixed) whose encoder folder has
   no config.json yet, one `python -m rewiring fit --config <base> --config <encoder>
   --config <rewire stage> --data.init_args.pairing <p> --model.init_args.export_dir <dir>`
   process (logs in runs/<sweep>/rewire/<p>).
2. Fine-tuning: one `fit` process per run, then one `test` process with the run's best checkpoint.
   Run folder: runs/<sweep>/<task>/<split>/<arm>/lr<lr>/seed<k> (TensorBoardLogger save_dir, name
   and version), holding config.yaml (LightningCLI), checkpoints/, TensorBoard events,
   convergence.json, test.json (rewiring.convergence.TestResults) and the fit.log/test.log outputs.
   Baseline runs go first, so that each rewired run's ConvergenceCallback can time itself against
   the baseline at the same task, split, lr and seed (its reference_run, `--convergence.reference_run`).
   Under the SUPERB protocol the runs share the frozen-feature cache (tasks/features.py): the first
   run of an arm and task computes the hidden states of its full train, dev and test manifests,
   every other split, seed and lr reads them (`args: [--model.init_args.feature_cache=null]`: live).
3. Resume: a run with convergence.json and test.json is complete and skipped. A run whose fit
   started (config.yaml saved) and left a checkpoint is resumed from it: `fit --config
   <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt` (the saved config restores the
   hyperparameters; the checkpoint restores weights, optimizer, loop and the callback's curve and
   clock). A run killed before its first checkpoint is deleted and started again. A finished fit
   without test.json only runs its test. The rewiring stage resumes the same way. While a run
   (or a rewiring stage) goes on, the sweep holds a lock on <run>.lock beside its folder; a second
   sweep skips a locked run ("locked by a live process, pid N"). Fits die with the sweep
   (rewiring.procs), so after a `kill -9` nothing holds the lock or writes to the folder.
4. Learning rate: every arm gets the same grid (one per task where `task_lrs` gives one); the
   report picks, per task, split and arm, the lr with the best dev primary metric averaged over
   seeds, and reports the test metric there.
5. Writes runs/<sweep>/sweep.json (the plan) and, at the end, the report (rewiring.experiment.report).

`--launcher slurm` runs nothing (slurm.py): it writes runs/<sweep>/slurm/ with the resolved spec, a job
array over the runs (index i calls `rewiring sweep --config spec.yaml --index i`: the same fit and
test commands, the same resume rules), a job array for missing rewired encoders, and submit.sh,
which chains them and the report with sbatch dependencies. Inside a SLURM job, `fit` starts under
`srun` (spec.srun), so Lightning's SLURMEnvironment starts one DDP rank per task: set
`ntasks-per-node` to the number of GPUs per node in `slurm`.

The parts: spec.py (SweepSpec, Run, plan), commands.py (the command lines; the arms' encoders),
runners.py (the runners and `Sweep`), slurm.py; this module parses the arguments and prints the
dry run. Run folders and run states: rewiring.experiment.layout.
"""

from __future__ import annotations

import shlex
import sys

from rewiring.experiment.layout import BASELINE, EncoderSourceError, run_state
from rewiring.experiment.sweep.commands import (
    encoder_path,
    encoder_ready,
    fit_command,
    rewire_command,
    test_command,
)
from rewiring.experiment.sweep.runners import PreloadedRunner, Runner, Sweep
from rewiring.experiment.sweep.slurm import write_slurm
from rewiring.experiment.sweep.spec import Run, SweepSpec, plan

__all__ = ["Run", "SweepSpec", "build_parser", "fit_command", "main", "plan", "print_plan", "run_sweep",
           "spec_from_config"]  # fmt: skip


# ---------------------------------------------------------------------------- dry run
def _lr_count(spec: SweepSpec) -> str:
    """How many lrs each task has: "3", or "3-5" when the per-task grids differ in size."""
    sizes = sorted({len(spec.lrs_for(t)) for t in spec.tasks})
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def print_plan(sweep: Sweep) -> None:
    spec, out = sweep.spec, sweep.out
    print(
        f"sweep {spec.name}: {len(spec.arms)} arms x {len(spec.tasks)} tasks x {len(spec.splits)} splits x "
        f"{_lr_count(spec)} lrs x {len(spec.seeds)} seeds = {len(sweep.runs)} runs in {spec.root}",
        file=out,
    )
    for task in spec.tasks:
        if task in spec.task_lrs:
            print(f"  lrs {task}: {', '.join(f'{lr:g}' for lr in spec.lrs_for(task))}", file=out)
    for arm in spec.arms:
        ready = "ready" if encoder_ready(spec, arm) else ("missing" if arm == BASELINE else "to rewire")
        print(f"  arm {arm}: encoder {encoder_path(spec, arm)} ({ready})", file=out)
    for arm in sweep.missing_encoders():
        print(f"  rewire {arm}: {shlex.join(rewire_command(spec, arm))}", file=out)
    states: dict[str, int] = {}
    run_states = {r.dir: run_state(r.dir) for r in sweep.runs}
    shown = 0
    for r in sweep.runs:
        st = run_states[r.dir]
        states[st] = states.get(st, 0) + 1
        if len(sweep.runs) <= 64 or shown < 8:
            print(f"  [{st}] {r.label} -> {r.dir}", file=out)
            shown += 1
    if shown < len(sweep.runs):
        print(
            f"  ... and {len(sweep.runs) - shown} more runs (runs/<sweep>/sweep.json lists them all)",
            file=out,
        )
    print("  " + ", ".join(f"{n} {k}" for k, n in states.items()), file=out)
    todo = [r for r in sweep.runs if run_states[r.dir] == "new"]
    if todo:
        r = todo[0]
        print(f"  e.g. {r.label}:\n    {shlex.join(fit_command(spec, r))}", file=out)
        ckpt = r.dir / "checkpoints" / "<best>.ckpt"
        print(f"    {shlex.join(test_command(r.dir, ckpt))}", file=out)
    print(f"  report: {spec.report_path / 'report.md'}", file=out)


# ---------------------------------------------------------------------------- entry point
def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="rewiring sweep",
        description="Plan and run baseline vs rewired fine-tuning over tasks, splits, lrs and seeds (resumable).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="the sweep spec (conf/sweep/<name>.yaml)")
    parser.add_class_arguments(SweepSpec)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    parser.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: run here; slurm: write job-array scripts under runs/<sweep>/slurm",
    )
    parser.add_argument(
        "--index",
        type=int | None,
        default=None,
        help="run only the index-th run of the plan (what each SLURM array task does)",
    )
    parser.add_argument(
        "--rewire",
        type=str | None,
        default=None,
        help="run only the rewiring stage of this arm (what the SLURM rewire array does)",
    )
    parser.add_argument("--report", type=bool, default=True, help="write the report at the end")
    return parser


def spec_from_config(cfg) -> SweepSpec:
    import dataclasses

    return SweepSpec(**{f.name: cfg[f.name] for f in dataclasses.fields(SweepSpec)})


def run_sweep(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """Parse the arguments and do what they ask; returns the exit status. Commands run on a
    PreloadedRunner unless `runner` is given (tests inject fakes)."""
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = spec_from_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    sweep = Sweep(spec, runner=runner if runner is not None else PreloadedRunner())
    try:
        return _run(sweep, cfg, parser)
    except EncoderSourceError as e:
        raise SystemExit(f"sweep {spec.name}: the baseline's fit command does not parse: {e}") from None


def _run(sweep: Sweep, cfg, parser) -> int:
    spec = sweep.spec
    if cfg.dry_run:
        print_plan(sweep)
        return 0
    if cfg.launcher == "slurm":
        d = write_slurm(sweep)
        print(
            f"sweep {spec.name}: {len(sweep.runs)} runs as a SLURM job array in {d}; submit with {d / 'submit.sh'}"
        )
        return 0
    if cfg.rewire is not None:
        if cfg.rewire not in spec.arms or cfg.rewire == BASELINE:
            parser.error(f"--rewire {cfg.rewire}: not a rewired arm of this sweep ({spec.arms})")
        return 0 if encoder_ready(spec, cfg.rewire) or sweep.rewire(cfg.rewire) else 1
    if cfg.index is not None:
        if not 0 <= cfg.index < len(sweep.runs):
            parser.error(f"--index {cfg.index}: the plan has {len(sweep.runs)} runs")
        run = sweep.runs[cfg.index]
        blocked = set() if run.arm == BASELINE or encoder_ready(spec, run.arm) else {run.arm}
        sweep.execute([run], blocked=blocked)
        return 1 if sweep.failed or sweep.locked else 0
    try:
        return sweep.run(report=cfg.report)
    except KeyboardInterrupt:
        print(f"\nsweep {spec.name} interrupted: run the same command again to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> None:
    """`python -m rewiring sweep ...` (rewiring.experiment.cli): exits non-zero when a run or the report failed."""
    status = run_sweep(argv)
    if status:
        raise SystemExit(status)
