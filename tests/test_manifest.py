"""Manifests: typed round-trip, every rejected line with its number, deterministic subsets."""

import hashlib
import json
import logging
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rewiring.manifest import (
    ManifestError,
    Record,
    audio_path,
    ids_hash,
    order_key,
    parse_amount,
    read_manifest,
    select_subset,
    write_manifest,
)

LABELS = ["yes", "no", "up", "down", "left"]


def synthetic(n: int = 60) -> list[Record]:
    """A fixed manifest: 5 labels (yes over-represented), 4 speakers, durations 1.0 to 3.5 s."""
    return [
        Record(
            id=f"utt{i:03d}",
            audio=f"audio/utt{i:03d}.wav",
            duration=1.0 + (i * 7 % 11) * 0.25,
            speaker=f"spk{i % 4}",
            label=LABELS[i % 5] if i % 13 else "yes",
            labels={"action": ["on", "off", "up"][i % 3]},
        )
        for i in range(n)
    ]


def full_record() -> Record:
    return Record(
        id="a1",
        audio="audio/a1.wav",
        duration=2,
        text="turn on the lights in the kitchen",
        phones="t er n aa n",
        speaker="spk1",
        label="activate",
        labels={"action": "activate", "object": "lights", "location": "kitchen"},
        segments=[("spk1", 0.0, 1.2), ["spk2", 1, 2.0]],
        slots=[("object", "lights"), ["location", "kitchen"]],
        meta={"source": "embedded", "snr": 12.5, "nested": {"a": [1, 2]}},
    )


# ---------------------------------------------------------------- read / write


def test_round_trip(tmp_path):
    recs = [
        full_record(),
        Record(id="b2", audio="b2.flac", duration=0.5),
        Record(id="é", audio="x", duration=0),
    ]
    path = tmp_path / "sub" / "train.jsonl"
    write_manifest(path, recs)
    back = read_manifest(path)
    assert back == recs
    assert back[0].duration == 2.0 and isinstance(back[0].duration, float)
    assert back[0].segments == [["spk1", 0.0, 1.2], ["spk2", 1.0, 2.0]]
    assert back[0].slots == [["object", "lights"], ["location", "kitchen"]]
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[1])
    assert list(first) == ["id", "audio", "duration"]  # None fields are left out
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed over


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [Record(id="a", audio="a.wav", duration=1.0)])
    before = path.read_text()
    bad = Record(id="b", audio="b.wav", duration=1.0, meta={"x": object()})
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: "):
        write_manifest(path, [Record(id="c", audio="c.wav", duration=1.0), bad])
    assert path.read_text() == before
    with pytest.raises(ManifestError, match=r":2: duplicate id 'c'"):
        write_manifest(path, [Record(id="c", audio="c.wav", duration=1.0)] * 2)
    assert path.read_text() == before and not list(tmp_path.glob("*.tmp"))


def test_audio_path(tmp_path):
    rec = Record(id="a", audio="audio/a.wav", duration=1.0)
    assert audio_path(tmp_path / "asr" / "train.jsonl", rec) == tmp_path / "asr" / "audio" / "a.wav"
    assert audio_path("m.jsonl", rec) == Path("audio/a.wav")


def test_blank_lines_are_skipped_but_counted(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"id": "a", "audio": "a.wav", "duration": 1}\n\n   \n{"id": "b", "audio": 3, "duration": 1}\n'
    )
    with pytest.raises(ManifestError) as e:
        read_manifest(p)
    assert e.value.lineno == 4 and str(e.value).startswith(f"{p}:4: ")


GOOD = '{"id": "ok", "audio": "ok.wav", "duration": 1.0}'

