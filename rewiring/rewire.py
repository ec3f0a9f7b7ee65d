"""The rewiring stage's model: NT-Xent over pooled views of the pairs that rewiring/pairs.py builds;
every other utterance in the (global, under DDP) batch is a negative.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from rewiring.encoder import SpeechEncoder
from rewiring.files import write_json_atomic
from rewiring.frames import masked_mean
from rewiring.pairs import RewiringDataModule, resolve_manifest
from rewiring.resume import ResumableCheckpoint
from rewiring.skips import SkipLog, SkippableSteps

log = logging.getLogger(__name__)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent (InfoNCE, SimCLR's form): each of the 2N views must pick its partner among 2N-1 others.

    Returns the mean loss and the top-1 accuracy of that choice. Similarities are cosine; the
    logits and the softmax are computed in fp32 whatever the autocast dtype.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(dim=-1) == target).float().mean()
    return loss, acc


def learning_summary(history: list[tuple[int, float, float, int]], skipped: dict, window: int = 10) -> dict:
    """Did the contrastive task learn? Loss and in-batch match accuracy over the first and the last
    `window` steps, against chance (1 / (2n - 1): each view picks its partner among 2n - 1 others)."""
    if not history:
        return {"steps": 0, "skipped": skipped}
    first, last = history[:window], history[-window:]
    pairs = max(h[3] for h in history)

    def mean(rows: list, k: int) -> float:
        return round(sum(r[k] for r in rows) / len(rows), 4)

    return {
        "steps": len(history),
        "pairs_per_step": pairs,
        "match_acc_chance": round(1.0 / (2 * pairs - 1), 4),
        "match_acc_first": mean(first, 2),
        "match_acc_last": mean(last, 2),
        "loss_first": mean(first, 1),
        "loss_last": mean(last, 1),
        "window": window,
        "skipped": skipped,
    }


class RewiringModule(SkippableSteps, LightningModule):
    """Encode both views with the one shared encoder, pool, and optimise NT-Xent over the batch.

    Skipped utterances are counted per reason (rewiring.skips): ``data/skipped/train/<reason>`` in
    TensorBoard, the ``skipped`` section of rewiring.json (and convergence.json), a warning at the
    end. A batch with fewer than two pairs left (in the global batch, under DDP) takes a step without
    an update.

    Args:
        encoder: the SpeechEncoder being rewired (every parameter trained unless its config freezes some).
        temperature: NT-Xent temperature (the paper: 0.04).
        pool_layers: which hidden states are averaged before the mean over time: `all` (the
            paper's: the Transformer's input and every layer), `last`, or a list of indices.
        projection_dim: a projection head (Linear-ReLU-Linear) of this size on top, or None (the paper).
        optimizer: the optimizer factory (the paper: AdamW, lr 1e-6, weight decay 0.01, no scheduler).
        export_dir: where the rewired encoder is saved as an HF folder at the end of fit.
        isotropy_manifest: held-out utterances whose isotropy is measured before and after
            (written to `<export_dir>/isotropy.json`) and logged during training; None to skip.
        isotropy_every_n_steps: how often the IsotropyCallback logs `isotropy/*` on that set.
        transcription_check: for a Whisper encoder from a folder or hub name, have the source's decoder
            transcribe piper sentences through the source and the rewired encoder at the end
            (`<export_dir>/transcription.json`, ~10 s for tiny.en): what rewiring costs the decoder.
        checkpoint_every_n_steps: write last.ckpt every this many steps, at each epoch's end and at
            the end of training, so a killed run resumes from there exactly (rewiring/resume.py);
            None: at epoch ends and at the end only.
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        temperature: float = 0.04,
        pool_layers: Literal["all", "last"] | list[int] = "all",
        projection_dim: int | None = None,
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.01),
        export_dir: str | None = None,
        isotropy_manifest: str | None = None,
        isotropy_every_n_steps: int = 50,
        transcription_check: bool = True,
        checkpoint_every_n_steps: int | None = 500,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        self.save_hyperparameters(ignore=["encoder", "optimizer"])
        self.encoder = encoder
        self.temperature = temperature
        self.pool_layers = pool_layers
        self.optimizer = optimizer
        self.export_dir = export_dir
        self.isotropy_manifest = isotropy_manifest
        self.isotropy_every_n_steps = isotropy_every_n_steps
        self.transcription_check = transcription_check
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.projection = None
        if projection_dim is not None:
            d = encoder.hidden_size
            self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, projection_dim))
        self.skips = SkipLog()  # utterances skipped, per reason
        self._isotropy_before: dict | None = None
        # (step, loss, match accuracy, pairs) per training step on rank 0: rewiring.json's learning summary.
        self._history: list[tuple[int, float, float, int]] = []

    def embed(self, view: dict) -> Tensor:
        """Pooled utterance vectors: the chosen hidden states averaged, then the mean over valid frames."""
        out = self.encoder(view["waveforms"], view["attention_mask"], view.get("mask_time_indices"))
        hidden = out.hidden_states
        if self.pool_layers == "all":
            frames = torch.stack(hidden).mean(0)
        elif self.pool_layers == "last":
            frames = hidden[-1]
        else:
            frames = torch.stack([hidden[i] for i in self.pool_layers]).mean(0)
        pooled = masked_mean(frames, out.frame_mask)
        return self.projection(pooled) if self.projection is not None else pooled

    def _pair_counts(self, n: int) -> Tensor:
        """The pairs of this step on every rank ([world_size] long): a collective under DDP, so that
        every rank makes the same choice (skip, or gather) even when bad audio left them uneven."""
        if self.trainer is None or self.trainer.world_size == 1:
            return torch.tensor([n])
        return self.all_gather(torch.tensor(n, device=self.device)).reshape(-1).cpu()

    def _gather(self, z: Tensor, counts: Tensor) -> Tensor:
        """Under DDP, every rank's embeddings, with gradients, so negatives come from the global batch:
        padded to the largest rank's count for the collective, then the padding dropped."""
        if counts.numel() == 1:
            return z
        width = int(counts.max())
        padded = F.pad(z.float(), (0, 0, 0, width - z.shape[0]))
        gathered = self.all_gather(padded, sync_grads=True)  # [world_size, width, D]
        valid = torch.arange(width)[None, :] < counts[:, None]
        return gathered[valid.to(gathered.device)]

    def _embedding_dim(self) -> int:
        return self.projection[-1].out_features if self.projection is not None else self.encoder.hidden_size

    def setup(self, stage: str) -> None:
        """Hand the encoder's frame layout and receptive field to the data module (before Lightning
        builds the loaders), and count its utterances (those left out as too long are skipped already)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if isinstance(dm, RewiringDataModule):
            dm.set_frame_layout(self.encoder.frame_layout)
            dm.set_min_samples(self.encoder.min_samples)
            if dm.dataset is not None:
                self.skips.track("train", dm.utterances(), self.device)
                self.skips.update("train", [], [(u, "too_long") for u in dm.too_long])

    def on_fit_start(self) -> None:
        # A resumed fit has the source encoder's isotropy from its checkpoint.
        if self.isotropy_manifest and self.trainer.is_global_zero and self._isotropy_before is None:
            self._isotropy_before = self._isotropy()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What rewiring.json and isotropy.json are made of, so a resumed fit writes the whole run's."""
        checkpoint["rewiring"] = {
            "history": list(self._history),
            "skipped": self.skips.state(),
            "isotropy_before": self._isotropy_before,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("rewiring", {})
        self._history = [tuple(h) for h in saved.get("history", [])]
        self.skips.load(saved.get("skipped"))
        self._isotropy_before = saved.get("isotropy_before")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.skips.update("train", batch["ids"], batch["skipped"])
        n = batch["size"]
        counts = self._pair_counts(n)
        if int(counts.sum()) < 2:
            return self.skip_step()  # nothing to contrast: a step without an update (rewiring.skips)
        if n > 0:
            z1, z2 = self.embed(batch["view1"]), self.embed(batch["view2"])
        else:  # every item of this rank's batch was bad: the others' pairs still make the step
            # tied to every parameter (zero), so this rank's backward joins the gather's collective
            # and DDP sees a gradient for each parameter
            z1 = z2 = torch.zeros(0, self._embedding_dim(), device=self.device) + self.skip_step()
        z1, z2 = self._gather(z1, counts), self._gather(z2, counts)
        loss, acc = nt_xent(z1, z2, self.temperature)
        self.log("train/loss", loss, prog_bar=True, batch_size=z1.shape[0])
        self.log("train/match_acc", acc, prog_bar=True, batch_size=z1.shape[0])
        self._history.append((self.global_step, float(loss.detach()), float(acc), int(z1.shape[0])))
        if n > 0:
            self.log("train/neutral_share", batch["n_neutral"] / n, batch_size=z1.shape[0])
        # Pairs in the contrastive batch: the global batch under DDP (each anchor has 2n-2 negatives).
        self.log("train/contrast_pairs", float(z1.shape[0]), batch_size=z1.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            self.skips.log(self.trainer, ("train",))

    def on_train_end(self) -> None:
        self.skips.finish(self.trainer, ("train",))  # logged, kept for the JSON files, warned

    def configure_optimizers(self):
        return self.optimizer(self.parameters())

    def configure_callbacks(self):
        """last.ckpt every `checkpoint_every_n_steps` and at the end; the isotropy of the held-out set,
        logged as training goes (the same set as isotropy.json)."""
        callbacks = [ResumableCheckpoint(save_top_k=0, every_n_train_steps=self.checkpoint_every_n_steps)]
        if not self.isotropy_manifest:
            return callbacks
        from rewiring.isotropy import IsotropyCallback

        manifest = str(resolve_manifest(self.isotropy_manifest))
        return [*callbacks, IsotropyCallback(manifest=manifest, every_n_steps=self.isotropy_every_n_steps)]

    def _isotropy(self) -> dict:
        from rewiring.isotropy import encoder_profile

        return encoder_profile(self.encoder, resolve_manifest(self.isotropy_manifest), layers="pooled")

    def on_fit_end(self) -> None:
        skipped = self.skips.final  # {"train": {"utterances", "drawn", "used", "skipped": {reason: n}}}
        if not self.export_dir or not self.trainer.is_global_zero:
            return
        out = Path(self.export_dir)
        self.encoder.save_pretrained(out)
        if self.isotropy_manifest:
            report = {"before": self._isotropy_before, "after": self._isotropy(), "skipped": skipped}
            (out / "isotropy.json").write_text(json.dumps(report, indent=2))
        write_json_atomic(out / "rewiring.json", learning_summary(self._history, skipped))
        if self.transcription_check and self.encoder.family == "whisper" and isinstance(self.encoder.source, str):
            # The kept decoder, unchanged, reads the rewired encoder: how much of its transcription survives.
            from rewiring.whisper import transcription_report

            tts_cache = getattr(self.trainer.datamodule, "cache_dir", None)
            report = transcription_report({"before": self.encoder.source, "after": out}, cache_dir=tts_cache)
            write_json_atomic(out / "transcription.json", report)
            wer = {k: v["wer"] for k, v in report["models"].items()}
            log.info("transcription WER of piper sentences: before %.3f, after %.3f", wer["before"], wer["after"])
        log.info("rewired encoder exported to %s", out)
        print(f"rewired encoder exported to {out}")
