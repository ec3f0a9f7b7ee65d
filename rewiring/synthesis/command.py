"""`python -m rewiring synthesize`: say one text into a wav, or fill the cache for a manifest."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

from rewiring.synthesis.base import SynthesisError, Synthesizer
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
    workers: int = 1,
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
    return _fill(cache, manifest, batch_size, workers)


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


_COUNTERS = ("hits", "misses", "corrupt", "synth_seconds", "synth_audio_seconds")
_WORKER_CACHE: SynthesisCache | None = None


def _say(cache: SynthesisCache, seed: int, texts: list[str]) -> tuple[list[str], dict[str, float]]:
    """Fill the cache for `texts` (one backend batch, its noise from `seed`); the texts it cannot
    say, and the counters' change."""
    cache.synthesizer.reseed(seed)
    before = {k: getattr(cache, k) for k in _COUNTERS}
    wavs = cache.get_many(texts, skip_errors=True)
    delta = {k: getattr(cache, k) - before[k] for k in _COUNTERS}
    return [t for t, wav in zip(texts, wavs, strict=True) if wav is None], delta


def _has_missing(cache: SynthesisCache, texts: list[str]) -> bool:
    """Whether some text of `texts` that can be said has no cache entry yet."""
    for text in texts:
        try:
            if not cache.path(text).is_file():
                return True
        except SynthesisError:
            continue  # unsayable: counted as a skip, nothing to synthesise
    return False


def _init_worker(synthesizer: Synthesizer, root: str, sample_rate: int, parent_pid: int) -> None:
    """A worker's start: it dies with the process that filled the cache (no ~830 MB orphans after
    a `kill -9`), then gets its own backend."""
    global _WORKER_CACHE
    from rewiring.procs import die_with_parent

    die_with_parent(parent_pid)
    import torch

    torch.set_num_threads(1)
    _WORKER_CACHE = SynthesisCache(synthesizer, root=root, sample_rate=sample_rate)


def _say_in_worker(seed: int, texts: list[str]) -> tuple[list[str], dict[str, float]]:
    assert _WORKER_CACHE is not None
    return _say(_WORKER_CACHE, seed, texts)


def fill_cache(
    cache: SynthesisCache, texts: list[str], batch_size: int = 32, workers: int = 1
) -> tuple[set[str], dict[str, Any]]:
    """Say every text the cache does not hold yet, in backend batches of `batch_size`, on `workers`
    processes (spawned, one backend each; the cache's atomic writes make that safe; each dies with
    this process, whose calling thread outlives them, as the parent-death signal needs). Each batch
    restarts the backend's sampling noise from its index (`Synthesizer.reseed`), so a fresh fill
    writes the same audio whatever the number of workers, on any machine. Returns the texts that
    cannot be said and the counters (hits, misses, corrupt, synthesis time and audio, real-time
    factor) summed over the workers.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    size = max(1, batch_size)
    chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
    unsayable: set[str] = set()
    totals = dict.fromkeys(_COUNTERS, 0.0)
    # Batches with something to say go to the workers; the rest (all cached, or unsayable) are read
    # here, so a warm cache starts no process. Batch i keeps seed i either way.
    todo = [i for i, chunk in enumerate(chunks) if _has_missing(cache, chunk)]
    pool = None
    futures: dict[int, Any] = {}
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(cache.synthesizer, str(cache.root), cache.sample_rate, os.getpid()),
        )
        futures = {i: pool.submit(_say_in_worker, i, chunks[i]) for i in todo}
    results = (futures[i].result() if i in futures else _say(cache, i, chunk) for i, chunk in enumerate(chunks))
    try:
        with tqdm(total=len(texts), unit="text", desc=f"synthesize {cache.synthesizer.name}") as bar:
            for chunk, (bad, delta) in zip(chunks, results, strict=True):
                unsayable.update(bad)
                for k in _COUNTERS:
                    totals[k] += delta[k]
                bar.update(len(chunk))
                bar.set_postfix(hits=int(totals["hits"]), misses=int(totals["misses"]), skipped=len(unsayable))
    finally:
        if pool is not None:
            pool.shutdown()
    stats: dict[str, Any] = {k: int(totals[k]) for k in ("hits", "misses", "corrupt")}
    stats["synth_seconds"] = round(totals["synth_seconds"], 3)
    stats["synth_audio_seconds"] = round(totals["synth_audio_seconds"], 3)
    audio = totals["synth_audio_seconds"]
    stats["rtf"] = round(totals["synth_seconds"] / audio, 4) if audio else None
    return unsayable, stats


def _fill(cache: SynthesisCache, manifest: str, batch_size: int, workers: int = 1) -> dict:
    from rewiring.manifest import read_manifest

    records = read_manifest(manifest)
    texts = [r.text for r in records if r.text is not None and r.text.strip()]
    no_text = len(records) - len(texts)
    unique = list(dict.fromkeys(texts))
    start = time.perf_counter()
    unsayable, stats = fill_cache(cache, unique, batch_size, workers)
    seconds = time.perf_counter() - start
    skipped = no_text + sum(t in unsayable for t in texts)
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
        "workers": workers,
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


__all__ = ["BACKENDS", "fill_cache", "make_synthesizer", "synthesize_command"]
