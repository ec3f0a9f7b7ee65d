"""Text to speech behind one protocol, with a content-addressed disk cache in front of every backend.

Importing this package imports no third-party TTS package: each backend imports its own (piper
and espeak are GPL-3.0) inside its methods, on first use.
"""

from rewiring.synthesis.base import BackendError, SynthesisError, Synthesizer, normalize_text
from rewiring.synthesis.cache import SynthesisCache
from rewiring.synthesis.coqui import CoquiSynthesizer
from rewiring.synthesis.espeak import EspeakSynthesizer
from rewiring.synthesis.festival import FestivalSynthesizer
from rewiring.synthesis.piper import PiperSynthesizer

__all__ = [
    "BackendError",
    "CoquiSynthesizer",
    "EspeakSynthesizer",
    "FestivalSynthesizer",
    "PiperSynthesizer",
    "SynthesisCache",
    "SynthesisError",
    "Synthesizer",
    "normalize_text",
]
