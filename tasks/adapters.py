"""Helpers the real-corpus `prepare(root, out)` adapters of the task files share."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["relative_audio", "require_file"]


def require_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a file, else FileNotFoundError naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def relative_audio(path: str | Path, manifest_dir: str | Path) -> str:
    """The manifest's ``audio`` field: the file's path relative to the manifest's folder."""
    return Path(os.path.relpath(Path(path).absolute(), Path(manifest_dir).absolute())).as_posix()
