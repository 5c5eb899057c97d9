"""Helpers shared by the benchmarks: timing, a real corpus, and the results table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (after one warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def once_seconds(run: Callable[[], object]) -> tuple[float, object]:
    """Wall time and result of a single call."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def stdlib_text(min_chars: int) -> str:
    """Real text every Python installation has: standard-library modules, in name order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "".join(parts)


def report(
    name: str,
    rows: list[tuple[str, ...]],
    extra: dict,
    header: tuple[str, ...] = ("figure", "fusion", "pure Python", "ratio"),
) -> None:
    """Print a table and write it, with ``extra`` figures, as JSON under bench/results."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    RESULTS.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    payload = {"rows": [dict(zip(header, row, strict=True)) for row in rows], **extra, **machine}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written to {RESULTS / (name + '.json')}")


def bench_llama(vocab_size: int, *, seed: int):
    """The benchmarks' model: a randomly initialised Llama, 4 layers, width 256."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config)
