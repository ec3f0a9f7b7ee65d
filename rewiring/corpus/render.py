"""Turn planned items into 16 kHz wav files: synthesise, resample, trim, place, add noise and gain.

The planner (build.py) draws every random choice; this module only follows the plan, so the
audio depends on the item alone. The one exception is espeak's own state (pitch flutter, gain
control), which carries over between utterances in a process and which no API call resets. So
`serve()`, in a subprocess that build.py starts, renders each chunk in a child forked from itself,
and never synthesises itself: every chunk starts from the same untouched espeak, and the same
chunk gives the same bytes on every build.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

__all__ = ["NOISES", "SAMPLE_RATE", "make_noise", "render_chunk", "render_item", "serve"]

SAMPLE_RATE = 16000
NOISES = ("white", "pink", "brown", "hum", "babble")

_PIPER: dict[float, Any] = {}


def _smooth(k: int) -> int:
    """The smallest integer >= k with no prime factor above 5 (a fast FFT length)."""
    while True:
        r = k
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return k
        k += 1


def _resample(wav: np.ndarray, sr: int) -> np.ndarray:
    """Band-limited resampling to 16 kHz in the frequency domain (numpy only).

    The input is zero-padded to a length whose FFT is fast and which maps to a whole number of
    output samples; synthetic speech starts and ends in silence, so the padding is harmless.
    """
    if sr == SAMPLE_RATE:
        return wav.astype(np.float32)
    g = math.gcd(SAMPLE_RATE, sr)
    up, down = SAMPLE_RATE // g, sr // g
    k = _smooth(-(-wav.size // down))
    n_in, n_out = down * k, up * k
    spec = np.fft.rfft(wav.astype(np.float64), n_in)
    keep = min(spec.size, n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n_out) * (n_out / n_in)
    return out[: int(round(wav.size * SAMPLE_RATE / sr))].astype(np.float32)


def _trim(wav: np.ndarray, margin: float = 0.01) -> np.ndarray:
    """Drop the synthesiser's leading and trailing silence, keeping `margin` seconds either side."""
    peak = float(np.abs(wav).max())
    loud = np.flatnonzero(np.abs(wav) > max(1e-3, 0.02 * peak))
    if loud.size == 0:
        return wav
    pad = int(margin * SAMPLE_RATE)
    return wav[max(0, loud[0] - pad) : loud[-1] + pad + 1]


def _speak(part: dict) -> np.ndarray:
    """One utterance at 16 kHz, trimmed, peak 1."""
    if part["backend"] == "piper":
        from rewiring.synthesis.piper import PiperSynthesizer

        scale = float(part["length_scale"])
        if scale not in _PIPER:
            # no generator noise: piper's sampling is not seeded, and the corpus must be reproducible
            _PIPER[scale] = PiperSynthesizer(length_scale=scale, noise_scale=0.0, noise_w=0.0)
        wav, sr = _PIPER[scale].synthesize(part["text"])
    else:
        from rewiring.synthesis.espeak import EspeakSynthesizer

        tts = EspeakSynthesizer(
            voice=part["voice"], rate=part["rate"], pitch=part["pitch"], range=part["range"]
        )
        wav, sr = tts.synthesize(part["text"])
    wav = _trim(_resample(wav, sr))
    return wav / max(float(np.abs(wav).max()), 1e-6)


