"""The embedded corpus: fields, balance, no leakage, reproducibility, and recovery from a broken build."""

from __future__ import annotations

import json
import re

import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from rewiring.corpus import (  # noqa: E402
    SIZES,
    SPLITS,
    TASKS,
    build_corpus,
    ensure_corpus,
    prepare_embedded,
    servers,  # noqa: E402
    task_manifest,
)
from rewiring.corpus import build as corpus_build  # noqa: E402
from rewiring.manifest import audio_path, read_manifest  # noqa: E402

# A few items per split, for the tests that need extra builds (the mechanism, not the contents).
MICRO = {
    "asr": (2, 1, 1), "ks": (1, 1, 1), "ic": (2, 1, 1), "sid": (1, 1, 1), "sid_speakers": 2,
    "sd": (1, 1, 1), "sf": (1, 1, 1), "unlabelled": (3, 2), "held_speakers": 16,
}  # fmt: skip


@pytest.fixture
def tiny(tiny_corpus):
    """conftest's session-wide tiny corpus (seed 0), shared with the other tests."""
    return tiny_corpus


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", MICRO)


def load(root, task, split):
    return read_manifest(task_manifest(root, task, split))


def all_manifests(root):
    out = {(t, s): load(root, t, s) for t in TASKS for s in SPLITS}
    out.update({("unlabelled", s): load(root, "unlabelled", s) for s in ("train", "heldout")})
    return out


def test_layout_summary_and_audio(tiny):
    summary = json.loads((tiny / "corpus.json").read_text())
    assert (summary["size"], summary["seed"], summary["sample_rate"]) == ("tiny", 0, 16000)
    for (task, split), recs in all_manifests(tiny).items():
        assert recs, (task, split)
        assert summary["tasks"][task][split]["items"] == len(recs)
        for r in recs:
            path = audio_path(task_manifest(tiny, task, split), r)
            assert r.audio == f"../audio/{task}/{r.id}.wav"
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.frames / 16000 == r.duration


def test_task_fields(tiny):
    word = re.compile(r"^[a-z]+( [a-z]+)*$")
    for split in SPLITS:
        for r in load(tiny, "asr", split):
            assert word.match(r.text) and r.speaker and r.label is None
        for r in load(tiny, "ks", split):
            assert r.duration == 1.0 and r.label in corpus_build.KS_CLASSES
            assert (r.speaker is None) == (r.label == "_silence_")
        for r in load(tiny, "ic", split):
            assert set(r.labels) == {"action", "object", "location"} and word.match(r.text) and r.speaker
        for r in load(tiny, "sid", split):
            assert r.speaker and word.match(r.text)
        for r in load(tiny, "sd", split):
            speakers = {s[0] for s in r.segments}
            assert len(speakers) == 2 and len(r.segments) >= 2
            assert all(0 <= s[1] < s[2] <= r.duration for s in r.segments)
        for r in load(tiny, "sf", split):
            assert set(r.labels) == {"intent"} and r.slots and word.match(r.text)
            pos = 0  # slot values appear verbatim, in order
            for _slot, value in r.slots:
                pos = r.text.index(value, pos) + len(value)
    train = load(tiny, "sd", "train")
    overlaps = [a for r in train for a, b in zip(r.segments, r.segments[1:], strict=False) if b[1] < a[2]]
    pauses = [a for r in train for a, b in zip(r.segments, r.segments[1:], strict=False) if b[1] > a[2]]
    assert overlaps and pauses


def test_every_class_in_train(tiny):
    summary = json.loads((tiny / "corpus.json").read_text())
    ks = [r.label for r in load(tiny, "ks", "train")]
    assert {c: ks.count(c) for c in set(ks)} == {c: SIZES["tiny"]["ks"][0] for c in summary["classes"]["ks"]}
    ic = load(tiny, "ic", "train")
    for key, values in summary["classes"]["ic"].items():
        assert {r.labels[key] for r in ic} == set(values)
    assert {r.labels["intent"] for r in load(tiny, "sf", "train")} == set(summary["classes"]["sf"]["intent"])
    for split in SPLITS:
        assert {r.speaker for r in load(tiny, "sid", split)} == set(summary["classes"]["sid"])
    assert len(summary["classes"]["sid"]) >= 20


def test_no_speaker_leakage_and_sid_sentences_disjoint(tiny):
    for task in ("asr", "ks", "ic", "sf", "sd"):
        spk = {
            s: {r.speaker for r in load(tiny, task, s) if r.speaker}
            | {g[0] for r in load(tiny, task, s) for g in r.segments or []}
            for s in SPLITS
        }
        assert (
            not spk["train"] & spk["dev"] and not spk["train"] & spk["test"] and not spk["dev"] & spk["test"]
        ), task
    texts = {s: {r.text for r in load(tiny, "sid", s)} for s in SPLITS}
    assert (
        not texts["train"] & texts["dev"]
        and not texts["train"] & texts["test"]
        and not texts["dev"] & texts["test"]
    )


