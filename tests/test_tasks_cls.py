"""ks, ic, sid: real-corpus adapters on tiny folders in each corpus's layout, and the CLI end to end
(fast_dev_run under both protocols; checkpoints, validate/test and resume for ks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch import Callback

from rewiring.experiment.train import cli_main
from rewiring.manifest import audio_path, read_manifest

SR = 16000


def tone(path: Path, seconds: float = 1.0, freq: float = 440.0, noise: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    if noise:
        wav = 0.1 * np.random.default_rng(int(freq)).standard_normal(t.size)
    else:
        wav = 0.3 * np.sin(2 * np.pi * freq * t)
    sf.write(path, wav.astype(np.float32), SR, subtype="PCM_16")
    return path


def check_audio(manifest: Path) -> list:
    records = read_manifest(manifest)
    for r in records:
        assert audio_path(manifest, r).is_file(), r
    return records


# ================================================================ ks: Speech Commands v0.01


@pytest.fixture
def speech_commands(tmp_path) -> Path:
    root = tmp_path / "speech_commands_v0.01"
    files = {
        "yes": ["aaa_nohash_0", "bbb_nohash_0", "ccc_nohash_1"],
        "no": ["aaa_nohash_0", "ddd_nohash_0"],
        "bed": ["eee_nohash_0", "fff_nohash_0"],  # not a command word: _unknown_
    }
    for i, (word, stems) in enumerate(files.items()):
        for j, stem in enumerate(stems):
            tone(root / word / f"{stem}.wav", freq=300 + 50 * i + 10 * j)
    (root / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\nbed/fff_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/ddd_nohash_0.wav\n\n")
    tone(root / "_background_noise_" / "white_noise.wav", seconds=10.5, noise=True)
    tone(root / "_background_noise_" / "hum.wav", seconds=3.2, freq=60)
    (root / "_background_noise_" / "README.md").write_text("noise")
    return root


def test_ks_prepare_reads_speech_commands(speech_commands, tmp_path):
    from tasks.ks import prepare

    out = tmp_path / "manifests"
    counts = prepare(speech_commands, out)
    # silence: white 10 clips -> 8/1/1, hum 3 clips -> 1/1/1
    assert counts == {"train": 4 + 9, "dev": 2 + 2, "test": 1 + 2}
    train = {r.id: r for r in check_audio(out / "ks" / "train.jsonl")}
    dev = {r.id: r for r in check_audio(out / "ks" / "dev.jsonl")}
    test = {r.id: r for r in check_audio(out / "ks" / "test.jsonl")}
    assert not (set(train) & set(dev)) and not (set(train) & set(test)) and not (set(dev) & set(test))
    assert train["yes/aaa_nohash_0"].label == "yes" and train["yes/aaa_nohash_0"].speaker == "aaa"
    assert train["bed/eee_nohash_0"].label == "_unknown_"
    assert dev["bed/fff_nohash_0"].label == "_unknown_" and "no/ddd_nohash_0" in test
    silence = [r for r in train.values() if r.label == "_silence_"]
    assert len(silence) == 9 and all(r.duration == 1.0 for r in silence)
    assert sf.info(str(audio_path(out / "ks" / "train.jsonl", silence[0]))).frames == SR
    assert not any(r.meta and r.meta.get("noise") == "README.md" for r in train.values())


def test_ks_prepare_errors_name_the_file(speech_commands, tmp_path):
    from tasks.ks import prepare

    (speech_commands / "testing_list.txt").write_text("no/zzz_nohash_0.wav\n")
    with pytest.raises(FileNotFoundError, match=r"testing_list\.txt:1: .*zzz_nohash_0\.wav"):
        prepare(speech_commands, tmp_path / "m")
    (speech_commands / "testing_list.txt").write_text("no/ddd_nohash_0.wav\njust-a-name\n")
    with pytest.raises(ValueError, match=r"testing_list\.txt:2"):
        prepare(speech_commands, tmp_path / "m")
    (speech_commands / "validation_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"validation_list\.txt"):
        prepare(speech_commands, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare(tmp_path / "nowhere", tmp_path / "m")


def test_ks_data_module_on_prepared_corpus(speech_commands, tmp_path):
    from tasks.ks import KeywordSpottingData, prepare

    prepare(speech_commands, tmp_path / "m")
    dm = KeywordSpottingData(root=str(tmp_path / "m"), batch_size=4)
    dm.setup("fit")
    assert dm.spec == {"classes": ["_silence_", "_unknown_", "no", "yes"]}
    b = next(iter(dm.val_dataloader()))
    assert b.waveforms.shape[0] == 4 and b.targets.tolist()[:2] == [3, 1]


def _speakers(split: str, n: int) -> list[str]:
    """n speaker ids that SUPERB's hash split (s3prl's split_dataset) puts in ``split``."""
    from tasks.ks import _hash_split

    found = (f"{i:08x}" for i in range(10_000))
    return [s for s in found if _hash_split(f"{s}_nohash_0.wav") == split][:n]


@pytest.fixture
def superb_speech_commands(tmp_path) -> tuple[Path, Path]:
    """A train archive whose lists agree with SUPERB's hash split, and a separate test-set archive."""
    (t1, t2), (d1,), (x1, n1, n2) = _speakers("train", 2), _speakers("dev", 1), _speakers("test", 3)
    root = tmp_path / "speech_commands_v0.01"
    words = {"yes": [t1, t2, d1, x1], "no": [t1, d1, x1], "bed": [t2, d1]}
    for i, (word, speakers) in enumerate(words.items()):
        for j, spk in enumerate(speakers):
            tone(root / word / f"{spk}_nohash_0.wav", freq=300 + 50 * i + 10 * j)
    (root / "validation_list.txt").write_text("".join(f"{w}/{d1}_nohash_0.wav\n" for w in words))
    (root / "testing_list.txt").write_text(f"yes/{x1}_nohash_0.wav\nno/{x1}_nohash_0.wav\n")
    tone(root / "_background_noise_" / "white_noise.wav", seconds=10.5, noise=True)
    tone(root / "_background_noise_" / "hum.wav", seconds=3.2, freq=60)
    test_root = tmp_path / "speech_commands_test_set_v0.01"
    for name in (f"yes/{x1}_nohash_0", f"yes/{n1}_nohash_0", f"no/{n1}_nohash_0",
                 f"_unknown_/bed_{n1}_nohash_0", f"_unknown_/cat_{n2}_nohash_0"):  # fmt: skip
        tone(test_root / f"{name}.wav", freq=700)
    for k in range(2):
        tone(test_root / "_silence_" / f"noise_{k}.wav", noise=True, freq=900 + k)
    (test_root / "README.md").write_text("test set")
    return root, test_root


