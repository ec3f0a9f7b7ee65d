"""Manifests, the data contract: one JSONL line per utterance, typed, validated, and subsets of them.

After `prepare`, no code knows where a corpus came from; it only reads manifests. A low-resource
split is a deterministic subset (fraction or amount of audio, seed, stratum) whose ids are hashed,
so two runs on two machines can prove they trained on the same data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rewiring.files import write_text_atomic

__all__ = [
    "ManifestError",
    "Record",
    "audio_path",
    "ids_hash",
    "order_key",
    "parse_amount",
    "read_manifest",
    "select_subset",
    "write_manifest",
]

log = logging.getLogger(__name__)

_REQUIRED = ("id", "audio", "duration")
_STR_FIELDS = ("text", "phones", "speaker", "label")


class ManifestError(ValueError):
    """An invalid manifest line: `<path>:<lineno>: <reason>`, so it can be fixed in an editor."""

    def __init__(self, path: str | Path, lineno: int, reason: str) -> None:
        self.path = str(path)
        self.lineno = lineno
        self.reason = reason
        super().__init__(f"{self.path}:{lineno}: {reason}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


@dataclass
class Record:
    """One utterance. Only id, audio and duration are required; a task reads the fields it needs.

    audio: path relative to the manifest file's folder (see `audio_path`).
    duration: seconds of audio; with `offset`, the length of the segment.
    offset: where the utterance starts in the file (seconds); None is the whole file. A long
        recording is used as several records without cutting it into files.
    labels: several named labels (ic: action/object/location; sf: intent).
    segments: [speaker, start, end] in seconds (sd speaker activity, RTTM-like).
    slots: [slot_type, value] in order of appearance in the text (sf).
    meta: anything else (JSON object).
    Construction validates, so an invalid record fails where it is made, not where it is read.
    """

    id: str
    audio: str
    duration: float
    offset: float | None = None
    text: str | None = None
    phones: str | None = None
    speaker: str | None = None
    label: str | None = None
    labels: dict[str, str] | None = None
    segments: list[list] | None = None
    slots: list[list[str]] | None = None
    meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with the reason; normalises tuples to lists and int seconds to float."""
        for name in ("id", "audio"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ValueError(f"field {name!r} must be a string, got {_type_name(v)}")
            if not v.strip():
                raise ValueError(f"field {name!r} is empty")
        if not _is_number(self.duration):
            raise ValueError(f"field 'duration' must be a number, got {_type_name(self.duration)}")
        if not math.isfinite(self.duration):
            raise ValueError(f"field 'duration' must be finite, got {self.duration}")
        if self.duration < 0:
            raise ValueError(f"negative duration {self.duration}")
        self.duration = float(self.duration)
        if self.offset is not None:
            if not _is_number(self.offset):
                raise ValueError(f"field 'offset' must be a number or null, got {_type_name(self.offset)}")
            if not math.isfinite(self.offset) or self.offset < 0:
                raise ValueError(f"field 'offset' must be a finite number >= 0 seconds, got {self.offset}")
            if self.duration <= 0:
                raise ValueError(f"a segment (offset {self.offset:g} s) needs a duration > 0, got {self.duration:g}")
            self.offset = float(self.offset)
        for name in _STR_FIELDS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"field {name!r} must be a string or null, got {_type_name(v)}")
        if self.labels is not None:
            if not isinstance(self.labels, dict):
                raise ValueError(
                    f"field 'labels' must be an object of strings, got {_type_name(self.labels)}"
                )
            for k, v in self.labels.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise ValueError(
                        f"field 'labels' must map strings to strings, got {k!r}: {_type_name(v)}"
                    )
        if self.segments is not None:
            self.segments = self._check_segments(self.segments)
        if self.slots is not None:
            self.slots = self._check_slots(self.slots)
        if self.meta is not None and not isinstance(self.meta, dict):
            raise ValueError(f"field 'meta' must be an object, got {_type_name(self.meta)}")

    @staticmethod
    def _check_segments(segments: Any) -> list[list]:
        if not isinstance(segments, (list, tuple)):
            raise ValueError(
                f"field 'segments' must be a list of [speaker, start, end], got {_type_name(segments)}"
            )
        out = []
        for i, seg in enumerate(segments):
            if not isinstance(seg, (list, tuple)) or len(seg) != 3:
                raise ValueError(f"segments[{i}] must be [speaker, start, end], got {seg!r}")
            spk, start, end = seg
            if not isinstance(spk, str):
                raise ValueError(f"segments[{i}] speaker must be a string, got {_type_name(spk)}")
            if not (_is_number(start) and _is_number(end)) or not (
                math.isfinite(start) and math.isfinite(end)
            ):
                raise ValueError(f"segments[{i}] start and end must be finite numbers, got {seg!r}")
            if start < 0 or end < start:
                raise ValueError(f"segments[{i}] needs 0 <= start <= end, got start={start} end={end}")
            out.append([spk, float(start), float(end)])
        return out

    @staticmethod
    def _check_slots(slots: Any) -> list[list[str]]:
        if not isinstance(slots, (list, tuple)):
            raise ValueError(f"field 'slots' must be a list of [slot_type, value], got {_type_name(slots)}")
        out = []
        for i, slot in enumerate(slots):
            if (
                not isinstance(slot, (list, tuple))
                or len(slot) != 2
                or not all(isinstance(s, str) for s in slot)
            ):
                raise ValueError(f"slots[{i}] must be [slot_type, value] strings, got {slot!r}")
            out.append([slot[0], slot[1]])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON object in field order, without the fields that are None."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: Any) -> Record:
        """Validate a parsed JSON line; ValueError names what is wrong (unknown, missing, mistyped)."""
        if not isinstance(d, dict):
            raise ValueError(f"line is not a JSON object (got {_type_name(d)})")
        unknown = sorted(set(d) - _FIELD_NAMES)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"missing required field(s) {', '.join(map(repr, missing))}")
        return cls(**d)


