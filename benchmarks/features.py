"""6. The frozen-feature cache: SUPERB steps on cached hidden states against live encoding, side by side.

For the tiny encoder and a wav2vec2-base-sized one (random weights from a config), the same ks SUPERB
fit runs through the full Lightning path (conf/base.yaml + encoder + conf/tasks/ks.yaml, 2 workers,
StepTimer) live (``feature_cache=null``) and cached. The first cached run fills the cache (its fill is
timed on its own); then live and cached runs alternate, so the machine's drift hits both. A step is
the interval between two batch ends: data wait, forward, backward and optimizer. Also measured: the
demo's task run (ks, 60 steps, dev every 15, as conf/sweep/demo.yaml) both ways, and how fast cache
entries are read back (page cache, one core).

The paper sweep's GPU-hours both ways are an estimate, not a measurement: no GPU took part. It takes
the sweep's plan (conf/sweep/paper.yaml: runs, steps), the task configs' batch sizes, the published
sizes of the real corpora (mean utterance length, hours: `PAPER_CORPORA`), wav2vec2-large's forward
FLOPs (`benchmarks.scaling.flop_model`) at an assumed share of an H100/H200's dense bf16 peak, and
the entry read rate measured here. It counts the encoder's part of a step (the forward live, reading
its hidden states cached); the heads cost the same either way and are left out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import BASE_CONFIG, CONF, REPO, Case, Workspace, log, ratio, steady, summarize
from benchmarks.scaling import flop_model
from rewiring.encoder import TINY_CONFIG

# wav2vec2-large-lv60's shape (the paper's encoder), for its FLOPs and entry size.
LARGE_CONFIG: dict[str, Any] = {
    **BASE_CONFIG,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
}
# Assumptions of the paper estimate, stated with it.
PEAK_BF16_FLOPS = 989e12  # H100 SXM / H200 dense bf16 (benchmarks.gpu.PEAK_BF16_TFLOPS)
ASSUMED_MFU = 0.4  # share of that peak a frozen bf16 forward of long utterances reaches (assumed)
FRAMES_PER_S = 50
DEFAULT_MAX_GB = 100.0  # TaskModule's feature_cache_max_gb
# Per task: (mean seconds of a training utterance, as the loader crops it; hours of train + dev + test),
# approximate published sizes of the real corpora the paper sweep prepares.
PAPER_CORPORA: dict[str, tuple[float, float]] = {
    "asr": (12.7, 110.9),  # LibriSpeech train-clean-100 (100.6 h, 28,539 utterances) + dev-clean + test-clean
    "ks": (1.0, 18.0),  # Speech Commands v0.01: about 65k one-second clips
    "ic": (2.3, 19.0),  # Fluent Speech Commands: 30,043 utterances, 19 h
    "sid": (8.0, 352.0),  # VoxCeleb1: 153,516 utterances, 352 h; training reads 8 s windows
    "sd": (13.5, 74.0),  # SUPERB's Libri2Mix (train-100: 13,900 mixtures; dev, test: 3,000 each)
    "sf": (2.9, 87.0),  # SUPERB's Audio SNIPS (104,672 train + 2,800 dev + 2,800 test utterances)
}


def cases(quick: bool) -> list[dict[str, Any]]:
    """conf/tasks/ks.yaml's batch of 16 for the tiny encoder; 4 for the base-sized one (slow on a core)."""
    if quick:
        return [{"name": "tiny", "encoder": "tiny", "batch": 16, "warmup": 1, "steps": 2, "repeats": 1}]
    return [
        {"name": "tiny", "encoder": "tiny", "batch": 16, "warmup": 3, "steps": 12, "repeats": 2},
        {"name": "base", "encoder": "base", "batch": 4, "warmup": 2, "steps": 8, "repeats": 2},
    ]


def _fit(ws: Workspace, encoder: str, batch: int, steps: int, cache: Path | None, tag: str, extra: tuple[str, ...] = ()):
    from benchmarks.overhead import _cli, _timer

    case = Case(f"features-{tag}", "ks", encoder, batch_size=batch, warmup=0, steps=steps, protocol="superb",
                extra=(f"--model.init_args.feature_cache={cache or 'null'}", *extra))  # fmt: skip
    t0 = time.perf_counter()
    cli = _cli(case.cli_args(ws), run=True)
    wall = time.perf_counter() - t0
    timer = _timer(cli.trainer)
    features = cli.datamodule.features
    if cache is not None and (features is None or features.store is None):
        raise RuntimeError(f"the cached run encoded live: {getattr(features, 'reason', None)}")
    out = {"wall_s": wall, "steps": timer.step_times(), "gaps": timer.gaps(), "features": features}
    del cli
    return out


