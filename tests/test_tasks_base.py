"""tasks/{data,module,ctc,classification}.py: protocols, optimizer groups, warm-up, data split, spec
checks, CTC pieces, and the pairing of task files with their configs."""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rewiring.audio import Skipped
from rewiring.encoder import TINY_CONFIG, SpeechEncoder
from rewiring.manifest import Record, write_manifest
from rewiring.skips import SkippedBatch
from tasks.classification import ClassificationDataModule, ClassificationTaskModule
from tasks.ctc import CTCTargets, Vocabulary, ctc_loss, greedy_decode
from tasks.data import Item, TaskBatch
from tasks.module import EncoderWarmup, TaskModule

REPO = Path(__file__).resolve().parents[1]
SIX = {"asr", "ks", "ic", "sid", "sd", "sf"}


def tiny_encoder() -> SpeechEncoder:
    torch.manual_seed(0)
    return SpeechEncoder(dict(TINY_CONFIG, num_hidden_layers=2))


class Toy(ClassificationTaskModule):
    task = "toy"


def toy_module(**kw) -> Toy:
    model = Toy(tiny_encoder(), **kw)
    model.install_spec({"classes": ["a", "b", "c"]})
    return model


def batch(n: int = 2, samples: int = 4000) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(n, samples, generator=g) * 0.1
    return TaskBatch(
        waveforms=wav,
        attention_mask=torch.ones(n, samples, dtype=torch.long),
        lengths=torch.full((n,), samples),
        ids=[f"u{i}" for i in range(n)],
        targets=torch.arange(n) % 3,
    )


# ---------------------------------------------------------------- protocols and optimizer groups


def test_superb_protocol_freezes_encoder_and_trains_layer_weights():
    model = toy_module(protocol="superb", lr_head=1e-3, lr_encoder=1e-5)
    enc = model.encoder
    assert enc.frozen and enc.layers == "weighted"
    assert enc.layer_weights is not None and enc.layer_weights.requires_grad
    assert not any(p.requires_grad for p in enc.model.parameters())
    groups = model.parameter_groups()
    assert [g["name"] for g in groups] == ["head"]
    ids = {id(p) for p in groups[0]["params"]}
    assert id(enc.layer_weights) in ids and all(id(p) in ids for p in model.head.parameters())
    model.train()
    assert not enc.model.training  # a frozen encoder runs without dropout
    loss = model.step(batch(), "train")
    loss.backward()
    assert enc.layer_weights.grad is not None
    assert all(p.grad is None for p in enc.model.parameters())


def test_finetune_protocol_two_groups_with_their_learning_rates():
    model = toy_module(protocol="finetune", lr_head=1e-3, lr_encoder=1e-5)
    enc = model.encoder
    assert not enc.frozen
    opt = model.configure_optimizers()
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"head", "encoder"}
    assert by_name["head"]["lr"] == 1e-3 and by_name["encoder"]["lr"] == 1e-5
    enc_ids = {id(p) for p in by_name["encoder"]["params"]}
    assert enc_ids == {id(p) for p in enc.model.parameters()}
    head_ids = {id(p) for p in by_name["head"]["params"]}
    assert not head_ids & enc_ids
    # CNN frozen as the encoder config says (freeze_feature_encoder=True by default), the rest trains
    assert not any(p.requires_grad for p in enc.model.feature_extractor.parameters())
    assert all(p.requires_grad for p in enc.model.encoder.parameters())


def test_freeze_encoder_steps_needs_finetune():
    with pytest.raises(ValueError, match="finetune"):
        Toy(tiny_encoder(), protocol="superb", freeze_encoder_steps=3)


def test_encoder_warmup_follows_global_step():
    model = toy_module(protocol="finetune", freeze_encoder_steps=2)
    cbs = model.configure_callbacks()
    warm = next(c for c in cbs if isinstance(c, EncoderWarmup))
    from lightning.pytorch.callbacks import BaseFinetuning

    assert isinstance(warm, BaseFinetuning)
    for step, frozen in [(0, True), (1, True), (2, False), (5, False)]:
        warm.on_train_batch_start(SimpleNamespace(global_step=step), model, None, 0)
        assert model.encoder.frozen is frozen
    # a resumed run past the warm-up starts unfrozen; one inside it starts frozen
    warm.on_train_batch_start(SimpleNamespace(global_step=1), model, None, 0)
    assert model.encoder.frozen


