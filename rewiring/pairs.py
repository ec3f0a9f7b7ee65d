"""The rewiring stage's data: contrastive pairs built in the data pipeline, as Mirror-BERT does
(the model never knows how a pair was built):
- twin: the utterance, and a copy with one contiguous span of `span_share` of its samples zeroed;
- neutral: the utterance, and a neutral TTS reading of its text (synthesised in the data-loader
  workers, through the content-addressed cache);
- mixed: a seeded coin per utterance picks twin or neutral.
Both views also get their own time masks over feature frames, drawn in the collate (the frame
count comes from the encoder's frame layout) and applied by the encoder through `mask_time_indices`.
The model side (NT-Xent over pooled views) is rewiring/rewire.py.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rewiring.audio import MIN_SAMPLES, BadAudio, BucketBatchSampler, Skipped, load_or_skip, pad_batch
from rewiring.frames import FrameLayout
from rewiring.manifest import Record, audio_path, order_key, read_manifest
from rewiring.masking import span_mask, time_masks
from rewiring.resume import resumable_loader
from rewiring.synthesis import SynthesisCache, SynthesisError, Synthesizer

log = logging.getLogger(__name__)

Pairing = Literal["twin", "neutral", "mixed"]
HalveMode = Literal["alternate", "both"]


def resolve_manifest(manifest: str | Path) -> Path:
    """The manifest path; an embedded corpus (`.../embedded/<size>/...`) is built on first use."""
    path = Path(manifest)
    if not path.exists():
        from rewiring.corpus import ensure_corpus, is_embedded_root

        if is_embedded_root(path.parent.parent):
            ensure_corpus(path.parent.parent)
        if not path.exists():
            raise FileNotFoundError(f"manifest not found: {path} (make one with `python -m rewiring prepare`)")
    return path


def _coin(seed: int, key: str) -> bool:
    """A fair coin that depends only on (seed, key): the same pairing on every machine and worker."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] < 128


def pair_kind(pairing: Pairing, seed: int, rec_id: str) -> str:
    """twin or neutral for one utterance: the pairing itself, or the mixed pairing's coin."""
    if pairing == "mixed":
        return "twin" if _coin(seed, rec_id) else "neutral"
    return pairing


class PairDataset(Dataset):
    """One positive pair per item; a `Skipped` (its id and reason, counted by the module) when an item
    can't be paired: bad audio (`rewiring.audio` codes), "no_text" or "unsayable" (the neutral view).
    ``min_samples`` is the encoder's receptive field (set by `RewiringDataModule.set_min_samples`).

    Utterances over `halve_over` seconds are cut in half, the TTS view the same way. `halve_mode`:
    - "both": each half is an item of its own (an epoch sees both halves);
    - "alternate": the authors' way, one item per utterance, whose half is chosen per epoch by the
      sampler (`HalfSampler`): the key `(i, h)` asks for half `h` of item `i`; a plain `i` gives half 0.
    """

    def __init__(
        self,
        manifest: Path,
        records: list[Record],
        pairing: Pairing,
        cache: SynthesisCache | None,
        span_share: float,
        seed: int,
        halve_over: float | None,
        on_bad_audio: BadAudio,
        halve_mode: HalveMode = "both",
    ) -> None:
        self.manifest = manifest  # the arguments are checked by RewiringDataModule, which builds it
        self.pairing = pairing
        self.cache = cache
        self.span_share = span_share
        self.seed = seed
        self.on_bad_audio = on_bad_audio
        self.halve_mode = halve_mode
        self.min_samples = MIN_SAMPLES
        # (record, half, parts): half is fixed under "both" and comes with the key under "alternate"
        self.items: list[tuple[Record, int, int]] = []
        for rec in records:
            parts = 2 if halve_over is not None and rec.duration > halve_over else 1
            self.items.extend((rec, k, parts) for k in range(parts if halve_mode == "both" else 1))

    def __len__(self) -> int:
        return len(self.items)

    def kind(self, rec: Record) -> str:
        return pair_kind(self.pairing, self.seed, rec.id)

    @staticmethod
    def _part(wav: Tensor, k: int, parts: int) -> Tensor:
        if parts == 1:
            return wav
        half = wav.shape[-1] // 2
        return wav[:half] if k == 0 else wav[half:]

    def __getitem__(self, key: int | tuple[int, int]) -> dict | Skipped:
        i, half = key if isinstance(key, tuple) else (key, 0)
        rec, k, parts = self.items[i]
        if self.halve_mode == "alternate" and parts == 2:
            if half not in (0, 1):
                raise ValueError(f"half must be 0 or 1, got {half!r}")
            k = half
        kind = self.kind(rec)
        if kind == "neutral" and not rec.text:
            log.warning("no text to synthesise for %s (%s): skipped", rec.id, self.manifest)
            return Skipped(str(audio_path(self.manifest, rec)), "no_text", "no text to synthesise", id=rec.id)
        wav = load_or_skip(audio_path(self.manifest, rec), self.on_bad_audio, record=rec, min_samples=self.min_samples)
        if isinstance(wav, Skipped):
            return wav.named(rec.id)  # counted per reason: too_short, not_found, ...
        wav = self._part(wav, k, parts)
        if kind == "twin":
            other = span_mask(wav, self.span_share)
        else:
            try:
                other = self._part(self.cache.get(rec.text), k, parts)
            except SynthesisError as err:
                log.warning("cannot synthesise %s (%s): %s; skipped", rec.id, self.manifest, err)
                return Skipped(str(audio_path(self.manifest, rec)), "unsayable", str(err), id=rec.id)
        return {"id": rec.id, "kind": kind, "view1": wav, "view2": other}


