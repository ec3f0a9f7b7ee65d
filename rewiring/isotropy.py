"""Isotropy of a representation space: the measures, a training callback, and per-layer encoder profiles.

The paper says rewiring makes the space more isotropic but its metric could not be read, so we report:

- primary: **IsoScore** (Rudman et al., Findings of ACL 2022) and the **effective rank** (Roy & Vetterli,
  EUSIPCO 2007) of the centred point cloud. Both come from one eigendecomposition of the covariance in
  float64. The effective rank follows Roy & Vetterli's definition on *singular values* of the centred data
  matrix, which are the square roots of the covariance eigenvalues: ``exp(H(p))``, ``p_i = s_i / sum(s)``.
- secondary: the partition-function isotropy **I(W)** of Mu & Viswanath (ICLR 2018), and the **average
  cosine similarity** between random pairs (Ethayarajh, EMNLP 2019). Both see the uncentred vectors, so
  a common offset drives them (to ~0 and ~1). I(W) is not scale-invariant: an isotropic Gaussian scores
  near 1 only at norms around 1, and raw features with norms in the tens score ~0 whatever their shape.

I(W) = min_c Z(c) / max_c Z(c), Z(c) = sum_w exp(c . w), comes in two variants, both over the uncentred
points w; they differ in the directions c:

- ``partition_isotropy``: Mu & Viswanath as written: c over the eigenvectors of W^T W of the *raw*
  embeddings (their approximation of the min and max over unit vectors). A common offset is close to the
  top eigenvector, so it shows directly (Z along it explodes: I(W) -> 0). An eigenvector's sign is the
  eigensolver's choice, so each is oriented towards the cloud's mean (c . mean >= 0): a fixed rule, and
  the same value on any machine.
- ``partition_isotropy_centred``: c over the eigenvectors of the *centred* covariance and their
  negatives (2d directions; no sign to choose). A common offset counts only through its projection on
  those axes, so a cloud shifted along one of its principal axes still scores ~0, but an offset that lies
  between the axes counts less than in the raw variant.

Every measure runs on a fixed, seeded sample of rows: ``SAMPLES_PER_DIM`` (10) rows per dimension by
default; more rows are subsampled, fewer give a warning (with n < d rows the spectrum has at most n - 1
non-zero values, so IsoScore and the effective rank are capped by the sample, not the model). Compare
spaces at the same sample size: finite samples bias IsoScore down (an isotropic Gaussian with 10 rows per
dimension scores about 0.9).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from rewiring.files import write_json_atomic
from rewiring.frames import masked_mean

__all__ = [
    "SAMPLES_PER_DIM",
    "Spectrum",
    "spectrum",
    "isoscore",
    "effective_rank",
    "partition_isotropy",
    "partition_isotropy_centred",
    "average_cosine",
    "isotropy_report",
    "IsotropyCallback",
    "encoder_profile",
]

log = logging.getLogger(__name__)

SAMPLES_PER_DIM = 10
DEFAULT_PAIRS = 10_000


# ---------------------------------------------------------------------------- measures
def _rows(X: Tensor | np.ndarray) -> Tensor:
    X = torch.as_tensor(X).detach().to("cpu", torch.float64)
    if X.dim() != 2:
        raise ValueError(f"expected a point cloud [N, D], got shape {tuple(X.shape)}")
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 points, got {X.shape[0]}")
    if not torch.isfinite(X).all():
        raise ValueError("point cloud has NaN or infinite values")
    return X


def _sample(X: Tensor, sample_size: int | None, seed: int) -> Tensor:
    """The fixed, seeded subsample of rows every measure uses (all rows when there are few enough)."""
    n, d = X.shape
    size = SAMPLES_PER_DIM * d if sample_size is None else int(sample_size)
    if min(n, size) < SAMPLES_PER_DIM * d:
        warnings.warn(
            f"isotropy on {min(n, size)} points in {d} dimensions: fewer than {SAMPLES_PER_DIM} per dimension, so the "
            "estimates are biased by the sample; compare only at equal sample sizes",
            stacklevel=3,
        )
    if n <= size:
        return X
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:size].sort().values
    return X[idx]


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh on one thread: MKL's threaded eigh spins when its cores are busy (a
    384x384 float64 matrix took 1.5-5 s on 2 threads of a loaded 2-core machine, 0.02 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(m)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Spectrum:
    """A sampled point cloud and its covariance eigendecomposition (eigenvalues descending, >= 0)."""

    points: Tensor  # [n, d] float64, uncentred
    eigenvalues: Tensor  # [d]
    eigenvectors: Tensor  # [d, d], columns


def spectrum(X: Tensor | np.ndarray, sample_size: int | None = None, seed: int = 0) -> Spectrum:
    """Sample rows, then one float64 eigendecomposition of their covariance."""
    points = _sample(_rows(X), sample_size, seed)
    centred = points - points.mean(0, keepdim=True)
    cov = centred.T @ centred / (points.shape[0] - 1)
    values, vectors = _eigh(cov)
    order = torch.argsort(values, descending=True)
    return Spectrum(points=points, eigenvalues=values[order].clamp(min=0.0), eigenvectors=vectors[:, order])


def _isoscore(spec: Spectrum) -> float:
    """Rudman et al. 2022: the PCA-axis variance vector, scaled to norm sqrt(n), vs the diagonal of ones."""
    var = spec.eigenvalues
    n = var.shape[0]
    if n < 2:
        raise ValueError("IsoScore needs at least 2 dimensions")
    norm = torch.linalg.vector_norm(var)
    if norm == 0:
        return 0.0  # a collapsed cloud uses no dimension
    normalised = var * math.sqrt(n) / norm
    defect = torch.linalg.vector_norm(normalised - 1.0) / math.sqrt(2 * (n - math.sqrt(n)))
    # k(X) = (n - defect^2 (n - sqrt n))^2 / n dimensions used; IsoScore = (k - 1) / (n - 1)
    k = (n - defect.item() ** 2 * (n - math.sqrt(n))) ** 2 / n
    return float(min(max((k - 1) / (n - 1), 0.0), 1.0))


def _effective_rank(spec: Spectrum) -> float:
    singular = spec.eigenvalues.sqrt()
    total = singular.sum()
    if total == 0:
        return 0.0  # a collapsed cloud has no spread
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _log_partition_ratio(points: Tensor, directions: Tensor) -> float:
    """min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . w_i), over the columns c of `directions`, in log space
    (exp(c . w) overflows float64 for |c . w| > 709)."""
    log_z = torch.logsumexp(points @ directions, dim=0)
    return float(torch.exp(log_z.min() - log_z.max()))


def _partition_isotropy(points: Tensor) -> float:
    """Mu & Viswanath's I(W): c over the eigenvectors of W^T W of the raw points, each oriented to the mean."""
    _, vectors = _eigh(points.T @ points)
    side = torch.sign(points.mean(0) @ vectors)
    vectors = vectors * torch.where(side == 0, 1.0, side)  # a mean orthogonal to c keeps the solver's sign
    return _log_partition_ratio(points, vectors)


