"""Batched MinED maps equal the token-by-token search, ties and long distances included."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from rapidfuzz.distance import Levenshtein

from fusion.align import exact_vocab_map, mined_vocab_map
from fusion.align.slow import levenshtein, mined_vocab_map_slow
from fusion.align.vocab import nearest_tokens
from fusion.models.loading import vocab_list
from tests.strategies import examples, markers, token, vocab


@settings(max_examples=examples(200), deadline=None)
@given(source=vocab(), target=vocab(), marks=markers)
def test_mined_map_equals_slow_map(source, target, marks):
    kwargs = {"source_marker": marks[0], "target_marker": marks[1]}
    assert mined_vocab_map(source, target, **kwargs) == mined_vocab_map_slow(
        source, target, **kwargs
    )


@settings(max_examples=examples(100), deadline=None)
@given(source=vocab(max_len=24), target=vocab(max_size=8, max_len=3))
@example(source=["a"], target=["abc", "xy"])
def test_nearest_token_is_exact_beyond_every_distance_cutoff(source, target):
    assert mined_vocab_map(source, target) == mined_vocab_map_slow(source, target)


@settings(max_examples=examples(300), deadline=None)
@given(a=token, b=token)
def test_pure_python_levenshtein_equals_rapidfuzz(a, b):
    assert levenshtein(a, b) == Levenshtein.distance(a, b)


def test_nearest_ties_go_to_the_first_target_in_id_order():
    assert nearest_tokens(["ab"], ["xb", "ay", "ab!"]).tolist() == [0]


def test_a_choice_longer_by_exactly_the_cutoff_is_still_compared():
    # "abc" and "xy" are both 2 edits from "a": the first must win, although "abc" is
    # 2 characters longer (the edge of the length window under the cut-off 2)
    assert nearest_tokens(["a"], ["abc", "xy"]).tolist() == [0]
    assert nearest_tokens(["abc"], ["a", "xyz"]).tolist() == [0]  # and 2 shorter


def test_map_between_two_trained_tokenizers_equals_slow(byte_level_tokenizer, metaspace_tokenizer):
    source, target = vocab_list(byte_level_tokenizer), vocab_list(metaspace_tokenizer)
    fast = mined_vocab_map(source, target)
    assert fast == mined_vocab_map_slow(source, target, distance=Levenshtein.distance)
    assert set(fast) == {s.replace("Ġ", "▁") for s in source}


def test_exact_map_keeps_only_identical_spellings(golden):
    vocab_ = golden["vocab"]
    exact = exact_vocab_map(vocab_["source_vocab"], vocab_["target_vocab"])
    assert exact == {k: v for k, v in vocab_["mined_map"].items() if k == v}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ([], "target_vocab must be a non-empty"),
        (["a", "b", "a"], "lists 'a' twice"),
        (["a", 1], r"\[1\] is int"),
    ],
)
def test_bad_vocabularies_raise_value_error(target, message):
    with pytest.raises(ValueError, match=message):
        mined_vocab_map(["a"], target)


def test_vocabulary_maps_are_kept_on_disk_by_both_vocabularies(golden, tmp_path):
    from fusion.align.cache import cached_map

    vocab = golden["vocab"]
    calls = []

    def mined_vocab_map_counted(source, target, **markers):
        calls.append(len(target))
        return mined_vocab_map(source, target, **markers)

    def get(target_vocab):
        return cached_map(
            tmp_path,
            mined_vocab_map_counted,
            vocab["source_vocab"],
            target_vocab,
            source_marker="Ġ",
            target_marker="▁",
        )

    assert get(vocab["target_vocab"]) == vocab["mined_map"]
    assert get(vocab["target_vocab"]) == vocab["mined_map"] and len(calls) == 1  # reused
    first = set(tmp_path.iterdir())
    other = [*vocab["target_vocab"][:-1], "▁The"]  # one token differs: another map
    assert get(other) != vocab["mined_map"] and len(calls) == 2
    (entry,) = set(tmp_path.iterdir()) - first
    entry.write_text("{broken")
    assert get(other)["▁World"] == "▁world" and len(calls) == 3  # damaged entry: rebuilt
    no_cache = cached_map(
        None,
        mined_vocab_map_counted,
        vocab["source_vocab"],
        vocab["target_vocab"],
        source_marker="Ġ",
        target_marker="▁",
    )
    assert no_cache == vocab["mined_map"] and len(calls) == 4
