"""`scripts/gpu-check.sh`: what a GPU changes, checked in a few minutes without Ray.

Four checks on tiny models built here, each printing PASS, SKIP (with the reason) or FAIL:

- ``backend``: the transformers backend on the device in ``dtype: auto`` (bf16 on a capable
  GPU) against float32 on the CPU: the same top-1 wherever float32's top-2 margin exceeds
  bf16's rounding, CE within 0.05 nats;
- ``head``: the chunked output head at a 262,144-token vocabulary, batch 8 × 2048 (2 × 256
  with ``--cpu``), with the peak memory it added;
- ``train``: one fused-loss step (DDP) in a one-rank process group (NCCL on a GPU, gloo on
  the CPU) under the device rule of :mod:`fusion.models.device`;
- ``deepspeed``: the same step with DeepSpeed ZeRO-2 and ZeRO-3 where deepspeed imports.

It needs torch, transformers, tokenizers, numpy, pydantic and pyyaml (no Ray, no pyarrow).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 262_144


def _world(root: Path) -> Path:
    """A tiny Llama and its tokenizer, saved as a model folder."""
    import pydoc_data.topics

    from fusion.testing.toy import save_model_dir, tiny_causal_lm, train_tokenizer

    texts = list(pydoc_data.topics.topics.values())[:40]
    tokenizer = train_tokenizer(texts, "metaspace", 800)
    return save_model_dir(root / "llama", tiny_causal_lm("llama", len(tokenizer)), tokenizer)


def check_backend(folder: Path, device: str) -> str:
    from fusion.config import ModelConfig
    from fusion.teacher.backends.hf import HFTopK

    dtype = "auto" if device == "cuda" else "bfloat16"
    fast = HFTopK(
        ModelConfig(path=str(folder), dtype=dtype, device=device),
        "check",
        num_gpus=1 if device == "cuda" else 0,
        top_k=5,
    )
    exact = HFTopK(
        ModelConfig(path=str(folder), dtype="float32", device="cpu"), "check", num_gpus=0, top_k=5
    )
    text = "Assignment statements bind names to values; a = b = 1 and then some more prose."
    ids, _ = exact.encode(text, has_eos=True)
    got, want = fast.read([ids], ["r"])[0], exact.read([ids], ["r"])[0]
    margin = want.logits[:, 0] - want.logits[:, 1]
    clear = margin > 0.1  # bf16 rounds logits by ~0.01–0.05
    if not (got.ids[clear, 0] == want.ids[clear, 0]).all():
        raise AssertionError("top-1 ids differ where float32's margin is clear")
    if abs(got.ce - want.ce) > 0.05:
        raise AssertionError(f"CE {got.ce:.4f} on {device} vs {want.ce:.4f} in float32")
    dtype_name = str(next(fast.model.parameters()).dtype).removeprefix("torch.")
    return (
        f"{dtype_name} on {device}: top-1 equal at {int(clear.sum())}/{len(ids)} clear "
        f"positions, CE {got.ce:.4f} vs {want.ce:.4f}"
    )


def check_head(device: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion.models.head import ChunkedHead

    batch, length = (8, 2048) if device == "cuda" else (2, 256)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=2048,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    head = ChunkedHead(model, masked=None)
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    mask = torch.ones_like(ids)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    reading = head.read(ids, mask, top_k=10)
    seconds = time.perf_counter() - start
    if not torch.isfinite(reading.lse).all():
        raise AssertionError("non-finite log-normaliser")
    dense = batch * length * VOCAB * 4 / 2**20
    figure = (
        f"{batch}×{length} at V={VOCAB:,} in {seconds:.2f} s (dense fp32 logits: {dense:,.0f} MiB)"
    )
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        figure += f"; peak added {peak:,.0f} MiB"
    return figure


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _training_config(folder: Path, device: str, **train):
    from fusion.config import parse_config

    use_gpu = device == "cuda"
    return parse_config(
        {
            "target": {"path": str(folder)},
            "sources": [{"name": "s", "path": str(folder)}],
            "data": {"paths": [str(folder / "config.json")]},
            "output": {"dir": str(folder / "unused")},
            "train": {
                "num_workers": 1,
                "global_batch_size": 2,
                "micro_batch_size": 2,
                "use_gpu": use_gpu,
                "lr": 3e-3,
                **train,
            },
        }
    )


def _batch(device: str) -> dict[str, torch.Tensor]:
    """Two rows of 64 tokens with a top-10 teacher at every position."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, 800, (2, 64), generator=generator)
    topk = (ids[..., None] + torch.arange(10)) % 800  # ten distinct ids per position
    logits = torch.randn(2, 64, 10, generator=generator).sort(-1, descending=True).values
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "topk_ids": topk,
        "topk_logits": logits,
        "teacher_mask": torch.ones(2, 64),
    }
    return {k: v.to(device) for k, v in batch.items()}


def check_train(folder: Path, device: str, **train) -> str:
    from fusion.models.device import strict_device
    from fusion.train.engine import Engine

    run = _training_config(folder, device, **train)
    engine_device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    with strict_device(engine_device):
        engine = Engine(run, total=2, device=engine_device)
        losses = [float(engine.micro_step(_batch(device), 0.9, "fp32")[0].total) for _ in range(2)]
        tokens = engine.sum_over_workers(128)
    if tokens != 128 or not all(map(lambda x: x == x, losses)):
        raise AssertionError(f"tokens {tokens}, losses {losses}")
    precision = "bf16" if run.train.bf16 else "fp32"
    return f"{run.train.strategy} {precision}: losses {losses[0]:.4f} → {losses[1]:.4f}"


def _report(name: str, check: Callable[[], str]) -> bool:
    try:
        print(f"PASS {name}: {check()}", flush=True)
        return True
    except Exception as error:  # every failure is reported, the other checks still run
        traceback.print_exc()
        print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every check on the CPU")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.cpu and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device is visible (use --cpu to run the checks on the CPU)")
        return 1
    device = "cpu" if args.cpu else "cuda"
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""),
        flush=True,
    )
    import torch.distributed as dist

    ok = True
    with tempfile.TemporaryDirectory() as folder:
        model = _world(Path(folder))
        ok &= _report("backend", lambda: check_backend(model, device))
        ok &= _report("head", lambda: check_head(device))
        # one rank, as a launcher would describe it (DeepSpeed reads these variables)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
        try:
            ok &= _report("train", lambda: check_train(model, device, strategy="ddp"))
            try:
                import deepspeed  # noqa: F401
            except ImportError as error:
                print(f"SKIP deepspeed: {error}")
            else:
                for stage in (2, 3):
                    ok &= _report(
                        f"deepspeed ZeRO-{stage}",
                        lambda stage=stage: check_train(
                            model, device, strategy="deepspeed", zero_stage=stage
                        ),
                    )
        finally:
            dist.destroy_process_group()
    print("all checks passed" if ok else "some checks FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