def _partition_isotropy_centred(spec: Spectrum) -> float:
    """I(W) with c over +- the eigenvectors of the centred covariance (the sign-free variant)."""
    return _log_partition_ratio(spec.points, torch.cat([spec.eigenvectors, -spec.eigenvectors], dim=1))


def _average_cosine(points: Tensor, pairs: int, seed: int) -> float:
    n = points.shape[0]
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(n, (pairs,), generator=gen)
    j = torch.randint(n - 1, (pairs,), generator=gen)
    j = j + (j >= i).long()  # a distinct partner, uniform over the others
    unit = points / torch.linalg.vector_norm(points, dim=1, keepdim=True).clamp(min=1e-12)
    return float((unit[i] * unit[j]).sum(1).mean())


def isoscore(X: Tensor | np.ndarray, sample_size: int | None = None, seed: int = 0) -> float:
    """IsoScore in [0, 1]: 1 = variance spread evenly over all dimensions, 0 = one dimension."""
    return _isoscore(spectrum(X, sample_size, seed))


def effective_rank(X: Tensor | np.ndarray, sample_size: int | None = None, seed: int = 0) -> float:
    """Roy & Vetterli's effective rank (in [1, d]) of the centred cloud, from its singular values."""
    return _effective_rank(spectrum(X, sample_size, seed))


def partition_isotropy(X: Tensor | np.ndarray, sample_size: int | None = None, seed: int = 0) -> float:
    """Mu & Viswanath's I(W) in (0, 1] as they define it (c over the eigenvectors of W^T W of the raw
    points): near 1 when no direction dominates, near 0 with a common offset."""
    return _partition_isotropy(_sample(_rows(X), sample_size, seed))


def partition_isotropy_centred(
    X: Tensor | np.ndarray, sample_size: int | None = None, seed: int = 0
) -> float:
    """I(W) in (0, 1] with c over +- the eigenvectors of the centred covariance (see the module docstring)."""
    return _partition_isotropy_centred(spectrum(X, sample_size, seed))


def average_cosine(
    X: Tensor | np.ndarray, pairs: int = DEFAULT_PAIRS, seed: int = 0, sample_size: int | None = None
) -> float:
    """Mean cosine similarity of random pairs of distinct rows (seeded): about 0 when isotropic."""
    return _average_cosine(_sample(_rows(X), sample_size, seed), pairs, seed)


