"""3. Scaling of the tiny encoder's rewiring step (forward + backward + AdamW) with utterance length and
batch size: step time, the conv feature encoder's share of it, and peak memory.

Each point runs in a fresh subprocess (`python -m benchmarks.scaling --seconds S --batch B`), so its
peak resident set size (getrusage ru_maxrss; tracemalloc does not see torch's allocator) belongs to
that point alone. The step's own memory is the peak after the steps minus the peak before the first
step (imports, model, inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.common import BASE_CONFIG, REPO, log, summarize
from rewiring.encoder import TINY_CONFIG

LENGTHS = (1, 2, 4, 8, 16)
BATCHES = (1, 2, 4, 8)
LENGTH_BATCH = 4  # batch size of the length sweep (the paper's 4 pairs)
BATCH_SECONDS = 4  # utterance length of the batch sweep


def point(seconds: float, batch: int, repeats: int, attention_dropout: float | None = None) -> dict[str, Any]:
    """Time one rewiring step on random audio: two views of `batch` utterances of `seconds` each.

    `attention_dropout` overrides the tiny config's (0.1): with dropout, torch's CPU scaled-dot-product
    attention takes its unfused path, which materialises the attention matrices."""
    import torch

    torch.set_num_threads(1)
    from benchmarks.common import max_rss_mb, repeat
    from rewiring.encoder import TINY_CONFIG, SpeechEncoder
    from rewiring.masking import time_masks
    from rewiring.rewire import RewiringModule, nt_xent

    rss_imports = max_rss_mb()
    torch.manual_seed(0)
    config = dict(TINY_CONFIG)
    if attention_dropout is not None:
        config["attention_dropout"] = attention_dropout
    encoder = SpeechEncoder(config, freeze_feature_encoder=False)
    model = RewiringModule(encoder, temperature=0.04)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    n = int(seconds * 16000)
    n_frames = int(encoder.frame_lengths(n))

    def view() -> dict:
        wav = 0.1 * torch.randn(batch, n)
        mask = time_masks(torch.full((batch,), n_frames), n_frames)
        return {
            "waveforms": wav,
            "attention_mask": torch.ones(batch, n, dtype=torch.long),
            "mask_time_indices": mask,
        }

    views = (view(), view())
    rss_before = max_rss_mb()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = nt_xent(model.embed(views[0]), model.embed(views[1]), 0.04)
        loss.backward()
        optimizer.step()

    def conv() -> None:
        # The conv feature encoder alone, forward and backward, on the same two views.
        for v in views:
            x, _ = encoder._prepare(v["waveforms"], v["attention_mask"])
            encoder.model.feature_extractor(x).sum().backward()
        optimizer.zero_grad(set_to_none=True)

    steps = repeat(step, repeats)  # after one untimed warm-up call
    rss_after = max_rss_mb()
    convs = repeat(conv, repeats)
    return {
        "seconds": seconds,
        "batch": batch,
        "attention_dropout": config["attention_dropout"],
        "frames": n_frames,
        "step_s": summarize(steps),
        "conv_s": summarize(convs),
        "rss_imports_mb": rss_imports,
        "rss_before_mb": rss_before,
        "rss_peak_mb": rss_after,
        "step_mem_mb": rss_after - rss_before,
    }


def run_point(
    seconds: float, batch: int, repeats: int, attention_dropout: float | None = None, timeout: float = 300
) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--seconds", str(seconds), "--batch", str(batch),
           "--repeats", str(repeats)]  # fmt: skip
    if attention_dropout is not None:
        cmd += ["--attention-dropout", str(attention_dropout)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"seconds": seconds, "batch": batch, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_quadratic(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least squares t(T) = c + a*T + b*T^2 (T: seconds per utterance) on relative errors, so that the
    short lengths weigh as much as the long ones. Also: where the quadratic term equals the linear one
    (T = a/b) and where it reaches 10% of the step (b*T^2 = 0.1*t(T))."""
    import numpy as np

    if len(xs) < 3:
        return None
    x = np.asarray(xs, float)
    y = np.asarray(ys, float)
    from scipy.optimize import nnls

    X = np.stack([np.ones_like(x), x, x**2], axis=1) / y[:, None]
    (c, a, b), _ = nnls(X, np.ones_like(y))  # non-negative: a cost never shrinks with length
    top = float(x.max())
    # A T^2 term under 1% of the longest point's time is rounding, not growth.
    quadratic = b > 0 and b * top * top > 0.01 * float(y.max())
    t10 = None
    if quadratic:
        disc = (0.1 * a) ** 2 + 0.36 * b * max(c, 0.0)
        t10 = float((0.1 * a + disc**0.5) / (1.8 * b))
    return {
        "c": float(c),
        "a": float(a),
        "b": float(b),
        "t_equal_s": float(a / b) if quadratic and a > 0 else None,
        "t_quadratic_10pct_s": t10,
    }


