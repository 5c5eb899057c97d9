"""Vocabulary maps from source token strings to target token strings (reference §2).

MinED: a source token maps to itself when the target vocabulary has it (after translating the
whitespace marker), else to the target token at the smallest edit distance, ties going to the
first target token in id order. The nearest-token search is batched through rapidfuzz's
multi-threaded ``cdist`` with a rising distance cut-off: most tokens have a neighbour within
two edits, so few rows ever pay for an unbounded comparison, and under a cut-off each batch
is compared only with the target tokens of a length that could be that close.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from fusion.align.markers import translate_marker

_CUTOFFS = (2, 4, 8, None)
_ROWS_PER_CHUNK = 512


def vocab_index(vocab: Sequence[str], name: str = "vocab") -> dict[str, int]:
    """Map each token string of a vocabulary (listed in id order) to its id.

    Raises ValueError for an empty vocabulary, a non-string entry or a repeated string, since
    either makes "the target token with this spelling" ambiguous.
    """
    if isinstance(vocab, str) or len(vocab) == 0:
        raise ValueError(f"{name} must be a non-empty list of token strings in id order")
    index: dict[str, int] = {}
    for token_id, token in enumerate(vocab):
        if not isinstance(token, str):
            raise ValueError(f"{name}[{token_id}] is {type(token).__name__}, not a token string")
        if index.setdefault(token, token_id) != token_id:
            raise ValueError(f"{name} lists {token!r} twice (ids {index[token]} and {token_id})")
    return index


def exact_vocab_map(
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
    *,
    source_marker: str = "Ġ",
    target_marker: str = "▁",
) -> dict[str, str]:
    """Exact-match map: only the marker-translated source tokens the target spells the same."""
    target_index = vocab_index(target_vocab, "target_vocab")
    vocab_index(source_vocab, "source_vocab")
    mapping: dict[str, str] = {}
    for token in source_vocab:
        translated = translate_marker(token, source_marker, target_marker)
        if translated in target_index:
            mapping[translated] = translated
    return mapping


def nearest_tokens(
    queries: Sequence[str], choices: Sequence[str], *, workers: int = -1
) -> np.ndarray:
    """Index of the choice nearest to each query by edit distance (first index on ties).

    Under a cut-off c only choices whose length is within c of a query's can be within c
    edits of it, so each batch of queries (sorted by length) is compared with that window of
    choices alone, still in id order, which keeps ties on the first index.
    """
    result = np.full(len(queries), -1, dtype=np.int64)
    choices = list(choices)
    choice_lengths = np.fromiter(map(len, choices), dtype=np.int64, count=len(choices))
    query_lengths = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))
    pending = np.argsort(query_lengths, kind="stable")
    for cutoff in _CUTOFFS:
        unresolved = []
        for start in range(0, len(pending), _ROWS_PER_CHUNK):
            rows = pending[start : start + _ROWS_PER_CHUNK]
            if cutoff is None:
                window = np.arange(len(choices))
            else:
                lengths = query_lengths[rows]
                low, high = lengths.min() - cutoff, lengths.max() + cutoff
                window = np.flatnonzero((choice_lengths >= low) & (choice_lengths <= high))
                if len(window) == 0:
                    unresolved.append(rows)
                    continue
            distances = process.cdist(
                [queries[r] for r in rows],
                [choices[c] for c in window],
                scorer=Levenshtein.distance,
                score_cutoff=cutoff,
                dtype=np.int32,
                workers=workers,
            )
            best = distances.argmin(axis=1)
            # Distances above the cut-off come back as cutoff + 1: only a row whose minimum is
            # within the cut-off is known to be exact.
            exact = (
                np.ones(len(rows), dtype=bool)
                if cutoff is None
                else distances[np.arange(len(rows)), best] <= cutoff
            )
            result[rows[exact]] = window[best[exact]]
            unresolved.append(rows[~exact])
        pending = np.concatenate(unresolved) if unresolved else pending[:0]
        if len(pending) == 0:
            break
    return result


def mined_vocab_map(
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
    *,
    source_marker: str = "Ġ",
    target_marker: str = "▁",
    workers: int = -1,
) -> dict[str, str]:
    """MinED map keyed by marker-translated source token, valued by target token string.

    Vocabularies are token strings in id order. ``workers`` is the thread count for the
    nearest-token search (-1: all cores).
    """
    mapping = exact_vocab_map(
        source_vocab, target_vocab, source_marker=source_marker, target_marker=target_marker
    )
    unmatched = list(
        dict.fromkeys(
            t
            for t in (translate_marker(s, source_marker, target_marker) for s in source_vocab)
            if t not in mapping
        )
    )
    if unmatched:
        nearest = nearest_tokens(unmatched, target_vocab, workers=workers)
        mapping.update(zip(unmatched, (target_vocab[i] for i in nearest), strict=True))
    return mapping
