"""results.json -> results.md: one table per section (what, median, spread, ratio) and what it means."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits - 1}f}"


def _ms(x: float | None) -> str:
    return "–" if x is None else _f(1000 * x)


def _spread(s: dict | None, scale: float = 1.0) -> str:
    """IQR and min–max of a summarize() dict."""
    if not s or s.get("median") is None:
        return "–"
    if s["n"] == 1:
        return "n=1"
    return (
        f"IQR {_f(scale * s['q1'])}–{_f(scale * s['q3'])}; "
        f"min–max {_f(scale * s['min'])}–{_f(scale * s['max'])} (n={s['n']})"
    )


def _med(s: dict | None, scale: float = 1.0) -> str:
    return "–" if not s or s.get("median") is None else _f(scale * s["median"])


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return [_row(*header), _row(*["---"] * len(header)), *[_row(*r) for r in rows]]


def ratio_or_none(a: dict | None, b: dict | None) -> float | None:
    """Ratio of two summarize() medians."""
    if not a or not b or a.get("median") is None or not b.get("median"):
        return None
    return a["median"] / b["median"]


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


# ------------------------------------------------------------------------------ sections
def _overhead(res: dict[str, Any]) -> list[str]:
    lines = ["## 1. Framework overhead: Lightning (LightningCLI + DataModule + Trainer) vs a bare loop", ""]
    lines += [
        "Per-step figures are the steady state (after the warm-up steps). The two loops are interleaved "
        "step by step in one process: next to Lightning's step k, the bare loop (its own copy of the "
        "model and optimizer) runs its step k on the same batch, outside Lightning's timing. Pairing two "
        "steps on the same batch taken a second apart cancels both the different lengths of bucketed "
        "batches and the shared machine's drift (10-20% over tens of seconds here, which moved the "
        "base-sized ratio between 0.93× and 1.21× when the loops ran one after the other). The order "
        "alternates (bare first on even steps, Lightning first on odd ones), because whichever loop runs "
        "first on a batch of a new shape pays for the allocator's fresh memory (page faults). The "
        "headline ratio is the geometric mean of the two orders' median per-step ratios (target: within "
        "1.10×); both orders are listed, and 'all steady steps together' is the ratio of the sums. "
        "Both loops see the same batches in the same order (same sampler seed; checked on their padded "
        "shapes). 'Between steps' is the time from one step's end to the next one's start inside "
        "Lightning (data fetch from the workers, loop bookkeeping, logger writes, checkpoints). "
        "Throughput counts the real samples of every view through the encoder (two views per rewiring "
        "pair). The CPU-time ratio (time.process_time of the training process) leaves out time other "
        "processes took the core; it does not see time spent waiting.",
        "",
    ]
    rows = []
    for name, r in res.items():
        if "error" in r:
            rows.append((name, "failed", r["error"][:80], "", ""))
            continue
        c = r["case"]
        b, light = r["bare"], r["lightning"]
        what = f"{name} (batch {c['batch_size']}, {c['warmup']}+{c['steps']} steps)"
        params = f"{_f(b['params_m'])}M params, {_f(b['trainable_m'])}M trained"
        rows.append((f"{what}: bare step (s); {params}", _med(b["step_s"]), _spread(b["step_s"]), "1.00×"))
        if b.get("mismatched_batches"):
            rows.append((f"{what}: steps whose batches differed between the loops", str(b["mismatched_batches"]), "", ""))
        rows.append((f"{what}: Lightning step (s)", _med(light["step_s"]), _spread(light["step_s"]), ""))
        rs = r["ratio_steady"]
        rows.append((f"{what}: **Lightning / bare, same step (ratio)**", _x(rs["ratio"]), "", _x(rs["ratio"])))
        for order, label in (("bare_first", "bare loop first"), ("lightning_first", "Lightning first")):
            rows.append((f"{what}: Lightning / bare, steps with the {label}", _x(rs[order]["median"]),
                         _spread(rs[order]), ""))  # fmt: skip
        rows.append(
            (
                f"{what}: Lightning / bare, all steady steps together (ratio)",
                _x(r["ratio_steady_total"]),
                "",
                _x(r["ratio_steady_total"]),
            )
        )
        cpu = r["ratio_steady_cpu"]
        rows.append((f"{what}: CPU time of the process per step, Lightning / bare (ratio)", _x(cpu["ratio"]),
                     f"orders: bare first {_x(cpu['bare_first']['median'])}, Lightning first "
                     f"{_x(cpu['lightning_first']['median'])}", _x(cpu["ratio"])))  # fmt: skip
        if "profiled" in r:
            p = r["profiled"]
            rows.append(
                (
                    f"{what}: Lightning + SimpleProfiler, {p['step_s']['n']} steps (s)",
                    _med(p["step_s"]),
                    _spread(p["step_s"]),
                    _x(p["ratio_steady"]["ratio"]),
                )
            )
        rows.append((f"{what}: between steps (ms)", _med(light["gap_s"], 1000), _spread(light["gap_s"], 1000), ""))
        rows.append(
            (
                f"{what}: audio-s/s, steady (bare → Lightning)",
                f"{_f(b['steady_audio_per_s'])} → {_f(light['steady_audio_per_s'])}",
                "",
                _x(None if not light["steady_audio_per_s"] else b["steady_audio_per_s"] / light["steady_audio_per_s"]),
            )
        )
        e2e_b = b["audio_total_s"] / (b["build_s"] + b["loop_s"]) if b["loop_s"] else None
        e2e_l = light["audio_total_s"] / light["wall_s"] if light["wall_s"] else None
        rows.append(
            (
                f"{what}: audio-s/s, end to end incl. start-up (bare → Lightning)",
                f"{_f(e2e_b)} → {_f(e2e_l)}",
                "n=1",
                _x(r["ratio_end_to_end"]),
            )
        )
    lines += _table(("what", "median", "spread", "ratio"), rows)
    lines += ["", "Fixed costs of one Lightning run (seconds; one run each):", ""]
    rows = []
    for name, r in res.items():
        if "error" in r:
            continue
        ph = r["lightning"]["phases_s"]
        rows.append(
            (
                name,
                _f(r["bare"]["build_s"]),
                _f(ph["parse_instantiate_setup"]),
                _f(ph["fit_start"]),
                _f(ph["first_batch_wait"]),
                _f(r["lightning"]["first_step_s"]),
                _f(ph["teardown"]),
                _f(r["lightning"].get("checkpoint_mb")),
                _f(r["outside_loop_s"]),
            )
        )
    lines += _table(
        (
            "case",
            "bare: model build",
            "CLI parse + instantiate + data setup",
            "fit start",
            "first batch wait",
            "first step",
            "teardown",
            "checkpoints written (MB)",
            "total outside the training loop",
        ),
        rows,
    )
    for name, r in res.items():
        prof = r.get("profiled", {}).get("profile")
        if not prof:
            continue
        lines += ["", f"Where a step's time goes in Lightning ({name}, SimpleProfiler; actions nest, e.g. "
                  "optimizer_step holds training_step and backward):", ""]  # fmt: skip
        lines += _table(
            ("action", "calls", "total (s)", "per step (ms)", "median (ms)"),
            [(p["action"], p["calls"], _f(p["total_s"]), _f(p["per_step_ms"]), _f(p["median_ms"])) for p in prof],
        )
    lines += ["", "**What it means.** " + _overhead_meaning(res), ""]
    return lines


def _overhead_meaning(res: dict[str, Any]) -> str:
    parts = []
    for name, r in res.items():
        if "error" in r:
            parts.append(f"{name} failed ({r['error'][:120]}).")
            continue
        rs = r["ratio_steady"]["ratio"]
        verdict = "within the 1.10× target" if rs is not None and rs <= 1.10 else "outside the 1.10× target"
        if r["bare"].get("mismatched_batches"):
            verdict += ", but some batches differed between the loops"
        gap = r["gap_per_step_ms"]
        parts.append(
            f"{name}: steady-state ratio {_x(rs)} per step ({verdict}; "
            f"{_x(r['ratio_steady_total'])} over all steady steps; Lightning − bare = {_f(r['extra_per_step_ms'])} ms "
            f"per step on average, and {_f(gap)} ms of each Lightning step is spent between steps), end to end "
            f"{_x(r['ratio_end_to_end'])} "
            f"because of {_f(r['outside_loop_s'])} s outside the training loop "
            f"(≈ {_f(r['outside_loop_s'] / r['mean_step_s'])} steady steps)."
        )
    tiny = res.get("tiny-rewire")
    base = res.get("base-rewire")
    cost = []
    for label, r in (("tiny encoder", tiny), ("wav2vec2-base-sized encoder", base)):
        if r and "error" not in r and r["lightning"].get("steady_source_per_s"):
            per = 1.0 / r["lightning"]["steady_source_per_s"]
            cost.append(f"{_f(per)} core-hours per hour of audio with the {label}")
    if cost:
        parts.append(
            "A rewiring epoch (both views encoded, one thread, steady Lightning throughput of source audio) "
            f"costs {'; '.join(cost)}; the embedded small corpus's 1200 unlabelled utterances are about 0.86 h."
        )
    return " ".join(parts)


def _pipeline(res: dict[str, Any]) -> list[str]:
    lines = ["## 2. Data pipeline", ""]
    model = res.get("model_batches_per_s")
    lines.append(
        "Rewiring DataLoader (neutral pairs, batch 8, bucketed), batches pulled in a tight loop; the first "
        "batch (iterator and worker start, backend load) is listed apart. Headroom = loader batches/s over "
        f"the model's consumption ({_f(model)} batches/s: the tiny encoder's bare rewiring step)."
    )
    lines.append("")
    rows = []
    for r in res.get("loader", []):
        what = f"{r['cache']} cache, {r['backend']}, {r['num_workers']} workers"
        if "error" in r:
            rows.append((what, "failed", r["error"][:80], "", "", "", ""))
            continue
        rows.append(
            (
                what,
                _med(r["batch_s"], 1000),
                _spread(r["batch_s"], 1000),
                _f(r["batches_per_s"]),
                _x(r.get("headroom")),
                _f(r["first_batch_s"]),
                _med(r.get("ready_fetch_s"), 1000),
            )
        )
    lines += _table(
        ("loader", "batch (ms)", "spread (ms)", "batches/s", "headroom", "first batch (s)", "ready batch fetch (ms)"),
        rows,
    )
    lines += ["", "TTS real-time factor (synthesis seconds per audio second, one call per text after a first call "
              "that loads the backend):", ""]  # fmt: skip
    rows = []
    for name, r in res.get("tts", {}).items():
        if "error" in r:
            rows.append((name, "failed", r["error"][:80], "", "", ""))
            continue
        rows.append(
            (
                r["backend"],
                _med(r["rtf"]),
                _spread(r["rtf"]),
                _med(r["audio_s"]),
                _f(r["first_call_s"]),
                _f(r.get("rtf_batched")),
            )
        )
    lines += _table(("backend", "RTF", "spread", "audio per text (s)", "first call (s)", "RTF, one batched call"), rows)
    pads = res.get("padding", [])
    tasks = res.get("task_padding", {})
    if pads or tasks:
        lines += ["", "Padding: padded samples over real samples (1.00 = no padding; the encoder computes on all of them):", ""]
        rows = [
            (
                f"rewiring, batch 8, bucket_by_length={p['bucket_by_length']} ({p['batches']} batches)",
                _f(p["padded_over_real"].get("view1")),
                _f(p["padded_over_real"].get("view2")),
            )
            for p in pads
        ]
        rows += [
            (
                f"{task} train, batch {t['batch_size']}, shuffled (sorted by length instead)",
                f"{_f(t['padded_over_real'])} ({_f(t['sorted_padded_over_real'])})",
                "",
            )
            for task, t in tasks.items()
        ]
        lines += _table(("batches", "view 1 / audio", "view 2 (TTS)"), rows)
    hit = res.get("cache_hit")
    if hit:
        lines += [
            "",
            _row("cache hit", "median", "spread")
            + "\n"
            + _row("---", "---", "---")
            + "\n"
            + _row(f"SynthesisCache.get hit ({hit['backend']}, ms)", _med(hit["hit_ms"]), _spread(hit["hit_ms"]))
            + "\n"
            + _row("per second of audio (ms)", _med(hit["ms_per_audio_s"]), _spread(hit["ms_per_audio_s"])),
        ]
    lines += ["", "**What it means.** " + _pipeline_meaning(res), ""]
    return lines


def _pipeline_meaning(res: dict[str, Any]) -> str:
    parts = []
    model = res.get("model_batches_per_s")
    for r in res.get("loader", []):
        if "error" in r or not r.get("headroom"):
            continue
        verdict = "keeps ahead of" if r["headroom"] >= 1 else "cannot keep up with"
        parts.append(
            f"{r['cache']} {r['backend']} with {r['num_workers']} workers {verdict} the model "
            f"({_f(r['batches_per_s'])} vs {_f(model)} batches/s)."
        )
    gap = res.get("lightning_gap_ms")
    if gap is not None:
        parts.append(
            f"Inside the Lightning run on a warm cache the step waits {_f(gap)} ms between steps (data fetch "
            "plus bookkeeping), the direct measure of the model waiting on data."
        )
    piper = res.get("tts", {}).get("piper", {})
    if piper.get("rtf"):
        parts.append(
            f"Piper says one second of audio in {_f(piper['rtf']['median'])} s of one core, so a cold cache "
            "costs that per neutral view; fill the cache ahead of rewiring (`--data.init_args.prefill_workers N`, "
            "or `python -m rewiring synthesize --manifest ... --workers N`) so that training never synthesises."
        )
    pads = {p["bucket_by_length"]: p["padded_over_real"] for p in res.get("padding", [])}
    if True in pads and False in pads:
        parts.append(
            f"Length bucketing cuts the padded compute of view 1 from {_f(pads[False].get('view1'))}× to "
            f"{_f(pads[True].get('view1'))}× the real audio (view 2, the TTS view: {_f(pads[False].get('view2'))}× → "
            f"{_f(pads[True].get('view2'))}×)."
        )
    hit = res.get("cache_hit")
    if hit:
        parts.append(f"A cache hit costs {_med(hit['hit_ms'])} ms (read, checksum, tensor).")
    return " ".join(parts)


def _scaling(res: dict[str, Any]) -> list[str]:
    lines = ["## 3. Scaling of the tiny encoder's rewiring step (forward + backward + AdamW, two views)", ""]
    lines.append(
        "Each point runs in a fresh subprocess; peak memory is that process's peak resident set size "
        "(VmHWM in /proc/self/status; getrusage's ru_maxrss would carry the bench's own peak over "
        "fork + exec), step memory = the peak after the steps minus the peak before the first step "
        "(activations, gradients, AdamW state). 'ms per audio-s' = step time over the audio of both views. 'Conv' is the "
        "conv feature encoder's forward and backward alone; 'rest' = step - conv (projection, "
        "positional conv, Transformer, pooling, loss, optimizer)."
    )
    lines.append("")
    head = ("what", "step (s)", "spread (s)", "ms per audio-s", "conv (s)", "rest (s)", "rest share", "peak RSS (MB)",
            "step memory (MB)")  # fmt: skip
    rows = []
    for p in res.get("by_length", []):
        what = f"{_f(p['seconds'])} s × {res['length_batch']} pairs"
        rows.append(_scaling_row(what, p))
    for p in res.get("by_batch", []):
        rows.append(_scaling_row(f"{_f(p['seconds'])} s × {p['batch']} pairs", p))
    for p in res.get("no_attention_dropout", []):
        rows.append(_scaling_row(f"{_f(p['seconds'])} s × {p['batch']} pairs, attention_dropout 0", p))
    lines += _table(head, rows)
    lines += ["", "**What it means.** " + _scaling_meaning(res), ""]
    return lines


def _scaling_row(what: str, p: dict[str, Any]) -> tuple:
    if "error" in p:
        return (what, "failed", "", "", "", "", "", "", "")
    return (
        what,
        _med(p["step_s"]),
        _spread(p["step_s"]),
        _f(1000 * p["s_per_audio_s"]) if p.get("s_per_audio_s") else "–",
        _med(p["conv_s"]),
        _f(p.get("transformer_s")),
        "–" if p.get("transformer_share") is None else f"{100 * p['transformer_share']:.0f}%",
        _f(p["rss_peak_mb"]),
        _f(p["step_mem_mb"]),
    )


def _scaling_meaning(res: dict[str, Any]) -> str:
    parts = []
    pts = [p for p in res.get("by_length", []) if "error" not in p and p.get("s_per_audio_s")]
    if len(pts) >= 2:
        lo, hi = pts[0], pts[-1]
        per = ", ".join(f"{_f(p['seconds'])} s: {_f(1000 * p['s_per_audio_s'])}" for p in pts)
        parts.append(
            f"A linear cost would keep the time per second of audio flat; it goes ({per} ms), "
            f"{_x(hi['s_per_audio_s'] / lo['s_per_audio_s'])} from {_f(lo['seconds'])} to {_f(hi['seconds'])} s."
        )
        rest = ", ".join(f"{_f(p['seconds'])} s: {_f(1000 * p['transformer_s'] / p['seconds'])}" for p in pts)
        parts.append(f"The part outside the conv encoder, per second of utterance: {rest} ms.")
    same = {(p["seconds"], p["batch"]): p for p in res.get("by_length", []) if "error" not in p}
    for v in res.get("no_attention_dropout", []):
        ref = same.get((v["seconds"], v["batch"]))
        if ref and "error" not in v:
            parts.append(
                f"Attention dropout (0.1 in the tiny config) sends torch's CPU attention down its unfused path, "
                f"which materialises every attention matrix: at {_f(v['seconds'])} s × {v['batch']} pairs, "
                f"dropout 0 takes {_f(v['step_s']['median'])} s instead of {_f(ref['step_s']['median'])} s "
                f"({_x(ref['step_s']['median'] / v['step_s']['median'])}), its non-conv part "
                f"{_f(1000 * v['transformer_s'] / v['seconds'])} ms per second of utterance, and "
                f"{_f(v['step_mem_mb'])} MB of step memory instead of {_f(ref['step_mem_mb'])} MB."
            )
    for key, label in (("flops_tiny", "tiny"), ("flops_base", "wav2vec2-base-sized")):
        fm = res.get(key)
        if fm:
            parts.append(
                f"By multiply-accumulates from the config ({label} encoder): attention is 10% of the step from "
                f"{_f(fm['t_attention_10pct_s'])} s per utterance, equals the Transformer's linear layers at "
                f"{_f(fm['t_attention_eq_transformer_s'])} s and everything else at {_f(fm['t_attention_eq_rest_s'])} s."
            )
    for key, label in (("fit_step", "the whole step"), ("fit_rest", "the part outside the conv encoder")):
        fit = res.get(key)
        if not fit:
            continue
        text = f"Non-negative fit of {label} (rough: five noisy points): {_f(fit['c'])} + {_f(fit['a'])}·T + {fit['b']:.2g}·T² s"
        if fit.get("t_quadratic_10pct_s"):
            text += f", T² term 10% of it from {_f(fit['t_quadratic_10pct_s'])} s"
            if fit.get("t_equal_s"):
                text += f", equal to the T term at {_f(fit['t_equal_s'])} s"
            text += "."
        else:
            text += "; no quadratic growth over these lengths."
        parts.append(text)
    bat = [p for p in res.get("by_batch", []) if "error" not in p]
    if len(bat) >= 2:
        lo, hi = bat[0], bat[-1]
        per_lo = lo["step_s"]["median"] / lo["batch"]
        per_hi = hi["step_s"]["median"] / hi["batch"]
        parts.append(
            f"Per pair, a batch of {hi['batch']} costs {_f(per_hi)} s against {_f(per_lo)} s at batch "
            f"{lo['batch']} (on one thread a bigger batch buys little beyond amortising fixed costs); the "
            f"step's memory grows from {_f(lo['step_mem_mb'])} to {_f(hi['step_mem_mb'])} MB, about "
            f"{_f((hi['step_mem_mb'] - lo['step_mem_mb']) / (hi['batch'] - lo['batch']))} MB per pair of "
            f"{_f(hi['seconds'])} s utterances."
        )
    return " ".join(parts)


def _sweep(res: dict[str, Any]) -> list[str]:
    lines = ["## 4. Sweep overhead: one `python -m rewiring fit` process", ""]
    lines.append(
        f"Subprocesses as a sweep starts them (one thread each). The demo run is {res['demo_steps']} steps of the "
        f"tiny encoder on ks ({res['protocol']} protocol, validation every 20 steps, checkpoints)."
    )
    lines.append("")
    one = res["fit_one_step"]
    demo = res["demo"]
    rows = [
        ("python -c pass (interpreter)", _med(res["interpreter_s"]), _spread(res["interpreter_s"]), ""),
        ("imports of a task fit", _med(res["imports_s"]), _spread(res["imports_s"]), ""),
        ("fit --trainer.max_steps=1 (whole process)", _med(one["wall_s"]), _spread(one["wall_s"]), "1.00×"),
        ("  of which process start → Callback.setup", _med(one["start_to_setup_s"]), _spread(one["start_to_setup_s"]), ""),
        ("  of which setup → first batch", _med(one["setup_to_first_batch_s"]), _spread(one["setup_to_first_batch_s"]), ""),
        ("  of which last step → exit", _med(one["train_end_to_exit_s"]), _spread(one["train_end_to_exit_s"]), ""),
        (
            "the same fit forked from a process that has imported everything",
            _med(res.get("forked_one_step_s")),
            _spread(res.get("forked_one_step_s")),
            _x(ratio_or_none(res.get("forked_one_step_s"), one["wall_s"])),
        ),
        (
            f"demo run, {res['demo_steps']} steps (whole process)",
            _f(demo["wall_s"]),
            "n=1",
            _x(demo["wall_s"] / one["wall_s"]["median"] if one["wall_s"]["median"] else None),
        ),
        ("  demo: training loop incl. validation", _f(demo["loop_s"]), "n=1", ""),
        ("  demo: steady step (s)", _med(demo["step_s"]), _spread(demo["step_s"]), ""),
    ]
    lines += _table(("what", "median (s)", "spread", "ratio"), rows)
    share = res.get("fixed_share_of_demo")
    lines += [
        "",
        "**What it means.** "
        + (
            f"Each run of a sweep pays about {_f(res['fixed_cost_s'])} s before and after its steps "
            f"(imports {_med(res['imports_s'])} s of it), {_f(100 * share if share else None)}% of a demo run; "
            f"{_f(100 * res['outside_loop_share_of_demo'])}% of the demo run is outside its training loop. "
            f"Starting each run as a fork of a parent that has already imported everything (multiprocessing "
            f"forkserver with preloaded modules, one process per run kept) saves about "
            f"{_f(res.get('forked_saving_s'))} s per run."
        ),
        "",
    ]
    return lines


def _gpu(res: dict[str, Any]) -> list[str]:
    lines = ["## 5. GPU: the rewiring step in bf16-mixed", ""]
    if "skipped" in res:
        return lines + [f"Skipped: {res['skipped']}. On a machine with a CUDA device, `make bench` runs it.", ""]
    peak = res.get("peak_tflops")
    lines += [
        f"{res['device']}, {res['precision']}, through the full Lightning path (warm cache, 4 workers; the "
        "device is synchronised at each step's end). Model FLOPs from the encoder config on each batch's "
        "padded shapes (forward, and twice that for the backward of the trained parts); MFU = achieved "
        f"FLOP/s over the card's dense bf16 peak ({_f(peak) + ' TFLOP/s' if peak else 'not in the table: no MFU'}).",
        "",
    ]
    rows = []
    for name, r in res.get("cases", {}).items():
        if "error" in r:
            rows.append((name, "failed", r["error"][:80], "", "", "", ""))
            continue
        mfu = r.get("mfu")
        rows.append((name, _med(r["step_s"]), _spread(r["step_s"]), _f(r["steady_audio_per_s"]),
                     _f(r["achieved_tflops"]), "–" if mfu is None else f"{100 * mfu:.1f}%",
                     _f(r.get("max_memory_gb"))))  # fmt: skip
    lines += _table(("case", "step (s)", "spread", "audio-s/s", "achieved TFLOP/s", "MFU", "peak memory (GB)"), rows)
    ok = [r for r in res.get("cases", {}).values() if "error" not in r and r.get("steady_source_per_s")]
    if ok:
        best = max(ok, key=lambda r: r["steady_source_per_s"])
        per_s = best["steady_source_per_s"]  # seconds of source audio per second = audio-hours per hour
        lines += ["", f"**What it means.** At batch {best['batch']}, a rewiring epoch costs {_f(3600 / per_s)} "
                  f"GPU-seconds per hour of source audio: {_f(per_s)} hours of audio per GPU-hour."]  # fmt: skip
    return lines + [""]


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = ["# rewiring benchmarks", ""]
    lines.append(
        f"`make bench` (python -m rewiring bench --out benchmarks{' --quick true' if meta.get('quick') else ''}) "
        f"on {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, torch {meta.get('torch')} with "
        f"torch.set_num_threads(1) (OMP_NUM_THREADS=1 in subprocesses): every figure is per CPU core. "
        f"Load average at start {meta.get('load_start')}, at end {meta.get('load_end')} (other work on the "
        f"machine shows up as spread). Whole bench: {_f(meta.get('total_s'))} s. Figures: median after warm-up, "
        "spread as IQR and min–max; ratios are measured side by side in this run. Raw figures: results.json."
    )
    lines.append("")
    if meta.get("quick"):
        lines += ["**Quick run (smoke test): too few repeats to report.**", ""]
    sections = results.get("sections", {})
    if "overhead" in sections:
        lines += _overhead(sections["overhead"])
    if "pipeline" in sections:
        lines += _pipeline(sections["pipeline"])
    if "scaling" in sections:
        lines += _scaling(sections["scaling"])
    if "sweep" in sections:
        lines += _sweep(sections["sweep"])
    if "gpu" in sections:
        lines += _gpu(sections["gpu"])
    timings = meta.get("section_s", {})
    if timings:
        lines += ["## Bench time per section", ""]
        lines += _table(("section", "seconds"), [(k, _f(v)) for k, v in timings.items()])
        lines.append("")
    return "\n".join(lines)
