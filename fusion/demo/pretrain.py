"""Pre-training the demo's small models in-process: domain experts and the target's start.

A plain causal-LM loop (AdamW, warm-up + cosine, clipping) over spans drawn from the domains in
a fixed mixture. Spans are cut into windows that start with BOS exactly as evaluation cuts
them, so every byte of a span is predicted. This builds the demo's world; it is not the
fusion trainer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from fusion.config import TrainConfig
from fusion.models.scoring import windows
from fusion.train.optim import adamw, scheduler


def _batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(sequence)] = ids[row, : len(sequence)]
    return ids, labels


def pretrain(
    model: torch.nn.Module,
    tokenizer,
    spans: Mapping[str, Sequence[str]],
    mix: Mapping[str, float],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup: int = 10,
    max_length: int = 160,
    seed: int = 0,
    bf16: bool = False,
) -> list[float]:
    """Train ``model`` for ``steps`` on batches drawn from ``spans`` by ``mix``; return losses.

    ``bf16`` computes under bf16 autocast (weights stay float32), faster on recent CPUs too.
    """
    rng = random.Random(seed)
    encoded = {d: windows(tokenizer, spans[d], max_length) for d in mix if mix[d] > 0}
    domains, weights = zip(*((d, mix[d]) for d in encoded), strict=True)
    settings = TrainConfig(lr=lr, warmup_ratio=min(warmup / steps, 0.5), min_lr_ratio=0.1)
    optimizer = adamw(model, settings)
    schedule = scheduler(optimizer, steps, settings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    model.train()
    losses = []
    for _ in range(steps):
        picks = rng.choices(domains, weights=weights, k=batch_size)
        ids, labels = _batch([rng.choice(encoded[d]) for d in picks], pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(
                input_ids=ids.to(device),
                attention_mask=(labels != -100).long().to(device),
                labels=labels.to(device),
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
