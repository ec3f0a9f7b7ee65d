"""The frozen-feature cache: a frozen encoder's hidden states per utterance, computed once, read from disk.

Under the SUPERB protocol the encoder is frozen and runs in eval mode, without masks or dropout, so the
hidden states of an utterance are a pure function of the encoder and the audio. A sweep's splits, seeds
and learning rates can then all read the same entries instead of running the encoder at every step.

On disk (``root`` is cache/features by default)::

    root/<feature_key>/<dtype>/encoder.json             what made these entries (for people)
    root/<feature_key>/<dtype>/<k[:2]>/<k>.safetensors  one utterance: "hidden_states" [L, F, D]

- ``feature_key`` is `SpeechEncoder.feature_key()`: the weights' fingerprint (the one the SUPERB
  checkpoints use), the family, the input normalisation and the front end. An encoder with other
  weights or settings has another folder, so it can never read another encoder's features; each entry
  also carries the key in its metadata, checked on every read.
- ``k`` is `audio_key`: a hash of the audio file's bytes, of the record's segment when it is one
  (offset and duration), and of how it is decoded (16 kHz, this format's version). A changed file
  gets a new entry; the same bytes under two names share one. Entries hold whole utterances (or
  segments): a training crop is cut from the cached frames when read.
- An entry holds all L = num_layers + 1 hidden states (what SUPERB's weighted sum needs) of the F real
  frames, fp16 by default, in a safetensors file whose metadata has the format, the keys, the
  utterance's samples and a CRC32 of the tensor bytes.

Safe to share: every entry is written through `rewiring.files.atomic_file` (a temporary file renamed
over the entry), so a killed fill leaves whole entries or none and readers never see half of one; the
next fill makes only what is missing. A fill holds an exclusive `fcntl.flock` on its set of
utterances, so a second job with the same set (two sweep runs of one task at once) waits, then finds
the entries made; different sets fill side by side, and two writers of one entry each rename a whole
file. An entry that fails its check (truncated, wrong shape, dtype, keys or CRC) is removed and made
again by the next fill.

`estimate` gives the size before anything is written (layers x dim x frames x bytes, per entry rounded
up to the file system's blocks); the fill (`rewiring.feature_fill.fill`) refuses nothing itself, the
callers compare the estimate with their cap and the free disk (`room`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from torch import Tensor

from rewiring.audio import SAMPLE_RATE, Reason
from rewiring.files import atomic_file, write_json_atomic

__all__ = [
    "DTYPES",
    "FORMAT",
    "Entry",
    "FeatureCacheError",
    "FeatureDtype",
    "FeatureStore",
    "Room",
    "Utterance",
    "audio_key",
    "file_hash",
    "estimate",
    "room",
    "source_of",
    "unreadable",
    "utterance",
]

# Bump when the entry layout or the audio decoding changes: every key changes with it.
FORMAT = 1
TENSOR = "hidden_states"
FeatureDtype = Literal["float16", "bfloat16", "float32"]
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
BLOCK = 4096  # file-system block: what a small entry really takes on disk
_HEADER_BYTES = 1024  # safetensors' JSON header and metadata, generously
GB = 1e9


class FeatureCacheError(RuntimeError):
    """An entry that cannot be used; the message names the file and the reason."""


def file_hash(path: str | Path) -> str:
    """A hash of a file's bytes."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def audio_key(path: str | Path, offset: float | None = None, duration: float | None = None, *,
              hashed: str | None = None) -> str:  # fmt: skip
    """The entry key of an utterance: its file's bytes (`hashed`: their `file_hash`, if known), the
    segment when the record is one (offset and duration, seconds), and the decoding (16 kHz, FORMAT)."""
    segment = "whole" if offset is None else f"{float(offset)!r}+{float(duration)!r}"
    payload = f"rewiring-features/{FORMAT}/{SAMPLE_RATE}Hz|{hashed or file_hash(path)}|{segment}"
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


def source_of(path: str | Path, offset: float | None = None, duration: float | None = None) -> str:
    """How an utterance is named in reports and lookups: the file, plus its segment if it is one."""
    return str(path) if offset is None else f"{path}@{float(offset):g}+{float(duration):g}s"


def unreadable(error: OSError) -> tuple[Reason, str]:
    """The bad-audio code and reason of a file that could not be hashed."""
    if isinstance(error, FileNotFoundError):
        return "not_found", "file not found"
    return "unreadable", f"unreadable audio ({type(error).__name__}: {error})"


@dataclass(frozen=True)
class Utterance:
    """One utterance to cache: its entry key, its file, its length in samples (from the manifest), and
    its segment of the file (`offset` None: the whole file). It reads as a record for `load_audio`."""

    key: str
    path: str
    samples: int
    duration: float
    offset: float | None = None

    @property
    def source(self) -> str:
        return source_of(self.path, self.offset, self.duration)


