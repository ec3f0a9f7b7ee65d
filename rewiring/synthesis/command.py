"""`python -m rewiring synthesize`: say one text into a wav, or fill the cache for a manifest."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from rewiring.synthesis.base import Synthesizer
from rewiring.synthesis.cache import SynthesisCache
from rewiring.synthesis.coqui import CoquiSynthesizer
from rewiring.synthesis.espeak import EspeakSynthesizer
from rewiring.synthesis.festival import FestivalSynthesizer
from rewiring.synthesis.piper import PiperSynthesizer

BACKENDS: dict[str, type[Synthesizer]] = {
    "festival": FestivalSynthesizer,
    "piper": PiperSynthesizer,
    "espeak": EspeakSynthesizer,
    "coqui": CoquiSynthesizer,
}


def make_synthesizer(backend: str, **options: Any) -> Synthesizer:
    """The backend's synthesizer from command-line options; `voice` means the speaker for coqui."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown synthesis backend {backend!r}; choose from {', '.join(BACKENDS)}")
    cls = BACKENDS[backend]
    options = {k: v for k, v in options.items() if v is not None}
    if backend == "coqui" and "voice" in options:
        options["speaker"] = options.pop("voice")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        hint = (
            " (piper's other voices: --model_path VOICE.onnx)"
            if backend == "piper" and "voice" in unknown
            else ""
        )
        raise ValueError(
            f"{backend} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}{hint}"
        )
    return cls(**options)


def synthesize_command(
    backend: str,
    text: str | None,
    manifest: str | None,
    out: str | None,
    cache_dir: str = "cache/tts",
    sample_rate: int = 16000,
    batch_size: int = 32,
    **options: Any,
) -> dict:
    """With `text`, write its audio (through the cache) to `out`; with `manifest`, fill the cache
    for every record's text, with a progress bar, and print a summary. Returns the summary.
    """
    if (text is None) == (manifest is None):
        raise ValueError("synthesize needs exactly one of --text or --manifest")
    cache = SynthesisCache(make_synthesizer(backend, **options), root=cache_dir, sample_rate=sample_rate)
    if text is not None:
        return _one(cache, text, out)
    return _fill(cache, manifest, batch_size)


def _one(cache: SynthesisCache, text: str, out: str | None) -> dict:
    import soundfile as sf

    if out is None:
        raise ValueError("synthesize --text needs --out FILE.wav")
    start = time.perf_counter()
    wav = cache.get(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, wav.numpy(), cache.sample_rate, subtype="FLOAT")
    summary = {"out": out, "seconds_audio": round(wav.shape[0] / cache.sample_rate, 3),
               "seconds": round(time.perf_counter() - start, 3), **cache.stats()}  # fmt: skip
    print(f"{cache.synthesizer.name}: {summary['seconds_audio']} s of audio -> {out} "
          f"({'cache hit' if cache.hits else 'synthesised'})")  # fmt: skip
    return summary


def _fill(cache: SynthesisCache, manifest: str, batch_size: int) -> dict:
    from tqdm import tqdm

    from rewiring.manifest import read_manifest

    records = read_manifest(manifest)
    texts = [r.text for r in records if r.text is not None and r.text.strip()]
    no_text = len(records) - len(texts)
    unique = list(dict.fromkeys(texts))
    unsayable: set[str] = set()
    start = time.perf_counter()
    with tqdm(total=len(unique), unit="text", desc=f"synthesize {cache.synthesizer.name}") as bar:
        for i in range(0, len(unique), max(1, batch_size)):
            batch = unique[i : i + batch_size]
            for t, wav in zip(batch, cache.get_many(batch, skip_errors=True), strict=True):
                if wav is None:
                    unsayable.add(t)
            bar.update(len(batch))
            bar.set_postfix(hits=cache.hits, misses=cache.misses, skipped=len(unsayable))
    seconds = time.perf_counter() - start
    skipped = no_text + sum(t in unsayable for t in texts)
    stats = cache.stats()
    summary = {
        "backend": cache.synthesizer.name,
        "manifest": str(manifest),
        "records": len(records),
        "texts": len(unique),
        "hits": stats["hits"],
        "misses": stats["misses"],
        "skipped": skipped,
        "skipped_no_text": no_text,
        "skipped_unsayable": skipped - no_text,
        "corrupt": stats["corrupt"],
        "seconds": round(seconds, 2),
        "audio_seconds": stats["synth_audio_seconds"],
        "rtf": stats["rtf"],
    }
    rtf = "n/a (all cached)" if stats["rtf"] is None else f"{stats['rtf']:.3f}"
    print(
        f"synthesize {summary['backend']}: {len(records)} records, {len(unique)} distinct texts; "
        f"hits {summary['hits']}, misses {summary['misses']}, skipped {skipped} "
        f"({no_text} without text, {summary['skipped_unsayable']} unsayable); "
        f"{seconds:.1f} s, real-time factor {rtf}; cache {cache.root}"
    )
    return summary


__all__ = ["BACKENDS", "make_synthesizer", "synthesize_command"]
