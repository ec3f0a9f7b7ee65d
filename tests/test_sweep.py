"""The sweep: its plan, its commands, resume after a kill, SLURM scripts, and the paper's dry run.

Most tests inject a fake runner (it writes what a fit or test process would), so they check the
sweep's logic in milliseconds; the slow ones run real processes on a toy task and on a real task.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from rewiring.experiment import layout
from rewiring.experiment import sweep as sw
from rewiring.experiment.sweep import commands, runners
from rewiring.experiment.sweep.spec import ALL_TASKS

REPO = Path(__file__).resolve().parents[1]


def _arg(cmd: list[str], key: str) -> str | None:
    """The value of --key=value (or --key value) in a command."""
    for i, a in enumerate(cmd):
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
        if a == f"--{key}":
            return cmd[i + 1]
    return None


def _configs(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]


def _write_encoder(tmp_path: Path) -> Path:
    enc = tmp_path / "encoders" / "base"
    enc.mkdir(parents=True)
    (enc / "config.json").write_text("{}")
    conf = tmp_path / "encoder.yaml"
    conf.write_text(
        yaml.safe_dump({"model": {"init_args": {"encoder": {"init_args": {"source": str(enc)}}}}})
    )
    return conf


def _spec_args(tmp_path: Path, **over) -> list[str]:
    if "encoder" not in over and not (tmp_path / "encoder.yaml").exists():
        _write_encoder(tmp_path)
    spec = {
        "name": "t",
        "encoder": str(tmp_path / "encoder.yaml"),
        # the baseline's fit resolves its encoder through these (rewiring.experiment.layout.encoder_source)
        "base_config": str(REPO / "conf/base.yaml"),
        "task_config": str(REPO / "conf/tasks/{task}.yaml"),
        "arms": ["baseline"],
        "tasks": ["ks"],
        "splits": ["10%"],
        "seeds": [0, 1, 2],
        "lrs": [0.001],
        "runs_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "encoders_dir": str(tmp_path / "rewired"),
    }
    spec.update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return ["--config", str(path)]


class FakeRunner:
    """Plays fit and test processes: writes config.yaml, checkpoints, convergence.json, test.json.

    `kill_at`: the n-th fit (1-based) saves its config and a checkpoint, then is interrupted.
    """

    def __init__(self, kill_at: int | None = None):
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.kill_at = kill_at
        self.fits = 0

    def __call__(self, cmd, log, env):
        self.calls.append(cmd)
        self.envs.append(env)
        sub = cmd[cmd.index("rewiring") + 1]
        if sub == "test":
            out = Path(_arg(cmd, "test_json"))
            out.write_text(json.dumps({"metrics": {"test/acc": 0.5}}))
            return 0
        if _arg(cmd, "model.init_args.export_dir"):  # the rewiring stage
            d = Path(_arg(cmd, "model.init_args.export_dir"))
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
            return 0
        self.fits += 1
        if _arg(cmd, "ckpt_path"):
            run = Path(_configs(cmd)[0]).parent
        else:
            run = (
                Path(_arg(cmd, "trainer.logger.init_args.save_dir"))
                / _arg(cmd, "trainer.logger.init_args.name")
                / _arg(cmd, "trainer.logger.init_args.version")
            )
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(shlex.join(cmd))
        (run / "checkpoints" / "last.ckpt").write_text("state")
        if self.fits == self.kill_at:
            raise KeyboardInterrupt
        (run / "checkpoints" / "best.ckpt").write_text("state")
        curve = {"steps": [10, 20], "seconds": [1.0, 2.0], "values": [0.3, 0.6]}
        (run / "convergence.json").write_text(
            json.dumps(
                {
                    "metric": "val/acc",
                    "mode": "max",
                    "curve": curve,
                    "final": {"value": 0.6, "step": 20},
                    "best": {"value": 0.6, "step": 20},
                    "checkpoint": {"best": "checkpoints/best.ckpt"},
                }
            )
        )
        return 0


def test_splits():
    assert layout.parse_split("1%") == ("fraction", 0.01)
    assert layout.parse_split("100%") == ("full", None)
    assert layout.parse_split("10min") == ("amount", "10min")
    assert layout.split_dir("5%") == "5pct"
    for bad in ("0%", "150%", "ten", "x%"):
        with pytest.raises(ValueError):
            layout.parse_split(bad)
    assert sorted(["100pct", "1pct", "1h", "10min"], key=layout.split_sort_key) == [
        "10min",
        "1h",
        "1pct",
        "100pct",
    ]


def test_plan_is_the_full_grid_baseline_first(tmp_path):
    spec = sw.SweepSpec(
        name="g",
        arms=["neutral", "baseline"],
        tasks=["ks", "asr"],
        splits=["1%", "10min"],
        seeds=[0, 1],
        lrs=[1e-3, 1e-4],
        runs_dir=str(tmp_path),
    )
    runs = sw.plan(spec)
    assert len(runs) == 2 * 2 * 2 * 2 * 2
    assert len({r.dir for r in runs}) == len(runs)
    assert [r.arm for r in runs[:16]] == ["baseline"] * 16
    assert runs[0].dir == tmp_path / "g" / "ks" / "1pct" / "baseline" / "lr0.001" / "seed0"
    with pytest.raises(ValueError):
        sw.SweepSpec(seeds=[0, 0])
    with pytest.raises(ValueError):
        sw.SweepSpec(splits=["1 percent"])


def test_fit_and_test_commands(tmp_path):
    spec = sw.SweepSpec(
        name="c",
        encoder="conf/encoder/tiny.yaml",
        arms=["baseline", "twin"],
        tasks=["ks"],
        splits=["5%", "10min"],
        seeds=[3],
        lrs=[0.002],
        configs=["conf/trainer/cpu.yaml"],
        args=["--trainer.max_steps=7"],
        task_args={"ks": ["--data.init_args.batch_size=2"]},
        data_root="data/real",
        runs_dir=str(tmp_path),
    )
    base, base_amount, twin, _ = sw.plan(spec)
    cmd = sw.fit_command(spec, twin)
    assert cmd[:4] == [sys.executable, "-m", "rewiring", "fit"]
    assert _configs(cmd) == [
        "conf/base.yaml",
        "conf/encoder/tiny.yaml",
        "conf/tasks/ks.yaml",
        "conf/trainer/cpu.yaml",
    ]
    assert _arg(cmd, "model.init_args.lr_head") == "0.002"
    assert _arg(cmd, "data.init_args.fraction") == "0.05"
    assert _arg(cmd, "data.init_args.split_seed") == "0"
    assert _arg(cmd, "data.init_args.root") == "data/real"
    assert _arg(cmd, "seed_everything") == "3"
    assert _arg(cmd, "model.init_args.encoder.init_args.source") == str(tmp_path / "c" / "encoders" / "twin")
    assert _arg(cmd, "convergence.reference_run") == str(base.dir / "convergence.json")
    save = Path(_arg(cmd, "trainer.logger.init_args.save_dir"))
    assert (
        save / _arg(cmd, "trainer.logger.init_args.name") / _arg(cmd, "trainer.logger.init_args.version")
        == twin.dir
    )
    assert cmd[-2:] == ["--trainer.max_steps=7", "--data.init_args.batch_size=2"]  # the spec's args win
    b = sw.fit_command(spec, base_amount)
    assert _arg(b, "data.init_args.amount") == "10min" and _arg(b, "data.init_args.fraction") is None
    assert _arg(b, "model.init_args.encoder.init_args.source") is None
    assert _arg(b, "convergence.reference_run") is None
    t = commands.test_command(twin.dir, twin.dir / "checkpoints" / "x.ckpt")
    assert t[3] == "test" and _configs(t) == [str(twin.dir / "config.yaml")]
    assert _arg(t, "test_json") == str(twin.dir / "test.json")
    assert _arg(t, "trainer.logger.init_args.version") == "lr0.002/seed3/test"
    assert _arg(t, "trainer.devices") == "1"
    r = commands.rewire_command(spec, "twin")
    assert _configs(r) == ["conf/base.yaml", "conf/encoder/tiny.yaml", "conf/stages/rewire.yaml"]
    assert _arg(r, "data.init_args.pairing") == "twin"
    assert _arg(r, "model.init_args.export_dir") == str(tmp_path / "c" / "encoders" / "twin")
    paper = sw.SweepSpec(
        rewire_configs=["conf/stages/rewire-paper.yaml", "conf/stages/paper/{arm}.yaml"],
        encoders_dir="data/encoders/large-rewired-{arm}",
    )
    r = commands.rewire_command(paper, "mixed")
    assert _configs(r)[2:] == ["conf/stages/rewire-paper.yaml", "conf/stages/paper/mixed.yaml"]
    assert _arg(r, "model.init_args.export_dir") == "data/encoders/large-rewired-mixed"


def test_resume_after_kill(tmp_path, capsys):
    args = _spec_args(tmp_path)
    killer = FakeRunner(kill_at=2)
    assert sw.run_sweep(args, runner=killer) == 130  # interrupted in the second run's fit
    runs = sw.plan(sw.spec_from_config(sw.build_parser().parse_args(args)))
    assert [layout.run_state(r.dir) for r in runs] == ["complete", "resume", "new"]
    (runs[2].dir).mkdir(parents=True)
    (runs[2].dir / "events.out.tfevents.stale").write_text("killed before its first checkpoint")
    assert layout.run_state(runs[2].dir) == "restart"
    capsys.readouterr()

    again = FakeRunner()
    assert sw.run_sweep(args, runner=again) == 0
    kinds = [(c[3], _arg(c, "ckpt_path")) for c in again.calls]
    assert kinds == [
        ("fit", str(runs[1].dir / "checkpoints" / "last.ckpt")),  # resumed from its checkpoint
        ("test", str(runs[1].dir / "checkpoints" / "best.ckpt")),
        ("fit", None),  # restarted from scratch
        ("test", str(runs[2].dir / "checkpoints" / "best.ckpt")),
    ]
    assert _configs(again.calls[0]) == [str(runs[1].dir / "config.yaml")]  # with its saved config
    assert not (runs[2].dir / "events.out.tfevents.stale").exists()  # the stale folder was removed
    out = capsys.readouterr().out
    assert "[1/3] ks 10% baseline lr0.001 seed0: done before" in out
    assert "[2/3] ks 10% baseline lr0.001 seed1: val/acc 0.6 (best 0.6 @ 20), test/acc 0.5, resumed" in out
    assert "3 runs: 2 ran, 1 done before, 0 failed" in out
    assert (tmp_path / "report" / "report.md").exists()
    plan = json.loads((tmp_path / "runs" / "t" / "sweep.json").read_text())
    assert [a["name"] for a in plan["arms"]] == ["baseline"] and len(plan["runs"]) == 3

    third = FakeRunner()
    assert sw.run_sweep(args, runner=third) == 0
    assert third.calls == []  # everything complete: nothing runs


def test_rewiring_stage_runs_once_and_failures_are_reported(tmp_path, capsys):
    args = _spec_args(tmp_path, arms=["baseline", "mixed"], seeds=[0])
    runner = FakeRunner()
    assert sw.run_sweep([*args, "--report", "false"], runner=runner) == 0
    subs = [("rewire" if _arg(c, "model.init_args.export_dir") else c[3]) for c in runner.calls]
    assert subs == ["rewire", "fit", "test", "fit", "test"]
    assert (tmp_path / "rewired" / "mixed" / "config.json").exists()
    capsys.readouterr()

    # `threads` caps the runs (jobs share the machine); the rewiring stage runs alone on every core
    args = _spec_args(tmp_path, name="t3", arms=["baseline", "mixed"], seeds=[0], threads=1,
                      encoders_dir=str(tmp_path / "rewired3"))  # fmt: skip
    runner = FakeRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OMP_NUM_THREADS", raising=False)
        assert sw.run_sweep([*args, "--report", "false"], runner=runner) == 0
    threads = [(bool(_arg(c, "model.init_args.export_dir")), e.get("OMP_NUM_THREADS"))
               for c, e in zip(runner.calls, runner.envs, strict=True)]  # fmt: skip
    assert threads == [(True, None), (False, "1"), (False, "1"), (False, "1"), (False, "1")]
    capsys.readouterr()

    def failing(cmd, log, env):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("Traceback: boom\n")
        return 1

    args2 = _spec_args(tmp_path, name="t2", arms=["baseline"], seeds=[0])
    assert sw.run_sweep([*args2, "--report", "false"], runner=failing) == 1
    out = capsys.readouterr().out
    assert "FAILED: fit failed (exit 1)" in out and "Traceback: boom" in out


def test_jobs_run_baselines_before_rewired_arms(tmp_path, capsys):
    args = _spec_args(tmp_path, arms=["baseline", "twin"], seeds=[0, 1, 2], jobs=2)
    runner = FakeRunner()
    assert sw.run_sweep([*args, "--report", "false"], runner=runner) == 0
    fits = [
        _arg(c, "trainer.logger.init_args.name")
        for c in runner.calls
        if c[3] == "fit" and not _arg(c, "model.init_args.export_dir")
    ]
    assert fits == ["baseline"] * 3 + ["twin"] * 3
    assert "6 runs: 6 ran" in capsys.readouterr().out


def test_a_tasks_first_run_of_an_arm_goes_alone(tmp_path):
    """It fills the arm's feature cache for the task; a sibling beside it would wait on the lock,
    so the other job takes another task's run meanwhile."""
    import threading

    inflight: dict[tuple[str, str], int] = {}
    done: set[tuple[str, str]] = set()
    overlaps = []
    lock = threading.Lock()
    fake = FakeRunner()

    def runner(cmd, log, env):
        if c := _arg(cmd, "trainer.logger.init_args.save_dir"):
            key = (_arg(cmd, "trainer.logger.init_args.name"), Path(c).parent.name)
            with lock:
                if key not in done and inflight.get(key):
                    overlaps.append(key)
                inflight[key] = inflight.get(key, 0) + 1
            time.sleep(0.05)
            with lock:
                inflight[key] -= 1
                done.add(key)
        return fake(cmd, log, env)

    args = _spec_args(tmp_path, tasks=["ks", "ic"], seeds=[0, 1, 2], jobs=2)
    assert sw.run_sweep([*args, "--report", "false"], runner=runner) == 0
    assert not overlaps
    assert len([c for c in fake.calls if c[3] == "fit"]) == 6


