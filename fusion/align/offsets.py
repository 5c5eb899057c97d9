"""Alignment by character offsets: exact by construction and O(n + m).

The rule, in one sentence: target position ``i`` (which predicts token ``i+1``) pairs with
source position ``j`` when tokens ``i+1`` and ``j+1`` *begin* at the same character of the
text and are the same-numbered of the tokens that begin there, where a token begins at the
first non-whitespace character of its span, or at its first character when it is whitespace
only; the last positions, which both predict what follows the text, pair with each other.

Why each part: a causal LM's position predicts the token that follows it, so two positions
stand for the same prediction when their next tokens start at the same place. Tokenizers
disagree on whether a word's leading space belongs to its span (``Ġmy`` and some ``▁my``
spans include it, other Metaspace spans do not), hence the first non-whitespace character;
a whitespace-only token (a newline, an indentation run) begins where it is, so it keeps a
position of its own. Several tokens can begin at one character (the byte pieces of one
multi-byte character, zero-width pieces); they pair in order, so identical tokenizations pair
every position with itself. A position whose next token begins where no source token begins
stays unpaired: there the source makes no prediction of the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

from fusion.align.alignment import Alignment, invert

_END = -1  # stands for "after the last token" in the keys


def token_begins(name: str, offsets: Sequence[Sequence[int]], text: str) -> list[int]:
    """Where each token begins: the first non-whitespace character of its span, or its start
    when the span is whitespace only (or empty)."""
    if len(offsets) == 0:
        raise ValueError(f"{name} is empty: an alignment needs at least one token on each side")
    begins, previous = [], 0
    for position, span in enumerate(offsets):
        if len(span) != 2 or not 0 <= span[0] <= span[1] <= len(text):
            raise ValueError(
                f"{name}[{position}] = {tuple(span)} is not a (start, end) span of the "
                f"{len(text)}-character text"
            )
        start, end = int(span[0]), int(span[1])
        if start < previous:
            raise ValueError(
                f"{name}[{position}] starts at {start}, before the previous token "
                f"({previous}): offsets must follow the text in order"
            )
        previous = start
        first = start
        while first < end and text[first].isspace():
            first += 1
        begins.append(first if first < end else start)
    return begins


def _next_keys(name: str, offsets: Sequence[Sequence[int]], text: str) -> list[tuple[int, int]]:
    """Per position, (where the next token begins, its number among tokens beginning there)."""
    seen: dict[int, int] = {}
    keys = []
    for begin in [*token_begins(name, offsets, text)[1:], _END]:
        keys.append((begin, seen.get(begin, 0)))
        seen[begin] = seen.get(begin, 0) + 1
    return keys


def offset_align(
    source_offsets: Sequence[Sequence[int]],
    target_offsets: Sequence[Sequence[int]],
    text: str,
) -> Alignment:
    """Pair target and source positions whose next tokens begin at the same character.

    Offsets are the tokenizers' ``(start, end)`` character spans over the same ``text`` (HF
    ``return_offsets_mapping=True``). Unpaired target positions get ``[]``; ``cost`` counts them.
    """
    source_at = {key: j for j, key in enumerate(_next_keys("source_offsets", source_offsets, text))}
    target_to_source = [
        [source_at[key]] if key in source_at else []
        for key in _next_keys("target_offsets", target_offsets, text)
    ]
    unpaired = sum(1 for matched in target_to_source if not matched)
    return Alignment(
        cost=float(unpaired),
        target_to_source=target_to_source,
        source_to_target=invert(target_to_source, len(source_offsets)),
    )
