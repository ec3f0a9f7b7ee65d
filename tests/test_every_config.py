"""Every fit config in conf/ runs: a `fast_dev_run` of each stage, task, SUPERB preset and encoder
config, stacked as the README stacks them and shrunk for the CPU (the tiny corpus, batch 2, no
workers, everything written under tmp_path). Hub encoders cannot be fetched offline, so their
configs run with a local folder of the same family in `source`: every other setting they hold is
exercised. Trainer configs for GPUs are parsed (`--print_config`) unless a GPU is present.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rewiring.experiment.train import cli_main

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TASKS = ("asr", "ks", "ic", "sid", "sd", "sf")


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _fit_configs() -> list[str]:
    """Every YAML in conf/ that a `fit` stacks (sweep specs are not fit configs)."""
    return sorted(_rel(p) for p in CONF.rglob("*.yaml") if p.parent.name != "sweep" and p.name != "base.yaml")


def test_the_list_covers_every_kind_of_config():
    kinds = {Path(c).parts[1] for c in _fit_configs()}
    assert kinds == {"encoder", "stages", "tasks", "trainer"}
    assert len(_fit_configs()) >= 25


def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text()) or {}


def _source_family(path: str) -> str | None:
    """The family of an encoder config's `source` when it names one (whisper or wav2vec2)."""
    enc = ((_yaml(path).get("model") or {}).get("init_args") or {}).get("encoder") or {}
    source = (enc.get("init_args") or {}).get("source")
    if isinstance(source, dict):
        return None  # a config dict: built here, nothing to fetch
    return "whisper" if "whisper" in str(source) else "wav2vec2"


@pytest.fixture(scope="module")
def local_encoders(tmp_path_factory) -> dict[str, Path]:
    """A saved folder of each family: what a hub or pre-trained encoder config points at here."""
    from rewiring.encoder import TINY_CONFIG, TINY_WHISPER_CONFIG, SpeechEncoder

    root = tmp_path_factory.mktemp("encoders")
    return {
        "wav2vec2": SpeechEncoder(TINY_CONFIG).save_pretrained(root / "wav2vec2"),
        "whisper": SpeechEncoder(TINY_WHISPER_CONFIG).save_pretrained(root / "whisper"),
    }


def _stack(config: str) -> tuple[list[str], str]:
    """The configs a user stacks with CONFIG (README order), and the stage it runs."""
    parts = Path(config).parts
    kind = parts[1]
    if kind == "tasks":
        task = Path(config).stem
        if parts[2] == "superb":
            return ["conf/encoder/tiny-random.yaml", f"conf/tasks/{task}.yaml", config], task
        return ["conf/encoder/tiny-random.yaml", config], task
    if kind == "stages":
        if parts[2] == "paper":
            return ["conf/encoder/tiny-random.yaml", "conf/stages/rewire-paper.yaml", config], "rewire"
        return ["conf/encoder/tiny-random.yaml", config], Path(config).stem.split("-")[0]
    if kind == "encoder":
        return [config, "conf/tasks/ks.yaml"], "ks"
    return ["conf/encoder/tiny-random.yaml", "conf/tasks/ks.yaml", config], "ks"


def _shrink(stage: str, tiny_corpus: Path, tmp_path: Path) -> list[str]:
    common = [
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
    ]
    if stage in TASKS:
        return [*common, f"--data.init_args.root={tiny_corpus}", f"--model.init_args.feature_cache={tmp_path / 'features'}"]
    manifest = f"--data.init_args.manifest={tiny_corpus / 'unlabelled' / 'train.jsonl'}"
    if stage == "pretrain":
        return [*common, manifest, f"--model.init_args.export_dir={tmp_path / 'export'}"]
    return [
        *common,
        manifest,
        f"--data.init_args.cache_dir={tmp_path / 'tts'}",
        "--data.init_args.prefill_workers=0",
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        "--model.init_args.isotropy_manifest=null",
    ]


def _needs(config: str) -> str | None:
    """Why CONFIG cannot run on this machine (it is then parsed only), or None."""
    text = (REPO / config).read_text()
    trainer = _yaml(config).get("trainer") or {}
    if (trainer.get("accelerator") == "gpu" or "bf16" in str(trainer.get("precision"))) and not torch.cuda.is_available():
        return "a CUDA device"
    if "FestivalSynthesizer" in text and shutil.which("text2wave") is None:
        return "Festival (text2wave)"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("config", _fit_configs())
def test_fast_dev_run(config, tiny_corpus, local_encoders, tmp_path):
    configs, stage = _stack(config)
    args = [a for c in ["conf/base.yaml", *configs] for a in ("--config", str(REPO / c))]
    args += _shrink(stage, tiny_corpus, tmp_path)
    family = _source_family(configs[0]) if configs[0].startswith("conf/encoder/") else None
    if family is not None:
        args.append(f"--model.init_args.encoder.init_args.source={local_encoders[family]}")
    if stage == "rewire" and family == "whisper":
        args.append("--model.init_args.transcription_check=false")  # a random decoder says nothing
    if (why := _needs(config)) is not None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            cli_main(["fit", *args, "--print_config"])
        assert done.value.code in (0, None), out.getvalue()
        printed = yaml.safe_load(out.getvalue())
        assert printed["trainer"] and printed["model"]["class_path"]
        pytest.skip(f"parsed only: running it needs {why}")
    cli = cli_main(["fit", *args])
    assert cli.trainer.state.finished, config
    assert cli.trainer.global_step >= 1, config
