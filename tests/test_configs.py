"""Every stage config parses through the real CLI (the paper's recipe included), and says what it claims."""

from __future__ import annotations

import contextlib
import importlib
import io
from pathlib import Path

import pytest
import yaml

from rewiring.experiment.train import cli_main

CONF = Path(__file__).resolve().parents[1] / "conf"


def _print_config(*configs: str) -> dict:
    args = ["fit", "--config", "conf/base.yaml"]
    for c in configs:
        args += ["--config", c]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([*args, "--print_config"])
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("pairing,epochs", [("twin", 1), ("neutral", 7), ("mixed", 3)])
def test_paper_recipe_blocks(pairing, epochs):
    cfg = _print_config(
        "conf/encoder/wav2vec2-large-lv60.yaml", "conf/stages/rewire-paper.yaml", f"conf/stages/paper/{pairing}.yaml"
    )
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["encoder"]["init_args"]["source"] == "facebook/wav2vec2-large-lv60"
    assert model["encoder"]["init_args"]["freeze_feature_encoder"] is False
    assert model["temperature"] == 0.04 and model["projection_dim"] is None
    opt = model["optimizer"]
    assert opt["class_path"] == "torch.optim.AdamW"
    assert opt["init_args"]["lr"] == 1e-6 and opt["init_args"]["weight_decay"] == 0.01
    assert data["batch_size"] == 4 and data["pairing"] == pairing
    assert data["max_seconds"] == 11.25 and data["halve_over"] == 5.625
    assert data["synthesizer"]["class_path"].endswith("FestivalSynthesizer")
    assert cfg["trainer"]["max_epochs"] == epochs


@pytest.mark.parametrize("stage", ["pretrain", "rewire"])
def test_embedded_stages_parse(stage):
    cfg = _print_config("conf/encoder/tiny-random.yaml", f"conf/stages/{stage}.yaml")
    assert cfg["model"]["init_args"]["encoder"]["class_path"] == "rewiring.encoder.SpeechEncoder"


def test_every_yaml_in_conf_is_valid():
    for path in CONF.rglob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def _class_paths(node):
    """Every ``class_path`` value anywhere in a parsed config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path":
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


def test_every_class_path_in_conf_imports():
    seen = 0
    for path in sorted(CONF.rglob("*.yaml")):
        for class_path in _class_paths(yaml.safe_load(path.read_text())):
            assert isinstance(class_path, str) and "." in class_path, f"{path}: class_path {class_path!r}"
            module, name = class_path.rsplit(".", 1)
            assert hasattr(importlib.import_module(module), name), f"{path}: class_path {class_path} does not import"
            seen += 1
    assert seen >= 30  # the walk reaches the task, stage, encoder and sweep configs


def test_wrong_config_value_names_the_field():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        cli_main(["fit", "--config", "conf/base.yaml", "--config", "conf/encoder/tiny-random.yaml",
                  "--config", "conf/stages/rewire.yaml", "--data.init_args.pairing=sideways"])  # fmt: skip
    assert "pairing" in err.getvalue()
