"""FrameLSTM: what a packed (bi)LSTM gives on the real frames, without packing (faster on the CPU)."""

import pytest
import torch
from torch import nn

from tasks.rnn import FrameLSTM, reverse_within


def test_reverse_within_keeps_padding_in_place():
    x = torch.arange(10.0).reshape(2, 5, 1)
    out = reverse_within(x, torch.tensor([3, 5]))[..., 0]
    assert out.tolist() == [[2.0, 1.0, 0.0, 3.0, 4.0], [9.0, 8.0, 7.0, 6.0, 5.0]]


@pytest.mark.parametrize("bidirectional,layers", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_frame_lstm_equals_packed_lstm(bidirectional, layers):
    torch.manual_seed(0)
    ours = FrameLSTM(6, 4, num_layers=layers, bidirectional=bidirectional).eval()
    ref = nn.LSTM(6, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True).eval()
    with torch.no_grad():  # the same weights, layer by layer and direction by direction
        for i in range(layers):
            for suffix, lstm in [("", ours.forward_layers[i])] + (
                [("_reverse", ours.backward_layers[i])] if bidirectional else []
            ):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(ref, f"{name}_l{i}{suffix}").copy_(getattr(lstm, f"{name}_l0"))
    x = torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 4, 2])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    want, _ = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=7)
    got = ours(
        x * (torch.arange(7)[None, :, None] < lengths[:, None, None])
        + 5.0 * (torch.arange(7)[None, :, None] >= lengths[:, None, None]),
        lengths,
    )
    torch.testing.assert_close(got, want)  # padding (here 5.0, not zeros) never reaches the real frames
    assert got.shape == (3, 7, ours.out_dim) and not got[1, 4:].any()
