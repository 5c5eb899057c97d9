"""Reference-exact DTW alignment of two tokenizations of the same text, compiled.

Same cost (Levenshtein of the marker-free strings), recursion, traceback and tie order as the
reference (§3), but the edit distances are computed once per pair of *distinct* strings with
rapidfuzz and the O(n·m) dynamic programme runs in a numba kernel: milliseconds instead of
seconds for a 2048 × 2048 pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numba
import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from fusion.align.alignment import Alignment, check_tokens, invert
from fusion.align.markers import strip_marker

TieBreak = Literal["fusellm", "fusechat"]


@numba.njit(cache=True, nogil=True)
def _accumulate(pair_cost, source_index, target_index, total):  # pragma: no cover - compiled
    """Fill ``total`` with the DTW recursion; cell cost = pair_cost[source id, target id]."""
    n, m = source_index.shape[0], target_index.shape[0]
    row = pair_cost[source_index[0]]
    total[0, 0] = row[target_index[0]]
    for j in range(1, m):
        total[0, j] = total[0, j - 1] + row[target_index[j]]
    for i in range(1, n):
        row = pair_cost[source_index[i]]
        total[i, 0] = total[i - 1, 0] + row[target_index[0]]
        for j in range(1, m):
            best = total[i - 1, j - 1]
            up = total[i - 1, j]
            left = total[i, j - 1]
            if up < best:
                best = up
            if left < best:
                best = left
            total[i, j] = best + row[target_index[j]]


@numba.njit(cache=True, nogil=True)
def _traceback(total, up_before_left):  # pragma: no cover - compiled
    """Walk back from the last cell; ties prefer diag, then up/left in the given order."""
    n, m = total.shape
    path_source = np.empty(n + m - 1, np.int64)
    path_target = np.empty(n + m - 1, np.int64)
    i, j, k = n - 1, m - 1, 0
    while i > 0 or j > 0:
        path_source[k] = i
        path_target[k] = j
        k += 1
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
            if diag <= up and diag <= left:
                i -= 1
                j -= 1
            elif up_before_left:
                if up <= left:
                    i -= 1
                else:
                    j -= 1
            elif left <= up:
                j -= 1
            else:
                i -= 1
    path_source[k] = 0
    path_target[k] = 0
    return path_source[: k + 1][::-1], path_target[: k + 1][::-1]


def _distinct(strings: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct strings in first-seen order and, per input, the index of its string."""
    index: dict[str, int] = {}
    positions = np.fromiter(
        (index.setdefault(s, len(index)) for s in strings), dtype=np.int64, count=len(strings)
    )
    return list(index), positions


def dtw_align(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    *,
    source_marker: str = "Ġ",
    target_marker: str = "▁",
    tie_break: TieBreak = "fusellm",
) -> Alignment:
    """Align source to target token strings by DTW, exactly as the reference does (§3).

    ``tie_break="fusellm"`` prefers diag, then a source step, then a target step on equal
    costs; ``"fusechat"`` prefers diag, then a target step (FuseChat-2.0's order).
    """
    if tie_break not in ("fusellm", "fusechat"):
        raise ValueError(f"tie_break must be 'fusellm' or 'fusechat', got {tie_break!r}")
    source = [strip_marker(t, source_marker) for t in check_tokens("source_tokens", source_tokens)]
    target = [strip_marker(t, target_marker) for t in check_tokens("target_tokens", target_tokens)]
    source_strings, source_index = _distinct(source)
    target_strings, target_index = _distinct(target)
    pair_cost = process.cdist(
        source_strings, target_strings, scorer=Levenshtein.distance, dtype=np.int32, workers=1
    )
    # The path has at most n + m - 1 cells, each no dearer than the dearest pair.
    bound = (len(source) + len(target)) * max(int(pair_cost.max()), 1)
    total = np.empty((len(source), len(target)), dtype=np.int32 if bound < 2**31 else np.int64)
    _accumulate(pair_cost.astype(total.dtype, copy=False), source_index, target_index, total)
    path_source, path_target = _traceback(total, tie_break == "fusellm")
    source_to_target: list[list[int]] = [[] for _ in source]
    for i, j in zip(path_source.tolist(), path_target.tolist(), strict=True):
        source_to_target[i].append(j)
    return Alignment(
        cost=float(total[-1, -1]),
        target_to_source=invert(source_to_target, len(target)),
        source_to_target=source_to_target,
    )
