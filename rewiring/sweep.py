"""Plan and run the grid: encoder arms x tasks x low-resource splits x learning rates x seeds.

    python -m rewiring sweep --config conf/sweep/demo.yaml [--dry-run] [--launcher local|slurm]

The YAML is a `SweepSpec` (below; `--help` lists every field). What the sweep does:

1. Rewiring stage: for each rewired arm (a pairing: twin, neutral, mixed) whose encoder folder has
   no config.json yet, one `python -m rewiring fit --config <base> --config <encoder>
   --config <rewire stage> --data.init_args.pairing <p> --model.init_args.export_dir <dir>`
   process (logs in runs/<sweep>/rewire/<p>).
2. Fine-tuning: one `fit` process per run, then one `test` process with the run's best checkpoint.
   Run folder: runs/<sweep>/<task>/<split>/<arm>/lr<lr>/seed<k> (TensorBoardLogger save_dir, name
   and version), holding config.yaml (LightningCLI), checkpoints/, TensorBoard events,
   convergence.json, test.json (rewiring.convergence.TestResults) and the fit.log/test.log outputs.
   Baseline runs go first, so that each rewired run's ConvergenceCallback can time itself against
   the baseline at the same task, split, lr and seed (its reference_run).
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
5. Writes runs/<sweep>/sweep.json (the plan) and, at the end, the report (rewiring.report).

`--launcher slurm` runs nothing: it writes runs/<sweep>/slurm/ with the resolved spec, a job
array over the runs (index i calls `rewiring sweep --config spec.yaml --index i`: the same fit and
test commands, the same resume rules), a job array for missing rewired encoders, and submit.sh,
which chains them and the report with sbatch dependencies. Inside a SLURM job, `fit` starts under
`srun` (spec.srun), so Lightning's SLURMEnvironment starts one DDP rank per task: set
`ntasks-per-node` to the number of GPUs per node in `slurm`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rewiring.files import read_json, write_json_atomic
from rewiring.procs import Locked, die_with_parent, exclusive_lock

Arm = Literal["baseline", "twin", "neutral", "mixed"]
BASELINE = "baseline"
ALL_TASKS = ["asr", "ks", "ic", "sid", "sd", "sf"]


@dataclass
class SweepSpec:
    """A sweep: the grid, the configs each run stacks, and where things go.

    Args:
        name: the sweep's name: runs go to <runs_dir>/<name>/, the report to reports/<name>/.
        encoder: the baseline encoder's config (conf/encoder/*.yaml); rewired arms start from it.
        arms: "baseline" (the encoder as it is) and/or rewiring pairings (twin, neutral, mixed).
        tasks: task names; each one's config is `task_config` with {task} filled in.
        splits: low-resource training splits: a percentage of the train set ("1%", "100%" = all)
            or an amount of audio ("10min", "1h").
        seeds: training seeds (seed_everything); each (task, split, arm, lr) runs once per seed.
        lrs: the learning-rate grid, the same for every arm.
        task_lrs: a task's own grid in place of `lrs` (e.g. {"sid": [5.0e-4, 1.0e-3, 2.0e-3]}: each
            task's recipe default at its centre), still the same for every arm.
        lr_arg: the argument the grid sets (the head's lr under the frozen SUPERB protocol).
        split_seed: seed of the low-resource subset, the same for every run; null: the run's seed.
        base_config: stacked first by every process.
        task_config: the task's config path, with {task}.
        configs: more configs stacked after the task config, e.g. a trainer config
            (conf/trainer/cpu.yaml, conf/trainer/ddp.yaml); {task} is replaced by the run's task, so
            a per-task preset stacks there too (conf/tasks/superb/{task}.yaml).
        args: more command-line arguments for every fine-tuning fit (the last word).
        task_args: more arguments per task (e.g. {"sd": ["--data.init_args.root=data/real"]}).
        data_root: the data module's root for every task (`--data.init_args.root`), if set.
        rewire_configs: the rewiring stage's configs, stacked after base and encoder ({arm} is
            replaced by the pairing, e.g. conf/stages/paper/{arm}.yaml); `configs` do not apply
            to this stage, so give its trainer config here.
        rewire_args: more arguments for the rewiring stage.
        encoders_dir: where rewired encoders are exported: <dir>/<pairing>, or the path itself with
            {arm} replaced when it contains {arm}; default <runs_dir>/<name>/encoders.
        runs_dir: the root of all runs.
        report_dir: where the report goes; default reports/<name>.
        jobs: runs at once (a thread pool over subprocesses); 1 = one after another.
        threads: OMP/MKL threads per process (unset: torch's default).
        srun: inside a SLURM job, start each fit under `srun` (one DDP rank per task).
        slurm: `#SBATCH --key=value` lines for the runs' job array (partition, time, gpus-per-node...).
        rewire_slurm: the same for the rewiring stage's job array; default: `slurm`.
    """

    name: str = "demo"
    encoder: str = "conf/encoder/tiny.yaml"
    arms: list[Arm] = field(default_factory=lambda: [BASELINE, "neutral"])
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    splits: list[str] = field(default_factory=lambda: ["1%", "5%", "10%", "100%"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    task_lrs: dict[str, list[float]] = field(default_factory=dict)
    lr_arg: str = "model.init_args.lr_head"
    split_seed: int | None = 0
    base_config: str = "conf/base.yaml"
    task_config: str = "conf/tasks/{task}.yaml"
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    task_args: dict[str, list[str]] = field(default_factory=dict)
    data_root: str | None = None
    rewire_configs: list[str] = field(default_factory=lambda: ["conf/stages/rewire.yaml"])
    rewire_args: list[str] = field(default_factory=list)
    encoders_dir: str | None = None
    runs_dir: str = "runs"
    report_dir: str | None = None
    jobs: int = 1
    threads: int | None = None
    srun: bool = True
    slurm: dict[str, str] = field(default_factory=dict)
    rewire_slurm: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("arms: give at least one arm")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms: duplicates in {self.arms}")
        for name, values in (
            ("tasks", self.tasks),
            ("splits", self.splits),
            ("seeds", self.seeds),
            ("lrs", self.lrs),
        ):
            if not values:
                raise ValueError(f"{name}: give at least one")
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: duplicates in {values}")
        for s in self.splits:
            parse_split(s)
        if self.jobs < 1:
            raise ValueError("jobs must be >= 1")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be positive: {self.lrs}")
        for task, grid in self.task_lrs.items():
            if task not in self.tasks and task not in ALL_TASKS:
                known = sorted(set(self.tasks) | set(ALL_TASKS))
                raise ValueError(f"task_lrs: unknown task {task!r} (known: {known})")
            if not grid or len(set(grid)) != len(grid) or any(lr <= 0 for lr in grid):
                raise ValueError(f"task_lrs.{task}: give distinct positive learning rates, got {grid}")

    def lrs_for(self, task: str) -> list[float]:
        """The task's learning-rate grid: its own from `task_lrs`, else `lrs`."""
        return list(self.task_lrs.get(task, self.lrs))

    @property
    def root(self) -> Path:
        return Path(self.runs_dir) / self.name

    def encoder_dir(self, arm: str) -> Path:
        if not self.encoders_dir:
            return self.root / "encoders" / arm
        if "{arm}" in self.encoders_dir:
            return Path(self.encoders_dir.format(arm=arm))
        return Path(self.encoders_dir) / arm

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir) if self.report_dir else Path("reports") / self.name


