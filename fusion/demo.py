"""`fusion demo` at this stage of the project: the alignment and fusion core, end to end.

It builds two tokenizers of different families from text every Python installation carries
(standard-library source and the ``pydoc`` topics), aligns held-out spans with DTW and with
character offsets, moves a source model's top-k into the target vocabulary, fuses it with the
target's own distribution by MinCE and evaluates the sparse fusion objective. The models are
tiny and untrained: the figures show the machinery and its speed, not fusion quality.
"""

from __future__ import annotations

import json
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fusion.align import VocabBridge, detect_marker, dtw_align, mined_vocab_map, offset_align
from fusion.fuse import fuse_topk
from fusion.loss import fusion_objective
from fusion.models import vocab_list
from fusion.toy import tiny_causal_lm, train_tokenizer

TOP_K = 10


@dataclass
class DemoSummary:
    """What the demo measured; also written to ``summary.json``."""

    spans: int
    target_tokens: int
    source_tokens: int
    vocab_map_seconds: float
    vocab_exact_fraction: float
    dtw_ms_per_span: float
    offsets_ms_per_span: float
    dtw_one_to_one_fraction: float
    offsets_paired_fraction: float
    dtw_offsets_agreement: float
    source_chosen_fraction: float
    loss: float
    clm_loss: float
    fusion_loss: float
    wall_seconds: float


def _corpus(limit_chars: int) -> tuple[list[str], list[str]]:
    """Training texts and held-out spans from the standard library and pydoc topics."""
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 60_000)
    code = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    prose = list(pydoc_data.topics.topics.values())
    train, held_out, used = [], [], 0
    for i, text in enumerate(code + prose):
        if used > limit_chars:
            break
        (held_out if i % 10 == 0 else train).append(text)
        used += len(text)
    spans = [text[start : start + 800] for text in held_out for start in (0, 2000)]
    return train, [span for span in spans if span.strip()]


def _topk(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray, torch.Tensor, float]:
    """Top-k ids/logits per position, the full logits and the mean next-token CE."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    values, indices = logits.topk(TOP_K, dim=-1)
    ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    return indices.numpy(), values.numpy(), logits, ce


def run_demo(out_dir: Path, *, quick: bool = False, echo=print) -> DemoSummary:
    """Run the core demo, write tokenizers and ``summary.json`` under ``out_dir``."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    train, spans = _corpus(400_000 if quick else 1_500_000)
    spans = spans[: 12 if quick else 40]
    echo(f"corpus: {len(train)} training texts, {len(spans)} held-out spans")

    source_tok = train_tokenizer(train, "byte_level", 2048)
    target_tok = train_tokenizer(train, "metaspace", 3072)
    source_tok.save_pretrained(out_dir / "tokenizers" / "source")
    target_tok.save_pretrained(out_dir / "tokenizers" / "target")
    source_marker, target_marker = detect_marker(source_tok), detect_marker(target_tok)
    source_vocab, target_vocab = vocab_list(source_tok), vocab_list(target_tok)
    echo(
        f"tokenizers: source byte-level BPE {len(source_vocab)} ({source_marker!r}), "
        f"target Metaspace BPE {len(target_vocab)} ({target_marker!r})"
    )

    tick = time.perf_counter()
    mapping = mined_vocab_map(
        source_vocab, target_vocab, source_marker=source_marker, target_marker=target_marker
    )
    map_seconds = time.perf_counter() - tick
    bridge = VocabBridge.build(
        source_vocab,
        target_vocab,
        mapping,
        source_marker=source_marker,
        target_marker=target_marker,
    )
    source_model = tiny_causal_lm("gpt2", len(source_vocab), seed=1).eval()
    target_model = tiny_causal_lm("llama", len(target_vocab), seed=2).eval()

    dtw_align(["a"], ["a"])  # compile (or load) the DTW kernel before timing it
    totals = dict.fromkeys(
        ["target", "source", "dtw_s", "off_s", "dtw_1to1", "off_pair", "agree", "src"], 0.0
    )
    losses = []
    for text in spans:
        s_enc = source_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t_enc = target_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        s_ids, t_ids = s_enc["input_ids"], t_enc["input_ids"]
        tick = time.perf_counter()
        by_dtw = dtw_align(
            source_tok.convert_ids_to_tokens(s_ids),
            target_tok.convert_ids_to_tokens(t_ids),
            source_marker=source_marker,
            target_marker=target_marker,
        )
        totals["dtw_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        by_offsets = offset_align(s_enc["offset_mapping"], t_enc["offset_mapping"], text)
        totals["off_s"] += time.perf_counter() - tick
        one_to_one = [len(m) == 1 for m in by_dtw.target_to_source]
        totals["target"] += len(t_ids)
        totals["source"] += len(s_ids)
        totals["dtw_1to1"] += sum(one_to_one)
        totals["off_pair"] += sum(1 for m in by_offsets.target_to_source if m)
        totals["agree"] += sum(
            a == b and ok
            for a, b, ok in zip(
                by_dtw.target_to_source, by_offsets.target_to_source, one_to_one, strict=True
            )
        )

        s_topk_ids, s_topk_logits, _, s_ce = _topk(source_model, s_ids)
        t_topk_ids, t_topk_logits, t_logits, t_ce = _topk(target_model, t_ids)
        ids, logits = bridge.transfer(
            t_ids, s_ids, s_topk_ids, s_topk_logits, by_offsets, fallback="next", check_tokens=False
        )
        fused = fuse_topk(
            np.stack([t_topk_ids, ids]),
            np.stack([t_topk_logits, logits]),
            [t_ce, s_ce],
            mode="clean",
        )
        totals["src"] += float((fused.choice == 1).mean()) * len(t_ids)
        parts = fusion_objective(
            t_logits[None],
            torch.tensor([t_ids]),
            torch.ones(1, len(t_ids)),
            torch.from_numpy(fused.ids.astype(np.int64))[None],
            torch.from_numpy(fused.logits)[None],
            torch.ones(1, len(t_ids)),
        )
        losses.append([parts.total.item(), parts.clm.item(), parts.fusion.item()])

    mean_loss = np.mean(losses, axis=0)
    summary = DemoSummary(
        spans=len(spans),
        target_tokens=int(totals["target"]),
        source_tokens=int(totals["source"]),
        vocab_map_seconds=round(map_seconds, 3),
        vocab_exact_fraction=round(sum(k == v for k, v in mapping.items()) / len(mapping), 4),
        dtw_ms_per_span=round(1000 * totals["dtw_s"] / len(spans), 3),
        offsets_ms_per_span=round(1000 * totals["off_s"] / len(spans), 3),
        dtw_one_to_one_fraction=round(totals["dtw_1to1"] / totals["target"], 4),
        offsets_paired_fraction=round(totals["off_pair"] / totals["target"], 4),
        dtw_offsets_agreement=round(totals["agree"] / max(totals["dtw_1to1"], 1), 4),
        source_chosen_fraction=round(totals["src"] / totals["target"], 4),
        loss=round(float(mean_loss[0]), 4),
        clm_loss=round(float(mean_loss[1]), 4),
        fusion_loss=round(float(mean_loss[2]), 4),
        wall_seconds=round(time.perf_counter() - started, 2),
    )
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary
