"""Bring your own data: a folder of audio with sidecar transcripts, or a CSV/TSV table, to manifests.

`python -m rewiring prepare folder --root ROOT --task T` writes `OUT/T/{train,dev,test}.jsonl`
(`unlabelled`: `train`, `heldout`), the layout every stage reads, so nothing after it knows the
data came from here.

ROOT a folder: every audio file under it (wav, flac, ogg, mp3, ...) is an utterance. Its
transcript is the sidecar `<name>.txt` or `<name>.lab` beside it; for sd, its speaker turns are
the sidecar `<name>.rttm`. A ks file's label is the folder holding it (ROOT/yes/0a7c.wav), a sid
file's speaker the first folder under ROOT (ROOT/id10001/1zcIwhmdeo4/00001.wav). Folders
ROOT/train, ROOT/dev, ROOT/test (unlabelled: train, heldout) are the splits, if there are any.

ROOT a .csv or .tsv file: one utterance a row, under a header naming the columns: `path` (or
audio, file; relative to the table's folder), and as the task needs: `text`, `speaker`, `label`,
`action`/`object`/`location` (ic), `intent` (sf), `slots` (sf, JSON [["type", "value"], ...]),
`split`, `id`, and `offset`/`duration` (seconds) for a segment of a long recording. Any other
column is kept in `meta`.

Without split folders or a split column, each stratum (the ks label, the sid speaker, the ic
action, the sf intent) is split 80/10/10 by sha256 of the seed and the id: the same on any machine.
`segment_seconds` turns a longer recording (sid, sd, unlabelled) into records of about that length
with an `offset`, so a long recording is used without cutting files; sd turns move with them.

Every bad row or file is reported, all at once, as `path:line: reason` (`path: reason` for a file
of a folder), and nothing is written until there are none.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewiring.audio import AudioError, duration_seconds
from rewiring.manifest import Record, write_manifest
from rewiring.rttm import RTTMError, read_rttm

__all__ = ["AUDIO_EXTENSIONS", "PrepareError", "TASKS", "prepare"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf")
# What each task needs of a record ("labels.x": labels["x"]); unlabelled needs only audio.
REQUIRED: dict[str, tuple[str, ...]] = {
    "asr": ("text",),
    "ks": ("label",),
    "ic": ("labels.action", "labels.object", "labels.location"),
    "sid": ("speaker",),
    "sd": ("segments",),
    "sf": ("text", "labels.intent"),
    "unlabelled": (),
}
TASKS = tuple(REQUIRED)
# The field each task's hashed split is stratified by, so that every class is in train.
STRATUM = {"ks": "label", "sid": "speaker", "ic": "labels.action", "sf": "labels.intent"}
# Tasks whose utterances may be cut into windows (no transcript or per-utterance label to break).
CUTTABLE = ("sid", "sd", "unlabelled")
DEV_SHARE = TEST_SHARE = 0.1
MAX_LISTED = 25

_PATH_COLUMNS = ("path", "audio", "file", "filename", "wav")
_LABEL_COLUMNS = ("action", "object", "location", "intent")
_KNOWN_COLUMNS = {*_PATH_COLUMNS, *_LABEL_COLUMNS, "id", "text", "speaker", "label", "split", "offset", "duration", "slots"}  # fmt: skip
# A manifest segment may end this much past the file (rounding), as rewiring.audio allows.
_END_TOLERANCE = 0.1


class PrepareError(ValueError):
    """Every bad row or file of the input, each as `path:line: reason` (or `path: reason`)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        super().__init__(f"{len(errors)} bad row(s) or file(s), nothing written:\n  {listed}{more}")


class _Located(ValueError):
    """An error that names its own `path:line` (a sidecar's), so it is reported as it is."""


@dataclass
class _Row:
    """One utterance as found, before it is checked; `where` names it in errors."""

    where: str
    order: int  # position in the input, so errors come out in the order of the file
    audio: Path
    id: str
    split: str | None = None
    text: str | None = None
    speaker: str | None = None
    label: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    slots: list | None = None
    offset: float | None = None
    duration: float | None = None
    meta: dict[str, str] = field(default_factory=dict)


def _splits(task: str) -> tuple[str, ...]:
    return ("train", "heldout") if task == "unlabelled" else ("train", "dev", "test")


# ---------------------------------------------------------------- reading the input