# ---------------------------------------------------------------------------- splits and runs
def parse_split(split: str) -> tuple[str, Any]:
    """("fraction", 0.01) for "1%", ("full", None) for "100%", ("amount", "10min") for an amount."""
    s = str(split).strip()
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ValueError(f"split {split!r}: a percentage like '1%' or an amount like '10min'") from None
        if not 0 < pct <= 100:
            raise ValueError(f"split {split!r}: the percentage must be in (0, 100]")
        return ("full", None) if pct == 100 else ("fraction", pct / 100)
    from rewiring.manifest import parse_amount

    try:
        parse_amount(s)
    except ValueError as e:
        raise ValueError(f"split {split!r}: a percentage like '1%' or an amount like '10min' ({e})") from None
    return "amount", s


def split_dir(split: str) -> str:
    """A folder name for a split: "1%" -> "1pct", "10min" stays."""
    return str(split).strip().replace("%", "pct")


def split_label(split: str) -> str:
    """The folder name of a split back to how the sweep spec wrote it: "1pct" -> "1%"."""
    return split[:-3] + "%" if split.endswith("pct") else split


def split_sort_key(split: str) -> tuple[int, float]:
    """Amounts (by seconds) before fractions (by size): the order of the summary plot's x axis."""
    kind, value = parse_split(split_label(split))
    if kind == "amount":
        from rewiring.manifest import parse_amount

        return 0, parse_amount(value)
    return 1, 1.0 if kind == "full" else float(value)


