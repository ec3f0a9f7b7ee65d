"""SF: slot filling on Audio SNIPS (SUPERB split), BiLSTM + CTC over characters with slot tags.

The module, the data module and the Audio SNIPS adapter, as one self-contained unit.

The CTC target (SUPERB's "character-slot" scheme, with our spelling of the tags): the transcript's
characters, and around each slot value two extra tokens, one vocabulary item each, `<B-type>` right
before the value's first character and `<E-type>` right after its last:

    text  "play the beatles on spotify"   slots [["artist", "the beatles"], ["service", "spotify"]]
    tokens p l a y ␣ <B-artist> t h e ␣ b e a t l e s <E-artist> ␣ o n ␣ <B-service> s p o t i f y <E-service>

A decoded sequence is read back as s3prl does: a `<B-t>` opens a slot that the next `<E-t>` closes
(tags in between are dropped from the value; a `<B-t>` without its `<E-t>`, or an empty value, gives
no slot); the plain text is the characters without tags. Metrics: SUPERB's slot_type_f1 (primary,
higher is better) and slot_value_cer (`tasks.metrics`), plus WER and CER of the plain text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import CharErrorRate, WordErrorRate

from rewiring.audio import duration_seconds
from rewiring.manifest import Record, write_manifest
from tasks.adapters import relative_audio
from tasks.ctc import CTCTaskDataModule, CTCTaskModule
from tasks.data import TaskBatch
from tasks.metrics import SlotTypeF1, SlotValueCER
from tasks.module import Stage

__all__ = [
    "SlotFillingData",
    "SlotFilling",
    "SUPERB_SPEAKERS",
    "iob_to_slots",
    "parse_tagged",
    "prepare",
    "slot_tag",
    "tagged_tokens",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The tagged CTC target
# --------------------------------------------------------------------------------------------

_TAG = re.compile(r"<([BE])-([^<>\s]+)>")


def slot_tag(kind: str, slot_type: str) -> str:
    """`<B-type>` (kind "B", before the value) or `<E-type>` (kind "E", after it)."""
    if kind not in ("B", "E") or not slot_type or any(c in slot_type for c in "<> \t\n"):
        raise ValueError(f"bad slot tag {kind!r} / {slot_type!r} (slot types cannot hold spaces or <>)")
    return f"<{kind}-{slot_type}>"


def tagged_tokens(text: str, slots: Sequence[Sequence[str]], record_id: str = "") -> list[str]:
    """The CTC target of a transcript: its characters, each slot value wrapped in its two tags.

    Slot values are found in `text` in order of appearance (whole words first, then anywhere), each
    after the previous one; a value that is not there raises ValueError naming the record.
    """
    tokens: list[str] = []
    cursor = 0
    for slot_type, value in slots:
        value = value.strip()
        if not value:
            raise ValueError(f"sf: record {record_id!r}: empty value for slot {slot_type!r}")
        m = re.compile(r"(?<!\S)" + re.escape(value) + r"(?!\S)").search(text, cursor)
        start = m.start() if m else text.find(value, cursor)
        if start < 0:
            raise ValueError(
                f"sf: record {record_id!r}: slot {slot_type!r} value {value!r} not found in text {text!r} "
                f"after character {cursor} (slots must be in order of appearance)"
            )
        end = start + len(value)
        tokens += [*text[cursor:start], slot_tag("B", slot_type), *text[start:end], slot_tag("E", slot_type)]
        cursor = end
    tokens += [*text[cursor:]]
    return tokens


def parse_tagged(tagged: str) -> tuple[str, list[tuple[str, str]]]:
    """(plain text, [(slot_type, value), ...]) from a tagged string (tokens joined without separator)."""
    pieces: list[tuple[str, str, str]] = []  # ("tag", kind, type) or ("char", c, "")
    pos = 0
    for m in _TAG.finditer(tagged):
        pieces += [("char", c, "") for c in tagged[pos : m.start()]]
        pieces.append(("tag", m.group(1), m.group(2)))
        pos = m.end()
    pieces += [("char", c, "") for c in tagged[pos:]]

    def chars(a: int, b: int) -> str:
        return " ".join("".join(p[1] for p in pieces[a:b] if p[0] == "char").split())

    slots: list[tuple[str, str]] = []
    i = 0
    while i < len(pieces):
        kind, a, b = pieces[i]
        if kind == "tag" and a == "B":
            j = next((j for j in range(i + 1, len(pieces)) if pieces[j] == ("tag", "E", b)), None)
            if j is not None:
                value = chars(i + 1, j)
                if value:
                    slots.append((b, value))
                i = j + 1
                continue
        i += 1
    return chars(0, len(pieces)), slots


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


class SlotFillingData(CTCTaskDataModule):
    """Requests with slots ({root}/sf/*.jsonl: text, slots, labels.intent); target: the tagged tokens.

    The vocabulary (characters and the `<B-t>`/`<E-t>` tags of every slot type in the train
    manifest) is built at setup. The low-resource split is stratified by intent.
    """

    task: ClassVar[str] = "sf"
    stratify: ClassVar[str | None] = "labels.intent"

    def target_tokens(self, record: Record) -> list[str]:
        if record.text is None:
            raise ValueError(f"sf: record {record.id!r} has no text")
        return tagged_tokens(record.text, record.slots or [], record.id)

    def target(self, record: Record) -> tuple[list[int], str]:
        """Token ids and the reference as a tagged string (all its tags, even those train never had)."""
        tokens = self.target_tokens(record)
        return self.vocab.encode(tokens), "".join(tokens)


class SlotFilling(CTCTaskModule):
    """Encoder + BiLSTM CTC head over characters and slot tags; slot_type_f1 (primary), slot_value_cer, WER, CER.

    Args: those of `tasks.ctc.CTCTaskModule` (protocol, optimizer, learning rates, BiLSTM size, the
    projector and SpecAugment of the SUPERB preset, conf/tasks/superb/sf.yaml).
    """

    task: ClassVar[str] = "sf"
    primary_metric: ClassVar[str] = "val/slot_type_f1"
    metric_mode: ClassVar[Literal["max", "min"]] = "max"

    def build_metrics(self) -> dict[str, Metric]:
        return {
            "slot_type_f1": SlotTypeF1(),
            "slot_value_cer": SlotValueCER(),
            "wer": WordErrorRate(),
            "cer": CharErrorRate(),
        }

    def step(self, batch: TaskBatch, stage: Stage) -> Tensor:
        log_probs, frame_lengths = self.ctc_forward(batch)
        loss = self.ctc_loss(log_probs, frame_lengths, batch.targets)
        metrics = self.metrics(stage)
        if metrics is not None:
            hyps = [parse_tagged(h) for h in self.decode(log_probs, frame_lengths, stage, sep="")]
            refs = [parse_tagged(r) for r in batch.targets.texts]
            metrics["slot_type_f1"].update([h[1] for h in hyps], [r[1] for r in refs])
            metrics["slot_value_cer"].update([h[1] for h in hyps], [r[1] for r in refs])
            metrics["wer"].update([h[0] for h in hyps], [r[0] for r in refs])
            metrics["cer"].update([h[0] for h in hyps], [r[0] for r in refs])
        return loss

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Per utterance: id, decoded text and slots."""
        log_probs, frame_lengths = self.ctc_forward(batch)
        out = []
        for uid, hyp in zip(batch.ids, self.decode(log_probs, frame_lengths, sep=""), strict=True):
            text, slots = parse_tagged(hyp)
            out.append({"id": uid, "text": text, "slots": [list(s) for s in slots]})
        return out


# --------------------------------------------------------------------------------------------
# Audio SNIPS adapter
# --------------------------------------------------------------------------------------------

# SUPERB SF's speaker split of the 16 Amazon Polly voices (s3prl downstream/ctc/snips.yaml,
# problem/asr/superb_sf.py): disjoint speakers for train, valid (our dev) and test.
SUPERB_SPEAKERS: dict[str, tuple[str, ...]] = {
    "train": ("Ivy", "Joanna", "Joey", "Justin", "Kendra", "Kimberly", "Matthew", "Salli"),
    "dev": ("Aditi", "Amy", "Geraint", "Nicole"),
    "test": ("Brian", "Emma", "Raveena", "Russell"),
}
# s3prl drops these tokens from the transcript (and their tags) before building the CTC target.
_PUNCT = {"?", "!", ".", ",", ";", "-", "–", "…"}


def iob_to_slots(words: Sequence[str], tags: Sequence[str]) -> list[list[str]]:
    """Slots from per-word tags as in all.iob.snips.txt: a run of words with one tag is one slot.

    The tags there are bare slot names ("O" outside a slot), not B-/I- prefixed; like s3prl's
    character-slot encoder, consecutive words with the same tag form one slot. (B-/I- prefixed
    tags are also understood: a B- starts a new slot.)
    """
    slots: list[list[str]] = []
    prev = "O"
    for word, tag in zip(words, tags, strict=True):
        if tag == "O":
            prev = "O"
            continue
        if tag.startswith("B-"):
            name, new = tag[2:], True
        elif tag.startswith("I-"):
            name, new = tag[2:], prev != tag[2:]
        else:
            name, new = tag, prev != tag
        if new:
            slots.append([name, word])
        else:
            slots[-1][1] += " " + word
        prev = name
    return slots


def _read_iob(path: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """all.iob.snips.txt: "<uid> BOS W1 .. Wn EOS<TAB>O T1 .. Tn <intent>" per line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing Audio SNIPS transcript file (all.iob.snips.txt)")
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            head, sep, tail = line.rstrip("\r\n").partition("\t")
            words, tags = head.split(), tail.split()
            if not sep or len(words) < 3 or words[1] != "BOS" or words[-1] != "EOS":
                raise ValueError(
                    f"{path}:{lineno}: malformed line: expected '<uid> BOS WORDS EOS<TAB>O TAGS INTENT', "
                    f"got {line.strip()[:80]!r}"
                )
            uid, words = words[0], words[2:-1]
            if len(tags) != len(words) + 2:
                raise ValueError(
                    f"{path}:{lineno}: {len(words)} words but {len(tags)} tags (expected O + one tag per word + intent)"
                )
            out[uid] = (words, tags[1:-1], tags[-1])
    return out


def _normalise(words: list[str], tags: list[str]) -> tuple[list[str], list[str]]:
    # As s3prl: drop punctuation tokens, '&' -> 'and'; then lower-case (our vocabulary is lower case).
    kept_w, kept_t = [], []
    for w, t in zip(words, tags, strict=True):
        if w in _PUNCT:
            continue
        kept_w.append("and" if w == "&" else w.lower())
        kept_t.append(t)
    return kept_w, kept_t


def prepare(
    root: str | Path,
    out: str | Path,
    train_speakers: Sequence[str] = SUPERB_SPEAKERS["train"],
    dev_speakers: Sequence[str] = SUPERB_SPEAKERS["dev"],
    test_speakers: Sequence[str] = SUPERB_SPEAKERS["test"],
) -> dict[str, int]:
    """Read Audio SNIPS as SUPERB SF prepares it and write {out}/sf/{train,dev,test}.jsonl.

    Expected layout (s3prl's `preprocess/snips_prepare_data.sh` output, the `path` of its snips.yaml):
        all.iob.snips.txt     one line per utterance and voice:
                              "<Speaker>-snips-<split>-<n> BOS W1 .. Wn EOS<TAB>O T1 .. Tn <intent>"
                              (upper-case words; Ti a bare slot name or O; a run of equal tags = one slot)
        train/ valid/ test/   16 kHz wavs "<Speaker>-snips-<split>-<n>.wav" (any depth below)
        slots.txt             slot names (not needed: the slots come from the tags)
    Utterances go to train/dev/test by folder (valid -> dev) and by voice, with SUPERB's speaker
    lists by default; wavs without a transcript line are skipped (counted in the log), as s3prl does.
    Each record: text (lower case, punctuation tokens dropped, '&' -> 'and'), labels {"intent"},
    slots [[type, value], ...] in order, speaker (the voice). A missing or malformed file, or a
    split with no utterance, raises an error naming it.
    """
    root = Path(root)
    transcripts = _read_iob(root / "all.iob.snips.txt")
    counts = {}
    for split, folder_name, speakers in (
        ("train", "train", train_speakers),
        ("dev", "valid", dev_speakers),
        ("test", "test", test_speakers),
    ):
        folder = root / folder_name
        if not folder.is_dir():
            raise FileNotFoundError(f"Audio SNIPS split folder not found: {folder}")
        wanted = set(speakers)
        manifest = Path(out) / "sf" / f"{split}.jsonl"
        records, no_text = [], 0
        for wav in sorted(folder.rglob("*.wav")):
            uid = wav.stem
            if uid not in transcripts:
                no_text += 1
                continue
            speaker = uid.split("-")[0]
            if speaker not in wanted:
                continue
            words, tags, intent = transcripts[uid]
            words, tags = _normalise(words, tags)
            if not words:
                raise ValueError(f"{root / 'all.iob.snips.txt'}: utterance {uid} has no words left")
            records.append(
                Record(
                    id=uid,
                    audio=relative_audio(wav, manifest.parent),
                    duration=round(duration_seconds(wav), 4),
                    text=" ".join(words),
                    speaker=speaker,
                    labels={"intent": intent},
                    slots=iob_to_slots(words, tags),
                )
            )
        if no_text:
            log.warning(
                "snips %s: %d wav files under %s have no line in all.iob.snips.txt", split, no_text, folder
            )
        if not records:
            raise ValueError(f"{folder}: no wav of speakers {', '.join(sorted(wanted))} with a transcript")
        write_manifest(manifest, records)
        counts[split] = len(records)
        log.info("snips %s: %d utterances", split, len(records))
    return counts
