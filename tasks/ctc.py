"""CTC tasks (asr, sf): the vocabulary, the BiLSTM head, the fp32 loss, greedy decoding, and the
data and model bases that wire them together (with the all-blank warning).

The vocabulary is built from the train manifest and saved with the checkpoint (the data spec
``{"vocab": [...]}``), so every low-resource split of a corpus has the same head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from rewiring.encoder import SpeechEncoder
from rewiring.manifest import Record
from tasks.data import TaskBatch, TaskDataModule
from tasks.module import Stage, TaskModule
from tasks.rnn import FrameLSTM
from tasks.specaug import SpecAugment

__all__ = [
    "CTCHead",
    "CTCTargets",
    "CTCTaskDataModule",
    "CTCTaskModule",
    "Vocabulary",
    "ctc_loss",
    "greedy_decode",
]


class Vocabulary:
    """CTC tokens: index 0 is the blank, then the tokens seen in the train manifest (sorted).

    Tokens are characters for asr; sf adds multi-character slot tags. ``encode`` takes a string
    (split into characters) or a sequence of tokens; tokens not in the vocabulary are dropped and
    counted in ``unknown`` (dev/test may hold a character that train never had).
    """

    BLANK = "<blank>"

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if not tokens or tokens[0] != self.BLANK:
            raise ValueError(f"a CTC vocabulary starts with {self.BLANK!r}, got {tokens[:3]!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.unknown = 0

    @classmethod
    def build(cls, sequences: Sequence[str | Sequence[str]]) -> Vocabulary:
        """From the train targets (strings: characters; lists: tokens)."""
        seen = {tok for seq in sequences for tok in seq}
        seen.discard(cls.BLANK)
        return cls([cls.BLANK, *sorted(seen)])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, seq: str | Sequence[str]) -> list[int]:
        out = [self.index.get(t, -1) for t in seq]
        bad = out.count(-1)
        if bad:
            self.unknown += bad
        return [i for i in out if i > 0]

    def decode(self, ids: Sequence[int], sep: str = "") -> str:
        return sep.join(self.tokens[i] for i in ids if 0 < i < len(self.tokens))


@dataclass
class CTCTargets:
    """Padded token ids [B, S] (0 = padding, never a target), their lengths [B], and the reference texts."""

    tokens: Tensor
    lengths: Tensor
    texts: list[str]


class CTCHead(nn.Module):
    """SUPERB's ASR head: a BiLSTM over frame features, then a linear layer to the tokens (log-probs, fp32).

    ``projector_dim`` adds s3prl's frame-wise Linear before the BiLSTM (its ``project_dim``: 1024 in the
    asr and snips recipes); None feeds the features straight in. ``dropout`` follows every BiLSTM
    layer, the last one included, as s3prl's RNNLayer does.
    """

    def __init__(
        self,
        in_dim: int,
        vocab_size: int,
        hidden: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        projector_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.projector = nn.Linear(in_dim, projector_dim) if projector_dim else nn.Identity()
        in_dim = projector_dim or in_dim
        # num_layers 0: no recurrence, a frame-wise probe (projector, GELU, linear): the cheapest head.
        self.lstm = (
            FrameLSTM(in_dim, hidden, num_layers=num_layers, bidirectional=True, dropout=dropout)
            if num_layers > 0
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(2 * hidden if self.lstm is not None else in_dim, vocab_size)

    def forward(self, features: Tensor, frame_lengths: Tensor) -> Tensor:
        out = self.projector(features)
        out = self.lstm(out, frame_lengths) if self.lstm is not None else F.gelu(out)
        logits = self.linear(self.dropout(out))
        return F.log_softmax(logits.float(), dim=-1)


def ctc_loss(log_probs: Tensor, frame_lengths: Tensor, targets: CTCTargets) -> Tensor:
    """CTC in fp32 (under bf16/fp16 it goes NaN) with ``zero_infinity`` (impossible alignments give 0)."""
    with torch.autocast(device_type=log_probs.device.type, enabled=False):
        return F.ctc_loss(
            log_probs.float().transpose(0, 1),  # [F, B, V]
            targets.tokens,
            frame_lengths,
            targets.lengths,
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )


def greedy_decode(log_probs: Tensor, frame_lengths: Tensor) -> list[list[int]]:
    """Best path: argmax per frame, repeats collapsed, blanks (0) removed; one id list per utterance."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, frame_lengths.cpu().tolist(), strict=True):
        ids = torch.unique_consecutive(row[: int(n)]).tolist()
        out.append([i for i in ids if i != 0])
    return out


