"""Convergence measures on synthetic curves whose answers are known, and the callback in a tiny Trainer."""

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from rewiring.convergence import (
    ConvergenceCallback,
    Curve,
    TestResults,
    area,
    best,
    steps_to_reach,
    summarize,
    threshold,
)

STEPS = [10, 20, 30, 40, 50]
ACC = [0.2, 0.5, 0.7, 0.65, 0.9]
WER = [80.0, 50.0, 30.0, 35.0, 20.0]


def test_threshold_max_and_min():
    assert threshold(0.9, 0.8, "max") == pytest.approx(0.72)
    assert threshold(20.0, 0.8, "min") == pytest.approx(25.0)  # 80% of a WER of 20 is a WER of 25
    assert threshold(20.0, 1.0, "min") == 20.0
    with pytest.raises(ValueError):
        threshold(1.0, 0.0, "max")
    with pytest.raises(ValueError):
        threshold(1.0, 0.5, "up")


def test_steps_to_reach_max_metric():
    assert steps_to_reach(STEPS, ACC, 0.8, "max", 0.8) == 30  # 0.64
    assert steps_to_reach(STEPS, ACC, 0.8, "max", 0.9) == 50  # 0.72: 0.7 is not enough, the dip too
    assert steps_to_reach(STEPS, ACC, 0.8, "max", 1.0) == 50
    assert steps_to_reach(STEPS, ACC, 0.95, "max", 1.0) is None
    assert steps_to_reach(STEPS, [0.1, math.nan, 0.3, 0.3, 0.3], 0.2, "max") == 30  # NaN never counts


def test_steps_to_reach_min_metric():
    assert steps_to_reach(STEPS, WER, 25.0, "min", 0.8) == 30  # <= 31.25
    assert steps_to_reach(STEPS, WER, 25.0, "min", 0.9) == 50  # <= 27.78
    assert steps_to_reach(STEPS, WER, 25.0, "min", 1.0) == 50
    assert steps_to_reach(STEPS, WER, 10.0, "min", 1.0) is None
    assert steps_to_reach([1.5, 3.0, 4.5, 6.0, 7.5], WER, 25.0, "min", 0.8) == 4.5  # seconds too


def test_area_is_normalised_mean():
    # trapezoids: 3.5 + 6 + 6.75 + 7.75 = 24 over a span of 40
    assert area(STEPS, ACC) == pytest.approx(0.6)
    # extended flat to the budget: (24 + 0.9 * 10) / 50
    assert area(STEPS, ACC, end=60) == pytest.approx(0.66)
    assert area([10], [0.3]) == pytest.approx(0.3)
    assert area([], []) is None
    # equal curves at twice the step count give the same area: the span normalises it
    assert area([s * 2 for s in STEPS], ACC) == pytest.approx(0.6)


def test_best():
    assert best(STEPS, ACC, "max") == (0.9, 50)
    assert best(STEPS, WER, "min") == (20.0, 50)
    assert best(STEPS, [0.5, 0.7, 0.7, 0.1, 0.2], "max") == (0.7, 20)  # first of a tie
    assert best([], [], "max") is None


def test_summarize_known_curve():
    curve = Curve(STEPS, [1.0, 2.0, 3.0, 4.0, 5.0], ACC)
    s = summarize(curve, "max", reference=0.8, area_end=50)
    assert s["final"] == {"value": 0.9, "step": 50, "seconds": 5.0}
    assert s["best"] == {"value": 0.9, "step": 50, "seconds": 5.0}
    assert s["area"] == pytest.approx(0.6)
    assert s["reach"]["0.8"] == {"threshold": pytest.approx(0.64), "step": 30, "seconds": 3.0}
    assert s["reach"]["0.95"]["step"] == 50
    own = summarize(curve, "max")  # no reference: the run's own final value
    assert own["reference_value"] == 0.9
    assert own["reach"]["1"]["step"] == 50
    assert own["reach"]["0.8"]["step"] == 50  # 0.72: neither 0.7 nor the dip to 0.65 reach it
    empty = summarize(Curve(), "min", reference=None)
    assert empty["final"]["value"] is None and empty["reach"]["0.9"]["step"] is None


def test_curve_replaces_same_step():
    c = Curve()
    c.add(10, 1.0, 0.1)
    c.add(10, 1.5, 0.2)
    c.add(20, 2.0, 0.3)
    assert c.steps == [10, 20] and c.values == [0.2, 0.3]