def isotropy_report(
    X: Tensor | np.ndarray, sample_size: int | None = None, seed: int = 0, pairs: int = DEFAULT_PAIRS
) -> dict[str, float]:
    """All five measures on the same seeded sample (one eigendecomposition of the centred covariance,
    one of W^T W for Mu & Viswanath's I(W))."""
    spec = spectrum(X, sample_size, seed)
    return {
        "isoscore": _isoscore(spec),
        "effective_rank": _effective_rank(spec),
        "partition_isotropy": _partition_isotropy(spec.points),
        "partition_isotropy_centred": _partition_isotropy_centred(spec),
        "average_cosine": _average_cosine(spec.points, pairs, seed),
    }


# ---------------------------------------------------------------------------- audio for the measures
def _load_heldout(manifest: str | Path, max_items: int, seed: int = 0) -> tuple[list[str], list[Tensor]]:
    """A seeded sample of `max_items` utterances of a manifest (the same on any machine: ordered by
    sha256 of seed and id), in manifest order, as 16 kHz waveforms."""
    from rewiring.audio import load_audio
    from rewiring.manifest import audio_path, order_key, read_manifest

    records = read_manifest(manifest)
    if len(records) > max_items:
        keep = set(sorted(range(len(records)), key=lambda i: order_key(seed, records[i].id))[:max_items])
        records = [r for i, r in enumerate(records) if i in keep]
    if not records:
        raise ValueError(f"{manifest}: no utterances to measure isotropy on")
    return [r.id for r in records], [load_audio(audio_path(manifest, r), record=r) for r in records]


# ---------------------------------------------------------------------------- callback
class IsotropyCallback(L.Callback):
    """Logs ``isotropy/<metric>`` of the encoder's pooled utterance vectors on a fixed held-out set
    (a seeded sample of `max_items` utterances of `manifest`, loaded once).

    At fit start and every `every_n_steps` optimizer steps, in eval mode without gradients, on global rank 0
    only (the loggers write there). The module must expose ``.encoder`` (a `SpeechEncoder`); its pooled
    vectors are the embeddings the rewiring loss sees. ``layers="all"`` also logs
    ``isotropy/layer<k>/<metric>`` for the mean-pooled output of every hidden state.
    """

    def __init__(
        self,
        manifest: str,
        every_n_steps: int = 50,
        max_items: int = 64,
        layers: Literal["pooled", "all"] = "pooled",
        batch_size: int = 8,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if layers not in ("pooled", "all"):
            raise ValueError(f"layers must be 'pooled' or 'all', got {layers!r}")
        self.manifest = manifest
        self.every_n_steps = every_n_steps
        self.max_items = max_items
        self.layers = layers
        self.batch_size = batch_size
        self._waveforms: list[Tensor] | None = None
        self._last_step: int | None = None
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, metrics), for tests and reports

    def _ensure_loaded(self) -> list[Tensor]:
        if self._waveforms is None:
            _, self._waveforms = _load_heldout(self.manifest, self.max_items)
        return self._waveforms

    @torch.no_grad()
    def measure(self, encoder: torch.nn.Module) -> dict[str, float]:
        """The metrics for the encoder's current weights; restores its train/eval mode."""
        from rewiring.audio import pad_batch

        wavs = self._ensure_loaded()
        device = next(encoder.parameters()).device
        was_training = encoder.training
        encoder.eval()
        pooled: list[Tensor] = []
        per_layer: list[list[Tensor]] = []
        try:
            for start in range(0, len(wavs), self.batch_size):
                batch = pad_batch(wavs[start : start + self.batch_size]).to(device)
                out = encoder(batch.waveforms, batch.attention_mask)
                pooled.append(out.pooled.float().cpu())
                if self.layers == "all":
                    vectors = [masked_mean(h.float(), out.frame_mask).cpu() for h in out.hidden_states]
                    per_layer = per_layer or [[] for _ in vectors]
                    for bucket, v in zip(per_layer, vectors, strict=True):
                        bucket.append(v)
        finally:
            encoder.train(was_training)
        metrics = {f"isotropy/{k}": v for k, v in isotropy_report(torch.cat(pooled)).items()}
        for k, bucket in enumerate(per_layer):
            metrics.update(
                {f"isotropy/layer{k}/{m}": v for m, v in isotropy_report(torch.cat(bucket)).items()}
            )
        return metrics

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero or trainer.sanity_checking:
            return
        self._last_step = step
        metrics = self.measure(pl_module.encoder)
        self.history.append((step, metrics))
        for logger in trainer.loggers:  # direct: pl_module.log is not allowed in on_fit_start
            logger.log_metrics(metrics, step=step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._ensure_loaded()
        self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)


