"""Fusing candidate teacher distributions: MinCE and AvgCE (reference §5).

Candidates are ordered ``[target, source 0, source 1, ...]``; the target's own distribution
is the first candidate when it takes part. ``reference`` mode reproduces the reference's bf16
rewards (which create ties, broken by the first candidate) and its softmax over rewards;
``clean`` mode uses float64 rewards and ``softmax(-ce)``. A ``ce`` of shape ``[C]`` chooses
per sequence; ``[C, L]`` chooses per token. A one-hot fallback is never a candidate: it is
what a position gets when no candidate has a usable distribution there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fusion.align.transfer import PAD_ID

Precision = Literal["bf16", "fp64"]
Mode = Literal["reference", "clean"]
Method = Literal["min_ce", "avg_ce"]
NoTeacher = Literal["one_hot", "mask"]
MIXED = -1  # ``choice`` value of a position fused from several candidates
NO_TEACHER = -2  # ``choice`` value of a position no candidate could teach


def _check_ce(ce: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(ce, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[0] == 0:
        raise ValueError(f"ce must have shape [candidates] or [candidates, L], got {values.shape}")
    if np.isnan(values).any() or (values == -np.inf).any():
        raise ValueError(f"ce holds NaN or -inf: {values.tolist()!r}")
    return values


def ce_rewards(ce: Sequence[float] | np.ndarray, *, precision: Precision = "bf16") -> np.ndarray:
    """Rewards ``1 / exp(ce)``; in ``bf16`` each step is rounded as the reference's tensors are."""
    values = _check_ce(ce)
    if precision == "fp64":
        return np.exp(-values)
    if precision != "bf16":
        raise ValueError(f"precision must be 'bf16' or 'fp64', got {precision!r}")
    import torch  # only here: the fuse stage's workers need no torch in clean mode

    rounded = torch.tensor(values, dtype=torch.float64).to(torch.bfloat16)
    return (1 / torch.exp(rounded)).to(torch.float64).numpy()


def min_ce_choice(ce: Sequence[float], *, precision: Precision = "bf16") -> int:
    """Index of the candidate with the highest reward; the first one on ties."""
    rewards = ce_rewards(ce, precision=precision)
    if rewards.ndim != 1:
        raise ValueError("min_ce_choice takes one CE per candidate; use fuse_topk per token")
    return int(np.argmax(rewards))


def avg_ce_weights(ce: Sequence[float], *, mode: Mode = "reference") -> list[float]:
    """Mixture weights: softmax over bf16 rewards (reference) or over ``-ce`` (clean)."""
    if mode == "reference":
        scores = ce_rewards(ce, precision="bf16")
    elif mode == "clean":
        scores = -_check_ce(ce)
    else:
        raise ValueError(f"mode must be 'reference' or 'clean', got {mode!r}")
    return _softmax(scores, axis=0).tolist()


