"""2. The data pipeline: rewiring DataLoader throughput (warm and cold synthesis cache), each TTS
backend's real-time factor, and the cache's hit latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Workspace, log, make_synth, summarize
from rewiring.encoder import TINY_CONFIG
from rewiring.frames import config_frame_layout
from rewiring.synthesis.coqui import random_vits

TINY_LAYOUT = config_frame_layout(TINY_CONFIG)


def _shutdown(iterator) -> None:
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()


def loader_rate(
    ws: Workspace,
    backend: str,
    cache_dir: Path,
    num_workers: int,
    n_batches: int,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Batches/s out of the rewiring DataLoader (neutral pairs, bucketed) pulled in a tight loop.

    The first batch (iterator start, worker start, backend load) is reported apart from the rest.
    """
    from rewiring.pairs import RewiringDataModule

    dm = RewiringDataModule(
        manifest=str(ws.rewire_manifest),
        pairing="neutral",
        synthesizer=make_synth(backend),
        cache_dir=str(cache_dir),
        batch_size=batch_size,
        num_workers=num_workers,
        bucket_by_length=True,
    )
    dm.setup("fit")
    dm.set_frame_layout(TINY_LAYOUT)  # RewiringModule.setup hands the encoder's layout over in a fit
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    iterator = iter(loader)
    times, sizes = [], []
    last = t0
    for _ in range(n_batches):
        batch = next(iterator)
        now = time.perf_counter()
        times.append(now - last)
        sizes.append(batch["size"])
        last = now
    ready = []
    if num_workers > 0:
        # A batch the workers have already made: what a training step that outlasts the loader waits.
        for _ in range(min(4, n_batches)):
            time.sleep(0.25)
            t = time.perf_counter()
            next(iterator)
            ready.append(time.perf_counter() - t)
    _shutdown(iterator)
    rest = times[1:] or times
    med = summarize(rest)["median"]
    return {
        "ready_fetch_s": summarize(ready) if ready else None,
        "backend": backend,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "batches": n_batches,
        "first_batch_s": times[0],
        "batch_s": summarize(rest),
        "batches_per_s": 1.0 / med if med else None,
        "total_s": last - t0,
        "pairs": sum(sizes),
    }


def padding(ws: Workspace, backend: str, bucket: bool, n_batches: int, batch_size: int = 8) -> dict[str, Any]:
    """Padded samples over real samples per view, with and without length-bucketed batches (the
    encoder computes on the padding too)."""
    from rewiring.pairs import RewiringDataModule

    dm = RewiringDataModule(
        manifest=str(ws.rewire_manifest),
        pairing="neutral",
        synthesizer=make_synth(backend),
        cache_dir=str(ws.warm_cache),
        batch_size=batch_size,
        num_workers=0,
        bucket_by_length=bucket,
    )
    dm.setup("fit")
    dm.set_frame_layout(TINY_LAYOUT)
    padded = {"view1": 0, "view2": 0}
    real = {"view1": 0, "view2": 0}
    for k, batch in enumerate(dm.train_dataloader()):
        if k == n_batches:
            break
        for v in padded:
            padded[v] += batch[v]["waveforms"].numel()
            real[v] += int(batch[v]["attention_mask"].sum())
    return {
        "bucket_by_length": bucket,
        "batches": n_batches,
        "padded_over_real": {v: padded[v] / real[v] for v in padded if real[v]},
    }


def task_padding(
    manifest: Path, batch_size: int, crop: float | None = None, epochs: int = 3
) -> dict[str, Any]:
    """The same ratio for a task's train manifest under the tasks' shuffled (unbucketed) batches,
    from the manifest's durations (no audio read; `crop`: the training crop, as sid's)."""
    from rewiring.manifest import read_manifest

    durations = torch.tensor([r.duration for r in read_manifest(manifest)])
    if crop is not None:
        durations = durations.clamp(max=crop)
    g = torch.Generator().manual_seed(0)
    padded = real = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(durations), generator=g)
        for start in range(0, len(order), batch_size):
            d = durations[order[start : start + batch_size]]
            padded += float(d.max()) * len(d)
            real += float(d.sum())
    bucketed = torch.sort(durations).values
    b_padded = sum(float(bucketed[i : i + batch_size].max()) * len(bucketed[i : i + batch_size])
                   for i in range(0, len(bucketed), batch_size))  # fmt: skip
    return {
        "manifest": str(manifest),
        "batch_size": batch_size,
        "padded_over_real": padded / real,
        "sorted_padded_over_real": b_padded / float(durations.sum()),
    }


