"""The training engine: the target under DeepSpeed (ZeRO 0-3) or DDP, its optimizer and
schedule, one micro-step of the fusion objective, and its state saved and loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fusion.config import FusionConfig, TrainConfig
from fusion.train.loss import fusion_objective
from fusion.train.optim import adamw, scheduler

STATE = "state"


def deepspeed_config(train: TrainConfig) -> dict:
    """The DeepSpeed configuration of a training run."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


class Engine:
    """One interface over DeepSpeed and DDP: forward, backward, step, save, load, export.

    It runs in a Ray Train worker (``device`` from Ray) or anywhere a process group exists
    (``device`` given: the GPU check builds it without Ray).
    """

    def __init__(self, run: FusionConfig, total: int, device: torch.device | None = None):
        from transformers import AutoModelForCausalLM

        self.train = run.train
        if device is None:
            import ray.train.torch

            device = ray.train.torch.get_device()
        self.device = torch.device(device)
        self.bf16 = self.train.bf16
        zero3 = self.train.strategy == "deepspeed" and self.train.zero_stage == 3
        config = deepspeed_config(self.train)
        if zero3:  # built partitioned across the ranks: no rank ever holds the whole model
            from transformers.integrations import HfDeepSpeedConfig

            building = HfDeepSpeedConfig(config)  # read by from_pretrained while it lives
        model = AutoModelForCausalLM.from_pretrained(
            run.target.path, dtype=torch.float32, local_files_only=True
        )
        if zero3:
            del building
        else:
            model = model.to(self.device)
        if self.train.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # newer name
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
            model.config.use_cache = False
        optimizer = adamw(model, self.train)
        schedule = scheduler(optimizer, total, self.train)
        if self.train.strategy == "deepspeed":
            import deepspeed

            self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=schedule,
                dist_init_required=False,
                config=config,
            )
        else:
            self.model = _ddp(model, self.device)
            self.optimizer, self.scheduler = optimizer, schedule
        self.micro = 0

    def sum_over_workers(self, value: int) -> int:
        """``value`` summed over every worker, through a tensor on the engine's device (NCCL
        refuses CPU tensors)."""
        return self._reduce(value, "SUM")

    def min_over_workers(self, value: int) -> int:
        """The smallest of every worker's ``value`` (on the engine's device, as above)."""
        return self._reduce(value, "MIN")

    def _reduce(self, value: int, op: str) -> int:
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.long, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(total, op=getattr(dist.ReduceOp, op))
        return int(total.item())

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def micro_step(
        self,
        batch: dict[str, torch.Tensor],
        lam: float,
        teacher_precision: str,
        kd_tail: str = "renormalise",
    ):
        """Forward and backward one micro-batch; step the optimizer at accumulation boundaries.
        ``kd_tail`` 'bucket' teaches the teacher's mass outside its top-k (``batch["tail"]``).

        Returns the detached loss parts and whether the optimizer stepped.
        """
        self.micro += 1
        boundary = self.micro % self.train.accumulation == 0
        deepspeed = self.train.strategy == "deepspeed"
        sync = contextlib.nullcontext()
        if not deepspeed and not boundary and hasattr(self.model, "no_sync"):
            sync = self.model.no_sync()
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not deepspeed
        )
        with sync, autocast:
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            parts = fusion_objective(
                logits,
                batch["input_ids"],
                batch["attention_mask"],
                batch["topk_ids"],
                batch["topk_logits"],
                batch["teacher_mask"],
                lam=lam,
                teacher_precision=teacher_precision,
                tail=batch["tail"] if kd_tail == "bucket" else None,
            )
            if deepspeed:
                self.model.backward(parts.total)  # scales by 1 / accumulation itself
            else:
                (parts.total / self.train.accumulation).backward()
        if deepspeed:
            self.model.step()  # a no-op between accumulation boundaries
        elif boundary:
            if self.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts, boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, rank: int) -> None:
        if self.train.strategy == "deepspeed":
            self.model.save_checkpoint(str(folder), tag=STATE)
        elif rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                folder / f"{STATE}.pt",
            )

    def load(self, folder: Path) -> None:
        if self.train.strategy == "deepspeed":
            self.model.load_checkpoint(str(folder), tag=STATE)
            return
        state = torch.load(folder / f"{STATE}.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @contextlib.contextmanager
    def full_weights(self):
        """The complete weights on every rank for the duration (gathers ZeRO-3 partitions)."""
        if self.train.strategy == "deepspeed" and self.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                yield self.module
        else:
            yield self.module


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model wrapped for data parallelism when a process group of several ranks exists."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