# ---------------------------------------------------------------------------- per-layer profile
@torch.no_grad()
def encoder_profile(
    encoder: str | torch.nn.Module,
    manifest: str,
    layers: Literal["all", "pooled"] | list[int] = "all",
    max_items: int = 64,
    out: str | None = None,
    batch_size: int = 8,
    sample_size: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Isotropy of an encoder's hidden states on a manifest, frame-level and pooled, as a dict (and JSON).

    `encoder` is a hub name or HF folder of any wav2vec2-family model (loaded frozen), or a live
    `SpeechEncoder` (used where it is, its train/eval mode restored). `layers`: "all" hidden states or a
    list of indices, each reported under its index, plus "average" (the paper's embedding: uniform mean
    of all hidden states); or "pooled": only the encoder's own features (per its `layers` setting), under
    "features". Frame-level measures use one fixed, seeded sample of (utterance, frame) positions, the
    same for every layer; pooled ones use each utterance's mean over its real frames.
    """
    from rewiring.audio import pad_batch
    from rewiring.encoder import SpeechEncoder
    from rewiring.manifest import ids_hash

    if isinstance(encoder, SpeechEncoder):
        enc, name = encoder, encoder.describe()
        device = next(enc.parameters()).device
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        enc, name = SpeechEncoder(encoder, layers="last", freeze=True).to(device), str(encoder)
    n_states = enc.num_hidden_states
    if layers == "pooled":
        chosen: list[int] = []
    elif layers == "all":
        chosen = list(range(n_states))
    else:
        bad = [k for k in layers if not -n_states <= int(k) < n_states]
        if bad or not layers:
            raise ValueError(f"layers {layers} out of range: this encoder has {n_states} hidden states")
        chosen = sorted({int(k) % n_states for k in layers})
    keys = ["features"] if layers == "pooled" else [str(k) for k in chosen] + ["average"]

    ids, wavs = _load_heldout(manifest, max_items, seed)
    n_frames = enc.frame_lengths(torch.tensor([w.shape[0] for w in wavs]))
    total = int(n_frames.sum())
    size = SAMPLES_PER_DIM * enc.hidden_size if sample_size is None else int(sample_size)
    gen = torch.Generator().manual_seed(seed)
    picked = (
        torch.randperm(total, generator=gen)[:size].sort().values if total > size else torch.arange(total)
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), n_frames.cumsum(0)])

    frames: dict[str, list[Tensor]] = {k: [] for k in keys}
    pooled: dict[str, list[Tensor]] = {k: [] for k in keys}
    was_training = enc.training
    enc.eval()
    try:
        for start in range(0, len(wavs), batch_size):
            batch = pad_batch(wavs[start : start + batch_size]).to(device)
            out_b = enc(batch.waveforms, batch.attention_mask)
            if layers == "pooled":
                states = {"features": out_b.features.float()}
            else:
                states = {str(k): out_b.hidden_states[k].float() for k in chosen}
                states["average"] = torch.stack(out_b.hidden_states).float().mean(0)
            # the sampled frame positions that fall in this batch, as (row, frame) pairs
            lo, hi = offsets[start], offsets[min(start + batch_size, len(wavs))]
            sel = picked[(picked >= lo) & (picked < hi)]
            rows = torch.searchsorted(offsets, sel, right=True) - 1
            cols = (sel - offsets[rows]).to(device)
            rows = (rows - start).to(device)
            for k, h in states.items():
                frames[k].append(h[rows, cols].cpu())
                pooled[k].append(masked_mean(h, out_b.frame_mask).cpu())
    finally:
        enc.train(was_training)

    report: dict[str, Any] = {
        "encoder": name,
        "manifest": str(manifest),
        "items": len(wavs),
        "ids_sha256": ids_hash(ids),
        "frames_total": total,
        "frames_sampled": int(picked.numel()),
        "dim": enc.hidden_size,
        "seed": seed,
        "samples_per_dim": SAMPLES_PER_DIM,
        "layers": {},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning below for the whole profile, not one per layer
        for k in keys:
            report["layers"][k] = {
                "frames": isotropy_report(torch.cat(frames[k]), sample_size=size, seed=seed),
                "pooled": isotropy_report(torch.cat(pooled[k]), seed=seed),
            }
    if min(len(wavs), int(picked.numel())) < SAMPLES_PER_DIM * enc.hidden_size:
        warnings.warn(
            f"isotropy profile on {len(wavs)} utterances / {picked.numel()} frames in {enc.hidden_size} "
            f"dimensions: fewer than {SAMPLES_PER_DIM} points per dimension, so the estimates are biased "
            "by the sample; compare encoders only at equal sizes",
            stacklevel=3,  # the caller, past torch.no_grad's wrapper
        )
    if out is not None:
        write_json_atomic(Path(out), report)
        log.info("isotropy profile of %s written to %s", name, out)
    return report
