"""The sparse fusion loss equals the dense-target computation, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from fusion.testing.toy import tiny_causal_lm
from fusion.train.loss import clm_loss, fusion_objective, log_normaliser, sparse_fusion_loss


def _teacher(batch=2, length=5, vocab=11, k=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack(
        [torch.randperm(vocab, generator=generator)[:k] for _ in range(batch * length)]
    )
    ids = ids.reshape(batch, length, k)
    logits = torch.randn(batch, length, k, generator=generator, dtype=torch.float64)
    logits[0, 1, 2:] = float("-inf")  # a position with only two kept entries
    logits[1, 3, :] = float("-inf")  # a position with no teacher at all
    ids[0, 1, 2:] = -1
    student = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)
    mask = torch.ones(batch, length)
    mask[1, 0] = 0
    return student, ids, logits, mask


def _dense_loss(student, ids, logits, mask):
    """The reference's computation: a dense [B, L, V] target per distribution."""
    dense = torch.zeros_like(student)
    present = logits > float("-inf")
    probs = torch.softmax(logits.masked_fill(~present.any(-1, keepdim=True), 0.0), -1) * present
    dense.scatter_add_(-1, ids.clamp_min(0), probs)
    per_position = -(dense * torch.log_softmax(student, -1)).sum(-1)
    weight = mask * present.any(-1)
    return (per_position * weight).sum() / weight.sum()


def test_sparse_loss_equals_dense_loss_and_gradient():
    student, ids, logits, mask = _teacher()
    sparse_student = student.clone().requires_grad_(True)
    dense_student = student.clone().requires_grad_(True)
    sparse = sparse_fusion_loss(sparse_student, ids, logits, mask)
    dense = _dense_loss(dense_student, ids, logits, mask)
    sparse.backward()
    dense.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-12)
    assert torch.allclose(sparse_student.grad, dense_student.grad, atol=1e-12)


def test_log_normaliser_passes_gradcheck():
    logits = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log_normaliser, (logits,))


def test_bf16_student_logits_give_the_float32_loss():
    student, ids, logits, mask = _teacher()
    half = student.to(torch.bfloat16)
    loss = sparse_fusion_loss(half, ids, logits.float(), mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        _dense_loss(half.double(), ids, logits, mask).item(), rel=1e-5
    )


def test_clm_loss_equals_the_models_own_loss():
    model = tiny_causal_lm("llama", 50, seed=3)
    input_ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    output = model(input_ids, labels=input_ids)
    assert clm_loss(output.logits, input_ids).item() == pytest.approx(output.loss.item(), rel=1e-5)


def test_objective_mixes_clm_and_fusion_with_lambda():
    student, ids, logits, mask = _teacher()
    input_ids = torch.randint(0, student.shape[-1], student.shape[:2])
    parts = fusion_objective(student, input_ids, torch.ones_like(mask), ids, logits, mask, lam=0.9)
    assert parts.total.item() == pytest.approx(0.9 * parts.clm.item() + 0.1 * parts.fusion.item())
    only_clm = fusion_objective(
        student, input_ids, torch.ones_like(mask), ids, logits, mask, lam=1.0
    )
    assert only_clm.total.item() == pytest.approx(parts.clm.item())


def test_lambda_outside_unit_interval_is_rejected():
    student, ids, logits, mask = _teacher()
    with pytest.raises(ValueError, match=r"λ\) must lie in \[0, 1\]"):
        fusion_objective(student, ids[..., 0], mask, ids, logits, mask, lam=1.5)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda s, i, lg, m: (
                s,
                i,
                lg.masked_fill(
                    torch.zeros_like(lg, dtype=torch.bool).index_fill(0, torch.tensor([0]), True),
                    float("nan"),
                ),
                m,
            ),
            "NaN",
        ),
        (lambda s, i, lg, m: (s, i.clamp_max(0) + 99, lg, m), "outside the student's vocabulary"),
        (lambda s, i, lg, m: (s, i[:, :3], lg, m), "topk_ids has shape"),
        (lambda s, i, lg, m: (s, i, lg[..., :2], m), "topk_logits has shape"),
        (lambda s, i, lg, m: (s, i, lg, m[:, :2]), "mask has shape"),
        (lambda s, i, lg, m: (s[0], i, lg, m), r"student_logits must be \[B, L, V\]"),
    ],
)
def test_bad_teacher_data_raises_value_error(corrupt, message):
    with pytest.raises(ValueError, match=message):
        sparse_fusion_loss(*corrupt(*_teacher()))


@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_fused_objective_equals_its_two_pieces_in_value_and_gradient(lam):
    student, ids, logits, mask = _teacher(seed=5)
    input_ids = torch.randint(
        0, student.shape[-1], student.shape[:2], generator=torch.Generator().manual_seed(2)
    )
    attention = torch.ones_like(mask)
    attention[0, -2:] = 0  # padding at the end of the first row
    fused_student = student.clone().requires_grad_(True)
    plain_student = student.clone().requires_grad_(True)
    parts = fusion_objective(fused_student, input_ids, attention, ids, logits, mask, lam=lam)
    clm = clm_loss(plain_student, input_ids, attention)
    fusion = sparse_fusion_loss(plain_student, ids, logits, mask * attention)
    expected = lam * clm + (1 - lam) * fusion
    parts.total.backward()
    expected.backward()
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-12)
    assert parts.clm.item() == pytest.approx(clm.item(), rel=1e-12)
    assert parts.fusion.item() == pytest.approx(fusion.item(), rel=1e-12)
    torch.testing.assert_close(fused_student.grad, plain_student.grad, rtol=0, atol=1e-12)