def _sidecar_text(audio: Path) -> tuple[str | None, str | None]:
    """(text, error) from `<name>.txt` or `<name>.lab` beside `audio`; (None, None) when there is none."""
    for ext in (".txt", ".lab"):
        side = audio.with_suffix(ext)
        if side.is_file():
            try:
                text = " ".join(side.read_text(encoding="utf-8").split())
            except UnicodeDecodeError as e:
                return None, f"{side}:1: not UTF-8 text ({e.reason} at byte {e.start})"
            if not text:
                return None, f"{side}:1: empty transcript"
            return text, None
    return None, None


def _folder_rows(root: Path, task: str) -> tuple[list[_Row], list[tuple[int, str]]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise PrepareError([f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) under it"])
    split_dirs = [s for s in _splits(task) if (root / s).is_dir()]
    rows: list[_Row] = []
    errors: list[tuple[int, str]] = []
    for order, f in enumerate(files):
        rel = f.relative_to(root)
        uid = rel.with_suffix("").as_posix()  # unique across the split folders too
        split = None
        if split_dirs:
            if rel.parts[0] not in split_dirs:
                errors.append((order, f"{f}: outside the split folders {', '.join(split_dirs)} of {root}"))
                continue
            split, rel = rel.parts[0], Path(*rel.parts[1:])
        folders = rel.parts[:-1]
        text, error = _sidecar_text(f)
        if error:
            errors.append((order, error))
            continue
        row = _Row(where=str(f), order=order, audio=f, id=uid, split=split, text=text)
        if task == "ks" and folders:
            row.label = folders[-1]
        if task == "sid" and folders:
            row.speaker = folders[0]
        rows.append(row)
    return rows, errors


def _number(value: str, name: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0 seconds, got {value!r}")
    return x


def _default_id(path: str, offset: str | None) -> str:
    """The audio path without its extension; a segment adds its offset, so two of one file differ."""
    stem = Path(path).with_suffix("").as_posix()
    return stem if offset is None else f"{stem}@{offset}"


def _table_rows(table: Path) -> tuple[list[_Row], list[tuple[int, str]]]:
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with open(table, encoding="utf-8", newline="") as f:
        # TSV cells are taken as they are, quotes and all (as Common Voice writes them); CSV quotes.
        tsv = delimiter == "\t"
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise PrepareError([f"{table}:1: empty table (a header row naming the columns comes first)"])
        names = [h.strip().lower() for h in header]
        paths = [c for c in _PATH_COLUMNS if c in names]
        if not paths:
            raise PrepareError(
                [f"{table}:1: no audio column: name one of {', '.join(_PATH_COLUMNS)} in the header"]
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PrepareError([f"{table}:1: column(s) named twice: {', '.join(dupes)}"])
        rows: list[_Row] = []
        errors: list[tuple[int, str]] = []
        end = reader.line_num  # csv counts physical lines: a quoted cell may span several
        for cells in reader:
            lineno, end = end + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            where = f"{table}:{lineno}"
            if len(cells) != len(names):
                errors.append(
                    (lineno, f"{where}: {len(cells)} cells, but the header names {len(names)} columns")
                )
                continue
            cell = {n: c.strip() for n, c in zip(names, cells, strict=True)}
            value = {n: v for n, v in cell.items() if v}
            if not value.get(paths[0]):
                errors.append((lineno, f"{where}: empty {paths[0]!r}"))
                continue
            audio = Path(value[paths[0]])
            audio = audio if audio.is_absolute() else table.parent / audio
            row = _Row(
                where=where,
                order=lineno,
                audio=audio,
                id=value.get("id") or _default_id(value[paths[0]], value.get("offset")),
                split=value.get("split"),
                text=" ".join(value["text"].split()) if "text" in value else None,
                speaker=value.get("speaker"),
                label=value.get("label"),
                labels={k: value[k] for k in _LABEL_COLUMNS if k in value},
                meta={k: v for k, v in value.items() if k not in _KNOWN_COLUMNS},
            )
            try:
                if "offset" in value:
                    row.offset = _number(value["offset"], "offset")
                if "duration" in value:
                    row.duration = _number(value["duration"], "duration")
                    if row.duration == 0:
                        raise ValueError("duration must be > 0 seconds")
                if "slots" in value:
                    row.slots = json.loads(value["slots"])
            except json.JSONDecodeError as e:
                errors.append((lineno, f'{where}: slots must be JSON like [["type", "value"]]: {e.msg}'))
                continue
            except ValueError as e:
                errors.append((lineno, f"{where}: {e}"))
                continue
            rows.append(row)
    if not rows and not errors:
        raise PrepareError([f"{table}: no rows under the header"])
    return rows, errors


def _rttm(path: Path) -> list[list]:
    """Speaker turns [[speaker, start, end], ...] of a sidecar RTTM (every recording id in it); a bad
    line is `_Located` (it names `path:line`)."""
    try:
        return sorted((t for ts in read_rttm(path).values() for t in ts), key=lambda t: (t[1], t[2], t[0]))
    except RTTMError as e:
        raise _Located(str(e)) from None


# ---------------------------------------------------------------- checking and cutting


def _missing(rec_fields: dict[str, Any], task: str) -> list[str]:
    out = []
    for need in REQUIRED[task]:
        value = (
            rec_fields.get("labels", {}).get(need[7:]) if need.startswith("labels.") else rec_fields.get(need)
        )
        if not value and value != []:
            out.append(need[7:] if need.startswith("labels.") else need)
    return out


def _windows(start: float, length: float, seconds: float | None) -> list[tuple[float, float]]:
    """(offset, duration) pieces of about `seconds`; a last piece under half of it joins the one before."""
    if seconds is None or length <= seconds:
        return [(start, length)]
    n = max(1, int(length // seconds))
    if length - n * seconds >= seconds / 2:
        n += 1
    edges = [start + k * seconds for k in range(n)] + [start + length]
    return [(round(a, 4), round(b - a, 4)) for a, b in zip(edges, edges[1:], strict=False)]


def _moved(turns: list[list], offset: float, length: float) -> list[list]:
    """Turns clipped to [offset, offset + length), in seconds from the window's start."""
    out = []
    for spk, s, e in turns:
        a, b = max(s - offset, 0.0), min(e - offset, length)
        if b > a:
            out.append([spk, round(a, 4), round(b, 4)])
    return out


def _records(row: _Row, task: str, manifest_dir: Path, segment_seconds: float | None) -> list[Record]:
    """The records of one row; ValueError (or AudioError) with the reason when it cannot be used."""
    if not row.audio.is_file():
        raise ValueError(f"audio file not found: {row.audio}")
    file_seconds = duration_seconds(row.audio)
    start = row.offset or 0.0
    if row.duration is not None:
        length = row.duration
    else:
        length = file_seconds - start
        if length <= 0:
            raise ValueError(f"offset {start:g} s is past the end of {row.audio.name} ({file_seconds:.2f} s)")
    if start + length > file_seconds + _END_TOLERANCE:
        raise ValueError(
            f"segment {start:g}-{start + length:g} s runs past the end of {row.audio.name} ({file_seconds:.2f} s)"
        )
    whole = row.offset is None and row.duration is None
    turns = None
    if task == "sd":
        side = row.audio.with_suffix(".rttm")
        if not side.is_file():
            raise ValueError(f"no speaker turns: {side.name} (RTTM) not found beside {row.audio.name}")
        turns = _rttm(side)
    fields: dict[str, Any] = {
        "text": row.text,
        "speaker": row.speaker,
        "label": row.label,
        "labels": row.labels,
    }
    if turns is not None:
        fields["segments"] = turns
    missing = _missing(fields, task)
    if missing:
        if row.where != str(row.audio):
            how = " and ".join(f"a {m!r} column" for m in missing)
        elif "text" in missing:
            how = f"a sidecar {row.audio.stem}.txt or {row.audio.stem}.lab"
        else:
            how = "the name of the folder it is in" if task == "ks" else "the first folder under the root"
        raise ValueError(f"{task} needs {', '.join(missing)}: none given (give it as {how})")
    if segment_seconds is not None and task not in CUTTABLE and length > segment_seconds:
        raise ValueError(f"{task} utterances cannot be cut into windows (only {', '.join(CUTTABLE)} can)")
    audio = Path(os.path.relpath(row.audio.absolute(), manifest_dir.absolute())).as_posix()
    pieces = _windows(start, length, segment_seconds)
    out = []
    for offset, seconds in pieces:
        cut = len(pieces) > 1
        out.append(
            Record(
                id=f"{row.id}@{offset:g}" if cut else row.id,
                audio=audio,
                duration=round(seconds, 4),
                offset=None if whole and not cut else offset,
                text=row.text if task != "sd" else None,
                speaker=row.speaker if task in ("sid", "asr", "unlabelled") else None,
                label=row.label if task == "ks" else None,
                labels=dict(row.labels) or None,
                segments=None if turns is None else _moved(turns, offset, seconds),
                slots=row.slots,
                meta=row.meta or None,
            )
        )
    return out


def _stratum(rec: Record, task: str) -> str:
    key = STRATUM.get(task)
    if key is None:
        return ""
    return (rec.labels or {}).get(key[7:], "") if key.startswith("labels.") else getattr(rec, key) or ""


def _assign(records: list[Record], task: str, seed: int) -> dict[str, list[Record]]:
    """80/10/10 (unlabelled: 90/10 train/heldout) per stratum, ranked by sha256(seed:id); a stratum
    of fewer than three records stays in train, so that every class can be learnt."""
    names = _splits(task)
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(_stratum(r, task), []).append(r)
    chosen: dict[str, str] = {}
    for key in sorted(groups):
        ranked = sorted(groups[key], key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).hexdigest())
        n = len(ranked)
        n_test = 0 if n < 3 else max(1, round(TEST_SHARE * n))
        n_dev = 0 if n < 3 or task == "unlabelled" else max(1, round(DEV_SHARE * n))
        for i, r in enumerate(ranked):
            chosen[r.id] = names[-1] if i < n_test else ("dev" if i < n_test + n_dev else "train")
    return {s: [r for r in records if chosen[r.id] == s] for s in names}


def prepare(
    root: str | Path, out: str | Path, task: str, segment_seconds: float | None = None, seed: int = 0
) -> dict[str, int]:
    """Write `out/<task>/<split>.jsonl` from a folder of audio with sidecars, or from a CSV/TSV table.

    Returns the number of records per split. `PrepareError` lists every bad row or file (nothing is
    written then); see the module docstring for the layouts read.
    """
    if task not in REQUIRED:
        raise PrepareError([f"--task must be one of {', '.join(TASKS)}, got {task!r}"])
    if segment_seconds is not None and not segment_seconds > 0:
        raise PrepareError([f"--segment_seconds must be > 0, got {segment_seconds}"])
    root = Path(root)
    if root.is_dir():
        if task in ("ic", "sf"):
            raise PrepareError(
                [f"{root}: {task} needs labels a folder cannot give; use a CSV/TSV table (see README)"]
            )
        rows, errors = _folder_rows(root, task)
    elif root.is_file() and root.suffix.lower() in (".csv", ".tsv"):
        rows, errors = _table_rows(root)
    else:
        raise PrepareError([f"{root}: not found, or neither a folder nor a .csv/.tsv table"])
    manifest_dir = Path(out) / task
    names = _splits(task)
    records: list[Record] = []
    split_of: dict[str, str | None] = {}
    first: dict[str, str] = {}
    for row in rows:
        if row.split is not None and row.split not in names:
            errors.append((row.order, f"{row.where}: split {row.split!r} is not one of {', '.join(names)}"))
            continue
        try:
            recs = _records(row, task, manifest_dir, segment_seconds)
        except AudioError as e:
            errors.append(
                (row.order, f"{row.where}: {e.reason} ({e.path})" if row.where != e.path else f"{e}")
            )
            continue
        except _Located as e:
            errors.append((row.order, str(e)))
            continue
        except ValueError as e:
            errors.append((row.order, f"{row.where}: {e}"))
            continue
        for r in recs:
            if r.id in first:
                errors.append((row.order, f"{row.where}: duplicate id {r.id!r} (first at {first[r.id]})"))
                continue
            first[r.id] = row.where
            split_of[r.id] = row.split
            records.append(r)
    if errors:
        raise PrepareError([message for _, message in sorted(errors, key=lambda e: e[0])])
    given = [r for r in records if split_of[r.id] is not None]
    if given and len(given) != len(records):
        raise PrepareError(
            [
                f"{root}: a split is given for {len(given)} of {len(records)} utterances: give it for all or none"
            ]
        )
    if given:
        by_split = {s: [r for r in records if split_of[r.id] == s] for s in names}
    else:
        by_split = _assign(records, task, seed)
    for split, recs in by_split.items():
        write_manifest(manifest_dir / f"{split}.jsonl", recs)
    return {split: len(recs) for split, recs in by_split.items()}
