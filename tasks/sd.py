"""SD: two-speaker diarization on LibriMix, frame-level speaker activity, PIT loss, DER.

The module, the data module and the LibriMix (SUPERB SD) adapter, as one self-contained unit.

Labels: one row per encoder frame (16 kHz / the product of the conv strides: 320 samples, 50 frames/s
for wav2vec2-family encoders), one column per speaker (2), 1 where the speaker talks. A segment
[start, end) in seconds covers frames round(start * rate) .. round(end * rate) - 1, as s3prl rounds
(it labels at a 160-sample shift and repeats 20 ms features; we label at the encoder's own rate).
Head (SUPERB's): a 1-layer unidirectional LSTM over frames and a linear layer to one logit per speaker.
Loss: BCE with permutation-invariant training (the better of the 2 speaker orders per utterance).
Metric: DER (`tasks.metrics.DiarizationErrorRate`), collar 0, overlap scored, threshold 0.5 on the
sigmoid, no median filter; its miss / false-alarm / confusion parts are logged too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from rewiring.audio import SAMPLE_RATE, Skipped
from rewiring.encoder import SpeechEncoder
from rewiring.manifest import Record, write_manifest
from rewiring.rttm import read_rttm
from tasks.adapters import relative_audio
from tasks.data import Item, ManifestDataset, TaskBatch, TaskDataModule
from tasks.metrics import DiarizationErrorRate, pit_bce
from tasks.module import Stage, TaskModule
from tasks.rnn import FrameLSTM

__all__ = ["SpeakerDiarization", "SpeakerDiarizationData", "frame_activity", "prepare"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _speaker_columns(record: Record, num_speakers: int) -> list[list[float]]:
    """[[column, start, end], ...]: speakers numbered in order of first turn (PIT makes the order moot)."""
    if record.segments is None:
        raise ValueError(f"sd: record {record.id!r} has no segments (speaker activity)")
    columns: dict[str, int] = {}
    out = []
    for spk, start, end in sorted(record.segments, key=lambda s: (s[1], s[2])):
        if spk not in columns:
            if len(columns) == num_speakers:
                raise ValueError(
                    f"sd: record {record.id!r} has more than {num_speakers} speakers ({sorted({s[0] for s in record.segments})})"
                )
            columns[spk] = len(columns)
        out.append([float(columns[spk]), float(start), float(end)])
    return out


class _CroppedSegments(ManifestDataset):
    """Training reads recordings longer than ``crop_seconds`` as one random window; turns move with it."""

    def __getitem__(self, i: int) -> Item | Skipped:
        rec = self.records[i]
        crop = self.crop_seconds
        if crop is None or rec.duration <= crop:
            return super().__getitem__(i)
        offset = float(torch.rand(())) * (rec.duration - crop)
        # offset is within the record's segment (a record may itself be a segment of a long recording)
        wav = self.load(rec, offset=offset, duration=crop)
        if isinstance(wav, Skipped):
            return wav
        return Item(id=rec.id, wav=wav, target=self.crop_target(self.target_fn(rec), offset, crop))

    def crop_target(self, target: list, offset: float, seconds: float) -> list:
        """The turns inside the window [offset, offset + seconds), shifted to start at it (a cached
        crop of the feature cache moves its turns with the same method)."""
        turns = []
        for col, start, end in target:
            s, e = max(start - offset, 0.0), min(end - offset, seconds)
            if e > s:
                turns.append([col, s, e])
        return turns


class SpeakerDiarizationData(TaskDataModule):
    """Mixtures with speaker turns ({root}/sd/*.jsonl: segments [[speaker, start, end], ...] in seconds).

    Target per recording: its turns with speakers as columns 0..num_speakers-1, batched as a
    [B, S, 3] tensor (column, start, end; column -1 pads). Frame labels are made by the model,
    which knows the encoder's frame rate.

    Args (besides TaskDataModule's):
        num_speakers: speakers per recording (2 in SUPERB SD; a recording with more is an error).
        crop_seconds: training reads longer recordings as one random window of this length, as
            SUPERB trains on 20 s chunks; None reads whole recordings. Evaluation reads whole recordings.
    """

    task: ClassVar[str] = "sd"
    stratify: ClassVar[str | None] = None
    dataset_class: ClassVar[type[ManifestDataset]] = _CroppedSegments

    def __init__(self, num_speakers: int = 2, crop_seconds: float | None = 20.0, **kwargs: Any) -> None:
        # TaskDataModule's arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(**kwargs)
        if num_speakers < 1:
            raise ValueError(f"num_speakers must be >= 1, got {num_speakers}")
        if crop_seconds is not None and crop_seconds <= 0:
            raise ValueError(f"crop_seconds must be positive or null, got {crop_seconds}")
        self.num_speakers = num_speakers
        self.train_crop_seconds = crop_seconds  # TaskDataModule.dataset crops training reads by it

    def build_spec(self, train_records: list[Record]) -> dict[str, Any]:
        return {"num_speakers": self.num_speakers}

    def target(self, record: Record) -> list[list[float]]:
        return _speaker_columns(record, self.num_speakers)

    def collate_targets(self, targets: list[list[list[float]]]) -> Tensor:
        out = torch.full((len(targets), max(1, max(len(t) for t in targets)), 3), -1.0)
        for i, turns in enumerate(targets):
            if turns:
                out[i, : len(turns)] = torch.tensor(turns)
        return out


def frame_activity(turns: Tensor, num_frames: int, frame_rate: float, num_speakers: int) -> Tensor:
    """[B, F, K] 0/1 activity from turns [B, S, 3] (column, start s, end s; column < 0 = padding).

    Frame f is active for a turn when round(start * rate) <= f < round(end * rate). Vectorised.
    """
    col = turns[..., 0].long()
    start = torch.round(turns[..., 1] * frame_rate)
    end = torch.round(turns[..., 2] * frame_rate)
    f = torch.arange(num_frames, device=turns.device, dtype=turns.dtype)[None, :, None]  # [1, F, 1]
    on = (f >= start[:, None, :]) & (f < end[:, None, :]) & (col >= 0)[:, None, :]  # [B, F, S]
    one_hot = torch.nn.functional.one_hot(col.clamp(min=0), num_speakers).to(turns.dtype)  # [B, S, K]
    return (torch.einsum("bfs,bsk->bfk", on.to(turns.dtype), one_hot) > 0).float()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class SpeakerDiarization(TaskModule):
    """Encoder + SUPERB's SD head (1-layer LSTM over frames, linear to a logit per speaker), PIT BCE, DER.

    Args (besides TaskModule's):
        lstm_hidden: LSTM size (SUPERB: 512).
        lstm_layers: LSTM layers (SUPERB: 1).
        threshold: speaker active when sigmoid(logit) > threshold (for DER).
    """

    task: ClassVar[str] = "sd"
    primary_metric: ClassVar[str] = "val/der"
    metric_mode: ClassVar[Literal["max", "min"]] = "min"

    def __init__(
        self,
        encoder: SpeechEncoder,
        lstm_hidden: int = 512,
        lstm_layers: int = 1,
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        # TaskModule's arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(encoder, **kwargs)
        self.lstm_hidden = lstm_hidden
        self.lstm_layers = lstm_layers
        self.threshold = threshold
        self.frame_rate = SAMPLE_RATE / encoder.samples_per_frame  # frames per second (50 for wav2vec2 and Whisper)

    def build_head(self, spec: dict[str, Any]) -> None:
        self.num_speakers = int(spec["num_speakers"])
        self.rnn = FrameLSTM(self.encoder.hidden_size, self.lstm_hidden, num_layers=self.lstm_layers, bidirectional=False)
        self.linear = nn.Linear(self.lstm_hidden, self.num_speakers)

    def build_metrics(self) -> dict[str, Metric]:
        return {
            "der": DiarizationErrorRate(self.threshold),
            "der_miss": DiarizationErrorRate(self.threshold, component="miss"),
            "der_fa": DiarizationErrorRate(self.threshold, component="fa"),
            "der_conf": DiarizationErrorRate(self.threshold, component="conf"),
        }

    def logits(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-frame speaker logits [B, F, K] (fp32) and the frame mask [B, F]."""
        out = self.encode(batch)
        hidden = self.rnn(out.features, out.frame_mask.sum(1))
        return self.linear(hidden).float(), out.frame_mask

    def step(self, batch: TaskBatch, stage: Stage) -> Tensor:
        logits, mask = self.logits(batch)
        labels = frame_activity(
            batch.targets.to(logits.device), logits.shape[1], self.frame_rate, self.num_speakers
        )
        loss, _ = pit_bce(logits, labels, mask)
        metrics = self.metrics(stage)
        if metrics is not None:
            probs = torch.sigmoid(logits.detach())
            for metric in metrics.values():
                metric.update(probs, labels, mask)
        return loss

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Per recording: id, frame rate and the [F, K] speaker probabilities over its real frames."""
        logits, mask = self.logits(batch)
        probs = torch.sigmoid(logits)
        return [
            {"id": uid, "frame_rate": self.frame_rate, "probs": probs[i, : int(mask[i].sum())].cpu()}
            for i, uid in enumerate(batch.ids)
        ]


# --------------------------------------------------------------------------------------------
# LibriMix adapter (the Kaldi-style data directories SUPERB SD trains on)
# --------------------------------------------------------------------------------------------


def _data_dir(root: Path, split: str) -> Path:
    # s3prl's LibriMix preparation writes <target>/train, dev, test (the SUPERB config's
    # downstream/diarization/data/{train,dev,test}); its per-speaker-count variant writes train2, dev2, test2.
    for name in (split, f"{split}2"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"LibriMix data folder not found: {root / split} (nor {root / (split + '2')})")


def _read_table(path: Path, what: str) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what} file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append((lineno, line.split()))
    return rows


def _read_wav_scp(path: Path, base: Path) -> dict[str, Path]:
    wavs: dict[str, Path] = {}
    for lineno, fields in _read_table(path, "wav.scp"):
        if len(fields) != 2:
            raise ValueError(
                f"{path}:{lineno}: expected '<recording-id> <wav path>' (pipes and extended filenames "
                f"are not supported), got {' '.join(fields)[:80]!r}"
            )
        rec, wav = fields
        p = Path(wav)
        if not p.is_absolute():
            p = base / p
        if not p.is_file():
            raise FileNotFoundError(f"{p}: audio of recording {rec} ({path}:{lineno}) is missing")
        if rec in wavs:
            raise ValueError(f"{path}:{lineno}: duplicate recording id {rec}")
        wavs[rec] = p.resolve()
    return wavs


def _read_reco2dur(path: Path) -> dict[str, float]:
    durs = {}
    for lineno, fields in _read_table(path, "reco2dur"):
        try:
            rec, dur = fields
            durs[rec] = float(dur)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: expected '<recording-id> <seconds>', got {' '.join(fields)[:80]!r}"
            ) from None
        if not durs[rec] > 0:
            raise ValueError(f"{path}:{lineno}: non-positive duration {dur}")
    return durs


def prepare(root: str | Path, out: str | Path, num_speakers: int = 2) -> dict[str, int]:
    """Read SUPERB SD's LibriMix data folders and write {out}/sd/{train,dev,test}.jsonl.

    Expected layout: the Kaldi-style folders s3prl builds from Libri2Mix `wav16k/max` `mix_both`
    (its LibriMix `prepare_diarization.py`, the data the SUPERB SD config reads from
    `downstream/diarization/data/{train,dev,test}`), under `root`:
        {train,dev,test}/wav.scp    "<recording-id> <wav path>"  (absolute, or relative to root)
        {train,dev,test}/rttm       "SPEAKER <rec> 1 <tbeg> <tdur> <NA> <NA> <speaker> <NA>"
        {train,dev,test}/reco2dur   "<recording-id> <seconds>"
    (`train2`, `dev2`, `test2` are accepted too; `segments`, `utt2spk` and `spk2utt` hold the same
    turns as rttm and are not read.) Each recording becomes one record: the mixture wav, its
    duration from reco2dur, and `segments` [[speaker, start, end], ...] from the rttm.
    A missing or malformed file, an rttm turn for an unknown recording, a recording with more than
    `num_speakers` speakers, or a missing wav raises an error naming the file.
    """
    root = Path(root)
    counts = {}
    for split in ("train", "dev", "test"):
        folder = _data_dir(root, split)
        wavs = _read_wav_scp(folder / "wav.scp", root)
        durs = _read_reco2dur(folder / "reco2dur")
        turns = read_rttm(folder / "rttm")
        unknown = sorted(set(turns) - set(wavs))
        if unknown:
            raise ValueError(
                f"{folder / 'rttm'}: turns for recordings missing from wav.scp: {', '.join(unknown[:5])}"
            )
        manifest = Path(out) / "sd" / f"{split}.jsonl"
        records = []
        for rec, wav in wavs.items():
            if rec not in durs:
                raise ValueError(f"{folder / 'reco2dur'}: no duration for recording {rec}")
            segs = sorted(turns.get(rec, []), key=lambda s: (s[1], s[2], s[0]))
            speakers = {s[0] for s in segs}
            if len(speakers) > num_speakers:
                raise ValueError(
                    f"{folder / 'rttm'}: recording {rec} has {len(speakers)} speakers, more than {num_speakers}"
                )
            records.append(
                Record(id=rec, audio=relative_audio(wav, manifest.parent), duration=durs[rec], segments=segs)
            )
        if not records:
            raise ValueError(f"{folder / 'wav.scp'}: no recordings")
        write_manifest(manifest, records)
        counts[split] = len(records)
        log.info("librimix %s: %d recordings", split, len(records))
    return counts