def lr_dir(lr: float) -> str:
    return f"lr{lr:g}"


def run_dir(spec: SweepSpec, task: str, split: str, arm: str, lr: float, seed: int) -> Path:
    """<root>/<task>/<split>/<arm>/lr<lr>/seed<seed>: the logger's save_dir/name/version of a run."""
    return spec.root / task / split_dir(split) / arm / lr_dir(lr) / f"seed{seed}"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the grid."""

    task: str
    split: str
    arm: str
    lr: float
    seed: int
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.task} {self.split} {self.arm} {lr_dir(self.lr)} seed{self.seed}"


def plan(spec: SweepSpec) -> list[Run]:
    """Every run, baseline runs first (rewired runs time themselves against them)."""
    arms = sorted(spec.arms, key=lambda a: a != BASELINE)
    runs = []
    for arm in arms:
        for task in spec.tasks:
            for split in spec.splits:
                for lr in spec.lrs_for(task):
                    for seed in spec.seeds:
                        runs.append(Run(task, split, arm, lr, seed, run_dir(spec, task, split, arm, lr, seed)))
    return runs


def encoder_source(config_path: str | Path) -> Any:
    """The encoder `source` of a config file (a hub name, a folder or a config dict), or None."""
    try:
        conf = yaml.safe_load(Path(config_path).read_text()) or {}
        return conf["model"]["init_args"]["encoder"]["init_args"]["source"]
    except (KeyError, TypeError, yaml.YAMLError):
        return None


def baseline_source(spec: SweepSpec) -> Any:
    """The baseline encoder's `source` from its config."""
    return encoder_source(spec.encoder)


def _looks_local(source: Any) -> bool:
    """A local folder rather than a hub id ("org/name") or a config dict."""
    if not isinstance(source, str):
        return False
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        return True
    return Path(source.split("/")[0]).is_dir()


def encoder_path(spec: SweepSpec, arm: str) -> str | None:
    """Where an arm's encoder lives: the baseline's source, or the rewired export folder."""
    if arm == BASELINE:
        src = baseline_source(spec)
        return src if isinstance(src, str) else None
    return str(spec.encoder_dir(arm))


def encoder_ready(spec: SweepSpec, arm: str) -> bool:
    if arm == BASELINE:
        src = baseline_source(spec)
        return not _looks_local(src) or (Path(src).expanduser() / "config.json").exists()
    return (spec.encoder_dir(arm) / "config.json").exists()


# ---------------------------------------------------------------------------- commands
def _python() -> list[str]:
    return [sys.executable, "-m", "rewiring"]


def _configs(paths: Sequence[str]) -> list[str]:
    return [a for p in paths for a in ("--config", p)]