def test_callbacks_follow_primary_metric_and_direction():
    model = toy_module(early_stopping_patience=3)
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    cbs = model.configure_callbacks()
    ckpt = next(c for c in cbs if isinstance(c, ModelCheckpoint))
    stop = next(c for c in cbs if isinstance(c, EarlyStopping))
    assert ckpt.monitor == stop.monitor == "val/acc"
    assert ckpt.mode == stop.mode == "max" and ckpt.save_last

    class MinTask(Toy):
        primary_metric = "val/loss"
        metric_mode = "min"

    m = MinTask(tiny_encoder())
    ckpt = next(c for c in m.configure_callbacks() if isinstance(c, ModelCheckpoint))
    assert (ckpt.monitor, ckpt.mode) == ("val/loss", "min")


def test_primary_metric_must_be_a_metric():
    class Wrong(Toy):
        primary_metric = "val/f1"

    with pytest.raises(ValueError, match="val/f1"):
        Wrong(tiny_encoder()).install_spec({"classes": ["a", "b"]})


def test_nonfinite_loss_is_counted_and_skipped():
    model = toy_module()
    model.step = lambda b, stage: torch.tensor(float("nan"), requires_grad=True)
    with pytest.warns(UserWarning, match="non-finite"):
        loss = model.training_step(batch(), 0)
    # a zero loss tied to every trainable parameter, whose step updates nothing (rewiring.skips)
    assert model.nonfinite_losses == 1 and loss.detach().item() == 0.0 and loss.requires_grad and model._batch_skipped
    model._batch_skipped = False
    empty = model.training_step(SkippedBatch([("u0", "too_short")]), 1)  # a batch of only bad audio
    assert empty.detach().item() == 0.0 and empty.requires_grad and model._batch_skipped
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)  # a resumed fit goes on counting
    resumed = toy_module()
    resumed.on_load_checkpoint(ckpt)
    assert resumed.nonfinite_losses == 1


def test_spec_saved_in_checkpoint_and_checked_on_load():
    model = toy_module()
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    assert ckpt["task_spec"] == {"task": "toy", "spec": {"classes": ["a", "b", "c"]}}
    fresh = Toy(tiny_encoder())
    fresh.on_load_checkpoint(ckpt)  # no data module: the head comes from the checkpoint
    assert fresh.classes == ["a", "b", "c"]
    other = Toy(tiny_encoder())
    other.install_spec({"classes": ["a", "b"]})
    with pytest.raises(ValueError, match="classes"):
        other.on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="task"):
        other.on_load_checkpoint({"task_spec": {"task": "ks", "spec": {}}})


# ---------------------------------------------------------------- data module


class ToyData(ClassificationDataModule):
    task = "toy"


@pytest.fixture
def toy_root(tmp_path) -> Path:
    import numpy as np
    import soundfile as sf

    (tmp_path / "audio").mkdir()
    t = np.arange(8000) / 16000
    for split, n in [("train", 12), ("dev", 3), ("test", 3)]:
        records = []
        for i in range(n):
            name = f"{split}{i}"
            sf.write(tmp_path / "audio" / f"{name}.wav", 0.3 * np.sin(2 * np.pi * (200 + 20 * i) * t), 16000)
            records.append(
                Record(
                    id=name, audio=f"../audio/{name}.wav", duration=0.5, label="abc"[i % 3], speaker=f"s{i}"
                )
            )
        write_manifest(tmp_path / "toy" / f"{split}.jsonl", records)
    return tmp_path


def test_low_resource_split_is_stratified_and_hashed(toy_root, capsys):
    dm = ToyData(root=str(toy_root), fraction=0.25, split_seed=1, batch_size=2)
    dm.setup("fit")
    train = dm.records["train"]
    assert len(train) == 3 and {r.label for r in train} == {"a", "b", "c"}
    assert dm.spec == {"classes": ["a", "b", "c"]}  # from the whole train manifest
    assert f"ids_hash {dm.train_ids_hash}" in capsys.readouterr().out
    again = ToyData(root=str(toy_root), fraction=0.25, split_seed=1)
    again.setup("fit")
    assert again.train_ids_hash == dm.train_ids_hash
    other = ToyData(root=str(toy_root), fraction=0.25, split_seed=2)
    other.setup("fit")
    assert other.train_ids_hash != dm.train_ids_hash
    batches = list(dm.train_dataloader())  # length-bucketed: 3 items in batches of 2 and 1
    assert sorted(b.waveforms.shape[0] for b in batches) == [1, 2]
    assert all(b.waveforms.shape[1] == 8000 and b.targets.dtype == torch.long for b in batches)