class HalfSampler(Sampler):
    """The epoch's order of a `halve_mode="alternate"` PairDataset, as keys `(index, half)`.

    The authors' loop (rewireW2V2's scripts) walks a shuffled loader and takes the first half of a
    long utterance on even loader steps (`batch_id % 2 == 0`) and the second on odd ones. So the k-th
    item of the epoch's order gets half k % 2 (short utterances ignore it): about half the long
    utterances give their first half, a different set each epoch. The half travels in the key, so
    DataLoader workers, persistent ones too, need no epoch of their own.

    With `batches` (the length-bucketing batch sampler) it yields those batches, each index with its
    half. Without, it yields single keys in a shuffle seeded by (seed, epoch), so that every DDP rank
    draws the same order (Lightning then wraps it in its DistributedSamplerWrapper, which splits that
    order between ranks). Lightning calls `set_epoch` before each epoch; each pass also moves on one
    epoch, for loops (and that wrapper) that do not call it.

    Resumable (torchdata's StatefulDataLoader): `state_dict()` is the pass's epoch and the keys it has
    yielded (with `batches`: their state and the position reached; a finished pass gives the next
    one from its start); `load_state_dict` makes the next pass continue from there.
    """

    def __init__(self, n_items: int, seed: int, batches: Sampler[list[int]] | None = None) -> None:
        self.n_items = n_items
        self.seed = seed
        self.batches = batches
        self.epoch = 0
        self._skip = 0  # keys (or, with batches, the position) already consumed: load_state_dict
        self._pass: list[int] | None = None  # [epoch, keys yielded] (with batches: [batches, position])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else self.n_items

    def __iter__(self):
        skip, self._skip = self._skip, 0
        if self.batches is not None:
            self._pass = [0, skip]  # the position goes on where the bucketing sampler's pass does
            for batch in self.batches:
                position = self._pass[1]
                self._pass[0] += 1
                self._pass[1] += len(batch)
                yield [(i, (position + k) % 2) for k, i in enumerate(batch)]
            return
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self._pass = [self.epoch, skip]
        self.epoch += 1
        for i in torch.randperm(self.n_items, generator=g).tolist()[skip:]:
            position = self._pass[1]
            self._pass[1] += 1
            yield (i, position % 2)

    def state_dict(self) -> dict:
        if self.batches is not None:
            inner = self.batches.state_dict()
            count, position = self._pass if self._pass is not None else (0, self._skip)
            if count and inner.get("yielded") == 0:  # its pass ended (it gives the next, from 0): so ours
                position = 0
            return {"position": position, "batches": inner}
        epoch, yielded = self._pass if self._pass is not None else (self.epoch, self._skip)
        if yielded >= self.n_items:  # a finished pass: the next one, so a resumed epoch is never empty
            epoch, yielded = epoch + 1, 0
        return {"epoch": epoch, "yielded": yielded}

    def load_state_dict(self, state: dict) -> None:
        self._pass = None
        if self.batches is not None:
            self.batches.load_state_dict(state["batches"])
            self._skip = int(state["position"])
        else:
            self.epoch, self._skip = int(state["epoch"]), int(state["yielded"])


