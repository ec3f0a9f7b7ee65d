"""Coqui TTS (coqui-tts, `TTS.api.TTS`): any of its models by name, or a local model.

The real choice where models can be downloaded. Here (offline) it runs only local models; the
tests build a tiny VITS with random weights to check the integration.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from rewiring.synthesis.base import BackendError, Synthesizer

INSTALL_HINT = "install it with: pip install coqui-tts six torchcodec"
_CHECKPOINT_NAMES = ("model.pth", "best_model.pth", "model_file.pth", "checkpoint.pth", "model.pt")


class CoquiSynthesizer(Synthesizer):
    """A Coqui TTS model, loaded once per process on first use (never pickled).

    Args:
        model_name: a Coqui model name (e.g. `tts_models/en/ljspeech/vits`); needs the model in
            Coqui's local model folder or a network connection.
        model_path: a local checkpoint file, or a folder holding `config.json` and one checkpoint.
        config_path: the model's config.json (default: `config.json` next to the checkpoint).
        speaker: speaker name for multi-speaker models.
        language: language for multi-lingual models (e.g. `en` for XTTS).
    """

    name = "coqui"

    def __init__(
        self,
        model_name: str | None = None,
        model_path: str | None = None,
        config_path: str | None = None,
        speaker: str | None = None,
        language: str | None = None,
    ) -> None:
        if (model_name is None) == (model_path is None):
            raise ValueError("coqui needs exactly one of model_name or model_path")
        self.model_name = model_name
        self.model_path = model_path
        self.config_path = config_path
        self.speaker = speaker
        self.language = language
        self._tts: Any = None
        self._identity: dict | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tts"] = None  # a torch model: each process loads its own
        return state

    def local_files(self) -> tuple[Path, Path]:
        """(checkpoint, config) of a local model."""
        path = Path(self.model_path)
        if path.is_dir():
            found = [path / n for n in _CHECKPOINT_NAMES if (path / n).is_file()]
            found = found or sorted(path.glob("*.pth"))
            if not found:
                raise BackendError(f"no coqui checkpoint (*.pth) in {path}")
            checkpoint = found[0]
        else:
            checkpoint = path
        config = Path(self.config_path) if self.config_path else checkpoint.parent / "config.json"
        for p in (checkpoint, config):
            if not p.is_file():
                raise BackendError(f"coqui model file not found: {p}")
        return checkpoint, config

    def cache_params(self) -> dict:
        if self._identity is None:
            if self.model_name is not None:
                self._identity = {"model": self.model_name}
            else:
                checkpoint, config = self.local_files()
                self._identity = {
                    "model": checkpoint.name,
                    "model_bytes": checkpoint.stat().st_size,
                    "config_sha": hashlib.sha256(config.read_bytes()).hexdigest()[:16],
                }
        return {**self._identity, "speaker": self.speaker, "language": self.language}

    def tts(self) -> Any:
        """The loaded `TTS.api.TTS` (loaded on first call in this process)."""
        if self._tts is None:
            try:
                from TTS.api import TTS
            except ImportError as e:
                raise BackendError(f"coqui-tts cannot be imported ({e}); {INSTALL_HINT}") from e
            try:
                if self.model_name is not None:
                    tts = TTS(self.model_name, progress_bar=False)
                else:
                    checkpoint, config = self.local_files()
                    tts = TTS(model_path=str(checkpoint), config_path=str(config), progress_bar=False)
            except BackendError:
                raise
            except Exception as e:  # download failures, bad configs: the backend cannot run
                what = self.model_name or self.model_path
                raise BackendError(f"coqui could not load model {what!r}: {e}") from e
            self._tts = tts
        return self._tts

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        import torch

        tts = self.tts()
        kwargs: dict[str, Any] = {}
        if self.speaker is not None:
            kwargs["speaker"] = self.speaker
        if self.language is not None:
            kwargs["language"] = self.language
        with torch.inference_mode():
            wav = np.asarray(tts.tts(text, **kwargs), dtype=np.float32)
        # Coqui appends a fixed pad of silence after every sentence; drop the final one.
        from TTS.utils.synthesizer import PAD_SILENCE_SAMPLES

        if wav.size > PAD_SILENCE_SAMPLES and not wav[-PAD_SILENCE_SAMPLES:].any():
            wav = wav[:-PAD_SILENCE_SAMPLES]
        return wav, int(tts.synthesizer.output_sample_rate)


def random_vits(folder: str | Path) -> Path:
    """A tiny character-based VITS with random weights, saved as config.json + model.pth in FOLDER.

    No coqui voice can be downloaded offline; this exercises the real loading and inference path
    (shape, sample rate, resampling, caching) and says nothing about the sound.
    """
    import torch
    from TTS.tts.configs.shared_configs import CharactersConfig
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    folder = Path(folder)

    torch.manual_seed(0)
    args = VitsArgs(
        hidden_channels=16,
        hidden_channels_ffn_text_encoder=32,
        num_heads_text_encoder=1,
        num_layers_text_encoder=1,
        num_layers_posterior_encoder=1,
        num_layers_flow=1,
        upsample_initial_channel_decoder=16,
        resblock_kernel_sizes_decoder=[3],
        resblock_dilation_sizes_decoder=[[1, 1, 1]],
        init_discriminator=False,
        use_sdp=False,
    )
    chars = CharactersConfig(
        characters_class="TTS.tts.models.vits.VitsCharacters",
        pad="_",
        eos="",
        bos="",
        blank=None,
        characters="abcdefghijklmnopqrstuvwxyz0123456789",
        punctuations=".,;:!?'\"()- ",
        phonemes=None,
    )
    cfg = VitsConfig(model_args=args, use_phonemes=False, text_cleaner="basic_cleaners", characters=chars)
    cfg.audio.sample_rate = 22050
    model = Vits(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_json(str(folder / "config.json"))
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    return folder
