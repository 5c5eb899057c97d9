"""The compiled DTW agrees with the obviously correct one and rejects bad input."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.align import dtw_align
from fusion.align.slow import dtw_align_slow
from tests.strategies import examples, markers, tokens


@settings(max_examples=examples(300), deadline=None)
@given(
    source=tokens, target=tokens, marks=markers, tie_break=st.sampled_from(["fusellm", "fusechat"])
)
def test_fast_dtw_equals_slow_dtw_on_random_tokens(source, target, marks, tie_break):
    kwargs = {"source_marker": marks[0], "target_marker": marks[1], "tie_break": tie_break}
    assert dtw_align(source, target, **kwargs) == dtw_align_slow(source, target, **kwargs)


def test_fast_dtw_equals_slow_dtw_on_long_tie_heavy_sequences():
    rng = random.Random(7)
    pieces = ["a", "b", "ab", "Ġa", "▁b", "", "Ġ", "▁"]
    source = [rng.choice(pieces) for _ in range(150)]
    target = [rng.choice(pieces) for _ in range(170)]
    for tie_break in ("fusellm", "fusechat"):
        fast = dtw_align(source, target, tie_break=tie_break)
        assert fast == dtw_align_slow(source, target, tie_break=tie_break)


def test_dtw_on_two_real_tokenizations_equals_slow(byte_level_tokenizer, metaspace_tokenizer):
    text = "def parse(value):\n    return int(value) + 2023  # naïve café\n"
    source = byte_level_tokenizer.tokenize(text)
    target = metaspace_tokenizer.tokenize(text)
    fast = dtw_align(source, target)
    assert fast == dtw_align_slow(source, target)
    assert all(fast.target_to_source) and all(fast.source_to_target)


def test_every_token_is_matched_and_paths_are_monotone():
    result = dtw_align(["Ġ20", "23", "Ġis"], ["▁", "2", "0", "2", "3", "▁is"])
    assert all(result.target_to_source) and all(result.source_to_target)
    firsts = [m[0] for m in result.target_to_source]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ([], ["a"], "source_tokens is empty"),
        (["a"], [], "target_tokens is empty"),
        ("abc", ["a"], "not one string"),
        (["a", 3], ["a"], r"source_tokens\[1\] is int"),
    ],
)
def test_bad_tokens_raise_value_error_naming_the_argument(source, target, message):
    with pytest.raises(ValueError, match=message):
        dtw_align(source, target)


def test_unknown_tie_break_is_rejected():
    with pytest.raises(ValueError, match="tie_break"):
        dtw_align(["a"], ["a"], tie_break="random")