def utterance(
    path: str | Path, duration: float, offset: float | None = None, hashes: dict[str, str] | None = None
) -> Utterance:
    """The `Utterance` of a manifest record (hashes the file, once per file with `hashes` as the memo;
    OSError when it cannot be read)."""
    path = str(path)
    if hashes is not None and path not in hashes:
        hashes[path] = file_hash(path)
    hashed = hashes[path] if hashes is not None else None
    return Utterance(key=audio_key(path, offset, duration, hashed=hashed), path=path,
                     samples=int(round(duration * SAMPLE_RATE)), duration=float(duration), offset=offset)  # fmt: skip


@dataclass
class Entry:
    hidden: Tensor  # [L, F, D] in the store's dtype
    samples: int  # real samples of the utterance the frames come from


class FeatureStore:
    """One encoder's entries (one dtype) under ``root/<feature_key>/<dtype>``; picklable (paths and ints),
    so data-loader workers can read through it.

    Args:
        root: the cache folder, shared by every encoder.
        feature_key: `SpeechEncoder.feature_key()`.
        num_hidden_states: L, the hidden states per entry.
        hidden_size: D.
        dtype: how entries are stored (float16 by default: half of float32's disk and reads).
    """

    def __init__(
        self,
        root: str | Path,
        feature_key: str,
        num_hidden_states: int,
        hidden_size: int,
        dtype: FeatureDtype = "float16",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.root = Path(root)
        self.feature_key = feature_key
        self.num_hidden_states = int(num_hidden_states)
        self.hidden_size = int(hidden_size)
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.dir = self.root / feature_key / dtype

    def __repr__(self) -> str:
        return f"FeatureStore({self.dir}, L={self.num_hidden_states}, D={self.hidden_size})"

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ sizes
    def entry_bytes(self, frames: int) -> int:
        """Disk bytes of one entry of `frames` frames: L x frames x D x bytes, plus its header, in blocks."""
        payload = self.num_hidden_states * int(frames) * self.hidden_size * self.dtype.itemsize
        return math.ceil((payload + _HEADER_BYTES) / BLOCK) * BLOCK

    # ------------------------------------------------------------------ writing
    def write(self, key: str, hidden: Tensor, samples: int) -> int:
        """Store [L, F, D] hidden states of one utterance atomically; returns the bytes written."""
        if hidden.dim() != 3 or hidden.shape[0] != self.num_hidden_states or hidden.shape[2] != self.hidden_size:
            raise ValueError(
                f"an entry is [L={self.num_hidden_states}, F, D={self.hidden_size}], got {tuple(hidden.shape)}"
            )
        hidden = hidden.detach().to("cpu", self.dtype).contiguous()
        metadata = {
            "format": str(FORMAT),
            "feature_key": self.feature_key,
            "key": key,
            "samples": str(int(samples)),
            "crc32": str(zlib.crc32(hidden.view(torch.uint8).numpy())),
        }
        data = safetensors.torch.save({TENSOR: hidden}, metadata=metadata)
        with atomic_file(self.path(key), "wb") as f:
            f.write(data)
        return len(data)

    def describe(self, info: dict[str, Any]) -> None:
        """encoder.json beside the entries (once): which encoder and settings made them."""
        path = self.dir / "encoder.json"
        if not path.exists():
            write_json_atomic(path, {"format": FORMAT, "feature_key": self.feature_key, "dtype": self.dtype_name,
                                     "num_hidden_states": self.num_hidden_states, "hidden_size": self.hidden_size,
                                     **info})  # fmt: skip

    # ------------------------------------------------------------------ reading and checks
    def _header(self, head: bytes | memoryview, key: str, file_size: int) -> tuple[dict[str, Any], int, tuple[int, ...]]:
        """Parse and check a safetensors header (`head`: the file's start, at least the header):
        (metadata, data start, shape); FeatureCacheError if bad."""
        if len(head) < 8:
            raise FeatureCacheError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head[:8])
        if n > 1 << 20 or len(head) < 8 + n:
            raise FeatureCacheError(f"implausible or truncated header ({n} bytes)")
        try:
            header = json.loads(bytes(head[8 : 8 + n]))
            meta, info = header["__metadata__"], header[TENSOR]
            shape = tuple(int(x) for x in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (ValueError, KeyError, TypeError) as e:
            raise FeatureCacheError(f"unreadable header ({type(e).__name__}: {e})") from None
        want = {"format": str(FORMAT), "feature_key": self.feature_key, "key": key}
        wrong = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
        if wrong:
            raise FeatureCacheError(f"metadata {wrong} does not match this store {want}")
        if info.get("dtype") != _SAFETENSORS_DTYPE[self.dtype]:
            raise FeatureCacheError(f"dtype {info.get('dtype')}, expected {_SAFETENSORS_DTYPE[self.dtype]}")
        if len(shape) != 3 or shape[0] != self.num_hidden_states or shape[2] != self.hidden_size:
            raise FeatureCacheError(f"shape {shape}, expected [{self.num_hidden_states}, F, {self.hidden_size}]")
        if end - start != math.prod(shape) * self.dtype.itemsize or file_size != 8 + n + end:
            raise FeatureCacheError(f"{file_size} bytes on disk do not match the header (truncated?)")
        return meta, 8 + n + start, shape

    def check(self, key: str, full: bool = False) -> str | None:
        """None when the entry is there and sound, else why not ("missing", or what is wrong).
        The header check reads about a hundred bytes; `full` also reads the data and checks its CRC."""
        path = self.path(key)
        try:
            size = path.stat().st_size
            if full:
                self.read(key)
                return None
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) == 8:
                    head += f.read(min(struct.unpack("<Q", head)[0], 1 << 20))
            self._header(head, key, size)
            return None
        except FileNotFoundError:
            return "missing"
        except FeatureCacheError as e:
            return str(e).removeprefix(f"{path}: ")
        except OSError as e:
            return f"unreadable ({type(e).__name__}: {e})"

    def read(self, key: str) -> Entry:
        """The entry of `key`, fully checked (header, size, CRC); FeatureCacheError naming the file if bad."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:  # one copy into a buffer the tensor then views (3x read_bytes + bytearray)
                buf = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(buf)
        except FileNotFoundError:
            raise FeatureCacheError(f"{path}: missing (fill the cache first)") from None
        try:
            meta, start, shape = self._header(memoryview(buf), key, len(buf))
            count = math.prod(shape)
            flat = torch.frombuffer(buf, dtype=self.dtype, offset=start, count=count) if count else torch.empty(0, dtype=self.dtype)
            if str(zlib.crc32(flat.view(torch.uint8).numpy())) != meta.get("crc32"):
                raise FeatureCacheError("CRC mismatch (the data changed after it was written)")
            return Entry(hidden=flat.reshape(shape), samples=int(meta["samples"]))
        except FeatureCacheError as e:
            raise FeatureCacheError(f"{path}: {e}") from None

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------ sharing
    @contextmanager
    def lock(self, name: str, announce: Callable[[str], None] | None = None) -> Iterator[None]:
        """An exclusive lock named `name` among every process that uses this store (fcntl.flock: the
        kernel drops it when its holder dies, so a killed fill never blocks the next one)."""
        path = self.dir / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if announce is not None:
                    announce(f"waiting for another process that fills the same entries ({path})")
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def remove_stale_temporaries(self, max_age_s: float = 3600.0) -> int:
        """Delete temporary files a killed writer left (an entry is written in well under a second, so
        one older than `max_age_s` has no writer); returns how many."""
        removed = 0
        if not self.dir.is_dir():
            return 0
        now = time.time()
        for shard in os.scandir(self.dir):
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for e in os.scandir(shard.path):
                if e.name.startswith(".") and e.name.endswith(".tmp"):
                    try:
                        if now - e.stat().st_mtime > max_age_s:
                            os.unlink(e.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed


# ====================================================================== size


@dataclass
class Room:
    """The size estimate of a set of entries and whether it may be filled (see `room`)."""

    total_bytes: int  # every entry of the set
    missing_bytes: int  # the entries not on disk yet: what a fill writes
    free_bytes: int
    ok: bool
    reason: str = ""


def estimate(
    store: FeatureStore, samples: Sequence[int], frames: Callable[[Tensor], Tensor]
) -> tuple[int, list[int], list[int]]:
    """Disk bytes of entries for utterances of `samples` samples (frames = `frames(samples)`): the total,
    and per utterance its frames and bytes. Needs no audio, only the manifest's durations."""
    counts = frames(torch.tensor(list(samples), dtype=torch.long)).tolist() if len(samples) else []
    sizes = [store.entry_bytes(n) for n in counts]
    return sum(sizes), counts, sizes


