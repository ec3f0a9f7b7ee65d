"""eSpeak NG through ctypes: about a hundred voice variants and full control of rate and pitch.

It gives the embedded corpus its speakers and prosody. The shared library and its data come from
the espeakng-loader wheel (GPL-3.0), imported here only, lazily. libespeak-ng keeps global state,
so it is initialised once per process and every call holds a module-level lock.

Reproducibility: the default (non-Klatt) wave generator keeps a pitch-flutter phase in a static
variable that no API call resets, so the same text said twice in one process can differ by a
few samples. Whoever needs bit-for-bit audio (the corpus builder) synthesises from a fresh
process in a fixed order.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np

from rewiring.synthesis.base import BackendError, Synthesizer

__all__ = ["EspeakSynthesizer", "espeak_variants", "espeak_voices"]

INSTALL_HINT = "install it with: pip install espeakng-loader (or the project's [offline] extra)"

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_ERRORS = {-1: "internal error", 1: "buffer full", 2: "not found"}

# Names of the old espeak (1.x) English voices, which espeak-ng renamed.
_ALIASES = {
    "en-sc": "en-gb-scotland",
    "en-rp": "en-gb-x-rp",
    "en-n": "en-gb-x-gbclan",
    "en-wm": "en-gb-x-gbcwmd",
    "en-wi": "en-029",
}

_LOCK = threading.Lock()
_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # priority byte + NUL-terminated name, repeated, 0 ends
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class _Engine:
    """The process's libespeak-ng: loaded and initialised once, used only under `_LOCK`."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise BackendError(f"espeakng-loader is not installed; {INSTALL_HINT}") from e
        self.data_path = Path(espeakng_loader.get_data_path())
        try:
            lib = ctypes.CDLL(str(espeakng_loader.get_library_path()))
        except OSError as e:
            raise BackendError(f"cannot load libespeak-ng: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        self._seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._seed is not None:
            self._seed.argtypes = [ctypes.c_long]
            self._seed.restype = None
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise BackendError(f"espeak_Initialize failed ({rate}) with data at {self.data_path}")
        self.sample_rate = int(rate)
        self.chunks: list[np.ndarray] = []
        self._callback = _CALLBACK_TYPE(self._collect)  # kept referenced: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib
        self._languages: dict[str, str] | None = None
        self._resolved: dict[str, bytes] = {}

    def _collect(self, wav: Any, n: int, events: Any) -> int:
        if wav and n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    def voices(self) -> dict[str, str]:
        """language code (lower-case) -> voice identifier, over every installed voice."""
        if self._languages is None:
            found: dict[str, str] = {}
            table = self.lib.espeak_ListVoices(None)
            i = 0
            while table[i]:
                v = table[i].contents
                ident = v.identifier.decode()
                p = v.languages
                while p and ctypes.c_ubyte.from_address(p).value != 0:  # priority byte
                    lang = ctypes.string_at(p + 1)
                    found.setdefault(lang.decode().lower(), ident)
                    p += 2 + len(lang)
                found.setdefault(ident.rsplit("/", 1)[-1].lower(), ident)
                i += 1
            self._languages = found
        return self._languages

    def variants(self) -> set[str]:
        folder = self.data_path / "voices" / "!v"
        return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()

    def set_voice(self, voice: str) -> None:
        """Select `voice` ("en-us", "en-gb+f2", "en-sc+m3"); BackendError naming it when unknown."""
        key = self._resolved.get(voice)
        if key is None:
            base, _, variant = voice.partition("+")
            if variant and variant not in self.variants():
                raise BackendError(f"unknown espeak voice {voice!r}: no variant {variant!r}")
            base = _ALIASES.get(base.lower(), base)
            candidates = [base]
            ident = self.voices().get(base.lower())
            if ident is not None:
                candidates.append(ident)
            for c in candidates:
                name = (f"{c}+{variant}" if variant else c).encode()
                if self.lib.espeak_SetVoiceByName(name) == 0:
                    self._resolved[voice] = name
                    return
            english = sorted(n for n in self.voices() if n.startswith("en") and "/" not in n)
            raise BackendError(f"unknown espeak voice {voice!r} (English voices: {', '.join(english)})")
        status = self.lib.espeak_SetVoiceByName(key)
        if status != 0:
            raise BackendError(f"espeak_SetVoiceByName({voice!r}) failed: {_ERRORS.get(status, status)}")

    def say(self, text: str, rate: int, pitch: int, range_: int, volume: int) -> np.ndarray:
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, range_), (_VOLUME, volume)):
            status = self.lib.espeak_SetParameter(param, int(value), 0)
            if status != 0:
                raise BackendError(
                    f"espeak_SetParameter({param}, {value}) failed: {_ERRORS.get(status, status)}"
                )
        if self._seed is not None:
            self._seed(0)  # breathy variants draw noise: start each utterance from the same seed
        data = text.encode("utf-8")
        self.chunks = []
        status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise BackendError(f"espeak_Synth failed: {_ERRORS.get(status, status)}")
        self.lib.espeak_Synchronize()
        samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)
        self.chunks = []
        return samples


