"""What a prepared teacher will teach: coverage, choices, fallbacks and fidelity.

Counted per written part (kept in its sidecar, so a resumed run adds up the same) and turned
into shares in ``manifest.json``. Every count is over *labelled* positions: those followed by
a target token, i.e. the positions a teacher can predict something for.

Fidelity is what a distribution, *as stored* in target ids, says of the next target token:
its bits per byte with the mass outside the stored top-k counted (spread evenly over the
rest of the target vocabulary, never dropped), beside the same model's bits per byte in its
own tokenization of the same text. Bytes are each label token's span, spans taken end to end.
"""

from __future__ import annotations

import math

import numpy as np

from fusion.teacher.fuse import MIXED, NO_TEACHER, as_stored, label_nll, topk_token_ce
from fusion.teacher.rows import FUSED, candidate_aligned, next_tokens


def label_bytes(text: str, offsets: np.ndarray, length: int) -> np.ndarray:
    """UTF-8 bytes of the token each position predicts, spans end to end (a token owns the
    text since the end of the one before it); 0 for an EOS after the text."""
    sizes = np.zeros(length, dtype=np.int64)
    ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    for t in range(min(length - 1, len(ends) - 1)):
        sizes[t] = len(text[ends[t] : ends[t + 1]].encode("utf-8"))
    return sizes


def _distribution_nll(batch: dict, name: str, row: int, labels, vocab_size: int) -> np.ndarray:
    return label_nll(
        batch[f"{name}.topk_ids"][row],
        as_stored(batch[f"{name}.topk_logits"][row]),
        as_stored(batch[f"{name}.tail"][row]),
        labels,
        vocab_size,
    )


def teacher_counts(batch: dict[str, np.ndarray], candidates: list[str], vocab_size: int) -> dict:
    """Sums over a batch of fused rows (needs ``text``, ``offsets``, ``input_ids``, every
    candidate's columns and ``fused.*``); ``vocab_size`` is the target's."""
    counts = {
        "positions": 0,
        "candidates": {
            c: {
                "aligned": 0,
                "label_in_topk": 0,
                "taught": 0,
                "nll_nats": 0.0,
                "label_bytes": 0,
                "own_nll_nats": 0.0,
                "own_bytes": 0,
            }
            for c in candidates
        },
        FUSED: {
            "no_teacher": 0,
            "fallback_over_real": 0,
            "mixed": 0,
            "label_in_topk": 0,
            "nll_nats": 0.0,
            "label_bytes": 0,
        },
    }
    fused = counts[FUSED]
    for row in range(len(batch["id"])):
        labels = next_tokens(batch["input_ids"][row])
        labelled = labels >= 0
        sizes = label_bytes(str(batch["text"][row]), batch["offsets"][row], len(labels))
        counts["positions"] += int(labelled.sum())
        choice = np.asarray(batch[f"{FUSED}.choice"][row])
        real_with_label = np.zeros(len(labels), dtype=bool)
        for index, name in enumerate(candidates):
            aligned = candidate_aligned(batch, name, row) & labelled
            ce = topk_token_ce(
                batch[f"{name}.topk_ids"][row], batch[f"{name}.topk_logits"][row], labels
            )
            holds = aligned & np.isfinite(ce)
            real_with_label |= holds
            stats = counts["candidates"][name]
            stats["aligned"] += int(aligned.sum())
            stats["label_in_topk"] += int(holds.sum())
            stats["taught"] += int(((choice == index) & labelled).sum())
            nll = _distribution_nll(batch, name, row, labels, vocab_size)
            stats["nll_nats"] += float(nll[aligned].sum())
            stats["label_bytes"] += int(sizes[aligned].sum())
            if math.isfinite(own := float(batch[f"{name}.nll"][row])):
                stats["own_nll_nats"] += own
                stats["own_bytes"] += int(batch[f"{name}.nll_bytes"][row])
        missing = (choice == NO_TEACHER) & labelled
        fused["no_teacher"] += int(missing.sum())
        fused["fallback_over_real"] += int((missing & real_with_label).sum())
        fused["mixed"] += int(((choice == MIXED) & labelled).sum())
        taught = labelled & ~missing
        ce = topk_token_ce(
            batch[f"{FUSED}.topk_ids"][row], batch[f"{FUSED}.topk_logits"][row], labels
        )
        fused["label_in_topk"] += int((taught & np.isfinite(ce)).sum())
        fused["nll_nats"] += float(
            _distribution_nll(batch, FUSED, row, labels, vocab_size)[taught].sum()
        )
        fused["label_bytes"] += int(sizes[taught].sum())
    return counts


def add_counts(total: dict, part: dict) -> dict:
    """Add one part's counts into ``total`` (nested dictionaries of numbers)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def _bits_per_byte(nats: float, size: int) -> float | None:
    return round(nats / math.log(2) / size, 4) if size else None


def diagnostics(counts: dict) -> dict:
    """Shares of labelled positions and fidelity: per candidate, its stored distribution's
    bits per byte where it has one, beside its own; for the fused teacher, bits per byte over
    every position it teaches (a one-hot fallback excluded: it is the label itself)."""
    positions = max(counts.get("positions", 0), 1)
    fused = counts[FUSED]
    taught = max(counts.get("positions", 0) - fused["no_teacher"], 1)
    candidates = {}
    for name, stats in counts["candidates"].items():
        stored = _bits_per_byte(stats["nll_nats"], stats["label_bytes"])
        own = _bits_per_byte(stats["own_nll_nats"], stats["own_bytes"])
        candidates[name] = {
            "coverage": round(stats["aligned"] / positions, 4),
            "label_in_topk": round(stats["label_in_topk"] / positions, 4),
            "taught": round(stats["taught"] / positions, 4),
            "bits_per_byte": stored,
            "own_bits_per_byte": own,
            "stored_vs_own": round(stored / own, 4) if stored is not None and own else None,
        }
    return {
        "positions": counts.get("positions", 0),
        "candidates": candidates,
        FUSED: {
            "no_teacher": round(fused["no_teacher"] / positions, 4),
            "fallback_over_real": fused["fallback_over_real"],
            "mixed": round(fused["mixed"] / positions, 4),
            "label_in_topk": round(fused["label_in_topk"] / positions, 4),
            "ce_nats_per_token": round(fused["nll_nats"] / taught, 4),
            "bits_per_byte": _bits_per_byte(fused["nll_nats"], fused["label_bytes"]),
        },
    }