def _shaped(rng: np.random.Generator, n: int, shape) -> np.ndarray:
    """Gaussian noise with spectral magnitude `shape(f)`, made at a fast FFT length and cut to n."""
    m = _smooth(n)
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1.0 / SAMPLE_RATE)
    return np.fft.irfft(spec * shape(np.maximum(f, 1.0)), m)[:n]


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of background noise with unit RMS: white, pink, brown, mains hum or babble-like."""
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        x = _shaped(rng, n, lambda f: 1.0 / np.sqrt(f))
    elif kind == "brown":
        x = _shaped(rng, n, lambda f: np.where(f < 20.0, 0.0, 1.0 / f))
    elif kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        x = sum(
            rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
            for k in (1, 2, 3, 5)
        )
        x = x + 0.05 * rng.standard_normal(n)
    elif kind == "babble":
        # speech-shaped noise with a slow syllabic envelope: the nearest thing to babble without speech
        x = _shaped(rng, n, lambda f: np.exp(-(((np.log(f) - np.log(500.0)) / 1.0) ** 2)))
        t = np.arange(n) / SAMPLE_RATE
        env = 1.0 + sum(
            0.3 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi)) for _ in range(3)
        )
        x = x * np.clip(env, 0.1, None)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; one of {NOISES}")
    x = np.asarray(x, dtype=np.float64)
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def render_item(item: dict) -> dict:
    """Write one planned item's wav; returns {"duration": seconds, "segments": [...] (mixtures)}."""
    rng = np.random.default_rng(item["noise_seed"])
    kind = item["kind"]
    segments = None
    if kind == "silence":
        n = int(round(item["clip"] * SAMPLE_RATE))
        clip = make_noise(item["noise"], n, rng)
    else:
        speech = [_speak(p) for p in item["parts"]]
        if kind == "keyword":
            n = int(round(item["clip"] * SAMPLE_RATE))
            word = speech[0][:n]
            start = int(item["offset"] * (n - word.size))
            clean = np.zeros(n)
            clean[start : start + word.size] = word
            active = word
        elif kind == "mix":
            clean, segments, active = _mix(item, speech)
        else:
            lead, tail = (int(item[k] * SAMPLE_RATE) for k in ("lead", "tail"))
            clean = np.concatenate([np.zeros(lead), speech[0], np.zeros(tail)])
            active = speech[0]
        noise = make_noise(item["noise"], clean.size, rng)
        clip = clean + noise * (_rms(active) / 10.0 ** (item["snr_db"] / 20.0))
    clip = clip * (10.0 ** (item["gain_db"] / 20.0) / max(float(np.abs(clip).max()), 1e-9))
    clip = np.clip(clip, -1.0, 32767 / 32768).astype(np.float32)
    path = Path(item["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # libsndfile fsyncs files it closes; thousands of fsyncs cost minutes
    sf.write(buf, clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    path.write_bytes(buf.getvalue())
    return {"duration": clip.size / SAMPLE_RATE, "segments": segments}


def _mix(item: dict, speech: list[np.ndarray]) -> tuple[np.ndarray, list[list], np.ndarray]:
    """Lay turns on a timeline with partial overlaps and pauses (a speaker never overlaps itself)."""
    sr = SAMPLE_RATE
    starts: list[int] = []
    last_end: dict[str, int] = {}
    for i, (part, wav) in enumerate(zip(item["parts"], speech, strict=True)):
        if i == 0:
            start = int(item["lead"] * sr)
        else:
            prev_end = starts[-1] + speech[i - 1].size
            if part["overlap"] > 0:
                start = prev_end - int(part["overlap"] * min(speech[i - 1].size, wav.size))
            else:
                start = prev_end + int(part["gap"] * sr)
        start = max(start, last_end.get(part["speaker"], -sr) + int(0.1 * sr))
        starts.append(start)
        last_end[part["speaker"]] = start + wav.size
    total = max(s + w.size for s, w in zip(starts, speech, strict=True)) + int(item["tail"] * sr)
    clean = np.zeros(total)
    segments = []
    for part, wav, start in zip(item["parts"], speech, starts, strict=True):
        clean[start : start + wav.size] += wav * 10.0 ** (part["level_db"] / 20.0)
        segments.append([part["speaker"], round(start / sr, 3), round((start + wav.size) / sr, 3)])
    active = np.concatenate([clean[s : s + w.size] for s, w in zip(starts, speech, strict=True)])
    return clean, segments, active


def render_chunk(items: list[dict]) -> list[dict]:
    """Render items in order (run in a fresh process per chunk, for reproducible espeak audio)."""
    return [render_item(item) for item in items]


def _attempt(chunk: list[dict]) -> tuple[str, Any]:
    try:
        return "ok", render_chunk(chunk)
    except Exception:
        return "error", traceback.format_exc()


def _isolated(chunk: list[dict]) -> tuple[str, Any]:
    """Render `chunk` in a forked child, so this process's espeak is never used."""
    if not hasattr(os, "fork"):  # no fork (Windows): in-process, reproducible only within one build
        return _attempt(chunk)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            with os.fdopen(w, "wb") as fh:
                fh.write(pickle.dumps(_attempt(chunk)))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return (
            "error",
            f"a renderer process died (wait status {status}) on {chunk[0]['path']} and the next {len(chunk) - 1}",
        )
    return pickle.loads(data)


def serve() -> None:
    """Render chunks read (pickled) from stdin; write ("ok", results) or ("error", text) to stdout."""
    import rewiring.synthesis.espeak  # noqa: F401  (imported once here, not in every child)

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library printing to stdout must not corrupt the replies
    while True:
        try:
            chunk = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        pickle.dump(_isolated(chunk), out)
        out.flush()
