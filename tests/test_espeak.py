"""EspeakSynthesizer: libespeak-ng through ctypes, many voices, prosody, errors, pickling, threads."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from rewiring.synthesis import BackendError, EspeakSynthesizer, SynthesisError  # noqa: E402
from rewiring.synthesis.espeak import espeak_variants, espeak_voices  # noqa: E402

TEXT = "turn on the lights in the kitchen"


def spectrum(wav: np.ndarray) -> np.ndarray:
    """Long-term magnitude spectrum (64 bands), a voice fingerprint that ignores small timing shifts."""
    frames = wav[: wav.size // 512 * 512].reshape(-1, 512)
    mag = np.abs(np.fft.rfft(frames * np.hanning(512), axis=1)).mean(0)[:256]
    bands = mag.reshape(64, 4).mean(1)
    return bands / bands.sum()


def test_synthesize_returns_float_audio_at_espeak_rate():
    tts = EspeakSynthesizer()
    wav, sr = tts.synthesize(TEXT)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert sr == tts.sample_rate() == 22050
    assert 1.0 < wav.size / sr < 4.0
    assert 0.05 < np.abs(wav).max() <= 1.0


def test_voices_and_variants_are_listed():
    voices = espeak_voices()
    assert {"en-us", "en-gb", "en-gb-scotland", "en-029"} <= set(voices)
    assert {"m1", "m7", "f1", "f5", "klatt"} <= set(espeak_variants())


def test_variants_and_accents_sound_different():
    fingerprints = {
        v: spectrum(EspeakSynthesizer(v).synthesize(TEXT)[0])
        for v in ("en-us+m3", "en-us+f2", "en-gb+f2", "en-sc+m1", "en-029+klatt")
    }
    names = list(fingerprints)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(fingerprints[a] - fingerprints[b]).sum() > 0.03, (a, b)  # same voice twice: ~0.006


def test_rate_and_pitch_change_the_sound():
    slow = EspeakSynthesizer("en-us", rate=120).synthesize(TEXT)[0]
    fast = EspeakSynthesizer("en-us", rate=300).synthesize(TEXT)[0]
    assert fast.size < 0.7 * slow.size
    low = spectrum(EspeakSynthesizer("en-us", pitch=10).synthesize(TEXT)[0])
    high = spectrum(EspeakSynthesizer("en-us", pitch=90).synthesize(TEXT)[0])
    assert np.abs(low - high).sum() > 0.05
    quiet = EspeakSynthesizer("en-us", volume=30).synthesize(TEXT)[0]
    loud = EspeakSynthesizer("en-us", volume=150).synthesize(TEXT)[0]
    assert np.abs(quiet).max() < np.abs(loud).max()


@pytest.mark.parametrize("voice", ["xx-nowhere", "en-us+nobody"])
def test_unknown_voice_is_an_error_naming_it(voice):
    with pytest.raises(BackendError, match=voice.replace("+", r"\+")):
        EspeakSynthesizer(voice).synthesize(TEXT)


def test_bad_settings_and_text_are_rejected():
    with pytest.raises(ValueError, match="rate"):
        EspeakSynthesizer(rate=10)
    with pytest.raises(ValueError, match="pitch"):
        EspeakSynthesizer(pitch=150)
    with pytest.raises(SynthesisError):
        EspeakSynthesizer().synthesize("   ")
    with pytest.raises(SynthesisError):
        EspeakSynthesizer().synthesize("日本語")


def test_text_is_normalised():
    tts = EspeakSynthesizer()
    a = tts.synthesize("  TURN on the   LIGHTS  ")[0]
    b = tts.synthesize("turn on the lights")[0]
    assert abs(a.size - b.size) < 0.02 * b.size  # same words (espeak's pitch flutter shifts a few samples)


def test_pickles_and_names_every_parameter():
    tts = EspeakSynthesizer("en-gb+f2", rate=190, pitch=60, range=40, volume=90)
    clone = pickle.loads(pickle.dumps(tts))
    expected = {"voice": "en-gb+f2", "rate": 190, "pitch": 60, "range": 40, "volume": 90}
    assert clone.cache_params() == tts.cache_params() == expected
    assert clone.synthesize("hello")[0].size > 0


def test_threads_share_the_library_safely():
    serial = EspeakSynthesizer("en-us+m2").synthesize(TEXT)[0].size
    sizes: list[int] = []
    errors: list[BaseException] = []

    def work(voice: str) -> None:
        try:
            for _ in range(3):
                sizes.append(EspeakSynthesizer(voice).synthesize(TEXT)[0].size)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=("en-us+m2",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(sizes) == 12 and all(abs(s - serial) < 0.02 * serial for s in sizes)
