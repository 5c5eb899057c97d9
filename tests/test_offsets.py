"""Offset alignment pairs positions whose next tokens begin at the same character, and only
those; identical tokenizations pair every position with itself."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fusion.align import offset_align

TEXT = "Hello  world\n\tdef café(x):\n\n    return 2023 😀\n"


def _brute_force(source, target, text):
    """Expected pairs, computed the slow way: compare every target position with every source
    position by the characters their next tokens begin at, counting earlier equal begins."""

    def begin(span):
        piece = text[span[0] : span[1]]
        found = re.search(r"\S", piece)
        return span[0] + found.start() if found else span[0]

    def key(offsets, position):
        if position == len(offsets) - 1:
            return ("end", 0)
        here = begin(offsets[position + 1])
        rank = sum(begin(offsets[p + 1]) == here for p in range(position))
        return (here, rank)

    pairs = []
    for i in range(len(target)):
        matches = [j for j in range(len(source)) if key(source, j) == key(target, i)]
        pairs.append(matches)
    return pairs


def test_identical_tokenizations_with_whitespace_tokens_pair_every_position_with_itself():
    text = "x = 1\ny = 2\n  z = 3"
    offsets = [(m.start(), m.end()) for m in re.finditer(r"\s+|\S+", text)]
    result = offset_align(offsets, offsets, text)
    assert result.target_to_source == [[p] for p in range(len(offsets))]
    assert result.cost == 0.0


def test_toy_tokenizers_pair_exactly_as_the_brute_force_rule(
    byte_level_tokenizer, metaspace_tokenizer
):
    source = byte_level_tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    target = metaspace_tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    s_off, t_off = source["offset_mapping"], target["offset_mapping"]
    result = offset_align(s_off, t_off, TEXT)
    assert result.target_to_source == _brute_force(s_off, t_off, TEXT)
    assert sum(map(bool, result.target_to_source)) > len(t_off) // 2
    for tokenizer in (byte_level_tokenizer, metaspace_tokenizer):
        offsets = tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
        same = offset_align(offsets["offset_mapping"], offsets["offset_mapping"], TEXT)
        assert same.target_to_source == [[p] for p in range(len(offsets["offset_mapping"]))]


def test_leading_space_inside_or_outside_a_span_pairs_the_same():
    text = "Hello my"
    with_space = [(0, 5), (5, 8)]  # byte-level: "Ġmy" spans the space
    without_space = [(0, 5), (6, 8)]  # a Metaspace pre-tokenizer that leaves it out
    assert offset_align(with_space, without_space, text).target_to_source == [[0], [1]]


def test_whitespace_only_tokens_keep_their_own_position():
    text = "a\n  b"
    source = [(0, 1), (1, 2), (2, 4), (4, 5)]  # "a", "Ċ", "ĠĠ", "b"
    target = [(0, 1), (1, 2), (2, 5)]  # "a", "<0x0A>", "▁▁b": indentation merged into the word
    # a→"\n" pairs; "\n"→"  b" begins at b (4), where the source's "b" begins: source position 2.
    assert offset_align(source, target, text).target_to_source == [[0], [2], [3]]


def test_byte_pieces_of_one_character_pair_in_order():
    text = "aé b"
    source = [(0, 1), (1, 2), (2, 4)]  # "a", "é", "Ġb"
    target = [(0, 1), (1, 2), (1, 2), (2, 4)]  # "a", "<0xC3>", "<0xA9>", "▁b"
    result = offset_align(source, target, text)
    assert result.target_to_source == [[0], [], [1], [2]]
    assert offset_align(target, target, text).target_to_source == [[0], [1], [2], [3]]


PIECES = [
    "a",
    "bc",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "é",
    "中",
    "😀",
    " d",
    "1",
    "23",
    "\u00a0",
    "\tdef",  # whitespace other than a space, then a word, in one token (tiktoken, Llama-3)
    "\nfoo",
    "\u00a0bar",
]


@st.composite
def tokenized_text(draw):
    """A text and a tokenization of it: whole pieces, some split at characters, and multi-byte
    characters sometimes cut into byte pieces that share the character's span."""
    pieces = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=25))
    text = "".join(pieces)

    def tokenize(seed_cuts):
        offsets, start = [], 0
        for piece, cut in zip(pieces, seed_cuts, strict=True):
            end = start + len(piece)
            if cut == 1 and len(piece) > 1:
                offsets += [(start, start + 1), (start + 1, end)]
            elif cut == 2 and len(piece.encode()) > len(piece):
                offsets += [(start, end)] * len(piece.encode())  # byte-fallback pieces
            else:
                offsets.append((start, end))
            start = end
        return offsets

    cuts = st.lists(st.integers(0, 2), min_size=len(pieces), max_size=len(pieces))
    return text, tokenize(draw(cuts)), tokenize(draw(cuts))


def test_a_token_that_starts_with_a_tab_newline_or_nbsp_begins_at_its_word():
    text = "a\tdef\nfoo\u00a0bar"
    source = [(0, 1), (1, 5), (5, 9), (9, 13)]  # a, \tdef, \nfoo, \u00a0bar
    target = [(0, 1), (1, 2), (2, 5), (5, 6), (6, 9), (9, 10), (10, 13)]  # whitespace apart
    # source tokens begin at 0, 2, 6, 10; target tokens at 0, 1, 2, 5, 6, 9, 10
    assert offset_align(source, target, text).target_to_source == [
        [],
        [0],
        [],
        [1],
        [],
        [2],
        [3],
    ]


@given(tokenized_text())
@example(("a\tdef\nfoo", [(0, 1), (1, 5), (5, 9)], [(0, 1), (1, 2), (2, 5), (5, 6), (6, 9)]))
def test_any_two_tokenizations_pair_as_the_brute_force_rule(example):
    text, source, target = example
    result = offset_align(source, target, text)
    assert result.target_to_source == _brute_force(source, target, text)
    assert offset_align(target, target, text).target_to_source == [[p] for p in range(len(target))]


@pytest.mark.parametrize(
    ("offsets", "message"),
    [
        ([], "target_offsets is empty"),
        ([(0, 3), (1, 2), (0, 1)], r"target_offsets\[2\] starts at 0, before"),
        ([(0, 99)], "not a \\(start, end\\) span of the 3-character text"),
        ([(2, 1)], "not a \\(start, end\\) span"),
    ],
)
def test_bad_offsets_raise_value_error(offsets, message):
    with pytest.raises(ValueError, match=message):
        offset_align([(0, 3)], offsets, "abc")
