"""Bring your own data: `prepare folder` from sidecar transcripts or a CSV/TSV, records with an offset,
bad rows named by path:line, and the data paths (tasks, sd, rewiring) reading segments and passing
the reason of a bad file on."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from rewiring.audio import Skipped
from rewiring.corpus.folder import PrepareError, prepare
from rewiring.experiment.commands import prepare as prepare_command
from rewiring.manifest import audio_path, read_manifest

SR = 16000


def _wav(path: Path, seconds: float = 1.0, freq: float = 300.0, amplitude: float = 0.3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * SR))) / SR
    sf.write(str(path), (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR)
    return path


def _manifests(out: Path, task: str) -> dict[str, list]:
    return {p.stem: read_manifest(p) for p in sorted((out / task).glob("*.jsonl"))}


# ---------------------------------------------------------------- a folder with sidecars


def test_folder_with_sidecar_transcripts(tmp_path):
    root = tmp_path / "mine"
    for i in range(10):
        _wav(root / "rec" / f"u{i}.wav", seconds=0.5 + 0.1 * i)
        side = root / "rec" / (f"u{i}.txt" if i % 2 else f"u{i}.lab")
        side.write_text(f"  Utterance\n number {i}.\n", encoding="utf-8")
    counts = prepare(root, tmp_path / "out", "asr")
    assert counts == {"train": 8, "dev": 1, "test": 1}
    got = _manifests(tmp_path / "out", "asr")
    records = [r for split in got.values() for r in split]
    assert sorted(r.id for r in records) == [f"rec/u{i}" for i in range(10)]
    for r in records:
        i = int(r.id[-1])
        assert r.text == f"Utterance number {i}." and r.duration == pytest.approx(0.5 + 0.1 * i)
        assert r.offset is None and audio_path(tmp_path / "out" / "asr" / "train.jsonl", r).is_file()
    # the split is a function of the seed and the ids: the same again, another with another seed
    prepare(root, tmp_path / "again", "asr")
    assert _manifests(tmp_path / "again", "asr") == got
    prepare(root, tmp_path / "other", "asr", seed=5)
    assert _manifests(tmp_path / "other", "asr") != got


def test_split_folders_labels_and_speakers_from_folders(tmp_path):
    root = tmp_path / "kws"
    for split, n in (("train", 3), ("dev", 1), ("test", 1)):
        for word in ("yes", "no"):
            for i in range(n):
                _wav(root / split / word / f"{i}.wav")
    assert prepare(root, tmp_path / "out", "ks") == {"train": 6, "dev": 2, "test": 2}
    dev = read_manifest(tmp_path / "out" / "ks" / "dev.jsonl")
    assert sorted((r.id, r.label) for r in dev) == [("dev/no/0", "no"), ("dev/yes/0", "yes")]

    vox = tmp_path / "vox"
    for spk in ("id1", "id2"):
        for i in range(5):
            _wav(vox / spk / "video" / f"{i}.wav")
    prepare(vox, tmp_path / "out", "sid")
    got = _manifests(tmp_path / "out", "sid")
    assert {r.speaker for r in got["train"]} == {"id1", "id2"}  # every speaker is in train
    assert {r.speaker for r in got["test"]} == {"id1", "id2"} and len(got["test"]) == 2
    assert all(r.label is None and r.text is None for rs in got.values() for r in rs)


def test_unlabelled_gets_train_and_heldout(tmp_path):
    for i in range(20):
        _wav(tmp_path / "raw" / f"{i}.flac")
    assert prepare(tmp_path / "raw", tmp_path / "out", "unlabelled") == {"train": 18, "heldout": 2}


# ---------------------------------------------------------------- a table


def test_csv_and_tsv_tables_with_offsets_and_extra_columns(tmp_path):
    _wav(tmp_path / "audio" / "long.wav", seconds=6.0)
    _wav(tmp_path / "audio" / "short.wav", seconds=1.0)
    rows = [
        ["path", "text", "speaker", "split", "offset", "duration", "source"],
        ["audio/long.wav", "first part", "ann", "train", "0", "2.5", "radio"],
        ["audio/long.wav", "second part", "ann", "dev", "2.5", "", "radio"],
        ["audio/short.wav", '"Quoted", text', "bob", "test", "", "", ""],
    ]
    for name, sep in (("t.csv", ","), ("t.tsv", "\t")):
        table = tmp_path / name
        lines = [sep.join(f'"{c}"' if sep in c or '"' in c else c for c in row) for row in rows]
        if sep == ",":
            lines[3] = 'audio/short.wav,"""Quoted"", text",bob,test,,,'
        else:
            lines[3] = 'audio/short.wav\t"Quoted", text\tbob\ttest\t\t\t'
        table.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = tmp_path / name.replace(".", "-")
        assert prepare(table, out, "asr") == {"train": 1, "dev": 1, "test": 1}
        got = _manifests(out, "asr")
        (first,), (second,), (short,) = got["train"], got["dev"], got["test"]
        assert (first.offset, first.duration, first.text, first.speaker) == (0.0, 2.5, "first part", "ann")
        assert (second.offset, second.duration) == (2.5, 3.5)  # to the end of the file
        assert first.meta == {"source": "radio"} and short.meta is None
        assert (short.offset, short.duration, short.text) == (None, 1.0, '"Quoted", text')
        # without an id column, a segment's id is its path and offset
        assert (first.id, second.id, short.id) == ("audio/long@0", "audio/long@2.5", "audio/short")


