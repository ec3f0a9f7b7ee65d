"""The transformers models behind `SpeechEncoder`: which model types, configs from dicts, building and
loading them, and the settings a run overrides.

- Model types: wav2vec2, HuBERT and WavLM (one conv feature encoder and ``mask_time_indices``), and
  Whisper, of which only the encoder is held.
- A config dict is checked key by key (`PretrainedConfig` would accept a typo silently).
- Weights load from safetensors when the folder has them, else ``torch.load(weights_only=True)``;
  never remote code.
- HF's own masking and LayerDrop are off while a run holds the model (`run_overrides`); `own_values`
  keeps the source's values so an export can restore them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

__all__ = [
    "MODEL_TYPES",
    "build",
    "config_from_dict",
    "family",
    "load_pretrained",
    "own_values",
    "read_do_normalize",
    "run_overrides",
    "save_whisper",
]

# The model types SpeechEncoder knows: all share the conv feature encoder and mask_time_indices.
MODEL_TYPES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "hubert": (HubertConfig, HubertModel),
    "wavlm": (WavLMConfig, WavLMModel),
    "whisper": (WhisperConfig, WhisperEncoder),
}

# Config values a run overrides while it holds the model (HF's own augmentation off); exports restore them.
_RUN_OVERRIDES: dict[str, Any] = {
    "mask_time_prob": 0.0,
    "mask_feature_prob": 0.0,
    "layerdrop": 0.0,
    "apply_spec_augment": True,
}
_WHISPER_RUN_OVERRIDES: dict[str, Any] = {"encoder_layerdrop": 0.0}


def family(config: PretrainedConfig) -> str:
    """The family of a config: "whisper", or "wav2vec2" for wav2vec2, HuBERT and WavLM (one conv front end)."""
    return "whisper" if config.model_type == "whisper" else "wav2vec2"


def config_from_dict(source: dict[str, Any]) -> PretrainedConfig:
    """The config of a dict of config keys ("model_type": wav2vec2 by default); ValueError on an unknown key."""
    values = dict(source)
    model_type = values.pop("model_type", "wav2vec2")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    config_cls = MODEL_TYPES[model_type][0]
    known = set(config_cls().to_dict())
    unknown = sorted(set(values) - known)
    if unknown:  # PretrainedConfig accepts any key silently: a typo would be ignored
        raise ValueError(f"unknown {config_cls.__name__} keys in encoder source: {unknown}")
    return config_cls(**values)


def run_overrides(config: PretrainedConfig) -> dict[str, Any]:
    """The config values a run sets while it holds the model."""
    return _WHISPER_RUN_OVERRIDES if family(config) == "whisper" else _RUN_OVERRIDES


def own_values(config: PretrainedConfig) -> dict[str, Any]:
    """The source's own values of the settings `run_overrides` changes (what an export restores)."""
    return {k: getattr(config, k) for k in run_overrides(config) if hasattr(config, k)}


def build(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised model for a config (Whisper: the encoder alone)."""
    if family(config) == "whisper":
        return WhisperEncoder(config)
    _, model_cls = MODEL_TYPES[config.model_type]
    return model_cls(_build_config(config))


def _build_config(config: PretrainedConfig) -> PretrainedConfig:
    """HF creates the learned mask embedding only when mask_time_prob > 0: make sure it does."""
    if not (config.mask_time_prob > 0 or config.mask_feature_prob > 0):
        copy = config.__class__.from_dict(config.to_dict())
        copy.mask_time_prob = 0.05
        return copy
    return config


def load_pretrained(where: str, local: bool, config: PretrainedConfig) -> PreTrainedModel:
    """The model of a local folder or a hub name `where`, whose config is `config` (Whisper: the encoder)."""
    load = dict(use_safetensors=None, weights_only=True, trust_remote_code=False, dtype=torch.float32)
    if family(config) == "whisper":
        # Only the encoder is kept (an export reloads the decoder): read just its tensors when the
        # folder holds one safetensors file (tiny.en: 0.3 s instead of 1 s a process), else load the whole.
        weights = Path(where) / "model.safetensors"
        if local and weights.is_file():
            return _whisper_encoder_from(weights, config)
        return WhisperForConditionalGeneration.from_pretrained(where, **load).model.encoder
    _, model_cls = MODEL_TYPES[config.model_type]
    return model_cls.from_pretrained(where, config=_build_config(config), **load)


def _whisper_encoder_from(weights: Path, config: PretrainedConfig) -> WhisperEncoder:
    """The encoder of a WhisperForConditionalGeneration safetensors file, loaded strictly."""
    from safetensors import safe_open

    prefix = "model.encoder."
    with safe_open(str(weights), framework="pt") as f:
        state = {k[len(prefix) :]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{weights}: no {prefix}* tensors (not a WhisperForConditionalGeneration checkpoint)")
    model = WhisperEncoder(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_do_normalize(where: str, local: bool, config: PretrainedConfig) -> bool:
    """``do_normalize`` of the source's preprocessor config (when there is none: True for the wav2vec2
    family, False for Whisper)."""
    default = family(config) != "whisper"
    if local:
        path = Path(where) / "preprocessor_config.json"
        if path.is_file():
            return bool(json.loads(path.read_text()).get("do_normalize", default))
        return default
    if family(config) == "whisper":
        return default  # WhisperFeatureExtractor does not normalise unless asked per call
    try:
        return bool(Wav2Vec2FeatureExtractor.from_pretrained(where).do_normalize)
    except OSError:
        return default


# Files of a Whisper folder that belong to its tokenizer and decoding, copied into exports.
_WHISPER_SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "normalizer.json", "added_tokens.json", "special_tokens_map.json",
)  # fmt: skip


def save_whisper(path: Path, encoder: WhisperEncoder, config: WhisperConfig, source: str | None) -> None:
    """A whole `WhisperForConditionalGeneration` folder with `encoder`'s weights and `config`'s
    encoder_layerdrop: the decoder of `source` (random when None), a feature extractor, and the
    tokenizer and generation files of a source folder, so the folder still transcribes."""
    if source is not None:
        full = WhisperForConditionalGeneration.from_pretrained(
            source, use_safetensors=None, weights_only=True, dtype=torch.float32
        )
    else:
        full = WhisperForConditionalGeneration(config)
    full.model.encoder.load_state_dict(encoder.state_dict())
    full.config.encoder_layerdrop = config.encoder_layerdrop
    full.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=int(config.num_mel_bins)).save_pretrained(path)
    if source is not None and Path(source).expanduser().is_dir():
        src = Path(source).expanduser()
        for name in _WHISPER_SIDE_FILES:
            if (src / name).is_file() and Path(src / name).resolve() != (path / name).resolve():
                shutil.copyfile(src / name, path / name)
