"""Whitespace markers: how a tokenizer spells a space inside its token strings.

Byte-level BPE (GPT-2 family) writes a space as ``Ġ``; SentencePiece-style tokenizers write
``▁``; WordPiece-style tokenizers drop it (marker ``""``). The marker is read from what the
tokenizer actually produces, never guessed from its class name.
"""

from __future__ import annotations

from typing import Protocol

BYTE_LEVEL = "Ġ"
SENTENCEPIECE = "▁"
NO_MARKER = ""


class _Tokenizes(Protocol):
    def tokenize(self, text: str) -> list[str]: ...


def translate_marker(token: str, source_marker: str, target_marker: str) -> str:
    """Spell a source token with the target's whitespace marker (reference §2, step 1)."""
    if not source_marker or source_marker == target_marker:
        return token
    return token.replace(source_marker, target_marker)


def strip_marker(token: str, marker: str) -> str:
    """Delete every occurrence of ``marker`` (the DTW cost compares tokens without markers)."""
    return token.replace(marker, "") if marker else token


def detect_marker(tokenizer: _Tokenizes) -> str:
    """Return the string a tokenizer uses for a space between two words (``Ġ``, ``▁`` or ``""``).

    Tokenizes ``"a b"`` and reads what stands between the two letters in the joined token
    strings, so it works for any tokenizer that exposes ``tokenize``.
    """
    joined = "".join(tokenizer.tokenize("a b"))
    first, last = joined.find("a"), joined.rfind("b")
    if first < 0 or last <= first:
        raise ValueError(
            f"cannot detect the whitespace marker of {type(tokenizer).__name__}: "
            f"'a b' tokenizes to {joined!r}; pass the marker explicitly"
        )
    return joined[first + 1 : last]
