"""The embedded corpus's speakers: espeak accents times voice variants, each with its own prosody.

A speaker is a fixed voice (accent + variant) with a base rate, pitch and pitch range; each of its
utterances jitters rate and pitch a little, as a person never says two sentences alike.
The piper voice can join as one more speaker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ACCENTS", "VARIANTS", "Speaker", "make_speakers", "piper_available"]

ACCENTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)  # fmt: skip
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
)  # fmt: skip


@dataclass(frozen=True)
class Speaker:
    """One voice with its base prosody. `backend` is espeak (voice, rate, pitch, range) or piper."""

    id: str
    backend: str
    voice: str
    rate: int = 175
    pitch: int = 50
    range: int = 50
    length_scale: float = 1.0

    def part(self, rng: np.random.Generator, text: str) -> dict:
        """The synthesis settings of one utterance: the speaker's prosody, jittered."""
        part = {"backend": self.backend, "speaker": self.id, "text": text}
        if self.backend == "piper":
            rng.uniform(0.92, 1.08)  # drawn but unused: one loaded piper voice per process, one scale
            part["length_scale"] = self.length_scale
        else:
            part["voice"] = self.voice
            part["rate"] = int(np.clip(round(self.rate * rng.uniform(0.92, 1.08)), 80, 450))
            part["pitch"] = int(np.clip(self.pitch + rng.integers(-4, 5), 0, 99))
            part["range"] = self.range
        return part

    def to_dict(self) -> dict:
        return asdict(self)


def piper_available() -> bool:
    """True when rewiring.synthesis.PiperSynthesizer and its default voice can be loaded here."""
    try:
        from rewiring.synthesis import PiperSynthesizer

        PiperSynthesizer().paths()
        import importlib.util

        return (
            importlib.util.find_spec("piper") is not None
            and importlib.util.find_spec("onnxruntime") is not None
        )
    except Exception:
        return False


def make_speakers(rng: np.random.Generator, with_piper: bool = False) -> list[Speaker]:
    """Every accent x variant as a speaker (ids spk000..), with seeded base prosody; then piper."""
    speakers = []
    for i, (accent, variant) in enumerate((a, v) for a in ACCENTS for v in VARIANTS):
        speakers.append(
            Speaker(
                id=f"spk{i:03d}",
                backend="espeak",
                voice=f"{accent}+{variant}",
                rate=int(rng.integers(135, 211)),
                pitch=int(rng.integers(25, 76)),
                range=int(rng.integers(25, 81)),
            )
        )
    length_scale = round(float(rng.uniform(0.9, 1.15)), 3)  # drawn either way: same espeak plan
    if with_piper:
        speakers.append(
            Speaker(id=f"spk{len(speakers):03d}", backend="piper", voice="piper", length_scale=length_scale)
        )
    return speakers