def test_missing_baseline_encoder_fails_early(tmp_path):
    conf = tmp_path / "encoder.yaml"
    conf.write_text(
        yaml.safe_dump({"model": {"init_args": {"encoder": {"init_args": {"source": "data/nowhere/tiny"}}}}})
    )
    with pytest.raises(SystemExit, match="does not exist yet"):
        sw.run_sweep(_spec_args(tmp_path, encoder=str(conf)), runner=FakeRunner())


def test_the_baseline_encoder_is_what_its_fit_would_build(tmp_path):
    """Resolved by the CLI's own parser from everything the baseline's fit stacks: a config stacked
    later and an `args` override both win over the encoder config, as they do in the fit."""
    _write_encoder(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    stacked = tmp_path / "stacked.yaml"
    stacked.write_text(yaml.safe_dump({"model": {"init_args": {"encoder": {"init_args": {"source": str(other)}}}}}))

    def source(**over):
        return commands.baseline_source(sw.spec_from_config(sw.build_parser().parse_args(_spec_args(tmp_path, **over))))

    assert source() == str(tmp_path / "encoders" / "base")
    assert source(configs=[str(stacked)]) == str(other)
    hub = "--model.init_args.encoder.init_args.source=facebook/wav2vec2-base"
    assert source(configs=[str(stacked)], args=[hub]) == "facebook/wav2vec2-base"
    # the check before any run follows it: an override naming a missing folder fails early
    missing = f"--model.init_args.encoder.init_args.source={tmp_path / 'nowhere' / 'tiny'}"
    with pytest.raises(SystemExit, match="nowhere/tiny .*does not exist yet"):
        sw.run_sweep(_spec_args(tmp_path, args=[missing]), runner=FakeRunner())
    # one rule for "a local folder": the encoder's (a hub id is "name" or "org/name")
    assert not layout.is_local("facebook/wav2vec2-base") and layout.is_local("data/nowhere/tiny")
    assert layout.is_local(str(other)) and not layout.is_local({"model_type": "wav2vec2"})


def _trainer_callbacks(tmp_path: Path, tiny_corpus: Path, base: dict, *extra: str):
    """The callbacks of the trainer that the sweep's fit of a rewired run builds on `base`."""
    from rewiring.encoder import TINY_CONFIG, SpeechEncoder
    from rewiring.experiment.train import cli_main

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = sw.SweepSpec(
        name="o", base_config=str(tmp_path / "base.yaml"), encoder=str(REPO / "conf/encoder/tiny-random.yaml"),
        arms=["baseline", "twin"], tasks=["ks"], splits=["100%"], seeds=[0], data_root=str(tiny_corpus),
        task_config=str(REPO / "conf/tasks/{task}.yaml"), runs_dir=str(tmp_path / "runs"),
        args=["--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false", *extra],
    )  # fmt: skip
    if not (spec.encoder_dir("twin") / "config.json").exists():
        SpeechEncoder(TINY_CONFIG).save_pretrained(spec.encoder_dir("twin"))
    twin = sw.plan(spec)[-1]
    cmd = sw.fit_command(spec, twin)
    assert cmd[3] == "fit"
    reference = sw.plan(spec)[0].dir / "convergence.json"
    return cli_main(cmd[4:], run=False).trainer.callbacks, str(reference)


def test_the_reference_run_reaches_the_convergence_callback_in_any_callbacks_order(tmp_path, tiny_corpus):
    """The sweep names the ConvergenceCallback's setting by its group, not by its place among
    base.yaml's callbacks; a config that still lists the callback (a run saved before the group
    existed) gets one callback, with the reference."""
    from rewiring.convergence import ConvergenceCallback

    base = yaml.safe_load((REPO / "conf/base.yaml").read_text())
    base["trainer"]["callbacks"].reverse()
    callbacks, reference = _trainer_callbacks(tmp_path, tiny_corpus, base)
    (conv,) = [c for c in callbacks if isinstance(c, ConvergenceCallback)]
    assert conv.reference_run == reference
    legacy = {k: v for k, v in base.items() if k != "convergence"}
    legacy["trainer"]["callbacks"].insert(0, {"class_path": "rewiring.convergence.ConvergenceCallback",
                                              "init_args": {"fractions": [0.5, 1.0]}})  # fmt: skip
    callbacks, reference = _trainer_callbacks(tmp_path, tiny_corpus, legacy)
    (conv,) = [c for c in callbacks if isinstance(c, ConvergenceCallback)]
    assert conv.reference_run == reference and conv.fractions == [0.5, 1.0]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_every_stage_takes_the_convergence_group_and_test_json(subcommand, tmp_path):
    import contextlib
    import io

    from rewiring.experiment.train import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([subcommand, "--config", str(REPO / "conf/base.yaml"), "--config", str(REPO / "conf/encoder/tiny-random.yaml"),
                  "--config", str(REPO / "conf/tasks/ks.yaml"), f"--convergence.reference_run={tmp_path / 'ref'}",
                  f"--test_json={tmp_path / 'test.json'}", "--print_config"])  # fmt: skip
    config = yaml.safe_load(out.getvalue())
    assert config["convergence"]["reference_run"] == str(tmp_path / "ref")
    assert config["test_json"] == str(tmp_path / "test.json")
    assert not any("Convergence" in c["class_path"] for c in config["trainer"]["callbacks"])


def test_index_and_slurm(tmp_path, capsys):
    args = _spec_args(
        tmp_path,
        arms=["baseline", "neutral"],
        seeds=[0, 1],
        slurm={"partition": "gpu", "gpus-per-node": "4", "ntasks-per-node": "4"},
        rewire_slurm={"gpus-per-node": "1"},
    )
    runner = FakeRunner()
    assert sw.run_sweep([*args, "--launcher", "slurm"], runner=runner) == 0
    assert runner.calls == []
    d = tmp_path / "runs" / "t" / "slurm"
    runs_sbatch = (d / "runs.sbatch").read_text()
    assert "#SBATCH --array=0-3" in runs_sbatch and "#SBATCH --gpus-per-node=4" in runs_sbatch
    assert "--index $SLURM_ARRAY_TASK_ID" in runs_sbatch
    rewire_sbatch = (d / "rewire.sbatch").read_text()
    assert "--rewire" in rewire_sbatch and "#SBATCH --gpus-per-node=1" in rewire_sbatch
    submit = (d / "submit.sh").read_text()
    assert "afterok" in submit and "afterany" in submit and "rewiring compare" in submit
    spec = yaml.safe_load((d / "spec.yaml").read_text())
    assert spec["arms"] == ["baseline", "neutral"]

    # what array task 1 does: exactly that run (its own fit and test)
    assert sw.run_sweep(["--config", str(d / "spec.yaml"), "--index", "1"], runner=runner) == 0
    assert [c[3] for c in runner.calls] == ["fit", "test"]
    assert _arg(runner.calls[0], "trainer.logger.init_args.version") == "lr0.001/seed1"


def test_paper_dry_run(tmp_path, capsys):
    assert (
        sw.run_sweep(
            [
                "--config",
                str(REPO / "conf/sweep/paper.yaml"),
                "--dry-run",
                "--runs_dir",
                str(tmp_path / "runs"),
            ],
            runner=FakeRunner(),
        )
        == 0
    )
    out = capsys.readouterr().out
    spec = yaml.safe_load((REPO / "conf/sweep/paper.yaml").read_text())
    lrs = sum(len(spec["task_lrs"].get(t, spec["lrs"])) for t in spec["tasks"])
    n = len(spec["arms"]) * len(spec["splits"]) * len(spec["seeds"]) * lrs
    assert f"= {n} runs" in out
    assert "conf/encoder/wav2vec2-large-lv60.yaml" in out and "conf/trainer/ddp.yaml" in out
    for arm in ("twin", "neutral", "mixed"):
        assert f"rewire {arm}:" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def _paper_spec(*over: str) -> sw.SweepSpec:
    args = ["--config", str(REPO / "conf/sweep/paper.yaml"), *over]
    return sw.spec_from_config(sw.build_parser().parse_args(args))


def test_paper_lr_grid_is_per_task_around_the_s3prl_defaults_the_authors_ran():
    spec = _paper_spec()
    # the authors' s3prl checkout: Adam 1e-4 for asr, ks, ic, sf; 1e-3 for sid and sd (centre of each grid)
    centre = {"asr": 1e-4, "ks": 1e-4, "ic": 1e-4, "sf": 1e-4, "sid": 1e-3, "sd": 1e-3}
    runs = sw.plan(spec)
    for task, lr in centre.items():
        grid = sorted({r.lr for r in runs if r.task == task})
        assert grid == pytest.approx([lr / 2, lr, lr * 2]), task
        # every arm gets the same grid
        assert {r.arm for r in runs if r.task == task and r.lr == grid[1]} == set(spec.arms)
    plan = runners.Sweep(spec, runner=FakeRunner()).plan_json()
    assert plan["task_lrs"]["sid"] == pytest.approx([5e-4, 1e-3, 2e-3])


def test_task_lrs_override_lrs_and_name_the_field_when_wrong(tmp_path, capsys):
    args = _spec_args(tmp_path, tasks=["ks", "sid"], lrs=[0.01], task_lrs={"sid": [0.1, 0.2]}, seeds=[0])
    spec = sw.spec_from_config(sw.build_parser().parse_args(args))
    assert [(r.task, r.lr) for r in sw.plan(spec)] == [("ks", 0.01), ("sid", 0.1), ("sid", 0.2)]
    assert sw.run_sweep([*args, "--dry-run"], runner=FakeRunner()) == 0
    out = capsys.readouterr().out
    assert "1-2 lrs" in out and "lrs sid: 0.1, 0.2" in out and "= 3 runs" in out
    # a known task outside this sweep's tasks is fine (a spec narrowed with --tasks keeps its grids)
    narrowed = sw.spec_from_config(sw.build_parser().parse_args([*args, "--tasks", "[ks]"]))
    assert narrowed.lrs_for("ks") == [0.01]
    for bad, word in (
        ({"sdi": [0.1]}, "unknown task 'sdi'"),
        ({"sid": []}, "task_lrs.sid"),
        ({"sid": [-1.0]}, "task_lrs.sid"),
    ):
        with pytest.raises(SystemExit):
            sw.run_sweep([*_spec_args(tmp_path, task_lrs=bad), "--dry-run"], runner=FakeRunner())
        err = capsys.readouterr().err
        assert "task_lrs" in err and word in err


def test_paper_rewiring_runs_in_fp32_unless_asked_for_bf16(monkeypatch):
    """The sweep's rewiring command resolved by the real CLI: the recipe's fp32 survives the trainer config."""
    import contextlib
    import io

    from rewiring.experiment.train import cli_main

    monkeypatch.chdir(REPO)

    def resolved(spec: sw.SweepSpec) -> dict:
        cmd = commands.rewire_command(spec, "neutral")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            cli_main([*cmd[3:], "--print_config"])
        return yaml.safe_load(out.getvalue())["trainer"]

    trainer = resolved(_paper_spec())
    assert trainer["precision"] == "32-true" and trainer["accelerator"] == "gpu" and trainer["devices"] == 1
    assert "conf/trainer/ddp.yaml" not in commands.rewire_command(_paper_spec(), "neutral")  # `configs` stay out
    bf16 = _paper_spec("--rewire_args", "[--trainer.precision=bf16-mixed]")
    assert resolved(bf16)["precision"] == "bf16-mixed"


def test_demo_spec_is_valid():
    spec = sw.spec_from_config(sw.build_parser().parse_args(["--config", str(REPO / "conf/sweep/demo.yaml")]))
    assert set(spec.tasks) == set(ALL_TASKS) and {"baseline", "twin", "neutral"} <= set(spec.arms)
    assert len(spec.splits) >= 2 and len(spec.seeds) >= 3 and len(spec.lrs) == 1
    assert spec.encoder == "conf/encoder/whisper-tiny.en.yaml"  # a genuinely pre-trained baseline
    tiny = sw.spec_from_config(sw.build_parser().parse_args(["--config", str(REPO / "conf/sweep/demo-tiny.yaml")]))
    assert tiny.encoder == "conf/encoder/tiny.yaml" and tiny.name == "demo-tiny"


# ---------------------------------------------------------------------------- real processes (slow)
TOY = '''
"""A toy task, data module and rewiring stage (no audio) for the sweep's process-level test."""
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class ToyEncoder(torch.nn.Module):
    def __init__(self, source: str = "toy"):
        super().__init__()
        self.source = source
        self.lin = torch.nn.Linear(1, 1)


class ToyTask(pl.LightningModule):
    primary_metric = "val/acc"
    metric_mode = "max"

    def __init__(self, encoder: ToyEncoder, lr_head: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.lr_head = lr_head
        self.rate = 2.0 if "rewired" in str(encoder.source) else 1.0

    def _acc(self):
        return 1.0 - 0.5 ** (self.rate * self.global_step / 4)

    def on_train_batch_start(self, batch, _):
        if os.environ.get("TOY_DIE_AT") == str(self.global_step):
            os._exit(3)  # killed, right after the checkpoint of the previous validation

    def training_step(self, batch, _):
        return self.encoder.lin(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val/acc", self._acc())

    def test_step(self, batch, _):
        self.log("test/acc", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr_head)

    def configure_callbacks(self):
        return [ModelCheckpoint(monitor="val/acc", mode="max", save_last=True)]


class ToyData(pl.LightningDataModule):
    def __init__(self, root: str = "", fraction: float | None = None, amount: str | None = None,
                 split_seed: int = 0):
        super().__init__()

    def _dl(self):
        return DataLoader(TensorDataset(torch.randn(8, 1)), batch_size=4)

    train_dataloader = val_dataloader = test_dataloader = _dl


class ToyRewire(pl.LightningModule):
    def __init__(self, encoder: ToyEncoder, export_dir: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.export_dir = export_dir

    def training_step(self, batch, _):
        return self.encoder.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self):
        out = Path(self.export_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "isotropy.json").write_text(json.dumps({"before": {"isoscore": 0.1}, "after": {"isoscore": 0.3}}))


class ToyPairs(ToyData):
    def __init__(self, pairing: str = "neutral"):
        super().__init__()
'''


@pytest.mark.slow
def test_toy_sweep_in_real_processes(tmp_path, monkeypatch, capsys):
    """Rewiring stage + 2 runs as real `python -m rewiring` processes over conf/base.yaml's trainer and
    callbacks (only the model class is the toy's), then a rerun that skips everything."""
    (tmp_path / "sweeptoy.py").write_text(TOY)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the sweep parses the baseline's configs itself
    base = yaml.safe_load((REPO / "conf/base.yaml").read_text())
    base["model"]["class_path"] = "sweeptoy.ToyTask"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "encoder.yaml").write_text(
        textwrap.dedent(f"""
        model:
          init_args:
            encoder: {{class_path: sweeptoy.ToyEncoder, init_args: {{source: {tmp_path / "base_enc"}}}}}
    """)
    )
    (tmp_path / "base_enc").mkdir()
    (tmp_path / "base_enc" / "config.json").write_text("{}")
    (tmp_path / "ks.yaml").write_text(
        textwrap.dedent("""
        model: {class_path: sweeptoy.ToyTask}
        data: {class_path: sweeptoy.ToyData}
        trainer: {accelerator: cpu, max_steps: 12, val_check_interval: 4, limit_val_batches: 1, limit_test_batches: 1}
    """)
    )
    (tmp_path / "rewire.yaml").write_text(
        textwrap.dedent("""
        model: {class_path: sweeptoy.ToyRewire}
        data: {class_path: sweeptoy.ToyPairs}
        trainer: {accelerator: cpu, max_steps: 2, limit_val_batches: 0}
    """)
    )
    args = _spec_args(
        tmp_path,
        arms=["baseline", "neutral"],
        seeds=[0],
        base_config=str(tmp_path / "base.yaml"),
        encoder=str(tmp_path / "encoder.yaml"),
        task_config=str(tmp_path / "{task}.yaml"),
        rewire_configs=[str(tmp_path / "rewire.yaml")],
        threads=1,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOY_DIE_AT", "8")  # every fit dies at step 8, after the checkpoint at 8
    assert sw.run_sweep([*args, "--report", "false"]) == 1
    out = capsys.readouterr().out
    assert "rewiring neutral: encoder in" in out and out.count("FAILED: fit failed (exit 3)") == 2
    runs = sw.plan(sw.spec_from_config(sw.build_parser().parse_args(args)))
    assert [layout.run_state(r.dir) for r in runs] == ["resume", "resume"]

    monkeypatch.delenv("TOY_DIE_AT")
    assert sw.run_sweep(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "rewiring" not in out.split("\n", 1)[1].split("[1/2]")[0]  # the encoder exists: no second rewiring
    assert "[2/2] ks 10% neutral lr0.001 seed0: val/acc" in out and out.count("resumed") == 2
    run = tmp_path / "runs" / "t" / "ks" / "10pct" / "neutral" / "lr0.001" / "seed0"
    conv = json.loads((run / "convergence.json").read_text())
    assert conv["curve"]["steps"] == [4, 8, 12]  # the curve before the kill came back from the checkpoint
    assert conv["curve"]["seconds"] == sorted(conv["curve"]["seconds"])
    assert conv["reference"]["source"].endswith("baseline/lr0.001/seed0/convergence.json")
    assert conv["reach"]["1"]["step"] == 8  # twice as fast as the baseline, which gets there at 12
    assert json.loads((run / "test.json").read_text())["metrics"] == {"test/acc": 0.5}
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["version"]
        == "lr0.001/seed0"
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| 10% | neutral | 0.001 / 0.001 |" in report
    assert (tmp_path / "report" / "isotropy.png").exists()

    rerun = FakeRunner()
    assert sw.run_sweep([*args, "--report", "false"], runner=rerun) == 0
    assert rerun.calls == []


@pytest.mark.slow
def test_real_task_sweep(tiny_corpus, tmp_path, capsys):
    """One real task (ks, tiny corpus, a tiny encoder folder) through fit and test processes; the
    test process rebuilds the frozen encoder that the SUPERB checkpoint leaves out."""
    from rewiring.encoder import TINY_CONFIG, SpeechEncoder

    folder = SpeechEncoder(TINY_CONFIG).save_pretrained(tmp_path / "encoders" / "tiny")
    encoder = tmp_path / "tiny.yaml"
    encoder.write_text(yaml.safe_dump({"model": {"init_args": {"encoder": {
        "class_path": "rewiring.encoder.SpeechEncoder", "init_args": {"source": str(folder)}}}}}))  # fmt: skip
    args = _spec_args(
        tmp_path,
        encoder=str(encoder),
        seeds=[0],
        splits=["50%"],
        base_config=str(REPO / "conf/base.yaml"),
        task_config=str(REPO / "conf/tasks/{task}.yaml"),
        data_root=str(tiny_corpus),
        threads=1,
        args=[
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.accelerator=cpu",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            f"--model.init_args.feature_cache={tmp_path / 'features'}",
        ],
    )
    assert sw.run_sweep([*args, "--report", "false"]) == 0, capsys.readouterr().out
    assert list((tmp_path / "features").rglob("*.safetensors"))  # the fit filled the cache, the test read it
    run = tmp_path / "runs" / "t" / "ks" / "50pct" / "baseline" / "lr0.001" / "seed0"
    conv = json.loads((run / "convergence.json").read_text())
    assert conv["metric"] == "val/acc" and conv["curve"]["steps"] == [2, 4]
    tested = json.loads((run / "test.json").read_text())
    assert "test/acc" in tested["metrics"]
    assert not (run / "test.log").exists()  # the fit tested itself (--test_json): one process a run
    best = run / conv["checkpoint"]["best"]
    assert "frozen_encoder" in torch.load(best, map_location="cpu", weights_only=False)
    # Without the fit's own test (a DDP fit, or one killed while testing) the sweep runs a test
    # process on the best checkpoint, and it measures the same.
    (run / "test.json").unlink()
    assert sw.run_sweep([*args, "--report", "false"]) == 0, capsys.readouterr().out
    assert (run / "test.log").exists()
    assert json.loads((run / "test.json").read_text())["metrics"] == tested["metrics"]


def test_describe_reads_run_files(tmp_path):
    (tmp_path / "convergence.json").write_text(
        json.dumps({"metric": "val/wer", "final": {"value": 0.41234}, "best": {"value": 0.4, "step": 60}})
    )
    (tmp_path / "test.json").write_text(json.dumps({"metrics": {"test/wer": 0.45}}))
    assert runners.describe(tmp_path) == "val/wer 0.4123 (best 0.4 @ 60), test/wer 0.45"
    assert runners.describe(tmp_path / "nothing") == "no metrics"
    conv = json.loads((tmp_path / "convergence.json").read_text())
    (tmp_path / "convergence.json").write_text(json.dumps({**conv, "notes": {"feature_cache": "on"}}))
    assert runners.describe(tmp_path) == "val/wer 0.4123 (best 0.4 @ 60), test/wer 0.45"
    (tmp_path / "convergence.json").write_text(json.dumps({**conv, "notes": {"feature_cache": "off: 1 GB free"}}))
    assert runners.describe(tmp_path).endswith("test/wer 0.45, ENCODED LIVE (feature cache off: 1 GB free)")
