"""Straightforward pure-Python versions of the reference semantics (reference §2–§4).

They are written for obviousness, not speed: the fast paths are tested against them, and the
benchmarks time them to show what the fast paths save. Nothing in the pipeline calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusion.align.alignment import Alignment, invert
from fusion.align.markers import strip_marker, translate_marker

_INF = float("inf")


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs over code points (two-row dynamic programme)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def dtw_align_slow(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    *,
    source_marker: str = "Ġ",
    target_marker: str = "▁",
    tie_break: str = "fusellm",
) -> Alignment:
    """DTW over token strings with the reference's cost, recursion, traceback and tie order."""
    src = [strip_marker(t, source_marker) for t in source_tokens]
    tgt = [strip_marker(t, target_marker) for t in target_tokens]
    n, m = len(src), len(tgt)
    total = [[_INF] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            cost = levenshtein(src[i], tgt[j])
            if i == 0 and j == 0:
                total[i][j] = cost
                continue
            up = total[i - 1][j] if i > 0 else _INF
            left = total[i][j - 1] if j > 0 else _INF
            diag = total[i - 1][j - 1] if i > 0 and j > 0 else _INF
            total[i][j] = cost + min(up, left, diag)

    order = ("diag", "up", "left") if tie_break == "fusellm" else ("diag", "left", "up")
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        options = {
            "diag": total[i - 1][j - 1] if i > 0 and j > 0 else _INF,
            "up": total[i - 1][j] if i > 0 else _INF,
            "left": total[i][j - 1] if j > 0 else _INF,
        }
        move = min(order, key=lambda name: options[name])  # first minimum in tie order
        if move == "diag":
            i, j = i - 1, j - 1
        elif move == "up":
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    source_to_target: list[list[int]] = [[] for _ in range(n)]
    for si, tj in reversed(path):
        source_to_target[si].append(tj)
    return Alignment(
        cost=float(total[n - 1][m - 1]),
        target_to_source=invert(source_to_target, m),
        source_to_target=source_to_target,
    )


def mined_vocab_map_slow(
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
    *,
    source_marker: str = "Ġ",
    target_marker: str = "▁",
    distance=levenshtein,
) -> dict[str, str]:
    """MinED map: exact match, else the nearest target token (first in id order on ties)."""
    target_set = set(target_vocab)
    mapping: dict[str, str] = {}
    for token in source_vocab:
        translated = translate_marker(token, source_marker, target_marker)
        if translated in target_set:
            mapping[translated] = translated
            continue
        best, best_distance = None, None
        for candidate in target_vocab:
            d = distance(translated, candidate)
            if best_distance is None or d < best_distance:
                best, best_distance = candidate, d
        mapping[translated] = best
    return mapping


def transfer_topk_slow(
    target_ids: Sequence[int],
    source_ids: Sequence[int],
    source_topk_ids: Sequence[Sequence[int]],
    source_topk_logits: Sequence[Sequence[float]],
    *,
    target_vocab: Sequence[str],
    source_vocab: Sequence[str],
    alignment: Alignment,
    mapping: dict[str, str] | None = None,
    mode: str = "soft",
    source_marker: str = "Ġ",
    target_marker: str = "▁",
    fallback: str = "current",
    check_tokens: bool = True,
) -> tuple[list[list[int]], list[list[float]]]:
    """Per target position, the source top-k in target ids, or a one-hot (reference §4)."""
    mapping = mapping or {}
    target_index = {token: i for i, token in enumerate(target_vocab)}
    ids_out: list[list[int]] = []
    logits_out: list[list[float]] = []
    for i, matched in enumerate(alignment.target_to_source):
        if len(matched) == 1:
            j = matched[0]
            bt = target_vocab[target_ids[i]]
            st = translate_marker(source_vocab[source_ids[j]], source_marker, target_marker)
            if i == 0 and source_marker == "Ġ" and bt.startswith("▁") and not st.startswith("▁"):
                st = "▁" + st
            aligned = not check_tokens or bt == st or (mode == "soft" and mapping.get(st) == bt)
            if aligned:
                ids: list[int] = []
                logits: list[float] = []
                for logit, sid in zip(source_topk_logits[j], source_topk_ids[j], strict=True):
                    t = translate_marker(source_vocab[sid], source_marker, target_marker)
                    mapped = t if mode == "hard" else mapping.get(t)
                    if mapped is None or mapped not in target_index:
                        continue
                    tid = target_index[mapped]
                    if tid not in ids:
                        ids.append(tid)
                        logits.append(float(logit))
                ids_out.append(ids)
                logits_out.append(logits)
                continue
        if fallback == "current":
            ids_out.append([int(target_ids[i])])
            logits_out.append([1.0])
        elif i + 1 < len(target_ids):
            ids_out.append([int(target_ids[i + 1])])
            logits_out.append([1.0])
        else:
            ids_out.append([])
            logits_out.append([])
    return ids_out, logits_out
