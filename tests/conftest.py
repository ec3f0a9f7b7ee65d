"""Shared fixtures: everything runs offline on the CPU, on data the tests build themselves."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def task_cli(tmp_path):
    """`cli_main` for one task on the tiny random encoder under fast_dev_run (batch 2, no workers),
    everything written under tmp_path: `task_cli("asr", root, *extra_args, run=False)`."""
    from rewiring.experiment.train import cli_main

    def run_cli(task: str, root: Path, *extra: str, run: bool = True):
        return cli_main(
            [
                *(["fit"] if run else []),
                "--config", str(REPO / "conf/base.yaml"),
                "--config", str(REPO / "conf/encoder/tiny-random.yaml"),
                "--config", str(REPO / f"conf/tasks/{task}.yaml"),
                "--trainer.fast_dev_run=true",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                f"--data.init_args.root={root}",
                "--data.init_args.num_workers=0",
                "--data.init_args.batch_size=2",
                f"--model.init_args.feature_cache={tmp_path / 'features'}",  # never the repo's cache/
                *extra,
            ],
            run=run,
        )  # fmt: skip

    return run_cli


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


SENTENCES = [
    "turn on the lights in the kitchen",
    "play some music by the beatles",
    "what is the weather like tomorrow",
    "set an alarm for seven in the morning",
    "the quick brown fox jumps over the lazy dog",
    "please call my mother this evening",
    "how far is the nearest station",
    "book a table for two at eight",
]
VOICES = ["en-us+m3", "en-gb+f2", "en-sc+m1", "en-us+f4"]


@pytest.fixture(scope="session")
def unlabelled(tmp_path_factory) -> Path:
    """Eight spoken sentences (espeak voices) plus one with no text and one the TTS can't say."""
    from rewiring.manifest import Record, write_manifest
    from rewiring.synthesis import EspeakSynthesizer

    root = tmp_path_factory.mktemp("unlabelled")
    (root / "audio").mkdir()
    records = []
    for i, text in enumerate(SENTENCES):
        wav, sr = EspeakSynthesizer(voice=VOICES[i % len(VOICES)]).synthesize(text)
        sf.write(root / "audio" / f"u{i}.wav", wav, sr)
        records.append(Record(id=f"u{i}", audio=f"audio/u{i}.wav", duration=len(wav) / sr, text=text))
    wav = np.asarray(sf.read(root / "audio" / "u0.wav")[0], dtype=np.float32)
    sf.write(root / "audio" / "notext.wav", wav, 22050)
    records.append(Record(id="notext", audio="audio/notext.wav", duration=len(wav) / 22050))
    records.append(Record(id="weird", audio="audio/notext.wav", duration=len(wav) / 22050, text="日本語"))
    write_manifest(root / "train.jsonl", records)
    return root / "train.jsonl"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The embedded corpus at size tiny, built once per session (seconds); its root folder."""
    from rewiring.corpus import build_corpus

    root = tmp_path_factory.mktemp("embedded") / "tiny"
    build_corpus(root, "tiny", progress=False, processes=1)
    return root
