"""Skipped inputs, counted per split and reason in every stage, and steps that stay on the K-step grid.

A dataset gives a `Skipped` (rewiring.audio) for an item it cannot use, carrying the utterance's id
and the reason code; the collate puts the ``(id, reason)`` pairs of a batch next to the ids it kept
(a batch with none kept is a `SkippedBatch`), and the module hands both to its `SkipLog`.

Counts are of distinct utterances. Per split, a `SkipTally` keeps what became of each utterance:
not drawn yet, used, or skipped and why. It is a torchmetrics `Metric` whose state is reduced with
``max`` over DDP ranks when read, so a count is the same whether a file was drawn once, in every
epoch, with replacement (ks's class-balanced sampler) or twice under DDP's padding, and it is the
union of every rank's share of the split. (A per-draw count summed over ranks would count a bad
file once per epoch.) Reading is collective under DDP: every rank calls `SkipLog.counts` (and `log`,
`finish`, `state`) at the same points, which Lightning's hooks guarantee.

What a run shows:
- TensorBoard: ``data/skipped/<split>/<reason>``, the utterances of the split skipped for that
  reason so far, against the global step (split: train, dev, test; rewiring and pre-training have
  train only). Only reasons that occurred get a series.
- convergence.json: a ``skipped`` section, per split ``{"utterances", "drawn", "used", "skipped":
  {reason: n}}`` (`counts`).
- At the end of a fit or test, one warning line per split that had skips, e.g.
  ``dev: 40 of 45 utterances used (5 skipped: 3 too_short, 2 unreadable)``.

`SkippableSteps` (a LightningModule mixin) keeps validation on its grid: Lightning's
``val_check_interval`` counts batches and ``global_step`` counts optimizer steps, so a batch that
yields no step (a collate that gives None, a training_step that returns None under DDP) moves every
later validation one step earlier. A batch with nothing to learn from instead returns `skip_step()`:
a zero loss tied to every trainable parameter (so backward, and DDP's gradient all-reduce, run as on
any step), after which the optimizer is not stepped. Weights and optimizer state stay as they were,
and ``global_step`` (and a per-step learning-rate schedule) moves on by one, as it would for a
real batch. (A zero loss alone would still move AdamW's weights by its momentum and weight decay.)
Under DDP a rank with a skipped batch adds zero gradients to the average and the optimizer steps
when any rank had data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics import Metric

from rewiring.audio import REASONS

__all__ = ["SKIP_REASONS", "SkipLog", "SkipTally", "SkippableSteps", "SkippedBatch", "summary_line"]

log = logging.getLogger(__name__)

# Bad audio (rewiring.audio), and the rewiring stage's own: no text to synthesise, text the TTS refuses.
SKIP_REASONS: tuple[str, ...] = (*REASONS, "no_text", "unsayable")
_NOT_DRAWN, _USED = -1, 0  # an outcome > 0 is 1 + the reason's index in SKIP_REASONS


@dataclass
class SkippedBatch:
    """A batch whose every item was skipped: what was skipped (id, reason), so it is counted; no tensors."""

    skipped: list[tuple[str, str]]
    ids: list[str] = field(default_factory=list)  # none kept

    def __len__(self) -> int:
        return 0


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class SkipTally(Metric):
    """What became of each utterance of one split: not drawn yet, used, or skipped (with the reason).

    The state is one small integer per utterance, reduced with ``max`` over ranks: a skip outranks
    a use, and seeing an utterance again changes nothing.
    """

    full_state_update = False
    outcome: Tensor

    def __init__(self, ids: Sequence[str]) -> None:
        super().__init__()
        self.ids = list(ids)
        self.ids_hash = _ids_hash(self.ids)
        self._row = {u: i for i, u in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("SkipTally: the split's ids are not unique")
        self.add_state(
            "outcome", torch.full((len(self.ids),), _NOT_DRAWN, dtype=torch.int8), dist_reduce_fx="max"
        )

    def _rows(self, ids: Iterable[str]) -> list[int]:
        try:
            return [self._row[u] for u in ids]
        except KeyError as e:
            raise KeyError(f"SkipTally: utterance {e.args[0]!r} is not in this split's manifest") from None

    def update(self, used: Sequence[str], skipped: Sequence[tuple[str, str]] = ()) -> None:
        rows = self._rows(used) + self._rows(u for u, _ in skipped)
        if not rows:
            return
        codes = [_USED] * len(used) + [1 + SKIP_REASONS.index(code) for _, code in skipped]
        device = self.outcome.device
        self.outcome.scatter_reduce_(
            0, torch.tensor(rows, device=device), torch.tensor(codes, dtype=torch.int8, device=device), "amax"
        )

    def synced(self) -> Tensor:
        """Every rank's outcomes, reduced (collective under DDP), on the CPU."""
        with self.sync_context():
            return self.outcome.detach().cpu().clone()

    @staticmethod
    def summarize(outcome: Tensor) -> dict[str, Any]:
        bins = torch.bincount(outcome.long() - _NOT_DRAWN, minlength=len(SKIP_REASONS) + 2).tolist()
        skipped = {reason: bins[k + 2] for k, reason in enumerate(SKIP_REASONS) if bins[k + 2]}
        return {
            "utterances": len(outcome),
            "drawn": len(outcome) - bins[0],
            "used": bins[1],
            "skipped": skipped,
        }

    def compute(self) -> dict[str, Any]:
        return self.summarize(self.outcome)

    def restore(self, saved: dict[str, Any]) -> bool:
        """Merge a checkpoint's outcomes (`SkipLog.state`); False when they are of another split's ids."""
        if not isinstance(saved, dict) or saved.get("ids_hash") != self.ids_hash:
            return False
        self.outcome = torch.maximum(self.outcome, saved["outcome"].to(self.outcome.device, torch.int8))
        return True