def tts_rtf(name: str, synth, texts: list[str], batched: bool = False) -> dict[str, Any]:
    """Real-time factor (synthesis seconds / audio seconds) per text, after a first call that loads the
    backend (reported as load_s)."""
    t0 = time.perf_counter()
    synth.synthesize(texts[0])
    load = time.perf_counter() - t0
    rtfs, secs, audio = [], [], []
    for text in texts[1:]:
        t = time.perf_counter()
        wav, sr = synth.synthesize(text)
        dt = time.perf_counter() - t
        rtfs.append(dt / (len(wav) / sr))
        secs.append(dt)
        audio.append(len(wav) / sr)
    out = {
        "backend": name,
        "first_call_s": load,
        "rtf": summarize(rtfs),
        "call_s": summarize(secs),
        "audio_s": summarize(audio),
    }
    if batched:
        t = time.perf_counter()
        results = synth.synthesize_many(texts[1:])
        dt = time.perf_counter() - t
        total = sum(len(w) / sr for w, sr in results)
        out["rtf_batched"] = dt / total if total else None
    return out


def _task_conf(task: str) -> tuple[int, float | None]:
    """(batch_size, train_max_seconds) from conf/tasks/<task>.yaml's data.init_args."""
    import yaml

    from benchmarks.common import CONF

    try:
        args = yaml.safe_load((CONF / "tasks" / f"{task}.yaml").read_text())["data"]["init_args"]
    except (OSError, KeyError, TypeError):
        return 8, None
    return int(args.get("batch_size", 8)), args.get("train_max_seconds")


def backend_rtfs(ws: Workspace, texts: list[str], backends: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in backends:
        log(f"pipeline: {name} real-time factor over {len(texts) - 1} texts")
        try:
            if name == "coqui":
                synth = make_synth("coqui", model_path=str(random_vits(ws.tmp / "vits")))
                label = "coqui (tiny random VITS)"
            else:
                synth = make_synth(name)
                label = name
            out[name] = tts_rtf(label, synth, texts, batched=(name == "festival"))
        except Exception as e:  # a backend that is not installed is reported, not fatal
            out[name] = {"backend": name, "error": f"{type(e).__name__}: {e}"}
    return out


def cache_hit_latency(ws: Workspace, backend: str, texts: list[str], passes: int) -> dict[str, Any]:
    """`SynthesisCache.get` on entries that are there: read, checksum, tensor."""
    from rewiring.synthesis import SynthesisCache

    cache = SynthesisCache(make_synth(backend), root=str(ws.warm_cache))
    cache.get_many(texts, skip_errors=True)  # make sure they are warm
    cache.reset_stats()
    times, audio = [], []
    for _ in range(passes):
        for text in texts:
            t = time.perf_counter()
            wav = cache.get(text)
            times.append(time.perf_counter() - t)
            audio.append(wav.shape[0] / cache.sample_rate)
    per_s = [t / a for t, a in zip(times, audio, strict=True) if a > 0]
    return {
        "backend": backend,
        "hit_ms": summarize([1000 * t for t in times]),
        "ms_per_audio_s": summarize([1000 * x for x in per_s]),
        "hits": cache.hits,
        "misses": cache.misses,
    }


def measure(
    ws: Workspace,
    *,
    warm_backend: str,
    texts: list[str],
    quick: bool,
    backends: tuple[str, ...] = ("festival", "piper", "espeak", "coqui"),
    cold_backends: tuple[str, ...] = ("espeak", "piper"),
    consumption_step_s: float | None = None,
) -> dict[str, Any]:
    n_warm = 4 if quick else 24
    n_cold = 3 if quick else 5
    out: dict[str, Any] = {"loader": []}
    for workers in (0, 2):
        log(f"pipeline: warm cache ({warm_backend}), {workers} workers, {n_warm} batches")
        out["loader"].append(
            {"cache": "warm", **loader_rate(ws, warm_backend, ws.warm_cache, workers, n_warm)}
        )
    for backend in cold_backends:
        for workers in (0, 2) if backend == "piper" else (2,):
            log(f"pipeline: cold cache ({backend}), {workers} workers, {n_cold} batches")
            cold = ws.tmp / f"cold-{backend}-{workers}"
            try:
                res = loader_rate(ws, backend, cold, workers, n_cold)
            except Exception as e:
                res = {"backend": backend, "num_workers": workers, "error": f"{type(e).__name__}: {e}"}
            out["loader"].append({"cache": "cold", **res})
    if consumption_step_s:
        out["model_batches_per_s"] = 1.0 / consumption_step_s
        for row in out["loader"]:
            if row.get("batches_per_s"):
                row["headroom"] = row["batches_per_s"] * consumption_step_s
    n_pad = 4 if quick else 40
    log(f"pipeline: padding over {n_pad} batches, bucketed and not")
    out["padding"] = [padding(ws, warm_backend, bucket, n_pad) for bucket in (True, False)]
    out["task_padding"] = {}
    for task in ("asr", "sf", "ic", "sid", "sd"):
        path = ws.corpus / task / "train.jsonl"
        if path.exists():
            out["task_padding"][task] = task_padding(path, *_task_conf(task))
    rtf_texts = texts[: (3 if quick else 7)]
    out["tts"] = backend_rtfs(ws, rtf_texts, backends)
    log("pipeline: cache hit latency")
    out["cache_hit"] = cache_hit_latency(ws, warm_backend, texts[:16], passes=1 if quick else 3)
    return out
