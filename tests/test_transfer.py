"""Vectorised top-k transfer equals the position-by-position reference semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.align import (
    PAD_ID,
    VocabBridge,
    dtw_align,
    mined_vocab_map,
    offset_align,
    transfer_topk,
)
from fusion.align.alignment import Alignment
from fusion.align.slow import transfer_topk_slow
from tests.strategies import examples, vocab


@st.composite
def transfer_case(draw):
    source_vocab = draw(vocab(min_size=2, max_size=12))
    target_vocab = draw(vocab(min_size=2, max_size=12))
    n = draw(st.integers(1, 8))
    m = draw(st.integers(1, 8))
    k = draw(st.integers(1, 4))
    source_ids = draw(st.lists(st.integers(0, len(source_vocab) - 1), min_size=n, max_size=n))
    target_ids = draw(st.lists(st.integers(0, len(target_vocab) - 1), min_size=m, max_size=m))
    topk_ids = draw(
        st.lists(
            st.lists(st.integers(0, len(source_vocab) - 1), min_size=k, max_size=k),
            min_size=n,
            max_size=n,
        )
    )
    logits = sorted(draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k)), reverse=True)
    return source_vocab, target_vocab, source_ids, target_ids, topk_ids, [logits] * n


@settings(max_examples=examples(300), deadline=None)
@given(
    case=transfer_case(),
    mode=st.sampled_from(["soft", "hard"]),
    fallback=st.sampled_from(["current", "next"]),
    markers=st.sampled_from([("Ġ", "▁"), ("", "▁"), ("Ġ", "Ġ")]),
    check_tokens=st.booleans(),
)
def test_transfer_equals_slow_reference(case, mode, fallback, markers, check_tokens):
    source_vocab, target_vocab, source_ids, target_ids, topk_ids, topk_logits = case
    source_marker, target_marker = markers
    alignment = dtw_align(
        [source_vocab[i] for i in source_ids],
        [target_vocab[i] for i in target_ids],
        source_marker=source_marker,
        target_marker=target_marker,
    )
    mapping = mined_vocab_map(
        source_vocab, target_vocab, source_marker=source_marker, target_marker=target_marker
    )
    kwargs = dict(
        target_vocab=target_vocab,
        source_vocab=source_vocab,
        mapping=mapping,
        mode=mode,
        source_marker=source_marker,
        target_marker=target_marker,
        fallback=fallback,
        alignment=alignment,
        check_tokens=check_tokens,
    )
    fast = transfer_topk(target_ids, source_ids, topk_ids, topk_logits, **kwargs)
    assert fast == transfer_topk_slow(target_ids, source_ids, topk_ids, topk_logits, **kwargs)


def _golden_bridge(golden, **kwargs):
    vocab = golden["vocab"]
    return VocabBridge.build(vocab["source_vocab"], vocab["target_vocab"], **kwargs)


def test_next_fallback_puts_the_one_hot_on_the_following_token(golden):
    case = golden["transfer"]["B"]
    bridge = _golden_bridge(golden)
    alignment = dtw_align(["Hello", "ĠWorld"], ["▁Hello", "▁world"])
    ids, logits, _ = bridge.transfer(
        case["target_ids"],
        case["source_ids"],
        case["source_topk_ids"],
        case["source_topk_logits"],
        alignment,
        mode="hard",
        fallback="next",
    )
    assert ids[1].tolist() == [PAD_ID] * 3  # last position: no next token, no teacher
    assert np.isneginf(logits[1]).all()


def test_offset_alignment_without_token_check_transfers_every_paired_position(golden):
    case = golden["transfer"]["B"]
    text = "Hello World"
    alignment = offset_align([(0, 5), (5, 11)], [(0, 5), (5, 11)], text)
    ids, _, _ = _golden_bridge(golden).transfer(
        case["target_ids"],
        case["source_ids"],
        case["source_topk_ids"],
        case["source_topk_logits"],
        alignment,
        check_tokens=False,
    )
    assert ids.tolist() == [[4, 8, PAD_ID], [5, 9, 0]]


def test_duplicate_mapped_ids_keep_the_first_highest_logit(golden):
    bridge = _golden_bridge(golden)
    # ĠWorld and Ġworld both map to ▁world: only the first entry (logit 5) survives.
    ids, logits, _ = bridge.transfer(
        [4], [2], [[6, 2, 4]], [[5.0, 3.0, 1.0]], dtw_align(["Ġworld"], ["▁world"])
    )
    assert ids.tolist() == [[4, 8, PAD_ID]]
    assert logits[0, :2].tolist() == [5.0, 1.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_ids": [3, 99]}, r"target_ids\[1\] = 99 is outside the vocabulary"),
        ({"source_topk_ids": [[2, 6, 40], [3, 5, 0]]}, r"source_topk_ids\[0, 2\] = 40"),
        ({"source_topk_logits": [[5.0, float("nan"), 1.0], [4.0, 2.0, 0.5]]}, r"\[0\]\[1\] is nan"),
        ({"source_topk_logits": [[5.0, 3.0], [4.0, 2.0]]}, "shape"),
        ({"source_ids": [1]}, r"expected \[len\(source_ids\)=1, k\]"),
        ({"target_ids": [3, 4, 5]}, "alignment covers 2 target positions"),
        ({"mode": "fuzzy"}, "mode must be"),
        ({"fallback": "previous"}, "fallback must be"),
    ],
)
def test_bad_transfer_input_raises_value_error(golden, change, message):
    case = golden["transfer"]["B"]
    arguments = {
        "target_ids": case["target_ids"],
        "source_ids": case["source_ids"],
        "source_topk_ids": case["source_topk_ids"],
        "source_topk_logits": case["source_topk_logits"],
        "mode": "soft",
        "fallback": "current",
    } | change
    alignment = dtw_align(["Hello", "ĠWorld"], ["▁Hello", "▁world"])
    with pytest.raises(ValueError, match=message):
        _golden_bridge(golden).transfer(
            arguments.pop("target_ids"),
            arguments.pop("source_ids"),
            arguments.pop("source_topk_ids"),
            arguments.pop("source_topk_logits"),
            alignment,
            **arguments,
        )


def test_alignment_pointing_past_the_source_is_rejected(golden):
    from fusion.align import Alignment

    broken = Alignment(cost=0.0, target_to_source=[[0], [5]], source_to_target=[[0], []])
    with pytest.raises(ValueError, match="source position 5"):
        _golden_bridge(golden).transfer([3, 4], [1, 6], [[1], [2]], [[1.0], [1.0]], broken)


def test_mapping_to_a_token_outside_the_target_vocab_is_rejected(golden):
    with pytest.raises(ValueError, match=r"mapping\['Hello'\] = 'Hola'"):
        _golden_bridge(golden, mapping={"Hello": "Hola"})


@pytest.mark.parametrize("empty", ["target_ids", "source_ids"])
def test_empty_sequences_are_rejected(golden, empty):
    arguments = {"target_ids": [3], "source_ids": [1]} | {empty: []}
    alignment = dtw_align(["Hello"], ["▁Hello"])
    with pytest.raises(ValueError, match="non-empty"):
        _golden_bridge(golden).transfer(
            arguments["target_ids"], arguments["source_ids"], [[1]], [[1.0]], alignment
        )


def test_special_tokens_map_by_role_in_clean_bridges(golden):
    vocab = golden["vocab"]
    bridge = VocabBridge.build(vocab["source_vocab"], vocab["target_vocab"])
    # reference: <|endoftext|> goes to <unk>, the nearest spelling (golden mined_map)
    assert vocab["target_vocab"][bridge.mapped_ids[0]] == "<unk>"
    clean = bridge.with_special_roles({"eos": 0}, {"unk": 0, "bos": 1, "eos": 2})
    assert clean.mapped_ids[0] == clean.exact_ids[0] == 2  # EOS → </s>
    assert (clean.mapped_ids[1:] == bridge.mapped_ids[1:]).all()  # ordinary tokens unchanged
    # a top-k holding EOS moves its mass onto the target's EOS
    moved = clean.transfer([3, 4], [1, 2], [[2, 0], [0, 3]], [[1.0, 0.5], [2.0, 0.0]], _pairs(2))
    assert moved.ids.tolist() == [[4, 2], [2, 5]]


def _pairs(n):
    from fusion.align import Alignment

    return Alignment(0.0, [[i] for i in range(n)], [[i] for i in range(n)])


def test_real_eos_maps_to_eos_and_no_ordinary_token_lands_on_a_special():
    from fusion.models.loading import special_tokens, vocab_list
    from fusion.testing.packaged_tokenizers import gpt2_tokenizer, mistral_tokenizer

    gpt2, mistral = gpt2_tokenizer(), mistral_tokenizer()
    source_vocab, target_vocab = vocab_list(gpt2), vocab_list(mistral)
    mapping = {"<|endoftext|>": "<unk>", "Ġ</": "</s>", "Ġworld": "▁world"}
    mapping = {k.replace("Ġ", "▁"): v for k, v in mapping.items()}
    bridge = VocabBridge.build(source_vocab, target_vocab, mapping).with_special_roles(
        special_tokens(gpt2), special_tokens(mistral)
    )
    eos = gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert target_vocab[bridge.mapped_ids[eos]] == "</s>"
    assert bridge.mapped_ids[gpt2.convert_tokens_to_ids("Ġ</")] == PAD_ID  # not onto </s>
    assert target_vocab[bridge.mapped_ids[gpt2.convert_tokens_to_ids("Ġworld")]] == "▁world"
    specials = {mistral.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")}
    ordinary = np.ones(len(source_vocab), bool)
    ordinary[eos] = False
    assert not np.isin(bridge.mapped_ids[ordinary], list(specials)).any()


def test_aligned_marks_only_positions_holding_the_sources_own_mapped_distribution():
    """By hand: position 0 is paired and maps; 1 is unpaired (the one-hot fallback); 2 is
    paired but every top-k entry falls outside the exact map (nothing survives); 3 is paired
    to two source positions (no single source: fallback)."""
    source_vocab = ["a", "b", "zz", "c"]
    target_vocab = ["a", "b", "c", "d"]
    bridge = VocabBridge.build(source_vocab, target_vocab, {})  # exact spelling only
    alignment = Alignment(0.0, [[0], [], [1], [2, 3]], [])
    moved = bridge.transfer(
        [0, 1, 3, 2],
        [0, 1, 2, 3],
        [[0, 1], [2, 2], [2, 2], [3, 0]],
        [[2.0, 1.0], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]],
        alignment,
        mode="hard",
        fallback="next",
        check_tokens=False,
    )
    assert moved.aligned.tolist() == [True, False, False, False]
    assert moved.ids[0].tolist() == [0, 1]  # a, b
    assert moved.ids[1].tolist() == [3, PAD_ID]  # the next target token, one-hot
    assert moved.ids[2].tolist() == [PAD_ID, PAD_ID]  # "zz" has no target spelling
