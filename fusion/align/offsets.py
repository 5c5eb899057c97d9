"""Alignment by character offsets: exact by construction and O(n + m).

Position ``t`` of a causal LM predicts the token that starts right after it. A target position
and a source position stand for the same prediction exactly when their *next* tokens start at
the same character of the text, so they are paired on that offset. Positions whose next token
starts inside the same character as another's (byte-fallback pieces of one character) keep
only the first of them. The last position of each side predicts what follows the span, and
the two are paired with each other.

Tokenizers disagree on whether a word's leading space belongs to its span (byte-level BPE
offsets usually include it, a Metaspace pre-tokenizer's exclude it), so every start is moved
forward past whitespace before comparing: a position is paired by the next *non-space*
character it has to predict.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusion.align.alignment import Alignment, invert

_END = -1  # stands for "after the last token" in the next-start keys


def _next_starts(name: str, offsets: Sequence[Sequence[int]], text: str) -> list[int]:
    """For each position, where the following token's first non-space character lies."""
    if len(offsets) == 0:
        raise ValueError(f"{name} is empty: an alignment needs at least one token on each side")
    starts = []
    for position, span in enumerate(offsets):
        if len(span) != 2 or not 0 <= span[0] <= span[1] <= len(text):
            raise ValueError(
                f"{name}[{position}] = {tuple(span)} is not a (start, end) span of the "
                f"{len(text)}-character text"
            )
        if starts and span[0] < starts[-1]:
            raise ValueError(
                f"{name}[{position}] starts at {span[0]}, before the previous token "
                f"({starts[-1]}): offsets must follow the text in order"
            )
        starts.append(int(span[0]))
    return [_skip_spaces(text, start) for start in starts[1:]] + [_END]


def _skip_spaces(text: str, start: int) -> int:
    while start < len(text) and text[start].isspace():
        start += 1
    return start


def offset_align(
    source_offsets: Sequence[Sequence[int]],
    target_offsets: Sequence[Sequence[int]],
    text: str,
) -> Alignment:
    """Pair target and source positions whose next tokens start at the same character.

    Offsets are the tokenizers' ``(start, end)`` character spans over the same ``text`` (HF
    ``return_offsets_mapping=True``). Unpaired target positions get ``[]``.
    """
    first_source_at: dict[int, int] = {}
    for j, start in enumerate(_next_starts("source_offsets", source_offsets, text)):
        first_source_at.setdefault(start, j)
    seen: set[int] = set()
    target_to_source: list[list[int]] = []
    for start in _next_starts("target_offsets", target_offsets, text):
        j = first_source_at.get(start) if start not in seen else None
        seen.add(start)
        target_to_source.append([] if j is None else [j])
    unpaired = sum(1 for matched in target_to_source if not matched)
    return Alignment(
        cost=float(unpaired),
        target_to_source=target_to_source,
        source_to_target=invert(target_to_source, len(source_offsets)),
    )