def flop_model(config: dict[str, Any]) -> dict[str, Any]:
    """Multiply-accumulates per second of 16 kHz audio, from an encoder config: the parts linear in
    the utterance length T (conv encoder, projection, positional conv, Transformer projections and
    feed-forward) and self-attention (scores and weighted sum, 2*F^2*D per layer), which grows as T.
    Backward costs about twice forward for every part, so the shares hold for a training step."""
    frames = 16000.0
    conv = 0.0
    c_in = 1
    for c_out, k, s in zip(config["conv_dim"], config["conv_kernel"], config["conv_stride"], strict=True):
        frames = (frames - k) / s + 1
        conv += c_in * c_out * k * frames
        c_in = c_out
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    k_pos, groups = config.get("num_conv_pos_embeddings", 128), config.get("num_conv_pos_embedding_groups", 16)
    projection = c_in * d * frames + (d // groups) * d * k_pos * frames
    transformer = layers * (4 * d * d + 2 * d * ff) * frames
    linear = conv + projection + transformer
    attention_per_t = layers * 2 * d * frames * frames  # MACs per audio-second, times T in seconds
    return {
        "frames_per_s": frames,
        "conv_macs_per_s": conv,
        "transformer_linear_macs_per_s": transformer + projection,
        "attention_macs_per_s_per_s": attention_per_t,
        # attention = 10% of all; = the Transformer's linear layers; = everything else
        "t_attention_10pct_s": linear / (9 * attention_per_t),
        "t_attention_eq_transformer_s": (transformer + projection) / attention_per_t,
        "t_attention_eq_rest_s": linear / attention_per_t,
    }


def measure(
    quick: bool, lengths: tuple[float, ...] | None = None, batches: tuple[int, ...] | None = None
) -> dict[str, Any]:
    repeats = 1 if quick else 3
    if lengths is None:
        lengths = (1, 4) if quick else LENGTHS
    if batches is None:
        batches = (1, 4) if quick else BATCHES
    by_length = []
    for s in lengths:
        log(f"scaling: {s} s x {LENGTH_BATCH} pairs")
        by_length.append(run_point(s, LENGTH_BATCH, repeats))
    by_batch = []
    for b in batches:
        if b == LENGTH_BATCH and BATCH_SECONDS in lengths:
            by_batch.append(next(p for p in by_length if p["seconds"] == BATCH_SECONDS))
            continue
        log(f"scaling: {BATCH_SECONDS} s x {b} pairs")
        by_batch.append(run_point(BATCH_SECONDS, b, repeats))
    variants = []
    if not quick:
        for length in sorted(lengths)[-2:]:
            log(f"scaling: {length} s x {LENGTH_BATCH} pairs, attention_dropout=0 (fused CPU attention)")
            variants.append(run_point(length, LENGTH_BATCH, repeats, attention_dropout=0.0))
    for p in by_length + by_batch + variants:
        if "error" not in p:
            p["transformer_s"] = p["step_s"]["median"] - p["conv_s"]["median"]
            p["transformer_share"] = p["transformer_s"] / p["step_s"]["median"]
            p["s_per_audio_s"] = p["step_s"]["median"] / (2 * p["batch"] * p["seconds"])
    ok = [p for p in by_length if "error" not in p]
    xs = [p["seconds"] for p in ok]
    return {
        "length_batch": LENGTH_BATCH,
        "batch_seconds": BATCH_SECONDS,
        "by_length": by_length,
        "by_batch": by_batch,
        "no_attention_dropout": variants,
        "fit_step": fit_quadratic(xs, [p["step_s"]["median"] for p in ok]),
        "fit_rest": fit_quadratic(xs, [max(p["transformer_s"], 1e-6) for p in ok]),
        "fit_conv": fit_quadratic(xs, [p["conv_s"]["median"] for p in ok]),
        "flops_tiny": flop_model(TINY_CONFIG),
        "flops_base": flop_model(BASE_CONFIG),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one scaling point (used by the bench in a subprocess)")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention-dropout", type=float, default=None)
    a = p.parse_args(argv)
    print(json.dumps(point(a.seconds, a.batch, a.repeats, a.attention_dropout)))


if __name__ == "__main__":
    main()
