"""compare on hand-made run folders: 2 arms x 2 seeds x 1 task (plus a worse lr for the baseline)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from rewiring.experiment.report import (
    RunResult,
    choose_lr,
    compare,
    isotropy_metrics,
    load_runs,
    write_report,
)

STEPS = [10, 20, 30, 40]
CURVES = {
    # arm, lr, seed: dev curve, test value
    ("baseline", "0.001", 0): ([0.2, 0.4, 0.6, 0.8], 0.78),
    ("baseline", "0.001", 1): ([0.3, 0.5, 0.6, 0.7], 0.68),
    ("baseline", "0.01", 0): ([0.1, 0.2, 0.3, 0.4], 0.99),  # worse on dev: not chosen despite its test
    ("baseline", "0.01", 1): ([0.1, 0.2, 0.3, 0.4], 0.99),
    ("neutral", "0.001", 0): ([0.5, 0.8, 0.85, 0.9], 0.88),
    ("neutral", "0.001", 1): ([0.6, 0.7, 0.75, 0.8], 0.80),
}


def _run(
    root: Path,
    task: str,
    split: str,
    arm: str,
    lr: str,
    seed: int,
    values,
    test,
    metric="val/acc",
    mode="max",
    source=None,
) -> Path:
    d = root / task / split / arm / f"lr{lr}" / f"seed{seed}"
    d.mkdir(parents=True)
    conv = {
        "metric": metric,
        "mode": mode,
        "curve": {"steps": STEPS, "seconds": [s / 10 for s in STEPS], "values": values},
        "final": {"value": values[-1], "step": STEPS[-1]},
        "best": {"value": (max if mode == "max" else min)(values), "step": None},
    }
    (d / "convergence.json").write_text(json.dumps(conv))
    (d / "test.json").write_text(json.dumps({"metrics": {"test/" + metric.split("/")[1]: test}}))
    config = {"model": {"init_args": {"lr_head": float(lr), "encoder": {"init_args": {"source": source}}}}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs" / "demo"
    enc_base, enc_neutral = tmp_path / "enc" / "tiny", tmp_path / "enc" / "neutral"
    enc_base.mkdir(parents=True)
    enc_neutral.mkdir(parents=True)

    # the rewired export holds before/after profiles; the baseline encoder has none of its own
    def profile(iso, rank):
        return {"layers": {"features": {"pooled": {"isoscore": iso, "effective_rank": rank}}}}

    (enc_neutral / "isotropy.json").write_text(
        json.dumps({"before": profile(0.1, 5.0), "after": profile(0.4, 9.0)})
    )
    for (arm, lr, seed), (values, test) in CURVES.items():
        source = str(enc_base if arm == "baseline" else enc_neutral)
        _run(root, "ks", "10pct", arm, lr, seed, values, test, source=source)
    return root


def test_compare_numbers(runs_dir):
    runs = load_runs(runs_dir)
    assert len(runs) == 6
    base = [r for r in runs if r.arm == "baseline"]
    lr, means = choose_lr(base)
    assert lr == "0.001" and means == {"0.001": pytest.approx(0.75), "0.01": pytest.approx(0.4)}
    base = [r for r in base if r.lr == lr]
    arm = [r for r in runs if r.arm == "neutral"]
    c = compare(base, arm)
    assert c.base_final == (pytest.approx(0.75), pytest.approx(math.sqrt(0.005)))
    assert c.arm_final == (pytest.approx(0.85), pytest.approx(math.sqrt(0.005)))
    # the baseline reaches its own final value at its last step; neutral gets there at step 20
    assert c.base_steps == 40 and c.arm_steps == 20 and c.arm_reached == 2
    assert c.speedup == pytest.approx(2.0)
    # areas: baseline (0.5 + 0.5333) / 2, neutral (0.78333 + 0.71667) / 2
    assert c.area_ratio == pytest.approx(0.75 / (1.55 / 3))
    assert c.base_test[0] == pytest.approx(0.73) and c.arm_test[0] == pytest.approx(0.84)


def test_compare_min_metric_and_never_reached():
    def r(arm, seed, values):
        return RunResult(
            "asr",
            "1pct",
            arm,
            "0.001",
            seed,
            Path("."),
            "val/wer",
            "min",
            STEPS,
            values,
            values[-1],
            min(values),
        )

    base = [r("baseline", 0, [90.0, 60.0, 40.0, 30.0]), r("baseline", 1, [80.0, 50.0, 45.0, 40.0])]
    arm = [r("twin", 0, [70.0, 30.0, 25.0, 20.0]), r("twin", 1, [95.0, 90.0, 85.0, 80.0])]
    c = compare(base, arm)
    assert c.base_steps == 40  # each baseline reaches its own final value (<=) at the end
    assert c.arm_steps == 20 and c.arm_reached == 1  # seed 1 never gets down to a WER of 40
    assert c.speedup == pytest.approx(2.0)  # over the seed where both got there
    assert c.area_ratio > 1  # a higher mean WER: worse, for a min-metric


def test_report_table_and_plots(runs_dir, tmp_path):
    out = tmp_path / "report"
    path = write_report(runs_dir, out)
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 10% | neutral"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "10%",
        "neutral",
        "0.001 / 0.001",
        "0.75 ± 0.07071",
        "0.85 ± 0.07071",
        "40",
        "20",
        "2",
        f"{0.75 / (1.55 / 3):.4g}",
        "0.73 ± 0.07071",
        "0.84 ± 0.05657",
        "2",
    ]
    assert "0.001: 0.75, 0.01: 0.4; chosen 0.001" in text
    for png in ("curves_ks.png", "speedup.png", "isotropy.png"):
        assert (out / png).stat().st_size > 1000
    # isotropy: the rewired encoder's "after", the baseline from its "before"
    assert "| pooled/isoscore | 0.1 | 0.4 |" in text
    assert "| pooled/effective_rank | 5 | 9 |" in text


def test_report_without_isotropy_or_runs(tmp_path):
    empty = write_report(tmp_path / "nothing", tmp_path / "r0").read_text()
    assert "No finished runs" in empty
    root = tmp_path / "runs"
    _run(
        root, "sd", "1pct", "baseline", "0.001", 0, [0.6, 0.5, 0.45, 0.4], 0.42, metric="val/der", mode="min"
    )
    text = write_report(root, tmp_path / "r1").read_text()
    assert "(baseline only)" in text and "No isotropy.json" in text
    assert (tmp_path / "r1" / "curves_sd.png").exists()


def test_isotropy_formats():
    flat = isotropy_metrics({"isoscore": 0.2, "effective_rank": 7, "per_layer": [0.1, 0.2, 0.3]})
    assert flat == ({"isoscore": 0.2, "effective_rank": 7.0}, {"per_layer": [0.1, 0.2, 0.3]})
    prof = {
        "encoder": "x",
        "items": 10,
        "layers": {
            "0": {"frames": {"isoscore": 0.1}},
            "1": {"frames": {"isoscore": 0.3}},
            "average": {"frames": {"isoscore": 0.2}},
        },
    }
    scal, ser = isotropy_metrics(prof)
    assert scal == {"average/frames/isoscore": 0.2} and ser == {"frames/isoscore": [0.1, 0.3]}


def test_rewiring_section_reads_what_each_export_learned(tmp_path):
    import json

    from rewiring.experiment.report import rewiring_section

    enc = tmp_path / "neutral"
    enc.mkdir()
    (enc / "rewiring.json").write_text(json.dumps({
        "steps": 100, "pairs_per_step": 8, "match_acc_chance": 0.0667, "match_acc_first": 0.09,
        "match_acc_last": 0.41, "loss_first": 2.7, "loss_last": 2.5, "window": 10}))  # fmt: skip
    (enc / "transcription.json").write_text(json.dumps({"models": {
        "before": {"wer": 0.045, "transcripts": [{}] * 14}, "after": {"wer": 0.06, "transcripts": [{}] * 14}}}))  # fmt: skip
    text = "\n".join(rewiring_section({"baseline": "data/encoders/whisper-tiny.en", "neutral": str(enc)}, "baseline"))
    assert "| neutral | 100 | 8 | 0.0667 | 0.09 → 0.41 | 2.7 → 2.5 |" in text
    assert "| neutral | 0.045 | 0.06 | 14 |" in text
    assert rewiring_section({"baseline": None}, "baseline") == []
