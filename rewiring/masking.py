"""Masks for the rewiring views: a zeroed waveform span, and time masks over the encoder's feature frames.

The paper's twin view zeroes one contiguous span of 20% of an utterance's samples, drawn as the authors'
code draws it (``span_mask``: ``int(n/5)`` samples from a start in ``range(0, int(n/5)*4 - 1)``,
generalised to any share). Both views also get wav2vec 2.0 style time masks over feature frames
(probability 0.05, span 10, at least 2 spans), which the encoder applies by replacing those frames with
its learned mask embedding (``mask_time_indices``).

``time_masks`` is written in torch rather than calling transformers' ``_compute_mask_indices`` because that
one draws from numpy's global random state, so it can neither take a ``torch.Generator`` (reproducible
draws, independent streams per data-loader worker) nor run on the device. It keeps the same rules.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["span_mask", "time_masks"]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform draws on the generator's own device (a generator only feeds its device), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def span_mask(
    wav: Tensor,
    share: float = 0.2,
    generator: torch.Generator | None = None,
    length: int | Tensor | None = None,
) -> Tensor:
    """A copy of ``wav`` with one contiguous span of ``int(share * n)`` real samples set to zero.

    The draw is the authors' (rewireW2V2's ``sumavg-1ep.py``, ``n_mirror_mix.py``): for share 0.2 they
    zero ``int(n/5)`` samples starting at ``random.sample(range(0, int(n/5)*4 - 1), 1)``. Generalised:
    ``span = int(share * n)``, start uniform over ``range(0, whole - span - 1)`` with
    ``whole = round(span / share)``, which is ``5 * int(n/5)`` at share 0.2, so the range is theirs
    exactly. The intent is "anywhere in [0, n - span]"; their bound stops the span at least
    ``n mod 5 + 2`` samples short of the end at 0.2, and we keep that rather than an idealised range.
    A span of 0 (``n < 1/share``) zeroes nothing; where their range would be empty the start is 0.

    ``wav`` is one waveform ``[T]`` or a padded batch ``[B, T]``; ``n`` is the real length (``length``, an int
    or a ``[B]`` tensor; the full width when not given), so the span never lands in the padding and its
    size does not depend on how much padding the batch has.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if wav.dim() not in (1, 2):
        raise ValueError(f"span_mask expects a waveform [T] or a batch [B, T], got shape {tuple(wav.shape)}")
    batch = wav.unsqueeze(0) if wav.dim() == 1 else wav
    n_items, width = batch.shape
    if length is None:
        lengths = torch.full((n_items,), width, dtype=torch.long)
    else:
        lengths = torch.as_tensor(length, dtype=torch.long).reshape(-1).expand(n_items).cpu()
        if (lengths < 0).any() or (lengths > width).any():
            raise ValueError(f"lengths must be in [0, {width}], got {lengths.tolist()}")
    if share == 0.0:
        return wav.clone()
    # int(n * share); the 1e-9 keeps a product such as 100 * 0.57 = 56.999... at 57
    spans = torch.floor(lengths.double() * share + 1e-9).long()
    whole = torch.round(spans.double() / share).long()
    n_starts = torch.minimum((whole - spans - 1).clamp(min=1), lengths - spans + 1)
    starts = (_rand((n_items,), generator, torch.device("cpu")).double() * n_starts).long()
    starts = torch.minimum(starts, n_starts - 1)  # guards the (measure-zero) draw of exactly 1.0
    positions = torch.arange(width)
    zero = (positions >= starts[:, None]) & (positions < (starts + spans)[:, None])
    out = batch.masked_fill(zero.to(batch.device), 0.0)
    return out.squeeze(0) if wav.dim() == 1 else out


def time_masks(
    frame_lengths: Tensor,
    num_frames: int,
    prob: float = 0.05,
    span: int = 10,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random time masks ``[B, num_frames]`` (True = masked), drawn independently on every call.

    The rules of wav2vec 2.0 / transformers' ``_compute_mask_indices`` with an attention mask, per item of
    real length ``L``: ``max(min_masks, int(prob * L / span + u))`` spans (``u`` uniform in [0, 1):
    probabilistic rounding), at most ``L - span + 1`` and ``num_frames // span``; distinct start frames drawn
    uniformly from ``[0, L - span]``; spans may overlap, so ``prob`` is an upper bound on the masked share.
    Spans start and end inside the real frames, so padding frames are never masked. An item with fewer
    than ``span`` real frames gets no mask.
    """
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    lengths = torch.as_tensor(frame_lengths, dtype=torch.long)
    device = lengths.device
    if lengths.dim() != 1:
        raise ValueError(f"frame_lengths must be [B], got shape {tuple(lengths.shape)}")
    if (lengths > num_frames).any():
        raise ValueError(f"frame lengths {lengths.tolist()} exceed num_frames={num_frames}")
    n_items = lengths.shape[0]
    lengths = lengths.clamp(min=0)
    n_starts = (lengths - span + 1).clamp(min=0)  # valid start positions per item

    u = _rand((n_items,), generator, device)
    n_spans = (prob * lengths.double() / span + u.double()).floor().long().clamp(min=min_masks)
    n_spans = torch.minimum(n_spans, n_starts).clamp(max=num_frames // span)
    k = int(n_spans.max().item()) if n_items else 0
    if k == 0:
        return torch.zeros(n_items, num_frames, dtype=torch.bool, device=device)

    # Distinct starts without replacement: the k largest random keys among the valid start positions.
    keys = _rand((n_items, num_frames), generator, device)
    keys = keys.masked_fill(torch.arange(num_frames, device=device)[None, :] >= n_starts[:, None], -1.0)
    starts = keys.topk(k, dim=1).indices  # [B, k]
    keep = torch.arange(k, device=device)[None, :] < n_spans[:, None]  # [B, k]
    frames = starts[:, :, None] + torch.arange(span, device=device)  # [B, k, span]
    frames = frames.masked_fill(~keep[:, :, None], num_frames)  # dropped spans go to a spare column
    mask = torch.zeros(n_items, num_frames + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, frames.reshape(n_items, -1), True)
    return mask[:, :num_frames]