_FIELD_NAMES = frozenset(f.name for f in fields(Record))


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


def read_manifest(path: str | Path) -> list[Record]:
    """Read and validate a JSONL manifest; the first bad line raises `ManifestError` with its number.

    Blank lines are ignored (they still count for line numbers).
    """
    path = Path(path)
    records: list[Record] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                raise ManifestError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:
                raise ManifestError(path, lineno, f"invalid JSON: {e}") from None
            try:
                rec = Record.from_dict(obj)
            except (ValueError, TypeError) as e:
                raise ManifestError(path, lineno, str(e)) from None
            if rec.id in first_line:
                raise ManifestError(
                    path, lineno, f"duplicate id {rec.id!r} (first on line {first_line[rec.id]})"
                )
            first_line[rec.id] = lineno
            records.append(rec)
    return records


def write_manifest(path: str | Path, records: Iterable[Record]) -> None:
    """Write records as JSONL atomically (temporary file + os.replace): a killed run leaves the old file.

    Records are validated again (they may have been changed since construction); `ManifestError`
    names the line the bad record would have had.
    """
    path = Path(path)
    lines: list[str] = []
    seen: dict[str, int] = {}
    for lineno, rec in enumerate(records, start=1):
        if not isinstance(rec, Record):
            raise ManifestError(path, lineno, f"not a Record: {_type_name(rec)}")
        try:
            rec.validate()
            line = json.dumps(rec.to_dict(), ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError) as e:
            raise ManifestError(path, lineno, str(e)) from None
        if rec.id in seen:
            raise ManifestError(path, lineno, f"duplicate id {rec.id!r} (first on line {seen[rec.id]})")
        seen[rec.id] = lineno
        lines.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def audio_path(manifest_path: str | Path, record: Record) -> Path:
    """The audio file of `record`: its path is relative to the manifest's folder (absolute paths pass)."""
    return Path(manifest_path).parent / record.audio


