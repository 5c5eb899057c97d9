"""One training step of the target: CLM only vs the sparse fusion objective vs a dense target.

A 4-layer, width-256 Llama with a 32,000-token vocabulary (so the logits dominate, as in
real models) takes a batch of 4 × 512 tokens with a top-10 teacher. Each variant runs in a
fresh process: step time is the median of 5 steps after a warm-up, peak memory the process's
peak resident set on CPU (``torch.cuda.max_memory_allocated`` on a GPU).

    .venv/bin/python -m bench.train
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.common import bench_llama, report

VOCAB, BATCH, LENGTH, TOP_K, LAMBDA = 32_000, 4, 512, 10, 0.9
VARIANTS = ("clm", "fusion", "dense")


def _batch(device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    topk_ids = torch.randint(0, VOCAB, (BATCH, LENGTH, TOP_K), generator=generator)
    topk_logits = torch.randn(BATCH, LENGTH, TOP_K, generator=generator).sort(-1, True).values
    mask = torch.ones(BATCH, LENGTH)
    return {
        k: v.to(device)
        for k, v in {
            "ids": ids,
            "topk_ids": topk_ids,
            "topk_logits": topk_logits,
            "mask": mask,
        }.items()
    }


def _dense_loss(logits, batch):
    """The reference's computation: a dense [B, L, V] teacher tensor, then full log-softmax."""
    dense = torch.zeros_like(logits, dtype=torch.float32)
    dense.scatter_(-1, batch["topk_ids"], torch.softmax(batch["topk_logits"], -1))
    log_probs = torch.log_softmax(logits.float(), -1)
    fusion = -(dense * log_probs).sum(-1).mean()
    clm = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).float(), batch["ids"][:, 1:].reshape(-1)
    )
    return LAMBDA * clm + (1 - LAMBDA) * fusion


def run_variant(variant: str) -> dict:
    from fusion.train.loss import fusion_objective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    model = bench_llama(VOCAB, seed=0).to(device)
    batch = _batch(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if variant == "clm":
            loss = model(batch["ids"], labels=batch["ids"]).loss
        else:
            logits = model(batch["ids"]).logits
            if variant == "fusion":
                loss = fusion_objective(
                    logits,
                    batch["ids"],
                    batch["mask"],
                    batch["topk_ids"],
                    batch["topk_logits"],
                    batch["mask"],
                    lam=LAMBDA,
                ).total
            else:
                loss = _dense_loss(logits, batch)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"variant": variant, "seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant)))
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, "-m", "bench.train", "--variant", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    clm = results["clm"]
    rows = [
        (
            name,
            f"{r['seconds'] * 1e3:.0f}",
            f"{r['peak_bytes'] / 2**20:.0f}",
            f"{r['seconds'] / clm['seconds']:.2f}× / {r['peak_bytes'] / clm['peak_bytes']:.2f}×",
        )
        for name, r in (
            ("CLM only (HF loss)", clm),
            ("fusion objective, sparse top-10", results["fusion"]),
            ("same loss, dense [B, L, V] target", results["dense"]),
        )
    ]
    report(
        "train",
        rows,
        {"results": results, "batch": BATCH, "length": LENGTH, "vocab": VOCAB, "top_k": TOP_K},
        header=("step", "ms", "peak MiB", "time / memory vs CLM"),
    )


if __name__ == "__main__":
    main()
