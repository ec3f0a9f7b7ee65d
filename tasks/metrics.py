"""Metrics that torchmetrics does not have: diarization error rate, SUPERB's slot metrics, PIT loss.

All metrics are `torchmetrics.Metric` subclasses whose states are sums, so they accumulate over
batches and sync under DDP by summation (the only correct way to merge a ratio of totals).
They follow the definitions the paper's numbers come from (SUPERB, through s3prl):

- DER: frame-level, collar 0, overlapped speech scored. SUPERB scores diarization with dscore
  (s3prl `downstream/diarization/score.sh` calls `dscore/score.py -r ref.rttm -s hyp.rttm` with no
  `--collar` and no `--ignore_overlaps`; dscore's defaults are `collar=0.0`, `ignore_overlaps=False`),
  and its training-time DER is EEND's frame-level `calc_diarization_error`, the same quantity.
  Speakers are mapped per recording so that the mapped co-activity is largest, as dscore and
  md-eval do; on frames that is the mapping with the smallest DER.
- slot_type_f1 and slot_value_cer: s3prl `downstream/ctc/metric.py` (the metrics SUPERB SF reports,
  slot_type_f1 first, used to pick the checkpoint).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "DiarizationErrorRate",
    "SlotTypeF1",
    "SlotValueCER",
    "diarization_errors",
    "edit_distance",
    "pit_bce",
    "slot_type_f1",
    "slot_value_errors",
]

Slot = tuple[str, str] | list[str]  # (slot_type, value)


# --------------------------------------------------------------------------------------------
# Diarization
# --------------------------------------------------------------------------------------------


def _best_mapped(cooc: Tensor) -> Tensor:
    """Largest total co-activity over one-to-one speaker mappings, per utterance.

    cooc: [B, K, K] frames where reference speaker i and system speaker j are both active.
    2 speakers (the SUPERB setting): both permutations, vectorised. More: the Hungarian
    algorithm (scipy) per utterance, or every permutation when scipy is missing (small K only).
    """
    b, k, _ = cooc.shape
    if k == 1:
        return cooc[:, 0, 0]
    if k == 2:
        same = cooc[:, 0, 0] + cooc[:, 1, 1]
        swap = cooc[:, 0, 1] + cooc[:, 1, 0]
        return torch.maximum(same, swap)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy is present in the project venv
        if k > 7:
            raise ImportError(f"DER with {k} speakers needs scipy (linear_sum_assignment)") from None
        perms = torch.tensor(list(itertools.permutations(range(k))), device=cooc.device)  # [P, K]
        rows = torch.arange(k, device=cooc.device)
        return cooc[:, rows, perms].sum(-1).max(-1).values  # [B, P, K] -> [B]
    out = torch.zeros(b, dtype=cooc.dtype, device=cooc.device)
    host = cooc.detach().cpu().numpy()
    for i in range(b):
        r, c = linear_sum_assignment(host[i], maximize=True)
        out[i] = int(host[i][r, c].sum())
    return out


def diarization_errors(
    preds: Tensor, target: Tensor, mask: Tensor | None = None, threshold: float = 0.5
) -> dict[str, Tensor]:
    """Frame counts of missed speech, false alarm, speaker confusion and reference speaker time.

    preds: [B, F, Ks] probabilities (thresholded at `threshold`) or booleans; target: [B, F, Kr] 0/1;
    mask: [B, F], true on real frames. Counts are in speaker-frames (a frame where two reference
    speakers talk counts twice), summed over the batch, each utterance with its own best mapping:
      missed    = sum_f max(n_ref - n_sys, 0)
      false_alarm = sum_f max(n_sys - n_ref, 0)
      confusion = sum_f min(n_ref, n_sys) - mapped, mapped = co-active frames under the best mapping
      speaker_time = sum_f n_ref
    """
    if preds.dim() != 3 or target.dim() != 3 or preds.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"DER needs preds [B, F, Ks] and target [B, F, Kr] with the same B, F; "
            f"got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    sys = preds.bool() if preds.dtype == torch.bool else preds > threshold
    ref = target > 0.5
    if mask is not None:
        m = mask.bool().unsqueeze(-1)
        sys = sys & m
        ref = ref & m
    k = max(sys.shape[-1], ref.shape[-1])
    sys = F.pad(sys, (0, k - sys.shape[-1]))
    ref = F.pad(ref, (0, k - ref.shape[-1]))
    sys_l, ref_l = sys.long(), ref.long()
    n_sys, n_ref = sys_l.sum(-1), ref_l.sum(-1)  # [B, F]
    cooc = torch.einsum("bfi,bfj->bij", ref_l, sys_l)  # [B, Kref, Ksys]
    mapped = _best_mapped(cooc).sum()
    return {
        "missed": (n_ref - n_sys).clamp(min=0).sum(),
        "false_alarm": (n_sys - n_ref).clamp(min=0).sum(),
        "confusion": torch.minimum(n_ref, n_sys).sum() - mapped,
        "speaker_time": n_ref.sum(),
    }


class DiarizationErrorRate(Metric):
    """DER = (missed + false alarm + confusion) / reference speaker time, over frames.

    Collar 0 and overlap scored, as in SUPERB's reported setting (dscore defaults; see the module
    docstring). The speaker mapping is chosen per utterance. Decisions are `preds > threshold`
    (SUPERB thresholds sigmoid outputs; its scoring script also sweeps thresholds and median filters
    and reports the best, which we do not: this is the plain 0.5-threshold, no-filter number).
    Accumulates frame counts, so the result is the corpus DER, not a mean of per-batch DERs.
    With no reference speech at all it returns the error count divided by 1 (0 when nothing is said).

    component: "der" (default), or one of its three parts, each over reference speaker time:
    "miss", "fa", "conf" (they sum to the DER), to log them as metrics of their own.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _PARTS = {
        "der": ("missed", "false_alarm", "confusion"),
        "miss": ("missed",),
        "fa": ("false_alarm",),
        "conf": ("confusion",),
    }

    def __init__(self, threshold: float = 0.5, component: str = "der", **kwargs) -> None:
        super().__init__(**kwargs)
        if component not in self._PARTS:
            raise ValueError(f"component must be one of {sorted(self._PARTS)}, got {component!r}")
        self.threshold = threshold
        self.component = component
        for name in ("missed", "false_alarm", "confusion", "speaker_time"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        counts = diarization_errors(preds, target, mask, self.threshold)
        self.missed += counts["missed"]
        self.false_alarm += counts["false_alarm"]
        self.confusion += counts["confusion"]
        self.speaker_time += counts["speaker_time"]

    def _rate(self, x: Tensor) -> Tensor:
        return x.float() / self.speaker_time.clamp(min=1).float()

    def compute(self) -> Tensor:
        return self._rate(sum(getattr(self, n) for n in self._PARTS[self.component]))

    def components(self) -> dict[str, Tensor]:
        """The three error rates (each over reference speaker time); they sum to the DER."""
        return {k: self._rate(getattr(self, v[0])) for k, v in self._PARTS.items() if k != "der"}


def pit_bce(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Permutation-invariant BCE: per utterance, the speaker order of `target` that fits best.

    logits, target: [B, F, K]; mask: [B, F] real frames. For every permutation p of the K
    speakers (2 for SUPERB SD) the per-utterance loss is the mean BCE over real frames and
    speakers with target[..., p]; each utterance takes its minimum, the batch is averaged.
    Vectorised over permutations (K! of them, fine for K <= 4). Returns (loss, best permutation
    index per utterance, into itertools.permutations(range(K)) order).
    """
    b, f, k = logits.shape
    if target.shape != logits.shape:
        raise ValueError(
            f"PIT needs logits and target of one shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    perms = torch.tensor(list(itertools.permutations(range(k))), device=logits.device)  # [P, K]
    tp = target.float()[:, :, perms]  # [B, F, P, K]
    lg = logits.float().unsqueeze(2).expand_as(tp)
    bce = F.binary_cross_entropy_with_logits(lg, tp, reduction="none").sum(-1)  # [B, F, P]
    if mask is None:
        mask = torch.ones(b, f, dtype=torch.bool, device=logits.device)
    m = mask.float().unsqueeze(-1)
    per_utt = (bce * m).sum(1) / (m.sum(1).clamp(min=1) * k)  # [B, P]
    best, idx = per_utt.min(-1)
    return best.mean(), idx


# --------------------------------------------------------------------------------------------
# Slot filling (SUPERB SF)
# --------------------------------------------------------------------------------------------


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit costs) between two sequences (strings: characters)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _by_type(slots: Sequence[Slot]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for slot_type, value in slots:
        out.setdefault(slot_type, []).append(value)
    return out


def slot_type_f1(pred: Sequence[Slot], ref: Sequence[Slot]) -> float:
    """SUPERB's per-utterance slot-type F1: F1 between the *sets of slot types* present.

    Values play no part (slot_value_cer covers them). Both empty: 1; one empty: 0.
    P = |types(pred) & types(ref)| / |types(pred)|, R = same / |types(ref)|, F1 = 2PR/(P+R).
    """
    p_types, r_types = set(_by_type(pred)), set(_by_type(ref))
    if not p_types and not r_types:
        return 1.0
    if not p_types or not r_types:
        return 0.0
    hit = len(p_types & r_types)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(p_types), hit / len(r_types)
    return 2 * precision * recall / (precision + recall)


def slot_value_errors(pred: Sequence[Slot], ref: Sequence[Slot]) -> tuple[int, int]:
    """(character edits, reference characters) for the slot values of one utterance, as SUPERB.

    Every reference slot is compared with a predicted value of the same type: the one with the
    lowest CER against it (the first on ties; a predicted value may serve several references),
    or the empty string when the prediction has no slot of that type. Predicted slots of types
    the reference lacks cost nothing here (slot_type_f1 counts them).
    """
    hyp = _by_type(pred)
    edits = chars = 0
    for slot_type, ref_value in ref:
        candidates = hyp.get(slot_type, [])
        if not candidates:
            best = len(ref_value)
        else:
            best = min(edit_distance(h, ref_value) for h in candidates)
        edits += best
        chars += len(ref_value)
    return edits, chars


def _check_pairs(preds: Sequence, target: Sequence) -> None:
    if len(preds) != len(target):
        raise ValueError(
            f"slot metrics need one prediction per reference, got {len(preds)} and {len(target)}"
        )


class SlotTypeF1(Metric):
    """SUPERB SF's `slot_type_f1`: the mean over utterances of `slot_type_f1(pred, ref)`.

    update(preds, target): per utterance, a list of (slot_type, value) pairs in order.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("f1_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Sequence[Slot]], target: Sequence[Sequence[Slot]]) -> None:
        _check_pairs(preds, target)
        self.f1_sum += sum(slot_type_f1(p, r) for p, r in zip(preds, target, strict=True))
        self.count += len(target)

    def compute(self) -> Tensor:
        return (self.f1_sum / self.count.clamp(min=1)).float()


class SlotValueCER(Metric):
    """SUPERB SF's `slot_value_cer`: character edits over reference slot-value characters, corpus-wide."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("edits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("chars", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Sequence[Slot]], target: Sequence[Sequence[Slot]]) -> None:
        _check_pairs(preds, target)
        for p, r in zip(preds, target, strict=True):
            e, c = slot_value_errors(p, r)
            self.edits += e
            self.chars += c

    def compute(self) -> Tensor:
        return self.edits.float() / self.chars.clamp(min=1).float()