def test_ks_prepare_reads_superb_test_set(superb_speech_commands, tmp_path, caplog):
    from tasks.ks import prepare

    root, test_root = superb_speech_commands
    out = tmp_path / "m"
    with caplog.at_level("WARNING", logger="tasks.ks"):
        counts = prepare(root, out, test_root=test_root)
    # silence with the test set: white 10 clips -> 9 train / 1 dev, hum 3 clips -> 2 / 1; none in test
    assert counts == {"train": 4 + 11, "dev": 3 + 2, "test": 7}
    splits = {s: check_audio(out / "ks" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    ids = {s: {r.id for r in recs} for s, recs in splits.items()}
    files = {s: {audio_path(out / "ks" / f"{s}.jsonl", r).resolve() for r in rs} for s, rs in splits.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not ids[a] & ids[b] and not files[a] & files[b], (a, b)
    # test: every file of the test archive, nothing else, labelled by its folder
    assert files["test"] == {f.resolve() for f in test_root.glob("*/*.wav")}
    assert Counter(r.label for r in splits["test"]) == {"yes": 2, "no": 1, "_unknown_": 2, "_silence_": 2}
    unknown = [r for r in splits["test"] if r.label == "_unknown_"]
    assert {r.speaker for r in unknown} == set(_speakers("test", 3)[1:])
    assert sorted(r.text for r in unknown) == ["bed", "cat"]  # the word, from word_speaker_nohash_k.wav
    # dev: the validation list plus a tenth of the noise; train: the rest, testing_list.txt dropped
    listed = {line.removesuffix(".wav") for line in (root / "validation_list.txt").read_text().split()}
    assert {r.id for r in splits["dev"] if r.label != "_silence_"} == listed
    x1 = _speakers("test", 1)[0]
    assert not any(x1 in i for i in ids["train"] | ids["dev"])
    assert {r.label for r in splits["train"]} == {"yes", "no", "_unknown_", "_silence_"}
    assert sum(r.label == "_silence_" for r in splits["train"]) == 11
    messages = [r.getMessage() for r in caplog.records]
    assert not any("not comparable" in m.lower() or "hash" in m for m in messages), messages
    assert any("no folder for" in m and "_unknown_" not in m.split("no folder for")[1] for m in messages)


def test_ks_prepare_without_test_set_warns(superb_speech_commands, tmp_path, caplog):
    from tasks.ks import prepare

    root, _ = superb_speech_commands
    with caplog.at_level("WARNING", logger="tasks.ks"):
        counts = prepare(root, tmp_path / "m")
    assert counts == {"train": 4 + 9, "dev": 3 + 2, "test": 2 + 2}  # 80/10/10 noise, testing_list.txt
    test = check_audio(tmp_path / "m" / "ks" / "test.jsonl")
    x1 = _speakers("test", 1)[0]
    assert {r.id for r in test if r.label != "_silence_"} == {f"yes/{x1}_nohash_0", f"no/{x1}_nohash_0"}
    warning = [r.getMessage() for r in caplog.records if "--test_root" in r.getMessage()]
    assert len(warning) == 1 and "NOT comparable with SUPERB" in warning[0]


def test_ks_prepare_test_set_checks(superb_speech_commands, tmp_path, caplog):
    from tasks.ks import prepare

    root, test_root = superb_speech_commands
    with pytest.raises(ValueError, match=r"_background_noise_, bed are not KS classes.*test_set_v0"):
        prepare(root, tmp_path / "m", test_root=root)  # the train archive given as the test set
    with pytest.raises(FileNotFoundError, match="test set folder not found"):
        prepare(root, tmp_path / "m", test_root=tmp_path / "nowhere")
    # an utterance of train in the test set (a test set of another version) is named
    t1, t2 = _speakers("train", 2)
    tone(test_root / "_unknown_" / f"bed_{t2}_nohash_0.wav")
    with caplog.at_level("WARNING", logger="tasks.ks"):
        prepare(root, tmp_path / "m", test_root=test_root)
    assert any("1 utterances of the test set" in r.getMessage() for r in caplog.records)
    # lists that disagree with SUPERB's hash split are named
    (root / "validation_list.txt").write_text(f"yes/{t1}_nohash_0.wav\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.ks"):
        prepare(root, tmp_path / "m", test_root=test_root)
    assert any("not in the split SUPERB's hash gives them" in r.getMessage() for r in caplog.records)


def test_prepare_command_passes_test_root_only_where_taken(superb_speech_commands, tmp_path, capsys):
    from rewiring.experiment.commands import prepare

    root, test_root = superb_speech_commands
    prepare("speech_commands", out=str(tmp_path / "m"), root=str(root), test_root=str(test_root))
    assert "speech_commands test: 7" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--test_root is not an option"):
        prepare("voxceleb1", out=str(tmp_path / "v"), root=str(root), test_root=str(test_root))


# ================================================================ ic: Fluent Speech Commands


@pytest.fixture
def fluent(tmp_path) -> Path:
    root = tmp_path / "fsc"
    ds = root / "fluent_speech_commands_dataset"
    rows = {
        "train": [("spkA", "turn on the lights", "activate", "lights", "none"),
                  ("spkA", "bring me my shoes", "bring", "shoes", "none"),
                  ("spkB", "heat up the kitchen", "increase", "heat", "kitchen")],
        "valid": [("spkC", "lights on", "activate", "lights", "none")],
        "test": [("spkD", "turn the heat up in the kitchen", "increase", "heat", "kitchen")],
    }  # fmt: skip
    for split, items in rows.items():
        lines = [",path,speakerId,transcription,action,object,location"]
        for i, (spk, text, *labels) in enumerate(items):
            rel = f"wavs/speakers/{spk}/{split}-{i}.wav"
            tone(ds / rel, seconds=1.2, freq=200 + 30 * i)
            lines.append(f'{i},{rel},{spk},"{text}",{",".join(labels)}')
        (ds / "data").mkdir(parents=True, exist_ok=True)
        (ds / "data" / f"{split}_data.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ic_prepare_reads_fluent_speech_commands(fluent, tmp_path):
    from tasks.ic import prepare

    counts = prepare(fluent, tmp_path / "m")
    assert counts == {"train": 3, "dev": 1, "test": 1}
    train = check_audio(tmp_path / "m" / "ic" / "train.jsonl")
    r = train[2]
    assert r.id == "speakers/spkB/train-2" and r.speaker == "spkB" and r.text == "heat up the kitchen"
    assert r.labels == {"action": "increase", "object": "heat", "location": "kitchen"}
    # the dataset folder itself works as ROOT too
    assert prepare(fluent / "fluent_speech_commands_dataset", tmp_path / "m2") == counts


def test_ic_prepare_errors_name_the_file(fluent, tmp_path):
    from tasks.ic import prepare

    data = fluent / "fluent_speech_commands_dataset" / "data"
    text = (data / "test_data.csv").read_text()
    (data / "test_data.csv").write_text(text.replace("test-0.wav", "gone.wav"))
    with pytest.raises(FileNotFoundError, match=r"test_data\.csv:2: .*gone\.wav"):
        prepare(fluent, tmp_path / "m")
    (data / "test_data.csv").write_text(text.replace(",location", ",place"))
    with pytest.raises(ValueError, match=r"test_data\.csv: missing column.*location"):
        prepare(fluent, tmp_path / "m")
    (data / "valid_data.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid_data\.csv"):
        prepare(fluent, tmp_path / "m")


def test_ic_exact_match_counts_only_all_three_right():
    from tasks.ic import ExactMatch

    m = ExactMatch()
    m.update(torch.tensor([[1, 2, 3], [1, 2, 0], [0, 0, 0]]), torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]]))
    assert float(m.compute()) == pytest.approx(2 / 3)


# ================================================================ sid: VoxCeleb1


@pytest.fixture
def voxceleb(tmp_path) -> Path:
    root = tmp_path / "vox1"
    lines = []
    for s, spk in enumerate(["id10001", "id10002"]):
        for code, n in (("1", 2), ("2", 1), ("3", 1)):
            for k in range(n):
                rel = f"{spk}/vid{code}{k}/0000{k + 1}.wav"
                tone(root / "wav" / rel, seconds=2.0 + s, freq=150 + 100 * s + 10 * k)
                lines.append(f"{code} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


def test_sid_prepare_reads_voxceleb1(voxceleb, tmp_path):
    from tasks.sid import prepare

    assert prepare(voxceleb, tmp_path / "m") == {"train": 4, "dev": 2, "test": 2}
    train = check_audio(tmp_path / "m" / "sid" / "train.jsonl")
    assert train[0].id == "id10001/vid10/00001" and train[0].speaker == "id10001"
    assert train[2].duration == pytest.approx(3.0)


def test_sid_prepare_errors_name_the_file(voxceleb, tmp_path):
    from tasks.sid import prepare

    split = voxceleb / "iden_split.txt"
    text = split.read_text()
    split.write_text(text + "4 id10001/x/1.wav\n")
    with pytest.raises(ValueError, match=r"iden_split\.txt:9"):
        prepare(voxceleb, tmp_path / "m")
    split.write_text(text + "1 id10009/x/00001.wav\n")
    with pytest.raises(FileNotFoundError, match=r"iden_split\.txt:9: .*id10009/x/00001\.wav"):
        prepare(voxceleb, tmp_path / "m")
    split.unlink()
    with pytest.raises(FileNotFoundError, match=r"iden_split\.txt"):
        prepare(voxceleb, tmp_path / "m")


def test_sid_crops_training_reads_whole_for_eval(voxceleb, tmp_path):
    from tasks.sid import SpeakerIdentificationData, prepare

    prepare(voxceleb, tmp_path / "m")
    dm = SpeakerIdentificationData(root=str(tmp_path / "m"), train_max_seconds=0.5, batch_size=8)
    dm.setup("fit")
    assert dm.spec == {"classes": ["id10001", "id10002"]}
    train = next(iter(dm.train_dataloader()))
    assert train.lengths.tolist() == [SR // 2] * 4
    dev = next(iter(dm.val_dataloader()))
    assert sorted(dev.lengths.tolist()) == [2 * SR, 3 * SR]


# ================================================================ the CLI, end to end

REPO = Path(__file__).resolve().parents[1]
BASE = ["--config", f"{REPO}/conf/base.yaml", "--config", f"{REPO}/conf/encoder/tiny-random.yaml"]


def task_args(task: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    """The documented command line, with everything written under OUT (fast_dev_run logs to default_root_dir)."""
    return [
        *BASE,
        "--config",
        f"{REPO}/conf/tasks/{task}.yaml",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--data.init_args.root={corpus}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["superb", "finetune"])
@pytest.mark.parametrize("task", ["ks", "ic", "sid"])
def test_fast_dev_run(task, protocol, tiny_corpus, tmp_path):
    cli = cli_main(
        [
            "fit",
            *task_args(task, tiny_corpus, tmp_path),
            "--trainer.fast_dev_run=true",
            f"--model.init_args.protocol={protocol}",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.encoder.frozen is (protocol == "superb")
    assert cli.model.primary_metric == "val/acc" and "val/acc" in cli.trainer.callback_metrics
    assert not list(tmp_path.rglob("*.ckpt"))  # fast_dev_run writes no checkpoint


class StepProbe(Callback):
    """Test helper: writes the global step each fit starts at, and raises at `kill_at` in a fresh run."""

    def __init__(self, record: str, kill_at: int = -1) -> None:
        self.record = record
        self.kill_at = kill_at

    def on_train_start(self, trainer, pl_module) -> None:
        with open(self.record, "a") as f:
            f.write(f"{trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.kill_at and trainer.ckpt_path is None:
            raise RuntimeError("killed by StepProbe")


@pytest.mark.slow
def test_ks_checkpoints_follow_the_metric_validate_test_and_resume(tiny_corpus, tmp_path):
    record = tmp_path / "starts.txt"
    probe = json.dumps(
        {"class_path": f"{__name__}.StepProbe", "init_args": {"record": str(record), "kill_at": 3}}
    )
    run = tmp_path / "ks" / "run"
    fit = [
        "fit",
        *task_args("ks", tiny_corpus, tmp_path),
        "--model.init_args.protocol=finetune",
        "--model.init_args.freeze_encoder_steps=2",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger.init_args.version=run",
        f"--trainer.callbacks+={probe}",
    ]
    # a fine-tuning run killed after step 3: its last checkpoint is from the validation at step 2
    with pytest.raises(RuntimeError, match="killed"):
        cli_main(fit)
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["task_spec"]["spec"]["classes"][-1] == "yes"
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    (ckpt_state,) = [v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert ckpt_state["monitor"] == "val/acc" and ckpt_state["best_model_score"] is not None

    # resume with the run's own config.yaml: global_step continues from 2 to max_steps
    resumed = cli_main(["fit", "--config", str(run / "config.yaml"), f"--ckpt_path={last}"])
    assert record.read_text().split() == ["0", "2"]
    assert resumed.trainer.global_step == 6
    assert not resumed.model.encoder.frozen  # the warm-up (2 steps) is over
    metrics = resumed.trainer.callback_metrics
    assert {"val/acc", "val/acc_best", "val/loss"} <= set(metrics)
    assert resumed.trainer.checkpoint_callback.monitor == "val/acc"
    assert resumed.trainer.checkpoint_callback.best_model_score is not None
    hparams = (run / "hparams.yaml").read_text()
    assert "data/train_ids_hash" in hparams

    # validate and test from the saved best checkpoint
    for command, key in (("validate", "val/acc"), ("test", "test/acc")):
        cli = cli_main(
            [
                command,
                *task_args("ks", tiny_corpus, tmp_path),
                "--model.init_args.protocol=finetune",
                f"--trainer.logger.init_args.version={command}",
                f"--ckpt_path={best[0]}",
            ]
        )
        assert key in cli.trainer.callback_metrics
        assert 0.0 <= float(cli.trainer.callback_metrics[key]) <= 1.0


@pytest.mark.slow
def test_superb_checkpoints_leave_out_a_frozen_encoder_that_a_folder_rebuilds(tiny_corpus, tmp_path):
    from rewiring.encoder import TINY_CONFIG, SpeechEncoder

    folder = tmp_path / "encoder"
    torch.manual_seed(1)
    SpeechEncoder(TINY_CONFIG).save_pretrained(folder)

    def fit(version: str, *extra: str):
        return cli_main(
            [
                "fit",
                *task_args("ks", tiny_corpus, tmp_path),
                f"--model.init_args.encoder.init_args.source={folder}",
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=2",
                "--trainer.limit_val_batches=1",
                f"--trainer.logger.init_args.version={version}",
                *extra,
            ]
        )

    cli = fit("slim")
    encoder_keys = {"encoder.model." + k for k in cli.model.encoder.model.state_dict()}
    last = tmp_path / "ks" / "slim" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert not encoder_keys & set(saved["state_dict"])  # the frozen encoder is left out ...
    assert "encoder.layer_weights" in saved["state_dict"]  # ... but SUPERB's layer weights train
    assert saved["frozen_encoder"]["tensors"] == len(encoder_keys)
    assert saved["frozen_encoder"]["fingerprint"] == cli.model.encoder.fingerprint()

    full = fit("full", "--model.init_args.save_frozen_encoder=true")
    full_ckpt = tmp_path / "ks" / "full" / "checkpoints" / "last.ckpt"
    assert encoder_keys <= set(torch.load(full_ckpt, map_location="cpu", weights_only=False)["state_dict"])
    assert last.stat().st_size < full_ckpt.stat().st_size / 2
    del full

    # test from the slim checkpoint: the encoder comes back from its folder, strict loading passes
    tested = cli_main(["test", *task_args("ks", tiny_corpus, tmp_path), f"--model.init_args.encoder.init_args.source={folder}",
                       "--trainer.logger.init_args.version=test", f"--ckpt_path={last}"])  # fmt: skip
    assert "test/acc" in tested.trainer.callback_metrics
    # and a resumed fit restores it too
    resumed = cli_main(["fit", "--config", str(tmp_path / "ks" / "slim" / "config.yaml"), "--trainer.max_steps=4",
                        f"--ckpt_path={last}"])  # fmt: skip
    assert resumed.trainer.global_step == 4

    # the folder now holds other weights: a clear error, not a silently different model
    torch.manual_seed(2)
    SpeechEncoder(TINY_CONFIG).save_pretrained(folder)
    with pytest.raises(ValueError, match="left out its frozen encoder"):
        cli_main(["test", *task_args("ks", tiny_corpus, tmp_path), f"--model.init_args.encoder.init_args.source={folder}",
                  "--trainer.logger.init_args.version=test2", f"--ckpt_path={last}"])  # fmt: skip
