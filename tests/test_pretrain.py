"""wav2vec 2.0 pre-training of the tiny encoder, and a DDP rewiring run that gathers negatives across processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewiring.encoder import SpeechEncoder
from rewiring.experiment.train import cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_fast_dev_run_trains_and_exports(unlabelled, tmp_path):
    export = tmp_path / "tiny"
    cli = cli_main(
        [
            "fit",
            "--config", "conf/base.yaml",
            "--config", "conf/encoder/tiny-random.yaml",
            "--config", "conf/stages/pretrain.yaml",
            f"--data.init_args.manifest={unlabelled}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
            f"--model.init_args.export_dir={export}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.max_steps=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert metrics["train/perplexity"] > 1.0
    encoder = SpeechEncoder(str(export))
    # the export holds the trained weights, not the random initialisation
    trained = cli.model.encoder.model.state_dict()
    for name, value in encoder.model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_missing_tiny_encoder_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make pretrain"):
        SpeechEncoder(str(tmp_path / "data" / "encoders" / "tiny"))


def _ddp_rewiring(manifest: Path, logs: Path, *extra: str) -> list[float]:
    """A twin rewiring fit on two CPU processes (gloo), 3 pairs a rank; the logged contrast_pairs."""
    cmd = [
        sys.executable, "-m", "rewiring", "fit",
        "--config", "conf/base.yaml",
        "--config", "conf/encoder/tiny-random.yaml",
        "--config", "conf/stages/rewire.yaml",
        f"--data.init_args.manifest={manifest}",
        "--data.init_args.pairing=twin",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=3",
        "--data.init_args.bucket_by_length=false",
        "--model.init_args.export_dir=null",
        "--model.init_args.isotropy_manifest=null",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={logs}",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = logs.rglob("metrics.csv")
    return [float(r["train/contrast_pairs"]) for r in csv.DictReader(open(metrics)) if r.get("train/contrast_pairs")]


@pytest.mark.slow
def test_ddp_rewiring_gathers_negatives_across_processes(unlabelled, tmp_path):
    """Two CPU processes (gloo), 3 pairs each: the contrastive batch must hold all 6 pairs."""
    pairs = _ddp_rewiring(unlabelled, tmp_path / "csv", "--trainer.max_steps=2")
    assert pairs and all(p == 6.0 for p in pairs), pairs


@pytest.mark.slow
def test_ddp_rewiring_with_uneven_skips_gathers_what_each_rank_has(unlabelled, tmp_path):
    """Silent files (skipped) leave the two ranks' batches with different pair counts, some with one
    or none: every step still gathers (padded), the contrastive batch is the pairs that are left,
    and the run ends (before, a rank with fewer than two pairs skipped the collective and hung)."""
    import numpy as np
    import soundfile as sf

    from rewiring.manifest import Record, audio_path, read_manifest, write_manifest

    good = [r for r in read_manifest(unlabelled) if r.text and r.id.startswith("u")][:5]
    records = [Record(**{**r.to_dict(), "audio": str(audio_path(unlabelled, r))}) for r in good]
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    records += [Record(id=f"silent{i}", audio=str(tmp_path / "silent.wav"), duration=1.0) for i in range(7)]
    manifest = tmp_path / "uneven.jsonl"
    write_manifest(manifest, records)
    pairs = _ddp_rewiring(manifest, tmp_path / "csv", "--trainer.max_epochs=3")
    # 5 good utterances over 2 ranks x 2 batches of 3 an epoch: some steps' totals are odd (the
    # ranks held different counts), and none is above the 5 there are
    assert pairs and any(p % 2 for p in pairs) and all(2 <= p <= 5 for p in pairs), pairs


def test_crops_decode_only_their_window(tmp_path, monkeypatch):
    """A long recording costs its crop: the window is drawn from the manifest's duration and only its
    frames are read; a short one is read whole."""
    import numpy as np
    import soundfile as sf

    from rewiring import audio
    from rewiring.manifest import Record
    from rewiring.pretrain import CropDataset

    rng = np.random.default_rng(0)
    sf.write(tmp_path / "long.wav", 0.1 * rng.standard_normal(16000 * 60).astype(np.float32), 16000)
    sf.write(tmp_path / "short.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    records = [Record(id="long", audio="long.wav", duration=60.0), Record(id="short", audio="short.wav", duration=1.0)]
    ds = CropDataset(tmp_path / "m.jsonl", records, crop_seconds=2.0, on_bad_audio="error")
    reads = []
    read = audio.sf.read
    monkeypatch.setattr(audio.sf, "read", lambda *a, **k: reads.append((k.get("start"), k.get("stop"))) or read(*a, **k))
    torch.manual_seed(0)
    uid, wav = ds[0]
    (start, stop), = reads
    whole, _ = sf.read(tmp_path / "long.wav", dtype="float32")
    assert uid == "long" and wav.shape == (32000,) and stop - start == 32000
    assert torch.equal(wav, torch.from_numpy(whole[start:stop]))
    short, _ = sf.read(tmp_path / "short.wav", dtype="float32")
    reads.clear()
    uid, wav = ds[1]
    assert uid == "short" and len(reads) == 1 and torch.equal(wav, torch.from_numpy(short))  # the whole file
