"""Keyword spotting (KS): Speech Commands v0.01, 12 classes as in SUPERB; mean-pool + linear; accuracy.

The 12 classes: ten words (yes, no, up, down, left, right, on, off, stop, go), ``_unknown_`` (every
other word) and ``_silence_`` (1 s clips of background noise). The module and the
data module are the shared classification ones; this file fixes the task's name and reads the real
corpus (`prepare`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import ClassVar

import soundfile as sf

from rewiring.audio import SAMPLE_RATE, duration_seconds, load_audio
from rewiring.manifest import Record, write_manifest
from tasks.adapters import relative_audio, require_file
from tasks.classification import ClassificationDataModule, ClassificationTaskModule

__all__ = ["CLASSES", "KS_WORDS", "SILENCE", "UNKNOWN", "KeywordSpotting", "KeywordSpottingData", "prepare"]

log = logging.getLogger(__name__)

KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
NOISE_DIR = "_background_noise_"
# How each background-noise file's 1 s clips are shared out, in time order (no clip in two splits):
# over the three splits when test is built from the train archive, over train and dev when test is
# the separate test set (which has its own _silence_ clips).
SILENCE_SHARES = {"train": 0.8, "dev": 0.1, "test": 0.1}
SILENCE_SHARES_WITH_TEST_SET = {"train": 0.9, "dev": 0.1}


class KeywordSpotting(ClassificationTaskModule):
    """KS head: mean over frames, linear over the 12 classes (from the data module), accuracy."""

    task: ClassVar[str] = "ks"


class KeywordSpottingData(ClassificationDataModule):
    """{root}/ks/{train,dev,test}.jsonl, class in ``label``; low-resource splits stratified by class."""

    task: ClassVar[str] = "ks"
    stratify: ClassVar[str | None] = "label"
    label_field: ClassVar[str] = "label"


# ======================================================================== the real corpus

CLASSES = (*KS_WORDS, UNKNOWN, SILENCE)
# s3prl's split_dataset (TensorFlow's which_set): a speaker's hash in [0, 100) puts every file of the
# speaker in dev (< 10), in the discarded test part (< 20) or in train. The two lists are that split.
_MAX_PER_CLASS = 2**27 - 1


def _hash_split(name: str) -> str:
    """The split s3prl gives a train-archive file (by name): "dev", "test" (discarded) or "train"."""
    speaker = re.sub(r"_nohash_.*$", "", name)
    digest = int(hashlib.sha1(speaker.encode("utf-8")).hexdigest(), 16)
    percentage = (digest % (_MAX_PER_CLASS + 1)) * (100.0 / _MAX_PER_CLASS)
    return "dev" if percentage < 10 else "test" if percentage < 20 else "train"


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


def _speaker(stem: str) -> str | None:
    return stem.split("_nohash_")[0] if "_nohash_" in stem else None


def _word_record(root: Path, entry: str, manifest_dir: Path) -> Record:
    word, name = entry.split("/")
    stem = name[: -len(".wav")]
    return Record(
        id=f"{word}/{stem}",
        audio=relative_audio(root / entry, manifest_dir),
        duration=duration_seconds(root / entry),
        text=word,
        speaker=_speaker(stem),
        label=word if word in KS_WORDS else UNKNOWN,
    )


def _test_archive(test_root: Path, manifest_dir: Path) -> tuple[list[Record], set[str]]:
    """speech_commands_test_set_v0.01: one folder per class, every wav in it of that class (as s3prl's
    SpeechCommandsTestingDataset reads it). Returns the records and the "word/file.wav" entry each
    spoken one would have in the train archive (``_unknown_`` files are named word_speaker_nohash_k)."""
    if not test_root.is_dir():
        raise FileNotFoundError(f"Speech Commands test set folder not found: {test_root}")
    folders = sorted(d for d in test_root.iterdir() if d.is_dir())
    stray = [d.name for d in folders if d.name not in CLASSES]
    if stray:
        raise ValueError(
            f"{test_root}: folders {', '.join(stray[:5])} are not KS classes; --test_root is the extracted "
            f"speech_commands_test_set_v0.01, one folder per class ({', '.join(CLASSES)})"
        )
    missing = [c for c in CLASSES if c not in {d.name for d in folders}]
    if missing:
        log.warning("Speech Commands test set at %s has no folder for %s", test_root, ", ".join(missing))
    records, entries = [], set()
    for d in folders:
        for f in sorted(d.glob("*.wav")):
            word, stem = d.name, f.stem
            if word == UNKNOWN and "_" in stem:
                word, stem = stem.split("_", 1)
            spoken = word != SILENCE
            if spoken:
                entries.add(f"{word}/{stem}.wav")
            records.append(
                Record(
                    id=f"{d.name}/{f.stem}",
                    audio=relative_audio(f, manifest_dir),
                    duration=duration_seconds(f),
                    text=word if spoken and word != UNKNOWN else None,
                    speaker=_speaker(stem) if spoken else None,
                    label=d.name,
                )
            )
    if not records:
        raise FileNotFoundError(f"no wavs in the class folders of {test_root}")
    return records, entries


def _silence_clips(
    noise_dir: Path, out_dir: Path, manifest_dir: Path, shares: dict[str, float]
) -> dict[str, list[Record]]:
    """Cut every background-noise file into 1 s clips (written as wavs), shared out over the splits."""
    files = sorted(noise_dir.glob("*.wav"))
    if not files:
        raise FileNotFoundError(f"no background-noise wavs in {noise_dir} (needed for the {SILENCE} class)")
    out_dir.mkdir(parents=True, exist_ok=True)
    split_records: dict[str, list[Record]] = {s: [] for s in shares}
    for f in files:
        wav = load_audio(f, sample_rate=SAMPLE_RATE, check=False)
        n = wav.shape[0] // SAMPLE_RATE
        if n < len(shares):
            raise ValueError(
                f"{f}: background noise of {wav.shape[0] / SAMPLE_RATE:.2f} s is too short to cut"
            )
        n_dev = max(1, int(n * shares["dev"]))
        n_train = min(int(n * shares["train"]), n - n_dev - 1) if "test" in shares else n - n_dev
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
        for split in shares:
            a, b = bounds[split]
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


def prepare(root: str | Path, out: str | Path, test_root: str | Path | None = None) -> dict[str, int]:
    """Speech Commands v0.01 (extracted folder ROOT) -> {out}/ks/{train,dev,test}.jsonl; counts per split.

    ROOT holds one folder of wavs per word, validation_list.txt, testing_list.txt and
    _background_noise_/. Dev is the files of validation_list.txt and train every other word file but
    those of testing_list.txt, which SUPERB discards (its split_dataset recomputes the same hash
    split). The ten command words keep their name as class, every other word is ``_unknown_``; the
    noise files are cut into 1 s ``_silence_`` clips written under {out}/ks/_silence_/.

    Test, as SUPERB's, is TEST_ROOT: the extracted speech_commands_test_set_v0.01, one folder per
    class (``_unknown_`` and ``_silence_`` included); the noise clips then go to train (the first 90%
    of each file's clips) and dev (the last 10%). Without TEST_ROOT, test is testing_list.txt plus
    the last 10% of the noise clips (80/10/10), and its accuracy is not comparable with SUPERB's.
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
    in_list = {e: split for split in ("dev", "test", "train") for e in listed[split]}
    off = [e for e, split in in_list.items() if _hash_split(e.split("/")[1]) != split]
    if off:
        log.warning(
            "Speech Commands at %s: %d files are not in the split SUPERB's hash gives them (e.g. %s); "
            "dev and train then differ from SUPERB's", root, len(off), ", ".join(off[:3]),
        )  # fmt: skip

    if test_root is None:
        log.warning(
            "prepare speech_commands without --test_root: test is built from testing_list.txt of the "
            "train archive, which SUPERB discards, so KS test accuracy is NOT comparable with SUPERB's. "
            "Pass --test_root (the extracted speech_commands_test_set_v0.01) for SUPERB's test set."
        )
        shares = SILENCE_SHARES
        test_records: list[Record] = []
    else:
        shares = SILENCE_SHARES_WITH_TEST_SET
        test_records, spoken = _test_archive(Path(test_root), manifest_dir)
        seen = spoken & (set(listed["train"]) | set(listed["dev"]))
        if seen:
            log.warning(
                "%d utterances of the test set at %s are also in train or dev (e.g. %s): is it the test "
                "set of the same version (v0.01)?", len(seen), test_root, ", ".join(sorted(seen)[:3]),
            )  # fmt: skip
        listed["test"] = []

    silence = _silence_clips(noise_dir, manifest_dir / SILENCE, manifest_dir, shares)
    counts = {}
    for split in ("train", "dev", "test"):
        records = [_word_record(root, e, manifest_dir) for e in listed[split]] + silence.get(split, [])
        if split == "test":
            records += test_records
        write_manifest(manifest_dir / f"{split}.jsonl", records)
        counts[split] = len(records)
    return counts