def test_ic_and_sf_from_tables(tmp_path):
    table = tmp_path / "fsc.csv"
    lines = ["path,id,text,action,object,location,intent,slots"]
    for i in range(6):
        _wav(tmp_path / f"{i}.wav")
        slots = json.dumps([["object", "lights"]]).replace('"', '""')
        lines.append(f'{i}.wav,utt{i},turn on the lights,activate,lights,kitchen,SwitchOn,"{slots}"')
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare(table, tmp_path / "out", "ic")
    rec = read_manifest(tmp_path / "out" / "ic" / "train.jsonl")[0]
    assert rec.labels == {
        "action": "activate",
        "object": "lights",
        "location": "kitchen",
        "intent": "SwitchOn",
    }
    prepare(table, tmp_path / "out", "sf")
    rec = read_manifest(tmp_path / "out" / "sf" / "train.jsonl")[0]
    assert rec.slots == [["object", "lights"]] and rec.labels["intent"] == "SwitchOn"
    with pytest.raises(PrepareError, match="needs labels a folder cannot give"):
        prepare(tmp_path, tmp_path / "out", "ic")


# ---------------------------------------------------------------- bad rows


def test_bad_rows_are_all_named_by_path_and_line_and_nothing_is_written(tmp_path):
    _wav(tmp_path / "ok.wav", seconds=2.0)
    (tmp_path / "garbage.wav").write_bytes(b"not audio" * 20)
    table = tmp_path / "bad.csv"
    table.write_text(
        "path,text,offset,duration,split\n"
        "ok.wav,fine,,,train\n"  # 2
        'ok.wav,"a transcript\nover two lines",,,train\n'  # 3-4 (a duplicate id, too)
        "missing.wav,hello,,,\n"  # 5
        "garbage.wav,hello,,,\n"  # 6
        "ok.wav,,,,\n"  # 7
        "ok.wav,late,1.5,1.0,\n"  # 8
        "ok.wav,bad,x,,\n"  # 9
        "ok.wav,where,,,valid\n"  # 10
        "ok.wav,short\n"  # 11
        ",nothing,,,\n",  # 12
        encoding="utf-8",
    )
    with pytest.raises(PrepareError) as e:
        prepare(table, tmp_path / "out", "asr")
    expected = [
        f"{table}:3: duplicate id 'ok' (first at {table}:2)",
        f"{table}:5: audio file not found: {tmp_path / 'missing.wav'}",
        f"{table}:6: unreadable audio (Format not recognised.) ({tmp_path / 'garbage.wav'})",
        f"{table}:7: asr needs text: none given (give it as a 'text' column)",
        f"{table}:8: segment 1.5-2.5 s runs past the end of ok.wav (2.00 s)",
        f"{table}:9: offset must be a number of seconds, got 'x'",
        f"{table}:10: split 'valid' is not one of train, dev, test",
        f"{table}:11: 2 cells, but the header names 5 columns",
        f"{table}:12: empty 'path'",
    ]
    assert e.value.errors == expected
    assert str(e.value).startswith("9 bad row(s) or file(s), nothing written:\n  ")
    assert not (tmp_path / "out").exists()


