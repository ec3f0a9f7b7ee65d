"""CTranslate2's `model.bin`, read with numpy: no CTranslate2 install needed.

The layout (binary version 6) is CTranslate2's `ModelSpec._serialize`: a u32 version, the spec name, a
u32 revision, a u32 variable count, then per variable its name, u8 rank, u32 dims, u8 dtype code, u32
byte count and raw bytes; last an alias table (name -> name). Strings are a u16 length (the NUL
included), the bytes and a NUL.

Every error is a `Ct2Error` that names the file, then the reason (missing, truncated, foreign, corrupt).
`rewiring.whisper_ct2` maps a parsed Whisper model onto transformers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CT2_BINARY_VERSION", "Ct2Error", "Ct2Model", "Ct2UnsupportedError", "read_ct2", "read_json"]

CT2_BINARY_VERSION = 6

# CTranslate2's DataType enum (include/ctranslate2/types.h); numpy has no bfloat16 (read as uint16).
_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),
}


class Ct2Error(RuntimeError):
    """A CTranslate2 model that cannot be read: missing, truncated or not a CTranslate2 file.
    The message names the file, then the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class Ct2UnsupportedError(Ct2Error):
    """A well-formed CTranslate2 model that the converter (`rewiring.whisper_ct2`) does not map:
    another spec (not Whisper), quantised weights, or a Whisper layout it does not know."""


@dataclass(frozen=True)
class Ct2Model:
    """The parsed `model.bin`: variables by name (aliases resolved to the same array)."""

    path: Path
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str]


class _Reader:
    """Sequential little-endian reads over the file's bytes; running past the end means the file
    is truncated, which is the one thing a short read can mean here."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        """Claim `n` bytes for `what`; returns their offset."""
        start, end = self.pos, self.pos + n
        if end > len(self.data):
            raise Ct2Error(
                self.path,
                f"truncated: {what} needs {n} bytes at offset {start}, only {len(self.data) - start} left "
                f"(file size {len(self.data)})",
            )
        self.pos = end
        return start

    def unpack(self, fmt: str, what: str) -> int:
        fmt = "<" + fmt
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"the length of {what}")
        raw = self.data[self.take(n, what) : self.pos]
        if n == 0 or raw[-1] != 0:
            raise Ct2Error(
                self.path, f"not a CTranslate2 model: {what} at offset {self.pos - n} is not a string"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise Ct2Error(self.path, f"not a CTranslate2 model: {what} is not UTF-8 ({e})") from e


def read_ct2(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 `model.bin` (binary version 6) into numpy arrays.

    float16 and float32 stay as stored; bfloat16 (which numpy lacks) becomes float32 exactly.
    Raises `Ct2Error` for a missing, truncated or foreign file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Ct2Error(path, f"cannot read the model ({e.strerror or e})") from e
    r = _Reader(path, data)
    version = r.unpack("I", "the binary version")
    if version != CT2_BINARY_VERSION:
        raise Ct2Error(
            path,
            f"not a CTranslate2 model this reader knows: binary version {version}, expected "
            f"{CT2_BINARY_VERSION} (first bytes {data[:8].hex()})",
        )
    spec = r.string("the spec name")
    revision = r.unpack("I", "the spec revision")
    count = r.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for i in range(count):
        name = r.string(f"the name of variable {i}")
        rank = r.unpack("B", f"the rank of {name}")
        shape = tuple(r.unpack("I", f"dimension {d} of {name}") for d in range(rank))
        code = r.unpack("B", f"the dtype of {name}")
        if code not in _DTYPES:
            raise Ct2Error(path, f"not a CTranslate2 model this reader knows: {name} has dtype code {code}")
        dtype_name, dtype = _DTYPES[code]
        nbytes = r.unpack("I", f"the byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise Ct2Error(
                path, f"corrupt: {name} {dtype_name}{list(shape)} should hold {expected} bytes, says {nbytes}"
            )
        array = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=r.take(nbytes, name))
        array = array.reshape(shape)
        if dtype_name == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
        dtypes[name] = dtype_name
    aliases: dict[str, str] = {}
    for i in range(r.unpack("I", "the alias count")):
        alias = r.string(f"the name of alias {i}")
        target = r.string(f"the target of alias {alias}")
        if target not in variables:
            raise Ct2Error(path, f"corrupt: alias {alias} points at {target}, which is not a variable")
        aliases[alias] = target
        variables[alias] = variables[target]
        dtypes[alias] = dtypes[target]
    if r.pos != len(data):
        raise Ct2Error(path, f"not a CTranslate2 model: {len(data) - r.pos} bytes after the alias table")
    return Ct2Model(path, spec, revision, variables, dtypes, aliases)


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a CTranslate2 folder (`what` says which, for the error)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Ct2Error(path, f"missing: a CTranslate2 Whisper folder needs its {what}") from None
    except (OSError, ValueError) as e:
        raise Ct2Error(path, f"unreadable {what} ({e})") from e
