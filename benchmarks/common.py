"""What every benchmark shares: robust statistics, a step-timing callback, the data it runs on, CLI args.

Figures are medians over repeats taken after warm-up, with the interquartile range and min/max, so
one slow repeat on a shared machine moves the spread, not the figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewiring.encoder import WAV2VEC2_CONV

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SAMPLE_RATE = 16000

# wav2vec2-base's shape (95M parameters), randomly initialised from a config: no download needed.
BASE_CONFIG: dict[str, Any] = {
    "model_type": "wav2vec2",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    **WAV2VEC2_CONV,
    "conv_bias": False,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "layerdrop": 0.0,
}

# The embedded "small" corpus's sizes (rewiring/corpus/build.py): the bench repeats the tiny corpus's
# items up to these counts, so epochs are as long as in the demo without building the small corpus.
SMALL_UNLABELLED = 1200
SMALL_KS = (360, 72)  # train, dev


# ------------------------------------------------------------------------------ statistics
def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min/max and count (quartiles by linear interpolation; n=1 gives a point)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None, "n": 0}
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {
        "median": statistics.median(xs),
        "q1": q1,
        "q3": q3,
        "min": xs[0],
        "max": xs[-1],
        "n": len(xs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn`, `repeats` times after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def max_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process's own address space.
    getrusage's ru_maxrss is not used there: the kernel carries it over from the parent across
    fork + exec, so a subprocess started by a big parent would report the parent's peak.
    Elsewhere: getrusage.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


# ------------------------------------------------------------------------------ step timing
def batch_shape(batch: Any) -> tuple[int, ...]:
    """The padded shape of a training batch (cheap: no pass over the data)."""
    if isinstance(batch, dict) and "view1" in batch:
        return (*batch["view1"]["waveforms"].shape, *batch["view2"]["waveforms"].shape)
    waveforms = getattr(batch, "waveforms", None)
    return tuple(waveforms.shape) if waveforms is not None else ()


def batch_audio(batch: Any) -> tuple[float, float]:
    """(seconds of real audio through the encoder, seconds of source audio) in a training batch.

    Rewiring batches hold two views (both count for the first figure, the first view alone is the
    source audio); task batches hold one.
    """
    if isinstance(batch, dict) and "view1" in batch:
        v1 = float(batch["view1"]["attention_mask"].sum()) / SAMPLE_RATE
        v2 = float(batch["view2"]["attention_mask"].sum()) / SAMPLE_RATE
        return v1 + v2, v1
    if isinstance(batch, dict):
        return 0.0, 0.0  # a rewiring batch with fewer than two usable pairs
    lengths = getattr(batch, "lengths", None)
    if lengths is None:
        return 0.0, 0.0
    s = float(lengths.sum()) / SAMPLE_RATE
    return s, s


def steady(values: Sequence[float], skip: int) -> list[float]:
    """Drop the first `skip` values (warm-up), keeping at least one."""
    return list(values[skip:]) or list(values[-1:])


# ------------------------------------------------------------------------------ workspace and data
@dataclass
class Workspace:
    """Where the bench keeps things.

    persist: kept between bench runs (the embedded tiny corpus, the warm synthesis cache), under the
        git-ignored cache/ folder; tmp: this run's manifests, logs and cold caches.
    corpus: an embedded-corpus root (unlabelled/train.jsonl, ks/{train,dev,test}.jsonl).
    """

    persist: Path
    tmp: Path
    corpus: Path

    @property
    def warm_cache(self) -> Path:
        return self.persist / "tts"

    @property
    def rewire_manifest(self) -> Path:
        return self.tmp / "data" / "unlabelled" / "train.jsonl"

    @property
    def ks_root(self) -> Path:
        return self.tmp / "data"

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"


def _repeat_records(records: list, n: int, src_manifest: Path, dst_manifest: Path) -> list:
    """`n` records cycling through `records`, ids made unique, audio paths re-based to `dst_manifest`."""
    from rewiring.manifest import audio_path

    out = []
    for i in range(n):
        rec = records[i % len(records)]
        rel = os.path.relpath(audio_path(src_manifest, rec).resolve(), dst_manifest.parent.resolve())
        out.append(dataclasses.replace(rec, id=f"{rec.id}~{i // len(records)}", audio=rel))
    return out


def prepare_data(ws: Workspace, build: bool = True) -> dict[str, Any]:
    """The manifests the bench runs on: the corpus's unlabelled train set and its ks splits, each
    repeated up to the embedded small corpus's size (so an epoch is as long as in the demo).
    Builds the embedded tiny corpus on first use when `ws.corpus` is an .../embedded/tiny root."""
    from rewiring.manifest import read_manifest, write_manifest

    if build and not (ws.corpus / "unlabelled" / "train.jsonl").exists():
        from rewiring.corpus import ensure_corpus

        ensure_corpus(ws.corpus)
    src = ws.corpus / "unlabelled" / "train.jsonl"
    unl = read_manifest(src)
    write_manifest(ws.rewire_manifest, _repeat_records(unl, max(SMALL_UNLABELLED, len(unl)), src, ws.rewire_manifest))
    sizes = {"train": SMALL_KS[0], "dev": SMALL_KS[1], "test": SMALL_KS[1]}
    for split, n in sizes.items():
        src_ks = ws.corpus / "ks" / f"{split}.jsonl"
        dst = ws.ks_root / "ks" / f"{split}.jsonl"
        recs = read_manifest(src_ks)
        write_manifest(dst, _repeat_records(recs, max(n, len(recs)), src_ks, dst))
    texts = sorted({r.text for r in unl if r.text})
    return {
        "unlabelled_items": len(unl),
        "unlabelled_seconds": sum(r.duration for r in unl),
        "texts": texts,
        "records": unl,
    }


def warm_cache(ws: Workspace, backend: str, texts: list[str]) -> dict[str, Any]:
    """Fill the persistent synthesis cache for `texts` (a no-op when it is already warm)."""
    from rewiring.synthesis import SynthesisCache

    cache = SynthesisCache(make_synth(backend), root=str(ws.warm_cache))
    t0 = time.perf_counter()
    cache.get_many(texts, skip_errors=True)
    return {"backend": backend, "seconds": time.perf_counter() - t0, **cache.stats()}


def make_synth(backend: str, **kw):
    from rewiring.synthesis.command import make_synthesizer

    return make_synthesizer(backend, **kw)


SYNTH_CLASS = {
    "piper": "rewiring.synthesis.PiperSynthesizer",
    "espeak": "rewiring.synthesis.EspeakSynthesizer",
    "festival": "rewiring.synthesis.FestivalSynthesizer",
}


# ------------------------------------------------------------------------------ CLI runs
def encoder_config(ws: Workspace, name: str) -> list[str]:
    """--config/override args that pick the encoder: `tiny` (conf/encoder/tiny-random.yaml, CNN trained
    as in conf/encoder/tiny.yaml) or `base` (wav2vec2-base's shape from a config, CNN frozen as in
    conf/encoder/wav2vec2-base.yaml)."""
    if name == "tiny":
        return [
            "--config",
            str(CONF / "encoder" / "tiny-random.yaml"),
            "--model.init_args.encoder.init_args.freeze_feature_encoder=false",
        ]
    if name == "base":
        path = ws.tmp / "encoder-base.yaml"
        spec = {
            "model": {
                "init_args": {
                    "encoder": {
                        "class_path": "rewiring.encoder.SpeechEncoder",
                        "init_args": {"source": BASE_CONFIG, "layers": "average", "freeze_feature_encoder": True},
                    }
                }
            }
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
        return ["--config", str(path)]
    raise ValueError(f"unknown encoder {name!r}")


@dataclass
class Case:
    """One training setup measured through Lightning and through a bare loop."""

    name: str
    stage: str  # "rewire" | "ks"
    encoder: str  # "tiny" | "base"
    batch_size: int
    warmup: int
    steps: int
    max_seconds: float | None = None  # rewiring: keep only utterances this short
    num_workers: int = 2
    synth: str = "piper"
    protocol: str = "finetune"  # ks
    extra: tuple[str, ...] = ()  # more CLI arguments (accelerator, precision)

    def cli_args(
        self, ws: Workspace, *, profiler: bool = False, timer_out: str | None = None, steps: int | None = None
    ) -> list[str]:
        total = steps if steps is not None else self.warmup + self.steps
        args = ["fit", "--config", str(CONF / "base.yaml"), *encoder_config(ws, self.encoder)]
        if self.stage == "rewire":
            args += [
                "--config",
                str(CONF / "stages" / "rewire.yaml"),
                f"--data.init_args.manifest={ws.rewire_manifest}",
                f"--data.init_args.synthesizer={SYNTH_CLASS[self.synth]}",
                f"--data.init_args.cache_dir={ws.warm_cache}",
                "--model.init_args.export_dir=null",
                "--model.init_args.isotropy_manifest=null",
            ]
            if self.max_seconds is not None:
                args.append(f"--data.init_args.max_seconds={self.max_seconds}")
        elif self.stage == "ks":
            args += [
                "--config",
                str(CONF / "tasks" / "ks.yaml"),
                f"--data.init_args.root={ws.ks_root}",
                f"--model.init_args.protocol={self.protocol}",
            ]
        else:
            raise ValueError(f"unknown stage {self.stage!r}")
        args += [
            f"--data.init_args.batch_size={self.batch_size}",
            f"--data.init_args.num_workers={self.num_workers}",
            f"--trainer.max_steps={total}",
            "--trainer.max_epochs=-1",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={ws.runs}",
            f"--trainer.logger.init_args.name=bench-{self.name}",
            f"--trainer.default_root_dir={ws.runs}",
            "--trainer.callbacks+=benchmarks.timer.StepTimer",
        ]
        args += list(self.extra)
        if timer_out:
            args.append(f"--trainer.callbacks.init_args.out={timer_out}")
        if profiler:
            args.append("--trainer.profiler=simple")
        return args


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's per-run banners (GPU available..., few workers...) out of the bench output;
    logger levels and warning filters are restored afterwards."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", category=UserWarning)
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_threads(n: int = 1) -> None:
    torch.set_num_threads(n)
