"""Hypothesis strategies for token strings: empty strings, unicode, bare markers and ties."""

from __future__ import annotations

import os

from hypothesis import strategies as st


def examples(count: int) -> int:
    """A test's example count: as given, or ten times as many under HYPOTHESIS_PROFILE=thorough."""
    return count * 10 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else count


ALPHABET = "abAB01 éß中\nĠ▁<>"
token = st.one_of(
    st.text(alphabet=ALPHABET, min_size=0, max_size=5),
    st.sampled_from(["Ġ", "▁", "", "ĠĠ", "▁▁", "Ċ", "<0x0A>"]),
)
tokens = st.lists(token, min_size=1, max_size=14)
markers = st.sampled_from([("Ġ", "▁"), ("▁", "▁"), ("Ġ", "Ġ"), ("", "▁"), ("Ġ", "")])


def vocab(min_size: int = 1, max_size: int = 30, max_len: int = 6):
    """A vocabulary: distinct token strings in id order."""
    return st.lists(
        st.text(alphabet=ALPHABET, min_size=0, max_size=max_len),
        min_size=min_size,
        max_size=max_size,
        unique=True,
    )