class PairCollate:
    """Pads each view in the batch and draws independent time masks for each (padding never masked).

    The frame count of a waveform comes from the encoder (`SpeechEncoder.frame_layout`: wav2vec2's
    conv stack, or Whisper's log-mel hop and convolutions); `RewiringModule.setup` hands it over
    before the data loaders start, so the data module never assumes an architecture.
    """

    def __init__(self, mask_prob: float, mask_span: int, min_masks: int) -> None:
        self.layout: FrameLayout | None = None
        self.mask_prob = mask_prob
        self.mask_span = mask_span
        self.min_masks = min_masks

    def _view(self, wavs: list[Tensor]) -> dict:
        batch = pad_batch(wavs)
        mask = None
        if self.mask_prob > 0:
            if self.layout is None:
                raise RuntimeError("PairCollate has no frame layout: RewiringModule.setup sets it from the encoder")
            frames = self.layout(batch.lengths)
            n_frames = int(self.layout(batch.waveforms.shape[-1]))
            mask = time_masks(frames, n_frames, self.mask_prob, self.mask_span, self.min_masks)
        return {"waveforms": batch.waveforms, "attention_mask": batch.attention_mask, "mask_time_indices": mask}

    def __call__(self, items: list) -> dict:
        good = [it for it in items if isinstance(it, dict)]
        skipped = [(it.id, it.code) for it in items if isinstance(it, Skipped)]
        out = {"ids": [it["id"] for it in good], "skipped": skipped, "size": len(good)}
        if good:  # one pair is worth sending: under DDP the other ranks' pairs are its negatives
            out["view1"] = self._view([it["view1"] for it in good])
            out["view2"] = self._view([it["view2"] for it in good])
            out["n_neutral"] = sum(it["kind"] == "neutral" for it in good)
        return out