def _read_rate(features, repeats: int) -> dict[str, Any]:
    """Bytes per second of `FeatureStore.read` (checks included) over the run's entries, page cache warm."""
    store, keys = features.store, sorted(set(features.keys.values()))
    for k in keys:  # warm
        store.read(k)
    t0 = time.perf_counter()
    n_bytes = 0
    for _ in range(repeats):
        for k in keys:
            n_bytes += store.path(k).stat().st_size
            store.read(k)
    seconds = time.perf_counter() - t0
    return {"entries": len(keys), "bytes": n_bytes, "seconds": seconds, "bytes_per_s": n_bytes / seconds}


def measure_case(ws: Workspace, c: dict[str, Any]) -> dict[str, Any]:
    cache = ws.tmp / "features" / c["name"]
    n = c["warmup"] + c["steps"]
    log(f"features {c['name']}: cold cached run (fills the cache), then live/cached x{c['repeats']}, {n} steps each")
    cold = _fit(ws, c["encoder"], c["batch"], n, cache, f"{c['name']}-cold")
    report = cold["features"].report
    live_steps, cached_steps, live_gaps, cached_gaps = [], [], [], []
    features = cold["features"]
    for r in range(c["repeats"]):
        live = _fit(ws, c["encoder"], c["batch"], n, None, f"{c['name']}-live{r}")
        cached = _fit(ws, c["encoder"], c["batch"], n, cache, f"{c['name']}-cached{r}")
        w = max(0, c["warmup"] - 1)
        live_steps += steady(live["steps"], w)
        cached_steps += steady(cached["steps"], w)
        live_gaps += steady(live["gaps"], w)
        cached_gaps += steady(cached["gaps"], w)
        features = cached["features"]
    config = BASE_CONFIG if c["encoder"] == "base" else TINY_CONFIG
    store = features.store
    per_audio_s = store.num_hidden_states * FRAMES_PER_S * store.hidden_size * store.dtype.itemsize
    out = {
        "batch": c["batch"],
        "hidden_states": store.num_hidden_states,
        "hidden_size": store.hidden_size,
        "params_m": _params_m(config),
        "live_step_s": summarize(live_steps),
        "cached_step_s": summarize(cached_steps),
        "live_gap_s": summarize(live_gaps),
        "cached_gap_s": summarize(cached_gaps),
        "fill": {"entries": report.made, "audio_s": report.audio_seconds, "seconds": report.seconds,
                 "bytes": report.bytes_written},  # fmt: skip
        "entry_bytes_per_audio_s": per_audio_s,
        "read": _read_rate(features, 3),
    }
    out["speedup"] = ratio(out["live_step_s"]["median"], out["cached_step_s"]["median"])
    return out


def _params_m(config: dict[str, Any]) -> float:
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return layers * (4 * d * d + 2 * d * ff) / 1e6  # the Transformer's weights, which dominate


def measure_demo(ws: Workspace, quick: bool) -> dict[str, Any]:
    """One demo task run (ks, tiny encoder, conf/sweep/demo.yaml's steps, dev interval, batch and
    workers), live and on the warm cache; the whole cli_main call."""
    steps, every = (6, 3) if quick else (60, 15)
    extra = ("--trainer.limit_val_batches=1.0", f"--trainer.val_check_interval={every}", "--data.init_args.num_workers=0")
    cache = ws.tmp / "features" / "tiny"
    out: dict[str, Any] = {"steps": steps, "val_every": every}
    for name, where in (("live", None), ("cached", cache)):
        log(f"features: demo task run ({steps} steps, dev every {every}), {name}")
        out[f"{name}_s"] = _fit(ws, "tiny", 8, steps, where, f"demo-{name}", extra)["wall_s"]
    out["speedup"] = ratio(out["live_s"], out["cached_s"])
    return out


