"""Whisper encoders inside `SpeechEncoder`: the log-mel front end in torch, and a forward over
`WhisperEncoder`'s own submodules that takes any length and masks padded frames.

Why not `WhisperEncoder.forward`: transformers refuses anything but 3000 mel frames (30 s), and it
ignores ``attention_mask``. Padding a 2 s clip to 30 s costs ~25x the compute (8 x 2 s forward plus
backward: ~0.4 s unpadded against ~10 s padded on one thread), and without a mask the padded frames
change the valid frames' features. So this module runs the same submodules (conv1, conv2, the
positions, the layers, the final LayerNorm) on the real length, with:
- the log-mel of each row computed as `WhisperFeatureExtractor` does for that row alone (zeros after
  its end, the 8-decade floor taken from its own peak), and zeroed past its last frame;
- the first conv's output zeroed past the last mel frame, so the second conv sees the same zeros as
  its own padding would give a single utterance;
- a key-padding mask in every self-attention layer.
A padded batch then gives the valid frames of each utterance alone (tested).

Time masks (rewiring's second view) zero the masked frames of the conv output before the positions
are added: Whisper has no learned mask embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

__all__ = ["LogMel", "whisper_hidden_states", "HOP", "SAMPLE_RATE"]

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160  # 100 mel frames per second; the second conv halves that to 50 encoder frames per second


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram of [B, T] 16 kHz waveforms, on the waveforms' device.

    Returns [B, n_mels, T // 160] features (zero past each row's last frame) and the mel frames per row.
    """

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        # The extractor's own filter bank (Slaney mel, 0-8 kHz), so the two cannot drift apart.
        filters = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE, n_fft=N_FFT).mel_filters
        self.register_buffer("filters", torch.tensor(filters.T, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.n_mels = n_mels

    def forward(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        n_mel = waveforms.shape[-1] // HOP
        # Zeros after every row's end (the extractor pads to 30 s with zeros); the start is reflected.
        x = F.pad(waveforms.float(), (0, N_FFT // 2))
        stft = torch.stft(x, N_FFT, HOP, window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = stft[..., :n_mel].abs() ** 2
        log_spec = (self.filters @ power).clamp(min=1e-10).log10()
        mel_lengths = torch.div(lengths.long(), HOP, rounding_mode="floor")
        valid = (torch.arange(n_mel, device=x.device)[None, :] < mel_lengths[:, None])[:, None, :]
        peak = log_spec.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        log_spec = (log_spec + 4.0) / 4.0
        return log_spec.masked_fill(~valid, 0.0), mel_lengths


def encoder_frames(mel_lengths: Tensor) -> Tensor:
    """Encoder frames per mel length: conv1 keeps the length, conv2 (kernel 3, stride 2, padding 1) halves it."""
    return (torch.div(mel_lengths - 1, 2, rounding_mode="floor") + 1).clamp(min=0)


def whisper_hidden_states(
    encoder: WhisperEncoder,
    mel: Tensor,
    mel_lengths: Tensor,
    mask_time_indices: Tensor | None = None,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """All hidden states (the layers' input, each layer's output, the last one after the final
    LayerNorm: encoder_layers + 1, as transformers numbers them) and the frame mask, True = real."""
    config: WhisperConfig = encoder.config
    mel = mel.to(encoder.conv1.weight.dtype)
    mel_valid = torch.arange(mel.shape[-1], device=mel.device)[None, :] < mel_lengths[:, None]
    x = F.gelu(encoder.conv1(mel)) * mel_valid[:, None, :].to(mel.dtype)
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)  # [B, F, D]
    n_frames = x.shape[1]
    if n_frames > encoder.max_source_positions:
        seconds = encoder.max_source_positions * 2 * HOP / SAMPLE_RATE
        raise ValueError(
            f"input of {n_frames} Whisper frames is longer than the encoder's {encoder.max_source_positions} "
            f"positions ({seconds:g} s): crop it (max_seconds) or split it"
        )
    frame_mask = torch.arange(n_frames, device=x.device)[None, :] < encoder_frames(mel_lengths)[:, None]
    if mask_time_indices is not None:
        x = x.masked_fill(mask_time_indices[..., None].to(torch.bool), 0.0)
    x = x + encoder.embed_positions.weight[:n_frames].to(x.dtype)
    x = F.dropout(x, p=config.dropout, training=encoder.training)
    attention = None
    if not bool(frame_mask.all()):
        # Additive key-padding mask [B, 1, 1, F] (broadcast over heads and queries).
        attention = torch.zeros(frame_mask.shape, dtype=x.dtype, device=x.device)
        attention = attention.masked_fill(~frame_mask, torch.finfo(x.dtype).min)[:, None, None, :]
    states = []
    for layer in encoder.layers:
        states.append(x)
        x = layer(x, attention)
    states.append(encoder.layer_norm(x))
    return tuple(states), frame_mask