_ENGINE: _Engine | None = None


def _engine() -> _Engine:
    """The process's engine; call with `_LOCK` held. Initialised on first use, once per process."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def espeak_voices(prefix: str = "en") -> list[str]:
    """Installed voice names (language codes) starting with `prefix`, e.g. en-us, en-gb-scotland."""
    with _LOCK:
        names = _engine().voices()
    return sorted(n for n in names if n.startswith(prefix.lower()) and "/" not in n)


def espeak_variants() -> list[str]:
    """Installed voice variants (m1..m8, f1..f5, klatt, ...), appended to a voice as `+name`."""
    with _LOCK:
        return sorted(_engine().variants())


class EspeakSynthesizer(Synthesizer):
    """One eSpeak NG voice with fixed prosody: `voice` ("en-us", "en-gb+f2", "en-sc+m3"), rate
    (words per minute, 80-450), pitch (0-99), pitch range (0-99) and volume (0-200).

    Returns float32 audio at espeak's own rate (22050 Hz). The object holds only its settings, so
    it pickles; the library lives in the process.
    """

    name = "espeak"

    def __init__(
        self, voice: str = "en-us", rate: int = 175, pitch: int = 50, range: int = 50, volume: int = 100
    ) -> None:
        for what, value, lo, hi in (
            ("rate", rate, 80, 450),
            ("pitch", pitch, 0, 99),
            ("range", range, 0, 99),
            ("volume", volume, 0, 200),
        ):
            if not lo <= int(value) <= hi:
                raise ValueError(f"espeak {what} must be in [{lo}, {hi}], got {value}")
        if not voice or not voice.strip():
            raise ValueError("espeak voice must be a non-empty name such as 'en-us+m3'")
        self.voice = voice.strip()
        self.rate = int(rate)
        self.pitch = int(pitch)
        self.range = int(range)
        self.volume = int(volume)

    def cache_params(self) -> dict:
        return {
            "voice": self.voice,
            "rate": self.rate,
            "pitch": self.pitch,
            "range": self.range,
            "volume": self.volume,
        }

    def sample_rate(self) -> int:
        """espeak's output rate, as espeak_Initialize returned it (loads the library)."""
        with _LOCK:
            return _engine().sample_rate

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        with _LOCK:
            engine = _engine()
            engine.set_voice(self.voice)
            samples = engine.say(text, self.rate, self.pitch, self.range, self.volume)
            sr = engine.sample_rate
        return samples.astype(np.float32) / 32768.0, sr

    def __repr__(self) -> str:
        return (
            f"EspeakSynthesizer(voice={self.voice!r}, rate={self.rate}, pitch={self.pitch}, "
            f"range={self.range}, volume={self.volume})"
        )
