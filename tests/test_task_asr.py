"""ASR: the LibriSpeech adapter on a tiny folder in the real layout (flac clips made here), and the module."""

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from rewiring.manifest import read_manifest
from tasks import asr

SR = 16000


def _clip(path, seconds=0.25, freq=440.0, fmt=None):
    t = np.arange(int(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), SR, format=fmt)


def _librispeech(root):
    """root/LibriSpeech/<subset>/<spk>/<chapter>/{<spk>-<chapter>.trans.txt, <utt>.flac}."""
    layout = {
        "train-clean-100": ("19", "198", ["NORTHANGER ABBEY", "THIS LITTLE WORK"]),
        "dev-clean": ("84", "121123", ["GO DO YOU HEAR"]),
        "test-clean": ("61", "70968", ["HE BEGAN A CONFUSED COMPLAINT"]),
    }
    for subset, (spk, ch, texts) in layout.items():
        folder = root / "LibriSpeech" / subset / spk / ch
        lines = []
        for i, text in enumerate(texts):
            utt = f"{spk}-{ch}-{i:04d}"
            _clip(folder / f"{utt}.flac", seconds=0.25 + 0.05 * i)
            lines.append(f"{utt} {text}\n")
        (folder / f"{spk}-{ch}.trans.txt").write_text("".join(lines))
    return root


def test_prepare_librispeech(tmp_path):
    root = _librispeech(tmp_path / "corpus")
    counts = asr.prepare(root, tmp_path / "out")  # the parent of LibriSpeech/ is accepted
    assert counts == {"train": 2, "dev": 1, "test": 1}
    train = read_manifest(tmp_path / "out" / "asr" / "train.jsonl")
    assert [r.id for r in train] == ["19-198-0000", "19-198-0001"]
    assert train[0].text == "northanger abbey"  # lower-cased
    assert train[0].speaker == "19"
    assert train[0].duration == pytest.approx(0.25)
    assert train[1].duration == pytest.approx(0.30)
    assert (tmp_path / "out" / "asr" / "train.jsonl").exists()
    line = json.loads((tmp_path / "out" / "asr" / "test.jsonl").read_text().splitlines()[0])
    assert line["audio"].endswith("61-70968-0000.flac")


def test_prepare_librispeech_errors_name_the_file(tmp_path):
    root = _librispeech(tmp_path / "corpus") / "LibriSpeech"
    trans = root / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    flac = root / "dev-clean" / "84" / "121123" / "84-121123-0000.flac"

    flac.unlink()
    with pytest.raises(FileNotFoundError, match="84-121123-0000.flac"):
        asr.prepare(root, tmp_path / "out")
    _clip(flac)

    trans.write_text("84-121123-0000 GO DO YOU HEAR\nthis line is not an utterance\n")
    with pytest.raises(ValueError, match=r"84-121123\.trans\.txt:2: malformed"):
        asr.prepare(root, tmp_path / "out")
    trans.write_text("84-121123-0000\n")
    with pytest.raises(ValueError, match=r"trans\.txt:1: utterance 84-121123-0000 has no transcript"):
        asr.prepare(root, tmp_path / "out")

    with pytest.raises(FileNotFoundError, match="dev-other"):
        asr.prepare(root, tmp_path / "out", dev=("dev-other",))


# ----------------------------------------------------------------------------- the module

@pytest.mark.parametrize("protocol", ["superb", "finetune"])
def test_fast_dev_run(task_cli, tiny_corpus, tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    cli = task_cli("asr", tiny_corpus, f"--model.init_args.protocol={protocol}")
    model = cli.model
    assert isinstance(model, asr.SpeechRecognition)
    assert model.primary_metric == "val/wer" and model.metric_mode == "min"
    logged = cli.trainer.callback_metrics
    for key in ("train/loss", "val/wer", "val/cer", "val/wer_best"):
        assert key in logged, key
    assert 0.0 <= float(logged["val/wer"])
    # the vocabulary came from the data module: the train transcripts' characters, blank first
    assert model.vocab.tokens[0] == "<blank>" and " " in model.vocab.tokens
    assert model.spec == cli.datamodule.spec
    groups = {g["name"] for g in model.parameter_groups()}
    assert groups == ({"head"} if protocol == "superb" else {"head", "encoder"})


def _force_output(model, token: int) -> None:
    """Make the CTC head emit `token` on every frame (0 = blank)."""
    with torch.no_grad():
        model.head.linear.weight.zero_()
        model.head.linear.bias.fill_(-50.0)
        model.head.linear.bias[token] = 50.0


@pytest.mark.parametrize("task", ["asr", "sf"])  # the two CTC tasks share the head and the warning
def test_blank_only_model_warns(task, task_cli, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = task_cli(task, tiny_corpus, run=False)
    model, dm = cli.model, cli.datamodule
    dm.setup("validate")
    model.install_spec(dm.spec)
    _force_output(model, 0)
    with pytest.warns(RuntimeWarning, match="predicts only blanks"):
        cli.trainer.validate(model, datamodule=dm)
    assert float(cli.trainer.callback_metrics["val/blank_rate"]) == 1.0
    # a model that says something (one letter everywhere -> "a" after collapsing) does not warn
    _force_output(model, model.vocab.index["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        cli.trainer.validate(model, datamodule=dm)


def test_greedy_transcripts_score_with_torchmetrics(tiny_corpus):
    # WER/CER are torchmetrics' over greedy hypotheses; a perfect hypothesis scores 0.
    dm = asr.SpeechRecognitionData(root=str(tiny_corpus), batch_size=2)
    dm.setup("validate")
    rec = dm.records["dev"][0]
    ids, text = dm.target(rec)
    assert dm.vocab.decode(ids) == text == rec.text
