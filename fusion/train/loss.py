"""The training objective ``λ·L_CLM + (1−λ)·L_fusion`` without dense teacher tensors (§7).

The fusion cross-entropy ``−Σ_t Σ_k q_tk · log_softmax(z_t)[id_tk]`` only needs the student's
log-normaliser per position and its logits at the k teacher ids, so it is computed as a gather
over k ids. The log-normaliser is a chunked custom autograd function that keeps no float32
copy of the logits: memory beyond the logits (and their gradient) is O(B·L·k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TeacherPrecision = Literal["fp32", "bf16"]
KdTail = Literal["renormalise", "bucket"]
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the log-normaliser (64 MiB in float32)


def _chunked_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis, rows flattened, a chunk of rows at a time."""
    rows = logits.reshape(-1, logits.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    acc = accumulation_dtype(logits)
    out = torch.empty(rows.shape[0], dtype=acc, device=logits.device)
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = torch.logsumexp(rows[start : start + step].to(acc), -1)
    return out


class _LogSumExp(torch.autograd.Function):
    """``logsumexp(z, -1)`` in float32 (or wider), chunked over rows; softmax is recomputed in
    backward instead of being stored."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        out = _chunked_logsumexp(logits)
        ctx.save_for_backward(logits, out)
        return out.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        logits, lse = ctx.saved_tensors
        rows = logits.reshape(-1, logits.shape[-1])
        grad_rows = grad.reshape(-1)
        out = torch.empty_like(rows)
        step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            chunk = slice(start, start + step)
            softmax = torch.exp(rows[chunk].to(lse.dtype) - lse[chunk, None])
            out[chunk] = (softmax * grad_rows[chunk, None]).to(out.dtype)
        return out.reshape(logits.shape)


def accumulation_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision logits, else the logits' own (wider) dtype."""
    return torch.promote_types(logits.dtype, torch.float32)


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the vocabulary in :func:`accumulation_dtype`, shape ``[..., ]``."""
    return _LogSumExp.apply(logits)


def _check_teacher(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, L, V], got {tuple(student_logits.shape)}")
    batch, length, vocab = student_logits.shape
    if topk_ids.dim() != 3 or topk_ids.shape[:2] != (batch, length):
        raise ValueError(
            f"topk_ids has shape {tuple(topk_ids.shape)}; expected [{batch}, {length}, k]"
        )
    if topk_logits.shape != topk_ids.shape:
        raise ValueError(
            f"topk_logits has shape {tuple(topk_logits.shape)} but topk_ids "
            f"{tuple(topk_ids.shape)}: they must match"
        )
    if mask.shape != (batch, length):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [{batch}, {length}]")
    if torch.isnan(topk_logits).any() or (topk_logits == float("inf")).any():
        raise ValueError("topk_logits holds NaN or +inf: the teacher data is corrupt")
    present = topk_logits > float("-inf")
    if ((topk_ids >= vocab) | ((topk_ids < 0) & present)).any():
        raise ValueError(
            f"topk_ids holds an id outside the student's vocabulary [0, {vocab}) at a kept "
            "entry: the teacher data was built for another tokenizer"
        )


def _teacher_probs(
    topk_logits: torch.Tensor,
    acc: torch.dtype,
    teacher_precision: TeacherPrecision,
    tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities at the top-k ids (0 where absent) and whether a position has
    any: renormalised, or scaled to ``1 - tail`` when the tail is kept as a bucket."""
    present = topk_logits > float("-inf")
    has_teacher = present.any(-1)
    teacher = torch.softmax(topk_logits.to(acc).masked_fill(~has_teacher[..., None], 0.0), -1)
    teacher = teacher.masked_fill(~present, 0.0)
    if tail is not None:
        teacher = teacher * (1 - tail.to(acc).clamp(0, 1))[..., None]
    if teacher_precision == "bf16":
        teacher = teacher.to(torch.bfloat16).to(acc)
    return teacher, has_teacher


_BUCKET_FLOOR = 1e-6  # the student's mass outside the teacher's ids is never taken below this


def _log_outside(
    topk_logit: torch.Tensor, present: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log(1 - S)`` (floored at ``_BUCKET_FLOOR``), ``S`` and where the floor is not
    reached: ``S`` is the student's probability on the teacher's ids."""
    log_inside = torch.logsumexp(topk_logit.masked_fill(~present, float("-inf")), -1) - lse
    outside = -torch.expm1(log_inside)
    active = outside > _BUCKET_FLOOR
    return torch.log(torch.clamp(outside, min=_BUCKET_FLOOR)), torch.exp(log_inside), active


def sparse_fusion_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_precision: TeacherPrecision = "fp32",
    lse: torch.Tensor | None = None,
    check_inputs: bool = True,
    tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked mean over positions of ``CE(softmax(teacher top-k), softmax(student))``.

    Teacher and student position ``t`` both predict token ``t+1`` (no shift). Entries with
    logit ``-inf`` are absent; positions with no entry at all are left out of the mean.
    ``teacher_precision="bf16"`` rounds the teacher probabilities to bf16 as the reference's
    dense target does. ``lse`` may pass in :func:`log_normaliser` of the student logits.
    ``check_inputs`` validates shapes, ids and NaN (one device sync). ``tail`` ``[B, L]`` (the
    teacher's mass outside its top-k) keeps that mass as one bucket: the teacher's top-k
    probabilities are scaled to ``1 - tail`` and ``tail`` teaches the student's mass on every
    other id, ``-tail·log(1 - Σ_k p_student)`` (``train.kd_tail: bucket``).
    """
    if check_inputs:
        _check_teacher(student_logits, topk_ids, topk_logits, mask)
    acc = accumulation_dtype(student_logits)
    teacher, has_teacher = _teacher_probs(topk_logits, acc, teacher_precision, tail)
    if lse is None:
        lse = log_normaliser(student_logits)
    picked = student_logits.gather(-1, topk_ids.long().clamp_min(0)).to(acc)
    per_position = -(teacher * (picked - lse[..., None])).sum(-1)
    if tail is not None:
        log_outside, _, _ = _log_outside(picked, topk_logits > float("-inf"), lse)
        per_position = per_position - tail.to(acc).clamp(0, 1) * log_outside
    weight = mask.to(acc) * has_teacher.to(acc)
    return (per_position * weight).sum() / weight.sum().clamp_min(1.0)


def clm_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ordinary next-token cross-entropy (position t predicts ``input_ids[t+1]``), masked mean."""
    if lse is None:
        lse = log_normaliser(student_logits)
    labels = input_ids[:, 1:].long()
    picked = student_logits[:, :-1].gather(-1, labels[..., None]).squeeze(-1).to(lse.dtype)
    weight = (
        torch.ones_like(picked) if attention_mask is None else attention_mask[:, 1:].to(lse.dtype)
    )
    return ((lse[:, :-1] - picked) * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass(frozen=True)
class LossParts:
    """The combined loss and its two pieces (for logging)."""

    total: torch.Tensor
    clm: torch.Tensor
    fusion: torch.Tensor


class _FusedObjective(torch.autograd.Function):
    """λ·Σ_t a_t·(lse_t − z_t[label_t]) + (1−λ)·Σ_t b_t·(lse_t·Σq_t − Σ_k q_tk·z_t[id_tk]
    − w_t·log(1 − S_t)).

    ``a``/``b`` are the masks of the two pieces divided by their counts (masked means); ``w``
    the bucket weight (the teacher's tail, 0 when it is renormalised away) and ``S`` the
    student's probability on the teacher's ids. Forward keeps only per-position values;
    backward writes the logits' gradient chunk by chunk, ``(λa + (1−λ)b·(Σq − wS/(1−S)))·
    softmax(z) − λa·onehot(label) − (1−λ)b·(q − w·p/(1−S)) at the k ids``, so no tensor of the
    logits' size exists besides the logits and their gradient. Returns the total and, for
    logging, the two unweighted means.
    """

    @staticmethod
    def forward(
        ctx, logits, labels, clm_norm, topk_ids, teacher, present, bucket, fusion_norm, lam
    ):
        rows = logits.reshape(-1, logits.shape[-1])
        lse = _chunked_logsumexp(logits)
        label_logit = rows.gather(-1, labels.reshape(-1, 1)).squeeze(-1).to(lse.dtype)
        topk_logit = rows.gather(-1, topk_ids.reshape(rows.shape[0], -1)).to(lse.dtype)
        q = teacher.reshape(rows.shape[0], -1)
        present = present.reshape(rows.shape[0], -1)
        a, b, w = clm_norm.reshape(-1), fusion_norm.reshape(-1), bucket.reshape(-1).to(lse.dtype)
        log_outside, inside, active = _log_outside(topk_logit, present, lse)
        clm = (a * (lse - label_logit)).sum()
        fusion = (b * (lse * q.sum(-1) - (q * topk_logit).sum(-1) - w * log_outside)).sum()
        # d/dz of −w·log(1 − S): w/(1 − S)·(p at the teacher's ids − S·softmax(z)); none
        # where 1 − S is held at its floor (as the clamp's own derivative says)
        outside = torch.exp(log_outside)
        w = w * active
        p_ids = torch.exp(topk_logit - lse[:, None]).masked_fill(~present, 0.0)
        q_bucket = q - (w / outside)[:, None] * p_ids
        mass = q.sum(-1) - w * inside / outside
        ctx.save_for_backward(logits, lse, labels, a, topk_ids, q_bucket, mass, b)
        ctx.lam = lam
        ctx.mark_non_differentiable(clm, fusion)
        return lam * clm + (1 - lam) * fusion, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        logits, lse, labels, a, topk_ids, q, mass, b = ctx.saved_tensors
        a, b = ctx.lam * a, (1 - ctx.lam) * b
        rows = logits.reshape(-1, logits.shape[-1])
        ids, labels = topk_ids.reshape(rows.shape[0], -1), labels.reshape(-1)
        out = torch.empty_like(rows)
        step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
        a, b = a * grad_total, b * grad_total
        in_place = out.dtype == lse.dtype  # write straight into the gradient, no temporaries
        for start in range(0, rows.shape[0], step):
            chunk = slice(start, start + step)
            grad = out[chunk] if in_place else torch.empty_like(rows[chunk], dtype=lse.dtype)
            torch.sub(rows[chunk].to(lse.dtype), lse[chunk, None], out=grad)
            grad.exp_().mul_((a[chunk] + b[chunk] * mass[chunk])[:, None])
            grad.scatter_add_(1, labels[chunk, None], -a[chunk, None])
            grad.scatter_add_(1, ids[chunk], -(b[chunk, None] * q[chunk]))
            if not in_place:
                out[chunk] = grad.to(out.dtype)
        return out.reshape(logits.shape), None, None, None, None, None, None, None, None


def fusion_objective(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_mask: torch.Tensor,
    *,
    lam: float = 0.9,
    teacher_precision: TeacherPrecision = "fp32",
    check_inputs: bool = True,
    tail: torch.Tensor | None = None,
) -> LossParts:
    """``λ·L_CLM + (1−λ)·L_fusion`` as one fused pass over the logits.

    Equal to ``λ·clm_loss(...) + (1−λ)·sparse_fusion_loss(...)`` (masked means over their
    own positions; ``tail`` as there), but the backward builds the logits' gradient directly:
    the step costs about what the CLM loss alone costs, in time and in memory.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (λ) must lie in [0, 1], got {lam}")
    fusion_mask = teacher_mask * attention_mask
    if check_inputs:
        _check_teacher(student_logits, topk_ids, topk_logits, fusion_mask)
    acc = accumulation_dtype(student_logits)
    teacher, has_teacher = _teacher_probs(topk_logits, acc, teacher_precision, tail)
    bucket = torch.zeros_like(teacher[..., 0]) if tail is None else tail.to(acc).clamp(0, 1)
    labels = torch.nn.functional.pad(input_ids[:, 1:].long(), (0, 1))  # last position: none
    clm_mask = torch.nn.functional.pad(attention_mask[:, 1:].to(acc), (0, 1))
    fusion_mask = fusion_mask.to(acc) * has_teacher.to(acc)
    total, clm, fusion = _FusedObjective.apply(
        student_logits,
        labels,
        clm_mask / clm_mask.sum().clamp_min(1.0),
        topk_ids.long().clamp_min(0),
        teacher,
        topk_logits > float("-inf"),
        bucket,
        fusion_mask / fusion_mask.sum().clamp_min(1.0),
        lam,
    )
    return LossParts(total=total, clm=clm, fusion=fusion)
