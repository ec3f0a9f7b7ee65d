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


@pytest.mark.slow
def test_ddp_rewiring_gathers_negatives_across_processes(unlabelled, tmp_path):
    """Two CPU processes (gloo), 3 pairs each: the contrastive batch must hold all 6 pairs."""
    logs = tmp_path / "csv"
    cmd = [
        sys.executable, "-m", "rewiring", "fit",
        "--config", "conf/base.yaml",
        "--config", "conf/encoder/tiny-random.yaml",
        "--config", "conf/stages/rewire.yaml",
        f"--data.init_args.manifest={unlabelled}",
        "--data.init_args.pairing=twin",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=3",
        "--data.init_args.bucket_by_length=false",
        "--model.init_args.export_dir=null",
        "--model.init_args.isotropy_manifest=null",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={logs}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = logs.rglob("metrics.csv")
    pairs = [float(r["train/contrast_pairs"]) for r in csv.DictReader(open(metrics)) if r.get("train/contrast_pairs")]
    assert pairs and all(p == 6.0 for p in pairs), pairs