class RewiringDataModule(LightningDataModule):
    """Unlabelled manifest -> positive pairs (twin | neutral | mixed), each view with its own time masks.

    Args:
        manifest: unlabelled utterances (with `text` for the neutral pairing).
        pairing: twin, neutral or mixed (the paper's three).
        synthesizer: the neutral voice (piper by default; festival for the paper's setup).
        cache_dir: the synthesis cache folder (shared by every worker and run).
        span_share: share of the waveform zeroed in the twin view (the paper: 0.2).
        mask_prob, mask_span, min_masks: time masks over feature frames (the paper: 0.05, 10, 2).
            mask_prob=0 turns them off.
        max_seconds: skip utterances longer than this (the paper: 11.25; null: none, which a 10-minute
            file turns into a multi-GB batch).
        max_items: use a fixed, seeded subset of this many utterances (None: all), e.g. exactly the
            ones a short run draws, so that the TTS pre-fill says no text the run never uses.
        halve_over: cut utterances longer than this in half, both views alike (the paper: 5.625).
        halve_mode: what becomes of the two halves. "both" (default): each half is an item, so an
            epoch has one item more per long utterance (a quarter step at 4 pairs). "alternate": the
            authors' way, one item per utterance (an epoch of the authors' 6651-utterance subset is
            6651 items), the first half at even positions of the epoch's shuffled order and the
            second at odd ones (`HalfSampler`; with length bucketing and DataLoader workers too).
        batch_size: pairs per step (the paper: 4); each anchor has 2*batch_size-2 negatives.
        num_workers: data-loader workers (TTS runs there, not on the main process).
        seed: the mixed pairing's coin.
        on_bad_audio: `error` stops at a bad file (naming it); `skip` logs and counts it.
        bucket_by_length: sort each epoch's batches by length so padding stays small.
        prefill_workers: before training (`prepare_data`: once per node, before any DataLoader
            worker starts), synthesise every neutral text the cache does not hold yet on this many
            processes, so that training never waits on TTS (worth it on GPUs, or for several
            epochs); 0 synthesises on demand in the DataLoader workers.
    """

    def __init__(
        self,
        manifest: str = "data/embedded/small/unlabelled/train.jsonl",
        pairing: Pairing = "neutral",
        synthesizer: Synthesizer | None = None,
        cache_dir: str = "cache/tts",
        span_share: float = 0.2,
        mask_prob: float = 0.05,
        mask_span: int = 10,
        min_masks: int = 2,
        max_seconds: float | None = 30.0,
        max_items: int | None = None,
        halve_over: float | None = None,
        halve_mode: HalveMode = "both",
        batch_size: int = 4,
        num_workers: int = 2,
        seed: int = 0,
        on_bad_audio: BadAudio = "skip",
        bucket_by_length: bool = True,
        prefill_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= span_share < 1:
            raise ValueError(f"data.span_share must be in [0, 1), got {span_share}")
        if batch_size < 2:
            raise ValueError(f"data.batch_size must be >= 2 (in-batch negatives), got {batch_size}")
        self.manifest = manifest
        self.pairing = pairing
        self.synthesizer = synthesizer
        self.cache_dir = cache_dir
        self.span_share = span_share
        self.max_seconds = max_seconds
        if max_items is not None and max_items < batch_size:
            raise ValueError(f"data.max_items must be >= batch_size ({batch_size}), got {max_items}")
        self.max_items = max_items
        self.halve_over = halve_over
        if halve_mode not in ("both", "alternate"):
            raise ValueError(f"data.halve_mode must be 'both' or 'alternate', got {halve_mode!r}")
        self.halve_mode = halve_mode
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.on_bad_audio = on_bad_audio
        self.bucket_by_length = bucket_by_length
        if prefill_workers < 0:
            raise ValueError(f"data.prefill_workers must be >= 0, got {prefill_workers}")
        self.prefill_workers = prefill_workers
        self.collate = PairCollate(mask_prob, mask_span, min_masks)
        self.dataset: PairDataset | None = None
        self.too_long: list[str] = []  # ids of the run's utterances left out as over max_seconds
        self.min_samples = MIN_SAMPLES

    def set_frame_layout(self, layout: FrameLayout) -> None:
        """The encoder's frame arithmetic, for the time masks (RewiringModule.setup calls this in a fit)."""
        self.collate.layout = layout

    def set_min_samples(self, min_samples: int) -> None:
        """The encoder's receptive field: shorter audio is skipped as "too_short" (or, under
        on_bad_audio=error, raised naming the file). RewiringModule.setup calls this in a fit."""
        self.min_samples = int(min_samples)
        if self.dataset is not None:
            self.dataset.min_samples = self.min_samples

    def _records(self) -> tuple[Path, list[Record]]:
        """The manifest's records, less those over max_seconds (logged; counted as skipped "too_long"
        unless max_items then draws a subset of the others: none of the subset was left out)."""
        path = resolve_manifest(self.manifest)
        records = read_manifest(path)
        self.too_long = []
        if self.max_seconds is not None:
            kept = [r for r in records if r.duration <= self.max_seconds]
            self.too_long = [r.id for r in records if r.duration > self.max_seconds]
            if self.too_long:
                log.warning("skipped %d utterances over %.2f s in %s", len(self.too_long), self.max_seconds, path)
            records = kept
        if self.max_items is not None and len(records) > self.max_items:
            # A fixed subset, the same on every machine: the items whose (seed, id) hashes lowest.
            records = sorted(records, key=lambda r: order_key(self.seed, r.id))
            records = sorted(records[: self.max_items], key=lambda r: r.id)
            self.too_long = []
        return path, records

    def utterances(self) -> list[str]:
        """The ids of the run's utterances (after setup): its items' and those left out as too long."""
        return list(dict.fromkeys([*(rec.id for rec, _, _ in self.dataset.items), *self.too_long]))

    def _cache(self) -> SynthesisCache | None:
        if self.pairing not in ("neutral", "mixed"):
            return None
        if self.synthesizer is None:
            from rewiring.synthesis import PiperSynthesizer

            self.synthesizer = PiperSynthesizer()
        return SynthesisCache(self.synthesizer, root=self.cache_dir)

    def prepare_data(self) -> None:
        """With prefill_workers, fill the synthesis cache for every neutral text before training."""
        cache = self._cache() if self.prefill_workers > 0 else None
        if cache is None:
            return
        from rewiring.synthesis.command import fill_cache

        path, records = self._records()
        neutral = [r for r in records if pair_kind(self.pairing, self.seed, r.id) == "neutral"]
        texts = list(dict.fromkeys(r.text for r in neutral if r.text))
        start = time.perf_counter()
        unsayable, stats = fill_cache(cache, texts, workers=self.prefill_workers)
        log.info(
            "prefilled the synthesis cache %s for %d neutral texts of %s in %.1f s on %d processes "
            "(hits %d, misses %d, unsayable %d)",
            self.cache_dir, len(texts), path, time.perf_counter() - start, self.prefill_workers,
            stats["hits"], stats["misses"], len(unsayable),
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        path, records = self._records()
        cache = self._cache()
        self.dataset = PairDataset(
            path, records, self.pairing, cache, self.span_share, self.seed, self.halve_over,
            self.on_bad_audio, halve_mode=self.halve_mode,
        )  # fmt: skip
        self.dataset.min_samples = self.min_samples
        if len(self.dataset) < self.batch_size:
            raise ValueError(f"{path}: {len(self.dataset)} usable utterances, fewer than batch_size={self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        common = dict(
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        alternate = self.halve_mode == "alternate"
        if self.bucket_by_length:
            durations = [rec.duration / parts for rec, _, parts in self.dataset.items]
            sampler = BucketBatchSampler(durations, self.batch_size, self.seed)
            if alternate:
                sampler = HalfSampler(len(self.dataset), self.seed, batches=sampler)
            return resumable_loader(self.dataset, batch_sampler=sampler, **common)
        if alternate:  # the sampler shuffles (seeded per epoch) and hands each item its half
            sampler = HalfSampler(len(self.dataset), self.seed)
            return resumable_loader(
                self.dataset, sampler=sampler, batch_size=self.batch_size, drop_last=True, **common
            )
        # Every one resumes mid-epoch (rewiring/resume.py): this one on a ResumableShuffle.
        return resumable_loader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, **common)