def test_bad_files_of_a_folder_are_named(tmp_path):
    root = tmp_path / "mine"
    _wav(root / "a.wav")
    (root / "a.txt").write_text("   \n", encoding="utf-8")
    _wav(root / "b.wav")
    (root / "b.lab").write_bytes(b"\xff\xfe bad")
    _wav(root / "c.wav")
    with pytest.raises(PrepareError) as e:
        prepare(root, tmp_path / "out", "asr")
    assert e.value.errors[0] == f"{root / 'a.txt'}:1: empty transcript"
    assert e.value.errors[1].startswith(f"{root / 'b.lab'}:1: not UTF-8 text")
    assert (
        e.value.errors[2]
        == f"{root / 'c.wav'}: asr needs text: none given (give it as a sidecar c.txt or c.lab)"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no audio files"):
        prepare(tmp_path / "empty", tmp_path / "x", "asr")


def test_command_prints_counts_and_exits_with_the_errors(tmp_path, capsys):
    for i in range(3):
        _wav(tmp_path / "d" / f"{i}.wav")
        (tmp_path / "d" / f"{i}.txt").write_text("hello there", encoding="utf-8")
    prepare_command("folder", root=str(tmp_path / "d"), out=str(tmp_path / "out"), task="asr")
    assert capsys.readouterr().out.splitlines() == ["folder train: 1", "folder dev: 1", "folder test: 1"]
    with pytest.raises(SystemExit, match="--task T"):
        prepare_command("folder", root=str(tmp_path / "d"), out=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=r"(?s)prepare folder: 3 bad row\(s\).*ks needs label"):
        prepare_command("folder", root=str(tmp_path / "d"), out=str(tmp_path / "out"), task="ks")


# ---------------------------------------------------------------- long recordings as segments


def _meeting(tmp_path: Path) -> Path:
    """A 30 s two-speaker recording: each 10 s third has its own amplitude, so a read says where it was."""
    t = np.arange(10 * SR) / SR
    thirds = [a * np.sin(2 * np.pi * 300 * t) for a in (0.1, 0.2, 0.4)]
    sf.write(str(tmp_path / "meeting.wav"), np.concatenate(thirds).astype(np.float32), SR)
    (tmp_path / "meeting.rttm").write_text(
        "SPEAKER meeting 1 0.0 12.0 <NA> <NA> alice <NA> <NA>\n"
        "SPEAKER meeting 1 11.0 19.0 <NA> <NA> bob <NA> <NA>\n",
        encoding="utf-8",
    )
    return tmp_path / "meeting.wav"


def test_a_long_recording_becomes_segments_with_offsets_and_moved_turns(tmp_path):
    (tmp_path / "rec").mkdir()
    _meeting(tmp_path / "rec")
    counts = prepare(tmp_path / "rec", tmp_path / "out", "sd", segment_seconds=10.0)
    assert sum(counts.values()) == 3
    recs = {r.id: r for rs in _manifests(tmp_path / "out", "sd").values() for r in rs}
    assert sorted(recs) == ["meeting@0", "meeting@10", "meeting@20"]
    assert [(recs[k].offset, recs[k].duration) for k in sorted(recs)] == [
        (0.0, 10.0),
        (10.0, 10.0),
        (20.0, 10.0),
    ]
    assert recs["meeting@0"].segments == [["alice", 0.0, 10.0]]
    assert recs["meeting@10"].segments == [["alice", 0.0, 2.0], ["bob", 1.0, 10.0]]
    assert recs["meeting@20"].segments == [["bob", 0.0, 10.0]]
    with pytest.raises(PrepareError, match="asr utterances cannot be cut"):
        (tmp_path / "rec" / "meeting.txt").write_text("words", encoding="utf-8")
        prepare(tmp_path / "rec", tmp_path / "out2", "asr", segment_seconds=10.0)


def test_a_bad_rttm_line_is_named(tmp_path):
    _meeting(tmp_path)
    with open(tmp_path / "meeting.rttm", "a", encoding="utf-8") as f:
        f.write("SPEAKER meeting 1 zero 2.0 <NA> <NA> carol <NA> <NA>\nSPEAKER too short\n")
    with pytest.raises(PrepareError) as e:
        prepare(tmp_path, tmp_path / "out", "sd")
    assert e.value.errors == [
        f"{tmp_path / 'meeting.rttm'}:3: tbeg and tdur must be numbers, got 'zero' '2.0'"
    ]
    (tmp_path / "meeting.rttm").unlink()
    with pytest.raises(
        PrepareError, match=r"no speaker turns: meeting.rttm \(RTTM\) not found beside meeting.wav"
    ):
        prepare(tmp_path, tmp_path / "out", "sd")


def test_windows_keep_all_the_audio():
    from rewiring.corpus.folder import _windows

    assert _windows(0.0, 25.0, 10.0) == [(0.0, 10.0), (10.0, 10.0), (20.0, 5.0)]
    assert _windows(0.0, 23.0, 10.0) == [(0.0, 10.0), (10.0, 13.0)]  # a last 3 s joins the one before
    assert _windows(5.0, 4.0, 10.0) == [(5.0, 4.0)]


def _sd_records(tmp_path):
    _meeting(tmp_path)
    (tmp_path / "sd").mkdir()
    from rewiring.manifest import Record, write_manifest

    recs = [
        Record(
            id=f"m@{k * 10}",
            audio="../meeting.wav",
            duration=10.0,
            offset=10.0 * k,
            segments=[["a", 0.0, 5.0]],
        )
        for k in range(3)
    ]
    for split in ("train", "dev", "test"):
        write_manifest(tmp_path / "sd" / f"{split}.jsonl", recs)
    return recs


def test_diarization_reads_each_segment(tmp_path):
    from tasks import sd

    recs = _sd_records(tmp_path)
    dm = sd.SpeakerDiarizationData(root=str(tmp_path), crop_seconds=4.0)
    dm.records = {"train": recs, "dev": recs}
    for k, amplitude in enumerate((0.1, 0.2, 0.4)):
        item = dm.dataset("dev")[k]  # evaluation: the whole segment
        assert item.wav.shape[-1] == 10 * SR
        assert float(item.wav.abs().max()) == pytest.approx(amplitude, rel=1e-3)
        crop = dm.dataset("train")[k]  # training: a 4 s window inside the segment
        assert crop.wav.shape[-1] == 4 * SR
        assert float(crop.wav.abs().max()) == pytest.approx(amplitude, rel=1e-3)


def test_rewiring_pairs_read_each_segment(tmp_path):
    from rewiring.pairs import PairDataset

    recs = _sd_records(tmp_path)
    ds = PairDataset(tmp_path / "sd" / "train.jsonl", recs, "twin", None, 0.2, 0, None, "skip")
    for k, amplitude in enumerate((0.1, 0.2, 0.4)):
        item = ds[k]
        assert item["view1"].shape[-1] == 10 * SR
        assert float(item["view1"].abs().max()) == pytest.approx(amplitude, rel=1e-3)


# ---------------------------------------------------------------- the reason of a bad file reaches the caller


def test_datasets_pass_the_reason_of_a_bad_file_on(tmp_path):
    from rewiring.manifest import Record
    from rewiring.pairs import PairDataset
    from tasks.data import ManifestDataset

    _wav(tmp_path / "long.wav", seconds=2.4)
    recs = [
        Record(id="wrong", audio="long.wav", duration=0.1),  # a manifest that lies about the length
        Record(id="gone", audio="gone.wav", duration=1.0),
        Record(id="ok", audio="long.wav", duration=2.4),
    ]
    manifest = tmp_path / "m.jsonl"
    ds = ManifestDataset(manifest, recs, lambda r: 0, on_bad_audio="skip")
    items = [ds[i] for i in range(3)]
    assert [(it.code if isinstance(it, Skipped) else "ok") for it in items] == [
        "duration_mismatch",
        "not_found",
        "ok",
    ]
    pairs = PairDataset(manifest, recs, "twin", None, 0.2, 0, None, "skip")
    assert [(pairs[i].id, pairs[i].code) for i in range(2)] == [("wrong", "duration_mismatch"), ("gone", "not_found")]
    strict = ManifestDataset(manifest, recs, lambda r: 0, on_bad_audio="error")
    with pytest.raises(Exception, match="the manifest says 0.1 s, the file holds 2.40 s"):
        strict[0]
    assert torch.is_tensor(items[2].wav)