def _paper_plan() -> dict[str, dict[str, int]]:
    """Per task of conf/sweep/paper.yaml: its runs, optimizer steps per run, batch size and batches per
    step (gradient accumulation), from the configs each run stacks (the last one to set a value wins,
    then the sweep's args)."""
    from rewiring.experiment.sweep.spec import SweepSpec, plan

    spec = SweepSpec(**yaml.safe_load((CONF / "sweep" / "paper.yaml").read_text()))
    out: dict[str, dict[str, int]] = {}
    for run in plan(spec):
        out.setdefault(run.task, {"runs": 0})["runs"] += 1
    for task, row in out.items():
        values = {"max_steps": None, "accumulate_grad_batches": 1, "batch_size": None, "num_workers": 0}
        for path in (spec.base_config, spec.task_config, *spec.configs):
            conf = yaml.safe_load((REPO / path.format(task=task)).read_text()) or {}
            trainer, data = conf.get("trainer") or {}, (conf.get("data") or {}).get("init_args") or {}
            values.update({k: trainer[k] for k in ("max_steps", "accumulate_grad_batches") if k in trainer})
            values.update({k: data[k] for k in ("batch_size", "num_workers") if k in data})
        for arg in (*spec.args, *spec.task_args.get(task, [])):
            for name in ("trainer.max_steps", "data.init_args.batch_size", "data.init_args.num_workers"):
                key = f"--{name}="
                if arg.startswith(key):
                    values[name.rsplit(".", 1)[1]] = int(arg.split("=", 1)[1])
        row.update({k: int(v) for k, v in values.items()})
    return out


def _forward_flops(config: dict[str, Any], batch: int, seconds: float) -> float:
    f = flop_model(config)
    macs = (f["conv_macs_per_s"] + f["transformer_linear_macs_per_s"]) * seconds
    macs += f["attention_macs_per_s_per_s"] * seconds * seconds
    return 2.0 * batch * macs


def paper_estimate(read_bytes_per_s: float, arms: int = 4) -> dict[str, Any]:
    """The paper sweep's encoder GPU-hours, live against cached (see the module docstring)."""
    plans = _paper_plan()
    n_states = LARGE_CONFIG["num_hidden_layers"] + 1
    frame_bytes = n_states * LARGE_CONFIG["hidden_size"] * 2
    gpu_flops = PEAK_BF16_FLOPS * ASSUMED_MFU
    rows, totals = {}, {"live_h": 0.0, "fill_h": 0.0, "read_h": 0.0}
    for task, p in plans.items():
        n_runs, batch = p["runs"], p["batch_size"]
        batches = p["max_steps"] * p["accumulate_grad_batches"]  # per run
        seconds, hours = PAPER_CORPORA[task]
        forward_s = _forward_flops(LARGE_CONFIG, batch, seconds) / gpu_flops
        step_bytes = batch * seconds * FRAMES_PER_S * frame_bytes
        read_s = step_bytes / (read_bytes_per_s * max(1, p["num_workers"]))  # every loader worker at that rate
        fill_h = arms * _forward_flops(LARGE_CONFIG, 1, seconds) * (hours * 3600 / seconds) / gpu_flops / 3600
        row = {
            "runs": n_runs,
            "steps": p["max_steps"],
            "batches_per_step": p["accumulate_grad_batches"],
            "workers": p["num_workers"],
            "batch": batch,
            "forward_ms": 1000 * forward_s,
            "read_ms": 1000 * read_s,
            "step_mb": step_bytes / 1e6,
            "cache_gb_per_arm": hours * 3600 * FRAMES_PER_S * frame_bytes / 1e9,
            "live_h": n_runs * batches * forward_s / 3600,
            "fill_h": fill_h,
            "read_h": n_runs * batches * read_s / 3600,
        }
        rows[task] = row
        for k in totals:
            totals[k] += row[k]
    return {"runs": sum(p["runs"] for p in plans.values()), "arms": arms, "tasks": rows, **totals,
            "assumptions": {"peak_bf16_tflops": PEAK_BF16_FLOPS / 1e12, "mfu": ASSUMED_MFU,
                            "read_gb_per_s": read_bytes_per_s / 1e9, "corpora": PAPER_CORPORA}}  # fmt: skip


def measure(ws: Workspace, quick: bool) -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu, one thread"
    out: dict[str, Any] = {"device": device, "cases": {}}
    for c in cases(quick):
        try:
            out["cases"][c["name"]] = measure_case(ws, c)
        except Exception as e:  # one failing case must not lose the others
            log(f"features {c['name']} failed: {type(e).__name__}: {e}")
            out["cases"][c["name"]] = {"error": f"{type(e).__name__}: {e}"}
    out["demo"] = measure_demo(ws, quick)
    rates = [r["read"]["bytes_per_s"] for r in out["cases"].values() if "read" in r]
    if rates:
        out["paper"] = paper_estimate(max(rates))
    return out


