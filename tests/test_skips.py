"""Skipped inputs counted per split and reason in every stage (rewiring.skips), validation on its
K-step grid whatever is skipped, and the encoder's receptive field as the "too short" rule."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rewiring.audio import AudioError, Skipped
from rewiring.encoder import TINY_CONFIG, TINY_WHISPER_CONFIG, SpeechEncoder
from rewiring.experiment.train import cli_main
from rewiring.manifest import Record, audio_path, read_manifest, write_manifest
from rewiring.skips import SkipLog, SkippedBatch, summary_line
from tasks.data import Item, ManifestDataset

REPO = Path(__file__).resolve().parents[1]
SR = 16000
BAD = {"truncated": "truncated", "empty": "unreadable", "short": "too_short"}  # file -> reason code


def _tone(path: Path, samples: int, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = 0.3 * np.sin(2 * np.pi * freq * np.arange(samples) / SR)
    sf.write(path, wav.astype(np.float32), SR, subtype="PCM_16")
    return path


def bad_files(folder: Path, tag: str) -> list[Record]:
    """A WAV cut off after 28 samples (its header says 1 s), an empty file, and 200 samples (below the
    400-sample receptive field of wav2vec2): the records, with the manifest's durations."""
    cut = _tone(folder / f"{tag}-truncated.wav", SR)
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"data") + 8 + 2 * 28])
    (folder / f"{tag}-empty.wav").write_bytes(b"")
    _tone(folder / f"{tag}-short.wav", 200)
    durations = {"truncated": 1.0, "empty": 1.0, "short": 200 / SR}
    return [Record(id=f"{tag}-{k}", audio=str(folder / f"{tag}-{k}.wav"), duration=d, label="yes", text="yes")
            for k, d in durations.items()]  # fmt: skip


def _absolute(manifest: Path, records: list[Record]) -> list[Record]:
    for r in records:
        r.audio = str(audio_path(manifest, r).resolve())
    return records


@pytest.fixture
def ks_with_bad_audio(tiny_corpus, tmp_path) -> Path:
    """ks with 6 good + 3 bad train utterances, 4 good + 3 bad dev ones, 4 good + 3 bad test ones."""
    root = tmp_path / "corpus"
    good = {s: _absolute(tiny_corpus / "ks" / f"{s}.jsonl", read_manifest(tiny_corpus / "ks" / f"{s}.jsonl"))
            for s in ("train", "dev", "test")}  # fmt: skip
    train = good["train"]
    labels = {r.label for r in train[:6]}
    good = {"train": train[:6], **{s: [r for r in good[s] if r.label in labels][:4] for s in ("dev", "test")}}
    for split, records in good.items():
        assert len(records) == {"train": 6}.get(split, 4)
        write_manifest(root / "ks" / f"{split}.jsonl", records + bad_files(root / "bad", split))
    return root


def _task_fit(root: Path, out: Path, *extra: str):
    return cli_main(
        [
            "fit",
            "--config", f"{REPO}/conf/base.yaml",
            "--config", f"{REPO}/conf/encoder/tiny-random.yaml",
            "--config", f"{REPO}/conf/tasks/ks.yaml",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out / 'runs'}",
            "--trainer.logger.init_args.version=run",
            f"--data.init_args.root={root}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=1",  # each bad file is a batch with nothing in it
            f"--model.init_args.feature_cache={out / 'features'}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=9",  # one epoch of the 9 train utterances
            "--trainer.val_check_interval=3",
            *extra,
        ]
    )  # fmt: skip


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


EXPECTED = {
    "train": {
        "utterances": 9,
        "drawn": 9,
        "used": 6,
        "skipped": {"too_short": 1, "truncated": 1, "unreadable": 1},
    },
    "dev": {
        "utterances": 7,
        "drawn": 7,
        "used": 4,
        "skipped": {"too_short": 1, "truncated": 1, "unreadable": 1},
    },
}


