"""The bench machinery (benchmarks/): statistics, the quadratic fit, and a quick smoke run of its
sections on a mini corpus made here (the real `make bench` runs on the embedded tiny corpus)."""

import json
import sys
from pathlib import Path

import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is run from the repository root, not installed
    sys.path.insert(0, str(REPO))

from benchmarks.common import max_rss_mb, summarize  # noqa: E402
from benchmarks.scaling import fit_quadratic  # noqa: E402
from benchmarks.timer import StepTimer  # noqa: E402

TEXTS = ["turn on the lights", "play some music", "call my mother", "what time is it", "stop the alarm", "go left now"]
LABELS = ["yes", "no", "up"]


def test_summarize_median_quartiles_and_spread():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert summarize([2.5])["q1"] == summarize([2.5])["q3"] == 2.5
    assert summarize([])["median"] is None


def test_fit_quadratic_recovers_the_coefficients():
    ts = [1, 2, 4, 8, 16]
    fit = fit_quadratic(ts, [0.1 + 0.2 * t + 0.01 * t * t for t in ts])
    assert (fit["c"], fit["a"], fit["b"]) == pytest.approx((0.1, 0.2, 0.01), rel=1e-6)
    assert fit["t_equal_s"] == pytest.approx(20.0, rel=1e-6)
    t10 = fit["t_quadratic_10pct_s"]
    assert 0.01 * t10**2 == pytest.approx(0.1 * (0.1 + 0.2 * t10 + 0.01 * t10**2), rel=1e-6)
    linear = fit_quadratic(ts, [0.05 + 0.3 * t for t in ts])  # no quadratic growth: no crossover
    assert linear["t_equal_s"] is None and linear["t_quadratic_10pct_s"] is None


def test_step_timer_splits_steps_into_gap_and_body():
    timer = StepTimer()
    for k in range(3):
        timer.on_train_batch_start(None, None, None, k)
        timer.on_train_batch_end(None, None, None, {"size": 0}, k)
    t = timer.timings()
    assert len(t["steps"]) == len(t["gaps"]) == 2 and len(t["bodies"]) == 3
    assert all(s >= g >= 0 for s, g in zip(t["steps"], t["gaps"], strict=True))
    assert max_rss_mb() > 10


@pytest.fixture(scope="module")
def mini_corpus(tmp_path_factory) -> Path:
    """An embedded-corpus layout (unlabelled/train.jsonl, ks/{train,dev,test}.jsonl) of short espeak audio."""
    pytest.importorskip("espeakng_loader")
    from rewiring.manifest import Record, write_manifest
    from rewiring.synthesis import EspeakSynthesizer

    root = tmp_path_factory.mktemp("mini")
    (root / "audio").mkdir()
    synth = EspeakSynthesizer(rate=220)
    unl = []
    for i, text in enumerate(TEXTS):
        wav, sr = synth.synthesize(text)
        sf.write(root / "audio" / f"u{i}.wav", wav, sr)
        unl.append(Record(id=f"u{i}", audio=f"../audio/u{i}.wav", duration=len(wav) / sr, text=text))
    write_manifest(root / "unlabelled" / "train.jsonl", unl)
    for split in ("train", "dev", "test"):
        recs = []
        for j, word in enumerate(LABELS * 2):
            wav, sr = synth.synthesize(word)
            name = f"{split}-{j}.wav"
            sf.write(root / "audio" / name, wav, sr)
            recs.append(Record(id=f"{split}-{j}", audio=f"../audio/{name}", duration=len(wav) / sr, label=word))
        write_manifest(root / "ks" / f"{split}.jsonl", recs)
    return root


@pytest.mark.slow
def test_bench_quick_smoke(mini_corpus, tmp_path):
    from benchmarks.run import run_benchmarks

    out = tmp_path / "out"
    results = run_benchmarks(
        out=str(out),
        quick=True,
        sections=("overhead", "pipeline", "scaling"),
        corpus=mini_corpus,
        case_names=("tiny-rewire",),
        backends=("espeak",),
        cold_backends=("espeak",),
        synth="espeak",
        scaling_lengths=(1,),
        scaling_batches=(),
        persist=tmp_path / "persist",
    )
    md = (out / "results.md").read_text()
    for heading in ("## 1. Framework overhead", "## 2. Data pipeline", "## 3. Scaling", "**What it means.**"):
        assert heading in md
    raw = json.loads((out / "results.json").read_text())
    assert raw["meta"]["torch_threads"] == 1

    tiny = results["sections"]["overhead"]["tiny-rewire"]
    assert "error" not in tiny, tiny
    assert tiny["ratio_steady"]["ratio"] > 0 and tiny["ratio_end_to_end"] > 0
    assert tiny["ratio_steady"]["bare_first"]["n"] >= 1 and tiny["ratio_steady"]["lightning_first"]["n"] >= 1
    assert not tiny["bare"]["mismatched_batches"]  # interleaved on the same batches
    assert tiny["lightning"]["audio_from"].startswith("bare batches")  # same batches in both loops
    assert tiny["lightning"]["steps_run"] == tiny["case"]["warmup"] + tiny["case"]["steps"]
    assert any("training_step" in row["action"] for row in tiny["profiled"]["profile"])

    pipe = results["sections"]["pipeline"]
    assert all(row["batches_per_s"] > 0 for row in pipe["loader"]), pipe["loader"]
    assert pipe["tts"]["espeak"]["rtf"]["median"] > 0
    assert pipe["cache_hit"]["misses"] == 0

    (point,) = results["sections"]["scaling"]["by_length"]
    assert "error" not in point, point
    assert point["rss_peak_mb"] >= point["rss_before_mb"] > 0