def summary_line(split: str, counts: dict[str, Any]) -> str | None:
    """The warning line of one split, "dev: 40 of 45 utterances used (5 skipped: 3 too_short, 2 unreadable)";
    None without skips."""
    skipped = counts["skipped"]
    if not skipped:
        return None
    total = sum(skipped.values())
    reasons = ", ".join(
        f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    undrawn = counts["utterances"] - counts["drawn"]
    tail = f"; {undrawn} not drawn" if undrawn else ""
    return f"{split}: {counts['used']} of {counts['utterances']} utterances used ({total} skipped: {reasons}{tail})"


@rank_zero_only
def _warn(lines: list[str]) -> None:
    for line in lines:
        log.warning(line)


class SkipLog(nn.Module):
    """A module's `SkipTally` per split (a submodule, so the tallies follow it to its device; their
    state is not in the state dict: `state`/`load` carry it in checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self._tallies = nn.ModuleDict()  # "<split>_tally" -> SkipTally ("train" is an nn.Module method)
        self._saved: dict[str, Any] = {}  # a checkpoint's tallies, for splits not tracked yet
        self.final: dict[str, dict[str, Any]] = {}  # the counts at the end of the fit or test (`finish`)

    @property
    def tallies(self) -> dict[str, SkipTally]:
        return {key.removesuffix("_tally"): tally for key, tally in self._tallies.items()}

    def track(self, split: str, ids: Sequence[str], device: torch.device | str | None = None) -> None:
        """Count the utterances `ids` of `split` (once per split; a later call with other ids replaces it)."""
        ids = list(ids)
        if split in self.tallies and self.tallies[split].ids_hash == _ids_hash(ids):
            return
        tally = SkipTally(ids)
        if device is not None:
            tally = tally.to(device)
        if split in self._saved and not tally.restore(self._saved.pop(split)):
            log.warning("the checkpoint's skip counts of %s are of other utterances; counting afresh", split)
        self._tallies[f"{split}_tally"] = tally

    def update(self, split: str, used: Sequence[str], skipped: Sequence[tuple[str, str]] = ()) -> None:
        tally = self.tallies.get(split)
        if tally is not None:
            tally.update(used, skipped)

    def counts(self, splits: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """{split: {"utterances", "drawn", "used", "skipped": {reason: n}}} over every rank's share (collective)."""
        tallies = self.tallies
        names = [s for s in (tallies if splits is None else splits) if s in tallies]
        return {s: SkipTally.summarize(tallies[s].synced()) for s in names}

    def log(self, trainer: Trainer, splits: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Write ``data/skipped/<split>/<reason>`` to the loggers at the global step; the counts."""
        counts = self.counts(splits)
        scalars = {
            f"data/skipped/{s}/{reason}": float(n)
            for s, c in counts.items()
            for reason, n in c["skipped"].items()
        }
        if scalars and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
        return counts

    def finish(self, trainer: Trainer, splits: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """At the end of a fit or test: log, keep as `final` (convergence.json reads it), and warn one
        line per split that had skips."""
        counts = self.log(trainer, splits)
        self.final.update(counts)
        _warn([line for s, c in counts.items() if (line := summary_line(s, c))])
        return counts

    def state(self) -> dict[str, Any]:
        """The tallies for a checkpoint (collective): tensors and strings, so it loads with weights_only."""
        return {s: {"ids_hash": t.ids_hash, "outcome": t.synced()} for s, t in self.tallies.items()}

    def load(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's tallies: merged into tracked splits, kept for the others until `track`."""
        tallies = self.tallies
        for split, saved in (state or {}).items():
            if split in tallies:
                if not tallies[split].restore(saved):
                    log.warning(
                        "the checkpoint's skip counts of %s are of other utterances; counting afresh", split
                    )
            else:
                self._saved[split] = saved


class SkippableSteps:
    """LightningModule mixin: `skip_step()` for a training batch with nothing to learn from, so that
    ``global_step`` keeps counting batches and validation stays on its K-step grid (module docstring).

    Put it before LightningModule in the bases. It defines `optimizer_step` and `on_before_backward`;
    a subclass that overrides either calls super().
    """

    _batch_skipped = False  # the current training batch returned skip_step()
    _real_batch = False  # a batch since the last optimizer step had a real loss

    def skip_step(self) -> Tensor:
        """A zero loss tied to every trainable parameter; the optimizer is not stepped for it."""
        self._batch_skipped = True
        params = [p for p in self.parameters() if p.requires_grad]
        return sum((p.sum() for p in params), torch.zeros((), device=self.device)) * 0.0

    def on_before_backward(self, loss: Tensor) -> None:
        self._real_batch |= not self._batch_skipped
        self._batch_skipped = False

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if optimizer_closure is None:
            optimizer.step()
            return
        loss = optimizer_closure()  # training_step and backward, as on every step
        real, self._real_batch, self._batch_skipped = self._real_batch, False, False
        if self.trainer.world_size > 1:  # every rank steps, or none: the weights stay the same on all
            real = self.trainer.strategy.reduce_boolean_decision(real, all=False)
        if real:
            optimizer.step(closure=lambda: loss)