# ---------------------------------------------------------------------------- through a Trainer
class Scripted(pl.LightningModule):
    """Logs a scripted dev metric at each validation, like a TaskModule declaring its metric."""

    primary_metric = "val/acc"
    metric_mode = "max"

    def __init__(self, script: list[float]):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        self.script = script

    def training_step(self, batch, _):
        return self.w(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        pass

    def on_validation_epoch_end(self):
        i = min(self.global_step // 10, len(self.script)) - 1
        self.log("val/acc", self.script[max(i, 0)])

    def test_step(self, batch, _):
        self.log("test/acc", 0.75)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _loader(self):
        return DataLoader(TensorDataset(torch.randn(16, 1)), batch_size=4)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


def _trainer(tmp_path, max_steps, callback, version="run"):
    return pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="toy", version=version, default_hp_metric=False),
        callbacks=[callback, ModelCheckpoint(monitor="val/acc", mode="max", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_callback_writes_convergence_json(tmp_path):
    ref = tmp_path / "baseline.json"
    ref.write_text(json.dumps({"final": {"value": 0.8}}))
    trainer = _trainer(tmp_path, 50, ConvergenceCallback(reference_run=str(ref)))
    trainer.fit(Scripted(ACC))
    out = json.loads((tmp_path / "toy" / "run" / "convergence.json").read_text())
    assert out["metric"] == "val/acc" and out["mode"] == "max"
    assert out["curve"]["steps"] == STEPS
    assert out["curve"]["values"] == pytest.approx(ACC)
    assert out["curve"]["seconds"] == sorted(out["curve"]["seconds"])
    assert out["best"]["value"] == pytest.approx(0.9) and out["best"]["step"] == 50
    assert out["reference"] == {"value": pytest.approx(0.8), "source": str(ref)}
    assert out["reach"]["0.8"]["step"] == 30 and out["reach"]["0.9"]["step"] == 50
    assert out["reach"]["0.8"]["seconds"] == out["curve"]["seconds"][2]
    assert out["area"] == pytest.approx(0.6)
    assert (
        out["checkpoint"]["best"].startswith("checkpoints/")
        and out["checkpoint"]["last"] == "checkpoints/last.ckpt"
    )
    # the seconds series in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "toy" / "run"))
    events.Reload()
    assert "walltime_ms/val/acc" in events.Tags()["scalars"]
    assert len(events.Scalars("walltime_ms/val/acc")) == 5


def test_callback_test_results_and_fallback_monitor(tmp_path):
    class Undeclared(Scripted):
        primary_metric = None

    trainer = _trainer(tmp_path, 20, ConvergenceCallback(monitor="val/acc", mode="max", reference=0.4))
    trainer.fit(Undeclared(ACC))
    out = json.loads((tmp_path / "toy" / "run" / "convergence.json").read_text())
    assert out["metric"] == "val/acc" and out["reach"]["1"]["step"] == 20
    tester = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[TestResults(str(tmp_path / "test.json"))],
        enable_progress_bar=False,
        limit_test_batches=1,
    )
    tester.test(Undeclared(ACC))
    assert json.loads((tmp_path / "test.json").read_text())["metrics"] == {"test/acc": 0.75}


def test_callback_off_without_metric(tmp_path):
    class Silent(Scripted):
        primary_metric = None

    trainer = _trainer(tmp_path, 10, ConvergenceCallback())
    trainer.fit(Silent(ACC))
    assert not (tmp_path / "toy" / "run" / "convergence.json").exists()


def test_callback_writes_nothing_under_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        callbacks=[ConvergenceCallback()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Scripted(ACC))
    assert list(tmp_path.iterdir()) == []


def test_callback_resumes_curve_from_checkpoint(tmp_path):
    first = _trainer(tmp_path, 30, ConvergenceCallback(), version="r")
    first.fit(Scripted(ACC))
    last = tmp_path / "toy" / "r" / "checkpoints" / "last.ckpt"
    assert last.exists()
    (tmp_path / "toy" / "r" / "convergence.json").unlink()  # as if killed before the end
    second = _trainer(tmp_path, 50, ConvergenceCallback(), version="r")
    second.fit(Scripted(ACC), ckpt_path=str(last))
    out = json.loads((tmp_path / "toy" / "r" / "convergence.json").read_text())
    assert out["curve"]["steps"] == STEPS
    assert out["curve"]["values"] == pytest.approx(ACC)
    assert out["curve"]["seconds"] == sorted(out["curve"]["seconds"])
