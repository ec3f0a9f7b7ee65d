"""The sweep's spec: the grid (arms x tasks x splits x lrs x seeds), the configs each run stacks,
where things go; and its plan, every run of the grid in the order they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rewiring.experiment.layout import BASELINE, lr_dir, parse_split, run_dir

Arm = Literal["baseline", "twin", "neutral", "mixed"]
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
        threads: OMP/MKL threads per run process (unset: torch's default); the rewiring stages, one at a
            time, always keep torch's default.
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
                        runs.append(Run(task, split, arm, lr, seed, run_dir(spec.root, task, split, arm, lr, seed)))
    return runs
