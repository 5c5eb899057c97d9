"""What a prepared teacher will teach: coverage, choices, fallbacks and the teacher's own CE.

Counted per written part (kept in its sidecar, so a resumed run adds up the same) and turned
into shares in ``manifest.json``. Every count is over *labelled* positions: those followed by
a target token, i.e. the positions a teacher can predict something for.
"""

from __future__ import annotations

import math

import numpy as np

from fusion.fuse import MIXED, NO_TEACHER, topk_token_ce
from fusion.rows import FUSED, candidate_aligned, next_tokens


def _label_bytes(text: str, offsets: np.ndarray, length: int) -> np.ndarray:
    """UTF-8 bytes of the token each position predicts (0 for an EOS after the text)."""
    sizes = np.zeros(length, dtype=np.int64)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    for t in range(min(length - 1, len(spans) - 1)):
        start, end = spans[t + 1]
        sizes[t] = len(text[start:end].encode("utf-8"))
    return sizes


def teacher_counts(batch: dict[str, np.ndarray], candidates: list[str]) -> dict:
    """Sums over a batch of fused rows (needs ``text``, ``offsets``, ``input_ids``, every
    candidate's columns and ``fused.*``)."""
    counts = {
        "positions": 0,
        "candidates": {c: {"aligned": 0, "label_in_topk": 0, "taught": 0} for c in candidates},
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
        missing = (choice == NO_TEACHER) & labelled
        fused["no_teacher"] += int(missing.sum())
        fused["fallback_over_real"] += int((missing & real_with_label).sum())
        fused["mixed"] += int(((choice == MIXED) & labelled).sum())
        ce = topk_token_ce(
            batch[f"{FUSED}.topk_ids"][row], batch[f"{FUSED}.topk_logits"][row], labels
        )
        taught = labelled & ~missing & np.isfinite(ce)
        fused["label_in_topk"] += int(taught.sum())
        fused["nll_nats"] += float(ce[taught].sum())
        sizes = _label_bytes(str(batch["text"][row]), batch["offsets"][row], len(labels))
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


def diagnostics(counts: dict) -> dict:
    """Shares of labelled positions, and the fused teacher's CE against the next target
    token over the positions it teaches with a distribution holding that token."""
    positions = max(counts.get("positions", 0), 1)
    fused = counts[FUSED]
    taught = max(fused["label_in_topk"], 1)
    return {
        "positions": counts.get("positions", 0),
        "candidates": {
            name: {
                "coverage": round(stats["aligned"] / positions, 4),
                "label_in_topk": round(stats["label_in_topk"] / positions, 4),
                "taught": round(stats["taught"] / positions, 4),
            }
            for name, stats in counts["candidates"].items()
        },
        FUSED: {
            "no_teacher": round(fused["no_teacher"] / positions, 4),
            "fallback_over_real": fused["fallback_over_real"],
            "mixed": round(fused["mixed"] / positions, 4),
            "label_in_topk": round(fused["label_in_topk"] / positions, 4),
            "ce_nats_per_token": round(fused["nll_nats"] / taught, 4),
            "ce_bits_per_byte": round(
                fused["nll_nats"] / math.log(2) / max(fused["label_bytes"], 1), 4
            ),
        },
    }
