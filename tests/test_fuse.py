"""MinCE and AvgCE, per sequence and per token, in reference and clean modes."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.align import PAD_ID
from fusion.teacher.fuse import (
    MIXED,
    NO_TEACHER,
    avg_ce_weights,
    fuse_topk,
    local_ce,
    min_ce_choice,
    topk_token_ce,
)


def test_bf16_rewards_tie_and_the_first_candidate_wins():
    assert min_ce_choice([2.004, 2.000]) == 0
    assert min_ce_choice([2.004, 2.000], precision="fp64") == 1


def test_reference_avg_weights_are_almost_uniform_and_clean_follow_ce():
    assert avg_ce_weights([2.1, 2.3, 1.9]) == pytest.approx([0.333, 0.325, 0.342], abs=1e-3)
    clean = np.array(avg_ce_weights([2.1, 2.3, 1.9], mode="clean"))
    assert clean == pytest.approx(
        np.exp(-np.array([2.1, 2.3, 1.9])) / np.exp(-np.array([2.1, 2.3, 1.9])).sum()
    )


def _candidates():
    ids = np.array(
        [
            [[1, 2, PAD_ID], [3, PAD_ID, PAD_ID]],  # target's own
            [[2, 4, 5], [PAD_ID, PAD_ID, PAD_ID]],  # a source with nothing at position 1
        ]
    )
    logits = np.where(
        ids == PAD_ID,
        -np.inf,
        np.array([[[2.0, 1.0, 0.0], [1.0, 0, 0]], [[3.0, 1.0, 0.5], [0, 0, 0]]]),
    )
    return ids, logits


def test_min_ce_per_sequence_copies_the_chosen_candidate_but_skips_its_gaps():
    ids, logits = _candidates()
    fused = fuse_topk(ids, logits, [2.5, 1.0], method="min_ce")
    assert fused.choice.tolist() == [1, 0]
    assert fused.ids.tolist() == [[2, 4, 5], [3, PAD_ID, PAD_ID]]


def test_min_ce_per_token_chooses_per_position():
    ids, logits = _candidates()
    fused = fuse_topk(ids, logits, [[1.0, 1.0], [2.0, 0.5]], method="min_ce", mode="clean")
    assert fused.choice.tolist() == [0, 0]


def test_avg_ce_equals_the_dense_mixture_top_k():
    ids, logits = _candidates()
    ce = [2.0, 1.5]
    fused = fuse_topk(ids, logits, ce, method="avg_ce", mode="clean")
    weights = np.array(avg_ce_weights(ce, mode="clean"))
    vocab = 6
    for position in range(2):
        dense = np.zeros(vocab)
        present = [c for c in range(2) if (ids[c, position] != PAD_ID).any()]
        w = weights[present] / weights[present].sum()
        for weight, c in zip(w, present, strict=True):
            keep = ids[c, position] != PAD_ID
            probs = np.exp(logits[c, position, keep]) / np.exp(logits[c, position, keep]).sum()
            np.add.at(dense, ids[c, position, keep], weight * probs)
        expected = np.argsort(-dense, kind="stable")[: (dense > 0).sum()][:3]
        got = fused.ids[position][fused.ids[position] != PAD_ID]
        assert got.tolist() == expected.tolist()
        assert np.exp(fused.logits[position, : len(got)]) == pytest.approx(dense[expected])
    assert (fused.choice == MIXED).all()


def test_token_ce_is_minus_log_renormalised_probability_or_inf():
    ids = np.array([[4, 7, PAD_ID], [1, 2, 3]])
    logits = np.array([[1.0, 0.0, -np.inf], [0.0, 0.0, 0.0]])
    ce = topk_token_ce(ids, logits, np.array([7, 9]))
    assert ce[0] == pytest.approx(np.log1p(np.e))
    assert ce[1] == np.inf


@pytest.mark.parametrize(
    ("ce", "message"),
    [([float("nan"), 1.0], "NaN"), ([], "shape"), ([1.0, 2.0, 3.0], r"expected \[2\]")],
)
def test_bad_ce_raises_value_error(ce, message):
    ids, logits = _candidates()
    with pytest.raises(ValueError, match=message):
        fuse_topk(ids, logits, ce)


def test_unknown_method_is_rejected():
    ids, logits = _candidates()
    with pytest.raises(ValueError, match="method must be"):
        fuse_topk(ids, logits, [1.0, 1.0], method="max")


def _one_hot_fallback_world():
    """Three positions, labels 7, 8, 9. The target's own top-2 everywhere; a source that is
    aligned only at position 1 and holds the one-hot fallback (on the label) elsewhere."""
    target_ids = np.array([[7, 1], [2, 8], [3, 4]])  # label 9 missing at position 2
    target_logits = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    source_ids = np.array([[7, PAD_ID], [8, 2], [9, PAD_ID]])
    source_logits = np.array([[1.0, -np.inf], [3.0, 0.0], [1.0, -np.inf]])
    ids = np.stack([target_ids, source_ids])
    logits = np.stack([target_logits, source_logits])
    aligned = np.array([[True, True, True], [False, True, False]])
    return ids, logits, aligned, np.array([7, 8, 9])


def test_per_token_min_ce_never_lets_a_fallback_beat_a_real_candidate():
    ids, logits, aligned, labels = _one_hot_fallback_world()
    ce = np.stack([topk_token_ce(ids[c], logits[c], labels) for c in range(2)])
    assert ce[1, 0] == 0.0  # the fallback's CE is the best possible; it must not compete
    fused = fuse_topk(
        ids, logits, ce, mode="clean", aligned=aligned, fallback_ids=labels, method="min_ce"
    )
    # position 0: only the target is real (p(7) = 0.5); position 1: the source is surer of 8
    assert fused.choice[:2].tolist() == [0, 1]
    assert fused.ids[0].tolist() == [7, 1] and fused.ids[1].tolist() == [8, 2]


@pytest.mark.parametrize(
    ("treatment", "expected_ids"), [("one_hot", [9, PAD_ID]), ("mask", [PAD_ID, PAD_ID])]
)
@pytest.mark.parametrize("method", ["min_ce", "avg_ce"])
def test_a_position_no_candidate_predicts_gets_the_treatment_not_the_target(
    treatment, expected_ids, method
):
    ids, logits, aligned, labels = _one_hot_fallback_world()
    ce = np.stack([topk_token_ce(ids[c], logits[c], labels) for c in range(2)])
    fused = fuse_topk(
        ids,
        logits,
        ce,
        mode="clean",
        method=method,
        aligned=aligned,
        fallback_ids=labels,
        no_teacher=treatment,
    )
    # position 2: the target (first candidate) lacks 9, the source only has its fallback
    assert fused.choice[2] == NO_TEACHER
    assert fused.ids[2].tolist() == expected_ids
    assert fused.logits[2][0] == (1.0 if treatment == "one_hot" else -np.inf)


def test_per_token_avg_ce_weighs_only_candidates_that_hold_the_label():
    ids, logits, aligned, labels = _one_hot_fallback_world()
    ce = np.stack([topk_token_ce(ids[c], logits[c], labels) for c in range(2)])
    fused = fuse_topk(ids, logits, ce, mode="clean", method="avg_ce", aligned=aligned)
    # position 0: the source's fallback takes no weight, so the result is the target alone
    assert sorted(np.exp(fused.logits[0][:2]).round(6).tolist()) == [0.5, 0.5]
    # position 1: both compete, with weights softmax(-ce) over their CEs of label 8
    w = np.exp(-ce[:, 1]) / np.exp(-ce[:, 1]).sum()
    p_target = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()  # ids 2, 8
    p_source = np.exp([3.0, 0.0]) / np.exp([3.0, 0.0]).sum()  # ids 8, 2
    p8 = w[0] * p_target[1] + w[1] * p_source[0]
    assert fused.ids[1][0] == 8
    assert np.exp(fused.logits[1][0]) == pytest.approx(p8)


def test_clean_per_sequence_min_ce_fills_the_winner_s_gaps_with_the_next_real_candidate():
    ids, logits, aligned, labels = _one_hot_fallback_world()
    ce = [2.0, 1.0]  # the source wins the sequence
    clean = fuse_topk(ids, logits, ce, mode="clean", aligned=aligned, fallback_ids=labels)
    assert clean.choice.tolist() == [0, 1, 0]
    assert clean.ids[0].tolist() == [7, 1] and clean.ids[2].tolist() == [3, 4]
    # reference: the winner's stored rows, its fallbacks included, marked as such
    reference = fuse_topk(ids, logits, ce, mode="reference", aligned=aligned, fallback_ids=labels)
    assert reference.ids.tolist() == ids[1].tolist()
    assert reference.choice.tolist() == [NO_TEACHER, 1, NO_TEACHER]


def test_local_ce_is_a_block_or_a_look_back_mean_that_skips_missing_positions():
    """A has NLL 1 2 . 4 5, B 3 . . . 1 (. none). Blocks of 2: A 1.5 1.5 4 4 5; B 3 3, then
    nothing in block 1 (A's 4 stands in), then 1. Looking back 2: nothing at 0 (both 0), then
    A 1, 1.5, 2, 4 and B 3, 3, then A's 2 and 4 where B has nothing before."""
    nan = np.nan
    nll = np.asarray([[1, 2, nan, 4, 5], [3, nan, nan, nan, 1]], dtype=float)
    blocks = local_ce(nll, 2, causal=False)
    np.testing.assert_allclose(blocks, [[1.5, 1.5, 4, 4, 5], [3, 3, 4, 4, 1]])
    back = local_ce(nll, 2, causal=True)
    np.testing.assert_allclose(back, [[0, 1, 1.5, 2, 4], [0, 3, 3, 2, 4]])