def _logger(save_dir: Path, name: str, version: str) -> list[str]:
    return [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}",
    ]


def rewire_log_dir(spec: SweepSpec, arm: str) -> Path:
    return spec.root / "rewire" / arm


def rewire_command(spec: SweepSpec, arm: str) -> list[str]:
    """The rewiring stage of one pairing, exporting the encoder to spec.encoder_dir(arm)."""
    return [
        *_python(),
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
        base = run_dir(spec, run.task, run.split, BASELINE, run.lr, run.seed)
        # applies to the last callback of base.yaml, the ConvergenceCallback
        reference = [f"--trainer.callbacks.init_args.reference_run={base / 'convergence.json'}"]
    return [
        *_python(),
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
    return [*_python(), "fit", "--config", str(run_dir / "config.yaml"), f"--ckpt_path={ckpt}"]


def test_command(run_dir: Path, ckpt: Path) -> list[str]:
    """Test the run's best checkpoint on one device; metrics to <run>/test.json, logs to <run>/test/."""
    return [
        *_python(),
        "test",
        "--config",
        str(run_dir / "config.yaml"),
        f"--ckpt_path={ckpt}",
        f"--trainer.logger.init_args.version={run_dir.parent.name}/{run_dir.name}/test",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.callbacks+=rewiring.convergence.TestResults",
        f"--trainer.callbacks.init_args.path={run_dir / 'test.json'}",
    ]


# ---------------------------------------------------------------------------- run state
def is_complete(run_dir: Path) -> bool:
    return (run_dir / "convergence.json").exists() and (run_dir / "test.json").exists()


def test_metric(dev_metric: str) -> str:
    """The test metric logged for a dev metric: val/acc -> test/acc."""
    return "test/" + dev_metric.split("/", 1)[-1]


def lock_file(run_dir: Path) -> Path:
    """<run>.lock beside the run folder (it survives the folder's deletion on a restart): held by
    the sweep process while a fit or test of the run goes on."""
    return run_dir.with_name(run_dir.name + ".lock")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """last.ckpt if there is one, else the newest checkpoint."""
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.ckpt").exists():
        return ckpts / "last.ckpt"
    found = list(ckpts.glob("*.ckpt")) if ckpts.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint named in convergence.json, else the only non-last one, else last.ckpt."""
    conv = run_dir / "convergence.json"
    if conv.exists():
        best = (read_json(conv).get("checkpoint") or {}).get("best")
        if best:
            p = Path(best) if Path(best).is_absolute() else run_dir / best
            if p.exists():
                return p
    ckpts = run_dir / "checkpoints"
    others = [p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"] if ckpts.is_dir() else []
    if others:
        return max(others, key=lambda p: p.stat().st_mtime)
    return latest_checkpoint(run_dir)


def run_state(run_dir: Path) -> str:
    """complete | test (fit done) | resume (killed with a checkpoint) | restart (killed before one) | new."""
    if is_complete(run_dir):
        return "complete"
    if (run_dir / "convergence.json").exists():
        return "test"
    if (run_dir / "config.yaml").exists() and latest_checkpoint(run_dir) is not None:
        return "resume"
    if run_dir.exists() and any(run_dir.iterdir()):
        return "restart"
    return "new"


# ---------------------------------------------------------------------------- running
Runner = Callable[[list[str], Path, dict[str, str]], int]


def subprocess_runner(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run one command, its output into `log` (appended: a resumed run keeps its history)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode


# Imported once by the fork server, so each run's process starts with torch, Lightning and the
# project already loaded: a run's start-up drops from ~8 s to ~1.5 s (benchmarks/results.md).
PRELOAD = [
    "torch",
    "lightning.pytorch",
    "transformers",
    "rewiring.cli",
    "rewiring.encoder",
    "rewiring.convergence",
    "rewiring.rewire",
    "tasks.base",
]
_server_lock = threading.Lock()
_server = None


def _server_context():
    global _server
    with _server_lock:
        if _server is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _server = ctx
        return _server


def _child(argv: list[str], log: str, env: dict[str, str], cwd: str) -> None:
    """One run in its own (forked) process: environment, working folder and output as a fresh process's.
    It dies with the sweep (or the fork server), so a killed sweep leaves no fit behind; the fork
    server, left without clients, then exits by itself."""
    die_with_parent()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:  # a fresh interpreter would have read it at start
            sys.path.insert(0, entry)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own stdout)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    from rewiring.cli import main

    main(argv)


def preloaded_runner(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Like `subprocess_runner` (one process per command), but forked from a server that has already
    imported the heavy modules. Commands that are not `python -m rewiring ...` go to a subprocess."""
    prefix = _python()
    if cmd[: len(prefix)] != prefix:
        return subprocess_runner(cmd, log, env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
    proc = _server_context().Process(target=_child, args=(cmd[len(prefix) :], str(log), env, os.getcwd()))
    proc.start()
    proc.join()
    return proc.exitcode if proc.exitcode is not None else 1


def _tail(log: Path, n: int = 15) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


class Sweep:
    """Runs a plan with a runner (a subprocess per command by default; tests inject a fake)."""

    def __init__(self, spec: SweepSpec, runner: Runner = subprocess_runner, out=None) -> None:
        self.spec = spec
        self.runner = runner
        self.out = out or sys.stdout
        self.runs = plan(spec)
        self._lock = threading.Lock()
        self._done = 0
        self.failed: list[str] = []
        self.locked: list[str] = []  # runs another live process was running
        self.ran = 0
        self.skipped = 0
        self._t0 = time.monotonic()

    # -- helpers
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.spec.threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[k] = str(self.spec.threads)
        return env

    def print(self, msg: str) -> None:
        with self._lock:
            print(msg, file=self.out, flush=True)

    def _srun(self, single: bool) -> list[str]:
        if not (self.spec.srun and os.environ.get("SLURM_JOB_ID")):
            return []
        return ["srun", "--ntasks=1", "--ntasks-per-node=1"] if single else ["srun"]

    def plan_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name,
            "arms": [
                {
                    "name": a,
                    "pairing": None if a == BASELINE else a,
                    "encoder": encoder_path(s, a),
                    "encoder_config": s.encoder,
                }
                for a in s.arms
            ],
            "baseline": BASELINE if BASELINE in s.arms else None,
            "tasks": s.tasks,
            "splits": s.splits,
            "seeds": s.seeds,
            "lrs": s.lrs,
            "task_lrs": {t: s.lrs_for(t) for t in s.tasks},
            "runs": [
                {
                    "task": r.task,
                    "split": r.split,
                    "split_dir": split_dir(r.split),
                    "arm": r.arm,
                    "lr": r.lr,
                    "seed": r.seed,
                    "dir": str(r.dir),
                }
                for r in self.runs
            ],
            "spec": asdict(s),
        }

    def write_plan(self) -> Path:
        return write_json_atomic(self.spec.root / "sweep.json", self.plan_json())

    # -- rewiring stage
    def missing_encoders(self) -> list[str]:
        return [a for a in self.spec.arms if a != BASELINE and not encoder_ready(self.spec, a)]

    def rewire(self, arm: str) -> bool:
        """Run (or resume) the rewiring stage of one arm; True when its encoder exists after. Skipped
        (False) while another live process holds the stage's lock."""
        try:
            with exclusive_lock(lock_file(rewire_log_dir(self.spec, arm))):
                return self._rewire(arm)
        except Locked as e:
            self.print(f"rewiring {arm}: skipped: {e}")
            return False

    def _rewire(self, arm: str) -> bool:
        log_dir = rewire_log_dir(self.spec, arm)
        ckpt = latest_checkpoint(log_dir) if (log_dir / "config.yaml").exists() else None
        if ckpt is not None:
            cmd = resume_command(log_dir, ckpt)
        else:
            if log_dir.exists():
                shutil.rmtree(log_dir)
            cmd = rewire_command(self.spec, arm)
        self.print(f"rewiring {arm}: {shlex.join(cmd[2:])}")
        t0 = time.monotonic()
        rc = self.runner(self._srun(False) + cmd, log_dir.parent / f"{arm}.log", self.env())
        ok = rc == 0 and encoder_ready(self.spec, arm)
        what = f"encoder in {self.spec.encoder_dir(arm)}" if ok else f"FAILED (exit {rc})"
        self.print(f"rewiring {arm}: {what}, {time.monotonic() - t0:.0f}s")
        if not ok:
            self.print(_tail(log_dir.parent / f"{arm}.log"))
        return ok

    # -- one run
    def run_one(self, run: Run) -> str:
        """Fit (fresh, resumed or skipped) then test one run; returns its progress line's tail."""
        state = run_state(run.dir)
        if state == "complete":
            return "done before: " + describe(run.dir)
        t0 = time.monotonic()
        if state in ("new", "restart", "resume"):
            if state == "restart":
                shutil.rmtree(run.dir)
            if state == "resume":
                cmd = resume_command(run.dir, latest_checkpoint(run.dir))
            else:
                cmd = fit_command(self.spec, run)
            rc = self.runner(self._srun(False) + cmd, run.dir / "fit.log", self.env())
            if rc != 0 or not (run.dir / "convergence.json").exists():
                raise RunFailed(f"fit failed (exit {rc}), log {run.dir / 'fit.log'}", run.dir / "fit.log")
        if (run.dir / "test.json").exists():  # the fit tested itself (--test_json, one device)
            how = {"resume": "resumed, "}.get(state, "")
            return f"{describe(run.dir)}, {how}{time.monotonic() - t0:.1f}s"
        ckpt = best_checkpoint(run.dir)
        if ckpt is None:
            raise RunFailed(f"no checkpoint in {run.dir / 'checkpoints'}", run.dir / "fit.log")
        rc = self.runner(self._srun(True) + test_command(run.dir, ckpt), run.dir / "test.log", self.env())
        if rc != 0 or not (run.dir / "test.json").exists():
            raise RunFailed(f"test failed (exit {rc}), log {run.dir / 'test.log'}", run.dir / "test.log")
        how = {"resume": "resumed, ", "test": "tested, "}.get(state, "")
        return f"{describe(run.dir)}, {how}{time.monotonic() - t0:.1f}s"

    def _do(self, run: Run, blocked: set[str]) -> None:
        try:
            if run.arm in blocked:
                raise RunFailed(f"no encoder for arm {run.arm} (its rewiring failed)", None)
            with exclusive_lock(lock_file(run.dir)):  # a restart never races a live fit or test
                tail = self.run_one(run)
            with self._lock:
                if tail.startswith("done before"):
                    self.skipped += 1
                else:
                    self.ran += 1
        except Locked as e:
            with self._lock:
                self.locked.append(run.label)
            tail = f"skipped: {e}; run the sweep again once it has ended"
        except RunFailed as e:
            with self._lock:
                self.failed.append(run.label)
            tail = f"FAILED: {e}"
            if e.log is not None:
                tail += "\n" + _tail(e.log)
        with self._lock:
            self._done += 1
            i = self._done
        mins, secs = divmod(int(time.monotonic() - self._t0), 60)
        self.print(f"[{i}/{len(self.runs)}] {run.label}: {tail}  ({mins}m{secs:02d}s into the sweep)")

    def execute(self, runs: Sequence[Run] | None = None, blocked: set[str] | None = None) -> None:
        """Baseline runs first (the others compare against them), then the rest; `jobs` at a time."""
        runs = list(self.runs if runs is None else runs)
        blocked = blocked or set()
        for phase in ([r for r in runs if r.arm == BASELINE], [r for r in runs if r.arm != BASELINE]):
            if self.spec.jobs == 1:
                for r in phase:
                    self._do(r, blocked)
                continue
            queue = _FillAwareQueue(phase)

            def work() -> None:
                while (run := queue.take()) is not None:
                    try:
                        self._do(run, blocked)
                    finally:
                        queue.done(run)

            with ThreadPoolExecutor(self.spec.jobs) as pool:
                for f in [pool.submit(work) for _ in range(self.spec.jobs)]:
                    f.result()

    def run(self, report: bool = True) -> int:
        """The whole sweep: plan, rewiring stage, runs, report. Returns the exit status."""
        t0 = self._t0 = time.monotonic()
        check_baseline(self.spec)
        self.write_plan()
        self.print(
            f"sweep {self.spec.name}: {len(self.runs)} runs "
            f"({sum(is_complete(r.dir) for r in self.runs)} complete already), plan in {self.spec.root / 'sweep.json'}"
        )
        # One rewiring stage at a time: each already keeps the machine busy (its TTS pre-fill runs on
        # processes of its own); two at once on 2 cores took longer than one after the other.
        blocked = {a for a in self.missing_encoders() if not self.rewire(a)}
        self.execute(blocked=blocked)
        mins, secs = divmod(int(time.monotonic() - t0), 60)
        self.print(
            f"sweep {self.spec.name}: {len(self.runs)} runs: {self.ran} ran, {self.skipped} done before, "
            f"{len(self.failed)} failed, "
            + (f"{len(self.locked)} skipped as locked by a live process, " if self.locked else "")
            + f"in {mins}m{secs:02d}s"
        )
        status = 1 if self.failed or blocked or self.locked else 0
        if report:
            from rewiring.report import write_report

            try:
                path = write_report(self.spec.root, self.spec.report_path)
                self.print(f"report: {path}")
            except Exception as e:  # the runs are safe on disk; say why the report failed
                self.print(f"report failed: {type(e).__name__}: {e}")
                status = 1
        return status


class _FillAwareQueue:
    """The runs in plan order, except that a task's first run of an arm goes alone: it fills that
    arm's feature cache for the task (every split and seed reads it), and a sibling started beside
    it would only wait on the cache's lock with a core idle. The other job takes the next run of
    another task meanwhile. Results do not depend on the order."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self._pending = list(runs)
        self._started: set[tuple[str, str]] = set()
        self._finished: set[tuple[str, str]] = set()
        self._cond = threading.Condition()

    def take(self) -> Run | None:
        with self._cond:
            while self._pending:
                for i, run in enumerate(self._pending):
                    key = (run.arm, run.task)
                    if key in self._finished or key not in self._started:
                        self._started.add(key)
                        return self._pending.pop(i)
                self._cond.wait()
            return None

    def done(self, run: Run) -> None:
        with self._cond:
            self._finished.add((run.arm, run.task))
            self._cond.notify_all()


class RunFailed(RuntimeError):
    def __init__(self, msg: str, log: Path | None) -> None:
        super().__init__(msg)
        self.log = log


def describe(run_dir: Path) -> str:
    """`val/acc 0.812 (best 0.830 @ 60), test/acc 0.800` from a run's files."""
    parts = []
    conv = run_dir / "convergence.json"
    if conv.exists():
        c = json.loads(conv.read_text())
        final, top = c.get("final", {}), c.get("best", {})
        if final.get("value") is not None:
            parts.append(f"{c['metric']} {final['value']:.4g} (best {top['value']:.4g} @ {top['step']})")
        test = run_dir / "test.json"
        if test.exists():
            name = test_metric(c["metric"])
            v = json.loads(test.read_text()).get("metrics", {}).get(name)
            if v is not None:
                parts.append(f"{name} {v:.4g}")
    return ", ".join(parts) or "no metrics"


def check_baseline(spec: SweepSpec) -> None:
    """Fail early, before any run, when the baseline encoder's local folder is missing."""
    if not Path(spec.encoder).exists():
        raise SystemExit(f"sweep {spec.name}: encoder config {spec.encoder} not found")
    if not encoder_ready(spec, BASELINE):
        raise SystemExit(
            f"sweep {spec.name}: the baseline encoder {baseline_source(spec)} (from {spec.encoder}) does not exist yet; "
            "build it first (for the tiny encoder: `make pretrain`)"
        )


# ---------------------------------------------------------------------------- dry run and slurm
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


def _sbatch_header(spec: SweepSpec, job: str, array: str, log_dir: Path) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.name}-{job}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={log_dir}/{job}-%A_%a.out",
    ]
    directives = spec.rewire_slurm if job == "rewire" and spec.rewire_slurm is not None else spec.slurm
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items()]
    return lines + ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]


