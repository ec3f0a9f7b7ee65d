"""DER, PIT and the SUPERB slot metrics against cases worked out by hand (arithmetic in comments)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.metrics import (
    DiarizationErrorRate,
    SlotTypeF1,
    SlotValueCER,
    diarization_errors,
    edit_distance,
    pit_bce,
    slot_type_f1,
    slot_value_errors,
)

# Ten frames, two reference speakers A and B, two system speakers s0 and s1:
#   frame   0 1 2 3 4 5 6 7 8 9
#   ref A   1 1 1 1 1 1 0 0 0 0
#   ref B   0 0 0 0 1 1 1 1 1 1
#   sys s0  1 1 1 0 0 0 0 0 0 1
#   sys s1  0 0 0 1 1 1 1 1 1 1
REF = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]).T
SYS = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]).T
# n_ref = 1 1 1 1 2 2 1 1 1 1  -> speaker time 12
# n_sys = 1 1 1 1 1 1 1 1 1 2
# missed      = sum max(n_ref - n_sys, 0) = frames 4, 5          = 2
# false alarm = sum max(n_sys - n_ref, 0) = frame 9              = 1
# mapping A->s0, B->s1: co-active A&s0 = {0,1,2} = 3, B&s1 = {4..9} = 6 -> 9
# mapping A->s1, B->s0: A&s1 = {3,4,5} = 3, B&s0 = {9} = 1            -> 4; best is 9
# confusion   = sum min(n_ref, n_sys) - 9 = 10 - 9 = 1 (frame 3: A talks, s1 answers)
# DER = (2 + 1 + 1) / 12 = 1/3


def test_der_hand_case():
    counts = diarization_errors(SYS[None].float(), REF[None].float())
    assert {k: int(v) for k, v in counts.items()} == {
        "missed": 2, "false_alarm": 1, "confusion": 1, "speaker_time": 12,
    }  # fmt: skip
    der = DiarizationErrorRate()
    der.update(SYS[None].float(), REF[None].float())
    assert der.compute().item() == pytest.approx(4 / 12)
    parts = der.components()
    assert parts["miss"].item() == pytest.approx(2 / 12)
    assert parts["fa"].item() == pytest.approx(1 / 12)
    assert parts["conf"].item() == pytest.approx(1 / 12)


def test_der_is_invariant_to_system_speaker_order_and_thresholds_probabilities():
    der = DiarizationErrorRate()
    # s0 and s1 swapped: the best mapping swaps too, same 4/12.
    der.update(SYS[None, :, [1, 0]].float(), REF[None].float())
    assert der.compute().item() == pytest.approx(4 / 12)
    # Probabilities: 0.9 -> active, 0.2 -> not (threshold 0.5): the same decisions, same DER.
    probs = torch.where(SYS.bool(), 0.9, 0.2)[None]
    der2 = DiarizationErrorRate()
    der2.update(probs, REF[None].float())
    assert der2.compute().item() == pytest.approx(4 / 12)


def test_der_perfect_and_mask_ignores_padding():
    # Utterance 2 is 4 frames long inside a 10-frame batch; its 6 padded frames are garbage.
    ref2 = torch.zeros(10, 2)
    ref2[:4, 0] = 1  # speaker A for 4 frames -> speaker time 4
    sys2 = torch.ones(10, 2)  # says both talk everywhere
    sys2[:4, 1] = 0  # on the real frames: exactly A (on s0)
    preds = torch.stack([REF.float(), sys2])  # utterance 1 predicted perfectly
    target = torch.stack([REF.float(), ref2])
    mask = torch.tensor([[True] * 10, [True] * 4 + [False] * 6])
    der = DiarizationErrorRate()
    der.update(preds, target, mask)
    # Both utterances perfect on their real frames: 0 errors / (12 + 4)
    assert der.compute().item() == 0.0
    assert int(der.speaker_time) == 16
    # Without the mask the padding counts: frames 4..9 of utterance 2 have n_sys 2, n_ref 0
    # -> 6 frames x 2 false-alarm speaker-frames = 12 errors over 16 -> 0.75
    der_nomask = DiarizationErrorRate()
    der_nomask.update(preds, target)
    assert der_nomask.compute().item() == pytest.approx(12 / 16)


def test_der_accumulates_totals_not_batch_means():
    der = DiarizationErrorRate()
    der.update(SYS[None].float(), REF[None].float())  # 4 errors / 12
    ref = torch.zeros(1, 4, 2)
    ref[0, :, 0] = 1  # 4 frames of speech, nothing predicted: missed 4 / 4
    der.update(torch.zeros(1, 4, 2), ref)
    # (4 + 4) / (12 + 4) = 0.5, not the mean of 1/3 and 1 (0.667)
    assert der.compute().item() == pytest.approx(0.5)


def test_der_three_speakers_uses_an_optimal_assignment():
    # ref speakers 0,1,2 talk on frames {0,1}, {2,3}, {4,5}; the system labels them 2,0,1.
    ref = torch.zeros(1, 6, 3)
    sys = torch.zeros(1, 6, 3)
    for spk, sys_spk in [(0, 2), (1, 0), (2, 1)]:
        ref[0, 2 * spk : 2 * spk + 2, spk] = 1
        sys[0, 2 * spk : 2 * spk + 2, sys_spk] = 1
    # With the mapping 0->2, 1->0, 2->1 every frame matches: DER 0 (the identity mapping gives 6/6).
    der = DiarizationErrorRate()
    der.update(sys, ref)
    assert der.compute().item() == 0.0
    # A system with one speaker fewer: reference 2 (frames 4,5) is missed on the padded column.
    der2 = DiarizationErrorRate()
    der2.update(sys[:, :, [2, 0]], ref)  # keeps system speakers 2 and 0 -> ref 0 and 1 found
    # missed = frames 4,5 = 2; speaker time 6 -> 1/3
    assert der2.compute().item() == pytest.approx(2 / 6)


def test_pit_bce_picks_the_better_speaker_order():
    # All-zero logits: BCE is ln 2 for every target, whichever the order.
    target = REF[None].float()
    loss, _ = pit_bce(torch.zeros(1, 10, 2), target)
    assert loss.item() == pytest.approx(math.log(2))
    # Logits that match the swapped target: PIT returns the swapped loss and permutation 1.
    logits = (target[..., [1, 0]] * 2 - 1) * 3.0
    loss, perm = pit_bce(logits, target)
    expected = F.binary_cross_entropy_with_logits(logits, target[..., [1, 0]])
    assert loss.item() == pytest.approx(expected.item())
    assert perm.tolist() == [1]
    # It is a real minimum: lower than the loss with the identity order.
    assert loss < F.binary_cross_entropy_with_logits(logits, target)
    # Gradients flow.
    logits.requires_grad_(True)
    pit_bce(logits, target)[0].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pit_bce_masks_padding():
    # Utterance of 4 real frames in 10: BCE on padding must not count.
    target = torch.zeros(1, 10, 2)
    logits = torch.full((1, 10, 2), -20.0)  # confident "silent": ~0 loss on the real frames
    logits[0, 4:] = 20.0  # confidently wrong, but only on padding
    mask = torch.tensor([[True] * 4 + [False] * 6])
    loss, _ = pit_bce(logits, target, mask)
    assert loss.item() < 1e-6


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "abc") == 0


def test_slot_type_f1_hand_cases():
    ref = [("artist", "the beatles"), ("playlist", "road trip")]
    # one of two types found, nothing wrong: P = 1/1, R = 1/2, F1 = 2*1*0.5/1.5 = 2/3
    assert slot_type_f1([("artist", "the beatles")], ref) == pytest.approx(2 / 3)
    # values do not matter for slot-type F1 (SUPERB): a wrong value of the right type is a hit
    assert slot_type_f1([("artist", "abba"), ("playlist", "x")], ref) == 1.0
    assert slot_type_f1([], []) == 1.0  # both empty
    assert slot_type_f1([], [("city", "paris")]) == 0.0
    assert slot_type_f1([("city", "x")], []) == 0.0
    # ref types {a, b}, pred {b, c, d}: hit 1, P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4
    assert slot_type_f1([("b", "1"), ("c", "2"), ("d", "3")], [("a", "1"), ("b", "2")]) == pytest.approx(0.4)
    # repeated types count once: pred {a}, ref {a}: 1
    assert slot_type_f1([("a", "x"), ("a", "y")], [("a", "x")]) == 1.0


def test_slot_type_f1_metric_is_the_mean_over_utterances():
    m = SlotTypeF1()
    m.update([[("artist", "the beatles")], []], [[("artist", "x"), ("playlist", "y")], []])
    m.update([[]], [[("city", "paris")]])
    # utterances: 2/3, 1, 0 -> mean 5/9
    assert m.compute().item() == pytest.approx(5 / 9)


def test_slot_value_cer_hand_cases():
    # "the beetles" vs "the beatles": one substitution over 11 reference characters
    assert slot_value_errors([("artist", "the beetles")], [("artist", "the beatles")]) == (1, 11)
    # two artists in the reference, one predicted: "queen" matches itself (0 edits);
    # "abba" gets the best candidate of its type, "queen": no common letter -> 5 edits (4 sub + 1 ins)
    assert slot_value_errors([("artist", "queen")], [("artist", "abba"), ("artist", "queen")]) == (5, 9)
    # the type is missing from the prediction: the value is compared with "" -> 5 deletions
    assert slot_value_errors([], [("city", "paris")]) == (5, 5)
    # a predicted slot of a type the reference lacks costs nothing here
    assert slot_value_errors([("country", "france")], []) == (0, 0)
    m = SlotValueCER()
    m.update(
        [[("artist", "the beetles")], [("artist", "queen")], [], [("country", "france")]],
        [[("artist", "the beatles")], [("artist", "abba"), ("artist", "queen")], [("city", "paris")], []],
    )
    # (1 + 5 + 5 + 0) / (11 + 9 + 5 + 0) = 11/25 = 0.44
    assert m.compute().item() == pytest.approx(0.44)


def test_slot_metrics_reject_mismatched_batches():
    with pytest.raises(ValueError, match="one prediction per reference"):
        SlotTypeF1().update([[]], [[], []])


def test_der_components_as_metrics():
    # The hand case again: miss 2/12, fa 1/12, conf 1/12.
    for component, expected in (("miss", 2 / 12), ("fa", 1 / 12), ("conf", 1 / 12), ("der", 4 / 12)):
        m = DiarizationErrorRate(component=component)
        m.update(SYS[None].float(), REF[None].float())
        assert m.compute().item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="component"):
        DiarizationErrorRate(component="jer")


def test_states_merge_like_a_ddp_sync():
    # Under DDP torchmetrics gathers each process's states and applies dist_reduce_fx ("sum");
    # merge_state applies the same reductions, so two halves merged must equal one metric over all.
    ref_b = torch.zeros(1, 4, 2)
    ref_b[0, :, 0] = 1
    whole, half_a, half_b = DiarizationErrorRate(), DiarizationErrorRate(), DiarizationErrorRate()
    whole.update(SYS[None].float(), REF[None].float())
    whole.update(torch.zeros(1, 4, 2), ref_b)
    half_a.update(SYS[None].float(), REF[None].float())
    half_b.update(torch.zeros(1, 4, 2), ref_b)
    half_a.merge_state(half_b)
    assert half_a.compute().item() == pytest.approx(whole.compute().item()) == pytest.approx(0.5)

    preds = [[("artist", "the beatles")], [], [("city", "pariss")]]
    refs = [[("artist", "x"), ("playlist", "y")], [], [("city", "paris")]]
    for cls in (SlotTypeF1, SlotValueCER):
        whole, a, b = cls(), cls(), cls()
        whole.update(preds, refs)
        a.update(preds[:1], refs[:1])
        b.update(preds[1:], refs[1:])
        a.merge_state(b)
        assert a.compute().item() == pytest.approx(whole.compute().item())
