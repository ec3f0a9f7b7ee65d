"""SpeechEncoder: the one backbone of every stage (pre-training, rewiring, each task).

It wraps a transformers model of the wav2vec 2.0 family (wav2vec2, HuBERT, WavLM) or a Whisper encoder
(`rewiring.whisper`: log-mel in torch, any length, padded frames masked), built from a hub name,
a local folder or a config dict, and returns frame features from a chosen layer (or the paper's uniform
average of all hidden states, or SUPERB's learned softmax-weighted sum), a frame mask that matches them,
and utterance vectors (mean over real frames). Stages hand encoders to each other as Hugging Face folders
(`save_pretrained`), so a rewired encoder loads in any tool that reads wav2vec 2.0. The frame arithmetic
and pooling are `rewiring.frames`; building and loading the transformers models is `rewiring.hf`.

Decisions worth knowing:
- HF's own masking and LayerDrop are switched off in the loaded config (mask_time_prob = mask_feature_prob
  = layerdrop = 0, apply_spec_augment = True): time masks come only through ``mask_time_indices``, drawn by
  the caller (`rewiring.masking.time_masks`), in train and eval mode alike (HF applies passed indices in
  eval mode too). The model is still built with its learned mask embedding (``masked_spec_embed``, which
  HF only creates when mask_time_prob > 0), and an export restores the source's original values, so the
  folder differs from the source only in its weights.
- Attention mask: models with ``feat_extract_norm == "layer"`` (large-lv60 style, do_stable_layer_norm)
  were pre-trained with padding masks and get the attention mask. ``"group"`` models (wav2vec2-base style)
  were pre-trained without one: HF's docs say to zero-pad and pass no mask; their GroupNorm over time sees
  the padding anyway, so a mask would hide padding the CNN features already depend on. Either way the
  padding is zeroed, and ``frame_mask`` (from the conv length arithmetic) keeps padding out of pooling.
- Inputs are normalised per utterance (zero mean, unit variance over real samples), as HF's
  Wav2Vec2FeatureExtractor does with ``do_normalize`` (read from the source's preprocessor_config.json).
- ``hidden_states`` are the transformer input plus every layer's output (num_layers + 1); the last one is
  ``last_hidden_state`` (after the final LayerNorm of stable-layer-norm models, as in transformers 4.x).
- Whisper: only the encoder is held (the decoder is loaded again from the source when exporting, so a
  rewired Whisper folder still transcribes); inputs are not normalised unless the source's
  preprocessor says so (Whisper's log-mel has its own scaling); the "feature encoder" that
  `freeze_feature_encoder` freezes is its two convolutions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, Wav2Vec2FeatureExtractor

from rewiring import hf, whisper
from rewiring.frames import config_frame_layout, masked_mean

__all__ = [
    "TINY_CONFIG",
    "TINY_WHISPER_CONFIG",
    "WAV2VEC2_CONV",
    "EncoderOutput",
    "SpeechEncoder",
    "looks_like_path",
]

log = logging.getLogger(__name__)

# wav2vec2-base's conv feature encoder, which is also transformers' default for the wav2vec2 family:
# 16 kHz -> 50 frames/s, a 400-sample receptive field (`rewiring.frames.config_frame_layout` reads it).
WAV2VEC2_CONV: dict[str, list[int]] = {
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
}

# The project's tiny encoder: wav2vec2-base's conv stack at 64 channels, a 4-layer, 128-d Transformer,
# and a small quantizer for wav2vec 2.0 pre-training. conf/encoder/tiny-random.yaml is the same config,
# less the conv layout, which it gets as the default (a test checks).
TINY_CONFIG: dict[str, Any] = {
    "model_type": "wav2vec2",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "conv_dim": [64, 64, 64, 64, 64, 64, 64],
    **WAV2VEC2_CONV,
    "conv_bias": False,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "num_conv_pos_embeddings": 32,
    "num_conv_pos_embedding_groups": 8,
    "num_codevector_groups": 2,
    "num_codevectors_per_group": 64,
    "codevector_dim": 64,
    "proj_codevector_dim": 64,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "layerdrop": 0.0,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
}

# A small random Whisper (2 layers, 64-d, Whisper's front end: 80 mels, 50 frames/s) for tests; the
# small vocabulary keeps its decoder, which exports carry, tiny too.
TINY_WHISPER_CONFIG: dict[str, Any] = {
    "model_type": "whisper",
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 128,
    "num_mel_bins": 80,
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 3,
    "suppress_tokens": [],
    "begin_suppress_tokens": [],
    "max_target_positions": 64,
}

Layers = int | Literal["average", "weighted", "last"]


@dataclass
class EncoderOutput:
    features: Tensor  # [B, F, D] per `layers`
    frame_mask: Tensor  # [B, F] bool, True = real frame
    hidden_states: tuple[Tensor, ...]  # num_layers + 1 tensors [B, F, D]
    pooled: Tensor  # [B, D] mean of features over real frames


def looks_like_path(source: str) -> bool:
    """Whether an encoder source string is meant as a local folder, existing or not: hub ids are 'name'
    or 'org/name', anything else path-like ('./x', '/x', 'a/b/c', 'x/', '~/x') is a folder."""
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or source.endswith("/")
        or source.count("/") > 1
        or "\\" in source
    )


class SpeechEncoder(nn.Module):
    """A wav2vec 2.0-family or Whisper encoder with layer selection, pooling, freezing and HF export.

    Args:
        source: hub name, local folder (an HF export), or a dict of config keys ("model_type": wav2vec2,
            hubert, wavlm or whisper; default wav2vec2) for a randomly initialised model.
        layers: which features to return: a hidden-state index (0 = transformer input), "last",
            "average" (uniform mean of all hidden states: the paper's) or "weighted" (learned softmax
            weights over all hidden states: SUPERB's).
        freeze_feature_encoder: keep the conv front end fixed (wav2vec2's CNN, Whisper's two convs;
            the paper trains it).
        freeze: keep the whole model fixed (SUPERB protocol): it then runs in eval mode under no_grad;
            the layer weights of "weighted" still train. `set_frozen` changes it during training.
        normalize: normalise each input to zero mean and unit variance over its real samples; None reads
            ``do_normalize`` from the source's preprocessor_config.json (when there is none: True for
            the wav2vec2 family, False for Whisper).
    """

    def __init__(
        self,
        source: str | dict[str, Any],
        layers: int | Literal["average", "weighted", "last"] = "average",
        freeze_feature_encoder: bool = True,
        freeze: bool = False,
        normalize: bool | None = None,
    ) -> None:
        super().__init__()
        self.source = source if isinstance(source, str) else dict(source)
        self.model, normalize_default, self._export_values = self._load(source)
        config = self.model.config
        self.family = hf.family(config)
        for key, value in hf.run_overrides(config).items():
            setattr(config, key, value)
        self.normalize = normalize_default if normalize is None else bool(normalize)
        self.frame_layout = config_frame_layout(config)
        if self.family == "whisper":
            self.log_mel = whisper.LogMel(int(config.num_mel_bins))
            self.uses_attention_mask = True  # padded frames are masked in every layer (rewiring.whisper)
        else:
            # Padding masks only for the models pre-trained with them (see the module docstring).
            self.uses_attention_mask = config.feat_extract_norm == "layer" or bool(config.do_stable_layer_norm)

        self.layers: int | str = "average"
        self.layer_weights: nn.Parameter | None = None
        self.freeze_feature_encoder = freeze_feature_encoder
        self.frozen = False
        self.configure(layers=layers, freeze=freeze)
        self.train(True)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "encoder %s: %s, %d layers, %.2fM parameters",
            self.describe(),
            config.model_type,
            self.num_layers,
            n_params / 1e6,
        )

    # ---------------------------------------------------------------- loading and export
    @staticmethod
    def _load(source: str | dict[str, Any]) -> tuple[PreTrainedModel, bool, dict[str, Any]]:
        """Build or load the HF model; returns it, the default for `normalize`, and the source's own
        values of the settings the run overrides (for export)."""
        if isinstance(source, dict):
            config = hf.config_from_dict(source)
            return hf.build(config), hf.family(config) != "whisper", hf.own_values(config)
        if not isinstance(source, str) or not source:
            raise ValueError(f"encoder source must be a hub name, a folder or a config dict, got {source!r}")

        folder = Path(source).expanduser()
        if folder.exists():
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"encoder folder {folder} has no config.json (not an HF model folder)"
                )
            where = str(folder)
        elif looks_like_path(source):
            hint = ""
            if folder.name.startswith("tiny"):
                hint = " (the embedded tiny encoder is made by `make pretrain`; rewired ones by `make rewire`)"
            elif folder.name.startswith("whisper"):
                hint = " (make it with `python -m rewiring convert-whisper --out ...`, or `make whisper`)"
            raise FileNotFoundError(f"encoder folder not found: {folder}{hint}")
        else:
            where = source  # a hub name: cached, or downloaded when online
        try:
            config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        except OSError as e:
            raise OSError(
                f"cannot load encoder {source!r}: not a local folder, and not a hub model that is cached "
                f"or reachable ({e})"
            ) from e
        if config.model_type not in hf.MODEL_TYPES:
            raise ValueError(
                f"encoder {source!r} is a {config.model_type!r} model; expected one of {sorted(hf.MODEL_TYPES)}"
            )
        local = folder.exists()
        model = hf.load_pretrained(where, local, config)
        return model, hf.read_do_normalize(where, local, config), hf.own_values(config)

    def describe(self) -> str:
        return (
            self.source
            if isinstance(self.source, str)
            else f"<config {self.source.get('model_type', 'wav2vec2')}>"
        )

    @contextmanager
    def _export_config(self):
        """The source's own masking/LayerDrop values while saving; the run overrides afterwards."""
        config = self.model.config
        for key, value in self._export_values.items():
            setattr(config, key, value)
        try:
            yield config
        finally:
            for key, value in hf.run_overrides(config).items():
                setattr(config, key, value)

    def fingerprint(self) -> str:
        """A hash of the HF model's weights and buffers (names, dtypes, shapes and bytes): two encoders
        with the same fingerprint compute the same thing. About 0.6 s for wav2vec2-base on one core."""
        h = hashlib.blake2b(digest_size=32)
        for name, tensor in self.model.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    def feature_key(self) -> str:
        """A hash of everything that decides the hidden states of an input: the weights' fingerprint,
        the family, the input normalisation and the front end (a feature cache keys on it)."""
        front = {"family": self.family, "normalize": self.normalize, "layout": repr(self.frame_layout)}
        if self.family == "whisper":
            front.update(n_mels=self.log_mel.n_mels, n_fft=whisper.N_FFT, hop=whisper.HOP)
        else:
            front.update(attention_mask=self.uses_attention_mask)
        h = hashlib.blake2b(digest_size=32)
        h.update(self.fingerprint().encode())
        h.update(json.dumps(front, sort_keys=True).encode())
        return h.hexdigest()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write an HF folder: config.json, model.safetensors and preprocessor_config.json.

        wav2vec2 family: it loads with `SpeechEncoder(path)` (same outputs) and with plain
        ``<Model>.from_pretrained``. Whisper: the whole `WhisperForConditionalGeneration` with this
        encoder's weights and the source's decoder (random for a config dict), plus the source's
        tokenizer and generation files, so the folder still transcribes.
        The layer weights of "weighted" belong to the task, not the encoder, and are not exported.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.family == "whisper":
            source = self.source if isinstance(self.source, str) else None
            with self._export_config() as config:
                hf.save_whisper(path, self.model, config, source)
            return path
        with self._export_config():
            self.model.save_pretrained(path)
        Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=16000,
            padding_value=0.0,
            do_normalize=self.normalize,
            return_attention_mask=self.uses_attention_mask,
        ).save_pretrained(path)
        return path

    # ---------------------------------------------------------------- protocol
    def configure(self, layers: int | str, freeze: bool) -> None:
        """Choose the features and the freezing after construction: a task's protocol decides them
        (SUPERB: "weighted" and frozen), whatever the encoder config said."""
        n_states = self.num_hidden_states
        if isinstance(layers, bool) or not isinstance(layers, (int, str)):
            raise ValueError(f"layers must be an int or one of 'average', 'weighted', 'last'; got {layers!r}")
        if isinstance(layers, str) and layers not in ("average", "weighted", "last"):
            raise ValueError(f"layers must be an int or one of 'average', 'weighted', 'last'; got {layers!r}")
        if isinstance(layers, int) and not -n_states <= layers < n_states:
            raise ValueError(f"layer {layers} out of range: this encoder has {n_states} hidden states")
        if layers == "weighted" and self.layer_weights is None:
            # SUPERB's featurizer: softmax over zero-initialised weights starts as the uniform average.
            self.layer_weights = nn.Parameter(torch.zeros(n_states))
        elif layers != "weighted":
            self.layer_weights = None
        self.layers = layers
        self.set_frozen(freeze)

    # ---------------------------------------------------------------- freezing
    def _front_end(self) -> list[nn.Module]:
        """The conv front end that `freeze_feature_encoder` keeps fixed."""
        if self.family == "whisper":
            return [self.model.conv1, self.model.conv2]
        return [self.model.feature_extractor]

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (SUPERB) or unfreeze the whole model; the conv front end stays as `freeze_feature_encoder` says."""
        self.frozen = bool(frozen)
        for p in self.model.parameters():
            p.requires_grad_(not self.frozen)
        if self.family == "whisper":
            self.model.embed_positions.requires_grad_(False)  # fixed sinusoids, as transformers keeps them
            if not self.frozen and self.freeze_feature_encoder:
                for module in self._front_end():
                    module.requires_grad_(False)
        elif not self.frozen and self.freeze_feature_encoder:
            self.model.feature_extractor._freeze_parameters()
        else:
            self.model.feature_extractor._requires_grad = not self.frozen
        self.model.train(self.training and not self.frozen)

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # no dropout in a frozen encoder
        return self

    # ---------------------------------------------------------------- facts
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        config = self.model.config
        return int(config.encoder_layers if self.family == "whisper" else config.num_hidden_layers)

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 1

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def conv_layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(kernels, strides) of the frame layout's convolutions."""
        return self.frame_layout.kernels, self.frame_layout.strides

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per feature frame (320 at 16 kHz for both families: 50 frames/s)."""
        return self.frame_layout.samples_per_frame

    @property
    def min_samples(self) -> int:
        """The shortest input that gives one frame (the receptive field: 400 samples for wav2vec2)."""
        n = 1
        while int(self.frame_layout(n)) < 1:
            n += 1
        return n

    def frame_lengths(self, lengths: Tensor | int) -> Tensor:
        return self.frame_layout(lengths)

    # ---------------------------------------------------------------- forward
    def _prepare(self, waveforms: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Normalised, zero-padded input and the real length of each row."""
        x = waveforms.to(next(self.model.parameters()).dtype)
        if attention_mask is None:
            valid = torch.ones_like(x)
        else:
            if attention_mask.shape != waveforms.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not match waveforms {tuple(waveforms.shape)}"
                )
            valid = attention_mask.to(x.dtype)
        lengths = valid.sum(-1)
        if self.normalize:
            n = lengths.clamp(min=1)[:, None]
            mean = (x * valid).sum(-1, keepdim=True) / n
            var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / n
            x = (x - mean) / torch.sqrt(var + 1e-7)
        return x * valid, lengths.round().long()

    def hidden(
        self,
        waveforms: Tensor,
        attention_mask: Tensor | None = None,
        mask_time_indices: Tensor | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """All hidden states (num_layers + 1 tensors [B, F, D]) of [B, T] 16 kHz waveforms
        (attention_mask 1 = real sample, right padding), and the frame mask [B, F] (True = real)."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be [B, T], got shape {tuple(waveforms.shape)}")
        x, lengths = self._prepare(waveforms, attention_mask)
        n_frames = int(self.frame_lengths(x.shape[1]))
        if mask_time_indices is not None:
            if mask_time_indices.shape != (x.shape[0], n_frames):
                raise ValueError(
                    f"mask_time_indices must be [B, F] = {(x.shape[0], n_frames)}, got {tuple(mask_time_indices.shape)}"
                )
            mask_time_indices = mask_time_indices.to(device=x.device, dtype=torch.bool)
        with torch.no_grad() if self.frozen else nullcontext():
            if self.family == "whisper":
                mel, mel_lengths = self.log_mel(x, lengths)
                return whisper.whisper_hidden_states(self.model, mel, mel_lengths, mask_time_indices)
            hf_mask = attention_mask.long() if (attention_mask is not None and self.uses_attention_mask) else None
            out = self.model(
                x, attention_mask=hf_mask, mask_time_indices=mask_time_indices, output_hidden_states=True
            )
        hidden_states = (*out.hidden_states[:-1], out.last_hidden_state)
        frame_mask = torch.arange(n_frames, device=x.device)[None, :] < self.frame_lengths(lengths).to(x.device)[:, None]
        return hidden_states, frame_mask

    def combine(self, hidden_states: Tensor | tuple[Tensor, ...] | list[Tensor], frame_mask: Tensor) -> EncoderOutput:
        """The chosen features (a layer, the average, or the learned weighted sum) and their pooled
        vectors, from hidden states computed now or read from a feature cache: a sequence of [B, F, D]
        tensors, or one [L, B, F, D] tensor (the cache's batches: no stacking copy)."""
        stacked = hidden_states if isinstance(hidden_states, Tensor) else None
        hidden_states = tuple(hidden_states.unbind(0)) if stacked is not None else tuple(hidden_states)
        if len(hidden_states) != self.num_hidden_states:
            raise ValueError(f"expected {self.num_hidden_states} hidden states, got {len(hidden_states)}")
        if self.layers == "last":
            features = hidden_states[-1]
        elif self.layers == "average":
            features = (stacked if stacked is not None else torch.stack(hidden_states)).mean(0)
        elif self.layers == "weighted":
            weights = torch.softmax(self.layer_weights, dim=0).to(hidden_states[0].dtype)
            stacked = stacked if stacked is not None else torch.stack(hidden_states)
            features = torch.einsum("l,lbfd->bfd", weights, stacked)
        else:
            features = hidden_states[self.layers]
        return EncoderOutput(
            features=features,
            frame_mask=frame_mask,
            hidden_states=hidden_states,
            pooled=masked_mean(features, frame_mask),
        )

    def forward(
        self,
        waveforms: Tensor,
        attention_mask: Tensor | None = None,
        mask_time_indices: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode [B, T] waveforms (16 kHz; attention_mask 1 = real sample, right padding)."""
        return self.combine(*self.hidden(waveforms, attention_mask, mask_time_indices))

    def extra_repr(self) -> str:
        return f"source={self.describe()}, layers={self.layers!r}, frozen={self.frozen}"