def room(
    store: FeatureStore,
    utterances: Sequence[Utterance],
    frames: Callable[[Tensor], Tensor],
    max_gb: float,
    reserve_fraction: float = 0.05,
) -> Room:
    """Estimate the entries' size (L x D x frames x bytes each, frames = `frames(samples)`) before filling.

    Not ok when the whole set is above `max_gb`, or when the missing entries would leave less than
    max(1 GB, `reserve_fraction` of the disk) free: the cache never fills the disk.
    """
    total, counts, sizes = estimate(store, [u.samples for u in utterances], frames)
    missing = sum(b for u, b in zip(utterances, sizes, strict=True) if not store.path(u.key).exists())
    probe = store.dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    reserve = max(1 * GB, reserve_fraction * usage.total)
    per_frame = store.num_hidden_states * store.hidden_size * store.dtype.itemsize
    what = (
        f"{len(utterances)} utterances, {sum(counts)} frames x {store.num_hidden_states} hidden states x "
        f"{store.hidden_size} dims x {store.dtype.itemsize} bytes ({per_frame / 1e3:.1f} kB a frame) = "
        f"{total / GB:.2f} GB"
    )
    if total > max_gb * GB:
        return Room(total, missing, usage.free, False, f"estimated {what}, above max_gb={max_gb:g}")
    if missing and missing > usage.free - reserve:
        return Room(total, missing, usage.free, False,
                    f"estimated {what}, {missing / GB:.2f} GB of it still to write, but {probe} has "
                    f"{usage.free / GB:.1f} GB free and keeps {reserve / GB:.1f} GB in reserve")  # fmt: skip
    return Room(total, missing, usage.free, True, f"estimated {what}")