INVALID = {
    "bad json": ('{"id": "x", "audio": "x.wav", "duration": 1.0', "invalid JSON"),
    "nan constant": ('{"id": "x", "audio": "x.wav", "duration": NaN}', "invalid JSON"),
    "not an object": ('["x", "x.wav", 1.0]', "not a JSON object"),
    "string line": ('"x"', "not a JSON object"),
    "unknown key": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "lable": "yes"}',
        "unknown field(s) 'lable'",
    ),
    "missing id": ('{"audio": "x.wav", "duration": 1.0}', "missing required field(s) 'id'"),
    "missing audio": ('{"id": "x", "duration": 1.0}', "missing required field(s) 'audio'"),
    "missing duration": ('{"id": "x", "audio": "x.wav"}', "missing required field(s) 'duration'"),
    "id not a string": ('{"id": 7, "audio": "x.wav", "duration": 1.0}', "'id' must be a string"),
    "empty id": ('{"id": " ", "audio": "x.wav", "duration": 1.0}', "'id' is empty"),
    "duration string": ('{"id": "x", "audio": "x.wav", "duration": "1.0"}', "'duration' must be a number"),
    "duration bool": ('{"id": "x", "audio": "x.wav", "duration": true}', "'duration' must be a number"),
    "negative duration": ('{"id": "x", "audio": "x.wav", "duration": -0.5}', "negative duration"),
    "text not a string": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "text": 3}',
        "'text' must be a string",
    ),
    "label list": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "label": ["a"]}',
        "'label' must be a string",
    ),
    "labels not dict": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "labels": "a"}',
        "'labels' must be an object",
    ),
    "labels value": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "labels": {"a": 1}}',
        "'labels' must map",
    ),
    "segment shape": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "segments": [["s", 0.1]]}',
        "segments[0]",
    ),
    "segment order": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "segments": [["s", 0.5, 0.1]]}',
        "start <= end",
    ),
    "slot shape": ('{"id": "x", "audio": "x.wav", "duration": 1.0, "slots": [["a", "b", "c"]]}', "slots[0]"),
    "meta list": ('{"id": "x", "audio": "x.wav", "duration": 1.0, "meta": [1]}', "'meta' must be an object"),
    "offset string": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "offset": "2"}',
        "'offset' must be a number or null, got str",
    ),
    "negative offset": (
        '{"id": "x", "audio": "x.wav", "duration": 1.0, "offset": -1}',
        "'offset' must be a finite number >= 0 seconds, got -1",
    ),
    "segment of no length": (
        '{"id": "x", "audio": "x.wav", "duration": 0, "offset": 3.5}',
        "a segment (offset 3.5 s) needs a duration > 0, got 0",
    ),
    "duplicate id": (
        '{"id": "ok", "audio": "other.wav", "duration": 2.0}',
        "duplicate id 'ok' (first on line 1)",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_line_names_line_and_reason(tmp_path, case):
    line, reason = INVALID[case]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([GOOD, '{"id": "ok2", "audio": "ok2.wav", "duration": 0.5}', line, GOOD]) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(p)
    assert e.value.lineno == 3
    assert str(e.value).startswith(f"{p}:3: "), str(e.value)
    assert reason in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


def test_offset_round_trips_and_names_a_segment(tmp_path):
    recs = [
        Record(id="long-0", audio="long.wav", duration=10.0, offset=0, segments=[["a", 0.0, 4.0]]),
        Record(id="long-1", audio="long.wav", duration=10.0, offset=10, text="more"),
        Record(id="whole", audio="short.wav", duration=2.0),
    ]
    path = tmp_path / "m.jsonl"
    write_manifest(path, recs)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(lines[1]) == ["id", "audio", "duration", "offset", "text"]
    assert "offset" not in lines[2]
    back = read_manifest(path)
    assert back == recs and back[1].offset == 10.0 and isinstance(back[1].offset, float)
    assert back[2].offset is None


def test_record_construction_validates():
    with pytest.raises(ValueError, match="negative duration"):
        Record(id="x", audio="x.wav", duration=-1.0)
    with pytest.raises(ValueError, match="finite"):
        Record(id="x", audio="x.wav", duration=math.inf)


# ---------------------------------------------------------------- amounts


@pytest.mark.parametrize(
    "text,seconds",
    [("10min", 600), ("1h", 3600), ("10h", 36000), ("90s", 90), ("1.5h", 5400), ("2 hours", 7200),
     ("45", 45), (" 10 MIN ", 600), (".5h", 1800), (30, 30.0), (12.5, 12.5)],
)  # fmt: skip
def test_parse_amount(text, seconds):
    assert parse_amount(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "ten minutes", "10 parsecs", "1h30", "-5min", "0h", "10ms", "h", None, True]
)
def test_parse_amount_rejects(text):
    with pytest.raises(ValueError, match="amount"):
        parse_amount(text)


# ---------------------------------------------------------------- subsets

# Pinned: if any of these change, subsets (and so every low-resource result) changed across versions.
GOLDEN_FRACTION_LABEL = ["utt004", "utt016", "utt025", "utt037", "utt039", "utt058"]
GOLDEN_AMOUNT_SPEAKER = [
    "utt007", "utt014", "utt015", "utt029", "utt030", "utt032", "utt036", "utt037", "utt042", "utt043", "utt045",
]  # fmt: skip
GOLDEN_FRACTION_PLAIN = [
    "utt006", "utt014", "utt018", "utt024", "utt027", "utt033", "utt035", "utt040", "utt047", "utt051", "utt053", "utt058",
]  # fmt: skip
GOLDEN_IDS_HASH = "fc5f65f4e42b8972"


def ids(recs):
    return [r.id for r in recs]


def test_subset_golden_ids():
    recs = synthetic()
    assert ids(select_subset(recs, fraction=0.1, seed=0, stratify="label")) == GOLDEN_FRACTION_LABEL
    assert ids(select_subset(recs, amount="20s", seed=1, stratify="speaker")) == GOLDEN_AMOUNT_SPEAKER
    assert ids(select_subset(recs, fraction=0.2, seed=3)) == GOLDEN_FRACTION_PLAIN
    assert ids_hash(recs) == GOLDEN_IDS_HASH


