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

import torch  # noqa: E402

from benchmarks.common import SAMPLE_RATE, Workspace, max_rss_mb, prepare_data, summarize, warm_cache  # noqa: E402
from benchmarks.gpu import peak_tflops, step_flops  # noqa: E402
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
        sections=("overhead", "pipeline", "scaling", "gpu"),
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
    for heading in ("## 1. Framework overhead", "## 2. Data pipeline", "## 3. Scaling", "## 5. GPU",
                    "**What it means.**"):  # fmt: skip
        assert heading in md
    if not torch.cuda.is_available():
        assert results["sections"]["gpu"] == {"skipped": "no CUDA device on this machine"}
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


def test_python_m_benchmarks_has_its_own_options(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "python -m benchmarks" in out and all(f"--{o}" in out for o in ("out", "quick", "sections"))


def test_step_flops_and_card_peaks():
    from rewiring.encoder import TINY_CONFIG

    one = step_flops(TINY_CONFIG, [(1, 2 * SAMPLE_RATE)], conv_trained=True)
    assert step_flops(TINY_CONFIG, [(3, 2 * SAMPLE_RATE)], conv_trained=True) == pytest.approx(3 * one)
    assert step_flops(TINY_CONFIG, [(1, 2 * SAMPLE_RATE)] * 2, conv_trained=True) == pytest.approx(2 * one)
    # a frozen conv encoder runs forward only: 2 of its 3 passes (2 FLOPs per MAC each) drop out
    from benchmarks.scaling import flop_model

    conv = flop_model(TINY_CONFIG)["conv_macs_per_s"] * 2
    assert one - step_flops(TINY_CONFIG, [(1, 2 * SAMPLE_RATE)], conv_trained=False) == pytest.approx(2 * 2 * conv)
    # attention grows as T^2: doubling the length more than doubles the step
    assert step_flops(TINY_CONFIG, [(1, 4 * SAMPLE_RATE)], conv_trained=True) > 2 * one
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Some Future Card") is None


@pytest.mark.slow
def test_gpu_section_runs_its_path_on_the_cpu(mini_corpus, tmp_path):
    """The GPU section's code (Lightning in bf16-mixed, FLOPs from the padded shapes, MFU) on the CPU
    with the tiny encoder, so that a GPU machine only has to run it."""
    from benchmarks import gpu

    ws = Workspace(persist=tmp_path / "persist", tmp=tmp_path / "tmp", corpus=mini_corpus)
    data = prepare_data(ws, build=False)
    warm_cache(ws, "espeak", data["texts"])
    res = gpu.measure(ws, True, "espeak", encoder="tiny", accelerator="cpu", precision="bf16-mixed", peak=1.0)
    ((name, case),) = res["cases"].items()
    assert "error" not in case, case
    assert case["steady_audio_per_s"] > 0 and case["achieved_tflops"] > 0
    assert case["mfu"] == pytest.approx(case["achieved_tflops"] / 1.0)
    assert case["flops_per_step"]["median"] > 0
    from benchmarks.report import _gpu

    assert any(name in line and "%" in line for line in _gpu(res))


@pytest.mark.parametrize("conv_trained", [True, False])
def test_step_flops_agree_with_torch_flop_counter(conv_trained):
    """The analytic FLOPs (the GPU section's MFU numerator) against torch's FlopCounterMode on a real
    forward + backward. Dense positional conv (groups=1): the counter overcounts the backward of
    grouped convolutions, which the analytic count gets right."""
    from torch.utils.flop_counter import FlopCounterMode

    from rewiring.encoder import TINY_CONFIG, SpeechEncoder

    config = {**TINY_CONFIG, "num_conv_pos_embedding_groups": 1}
    encoder = SpeechEncoder(config, freeze_feature_encoder=not conv_trained).train()
    batch, samples = 2, 3 * SAMPLE_RATE
    with FlopCounterMode(display=False) as counter:
        out = encoder(torch.randn(batch, samples), torch.ones(batch, samples, dtype=torch.long))
        out.features.sum().backward()
    analytic = step_flops(config, [(batch, samples)], conv_trained=conv_trained)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.01)
