"""Keyword spotting (KS): Speech Commands v0.01, 12 classes as in SUPERB; mean-pool + linear; accuracy.

The 12 classes: ten words (yes, no, up, down, left, right, on, off, stop, go), ``_unknown_`` (every
other word) and ``_silence_`` (1 s clips cut from the corpus's background noise). The module and the
data module are the shared classification ones; this file fixes the task's name and reads the real
corpus (`prepare`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import soundfile as sf

from rewiring.audio import SAMPLE_RATE, duration_seconds, load_audio
from rewiring.manifest import Record, write_manifest
from tasks.base import ClassificationDataModule, ClassificationTaskModule, relative_audio, require_file

__all__ = ["KS_WORDS", "SILENCE", "UNKNOWN", "KeywordSpotting", "KeywordSpottingData", "prepare"]

log = logging.getLogger(__name__)

KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
NOISE_DIR = "_background_noise_"
# How each background-noise file's 1 s clips are shared out, in time order (no clip in two splits).
SILENCE_SHARES = {"train": 0.8, "dev": 0.1, "test": 0.1}


class KeywordSpotting(ClassificationTaskModule):
    """KS head: mean over frames, linear over the 12 classes (from the data module), accuracy."""

    task: ClassVar[str] = "ks"


class KeywordSpottingData(ClassificationDataModule):
    """{root}/ks/{train,dev,test}.jsonl, class in ``label``; low-resource splits stratified by class."""

    task: ClassVar[str] = "ks"
    stratify: ClassVar[str | None] = "label"
    label_field: ClassVar[str] = "label"


# ======================================================================== the real corpus


def _read_list(path: Path, root: Path) -> list[str]:
    """validation_list.txt / testing_list.txt: one "word/file.wav" per line, relative to root."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        parts = entry.split("/")
        if len(parts) != 2 or not parts[1].endswith(".wav") or not all(parts):
            raise ValueError(f"{path}:{lineno}: expected 'word/file.wav', got {entry!r}")
        if not (root / entry).is_file():
            raise FileNotFoundError(f"{path}:{lineno}: listed file not found: {root / entry}")
        out.append(entry)
    return out


def _word_record(root: Path, entry: str, manifest_dir: Path) -> Record:
    word, name = entry.split("/")
    stem = name[: -len(".wav")]
    speaker = stem.split("_nohash_")[0] if "_nohash_" in stem else None
    return Record(
        id=f"{word}/{stem}",
        audio=relative_audio(root / entry, manifest_dir),
        duration=duration_seconds(root / entry),
        text=word,
        speaker=speaker,
        label=word if word in KS_WORDS else UNKNOWN,
    )


def _silence_clips(noise_dir: Path, out_dir: Path, manifest_dir: Path) -> dict[str, list[Record]]:
    """Cut every background-noise file into 1 s clips (written as wavs), shared out over the splits."""
    files = sorted(noise_dir.glob("*.wav"))
    if not files:
        raise FileNotFoundError(f"no background-noise wavs in {noise_dir} (needed for the {SILENCE} class)")
    out_dir.mkdir(parents=True, exist_ok=True)
    split_records: dict[str, list[Record]] = {s: [] for s in SILENCE_SHARES}
    for f in files:
        wav = load_audio(f, sample_rate=SAMPLE_RATE, check=False)
        n = wav.shape[0] // SAMPLE_RATE
        if n < len(SILENCE_SHARES):
            raise ValueError(
                f"{f}: background noise of {wav.shape[0] / SAMPLE_RATE:.2f} s is too short to cut"
            )
        n_dev = max(1, int(n * SILENCE_SHARES["dev"]))
        n_train = min(int(n * SILENCE_SHARES["train"]), n - n_dev - 1)
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
        for split, (a, b) in bounds.items():
            for k in range(a, b):
                clip = out_dir / f"{f.stem}_{k:04d}.wav"
                sf.write(
                    clip, wav[k * SAMPLE_RATE : (k + 1) * SAMPLE_RATE].numpy(), SAMPLE_RATE, subtype="PCM_16"
                )
                split_records[split].append(
                    Record(
                        id=f"{SILENCE}/{f.stem}_{k:04d}",
                        audio=relative_audio(clip, manifest_dir),
                        duration=1.0,
                        label=SILENCE,
                        meta={"noise": f.name, "second": k},
                    )
                )
    return split_records


def prepare(root: str | Path, out: str | Path) -> dict[str, int]:
    """Speech Commands v0.01 (extracted folder ROOT) -> {out}/ks/{train,dev,test}.jsonl; counts per split.

    ROOT holds one folder of wavs per word, validation_list.txt, testing_list.txt and
    _background_noise_/. Dev and test are the listed files, train is every other word file (SUPERB's
    split). The ten command words keep their name as class, every other word is ``_unknown_``; the
    noise files are cut into 1 s ``_silence_`` clips written under {out}/ks/_silence_/ (the first 80%
    of each file's clips for train, then 10% dev, 10% test).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Speech Commands folder not found: {root}")
    val_list = require_file(root / "validation_list.txt", "Speech Commands validation_list.txt")
    test_list = require_file(root / "testing_list.txt", "Speech Commands testing_list.txt")
    noise_dir = root / NOISE_DIR
    if not noise_dir.is_dir():
        raise FileNotFoundError(f"Speech Commands {NOISE_DIR}/ folder not found: {noise_dir}")
    manifest_dir = Path(out) / "ks"

    listed = {"dev": _read_list(val_list, root), "test": _read_list(test_list, root)}
    held = set(listed["dev"]) | set(listed["test"])
    words = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("_"))
    if not words:
        raise FileNotFoundError(f"no word folders in {root} (expected yes/, no/, ... with wavs)")
    train_entries = [f"{d.name}/{f.name}" for d in words for f in sorted(d.glob("*.wav"))]
    listed["train"] = [e for e in train_entries if e not in held]
    missing = sorted(set(KS_WORDS) - {d.name for d in words})
    if missing:
        log.warning("Speech Commands at %s has no folder for %s", root, ", ".join(missing))

    silence = _silence_clips(noise_dir, manifest_dir / SILENCE, manifest_dir)
    counts = {}
    for split in ("train", "dev", "test"):
        records = [_word_record(root, e, manifest_dir) for e in listed[split]] + silence[split]
        write_manifest(manifest_dir / f"{split}.jsonl", records)
        counts[split] = len(records)
    return counts
