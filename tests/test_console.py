"""What the console shows: progress in steps, the metrics that matter, a summary line, no noise."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from rewiring.console import StepProgressBar
from rewiring.experiment.train import LightningNoise, frozen_eval_modules

REPO = Path(__file__).resolve().parents[1]

# What a short KS fit showed before (issue 14, item 7), none of it useful to a user.
NOISE = [
    "💡 Tip",
    "litlogger",
    "litmodels",
    "configure_callbacks",
    "module(s) in eval mode",
    "v_num",
    "/-2",  # "Epoch 0/-2": max_epochs -1 shown as an epoch count
]


def test_a_short_ks_fit_piped_to_a_log_shows_progress_and_a_summary_and_no_noise(tiny_corpus, tmp_path):
    """The real command, its output piped (not a terminal), as in a log file or a sweep's fit.log."""
    runs = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "rewiring", "fit",
        "--config", str(REPO / "conf/base.yaml"),
        "--config", str(REPO / "conf/encoder/tiny-random.yaml"),
        "--config", str(REPO / "conf/tasks/ks.yaml"),  # the SUPERB protocol: a frozen encoder
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={runs}",
        f"--data.init_args.root={tiny_corpus}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        f"--model.init_args.feature_cache={tmp_path / 'features'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the console:\n{out}"
    run_dir = runs / "ks" / "version_0"
    assert (run_dir / "convergence.json").exists()
    lines = out.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [p.split(",")[0] for p in progress] == [f"step {k}/4 ({25 * k}%)" for k in (1, 2, 3, 4)], out
    assert "train/loss" in progress[0] and "val/acc" in progress[-1]  # the dev metric once validated
    summary = [line for line in lines if line.startswith("KeywordSpotting: best val/acc ")]
    assert len(summary) == 1, out
    assert " at step " in summary[0] and summary[0].endswith(f"; run folder {run_dir}")


class Tiny(pl.LightningModule):
    primary_metric = "val/acc"

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, bar: StepProgressBar, max_steps: int = 10) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=max_steps, max_epochs=-1, val_check_interval=5, check_val_every_n_epoch=None,
        limit_val_batches=1, callbacks=[bar], logger=TensorBoardLogger(tmp_path, name="t"),
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Tiny(), data, data)


def test_the_bar_counts_steps_of_the_whole_run_across_epochs(tmp_path, capsys):
    _fit(tmp_path, StepProgressBar(tty=True))  # 3 batches an epoch, 10 steps
    out = capsys.readouterr().out
    assert "steps: 100%" in out and "10/10" in out
    assert "val/acc=0.5" in out and "train/loss=" in out
    assert "v_num" not in out and "Epoch" not in out


def test_piped_progress_is_a_line_every_n_steps(tmp_path, capsys):
    _fit(tmp_path, StepProgressBar(every_n_steps=4))  # capsys's stdout is not a terminal
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [x.split(",")[0] for x in lines] == ["step 4/10 (40%)", "step 8/10 (80%)", "step 10/10 (100%)"]
    assert "about" in lines[0] and "left" in lines[0] and "left" not in lines[-1]
    assert lines[-1].endswith("val/acc 0.5")


def test_eval_mode_counts_as_intended_only_inside_a_frozen_part():
    encoder = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    model = torch.nn.ModuleDict(
        {"encoder": encoder, "head": torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))}
    )
    assert frozen_eval_modules(model) is None  # nothing in eval mode
    encoder.requires_grad_(False).eval()
    assert frozen_eval_modules(model) == 3  # the frozen encoder and its two layers
    model["head"][1].eval()  # a head's dropout left in eval mode: a real warning
    assert frozen_eval_modules(model) is None
    model["head"][1].train()
    encoder.requires_grad_(True)  # in eval mode but training: a real warning
    assert frozen_eval_modules(model) is None


def test_the_eval_mode_filter_is_for_that_count_only(recwarn):
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    def lightning_says(n: int) -> None:  # as lightning.pytorch.loops.fit_loop words it
        rank_zero_warn(
            f"Found {n} module(s) in eval mode at the start of training. This may lead to unexpected behavior "
            "during training. If this is intentional, you can ignore this warning.",
            category=PossibleUserWarning,
        )

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings(
            "ignore", message=r"Found 3 module\(s\) in eval mode at the start of training"
        )
        lightning_says(3)
        lightning_says(4)
    assert [str(w.message).split(" in eval")[0] for w in seen] == ["Found 4 module(s)"]


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1, message, None, None
    )


def test_lightning_noise_drops_the_tips_and_the_default_override_notice_only():
    noise = LightningNoise(configured={"LearningRateMonitor", "EarlyStopping"})
    tip = (
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
        "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics"
    )
    notice = (
        "The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
        "callbacks passed to Trainer: {}"
    )
    assert not noise.filter(_record(tip))
    assert not noise.filter(_record(notice.format("ModelCheckpoint")))  # Lightning's default checkpoint
    assert noise.filter(_record(notice.format("EarlyStopping, ModelCheckpoint")))  # the config's: news
    assert noise.filter(_record("GPU available: False, used: False"))
    assert noise.filter(_record("`Trainer.fit` stopped: `max_steps=4` reached."))
