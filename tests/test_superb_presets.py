"""s3prl's SUPERB recipes as presets (conf/tasks/superb/*.yaml): their resolved values, each one end to
end on the tiny embedded corpus, the paper sweep stacking them, SpecAugment and the class-balanced sampler."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import WeightedRandomSampler

from rewiring.audio import BucketBatchSampler
from rewiring.experiment.train import cli_main
from tasks.ctc import CTCHead
from tasks.specaug import SpecAugment

REPO = Path(__file__).resolve().parents[1]
TASKS = ["asr", "ks", "ic", "sid", "sd", "sf"]


def preset(task: str) -> str:
    return str(REPO / f"conf/tasks/superb/{task}.yaml")


def _print_config(*configs: str, args: tuple[str, ...] = ()) -> dict:
    out = io.StringIO()
    cmd = ["fit", "--config", str(REPO / "conf/base.yaml")]
    for c in configs:
        cmd += ["--config", c]
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([*cmd, *args, "--print_config"])
    return yaml.safe_load(out.getvalue())


def resolved(task: str) -> dict:
    """The paper encoder, the task config, then its SUPERB preset: the config a run would save."""
    return _print_config(
        str(REPO / "conf/encoder/wav2vec2-large-lv60.yaml"),
        str(REPO / f"conf/tasks/{task}.yaml"),
        preset(task),
    )


def get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg[key]
    return cfg


SPECAUG = {
    "class_path": "tasks.specaug.SpecAugment",
    "init_args": {
        "time_warp_window": 5,
        "num_freq_mask": 4,
        "freq_mask_width_range": [0, 50],
        "num_time_mask": 2,
        "time_mask_width_range": [0, 40],
    },
}
# s3prl's downstream configs as the authors' checkout (YangHao97/rewireW2V2) has them. The dev interval
# is counted in training batches (Lightning's val_check_interval): s3prl's eval_step x accumulation.
EXPECTED: dict[str, dict[str, object]] = {
    "asr": {
        "model.init_args.projector_dim": 1024, "model.init_args.lstm_hidden": 1024,
        "model.init_args.lstm_layers": 2, "model.init_args.dropout": 0.2, "model.init_args.lr_head": 1e-4,
        "model.init_args.specaug": SPECAUG, "data.init_args.batch_size": 32,
        "trainer.max_steps": 200000, "trainer.val_check_interval": 1000, "trainer.accumulate_grad_batches": 1,
    },
    "ks": {
        "model.init_args.projector_dim": 256, "model.init_args.dropout": 0.0, "model.init_args.lr_head": 1e-4,
        "data.init_args.batch_size": 32, "data.init_args.class_balanced": True,
        "data.init_args.bucket_by_length": False,
        "trainer.max_steps": 200000, "trainer.val_check_interval": 500, "trainer.accumulate_grad_batches": 1,
    },
    "ic": {
        "model.init_args.projector_dim": 256, "model.init_args.dropout": 0.0, "model.init_args.lr_head": 1e-4,
        "data.init_args.batch_size": 32,
        "trainer.max_steps": 200000, "trainer.val_check_interval": 500, "trainer.accumulate_grad_batches": 1,
    },
    "sid": {
        "model.init_args.projector_dim": 256, "model.init_args.dropout": 0.0, "model.init_args.lr_head": 1e-3,
        "data.init_args.batch_size": 8, "data.init_args.train_max_seconds": 8.0,
        "data.init_args.max_seconds": None, "data.init_args.class_balanced": False,
        "trainer.max_steps": 100000, "trainer.val_check_interval": 4000, "trainer.accumulate_grad_batches": 4,
    },
    "sd": {
        "model.init_args.lstm_hidden": 512, "model.init_args.lstm_layers": 1, "model.init_args.lr_head": 1e-3,
        "data.init_args.batch_size": 8, "data.init_args.num_speakers": 2, "data.init_args.crop_seconds": 40.0,
        "data.init_args.max_seconds": None,
        "trainer.max_steps": 30000, "trainer.val_check_interval": 400, "trainer.accumulate_grad_batches": 4,
    },
    "sf": {
        "model.init_args.projector_dim": 1024, "model.init_args.lstm_hidden": 1024,
        "model.init_args.lstm_layers": 2, "model.init_args.dropout": 0.2, "model.init_args.lr_head": 1e-4,
        "model.init_args.specaug": SPECAUG, "data.init_args.batch_size": 32,
        "trainer.max_steps": 200000, "trainer.val_check_interval": 1000, "trainer.accumulate_grad_batches": 1,
    },
}  # fmt: skip
# The authors' eval_step (optimizer steps) per task: val_check_interval / accumulate_grad_batches.
AUTHORS_EVAL_STEP = {"asr": 1000, "ks": 500, "ic": 500, "sid": 1000, "sd": 100, "sf": 1000}


@pytest.mark.parametrize("task", TASKS)
def test_preset_resolves_to_the_authors_s3prl_recipe(task):
    cfg = resolved(task)
    for dotted, value in EXPECTED[task].items():
        assert get(cfg, dotted) == value, dotted
    model, trainer = cfg["model"]["init_args"], cfg["trainer"]
    assert model["protocol"] == "superb"
    # s3prl's TorchOptim Adam gets the lr alone: no weight decay left over from the task config's AdamW
    assert model["optimizer"]["class_path"] == "torch.optim.Adam"
    assert model["optimizer"]["init_args"]["weight_decay"] == 0.0
    assert trainer["gradient_clip_val"] == 1.0 and trainer["gradient_clip_algorithm"] == "norm"
    assert trainer["val_check_interval"] / trainer["accumulate_grad_batches"] == AUTHORS_EVAL_STEP[task]
    # steps rule, as in s3prl: no epoch limit, dev by step count
    assert trainer["max_epochs"] == -1 and trainer["check_val_every_n_epoch"] is None
    assert model["early_stopping_patience"] is None  # s3prl trains to total_steps


@pytest.mark.parametrize("task", TASKS)
def test_task_configs_alone_keep_the_light_demo_heads(task):
    """Without the preset nothing changes: no projector, no SpecAugment, AdamW, no accumulation or clipping."""
    cfg = _print_config(str(REPO / "conf/encoder/tiny-random.yaml"), str(REPO / f"conf/tasks/{task}.yaml"))
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert model.get("projector_dim") is None and model.get("specaug") is None
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW" and model["lr_head"] == 1e-3
    assert data.get("class_balanced", False) is False and data["bucket_by_length"] is True
    assert trainer["accumulate_grad_batches"] == 1 and trainer["gradient_clip_val"] is None


def test_paper_sweep_stacks_each_tasks_preset(monkeypatch):
    """conf/sweep/paper.yaml: task config, then its preset, then the trainer config; the lr grid still wins."""
    from rewiring.experiment import sweep as sw

    monkeypatch.chdir(REPO)
    spec = sw.spec_from_config(sw.build_parser().parse_args(["--config", "conf/sweep/paper.yaml"]))
    runs = {r.task: r for r in sw.plan(spec) if r.arm == "baseline" and r.split == "100%" and r.seed == 0}
    assert set(runs) == set(TASKS)
    for task, run in runs.items():
        cmd = sw.fit_command(spec, run)
        configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        assert configs[2:] == [
            f"conf/tasks/{task}.yaml",
            f"conf/tasks/superb/{task}.yaml",
            "conf/trainer/ddp.yaml",
        ]
        # no step budget or dev interval from the sweep's args: the presets' (the authors') hold
        assert not any(a.startswith(("--trainer.max_steps", "--trainer.val_check_interval")) for a in cmd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([*sw.fit_command(spec, runs["sd"])[3:], "--print_config"])
    cfg = yaml.safe_load(out.getvalue())
    assert cfg["trainer"]["accumulate_grad_batches"] == 4 and cfg["trainer"]["max_steps"] == 30000
    assert cfg["model"]["init_args"]["lr_head"] == runs["sd"].lr
    assert cfg["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.Adam"


# ---------------------------------------------------------------------------- end to end


class Probe(Callback):
    """Counts training batches and optimizer steps; records the gradient norm before and after clipping."""

    def __init__(self) -> None:
        self.batches = 0
        self.steps = 0
        self.norms: list[tuple[float, float]] = []  # (before clipping, after)
        self._before: float | None = None

    @staticmethod
    def _norm(optimizer) -> float:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1
        self._before = self._norm(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self._before is not None:  # this batch ended with an optimizer step: its gradients, clipped
            self.norms.append((self._before, self._norm(trainer.optimizers[0])))
            self._before = None


def _spy_specaug(module: SpecAugment) -> list[tuple[bool, bool]]:
    """(training, changed the features) for every call of the module."""
    calls: list[tuple[bool, bool]] = []
    module.register_forward_hook(
        lambda m, args, out: calls.append((m.training, not torch.equal(args[0], out)))
    )
    return calls


# Smaller recurrent layers and projectors keep each run to seconds; everything else is the preset's.
SHRINK = {
    "asr": ["--model.init_args.projector_dim=16", "--model.init_args.lstm_hidden=16"],
    "sf": ["--model.init_args.projector_dim=16", "--model.init_args.lstm_hidden=16"],
    "sd": ["--model.init_args.lstm_hidden=16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_preset_fast_dev_run(task, task_cli, tiny_corpus, tmp_path):
    accumulate = EXPECTED[task]["trainer.accumulate_grad_batches"]
    cli = task_cli(
        task,
        tiny_corpus,
        "--config", preset(task),
        # the preset's batch size is the corpus's size here: back to 2 (after the preset, which sets it)
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        # as many batches as one accumulated optimizer step takes
        f"--trainer.fast_dev_run={accumulate}",
        f"--model.init_args.feature_cache={tmp_path / 'features'}" if task == "asr" else "--model.init_args.feature_cache=null",
        *SHRINK.get(task, []),
        run=False,
    )  # fmt: skip
    model, trainer = cli.model, cli.trainer
    assert trainer.accumulate_grad_batches == accumulate and trainer.gradient_clip_val == 1.0
    probe = Probe()
    trainer.callbacks.append(probe)
    calls = _spy_specaug(model.specaug) if task in ("asr", "sf") else None
    trainer.fit(model, datamodule=cli.datamodule)

    # accumulation: `accumulate` training batches made one optimizer step
    assert probe.batches == accumulate and probe.steps == 1 and trainer.global_step == 1
    # clipping by norm at 1.0 (the preset's), over every parameter the optimizer holds
    ((before, after),) = probe.norms
    assert after == pytest.approx(min(before, 1.0), rel=1e-3)
    if task in ("asr", "sf"):
        head = model.head
        assert isinstance(head.projector, nn.Linear) and head.projector.out_features == 16
        assert isinstance(model.specaug, SpecAugment)
        # SpecAugment ran on the training batches (and changed them), and left validation alone
        assert sum(1 for training, changed in calls if training and changed) == accumulate
        assert any(not training for training, _ in calls) and not any(c for t, c in calls if not t)
    elif task in ("ks", "ic", "sid"):
        assert isinstance(model.head.projector, nn.Linear) and model.head.projector.out_features == 256
    else:  # sd: s3prl's LSTM straight on the features, no projector
        assert model.rnn.hidden == 16 and not hasattr(model, "head")
    if task == "asr":  # the features came from the frozen-feature cache, and SpecAugment still applied
        assert cli.datamodule.features is not None and cli.datamodule.features.store is not None
    if task == "ks":
        assert isinstance(trainer.train_dataloader.sampler, WeightedRandomSampler)
    assert "val/" + model.primary_name in trainer.callback_metrics


# ---------------------------------------------------------------------------- SpecAugment


def _features(b: int = 3, f: int = 60, d: int = 32, lengths: tuple[int, ...] = (60, 40, 25)):
    x = torch.randn(b, f, d).abs() + 0.1  # no zeros of its own
    mask = torch.arange(f)[None, :] < torch.tensor(lengths)[:, None]
    return x.masked_fill(~mask[..., None], 7.0), mask  # padding marked with 7


def test_specaug_is_the_identity_in_eval_mode():
    x, mask = _features()
    aug = SpecAugment().eval()
    assert aug(x, mask) is x


def test_specaug_masks_count_and_place():
    torch.manual_seed(0)
    x, mask = _features()
    lengths = mask.sum(1)
    for _ in range(20):
        # one frame mask of exactly 5 frames: 5 zeroed frames per utterance, all inside its real frames
        aug = SpecAugment(
            time_warp_window=0, num_freq_mask=0, num_time_mask=1, time_mask_width_range=(5, 6)
        ).train()
        y = aug(x, mask)
        assert y.shape == x.shape
        zero_frames = (y == 0).all(-1)
        assert zero_frames.sum(1).tolist() == [5, 5, 5]
        assert not (zero_frames & ~mask).any() and (y[~mask] == 7.0).all()
        # one feature mask of exactly 3 dimensions, over the real frames only
        aug = SpecAugment(
            time_warp_window=0, num_freq_mask=1, freq_mask_width_range=(3, 4), num_time_mask=0
        ).train()
        y = aug(x, mask)
        for b, n in enumerate(lengths.tolist()):
            assert int((y[b, :n] == 0).all(0).sum()) == 3
        assert (y[~mask] == 7.0).all()
        # two masks of each kind, s3prl's widths: between one and two widths' worth, never more
        aug = SpecAugment(time_warp_window=0, num_freq_mask=2, freq_mask_width_range=(4, 5),
                          num_time_mask=2, time_mask_width_range=(3, 4)).train()  # fmt: skip
        y = aug(x, mask)
        for b, n in enumerate(lengths.tolist()):
            real = y[b, :n]
            dims = int((real == 0).all(0).sum())
            frames = int((real == 0).all(1).sum())
            assert 4 <= dims <= 8 and 3 <= frames <= 6, (dims, frames)
    # width ranges starting at 0 may draw no mask at all; (0, 1) always does
    aug = SpecAugment(time_warp_window=0, freq_mask_width_range=(0, 1), time_mask_width_range=(0, 1)).train()
    assert torch.equal(aug(x, mask), x)


def test_specaug_widths_follow_s3prls_exclusive_range():
    torch.manual_seed(1)
    x, mask = torch.ones(64, 100, 8), torch.ones(64, 100, dtype=torch.bool)
    aug = SpecAugment(
        time_warp_window=0, num_freq_mask=0, num_time_mask=1, time_mask_width_range=(0, 4)
    ).train()
    widths = Counter(int(n) for n in (aug(x, mask) == 0).all(-1).sum(1))
    assert set(widths) == {0, 1, 2, 3}  # 4 is never drawn, as torch.randint's high in s3prl


def test_specaug_time_warp():
    torch.manual_seed(2)
    x, mask = _features(lengths=(60, 40, 10))
    aug = SpecAugment(time_warp_window=5, num_freq_mask=0, num_time_mask=0).train()
    y = aug(x, mask)
    assert y.shape == x.shape and (y[~mask] == 7.0).all()
    assert torch.equal(y[2], x[2])  # 10 frames <= twice the window: left alone, as in s3prl
    assert not torch.equal(y[0], x[0]) or not torch.equal(y[1], x[1])
    # a warp moves frames in time only: a feature that is constant over time stays that constant
    const = torch.arange(16.0).repeat(2, 50, 1)
    full = torch.ones(2, 50, dtype=torch.bool)
    assert torch.allclose(aug(const, full), const, atol=1e-4)
    # and gradients reach the features (the layer weights train through it)
    g = torch.randn(2, 50, 16, requires_grad=True)
    aug(g, full).sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()


def test_specaug_rejects_bad_ranges():
    with pytest.raises(ValueError, match="time_mask_width_range"):
        SpecAugment(time_mask_width_range=(5, 5))
    with pytest.raises(ValueError, match="freq_mask_width_range"):
        SpecAugment(freq_mask_width_range=(-1, 3))


def test_ctc_head_projector():
    head = CTCHead(48, 10, hidden=8, num_layers=2, projector_dim=24)
    assert isinstance(head.projector, nn.Linear) and (
        head.projector.in_features,
        head.projector.out_features,
    ) == (48, 24)
    out = head(torch.randn(2, 7, 48), torch.tensor([7, 4]))
    assert out.shape == (2, 7, 10)
    # without one: no projector weights, the state dict of the light head as before
    plain = CTCHead(48, 10, hidden=8, num_layers=2)
    assert isinstance(plain.projector, nn.Identity) and not any(
        k.startswith("projector") for k in plain.state_dict()
    )


# ---------------------------------------------------------------------------- the class-balanced sampler


def _ks(root: Path, **kwargs):
    from tasks.ks import KeywordSpottingData

    dm = KeywordSpottingData(root=str(root), batch_size=4, num_workers=0, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_class_balanced_sampler_evens_out_the_classes(tiny_corpus):
    torch.manual_seed(0)
    dm = _ks(tiny_corpus, class_balanced=True)
    # an imbalanced training split: every "yes", one utterance of each other class
    by_class: dict[str, list] = {}
    for r in dm.records["train"]:
        by_class.setdefault(r.label, []).append(r)
    records = [r for label, rs in sorted(by_class.items()) for r in (rs if label == "yes" else rs[:1])]
    dm.records["train"] = records
    labels = [r.label for r in records]
    assert Counter(labels)["yes"] == 6 and len(set(labels)) == 12
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedRandomSampler) and loader.batch_size == 4
    assert len(loader.sampler) == len(records)  # an epoch draws as many as the split holds
    draws = Counter(labels[i] for _ in range(400) for i in loader.sampler)
    share = {c: n / sum(draws.values()) for c, n in draws.items()}
    assert set(share) == set(labels)
    assert max(abs(s - 1 / 12) for s in share.values()) < 0.015  # a plain shuffle gives "yes" 6/17 = 0.35
    # the run's seed drives it: the same seed, the same draws
    torch.manual_seed(0)
    first = list(_ks(tiny_corpus, class_balanced=True).train_dataloader().sampler)
    torch.manual_seed(0)
    assert list(_ks(tiny_corpus, class_balanced=True).train_dataloader().sampler) == first


def test_without_class_balancing_the_loaders_are_as_before(tiny_corpus):
    dm = _ks(tiny_corpus)
    assert dm.sample_weights("train") is None
    assert isinstance(dm.train_dataloader().batch_sampler, BucketBatchSampler)
    assert not isinstance(
        _ks(tiny_corpus, bucket_by_length=False).train_dataloader().sampler, WeightedRandomSampler
    )
    # evaluation never samples: dev is read in order, once
    balanced = _ks(tiny_corpus, class_balanced=True)
    assert not isinstance(balanced.val_dataloader().sampler, WeightedRandomSampler)
