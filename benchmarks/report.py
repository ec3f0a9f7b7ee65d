"""results.json -> results.md: one table per section (what, median, spread, ratio) and what it means.

The tables are built here; the prose (each section's description and its "What it means.") lives in
benchmarks/templates/*.md.j2, rendered by the report's small markdown builder
(rewiring.experiment.report.markdown) with the number formats below as filters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewiring.experiment.report.markdown import Markdown

TEMPLATES = Path(__file__).parent / "templates"


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


def _markdown() -> Markdown:
    return Markdown(TEMPLATES, f=_f, ms=_ms, spread=_spread, med=_med, x=_x)


def _lines(template: str, **context: Any) -> list[str]:
    return _markdown().lines(template, **context)


# ------------------------------------------------------------------------------ sections
def _overhead(res: dict[str, Any], small_corpus: dict[str, Any] | None = None) -> list[str]:
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
    fixed = []
    for name, r in res.items():
        if "error" in r:
            continue
        ph = r["lightning"]["phases_s"]
        fixed.append(
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
    profiles = [
        (name, [(p["action"], p["calls"], _f(p["total_s"]), _f(p["per_step_ms"]), _f(p["median_ms"])) for p in prof])
        for name, r in res.items()
        if (prof := r.get("profiled", {}).get("profile"))
    ]
    costs = []  # core-hours per hour of audio: the steady Lightning throughput of source audio
    for label, r in (("tiny encoder", res.get("tiny-rewire")), ("wav2vec2-base-sized encoder", res.get("base-rewire"))):
        if r and "error" not in r and r["lightning"].get("steady_source_per_s"):
            costs.append((label, 1.0 / r["lightning"]["steady_source_per_s"]))
    return _lines("overhead.md.j2", res=res, rows=rows, fixed=fixed, profiles=profiles, costs=costs,
                  small_corpus=small_corpus)  # fmt: skip


def _pipeline(res: dict[str, Any]) -> list[str]:
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
    tts = []
    for name, r in res.get("tts", {}).items():
        if "error" in r:
            tts.append((name, "failed", r["error"][:80], "", "", ""))
            continue
        tts.append(
            (
                r["backend"],
                _med(r["rtf"]),
                _spread(r["rtf"]),
                _med(r["audio_s"]),
                _f(r["first_call_s"]),
                _f(r.get("rtf_batched")),
            )
        )
    padding = [
        (
            f"rewiring, batch 8, bucket_by_length={p['bucket_by_length']} ({p['batches']} batches)",
            _f(p["padded_over_real"].get("view1")),
            _f(p["padded_over_real"].get("view2")),
        )
        for p in res.get("padding", [])
    ]
    padding += [
        (
            f"{task} train, batch {t['batch_size']}, shuffled (sorted by length instead)",
            f"{_f(t['padded_over_real'])} ({_f(t['sorted_padded_over_real'])})",
            "",
        )
        for task, t in res.get("task_padding", {}).items()
    ]
    hit = res.get("cache_hit")
    cache_hit = None
    if hit:
        cache_hit = [
            (f"SynthesisCache.get hit ({hit['backend']}, ms)", _med(hit["hit_ms"]), _spread(hit["hit_ms"])),
            ("per second of audio (ms)", _med(hit["ms_per_audio_s"]), _spread(hit["ms_per_audio_s"])),
        ]
    pads = {p["bucket_by_length"]: p["padded_over_real"] for p in res.get("padding", [])}
    bucketing = {"off": pads[False], "on": pads[True]} if True in pads and False in pads else None
    return _lines("pipeline.md.j2", res=res, rows=rows, tts=tts, padding=padding, cache_hit=cache_hit,
                  bucketing=bucketing)  # fmt: skip


def _scaling(res: dict[str, Any]) -> list[str]:
    rows = []
    for p in res.get("by_length", []):
        rows.append(_scaling_row(f"{_f(p['seconds'])} s × {res['length_batch']} pairs", p))
    for p in res.get("by_batch", []):
        rows.append(_scaling_row(f"{_f(p['seconds'])} s × {p['batch']} pairs", p))
    for p in res.get("no_attention_dropout", []):
        rows.append(_scaling_row(f"{_f(p['seconds'])} s × {p['batch']} pairs, attention_dropout 0", p))
    same = {(p["seconds"], p["batch"]): p for p in res.get("by_length", []) if "error" not in p}
    dropout = [
        (v, same[(v["seconds"], v["batch"])])
        for v in res.get("no_attention_dropout", [])
        if same.get((v["seconds"], v["batch"])) and "error" not in v
    ]
    flops = [(fm, label) for key, label in (("flops_tiny", "tiny"), ("flops_base", "wav2vec2-base-sized"))
             if (fm := res.get(key))]  # fmt: skip
    fits = [(fit, label) for key, label in (("fit_step", "the whole step"), ("fit_rest", "the part outside the conv encoder"))
            if (fit := res.get(key))]  # fmt: skip
    return _lines(
        "scaling.md.j2",
        res=res,
        rows=rows,
        lengths=[p for p in res.get("by_length", []) if "error" not in p and p.get("s_per_audio_s")],
        dropout=dropout,
        flops=flops,
        fits=fits,
        batches=[p for p in res.get("by_batch", []) if "error" not in p],
    )


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


def _sweep(res: dict[str, Any]) -> list[str]:
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
    return _lines("sweep.md.j2", res=res, rows=rows)


def _gpu(res: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in res.get("cases", {}).items():
        if "error" in r:
            rows.append((name, "failed", r["error"][:80], "", "", "", ""))
            continue
        mfu = r.get("mfu")
        rows.append((name, _med(r["step_s"]), _spread(r["step_s"]), _f(r["steady_audio_per_s"]),
                     _f(r["achieved_tflops"]), "–" if mfu is None else f"{100 * mfu:.1f}%",
                     _f(r.get("max_memory_gb"))))  # fmt: skip
    ok = [r for r in res.get("cases", {}).values() if "error" not in r and r.get("steady_source_per_s")]
    best = max(ok, key=lambda r: r["steady_source_per_s"]) if ok else None
    return _lines("gpu.md.j2", res=res, rows=rows, best=best)


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = _lines("results.md.j2", meta=meta)
    sections = results.get("sections", {})
    if "overhead" in sections:
        lines += _overhead(sections["overhead"], meta.get("small_corpus"))
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