def test_data_module_errors_name_the_problem(toy_root, tmp_path):
    with pytest.raises(ValueError, match="at most one"):
        ToyData(root=str(toy_root), fraction=0.5, amount="1min")
    dm = ToyData(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/toy/train\.jsonl"):
        dm.setup("fit")
    write_manifest(
        toy_root / "toy" / "dev.jsonl", [Record(id="x", audio="../audio/dev0.wav", duration=0.5, label="z")]
    )
    dm = ToyData(root=str(toy_root))
    dm.setup("validate")
    with pytest.raises(ValueError, match="'z'"):
        next(iter(dm.val_dataloader()))


def test_collate_leaves_out_bad_audio(toy_root):
    dm = ToyData(root=str(toy_root))
    dm.setup("fit")
    good = Item(id="a", wav=torch.ones(100), target=0)
    bad = Skipped("x.wav", "too_short", "empty audio (0 samples)", id="b")
    b = dm.collate([None, good, bad])
    assert b.ids == ["a"] and b.waveforms.shape == (1, 100) and b.skipped == [("b", "too_short")]
    # a batch of only bad audio is a SkippedBatch, never None (which would move validation off its grid)
    empty = dm.collate([None, bad])
    assert isinstance(empty, SkippedBatch) and len(empty) == 0 and empty.skipped == [("b", "too_short")]


# ---------------------------------------------------------------- CTC pieces (asr, sf rely on them)


def test_vocabulary_roundtrip_and_unknown_tokens():
    v = Vocabulary.build(["ab c", "cab"])
    assert v.tokens == ["<blank>", " ", "a", "b", "c"]
    assert v.decode(v.encode("a cab")) == "a cab"
    assert v.encode("az") == [2] and v.unknown == 1
    tags = Vocabulary.build([["a", "<city>", "b"]])
    assert tags.decode(tags.encode(["<city>", "a"]), sep="|") == "<city>|a"
    with pytest.raises(ValueError, match="blank"):
        Vocabulary(["a", "b"])


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    ids = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    log_probs = torch.nn.functional.one_hot(ids, 3).float().log()
    assert greedy_decode(log_probs, torch.tensor([8, 8])) == [[1, 1, 2], []]
    assert greedy_decode(log_probs, torch.tensor([2, 8])) == [[1], []]


def test_ctc_loss_fp32_with_zero_infinity():
    log_probs = torch.randn(2, 4, 5).log_softmax(-1).to(torch.bfloat16)
    # the second target is longer than its frames: an impossible alignment gives 0, not inf
    targets = CTCTargets(tokens=torch.tensor([[1, 2, 0, 0, 0, 0], [1, 2, 3, 4, 1, 2]]),
                         lengths=torch.tensor([2, 6]), texts=["ab", "abcdab"])  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ctc_loss(log_probs, torch.tensor([4, 4]), targets)
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))


# ---------------------------------------------------------------- task files and configs


def _task_files() -> dict[str, type]:
    """tasks/<name>.py files that define a TaskModule subclass -> that class."""
    found = {}
    for path in sorted((REPO / "tasks").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"tasks.{path.stem}")
        classes = [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, TaskModule) and c.__module__ == module.__name__ and c.task
        ]
        if classes:
            found[path.stem] = classes[0]
    return found


def test_every_task_file_has_a_config_and_back():
    files = _task_files()
    configs = {p.stem: p for p in (REPO / "conf" / "tasks").glob("*.yaml")}
    assert set(files) == set(configs), (
        f"task files without a config: {sorted(set(files) - set(configs))}; "
        f"configs without a task file: {sorted(set(configs) - set(files))}"
    )
    assert set(files) >= SIX, f"missing tasks: {sorted(SIX - set(files))}"
    for name, path in configs.items():
        conf = yaml.safe_load(path.read_text())
        for part in ("model", "data"):
            class_path = conf[part]["class_path"]
            assert class_path.startswith(f"tasks.{name}."), f"{path}: {part}.class_path {class_path}"
            module, cls = class_path.rsplit(".", 1)
            obj = getattr(importlib.import_module(module), cls)
            assert getattr(obj, "task", None) == name, f"{class_path}.task is not {name!r}"
        assert "num_classes" not in path.read_text()  # data values come from the data module