@pytest.mark.parametrize(
    "protocol", ["superb", "finetune"]
)  # superb reads the feature cache, whose fill skips
def test_a_task_fit_counts_skips_per_split_and_reason_and_validates_on_its_grid(
    ks_with_bad_audio, tmp_path, protocol, caplog
):
    with caplog.at_level(logging.WARNING, logger="rewiring.skips"):
        cli = _task_fit(ks_with_bad_audio, tmp_path, f"--model.init_args.protocol={protocol}")
    run = tmp_path / "runs" / "ks" / "run"
    conv = json.loads((run / "convergence.json").read_text())
    # 3 of the 9 batches held only bad audio: still 9 optimizer steps, validations at 3, 6, 9 (not 2, 4, 6)
    assert cli.trainer.global_step == 9
    assert conv["curve"]["steps"] == [3, 6, 9]
    assert conv["skipped"] == EXPECTED
    scalars = _scalars(run)
    for split in ("train", "dev"):
        for reason in ("too_short", "truncated", "unreadable"):
            assert scalars[f"data/skipped/{split}/{reason}"][-1] == (9, 1.0)
    assert "data/skipped/dev/too_long" not in scalars  # only reasons that occurred
    warned = [r.getMessage() for r in caplog.records if r.name == "rewiring.skips"]
    assert warned == [
        "train: 6 of 9 utterances used (3 skipped: 1 too_short, 1 truncated, 1 unreadable)",
        "dev: 4 of 7 utterances used (3 skipped: 1 too_short, 1 truncated, 1 unreadable)",
    ]
    if protocol == "superb":
        return
    # a resumed fit goes on counting from its checkpoint; the test run counts its own split
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(saved["skipped"]) == {"train", "dev"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewiring.skips"):
        tested = cli_main(
            [
                "test", "--config", str(run / "config.yaml"), "--trainer.logger.init_args.version=test",
                f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                "--trainer.callbacks+=rewiring.convergence.TestResults",
                f"--trainer.callbacks.init_args.path={tmp_path / 'test.json'}",
            ]
        )  # fmt: skip
    assert tested.model.skips.final["test"] == {
        "utterances": 7, "drawn": 7, "used": 4, "skipped": {"too_short": 1, "truncated": 1, "unreadable": 1}
    }  # fmt: skip
    assert json.loads((tmp_path / "test.json").read_text())["skipped"] == {
        "test": tested.model.skips.final["test"]
    }
    assert [r.getMessage() for r in caplog.records if r.name == "rewiring.skips"] == [
        "test: 4 of 7 utterances used (3 skipped: 1 too_short, 1 truncated, 1 unreadable)"
    ]
    assert "data/skipped/test/truncated" in _scalars(tmp_path / "runs" / "ks" / "test")


def test_nothing_skipped_says_nothing(tiny_corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rewiring.skips"):
        _task_fit(tiny_corpus, tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                  "--trainer.limit_val_batches=2", "--data.init_args.batch_size=4")  # fmt: skip
    assert not [r for r in caplog.records if r.name == "rewiring.skips"]
    conv = json.loads((tmp_path / "runs" / "ks" / "run" / "convergence.json").read_text())
    assert conv["skipped"]["train"]["skipped"] == {} and conv["skipped"]["dev"]["skipped"] == {}
    assert not [t for t in _scalars(tmp_path / "runs" / "ks" / "run") if t.startswith("data/skipped")]


def test_error_mode_names_the_file(ks_with_bad_audio, tmp_path):
    with pytest.raises(AudioError, match=r"train-(truncated|empty|short)\.wav"):
        _task_fit(ks_with_bad_audio, tmp_path, "--model.init_args.protocol=finetune",
                  "--data.init_args.on_bad_audio=error", "--trainer.max_steps=9")  # fmt: skip


def test_the_encoders_receptive_field_reaches_every_data_module(tmp_path):
    """Whisper needs 160 samples, wav2vec2 400: a 300-sample file is used by one and too short for the other."""
    from rewiring.pairs import RewiringDataModule
    from rewiring.pretrain import PretrainModule, UnlabelledDataModule
    from rewiring.rewire import RewiringModule
    from tasks.ks import KeywordSpotting, KeywordSpottingData

    rec = Record(
        id="u", audio=str(_tone(tmp_path / "u.wav", 300)), duration=300 / SR, label="yes", text="yes"
    )
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [rec, *[Record(id=f"g{i}", audio=str(_tone(tmp_path / f"g{i}.wav", SR)),
                                            duration=1.0, label="yes", text="yes") for i in range(4)]])  # fmt: skip
    (tmp_path / "ks").mkdir()
    for split in ("train", "dev", "test"):
        shutil.copy(manifest, tmp_path / "ks" / f"{split}.jsonl")

    for config, expected in ((TINY_WHISPER_CONFIG, 160), (TINY_CONFIG, 400)):
        encoder = SpeechEncoder(config)
        assert encoder.min_samples == expected
        # tasks: TaskModule.setup hands it over, ManifestDataset checks against it
        dm = KeywordSpottingData(root=str(tmp_path), num_workers=0)
        dm.setup("fit")
        model = KeywordSpotting(encoder=encoder, feature_cache=None)
        model._trainer = SimpleNamespace(datamodule=dm)
        model.setup("fit")
        assert dm.min_samples == expected and dm.dataset("dev").min_samples == expected
        item = dm.dataset("dev")[0]
        assert (
            isinstance(item, Item)
            if expected == 160
            else (isinstance(item, Skipped) and item.code == "too_short")
        )
        # rewiring: RewiringModule.setup, next to the frame layout
        rdm = RewiringDataModule(manifest=str(manifest), pairing="twin", num_workers=0, batch_size=2)
        rdm.setup("fit")
        rmodel = RewiringModule(encoder=encoder, isotropy_manifest=None)
        rmodel._trainer = SimpleNamespace(datamodule=rdm)
        rmodel.setup("fit")
        assert rdm.dataset.min_samples == expected
        pair = rdm.dataset[0]
        assert (
            isinstance(pair, dict)
            if expected == 160
            else (isinstance(pair, Skipped) and pair.code == "too_short")
        )
    # pre-training (wav2vec2 only: it needs the quantizer)
    pdm = UnlabelledDataModule(manifest=str(manifest), num_workers=0)
    pdm.setup("fit")
    pmodel = PretrainModule(encoder=SpeechEncoder(TINY_CONFIG))
    pmodel._trainer = SimpleNamespace(datamodule=pdm)
    pmodel.setup("fit")
    assert pdm.dataset.min_samples == 400
    assert pdm.dataset[0].code == "too_short" and pdm.dataset[0].id == "u"
    # error mode names the file and the rule
    strict = ManifestDataset(manifest, [rec], lambda r: 0, on_bad_audio="error", min_samples=400)
    with pytest.raises(AudioError, match=r"u\.wav: audio is 300 samples .* \(min_samples=400\)"):
        strict[0]


def _unlabelled_with_bad_audio(unlabelled: Path, tmp_path: Path) -> Path:
    """The unlabelled set (10 utterances) plus a truncated, an empty, a too-short and a missing file,
    and a 20 s one (over max_seconds=15): 14 items for the run, 15 utterances in all."""
    records = _absolute(unlabelled, read_manifest(unlabelled))
    records += bad_files(tmp_path / "bad", "u")
    records.append(
        Record(id="u-missing", audio=str(tmp_path / "bad" / "nowhere.wav"), duration=1.0, text="yes")
    )
    records.append(
        Record(
            id="u-long", audio=str(_tone(tmp_path / "bad" / "long.wav", 20 * SR)), duration=20.0, text="yes"
        )
    )
    manifest = tmp_path / "unlabelled.jsonl"
    write_manifest(manifest, records)
    return manifest


UNLABELLED_EXPECTED = {
    "train": {
        "utterances": 15, "drawn": 15, "used": 10,
        "skipped": {"not_found": 1, "too_long": 1, "too_short": 1, "truncated": 1, "unreadable": 1},
    }
}  # fmt: skip
UNLABELLED_LINE = ("train: 10 of 15 utterances used "
                   "(5 skipped: 1 not_found, 1 too_long, 1 too_short, 1 truncated, 1 unreadable)")  # fmt: skip


def _stage_fit(stage: str, manifest: Path, export: Path, tmp_path: Path, *extra: str):
    """A fit of conf/stages/<stage>.yaml on the tiny random encoder: one epoch of the 14 items in pairs."""
    return cli_main(
        [
            "fit",
            "--config", f"{REPO}/conf/base.yaml",
            "--config", f"{REPO}/conf/encoder/tiny-random.yaml",
            "--config", f"{REPO}/conf/stages/{stage}.yaml",
            f"--data.init_args.manifest={manifest}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=2",
            f"--model.init_args.export_dir={export}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.max_steps=7",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )  # fmt: skip


def test_a_rewiring_fit_counts_skips(unlabelled, tmp_path, caplog):
    manifest = _unlabelled_with_bad_audio(unlabelled, tmp_path)
    with caplog.at_level(logging.WARNING, logger="rewiring.skips"):
        cli = _stage_fit("rewire", manifest, tmp_path / "export", tmp_path,
                         "--data.init_args.pairing=twin", "--data.init_args.max_seconds=15",
                         "--model.init_args.isotropy_manifest=null", "--trainer.logger.init_args.version=run",
                         "--trainer.log_every_n_steps=2")  # fmt: skip
    assert cli.trainer.global_step == 7 and cli.trainer.current_epoch == 1
    summary = json.loads((tmp_path / "export" / "rewiring.json").read_text())
    assert summary["skipped"] == UNLABELLED_EXPECTED
    run = Path(cli.trainer.logger.log_dir)
    assert json.loads((run / "convergence.json").read_text())["skipped"] == UNLABELLED_EXPECTED
    scalars = _scalars(run)
    assert {t for t in scalars if t.startswith("data/skipped/")} == {
        f"data/skipped/train/{r}" for r in UNLABELLED_EXPECTED["train"]["skipped"]
    }
    assert scalars["data/skipped/train/too_long"][-1] == (7, 1.0)
    assert [r.getMessage() for r in caplog.records if r.name == "rewiring.skips"] == [UNLABELLED_LINE]


def test_a_pretraining_fit_counts_skips(unlabelled, tmp_path, caplog):
    manifest = _unlabelled_with_bad_audio(unlabelled, tmp_path)
    records = [r for r in read_manifest(manifest) if r.id != "u-long"]  # pre-training has no max_seconds
    write_manifest(manifest, records)
    with caplog.at_level(logging.WARNING, logger="rewiring.skips"):
        cli = _stage_fit("pretrain", manifest, tmp_path / "tiny", tmp_path, "--trainer.log_every_n_steps=1")
    assert cli.trainer.global_step == 7
    expected = {"utterances": 14, "drawn": 14, "used": 10,
                "skipped": {"not_found": 1, "too_short": 1, "truncated": 1, "unreadable": 1}}  # fmt: skip
    assert cli.model.skips.final == {"train": expected}
    run = Path(cli.trainer.logger.log_dir)
    assert json.loads((run / "convergence.json").read_text())["skipped"] == {"train": expected}
    assert "data/skipped/train/truncated" in _scalars(run)
    assert [r.getMessage() for r in caplog.records if r.name == "rewiring.skips"] == [
        "train: 10 of 14 utterances used (4 skipped: 1 not_found, 1 too_short, 1 truncated, 1 unreadable)"
    ]


# ---------------------------------------------------------------- the pieces


def test_tally_counts_utterances_not_draws_and_says_what_was_never_drawn():
    skips = SkipLog()
    skips.track("train", ["a", "b", "c", "d"])
    for _ in range(3):  # three epochs, the same bad file each time
        skips.update("train", ["a"], [("b", "too_short")])
    skips.update("train", ["c"], [("c", "nan")])  # a skip outranks a use
    counts = skips.counts()["train"]
    assert counts == {"utterances": 4, "drawn": 3, "used": 1, "skipped": {"too_short": 1, "nan": 1}}
    assert (
        summary_line("train", counts)
        == "train: 1 of 4 utterances used (2 skipped: 1 nan, 1 too_short; 1 not drawn)"
    )
    assert summary_line("dev", {"utterances": 2, "drawn": 2, "used": 2, "skipped": {}}) is None
    with pytest.raises(KeyError, match="'zz' is not in this split's manifest"):
        skips.update("train", ["zz"])
    # a checkpoint's tallies: merged when the split's ids are the same, ignored (with a warning) if not
    again = SkipLog()
    again.load(skips.state())
    again.track("train", ["a", "b", "c", "d"])
    assert again.counts()["train"] == counts
    other = SkipLog()
    other.load(skips.state())
    other.track("train", ["a", "b"])
    assert other.counts()["train"]["drawn"] == 0
    assert not list(skips.state_dict()) and not list(other.state_dict())  # never in the module's state dict (strict loading)


def test_a_skipped_batch_steps_without_changing_a_weight(tmp_path):
    """An all-bad batch is a zero-loss step: global_step moves on, AdamW (momentum, weight decay) does not."""
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader

    from rewiring.skips import SkippableSteps

    class Toy(SkippableSteps, LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
            self.unchanged: list[bool] = []

        def training_step(self, batch, batch_idx):
            if isinstance(batch, SkippedBatch):
                self._before = [p.detach().clone() for p in self.parameters()]
                return self.skip_step()
            self._before = None
            return self.lin(batch).pow(2).mean()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self._before is not None:
                self.unchanged.append(
                    all(torch.equal(a, b) for a, b in zip(self._before, self.parameters(), strict=True))
                )

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)

    data = [SkippedBatch([("x", "nan")]) if k in (2, 5) else torch.ones(1, 2) for k in range(8)]
    toy = Toy()
    trainer = Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(toy, DataLoader(data, batch_size=None, collate_fn=lambda x: x))
    assert trainer.global_step == 8 and toy.unchanged == [True, True]


@pytest.mark.slow
def test_ddp_counts_every_ranks_share_and_keeps_the_grid(ks_with_bad_audio, tmp_path):
    """Two CPU processes (gloo), each with half of every split: the counts are the whole splits', a
    rank whose batch is all bad steps with the other, and validation stays at K, 2K."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "rewiring", "fit",
        "--config", f"{REPO}/conf/base.yaml",
        "--config", f"{REPO}/conf/encoder/tiny-random.yaml",
        "--config", f"{REPO}/conf/tasks/ks.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.logger.init_args.version=run",
        f"--data.init_args.root={ks_with_bad_audio}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=1",
        "--data.init_args.bucket_by_length=false",
        f"--model.init_args.feature_cache={tmp_path / 'features'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=10",  # two epochs of 5 batches a rank
        "--trainer.val_check_interval=5",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    conv = json.loads((tmp_path / "runs" / "ks" / "run" / "convergence.json").read_text())
    assert conv["global_step"] == 10 and conv["curve"]["steps"] == [5, 10]
    assert conv["skipped"] == EXPECTED
    lines = [line for line in done.stderr.splitlines() if "utterances used" in line]
    assert lines == [
        "train: 6 of 9 utterances used (3 skipped: 1 too_short, 1 truncated, 1 unreadable)",
        "dev: 4 of 7 utterances used (3 skipped: 1 too_short, 1 truncated, 1 unreadable)",
    ]
