"""`python -m rewiring --help` lists every command, and each non-training command has its own help."""

from __future__ import annotations

from pathlib import Path

import pytest

from rewiring.experiment.cli import main


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "prepare", "synthesize", "isotropy", "sweep", "compare", "bench"):
        assert f"  {command} " in out


@pytest.mark.parametrize("command", ["prepare", "synthesize", "isotropy", "compare", "bench", "sweep"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["frobnicate"])
    assert done.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


# ---------------------------------------------------------------- run folders (issue 14, item 5)
REPO = Path(__file__).resolve().parents[1]


def test_bench_runs_python_m_benchmarks_in_the_checkout(monkeypatch, tmp_path):
    """The product never imports the benchmarks: `rewiring bench` runs them as a process, in the checkout."""
    import subprocess

    from rewiring.experiment import commands

    calls = []

    def run(cmd, cwd, check):
        calls.append((cmd, cwd))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(commands.subprocess, "run", run)
    main(["bench", "--out", str(tmp_path / "out"), "--quick", "true", "--sections", "[gpu,features]"])
    ((cmd, cwd),) = calls
    assert cmd[1:] == ["-m", "benchmarks", "--out", str(tmp_path / "out"), "--quick", "true",
                       "--sections", "[gpu,features]"]  # fmt: skip
    assert Path(cwd) == REPO and (REPO / "benchmarks" / "__main__.py").is_file()


def test_bench_without_the_checkout_says_where_to_run_it(monkeypatch):
    from rewiring.experiment import commands

    monkeypatch.setattr(commands, "checkout_root", lambda: None)  # an installed copy
    with pytest.raises(SystemExit) as done:
        main(["bench"])
    assert "rewiring bench needs the source checkout" in str(done.value) and "python -m benchmarks" in str(done.value)


def _rewire_cli(tmp_path: Path, *extra: str):
    from rewiring.experiment.train import cli_main

    return cli_main(
        [
            "--config", str(REPO / "conf/base.yaml"),
            "--config", str(REPO / "conf/encoder/tiny-random.yaml"),
            "--config", str(REPO / "conf/stages/rewire.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--model.init_args.isotropy_manifest=null",
            "--data.init_args.synthesizer=rewiring.synthesis.EspeakSynthesizer",
            *extra,
        ],
        run=False,
    )  # fmt: skip


def test_the_rewiring_run_folder_is_named_after_the_pairing(tmp_path):
    cli = _rewire_cli(tmp_path, "--data.init_args.pairing=twin")
    assert Path(cli.trainer.log_dir) == tmp_path / "runs" / "rewire" / "twin"
    # a version given (as the sweep gives its own) is kept
    cli = _rewire_cli(tmp_path, "--data.init_args.pairing=mixed", "--trainer.logger.init_args.version=mine")
    assert Path(cli.trainer.log_dir) == tmp_path / "runs" / "rewire" / "mine"


def test_a_rerun_never_overwrites_a_runs_config_and_a_resume_stays_in_its_folder(task_cli, tiny_corpus, tmp_path, capsys):
    from rewiring.experiment.train import cli_main

    short = ["--trainer.fast_dev_run=false", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
             "--trainer.limit_val_batches=1", "--trainer.logger.init_args.version=v"]  # fmt: skip
    first = task_cli("ks", tiny_corpus, *short)
    run = tmp_path / "runs" / "ks" / "v"
    assert Path(first.trainer.log_dir) == run
    config = (run / "config.yaml").read_text()

    again = task_cli("ks", tiny_corpus, *short, "--seed_everything=1")
    assert Path(again.trainer.log_dir) == tmp_path / "runs" / "ks" / "v_1"  # beside it, said so
    assert (run / "config.yaml").read_text() == config  # the earlier run's config is untouched
    out = capsys.readouterr().out
    assert f"{run} holds an earlier run (its config.yaml); this one goes to {run.parent / 'v_1'}" in out
    assert f"--ckpt_path {run / 'checkpoints' / 'last.ckpt'}" in out

    resumed = cli_main(
        ["fit", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
         "--trainer.max_steps=4"]
    )  # fmt: skip
    assert Path(resumed.trainer.log_dir) == run and resumed.trainer.global_step == 4
    assert not (run.parent / "v_2").exists()
