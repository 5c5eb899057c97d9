"""Optimizer and learning-rate schedule of the target's continual training."""

from __future__ import annotations

import math

import torch

from fusion.config import TrainConfig


def adamw(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms or other vectors)."""
    decay, plain = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            shape = getattr(parameter, "ds_shape", parameter.shape)  # ZeRO-3: the full shape
            (decay if len(shape) >= 2 else plain).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=train.lr,
        betas=train.betas,
    )


def lr_factor(step: int, total_steps: int, train: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine (or constant)."""
    warmup = math.ceil(train.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cosine


def scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a LambdaLR, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, train)
    )