def write_slurm(sweep: Sweep) -> Path:
    """runs/<sweep>/slurm/: spec.yaml, rewire.sbatch (if encoders are missing), runs.sbatch, submit.sh."""
    spec = sweep.spec
    d = spec.root / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    spec_file = d / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(asdict(spec), sort_keys=False))
    sweep.write_plan()
    py = shlex.join([sys.executable, "-m", "rewiring", "sweep", "--config", str(spec_file)])
    missing = sweep.missing_encoders()
    submit = [
        "#!/bin/bash",
        "# Submit the sweep: rewiring stage, then the runs, then the report.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        'dep=""',
    ]
    if missing:
        body = _sbatch_header(spec, "rewire", f"0-{len(missing) - 1}", d)
        body.append(f"ARMS=({' '.join(missing)})")
        body.append(f'{py} --rewire "${{ARMS[$SLURM_ARRAY_TASK_ID]}}"')
        (d / "rewire.sbatch").write_text("\n".join(body) + "\n")
        submit += [f"jid=$(sbatch --parsable {d / 'rewire.sbatch'})", 'dep="--dependency=afterok:${jid%%;*}"']
    limit = f"%{spec.jobs}" if spec.jobs > 1 else ""
    body = _sbatch_header(spec, "runs", f"0-{len(sweep.runs) - 1}{limit}", d)
    body.append("# index i: the i-th run of runs/<sweep>/sweep.json: fit (or resume), then test")
    body.append(f"{py} --index $SLURM_ARRAY_TASK_ID")
    (d / "runs.sbatch").write_text("\n".join(body) + "\n")
    report = shlex.join(
        [sys.executable, "-m", "rewiring", "compare", str(spec.root), "--out", str(spec.report_path)]
    )
    submit += [
        f"jid=$(sbatch --parsable $dep {d / 'runs.sbatch'})",
        f"sbatch --dependency=afterany:${{jid%%;*}} --job-name={spec.name}-report --output={d}/report-%j.out "
        f"--wrap {shlex.quote(report)}",
        'echo "submitted; progress: squeue -u $USER, logs in ' + str(d) + '"',
    ]
    (d / "submit.sh").write_text("\n".join(submit) + "\n")
    (d / "submit.sh").chmod(0o755)
    return d


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


def run_sweep(argv: list[str] | None = None, runner: Runner = preloaded_runner) -> int:
    """Parse the arguments and do what they ask; returns the exit status (tests inject `runner`)."""
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = spec_from_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    sweep = Sweep(spec, runner=runner)
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
    """`python -m rewiring sweep ...` (rewiring.cli): exits non-zero when a run or the report failed."""
    status = run_sweep(argv)
    if status:
        raise SystemExit(status)


def run_name_pattern() -> re.Pattern:
    """Run folders under a sweep root: <task>/<split>/<arm>[/lr<lr>]/seed<k> (the report reads these)."""
    return re.compile(
        r"^(?P<task>[^/]+)/(?P<split>[^/]+)/(?P<arm>[^/]+)(?:/lr(?P<lr>[^/]+))?/seed(?P<seed>\d+)$"
    )
