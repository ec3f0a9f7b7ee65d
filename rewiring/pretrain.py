"""wav2vec 2.0 pre-training of a small encoder, so the embedded default starts from a real pre-trained model.

No wav2vec 2.0 weights can be downloaded offline, and rewiring a randomly initialised encoder would
say nothing about the method. `PretrainModule` trains `Wav2Vec2ForPreTraining` (masked contrastive
loss over quantised targets plus the codebook diversity loss) on the embedded corpus's unlabelled
set, and exports the encoder as an HF folder that `conf/encoder/tiny.yaml` points at.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

from rewiring.audio import MIN_SAMPLES, SAMPLE_RATE, BadAudio, Skipped, load_or_skip, pad_batch
from rewiring.encoder import SpeechEncoder
from rewiring.manifest import Record, audio_path, read_manifest
from rewiring.pairs import resolve_manifest
from rewiring.resume import ResumableCheckpoint, resumable_loader
from rewiring.skips import SkipLog, SkippableSteps

log = logging.getLogger(__name__)


class CropDataset(Dataset):
    """Unlabelled utterances, randomly cropped to at most `crop_seconds` (wav2vec 2.0 trains on crops).
    The window is drawn from the manifest's duration and only it is decoded, so a long recording
    costs no more memory than a short one (the bad-audio checks then see the window).

    An item is (id, waveform), or a `Skipped` (with the id) for bad audio; ``min_samples`` is the
    encoder's receptive field (`UnlabelledDataModule.set_min_samples`).
    """

    def __init__(self, manifest: Path, records: list[Record], crop_seconds: float, on_bad_audio: BadAudio) -> None:
        self.manifest, self.records = manifest, records
        self.crop = int(crop_seconds * SAMPLE_RATE)
        self.on_bad_audio = on_bad_audio
        self.min_samples = MIN_SAMPLES

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[str, Tensor] | Skipped:
        rec = self.records[i]
        window = {}
        if rec.duration * SAMPLE_RATE > self.crop:  # decode the crop only: a long file costs its window
            seconds = self.crop / SAMPLE_RATE
            window = {"offset": float(torch.rand(())) * (rec.duration - seconds), "duration": seconds}
        wav = load_or_skip(audio_path(self.manifest, rec), self.on_bad_audio, record=rec,
                           min_samples=self.min_samples, **window)  # fmt: skip
        if isinstance(wav, Skipped):
            return wav.named(rec.id)
        return rec.id, wav[: self.crop]


def _collate(items: list[tuple[str, Tensor] | Skipped]) -> dict:
    """{"wave": the padded waveforms (None if every item was skipped), "ids": theirs, "skipped": [(id, reason)]}."""
    good = [it for it in items if not isinstance(it, Skipped)]
    return {
        "wave": pad_batch([w for _, w in good]) if good else None,
        "ids": [u for u, _ in good],
        "skipped": [(it.id, it.code) for it in items if isinstance(it, Skipped)],
    }


class UnlabelledDataModule(LightningDataModule):
    """Waveform crops from an unlabelled manifest (the embedded corpus's is built on first use).

    Args:
        manifest: unlabelled utterances.
        crop_seconds: longest crop per utterance.
        batch_size: utterances per step.
        num_workers: data-loader workers.
        on_bad_audio: `error` (raised, naming the file) or `skip` (logged and counted per reason).
    """

    def __init__(
        self,
        manifest: str = "data/embedded/small/unlabelled/train.jsonl",
        crop_seconds: float = 4.0,
        batch_size: int = 8,
        num_workers: int = 1,
        on_bad_audio: BadAudio = "skip",
    ) -> None:
        super().__init__()
        self.manifest = manifest
        self.crop_seconds = crop_seconds
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_bad_audio = on_bad_audio
        self.dataset: CropDataset | None = None
        self.min_samples = MIN_SAMPLES

    def set_min_samples(self, min_samples: int) -> None:
        """The encoder's receptive field: shorter audio is "too_short" (PretrainModule.setup calls this)."""
        self.min_samples = int(min_samples)
        if self.dataset is not None:
            self.dataset.min_samples = self.min_samples

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            path = resolve_manifest(self.manifest)
            self.dataset = CropDataset(path, read_manifest(path), self.crop_seconds, self.on_bad_audio)
            self.dataset.min_samples = self.min_samples

    def train_dataloader(self) -> DataLoader:
        # resumes mid-epoch (rewiring/resume.py); shuffle=True is a ResumableShuffle from the run's seed
        return resumable_loader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class PretrainModule(SkippableSteps, LightningModule):
    """Masked contrastive + diversity loss (wav2vec 2.0) on the encoder's own model.

    Skipped utterances are counted per reason (rewiring.skips: ``data/skipped/train/<reason>``,
    convergence.json, a warning at the end); a batch with fewer than two utterances left, or a
    non-finite loss, takes a step without an update.

    Args:
        encoder: the SpeechEncoder to pre-train (its config needs the quantizer settings, as
            TINY_CONFIG has); its weights are trained in place and exported at the end.
        mask_prob, mask_length: share of frames starting a masked span, and the span (wav2vec 2.0: 0.65, 10).
        num_negatives: distractors per masked frame.
        diversity_weight: weight of the codebook diversity loss.
        gumbel_start, gumbel_end: Gumbel-softmax temperature, decayed geometrically over `max_steps`.
        optimizer: optimizer factory (AdamW).
        scheduler: learning-rate schedule factory (linear warm-up then decay by default).
        export_dir: the HF folder the pre-trained encoder is saved to.
        checkpoint_every_n_steps: write last.ckpt every this many steps, at each epoch's end and at
            the end of training, so a killed run resumes from there exactly (rewiring/resume.py);
            None: at epoch ends and at the end only.
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        mask_prob: float = 0.65,
        mask_length: int = 10,
        num_negatives: int = 50,
        diversity_weight: float = 0.1,
        gumbel_start: float = 2.0,
        gumbel_end: float = 0.5,
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=5e-4, weight_decay=0.01),
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str = "data/encoders/tiny",
        checkpoint_every_n_steps: int | None = 500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "optimizer", "scheduler"])
        self.encoder = encoder
        config = encoder.config
        if not getattr(config, "num_codevectors_per_group", 0):
            raise ValueError("model.encoder: its config has no quantizer settings (num_codevectors_per_group)")
        self.pretraining = Wav2Vec2ForPreTraining(config)
        self.pretraining.wav2vec2 = encoder.model  # one set of encoder weights, trained in place
        self.mask_prob, self.mask_length = mask_prob, mask_length
        self.num_negatives = num_negatives
        self.diversity_weight = diversity_weight
        self.gumbel_start, self.gumbel_end = gumbel_start, gumbel_end
        self.optimizer, self.scheduler = optimizer, scheduler
        self.export_dir = export_dir
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.skips = SkipLog()  # utterances skipped, per reason

    def setup(self, stage: str) -> None:
        """The encoder's receptive field to the data module, and its utterances to count."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if isinstance(dm, UnlabelledDataModule):
            dm.set_min_samples(self.encoder.min_samples)
            if dm.dataset is not None:
                self.skips.track("train", [r.id for r in dm.dataset.records], self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped"] = self.skips.state()  # a resumed fit goes on counting

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skips.load(checkpoint.get("skipped"))

    def _gumbel(self) -> float:
        total = max(1, self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000)
        frac = min(1.0, self.global_step / total)
        return self.gumbel_start * (self.gumbel_end / self.gumbel_start) ** frac

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        wave = batch["wave"]
        self.skips.update("train", batch["ids"], batch["skipped"])
        if wave is None or len(wave) < 2:
            return self.skip_step()  # no negatives to draw: a step without an update (rewiring.skips)
        frames = self.encoder.frame_lengths(wave.lengths)
        n_frames = int(self.encoder.frame_lengths(wave.waveforms.shape[-1]))
        frame_mask = (torch.arange(n_frames)[None, :] < frames[:, None]).long()
        mask = _compute_mask_indices(
            (len(wave), n_frames), self.mask_prob, self.mask_length, attention_mask=frame_mask, min_masks=2
        )
        negatives = _sample_negative_indices((len(wave), n_frames), self.num_negatives, mask)
        self.pretraining.set_gumbel_temperature(self._gumbel())
        inputs, _ = self.encoder._prepare(wave.waveforms, wave.attention_mask)
        attn = wave.attention_mask if self.encoder.uses_attention_mask else None
        out = self.pretraining(
            inputs,
            attention_mask=attn,
            mask_time_indices=torch.from_numpy(mask).to(self.device),
            sampled_negative_indices=torch.from_numpy(negatives).to(self.device),
        )
        n_masked = float(mask.sum())
        contrastive = out.contrastive_loss / n_masked
        diversity = out.diversity_loss / n_masked  # HF scales both terms by the masked count
        loss = contrastive + self.diversity_weight * diversity
        if not torch.isfinite(loss):
            log.warning("non-finite pre-training loss at step %d; batch skipped", self.global_step)
            return self.skip_step()
        bs = len(wave)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/contrastive", contrastive, batch_size=bs)
        self.log("train/diversity", diversity, batch_size=bs)
        self.log("train/perplexity", out.codevector_perplexity, prog_bar=True, batch_size=bs)
        self.log("train/gumbel_temperature", self._gumbel(), batch_size=bs)
        return loss

    def configure_optimizers(self):
        opt = self.optimizer(self.parameters())
        if self.scheduler is not None:
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 1000
        warm = max(1, total // 10)

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            self.skips.log(self.trainer, ("train",))

    def on_train_end(self) -> None:
        self.skips.finish(self.trainer, ("train",))  # logged, kept for convergence.json, warned

    def configure_callbacks(self):
        """last.ckpt every `checkpoint_every_n_steps` and at the end (no dev metric, no top-k)."""
        return [ResumableCheckpoint(save_top_k=0, every_n_train_steps=self.checkpoint_every_n_steps)]

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            out = self.encoder.save_pretrained(Path(self.export_dir))
            log.info("pre-trained encoder exported to %s", out)
            print(f"pre-trained encoder exported to {out}")
