"""Whitespace markers are read from what a tokenizer produces."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fusion.align import detect_marker, translate_marker
from fusion.align.markers import strip_marker


def test_byte_level_tokenizer_uses_g_dot(byte_level_tokenizer):
    assert detect_marker(byte_level_tokenizer) == "Ġ"


def test_metaspace_tokenizer_uses_lower_one_eighth_block(metaspace_tokenizer):
    assert detect_marker(metaspace_tokenizer) == "▁"


def test_whitespace_splitting_tokenizer_has_no_marker():
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert detect_marker(PreTrainedTokenizerFast(tokenizer_object=backend)) == ""


def test_tokenizer_that_loses_the_letters_is_refused():
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="pass the marker explicitly"):
        detect_marker(PreTrainedTokenizerFast(tokenizer_object=backend))


def test_translation_replaces_only_the_marker():
    assert translate_marker("ĠĠfooĊ", "Ġ", "▁") == "▁▁fooĊ"
    assert translate_marker("foo", "", "▁") == "foo"
    assert translate_marker("Ġfoo", "Ġ", "") == "foo"
    assert strip_marker("▁a▁b", "▁") == "ab"
    assert strip_marker("ab", "") == "ab"