_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_amount(s: str | float) -> float:
    """An amount of audio in seconds: "10min", "1h", "10h", "90s", "1.5h", or a plain number of seconds."""
    if _is_number(s):
        seconds = float(s)
    elif isinstance(s, str):
        m = _AMOUNT.match(s)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"cannot parse amount of audio {s!r}: use a number and a unit s/min/h, like '90s', '10min', '1.5h'"
            )
        seconds = float(m.group(1)) * _UNITS[unit]
    else:
        raise ValueError(f"amount of audio must be a string like '10min' or seconds, got {_type_name(s)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"amount of audio must be positive and finite, got {s!r}")
    return seconds


def order_key(seed: int, id_: str) -> str:
    """The seeded rank of an id (sorting by it draws a subset): sha256(f"{seed}:{id}"), not random or
    hash(), so it is the same on every machine, Python version and PYTHONHASHSEED."""
    return hashlib.sha256(f"{seed}:{id_}".encode()).hexdigest()


def _stratum(record: Record, stratify: str) -> str:
    if stratify.startswith("labels."):
        key = stratify[len("labels.") :]
        value = (record.labels or {}).get(key)
    else:
        value = getattr(record, stratify)
    if value is None:
        raise ValueError(f"cannot stratify by {stratify!r}: record {record.id!r} has no value for it")
    return value


def select_subset(
    records: list[Record],
    *,
    fraction: float | None = None,
    amount: str | float | None = None,
    seed: int = 0,
    stratify: str | None = None,
) -> list[Record]:
    """A deterministic low-resource subset, in the original manifest order.

    Within each stratum (all records, or grouped by `stratify`: a field such as "label" or
    "speaker", or "labels.<key>") records are ranked by sha256(f"{seed}:{id}").
    `fraction`: each stratum keeps round(fraction * size) records (half up), at least 1.
    `amount` ("10min", "1h", seconds): each stratum gets a share of the target seconds in
    proportion to its total duration, and takes records in rank order until the share is reached
    (so it may overshoot by less than one record), at least 1. The same inputs give the same ids anywhere.
    """
    if (fraction is None) == (amount is None):
        raise ValueError("give exactly one of fraction or amount for a subset")
    if fraction is not None:
        if not _is_number(fraction) or not (0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    target = parse_amount(amount) if amount is not None else None
    if stratify is not None and not stratify.startswith("labels.") and stratify not in _STR_FIELDS:
        raise ValueError(
            f"stratify must be one of {', '.join(_STR_FIELDS)} or 'labels.<key>', got {stratify!r}"
        )
    if stratify == "labels.":
        raise ValueError("stratify 'labels.<key>' needs a key, like 'labels.action'")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("records have duplicate ids; a subset of them would not be reproducible")
    if not records:
        return []

    strata: dict[str, list[Record]] = {}
    for r in records:
        strata.setdefault(_stratum(r, stratify) if stratify else "", []).append(r)
    total = sum(r.duration for r in records)

    chosen: set[str] = set()
    for key in sorted(strata):
        ranked = sorted(strata[key], key=lambda r: order_key(seed, r.id))
        if fraction is not None:
            n = max(1, min(len(ranked), math.floor(fraction * len(ranked) + 0.5)))
            take = ranked[:n]
        else:
            stratum_total = sum(r.duration for r in ranked)
            share = target * stratum_total / total if total > 0 else 0.0
            take, got = [], 0.0
            for r in ranked:
                if take and got >= share:
                    break
                take.append(r)
                got += r.duration
        chosen.update(r.id for r in take)

    subset = [r for r in records if r.id in chosen]
    log.info(
        "subset: %d of %d records, %.1f of %.1f s, %d strata, seed %d, ids_hash %s",
        len(subset), len(records), sum(r.duration for r in subset), total, len(strata), seed, ids_hash(subset),
    )  # fmt: skip
    return subset


def ids_hash(records: Iterable[Record | str]) -> str:
    """sha256 over the sorted ids (hex, first 16): logged so two runs can prove they saw the same data."""
    ids = sorted(r if isinstance(r, str) else r.id for r in records)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