def test_subset_is_sha256_ranking():
    """Without strata, a fraction is exactly the lowest sha256(f"{seed}:{id}") ids."""
    recs = synthetic()
    want = sorted(recs, key=lambda r: hashlib.sha256(f"7:{r.id}".encode()).hexdigest())[:15]
    assert want == sorted(recs, key=lambda r: order_key(7, r.id))[:15]
    assert set(ids(select_subset(recs, fraction=0.25, seed=7))) == set(ids(want))


def test_subset_deterministic_and_seeded():
    recs = synthetic()
    a = select_subset(recs, fraction=0.3, seed=5, stratify="speaker")
    assert ids(a) == ids(select_subset(list(recs), fraction=0.3, seed=5, stratify="speaker"))
    # input order does not matter; output keeps the manifest's order
    assert ids(select_subset(recs[::-1], fraction=0.3, seed=5, stratify="speaker")) == ids(a)[::-1]
    assert ids(a) == sorted(ids(a))
    assert ids(select_subset(recs, fraction=0.3, seed=6, stratify="speaker")) != ids(a)


def test_subset_same_in_another_process():
    """Another interpreter with another PYTHONHASHSEED picks the same ids (no hash(), no random)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_manifest import synthetic;"
        "from rewiring.manifest import select_subset;"
        "print(','.join(r.id for r in select_subset(synthetic(), fraction=0.3, seed=2, stratify='label')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.strip()  # fmt: skip
    assert out.split(",") == ids(select_subset(synthetic(), fraction=0.3, seed=2, stratify="label"))


@pytest.mark.parametrize("stratify", ["label", "speaker", "labels.action"])
def test_stratified_fraction_proportions(stratify):
    recs = synthetic()
    key = (lambda r: r.labels["action"]) if stratify == "labels.action" else (lambda r: getattr(r, stratify))
    full = Counter(map(key, recs))
    for fraction in (0.01, 0.25, 0.5, 1.0):
        sub = Counter(map(key, select_subset(recs, fraction=fraction, seed=0, stratify=stratify)))
        assert set(sub) == set(full)  # every stratum represented, even at 1 %
        for k, n in full.items():
            assert sub[k] == max(1, math.floor(fraction * n + 0.5))


def test_stratified_amount_budget():
    recs = synthetic()
    total = sum(r.duration for r in recs)
    for amount, seconds in (("30s", 30.0), ("1min", 60.0), (100, 100.0)):
        sub = select_subset(recs, amount=amount, seed=0, stratify="label")
        got = sum(r.duration for r in sub)
        strata = {r.label for r in recs}
        assert {r.label for r in sub} == strata
        # each stratum overshoots its share by less than one record (max 3.5 s)
        assert seconds <= got < seconds + 3.5 * len(strata)
        for lab in strata:
            share = seconds * sum(r.duration for r in recs if r.label == lab) / total
            have = sum(r.duration for r in sub if r.label == lab)
            assert share <= have < share + 3.5
    assert len(select_subset(recs, amount="10h", seed=0)) == len(recs)
    tiny = select_subset(recs, amount="1s", seed=0, stratify="speaker")
    assert Counter(r.speaker for r in tiny) == {f"spk{i}": 1 for i in range(4)}  # at least 1 per stratum


def test_unstratified_amount_budget():
    sub = select_subset(synthetic(), amount="45s", seed=4)
    got = sum(r.duration for r in sub)
    assert 45.0 <= got < 45.0 + 3.5


def test_subset_logs_ids_hash(caplog):
    with caplog.at_level(logging.INFO, logger="rewiring.manifest"):
        sub = select_subset(synthetic(), fraction=0.5, seed=0)
    assert any(ids_hash(sub) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, "exactly one"),
        ({"fraction": 0.5, "amount": "1h"}, "exactly one"),
        ({"fraction": 0.0}, r"\(0, 1\]"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
        ({"fraction": -0.1}, r"\(0, 1\]"),
        ({"amount": "lots"}, "cannot parse"),
        ({"amount": "0min"}, "positive"),
        ({"fraction": 0.5, "stratify": "duration"}, "stratify"),
        ({"fraction": 0.5, "stratify": "text"}, "no value"),
        ({"fraction": 0.5, "stratify": "labels.intent"}, "no value"),
    ],
)
def test_subset_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        select_subset(synthetic(), **kw)


def test_subset_rejects_duplicate_ids_and_handles_empty():
    r = Record(id="a", audio="a.wav", duration=1.0)
    with pytest.raises(ValueError, match="duplicate"):
        select_subset([r, r], fraction=0.5)
    assert select_subset([], fraction=0.5) == []


def test_ids_hash():
    recs = synthetic(10)
    h = ids_hash(recs)
    assert len(h) == 16 and int(h, 16) >= 0
    assert ids_hash(recs[::-1]) == h == ids_hash([r.id for r in recs])
    assert ids_hash(recs[:-1]) != h
    assert h == hashlib.sha256("\n".join(sorted(r.id for r in recs)).encode()).hexdigest()[:16]