def test_unlabelled_shares_nothing_with_dev_test(tiny):
    held = [
        r
        for (task, split), recs in all_manifests(tiny).items()
        if task != "unlabelled" and split != "train"
        for r in recs
    ]
    pools = json.loads((tiny / "corpus.json").read_text())["speakers"]["pools"]
    voices = json.loads((tiny / "corpus.json").read_text())["speakers"]["voices"]
    held_voices = {voices[s]["voice"] for s in pools["dev"] + pools["test"]}
    for split in ("train", "heldout"):
        recs = load(tiny, "unlabelled", split)
        assert all(r.text and r.label is None and r.labels is None and r.speaker is None for r in recs)
        assert not {r.id for r in recs} & {r.id for r in held}
        assert not {r.text for r in recs} & {r.text for r in held if r.text}
        assert not {r.meta["voice"] for r in recs} & held_voices


def same_files(a, b, pattern):
    names = sorted(p.relative_to(a) for p in a.rglob(pattern))
    assert names and names == sorted(p.relative_to(b) for p in b.rglob(pattern))
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_same_seed_same_bytes(micro, tmp_path):
    """Same seed, same manifests and wav bytes, however chunks fall on processes: one process
    rendering every chunk in turn must match two processes (espeak state never carries over)."""
    a, b = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"
    build_corpus(a, "tiny", seed=0, progress=False, processes=1)
    build_corpus(b, "tiny", seed=0, progress=False, processes=2)
    assert len(servers.chunks(corpus_build._Planner(a, "tiny", 0, False).plan())) >= 2
    assert same_files(a, b, "*.jsonl")
    assert same_files(a, b, "*.wav")


def test_different_seed_differs(micro, tmp_path):
    a, b = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"
    build_corpus(a, "tiny", seed=1, progress=False)
    build_corpus(b, "tiny", seed=2, progress=False)
    assert task_manifest(a, "asr", "train").read_text() != task_manifest(b, "asr", "train").read_text()
    assert (a / "audio/asr/asr-train-00000.wav").read_bytes() != (
        b / "audio/asr/asr-train-00000.wav"
    ).read_bytes()


def test_interrupted_build_leaves_nothing_and_is_rebuilt(micro, tmp_path, monkeypatch):
    root = tmp_path / "embedded" / "tiny"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(servers, "render", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_corpus(root, "tiny", seed=0, progress=False)
    assert not root.exists() and not list(root.parent.glob(".tiny.building-*"))
    # what a killed process leaves: a partial folder without corpus.json, and a stale build folder
    (root / "asr").mkdir(parents=True)
    (root / "asr" / "train.jsonl").write_text("not a manifest\n")
    (root.parent / ".tiny.building-999999").mkdir()
    assert ensure_corpus(root) == root
    assert (root / "corpus.json").is_file() and load(root, "asr", "train")
    assert not list(root.parent.glob(".tiny.building-*"))
    stamp = (root / "corpus.json").stat().st_mtime_ns
    assert ensure_corpus(root) == root and (root / "corpus.json").stat().st_mtime_ns == stamp  # built once


def test_ensure_corpus_needs_a_size_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a size"):
        ensure_corpus(tmp_path / "mycorpus")


def test_refuses_to_replace_a_folder_that_is_not_a_corpus(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        build_corpus(root, "tiny", progress=False)
    assert (root / "notes.txt").read_text() == "mine"


def test_task_manifest_paths_and_errors(tmp_path):
    assert task_manifest(tmp_path, "sd", "dev") == tmp_path / "sd" / "dev.jsonl"
    assert task_manifest(tmp_path, "unlabelled", "heldout") == tmp_path / "unlabelled" / "heldout.jsonl"
    with pytest.raises(ValueError, match="unknown task"):
        task_manifest(tmp_path, "mt", "train")
    with pytest.raises(ValueError, match="unknown split"):
        task_manifest(tmp_path, "asr", "heldout")


def test_prepare_embedded_keeps_a_matching_build(tiny, capsys):
    stamp = (tiny / "corpus.json").stat().st_mtime_ns
    prepare_embedded(str(tiny), size="tiny", seed=0)
    assert "already" in capsys.readouterr().out
    assert (tiny / "corpus.json").stat().st_mtime_ns == stamp
