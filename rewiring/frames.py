"""Frame arithmetic: how many feature frames a waveform gives, and the mean over the real ones.

Every encoder here turns L samples into F frames by convolutions (wav2vec 2.0's conv feature encoder)
or by a hop and then convolutions (Whisper's log-mel, then its two convs). `FrameLayout` is that
arithmetic, read from the encoder's config by `config_frame_layout`, so a frame count or a receptive
field is never written down twice. `masked_mean` pools [B, F, D] frames over the real ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

from rewiring import whisper
from rewiring.hf import config_from_dict, family

__all__ = ["FrameLayout", "config_frame_layout", "conv_layout", "frame_lengths", "masked_mean"]


@dataclass(frozen=True)
class FrameLayout:
    """How many feature frames a waveform of L samples gives, for any encoder: an optional hop (Whisper's
    log-mel: L // 160 frames), then convolutions ``floor((n + 2 * padding - kernel) / stride) + 1``.

    Small and picklable, so data-loader workers (rewiring's mask collate) can hold it.
    """

    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    paddings: tuple[int, ...] = ()
    hop: int = 1

    def __call__(self, lengths: Tensor | int) -> Tensor:
        n = torch.div(torch.as_tensor(lengths, dtype=torch.long), self.hop, rounding_mode="floor")
        paddings = self.paddings or (0,) * len(self.kernels)
        for kernel, stride, pad in zip(self.kernels, self.strides, paddings, strict=True):
            n = (torch.div(n + 2 * pad - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
        return n

    @property
    def samples_per_frame(self) -> int:
        return self.hop * math.prod(self.strides)


def config_frame_layout(config: PretrainedConfig | dict[str, Any]) -> FrameLayout:
    """The frame layout of an encoder config (or a config dict such as TINY_CONFIG), read from the config."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if family(config) == "whisper":
        return FrameLayout(kernels=(3, 3), strides=(1, 2), paddings=(1, 1), hop=whisper.HOP)
    kernels, strides = conv_layout(config)
    return FrameLayout(kernels=kernels, strides=strides)


def conv_layout(config: PretrainedConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kernels, strides) of a wav2vec 2.0-family conv feature encoder."""
    return tuple(int(k) for k in config.conv_kernel), tuple(int(s) for s in config.conv_stride)


def frame_lengths(config: PretrainedConfig, lengths: Tensor | int) -> Tensor:
    """Feature frames per waveform length for this config."""
    return config_frame_layout(config)(lengths)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of [B, F, D] features over the frames where the [B, F] mask is True (0 for none)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