def test_fused_objective_on_bf16_logits_matches_float32():
    student, ids, logits, mask = _teacher(seed=6)
    input_ids = torch.randint(0, student.shape[-1], student.shape[:2])
    half = student.to(torch.bfloat16).requires_grad_(True)
    wide = half.detach().double().requires_grad_(True)
    fused = fusion_objective(half, input_ids, torch.ones_like(mask), ids, logits.float(), mask)
    reference = fusion_objective(wide, input_ids, torch.ones_like(mask), ids, logits, mask)
    fused.total.backward()
    reference.total.backward()
    assert fused.total.item() == pytest.approx(reference.total.item(), rel=1e-5)
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.double(), wide.grad, rtol=2e-2, atol=1e-3)


def _dense_bucket_loss(student, ids, logits, tail, mask):
    """kd_tail 'bucket' in dense form: the teacher's top-k scaled to 1 - tail on its ids and
    the tail on the student's probability of every other id."""
    present = logits > float("-inf")
    probs = torch.softmax(logits.masked_fill(~present.any(-1, keepdim=True), 0.0), -1) * present
    dense = torch.zeros_like(student).scatter_add_(-1, ids.clamp_min(0), probs)
    log_p = torch.log_softmax(student, -1)
    on_ids = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, ids.clamp_min(0), present)
    outside = torch.log1p(-(log_p.exp() * on_ids).sum(-1))
    per_position = -((1 - tail) * (dense * log_p).sum(-1) + tail * outside)
    weight = mask * present.any(-1)
    return (per_position * weight).sum() / weight.sum()


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_bucket_tail_equals_the_dense_bucket_loss_in_value_and_gradient(lam):
    student, ids, logits, mask = _teacher(seed=7)
    tail = torch.rand(student.shape[:2], generator=torch.Generator().manual_seed(8)) * 0.6
    tail[0, 0] = 0.0  # a teacher that holds everything: the bucket teaches nothing
    input_ids = torch.randint(
        0, student.shape[-1], student.shape[:2], generator=torch.Generator().manual_seed(9)
    )
    attention = torch.ones_like(mask)
    fused_student = student.clone().requires_grad_(True)
    dense_student = student.clone().requires_grad_(True)
    sparse = sparse_fusion_loss(student, ids, logits, mask, tail=tail.double())
    parts = fusion_objective(
        fused_student, input_ids, attention, ids, logits, mask, lam=lam, tail=tail.double()
    )
    dense = _dense_bucket_loss(dense_student, ids, logits, tail.double(), mask)
    expected = lam * clm_loss(dense_student, input_ids, attention) + (1 - lam) * dense
    parts.total.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-10)
    assert parts.fusion.item() == pytest.approx(dense.item(), rel=1e-10)
    expected.backward()
    torch.testing.assert_close(fused_student.grad, dense_student.grad, rtol=0, atol=1e-10)
    renormalised = sparse_fusion_loss(student, ids, logits, mask)
    assert renormalised.item() != pytest.approx(sparse.item(), rel=1e-3)  # the tail is taught


def test_the_bucket_is_held_at_its_floor_where_the_student_holds_almost_everything():
    """Where the student's mass outside the teacher's ids is below 1e-6, the bucket's term is
    held at log(1e-6), so it pulls no further there (the gradient a clamp at that floor has);
    elsewhere it teaches as the dense bucket loss does."""
    student, ids, logits, mask = _teacher(seed=10)
    on_ids = ids[0, 2].clamp_min(0)
    student[0, 2] = 0.0
    student[0, 2, on_ids] = 30.0  # outside mass ≈ 7·e^-30 ≈ 6e-13: below the floor
    tail = torch.full(student.shape[:2], 0.3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(0, student.shape[-1], student.shape[:2], generator=generator)
    attention = torch.ones_like(mask)

    present = logits > float("-inf")
    probs = torch.softmax(logits.masked_fill(~present.any(-1, keepdim=True), 0.0), -1) * present
    dense_student = student.clone().requires_grad_(True)
    log_p = torch.log_softmax(dense_student, -1)
    teacher = torch.zeros_like(student).scatter_add_(-1, ids.clamp_min(0), probs)
    held = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, ids.clamp_min(0), present)
    outside = torch.log(torch.clamp(1 - (log_p.exp() * held).sum(-1), min=1e-6))
    per_position = -((1 - tail) * (teacher * log_p).sum(-1) + tail * outside)
    weight = mask * present.any(-1)
    expected = 0.5 * clm_loss(dense_student, input_ids, attention)
    expected = expected + 0.5 * (per_position * weight).sum() / weight.sum()
    expected.backward()

    fused_student = student.clone().requires_grad_(True)
    parts = fusion_objective(
        fused_student, input_ids, attention, ids, logits, mask, lam=0.5, tail=tail
    )
    parts.total.backward()
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(fused_student.grad, dense_student.grad, rtol=0, atol=1e-10)
