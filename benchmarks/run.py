"""Run the four benchmark sections and write results.md and results.json.

`python -m benchmarks --out benchmarks` (make bench) calls `run_benchmarks(out, quick)`.
Everything runs on one thread (torch.set_num_threads(1); OMP_NUM_THREADS=1 in subprocesses), so
the figures are per CPU core. The embedded tiny corpus and the warm synthesis cache are kept under
cache/bench/ between runs; the run's logs, manifests and cold caches go to a temporary folder.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    REPO,
    Case,
    Workspace,
    log,
    prepare_data,
    quiet_lightning,
    set_threads,
    warm_cache,
)

SECTIONS = ("overhead", "pipeline", "scaling", "sweep", "gpu", "features")


def cases(quick: bool, synth: str) -> list[Case]:
    """The four setups of section 1: tiny and wav2vec2-base-sized encoders, rewiring and ks fine-tuning."""
    tw, ts = (1, 2) if quick else (3, 12)
    bw, bs = (1, 1) if quick else (2, 10)
    return [
        # conf/stages/rewire.yaml's batch of 8 pairs; conf/tasks/ks.yaml's batch of 16.
        Case("tiny-rewire", "rewire", "tiny", batch_size=8, warmup=tw, steps=ts, synth=synth),
        Case("tiny-ks", "ks", "tiny", batch_size=16, warmup=tw, steps=ts, protocol="finetune"),
        # The base-sized encoder is slow on one core (~2 s a step): short utterances, small batches.
        Case("base-rewire", "rewire", "base", batch_size=2, warmup=bw, steps=bs, max_seconds=1.5, synth=synth),
        Case("base-ks", "ks", "base", batch_size=4, warmup=bw, steps=bs, protocol="finetune"),
    ]


def small_corpus(root: Path = REPO / "data" / "embedded" / "small") -> dict[str, Any] | None:
    """The embedded small corpus's unlabelled train set (the demo's rewiring epoch), measured from its
    manifest: items and hours of audio; None where it has not been built."""
    from rewiring.manifest import read_manifest

    manifest = root / "unlabelled" / "train.jsonl"
    if not manifest.is_file():
        return None
    records = read_manifest(manifest)
    return {"root": str(root), "unlabelled_items": len(records),
            "unlabelled_hours": sum(r.duration for r in records) / 3600}  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(quick: bool) -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    return {
        "quick": quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }


def _write(out: Path, results: dict[str, Any]) -> None:
    from benchmarks.report import render

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = render(results)
    if "features" in results["sections"]:  # section 6 renders itself
        from benchmarks.features import render as render_features

        text += "\n" + "\n".join(render_features(results["sections"]["features"]))
    (out / "results.md").write_text(text)


def run_benchmarks(
    out: str = "benchmarks",
    quick: bool = False,
    *,
    sections: Sequence[str] = SECTIONS,
    corpus: str | Path | None = None,
    case_names: Sequence[str] | None = None,
    backends: Sequence[str] = ("festival", "piper", "espeak", "coqui"),
    cold_backends: Sequence[str] = ("espeak", "piper"),
    synth: str | None = None,
    scaling_lengths: Sequence[float] | None = None,
    scaling_batches: Sequence[int] | None = None,
    persist: str | Path | None = None,
    keep_tmp: bool = False,
) -> dict[str, Any]:
    """Measure and write `out`/results.md and `out`/results.json; returns the results.

    Args:
        out: folder for the results.
        quick: few repeats (a smoke run, not for reporting).
        sections: which of overhead, pipeline, scaling, sweep, gpu, features to run (gpu: skipped
            without CUDA).
        corpus: an embedded-corpus root to run on (default: the tiny embedded corpus, built once
            under cache/bench/embedded/tiny).
        case_names: which section-1 cases (tiny-rewire, tiny-ks, base-rewire, base-ks); all by default.
        backends: TTS backends whose real-time factor is measured.
        cold_backends: backends for the cold-cache loader figures.
        synth: the neutral voice of the rewiring runs (default: piper, as conf/stages/rewire.yaml;
            espeak in quick runs).
        scaling_lengths, scaling_batches: points of section 3 (default: 1-16 s, batches 1-8).
        persist: folder kept between runs (default: cache/bench).
        keep_tmp: keep the temporary folder (logs, manifests) for inspection.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench sections {unknown}; choose from {SECTIONS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    set_threads(1)
    out_dir = Path(out)
    persist_dir = Path(persist) if persist else REPO / "cache" / "bench"
    corpus_dir = Path(corpus) if corpus else persist_dir / "embedded" / "tiny"
    synth = synth or ("espeak" if quick else "piper")
    tmp = Path(tempfile.mkdtemp(prefix="rewiring-bench-"))
    ws = Workspace(persist=persist_dir, tmp=tmp, corpus=corpus_dir)
    opts = _Options(quick, tuple(sections), case_names, tuple(backends), tuple(cold_backends), synth,
                    scaling_lengths, scaling_batches)  # fmt: skip
    t_all = time.perf_counter()
    results: dict[str, Any] = {"meta": _meta(quick), "sections": {}}
    results["meta"]["section_s"] = {}
    try:
        with quiet_lightning():
            _run(ws, results, out_dir, opts)
    finally:
        set_threads(threads)
        results["meta"]["total_s"] = time.perf_counter() - t_all
        results["meta"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
        _write(out_dir, results)
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {results['meta']['total_s']:.0f} s: {out_dir / 'results.md'}")
    return results


@dataclass
class _Options:
    quick: bool
    sections: tuple[str, ...]
    case_names: Sequence[str] | None
    backends: tuple[str, ...]
    cold_backends: tuple[str, ...]
    synth: str
    scaling_lengths: Sequence[float] | None
    scaling_batches: Sequence[int] | None


def _run(ws: Workspace, results: dict[str, Any], out_dir: Path, o: _Options) -> None:
    """The sections in order; results.json and results.md are rewritten after each one."""
    sec = results["meta"]["section_s"]
    t = time.perf_counter()
    log(f"data: corpus {ws.corpus}, warm {o.synth} cache in {ws.warm_cache}")
    data = prepare_data(ws)
    results["meta"]["warm_cache"] = warm_cache(ws, o.synth, data["texts"])
    results["meta"]["corpus"] = {
        "root": str(ws.corpus),
        "unlabelled_items": data["unlabelled_items"],
        "unlabelled_seconds": data["unlabelled_seconds"],
    }
    results["meta"]["small_corpus"] = small_corpus()  # what a demo rewiring epoch reads
    sec["data setup"] = time.perf_counter() - t

    if "overhead" in o.sections:
        from benchmarks import overhead

        t = time.perf_counter()
        res: dict[str, Any] = {}
        for case in cases(o.quick, o.synth):
            if o.case_names is not None and case.name not in o.case_names:
                continue
            try:
                res[case.name] = overhead.measure(ws, case, profile=case.encoder == "tiny")
            except Exception as e:  # one failing case must not lose the others
                log(f"overhead {case.name} failed: {type(e).__name__}: {e}")
                res[case.name] = {"error": f"{type(e).__name__}: {e}"}
        results["sections"]["overhead"] = res
        sec["1 overhead"] = time.perf_counter() - t
        _write(out_dir, results)

    if "pipeline" in o.sections:
        from benchmarks import pipeline

        t = time.perf_counter()
        tiny = results["sections"].get("overhead", {}).get("tiny-rewire", {})
        res = pipeline.measure(
            ws,
            warm_backend=o.synth,
            texts=data["texts"],
            quick=o.quick,
            backends=o.backends,
            cold_backends=o.cold_backends,
            consumption_step_s=tiny.get("bare", {}).get("step_s", {}).get("median"),
        )
        if tiny.get("lightning"):
            res["lightning_gap_ms"] = 1000 * tiny["lightning"]["gap_s"]["median"]
        results["sections"]["pipeline"] = res
        sec["2 pipeline"] = time.perf_counter() - t
        _write(out_dir, results)

    if "scaling" in o.sections:
        from benchmarks import scaling

        t = time.perf_counter()
        results["sections"]["scaling"] = scaling.measure(
            o.quick,
            None if o.scaling_lengths is None else tuple(o.scaling_lengths),
            None if o.scaling_batches is None else tuple(o.scaling_batches),
        )
        sec["3 scaling"] = time.perf_counter() - t
        _write(out_dir, results)

    if "sweep" in o.sections:
        from benchmarks import sweep

        t = time.perf_counter()
        results["sections"]["sweep"] = sweep.measure(ws, o.quick)
        sec["4 sweep"] = time.perf_counter() - t
        _write(out_dir, results)

    if "gpu" in o.sections:
        from benchmarks import gpu

        t = time.perf_counter()
        results["sections"]["gpu"] = gpu.measure(ws, o.quick, o.synth)
        sec["5 gpu"] = time.perf_counter() - t

    if "features" in o.sections:
        from benchmarks import features

        t = time.perf_counter()
        results["sections"]["features"] = features.measure(ws, o.quick)
        sec["6 features"] = time.perf_counter() - t
