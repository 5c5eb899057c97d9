"""Reference mode reproduces every public golden vector exactly."""

from __future__ import annotations

import pytest
import torch

from fusion.align import dtw_align, mined_vocab_map, transfer_topk
from fusion.align.slow import dtw_align_slow
from fusion.teacher.fuse import ce_rewards, min_ce_choice
from fusion.train.loss import sparse_fusion_loss

DTW_CASES = [
    "T1_same_segmentation",
    "T2_many_base_to_one_blend",
    "T3_one_base_to_many_blend",
    "T5_digits",
    "T6_case",
    "T7_newline_bytes",
]


@pytest.mark.parametrize("aligner", [dtw_align, dtw_align_slow], ids=["fast", "slow"])
@pytest.mark.parametrize("case", DTW_CASES)
def test_dtw_matches_golden_cost_paths_and_fusechat_ties(golden, case, aligner):
    vector = golden["dtw"][case]
    markers = {"source_marker": vector["source_marker"], "target_marker": vector["target_marker"]}
    result = aligner(vector["source_tokens"], vector["target_tokens"], **markers)
    assert result.cost == vector["cost"]
    assert result.target_to_source == vector["target_to_source"]
    assert result.source_to_target == vector["source_to_target"]
    fusechat = aligner(
        vector["source_tokens"], vector["target_tokens"], tie_break="fusechat", **markers
    )
    assert fusechat.target_to_source == vector["target_to_source_fusechat2_ties"]


def test_golden_cases_are_all_covered(golden):
    assert sorted(golden["dtw"]) == sorted(DTW_CASES)


def test_mined_map_matches_golden(golden):
    vocab = golden["vocab"]
    mapping = mined_vocab_map(
        vocab["source_vocab"],
        vocab["target_vocab"],
        source_marker=vocab["source_marker"],
        target_marker=vocab["target_marker"],
    )
    assert mapping == vocab["mined_map"]


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("case", ["A", "B"])
def test_transfer_matches_golden(golden, case, mode):
    vector = golden["transfer"][case]
    ids, logits = transfer_topk(
        vector["target_ids"],
        vector["source_ids"],
        vector["source_topk_ids"],
        vector["source_topk_logits"],
        target_vocab=golden["vocab"]["target_vocab"],
        source_vocab=golden["vocab"]["source_vocab"],
        mode=mode,
    )
    assert ids == vector[mode]["ids"]
    assert logits == vector[mode]["logits"]


@pytest.mark.parametrize("index", [0, 1])
def test_min_ce_rewards_and_choices_match_golden(golden, index):
    vector = golden["min_ce"][index]
    assert ce_rewards(vector["ce"], precision="bf16").tolist() == vector["bf16_reward"]
    assert min_ce_choice(vector["ce"]) == vector["chosen_reference"]
    assert min_ce_choice(vector["ce"], precision="fp64") == vector["chosen_fp64"]


@pytest.mark.parametrize(
    ("precision", "key"), [("fp32", "ce_fp64"), ("bf16", "ce_with_bf16_target")]
)
def test_sparse_fusion_ce_matches_golden(golden, precision, key):
    vector = golden["fusion_ce"]
    student = torch.tensor(vector["student_logits"], dtype=torch.float64)[None, None]
    ids = torch.tensor(vector["teacher_topk_idx"])[None, None]
    logits = torch.tensor(vector["teacher_topk_logits"], dtype=torch.float64)[None, None]
    loss = sparse_fusion_loss(student, ids, logits, torch.ones(1, 1), teacher_precision=precision)
    assert loss.item() == pytest.approx(vector[key], rel=1e-12)


def test_golden_dense_teacher_is_the_renormalised_top_k(golden):
    vector = golden["fusion_ce"]
    probs = torch.softmax(torch.tensor(vector["teacher_topk_logits"], dtype=torch.float64), -1)
    dense = torch.zeros(len(vector["student_logits"]), dtype=torch.float64)
    dense[vector["teacher_topk_idx"]] = probs
    assert dense.tolist() == pytest.approx(vector["teacher_dense_fp64"], abs=1e-15)
    assert probs.to(torch.bfloat16).tolist() == vector["teacher_topk_probs_bf16"]
