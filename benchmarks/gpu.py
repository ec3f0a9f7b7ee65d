"""5. GPU: the wav2vec2-base-sized rewiring step in bf16-mixed on a CUDA device (skipped without one).

The full Lightning path (`fit` with `--trainer.accelerator=gpu --trainer.precision=bf16-mixed`, the
DataModule on a warm synthesis cache, StepTimer synchronising the device at each step's end) gives
audio-seconds per second, and the model FLOPs utilisation (MFU): the model's FLOPs per step over the
step time and the card's dense bf16 peak. FLOPs come from the encoder config (`scaling.flop_model`)
on each batch's padded shapes: 2 FLOPs per multiply-accumulate, backward twice the forward for the
trained parts; the frozen conv feature encoder runs forward only (its input needs no gradient).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.common import BASE_CONFIG, SAMPLE_RATE, Case, Workspace, log, steady, summarize
from benchmarks.scaling import flop_model
from rewiring.encoder import TINY_CONFIG

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the longest
# name found in torch.cuda.get_device_name() wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from its name, or None for a card not in the table."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def step_flops(config: dict[str, Any], views: list[tuple[int, int]], conv_trained: bool) -> float:
    """Model FLOPs of one training step over `views` [(batch, padded samples), ...] of one encoder."""
    f = flop_model(config)
    total = 0.0
    for batch, samples in views:
        t = samples / SAMPLE_RATE
        conv = f["conv_macs_per_s"] * t
        rest = f["transformer_linear_macs_per_s"] * t + f["attention_macs_per_s_per_s"] * t * t
        total += batch * ((3 if conv_trained else 1) * conv + 3 * rest)
    return 2.0 * total


def _views(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """A rewiring batch's padded shape (b1, n1, b2, n2) as two (batch, samples) views."""
    return [(int(shape[i]), int(shape[i + 1])) for i in range(0, len(shape) - 1, 2)]


def cases(quick: bool, synth: str, encoder: str, accelerator: str, precision: str) -> list[Case]:
    """conf/stages/rewire.yaml's batch of 8 pairs, and 32 pairs to fill a large card."""
    warmup, steps = (1, 2) if quick else (5, 20)
    extra = (f"--trainer.accelerator={accelerator}", f"--trainer.precision={precision}")
    batches = (8,) if quick else (8, 32)
    return [
        Case(f"{encoder}-rewire-{precision}-b{b}", "rewire", encoder, batch_size=b, warmup=warmup, steps=steps,
             num_workers=min(4, os.cpu_count() or 1), synth=synth, extra=extra)  # fmt: skip
        for b in batches
    ]


def measure(
    ws: Workspace,
    quick: bool,
    synth: str,
    *,
    encoder: str = "base",
    accelerator: str = "gpu",
    precision: str = "bf16-mixed",
    peak: float | None = None,
) -> dict[str, Any]:
    """Run the cases on `accelerator` (tests use "cpu" with the tiny encoder); {"skipped": why} when
    a GPU is asked for and there is none."""
    from benchmarks.overhead import _cli, describe, preload, run_lightning

    if accelerator == "gpu" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    name = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
    peak = peak if peak is not None else (peak_tflops(name) if accelerator == "gpu" else None)
    config = BASE_CONFIG if encoder == "base" else TINY_CONFIG
    conv_trained = encoder != "base"  # bench: base keeps its CNN frozen (as conf/encoder/wav2vec2-base.yaml)
    out: dict[str, Any] = {"device": name, "peak_tflops": peak, "precision": precision, "cases": {}}
    for case in cases(quick, synth, encoder, accelerator, precision):
        log(f"gpu {case.name} on {name}: {case.warmup}+{case.steps} steps")
        try:
            cli = _cli(case.cli_args(ws)[1:], run=False)
            cli.datamodule.setup("fit")
            ref = describe(preload(cli.datamodule, case, cli.model))
            del cli
            if accelerator == "gpu":
                torch.cuda.reset_peak_memory_stats()
            light = run_lightning(ws, case, ref)
        except Exception as e:  # one failing case must not lose the others (e.g. out of memory)
            log(f"gpu {case.name} failed: {type(e).__name__}: {e}")
            out["cases"][case.name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        n = light["steps_run"]
        flops = [step_flops(config, _views(s), conv_trained) for s in light["raw"]["shapes"][:n]]
        st_flops = steady(flops[1:], max(0, case.warmup - 1))
        step_s = light["raw"]["steps"][max(0, case.warmup - 1) :]
        achieved = sum(st_flops) / sum(step_s) if step_s else None
        out["cases"][case.name] = {
            "batch": case.batch_size,
            "step_s": light["step_s"],
            "steady_audio_per_s": light["steady_audio_per_s"],
            "steady_source_per_s": light["steady_source_per_s"],
            "flops_per_step": summarize(st_flops),
            "achieved_tflops": None if achieved is None else achieved / 1e12,
            "mfu": None if achieved is None or not peak else achieved / (peak * 1e12),
            "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if accelerator == "gpu" else None,
            "audio_from": light["audio_from"],
            "outside_loop_s": light["wall_s"] - light["phases_s"]["loop"],
        }
    return out