# ------------------------------------------------------------------------------ results.md
def render(res: dict[str, Any]) -> list[str]:
    from benchmarks.report import _f, _med, _spread, _table, _x

    lines = ["## 6. Frozen-feature cache: cached against live SUPERB steps", ""]
    lines += [
        f"ks under the SUPERB protocol through the full Lightning path on {res['device']}, live "
        "(`feature_cache=null`) and on the cache, the runs alternating. A step is the interval between two "
        "batch ends (data wait included). Fill: the first cached run making every entry of ks's train, dev "
        "and test manifests.",
        "",
    ]
    rows = []
    for name, r in res.get("cases", {}).items():
        if "error" in r:
            rows.append((name, "failed", r["error"][:80], "", "", "", ""))
            continue
        fill = r["fill"]
        rows.append((
            f"{name} ({r['hidden_states']} x {r['hidden_size']}), batch {r['batch']}",
            f"{_med(r['live_step_s'], 1000)} ({_spread(r['live_step_s'], 1000)})",
            f"{_med(r['cached_step_s'], 1000)} ({_spread(r['cached_step_s'], 1000)})",
            _x(r["speedup"]),
            f"{_f(fill['audio_s'] / fill['seconds'] if fill['seconds'] else None)} audio-s/s ({fill['entries']} entries)",
            _f(r["entry_bytes_per_audio_s"] / 1e6),
            _f(r["read"]["bytes_per_s"] / 1e9),
        ))  # fmt: skip
    lines += _table(("encoder", "live step (ms)", "cached step (ms)", "speed-up", "fill", "MB per audio-s",
                     "read GB/s"), rows)  # fmt: skip
    demo = res.get("demo")
    if demo:
        lines += ["", f"Demo task run (ks, tiny encoder, {demo['steps']} steps, dev every {demo['val_every']}; the "
                  f"whole cli_main call: parsing, setup, steps, validations; imports excluded): live {_f(demo['live_s'])} s, cached {_f(demo['cached_s'])} s "
                  f"({_x(demo['speedup'])}); the cache is filled once per arm and task."]  # fmt: skip
    paper = res.get("paper")
    if paper:
        a = paper["assumptions"]
        workers = max(r["workers"] for r in paper["tasks"].values())
        lines += ["", f"**Estimate, not a measurement: the paper sweep's encoder GPU-hours** ({paper['runs']} runs, "
                  f"each its task preset's steps x batches a step; wav2vec2-large's forward at {a['mfu']:.0%} of "
                  f"{_f(a['peak_bf16_tflops'])} TFLOP/s bf16; cached entries read by {workers} loader workers, each "
                  f"at the {_f(a['read_gb_per_s'])} GB/s one core reads them here from the page cache; the heads are "
                  "left out, they cost the same both ways):", ""]  # fmt: skip
        trows = [(t, r["runs"], f"{r['steps']} x {r['batches_per_step']} x {r['batch']}", _f(r["forward_ms"]), f"{_f(r['read_ms'])} ({_f(r['step_mb'])} MB)",
                  _f(r["cache_gb_per_arm"]), _f(r["live_h"]), f"{_f(r['fill_h'])} + {_f(r['read_h'])}")
                 for t, r in paper["tasks"].items()]  # fmt: skip
        trows.append(("all", paper["runs"], "", "", "", "", _f(paper["live_h"]),
                      f"{_f(paper['fill_h'])} + {_f(paper['read_h'])}"))  # fmt: skip
        lines += _table(("task", "runs", "steps x batches x size", "forward/batch (ms)", "read/batch (ms)", "cache GB per arm",
                         "live GPU-h", "cached: fill GPU-h + read h"), trows)  # fmt: skip
        over = [t for t, r in paper["tasks"].items() if r["cache_gb_per_arm"] > DEFAULT_MAX_GB]
        lines += ["", "**What it means.** Where the encoder is the step's cost (CPUs, the demo), the cache removes it: "
                  + "; ".join(f"{n} {_x(r.get('speedup'))} per step" for n, r in res.get("cases", {}).items() if "speedup" in r)
                  + f". With wav2vec2-large on a GPU it does not pay: a frame's {LARGE_CONFIG['num_hidden_layers'] + 1} "
                  f"x {LARGE_CONFIG['hidden_size']} fp16 hidden states are {_f(paper['read_h'] / paper['live_h'])}x "
                  "slower to read back than to compute at the rate above, and the caches are "
                  f"{_f(min(r['cache_gb_per_arm'] for r in paper['tasks'].values()))}-"
                  f"{_f(max(r['cache_gb_per_arm'] for r in paper['tasks'].values()))} GB per arm: "
                  f"{', '.join(over) or 'none'} exceed max_gb={DEFAULT_MAX_GB:g} (the default), where a run "
                  "encodes live by itself."]  # fmt: skip
    return lines + [""]

