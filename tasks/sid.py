"""Speaker identification (SID): VoxCeleb1's identification split; mean-pool + linear; accuracy.

The class is the record's ``speaker``. Utterances can be long (VoxCeleb1 has some over two
minutes): training reads one random window of at most ``train_max_seconds`` (as SUPERB crops),
evaluation reads whole utterances.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rewiring.audio import duration_seconds
from rewiring.manifest import Record, write_manifest
from tasks.adapters import relative_audio, require_file
from tasks.classification import ClassificationDataModule, ClassificationTaskModule

__all__ = ["SpeakerIdentification", "SpeakerIdentificationData", "prepare"]


class SpeakerIdentification(ClassificationTaskModule):
    """SID head: mean over frames, linear over the train manifest's speakers, accuracy."""

    task: ClassVar[str] = "sid"


class SpeakerIdentificationData(ClassificationDataModule):
    """{root}/sid/{train,dev,test}.jsonl, class in ``speaker``; low-resource splits keep every speaker.

    Args (besides TaskDataModule's): train_max_seconds: training utterances longer than this are
    read as one random window of this length (None: whole). max_seconds defaults to None here, so
    evaluation sees whole utterances however long.
    """

    task: ClassVar[str] = "sid"
    stratify: ClassVar[str | None] = "speaker"
    label_field: ClassVar[str] = "speaker"

    def __init__(self, max_seconds: float | None = None, train_max_seconds: float | None = 8.0, **kwargs: Any) -> None:
        # Whole VoxCeleb utterances can be long: no length limit by default (training reads a window).
        # TaskDataModule's other arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(max_seconds=max_seconds, **kwargs)
        if train_max_seconds is not None and not train_max_seconds > 0:
            raise ValueError(f"train_max_seconds must be > 0 or None, got {train_max_seconds}")
        self.train_crop_seconds = train_max_seconds


# ======================================================================== the real corpus

SPLIT_CODES = {"1": "train", "2": "dev", "3": "test"}


def prepare(root: str | Path, out: str | Path) -> dict[str, int]:
    """VoxCeleb1 (ROOT with iden_split.txt and wav/) -> {out}/sid/{train,dev,test}.jsonl; counts per split.

    iden_split.txt lines: "<1|2|3> id10001/1zcIwhmdeo4/00001.wav" (1 train, 2 dev, 3 test), paths
    relative to wav/. The speaker is the first path component.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"VoxCeleb1 folder not found: {root}")
    split_file = require_file(root / "iden_split.txt", "VoxCeleb1 iden_split.txt")
    wav_dir = root / "wav"
    if not wav_dir.is_dir():
        raise FileNotFoundError(f"VoxCeleb1 wav/ folder not found: {wav_dir}")
    manifest_dir = Path(out) / "sid"
    splits: dict[str, list[Record]] = {s: [] for s in SPLIT_CODES.values()}
    for lineno, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[0] not in SPLIT_CODES or not fields[1].endswith(".wav"):
            raise ValueError(
                f"{split_file}:{lineno}: expected '<1|2|3> id10001/<video>/<n>.wav', got {line!r}"
            )
        rel = fields[1]
        parts = rel.split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{split_file}:{lineno}: expected a path speaker/video/file.wav, got {rel!r}")
        wav = wav_dir / rel
        if not wav.is_file():
            raise FileNotFoundError(f"{split_file}:{lineno}: audio file not found: {wav}")
        splits[SPLIT_CODES[fields[0]]].append(
            Record(
                id=rel[: -len(".wav")],
                audio=relative_audio(wav, manifest_dir),
                duration=duration_seconds(wav),
                speaker=parts[0],
                meta={"video": parts[1]},
            )
        )
    empty = [s for s, recs in splits.items() if not recs]
    if empty:
        raise ValueError(f"{split_file}: no utterances for split(s) {empty}")
    counts = {}
    for split, records in splits.items():
        write_manifest(manifest_dir / f"{split}.jsonl", records)
        counts[split] = len(records)
    return counts