class CTCTaskDataModule(TaskDataModule):
    """A data module whose target is a token sequence (characters; sf adds slot tags).

    Hook: ``target_tokens(record) -> str | list[str]`` (default: the record's text). The vocabulary
    is built from the targets of the whole train manifest (spec ``{"vocab": [...]}``).
    """

    stratify: ClassVar[str | None] = None

    def target_tokens(self, record: Record) -> str | list[str]:
        if record.text is None:
            raise ValueError(f"{self.task}: record {record.id!r} has no text (CTC needs a transcript)")
        return record.text

    def build_spec(self, train_records: list[Record]) -> dict[str, Any]:
        return {"vocab": Vocabulary.build([self.target_tokens(r) for r in train_records]).tokens}

    @property
    def vocab(self) -> Vocabulary:
        if getattr(self, "_vocab", None) is None:
            self._vocab = Vocabulary(self.spec["vocab"])
        return self._vocab

    def target(self, record: Record) -> tuple[list[int], str]:
        seq = self.target_tokens(record)
        text = seq if isinstance(seq, str) else " ".join(seq)
        return self.vocab.encode(seq), text

    def collate_targets(self, targets: list[tuple[list[int], str]]) -> CTCTargets:
        lengths = torch.tensor([len(ids) for ids, _ in targets], dtype=torch.long)
        tokens = torch.zeros(len(targets), max(1, int(lengths.max())), dtype=torch.long)
        for i, (ids, _) in enumerate(targets):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return CTCTargets(tokens=tokens, lengths=lengths, texts=[t for _, t in targets])


class CTCTaskModule(TaskModule):
    """A TaskModule with the CTC head over ``spec["vocab"]``; subclasses write ``build_metrics`` and ``step``.

    In ``step``: ``log_probs, frame_lengths = self.ctc_forward(batch)``, ``loss = self.ctc_loss(...)``,
    and for val/test ``hyps = self.decode(log_probs, frame_lengths, stage)`` (strings), then the metrics.
    ``decode`` counts empty hypotheses; a validation epoch where every hypothesis is empty warns that
    the model predicts only blanks, and ``<stage>/blank_rate`` is logged.

    Args (besides TaskModule's): lstm_hidden, lstm_layers, dropout of the BiLSTM head; projector_dim
    (s3prl's Linear before the BiLSTM; None: none); specaug (`tasks.specaug.SpecAugment` over the
    features as they enter the head, training only, as s3prl's asr and snips recipes; None: none).
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        lstm_hidden: int = 256,
        lstm_layers: int = 2,
        dropout: float = 0.2,
        projector_dim: int | None = None,
        specaug: SpecAugment | None = None,
        **kwargs: Any,
    ) -> None:
        # TaskModule's arguments pass through **kwargs; jsonargparse reads them from super().__init__.
        super().__init__(encoder, **kwargs)
        self.lstm_hidden = lstm_hidden
        self.lstm_layers = lstm_layers
        self.dropout = dropout
        self.projector_dim = projector_dim
        self.specaug = specaug
        self._decoded = {"val": [0, 0], "test": [0, 0]}  # [empty, total] this epoch

    def build_head(self, spec: dict[str, Any]) -> None:
        self.vocab = Vocabulary(spec["vocab"])
        self.head = CTCHead(
            self.encoder.hidden_size,
            len(self.vocab),
            hidden=self.lstm_hidden,
            num_layers=self.lstm_layers,
            dropout=self.dropout,
            projector_dim=self.projector_dim,
        )

    def ctc_forward(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Log-probabilities [B, F, V] (fp32) and the real frame count of each row."""
        out = self.encode(batch)
        frame_lengths = out.frame_mask.sum(1)
        features = out.features
        if self.specaug is not None:  # after encode: the same masks on live and cached features
            features = self.specaug(features, out.frame_mask)
        return self.head(features, frame_lengths), frame_lengths

    def ctc_loss(self, log_probs: Tensor, frame_lengths: Tensor, targets: CTCTargets) -> Tensor:
        return ctc_loss(log_probs, frame_lengths, targets)

    def decode(
        self, log_probs: Tensor, frame_lengths: Tensor, stage: Stage | None = None, sep: str = ""
    ) -> list[str]:
        """Greedy hypotheses as strings (tokens joined by ``sep``); counts all-blank outputs per stage."""
        ids = greedy_decode(log_probs, frame_lengths)
        if stage in self._decoded:
            self._decoded[stage][0] += sum(1 for x in ids if not x)
            self._decoded[stage][1] += len(ids)
        return [self.vocab.decode(x, sep=sep) for x in ids]

    def _blank_check(self, stage: Stage) -> None:
        empty, total = self._decoded[stage]
        self._decoded[stage] = [0, 0]
        if total == 0 or self.trainer.sanity_checking:
            return
        self.log(f"{stage}/blank_rate", empty / total)
        if empty == total:
            msg = (
                f"{self.task}: the model predicts only blanks on all {total} {stage} utterances "
                f"(step {self.global_step}); a CTC model often does early on; if it persists, "
                f"check the learning rate and that inputs are long enough for the targets"
            )
            rank_zero_warn(msg, category=RuntimeWarning)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._blank_check("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._blank_check("test")
