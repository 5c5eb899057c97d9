"""Offset alignment pairs positions that predict the same next character, and only those."""

from __future__ import annotations

import pytest

from fusion.align import offset_align
from fusion.align.offsets import _skip_spaces

TEXT = "Hello  world\n\tdef café(x): return 2023\n"


def _next_key(offsets, position, text):
    if position + 1 == len(offsets):
        return "end"
    return _skip_spaces(text, offsets[position + 1][0])


def test_identical_tokenizations_pair_every_position_with_itself():
    offsets = [(0, 5), (5, 11), (11, 12)]
    result = offset_align(offsets, offsets, "Hello world!")
    assert result.target_to_source == [[0], [1], [2]]
    assert result.cost == 0.0


def test_pairs_are_exactly_the_first_positions_with_equal_next_character(
    byte_level_tokenizer, metaspace_tokenizer
):
    source = byte_level_tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    target = metaspace_tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    s_off, t_off = source["offset_mapping"], target["offset_mapping"]
    result = offset_align(s_off, t_off, TEXT)
    s_keys = [_next_key(s_off, j, TEXT) for j in range(len(s_off))]
    t_keys = [_next_key(t_off, i, TEXT) for i in range(len(t_off))]
    for i, matched in enumerate(result.target_to_source):
        first_target = t_keys.index(t_keys[i]) == i
        expected = [s_keys.index(t_keys[i])] if first_target and t_keys[i] in s_keys else []
        assert matched == expected, (i, t_keys[i])
    assert sum(map(bool, result.target_to_source)) > len(t_off) // 2


def test_leading_space_inside_or_outside_a_span_pairs_the_same():
    text = "Hello my"
    with_space = [(0, 5), (5, 8)]  # byte-level: "Ġmy" spans the space
    without_space = [(0, 5), (6, 8)]  # Metaspace pre-tokenizer: "▁my" does not
    assert offset_align(with_space, without_space, text).target_to_source == [[0], [1]]


def test_byte_pieces_of_one_character_pair_only_the_first():
    text = "aé b"
    source = [(0, 1), (1, 2), (2, 4)]  # "a", "é", "Ġb"
    target = [(0, 1), (1, 2), (1, 2), (2, 4)]  # "a", "<0xC3>", "<0xA9>", "▁b"
    result = offset_align(source, target, text)
    assert result.target_to_source == [[0], [], [1], [2]]


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
