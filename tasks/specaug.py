"""SpecAugment over encoder features, as s3prl's SUPERB recipes apply it (asr, sf): training only.

s3prl's runner passes the featurizer's output (the learned weighted sum of the upstream's layers,
[T, D] per utterance) through ``SpecAug`` before the downstream head, in its training loop only:
a time warp, then masks over feature dimensions ("frequency"), then masks over frames ("time"),
each filled with zeros. `SpecAugment` does the same to a padded batch [B, F, D] where the features
enter the head, so it sees the same tensor whether the features were encoded live or read from the
frozen-feature cache (`TaskModule.encode` returns them; the masks come after, never inside it).

The arguments keep s3prl's names and meaning (``specaug`` block of s3prl/downstream/asr/config.yaml).
A width range ``(lo, hi)`` draws each mask's width from ``lo .. hi - 1`` (torch.randint's ``high``
is exclusive, as in s3prl). Two choices differ from s3prl's code, both towards masks on real frames:
- time masks and the warp are drawn per utterance over its own real frames; s3prl draws mask starts
  over the batch's padded length, so a short utterance in a long batch can lose a mask to padding;
- s3prl's ``adaptive`` variant (mask count and width scaled with the length; on in upstream s3prl's
  snips.yaml, off in the authors' checkout and in its asr config) is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpecAugment"]


class SpecAugment(nn.Module):
    """Time warp, feature-dimension masks and frame masks over [B, F, D] features; identity in eval mode.

    Args:
        time_warp_window: warp window in frames (s3prl's ``time_warp_window``); 0 turns the warp off.
            An utterance of at most twice the window is left unwarped, as in s3prl.
        num_freq_mask: masks over feature dimensions per utterance (``num_freq_mask``).
        freq_mask_width_range: their widths, drawn from ``lo .. hi - 1`` dimensions.
        num_time_mask: masks over frames per utterance (``num_time_mask``).
        time_mask_width_range: their widths, drawn from ``lo .. hi - 1`` frames (at most the
            utterance's length).
    """

    def __init__(
        self,
        time_warp_window: int = 5,
        num_freq_mask: int = 4,
        freq_mask_width_range: tuple[int, int] = (0, 50),
        num_time_mask: int = 2,
        time_mask_width_range: tuple[int, int] = (0, 40),
    ) -> None:
        super().__init__()
        for name, (lo, hi) in (("freq_mask_width_range", freq_mask_width_range),
                               ("time_mask_width_range", time_mask_width_range)):  # fmt: skip
            if not 0 <= lo < hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo < hi, got {(lo, hi)}")
        if time_warp_window < 0 or num_freq_mask < 0 or num_time_mask < 0:
            raise ValueError("time_warp_window, num_freq_mask and num_time_mask must be >= 0")
        self.time_warp_window = int(time_warp_window)
        self.num_freq_mask = int(num_freq_mask)
        self.freq_mask_width_range = (int(freq_mask_width_range[0]), int(freq_mask_width_range[1]))
        self.num_time_mask = int(num_time_mask)
        self.time_mask_width_range = (int(time_mask_width_range[0]), int(time_mask_width_range[1]))

    def extra_repr(self) -> str:
        return (
            f"time_warp_window={self.time_warp_window}, num_freq_mask={self.num_freq_mask}, "
            f"freq_mask_width_range={self.freq_mask_width_range}, num_time_mask={self.num_time_mask}, "
            f"time_mask_width_range={self.time_mask_width_range}"
        )

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        """features [B, F, D], frame_mask [B, F] (True = real frame) -> augmented features, same shape.

        Out of place (the input may be the cache's tensor or need its gradient); padded frames are
        left as they are.
        """
        if not self.training:
            return features
        lengths = frame_mask.sum(1).long()
        x = features
        if self.time_warp_window > 0:
            x = self._time_warp(x, lengths)
        masks = []
        if self.num_freq_mask > 0:
            dims = torch.full_like(lengths, x.shape[2])
            freq = self._spans(dims, x.shape[2], self.num_freq_mask, self.freq_mask_width_range)
            masks.append(freq[:, None, :] & frame_mask[:, :, None].bool())
        if self.num_time_mask > 0:
            masks.append(
                self._spans(lengths, x.shape[1], self.num_time_mask, self.time_mask_width_range)[:, :, None]
            )
        for m in masks:
            x = x.masked_fill(m, 0.0)
        return x

    @staticmethod
    def _spans(sizes: Tensor, width: int, count: int, widths: tuple[int, int]) -> Tensor:
        """[B, width] bool: ``count`` spans per row, each inside ``[0, sizes[b])``, widths from the range."""
        b, device = sizes.shape[0], sizes.device
        span = torch.randint(widths[0], widths[1], (b, count), device=device)
        span = torch.minimum(span, sizes[:, None])
        start = (torch.rand(b, count, device=device) * (sizes[:, None] - span + 1)).floor().long()
        pos = torch.arange(width, device=device)[None, None, :]
        return ((pos >= start[..., None]) & (pos < (start + span)[..., None])).any(dim=1)

    def _time_warp(self, x: Tensor, lengths: Tensor) -> Tensor:
        """s3prl's warp per utterance: a centre c in [w, T - w), moved to c' in [c - w + 1, c + w]; the
        frames left of c are resized (bicubic) onto c', those right of it onto T - c'."""
        w = self.time_warp_window
        rows = []
        for i, n in enumerate(lengths.tolist()):
            row = x[i]
            if n - w <= w:
                rows.append(row)
                continue
            c = int(torch.randint(w, n - w, ()))
            c2 = int(torch.randint(c - w, c + w, ())) + 1
            real = row[:n].float()[None, None]  # [1, 1, n, D]: bicubic is the identity along D
            dim = real.shape[-1]
            left = F.interpolate(real[:, :, :c], size=(c2, dim), mode="bicubic", align_corners=False)
            right = F.interpolate(real[:, :, c:], size=(n - c2, dim), mode="bicubic", align_corners=False)
            warped = torch.cat([left, right], dim=2)[0, 0].to(row.dtype)
            rows.append(torch.cat([warped, row[n:]], dim=0))
        return torch.stack(rows)
