"""RTTM speaker turns, the diarization format of LibriMix/s3prl and of your own `.rttm` sidecars: one reader."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["RTTMError", "read_rttm"]

_SHAPE = "'SPEAKER <rec> <chan> <tbeg> <tdur> <NA> <NA> <speaker> <NA> [<NA>]'"


class RTTMError(ValueError):
    """A bad RTTM line; the message names `path:line`."""


def read_rttm(path: str | Path) -> dict[str, list[list]]:
    """Turns [[speaker, start, end], ...] per recording id, sorted by time; blank lines and lines
    starting with # or ; are skipped; a missing file is a FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing rttm file")
    turns: dict[str, list[list]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith(("#", ";")):
            continue
        if len(fields) not in (9, 10) or fields[0] != "SPEAKER":
            raise RTTMError(f"{path}:{lineno}: expected an RTTM SPEAKER line {_SHAPE}, got {line.strip()[:80]!r}")
        try:
            start, dur = float(fields[3]), float(fields[4])
        except ValueError:
            raise RTTMError(f"{path}:{lineno}: tbeg and tdur must be numbers, got {fields[3]!r} {fields[4]!r}") from None
        if not (math.isfinite(start) and math.isfinite(dur)) or start < 0 or dur < 0:
            raise RTTMError(f"{path}:{lineno}: tbeg and tdur must be finite and >= 0, got {fields[3]} {fields[4]}")
        turns.setdefault(fields[1], []).append([fields[7], round(start, 4), round(start + dur, 4)])
    return {rec: sorted(ts, key=lambda t: (t[1], t[2], t[0])) for rec, ts in turns.items()}
