"""Masks: the twin view's zeroed span, frame arithmetic, and time masks over real frames only."""

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from rewiring.encoder import TINY_CONFIG, SpeechEncoder
from rewiring.frames import FrameLayout
from rewiring.masking import span_mask, time_masks

KERNELS, STRIDES = TINY_CONFIG["conv_kernel"], TINY_CONFIG["conv_stride"]


def _zeroed_runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of zeros."""
    z = torch.cat([torch.tensor([False]), row == 0, torch.tensor([False])]).int()
    edges = z.diff()
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def test_span_mask_zeroes_one_contiguous_span_of_the_share():
    wav = torch.rand(16000) + 0.5  # no zeros of its own
    out = span_mask(wav, 0.2, generator=torch.Generator().manual_seed(0))
    assert out is not wav and torch.all(wav > 0), "the input must stay untouched"
    runs = _zeroed_runs(out)
    assert len(runs) == 1 and runs[0][1] == 3200
    untouched = torch.ones_like(wav, dtype=torch.bool)
    untouched[runs[0][0] : runs[0][0] + 3200] = False
    assert torch.equal(out[untouched], wav[untouched])


def test_span_mask_stays_inside_the_valid_length_of_each_row():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([8000, 5000, 10000])
    wav = torch.rand(3, 10000) + 0.5
    wav[torch.arange(10000)[None, :] >= lengths[:, None]] = 0.0  # padding
    for _ in range(50):
        out = span_mask(wav, 0.2, generator=gen, length=lengths)
        for row, n in zip(out, lengths.tolist(), strict=True):
            runs = _zeroed_runs(row[:n])
            assert len(runs) == 1 and runs[0][1] == n // 5
            assert runs[0][0] + runs[0][1] <= n - n % 5 - 2  # the authors' bound (below)


def test_span_mask_is_reproducible_and_varies_across_draws():
    wav = torch.rand(4000) + 0.5
    a = span_mask(wav, 0.3, generator=torch.Generator().manual_seed(7))
    b = span_mask(wav, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(7)
    starts = {_zeroed_runs(span_mask(wav, 0.3, generator=gen))[0][0] for _ in range(20)}
    assert len(starts) > 10
    # the generalised draw at share 0.5: span int(12 * 0.5) = 6, start in range(0, 12 - 6 - 1)
    gen = torch.Generator().manual_seed(0)
    starts = {_zeroed_runs(span_mask(torch.rand(12) + 0.5, 0.5, generator=gen))[0][0] for _ in range(200)}
    assert starts == set(range(5))


@pytest.mark.parametrize("n", [5, 9, 10, 23, 64, 99])
def test_span_mask_draws_the_span_and_start_exactly_as_the_authors(n):
    """rewireW2V2: mask_len = int(num / 5); ran_start = random.sample(range(0, int(num / 5) * 4 - 1), 1)[0]."""
    span, theirs = int(n / 5), set(range(0, int(n / 5) * 4 - 1))
    gen = torch.Generator().manual_seed(n)
    starts = set()
    for _ in range(40 * len(theirs)):
        runs = _zeroed_runs(span_mask(torch.rand(n) + 0.5, 0.2, generator=gen))
        assert len(runs) == 1 and runs[0][1] == span
        starts.add(runs[0][0])
    assert starts == theirs  # every start of their range is drawn, and no other
    # the same rule row by row in a padded batch, at the lengths of real utterances
    lengths = torch.tensor([16000, 90001, 179999, 5])
    wav = torch.rand(4, 179999) + 0.5
    for _ in range(20):
        out = span_mask(wav, 0.2, generator=gen, length=lengths)
        for row, m in zip(out, lengths.tolist(), strict=True):
            (start, size), *rest = _zeroed_runs(row[:m])
            assert not rest and size == int(m / 5) and 0 <= start < int(m / 5) * 4 - 1


def test_span_mask_of_nothing():
    wav = torch.rand(4) + 0.5
    assert torch.equal(span_mask(wav, 0.2), wav)  # int(4 / 5) = 0 samples
    assert torch.equal(span_mask(torch.rand(50) + 0.5, 0.0).ne(0), torch.ones(50, dtype=torch.bool))


def test_span_mask_rejects_a_bad_share():
    with pytest.raises(ValueError):
        span_mask(torch.ones(10), 1.5)


def test_frame_lengths_match_transformers():
    model = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in TINY_CONFIG.items() if k != "model_type"}))
    lengths = torch.cat([torch.arange(400, 2000), torch.randint(2000, 300_000, (500,))])
    layout = FrameLayout(tuple(KERNELS), tuple(STRIDES))
    assert torch.equal(layout(lengths), model._get_feat_extract_output_lengths(lengths))
    assert int(layout(16000)) == 49  # 50 frames/s
    assert int(layout(100)) == 0  # shorter than the receptive field: clamped


def test_time_masks_never_mask_padding():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        lengths = torch.randint(0, 80, (6,), generator=gen)
        num_frames = int(lengths.max()) + int(torch.randint(0, 5, (1,), generator=gen))
        mask = time_masks(lengths, num_frames, prob=0.3, span=5, min_masks=2, generator=gen)
        assert mask.shape == (6, num_frames) and mask.dtype == torch.bool
        padding = torch.arange(num_frames)[None, :] >= lengths[:, None]
        assert not mask[padding].any()
        short = lengths < 5
        assert not mask[short].any()
        assert mask[~short].sum(1).ge(5).all()  # at least min_masks spans: >= one span's frames


def test_time_masks_follow_the_wav2vec2_rules():
    # the paper's setting on 3 s (149 frames): max(2, int(0.745 + u)) = 2 spans of 10 frames
    gen = torch.Generator().manual_seed(0)
    mask = time_masks(torch.full((2000,), 149), 149, generator=gen)
    ours = mask.sum(1).double()
    np.random.seed(0)
    theirs = torch.from_numpy(_compute_mask_indices((2000, 149), 0.05, 10, min_masks=2)).sum(1).double()
    assert abs(ours.mean() - theirs.mean()) < 0.3 and ours.max() == 20 and ours.min() >= 10
    # pre-training-like: many overlapping spans; the masked share matches transformers' within noise
    lengths = torch.randint(60, 200, (2000,), generator=gen)
    ours = time_masks(lengths, 200, prob=0.65, span=10, min_masks=2, generator=gen).sum(1).double()
    attn = (torch.arange(200)[None, :] < lengths[:, None]).long()
    theirs = _compute_mask_indices((2000, 200), 0.65, 10, attention_mask=attn, min_masks=2).sum(1)
    assert abs(ours.mean() - float(theirs.mean())) / float(theirs.mean()) < 0.03


def test_time_masks_reproducible_with_a_generator_and_fresh_per_call():
    lengths = torch.tensor([100, 80, 120])
    a = time_masks(lengths, 120, generator=torch.Generator().manual_seed(3))
    b = time_masks(lengths, 120, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(3)
    draws = {tuple(time_masks(lengths, 120, generator=gen).flatten().tolist()) for _ in range(10)}
    assert len(draws) == 10


def test_masked_frames_change_the_encoder_output_in_eval_mode():
    torch.manual_seed(0)
    enc = SpeechEncoder(TINY_CONFIG, layers="last").eval()
    wav = torch.randn(2, 16000)
    lengths = enc.frame_lengths(torch.tensor([16000, 16000]))
    mask = time_masks(lengths, int(lengths.max()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = enc(wav).features
        masked = enc(wav, mask_time_indices=mask).features
        again = enc(wav, mask_time_indices=mask).features
    assert mask.any()
    assert torch.equal(masked, again)  # eval mode: no randomness of HF's own
    changed = (masked - plain).abs().amax(-1) > 1e-4
    assert changed[mask].all()
