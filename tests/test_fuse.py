"""MinCE and AvgCE, per sequence and per token, in reference and clean modes."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.align import PAD_ID
from fusion.fuse import MIXED, avg_ce_weights, fuse_topk, min_ce_choice, topk_token_ce


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
