"""ASR: LibriSpeech (train-clean-100 / dev-clean / test-clean), BiLSTM + CTC over characters, WER and CER.

The module, the data module and the LibriSpeech adapter, as one self-contained unit (s3prl style).
The CTC machinery (vocabulary from the train manifest, BiLSTM head, fp32 CTC with zero_infinity,
greedy decoding, the all-blank warning) is `tasks.ctc`'s. Decoding is greedy: a beam search would
need torchaudio's `ctc_decoder`, which needs the flashlight-text package, not installed here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import CharErrorRate, WordErrorRate

from rewiring.audio import duration_seconds
from rewiring.manifest import Record, write_manifest
from tasks.adapters import relative_audio
from tasks.ctc import CTCTaskDataModule, CTCTaskModule
from tasks.data import TaskBatch
from tasks.module import Stage

__all__ = ["SpeechRecognitionData", "SpeechRecognition", "prepare"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


class SpeechRecognitionData(CTCTaskDataModule):
    """Utterances and their transcripts ({root}/asr/*.jsonl); the CTC tokens are the text's characters.

    The vocabulary is every character of the train transcripts (space included), built at setup.
    """

    task: ClassVar[str] = "asr"


class SpeechRecognition(CTCTaskModule):
    """Encoder + SUPERB's ASR head (2-layer BiLSTM, CTC over characters); WER (primary, lower is better) and CER.

    Args: those of `tasks.ctc.CTCTaskModule` (protocol, optimizer, learning rates, BiLSTM size, the
    projector and SpecAugment of the SUPERB preset, conf/tasks/superb/asr.yaml).
    """

    task: ClassVar[str] = "asr"
    primary_metric: ClassVar[str] = "val/wer"
    metric_mode: ClassVar[Literal["max", "min"]] = "min"

    def build_metrics(self) -> dict[str, Metric]:
        return {"wer": WordErrorRate(), "cer": CharErrorRate()}

    def step(self, batch: TaskBatch, stage: Stage) -> Tensor:
        log_probs, frame_lengths = self.ctc_forward(batch)
        loss = self.ctc_loss(log_probs, frame_lengths, batch.targets)
        metrics = self.metrics(stage)
        if metrics is not None:
            hyps = [" ".join(h.split()) for h in self.decode(log_probs, frame_lengths, stage)]
            metrics.update(hyps, batch.targets.texts)
        return loss

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> list[dict[str, str]]:
        """Per utterance: id and greedy transcript."""
        log_probs, frame_lengths = self.ctc_forward(batch)
        hyps = self.decode(log_probs, frame_lengths)
        return [{"id": uid, "text": " ".join(h.split())} for uid, h in zip(batch.ids, hyps, strict=True)]


# --------------------------------------------------------------------------------------------
# LibriSpeech adapter
# --------------------------------------------------------------------------------------------

_UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def _librispeech_root(root: Path, subsets: Sequence[str]) -> Path:
    # Accept the folder holding the subsets, or its parent (the tarballs unpack into LibriSpeech/).
    if any((root / s).is_dir() for s in subsets):
        return root
    if (root / "LibriSpeech").is_dir():
        return root / "LibriSpeech"
    return root


def _read_subset(root: Path, subset: str, manifest_dir: Path) -> list[Record]:
    folder = root / subset
    if not folder.is_dir():
        raise FileNotFoundError(f"LibriSpeech subset folder not found: {folder}")
    trans_files = sorted(folder.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise FileNotFoundError(
            f"{folder}: no <speaker>/<chapter>/<speaker>-<chapter>.trans.txt files (is this a LibriSpeech subset?)"
        )
    records = []
    for trans in trans_files:
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        if trans.name != f"{speaker}-{chapter}.trans.txt":
            raise ValueError(f"{trans}: expected the name {speaker}-{chapter}.trans.txt in {trans.parent}")
        with open(trans, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split(" ", 1)
                utt = parts[0]
                text = parts[1].strip() if len(parts) == 2 else ""
                m = _UTT_ID.match(utt)
                if m is None or m.group(1) != speaker or m.group(2) != chapter:
                    raise ValueError(
                        f"{trans}:{lineno}: malformed line: expected '{speaker}-{chapter}-<n> TEXT', got {line.strip()[:80]!r}"
                    )
                if not text:
                    raise ValueError(f"{trans}:{lineno}: utterance {utt} has no transcript")
                audio = trans.parent / f"{utt}.flac"
                if not audio.is_file():
                    raise FileNotFoundError(f"{audio}: audio listed in {trans}:{lineno} is missing")
                records.append(
                    Record(
                        id=utt,
                        audio=relative_audio(audio, manifest_dir),
                        duration=round(duration_seconds(audio), 4),
                        text=" ".join(text.lower().split()),
                        speaker=speaker,
                        meta={"subset": subset},
                    )
                )
    return records


def prepare(
    root: str | Path,
    out: str | Path,
    train: Sequence[str] = ("train-clean-100",),
    dev: Sequence[str] = ("dev-clean",),
    test: Sequence[str] = ("test-clean",),
) -> dict[str, int]:
    """Read a local LibriSpeech and write {out}/asr/{train,dev,test}.jsonl; returns records per split.

    Expected layout (the OpenSLR tarballs unpacked; `root` is the folder holding the subsets or
    its parent holding `LibriSpeech/`):
        <subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   lines "<speaker>-<chapter>-<n> TEXT"
        <subset>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac
    with subsets train-clean-100 (train), dev-clean (dev), test-clean (test), as in the paper and
    SUPERB ASR. Transcripts are lower-cased (whitespace collapsed); audio paths are relative to the manifest.
    A missing folder, a malformed transcript line, or a listed utterance without its flac raises
    an error naming the file (and line).
    """
    base = _librispeech_root(Path(root), [*train, *dev, *test])
    counts = {}
    for split, subsets in (("train", train), ("dev", dev), ("test", test)):
        manifest = Path(out) / "asr" / f"{split}.jsonl"
        records = [r for subset in subsets for r in _read_subset(base, subset, manifest.parent)]
        write_manifest(manifest, records)
        counts[split] = len(records)
        log.info("librispeech %s: %d utterances from %s", split, len(records), ", ".join(subsets))
    return counts