def tail_mass(values: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """``1 - Σ_k softmax`` per position from top-k logits ``[L, k]`` and log-normalisers
    ``[L]`` (never below 0)."""
    kept = np.exp(values.astype(np.float64) - lse.astype(np.float64)[:, None]).sum(-1)
    return np.clip(1.0 - kept, 0.0, 1.0).astype(np.float32)


def _softmax(scores: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def topk_token_ce(
    ids: np.ndarray, logits: np.ndarray, labels: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Per position, ``-log p(label)`` under the renormalised top-k; inf where it lacks the label.

    ``labels[t]`` is the token that follows position ``t`` (-1 where none does).
    """
    ids, logits, labels = np.asarray(ids), np.asarray(logits, np.float64), np.asarray(labels)
    if ids.shape != logits.shape or ids.ndim != 2 or labels.shape != ids.shape[:1]:
        raise ValueError(
            f"ids {ids.shape}, logits {logits.shape} and labels {labels.shape} must be "
            "[L, k], [L, k] and [L]"
        )
    present = logits > -np.inf
    row_has = present.any(axis=1)
    top = np.where(row_has, logits.max(axis=1, initial=-np.inf), 0.0)
    sums = np.where(present, np.exp(np.where(present, logits, top[:, None]) - top[:, None]), 0.0)
    log_norm = np.log(np.where(row_has, sums.sum(axis=1), 1.0)) + top
    hit = (ids == labels[:, None]) & present & (labels[:, None] >= 0)
    label_logit = np.where(hit, logits, -np.inf).max(axis=1, initial=-np.inf)
    return np.where(hit.any(axis=1), log_norm - label_logit, np.inf)


SMALLEST_TAIL = 2.0**-24  # float16's smallest step: a stored tail of 0 counts as this


def as_stored(values) -> np.ndarray:
    """Values as the data set stores them (float16): what training reads, and what a
    `fusion refuse` of the data set reads back, so both fuse and count alike."""
    return np.asarray(values, dtype=np.float16).astype(np.float64)


def label_nll(
    ids: np.ndarray, logits: np.ndarray, tail: np.ndarray, labels: np.ndarray, vocab_size: int
) -> np.ndarray:
    """Per position, ``-log p(label)`` (nats) of a stored distribution: its top-k renormalised
    and scaled by ``1 - tail`` where the label is kept, else ``tail`` spread evenly over the
    ids the top-k does not hold (NaN where there is no label)."""
    ids, logits = np.asarray(ids), np.asarray(logits, np.float64)
    tail = np.maximum(np.asarray(tail, np.float64), SMALLEST_TAIL)
    present = (ids >= 0) & (logits > -np.inf)
    renormalised = topk_token_ce(ids, logits, labels)  # -log of the top-k's share; inf: absent
    kept = -np.log1p(-np.minimum(tail, 1.0 - SMALLEST_TAIL)) + renormalised
    spread = -np.log(tail / np.maximum(vocab_size - present.sum(axis=1), 1))
    out = np.where(np.isfinite(renormalised), kept, spread)
    return np.where(np.asarray(labels) >= 0, out, np.nan)


def local_ce(nll: np.ndarray, window: int, *, causal: bool) -> np.ndarray:
    """``[C, L]`` CE of each candidate around each position, from its label NLL ``[C, L]``
    (NaN where it has none): the mean over the position's block of ``window`` positions, or
    with ``causal`` over the ``window`` positions before it (the label at the position itself
    unseen). Where a candidate has no NLL there, the mean of the others' (all equal: 0)."""
    nll = np.asarray(nll, np.float64)
    candidates, length = nll.shape
    known = np.isfinite(nll)
    sums = np.concatenate([np.zeros((candidates, 1)), np.cumsum(np.where(known, nll, 0), 1)], 1)
    counts = np.concatenate([np.zeros((candidates, 1)), np.cumsum(known, 1)], 1)
    positions = np.arange(length)
    if causal:
        start, stop = np.maximum(positions - window, 0), positions
    else:
        start = positions // window * window
        stop = np.minimum(start + window, length)
    total = sums[:, stop] - sums[:, start]
    count = counts[:, stop] - counts[:, start]
    with np.errstate(invalid="ignore", divide="ignore"):
        ce = total / count
    seen = count > 0
    others = np.where(seen, ce, 0.0).sum(0) / np.maximum(seen.sum(0), 1)
    return np.where(seen, ce, others[None, :])


@dataclass(frozen=True)
class FusedTopK:
    """The fused teacher: ``ids``/``logits`` ``[L, k]`` and ``choice`` ``[L]`` per position:
    the candidate taken, :data:`MIXED` for an AvgCE mixture, :data:`NO_TEACHER` where no
    candidate had a usable distribution (the position holds the fallback, or nothing);
    ``tail`` the fused teacher's mass outside its top-k (0 for a one-hot or nothing)."""

    ids: np.ndarray
    logits: np.ndarray
    choice: np.ndarray
    tail: np.ndarray  # [L]: the probability mass outside the stored top-k


def fuse_topk(
    ids: np.ndarray,
    logits: np.ndarray,
    ce: Sequence[float] | np.ndarray,
    *,
    method: Method = "min_ce",
    mode: Mode = "reference",
    aligned: np.ndarray | None = None,
    fallback_ids: Sequence[int] | np.ndarray | None = None,
    no_teacher: NoTeacher = "one_hot",
    tails: np.ndarray | None = None,
) -> FusedTopK:
    """Fuse candidates' top-k ``[C, L, k]`` into one ``[L, k]`` teacher.

    ``aligned`` ``[C, L]`` says where a candidate's row is its own distribution (not a
    one-hot fallback); by default every non-empty row is. A candidate competes at a position
    only with a distribution of its own there and, per token (``ce`` ``[C, L]``), only when
    its top-k holds the label (finite CE). Where no candidate does, the position gets
    ``no_teacher``: ``"one_hot"`` on ``fallback_ids`` (-1: nothing) or ``"mask"`` (nothing,
    so it leaves the fusion loss). Reference mode per sequence keeps the reference's rule:
    the chosen candidate's row as stored, its fallbacks included.

    MinCE copies the best candidate's entries. AvgCE mixes the renormalised distributions of
    the competing candidates with :func:`avg_ce_weights` and keeps the k most probable ids,
    as log-probabilities.

    ``tails`` ``[C, L]`` is each candidate's mass outside its top-k (default 0): MinCE takes
    the chosen one's; AvgCE's is what the mixture of the candidates' full distributions (top-k
    scaled by ``1 - tail``) puts outside the ids it keeps. It never changes what is chosen.
    """
    ids, logits = np.asarray(ids), np.asarray(logits, dtype=np.float64)
    if ids.ndim != 3 or ids.shape != logits.shape:
        raise ValueError(f"ids {ids.shape} and logits {logits.shape} must both be [C, L, k]")
    candidates, length, k = ids.shape
    values = _check_ce(ce)
    if values.shape[0] != candidates or (values.ndim == 2 and values.shape[1] != length):
        raise ValueError(
            f"ce has shape {values.shape}; expected [{candidates}] or [{candidates}, {length}]"
        )
    if no_teacher not in ("one_hot", "mask"):
        raise ValueError(f"no_teacher must be 'one_hot' or 'mask', got {no_teacher!r}")
    tails = np.zeros((candidates, length)) if tails is None else np.asarray(tails, np.float64)
    if tails.shape != (candidates, length):
        raise ValueError(f"tails has shape {tails.shape}; expected [{candidates}, {length}]")
    per_token = np.broadcast_to(values.reshape(candidates, -1), (candidates, length))
    present = (ids != PAD_ID).any(axis=2)  # [C, L]
    own = present if aligned is None else np.asarray(aligned, dtype=bool) & present
    if own.shape != (candidates, length):
        raise ValueError(f"aligned has shape {own.shape}; expected [{candidates}, {length}]")
    as_stored = mode == "reference" and values.ndim == 1
    usable = present if as_stored else own & np.isfinite(per_token)
    has_teacher = usable.any(axis=0)
    positions = np.arange(length)
    if method == "min_ce":
        rewards = ce_rewards(per_token, precision="bf16" if mode == "reference" else "fp64")
        choice = np.argmax(np.where(usable, rewards, -1.0), axis=0)
        out_ids, out_logits = ids[choice, positions], logits[choice, positions]
        out_tail = tails[choice, positions]
        marks = choice.astype(np.int8)
        marks[~own[choice, positions]] = NO_TEACHER  # a stored fallback (reference rows)
    elif method == "avg_ce":
        scores = ce_rewards(per_token) if mode == "reference" else -per_token
        top = np.where(usable, scores, -np.inf).max(axis=0, initial=-np.inf)
        weights = np.where(usable, np.exp(np.where(usable, scores, 0.0) - top), 0.0)
        weights /= np.maximum(weights.sum(axis=0, keepdims=True), np.finfo(np.float64).tiny)
        kept = (ids != PAD_ID) & (logits > -np.inf)
        row_kept = kept.any(axis=2, keepdims=True)
        probs = _softmax(np.where(kept, logits, np.where(row_kept, -np.inf, 0.0)), axis=2) * kept
        probs *= weights[:, :, None]
        out_ids, out_logits = _top_k_of_mixture(ids, probs, k)
        kept = _kept_share(ids, probs, out_ids)  # [C, L]: each candidate's mass on kept ids
        out_tail = 1.0 - ((1.0 - tails) * kept).sum(axis=0)
        marks = np.full(length, MIXED, dtype=np.int8)
    else:
        raise ValueError(f"method must be 'min_ce' or 'avg_ce', got {method!r}")
    out_ids, out_logits = out_ids.astype(np.int32), out_logits.astype(np.float64)
    missing = ~has_teacher
    out_ids[missing], out_logits[missing] = PAD_ID, -np.inf
    out_tail = np.clip(np.where(missing, 0.0, out_tail), 0.0, 1.0)
    marks[missing] = NO_TEACHER
    if no_teacher == "one_hot" and fallback_ids is not None:
        labels = np.asarray(fallback_ids, dtype=np.int64)
        one_hot = missing & (labels >= 0)
        out_ids[one_hot, 0], out_logits[one_hot, 0] = labels[one_hot], 1.0
    return FusedTopK(out_ids, out_logits, marks, out_tail)


def _kept_share(ids: np.ndarray, probs: np.ndarray, kept_ids: np.ndarray) -> np.ndarray:
    """``[C, L]``: the weighted, renormalised probability each candidate puts on the ids the
    mixture keeps (``probs`` ``[C, L, k]``, ``kept_ids`` ``[L, k]``)."""
    on_kept = (ids[:, :, :, None] == kept_ids[None, :, None, :]) & (kept_ids >= 0)[None, :, None]
    return (probs * on_kept.any(axis=3)).sum(axis=2)


def _top_k_of_mixture(ids: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum probabilities of equal ids per position and keep the k largest (ties: lower id)."""
    length = ids.shape[1]
    flat_ids = ids.transpose(1, 0, 2).reshape(length, -1)
    flat_probs = probs.transpose(1, 0, 2).reshape(length, -1)
    rows = np.repeat(np.arange(length), flat_ids.shape[1])
    keep = (flat_ids.ravel() != PAD_ID) & (flat_probs.ravel() > 0)
    keys, inverse = np.unique(
        np.stack([rows[keep], flat_ids.ravel()[keep]]), axis=1, return_inverse=True
    )
    summed = np.bincount(inverse.ravel(), weights=flat_probs.ravel()[keep], minlength=keys.shape[1])
    order = np.lexsort((keys[1], -summed, keys[0]))
    key_rows, key_ids, summed = keys[0][order], keys[1][order], summed[order]
    rank = np.arange(len(order)) - np.searchsorted(key_rows, key_rows, side="left")
    take = rank < k
    out_ids = np.full((length, k), PAD_ID, dtype=np.int32)
    out_logits = np.full((length, k), -np.inf, dtype=np.float64)
    out_ids[key_rows[take], rank[take]] = key_ids[take]
    out_logits[key_rows[take], rank[take]] = np.log(summed[take])
    return out_ids, out_logits
