"""What every Ray Train worker runs: the target, its optimizer, the data shard and the loss.

DeepSpeed (ZeRO 0–3) or DDP step the same objective. The data order is deterministic: each
worker reads only its own share of the materialised data set, in an order drawn from seed and
epoch (fusion.data.share). A checkpoint stores the engine state and the position in that order, so
a resumed run starts reading there and sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusion.config import FusionConfig, TrainConfig
from fusion.errors import FusionError
from fusion.models.device import strict_device
from fusion.progress import Meter
from fusion.train.loss import fusion_objective
from fusion.train.optim import adamw, scheduler

PROGRESS = "progress.json"
STATE = "state"


@dataclass
class Progress:
    """Where training stands: saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    tokens_seen: int = 0
    losses: list[list[float]] = field(default_factory=list)  # [step, loss] per logged step
    stream_shard: int = -1  # streamed runs: the shard of the last row trained on ...
    stream_rows: int = 0  # ... and how many of that shard's rows were trained on

    def passed(self, shards: list[int]) -> None:
        """Move the stream position over rows (their shards, in stream order)."""
        for shard in shards:
            if shard == self.stream_shard:
                self.stream_rows += 1
            else:
                self.stream_shard, self.stream_rows = shard, 1

    @classmethod
    def load(cls, folder: Path) -> Progress:
        return cls(**json.loads((folder / PROGRESS).read_text()))


def total_steps(train: TrainConfig, rows: int | None) -> int:
    """Optimizer steps of the run: whole global batches per epoch, or max_steps.

    A streamed run (``rows=None``) does not know its size in advance: max_steps sets it.
    """
    if rows is None:
        return train.max_steps
    per_epoch = (rows // (train.micro_batch_size * train.num_workers)) // train.accumulation
    if per_epoch == 0:
        raise FusionError(
            f"the data set has {rows} rows, fewer than one global batch of "
            f"{train.global_batch_size}: lower train.global_batch_size"
        )
    steps = per_epoch * train.epochs
    return min(steps, train.max_steps) if train.max_steps else steps


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


class HeldOut:
    """The held-out corpora of ``train.eval_data``, scored with the model being trained."""

    def __init__(self, run: FusionConfig):
        from fusion.models.loading import model_tokenizer
        from fusion.models.scoring import read_texts

        self.tokenizer = model_tokenizer(run.target)
        self.texts = {domain: read_texts(path) for domain, path in run.train.eval_data.items()}
        self.max_length = run.train.eval_max_length
        self.gathers = run.train.strategy == "deepspeed" and run.train.zero_stage == 3

    def due(self, step: int, every: int | None, finished: bool) -> bool:
        return bool(self.texts) and (finished or (every is not None and step % every == 0))

    def metrics(self, engine: Engine, rank: int) -> dict:
        """``eval_bpb`` per domain and ``eval_avg_bpb`` (rank 0; ZeRO-3 ranks all take part)."""
        from fusion.models.scoring import score, summarise

        if rank != 0 and not self.gathers:
            return {}
        with engine.full_weights() as module:
            module.eval()
            scores = {
                domain: score([module], self.tokenizer, texts, max_length=self.max_length)
                for domain, texts in self.texts.items()
            }
            module.train()
        summary = summarise(scores)
        return {"eval_bpb": summary["bpb"], "eval_avg_bpb": summary["avg_bpb"]}


@dataclass
class _Window:
    """Loss sums (this worker's) and tokens (all workers') since the last logged step."""

    loss: float = 0.0
    clm: float = 0.0
    fusion: float = 0.0
    tokens: int = 0
    micro: int = 0

    def add(self, parts) -> None:
        self.loss += parts.total.item()
        self.clm += parts.clm.item()
        self.fusion += parts.fusion.item()
        self.micro += 1

    def means(self) -> dict[str, float]:
        n = max(self.micro, 1)
        return {"loss": self.loss / n, "clm_loss": self.clm / n, "fusion_loss": self.fusion / n}


def _log_line(progress: Progress, total: int, metrics: dict, meter: Meter) -> str:
    line = (
        f"step {progress.step}/{total}  loss {metrics['loss']:.4f}  clm {metrics['clm_loss']:.4f}  "
        f"fusion {metrics['fusion_loss']:.4f}  lr {metrics['lr']:.2e}  "
        f"{metrics['tokens_per_s']:,.0f} tok/s  {meter.left(progress.step / total)} left"
    )
    if "eval_avg_bpb" in metrics:
        line += f"  held-out bpb {metrics['eval_avg_bpb']:.4f}"
    return line


def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train entry point (``loop_config``: run config, row count, storage, quiet,
    and ``strict_device``: hold the loop to the GPU rule on any machine, see
    fusion.models.device)."""
    import ray.train.torch

    if not loop_config.get("strict_device"):
        return _train(loop_config)
    with strict_device(ray.train.torch.get_device()):
        return _train(loop_config)


def _train(loop_config: dict) -> None:
    import ray.data
    import ray.train

    from fusion.data.share import DataFile, WorkerShare
    from fusion.train.batches import collate, teacher_columns  # pyarrow: not needed by the engine

    ray.data.DataContext.get_current().enable_progress_bars = False  # the step lines report
    run = FusionConfig.model_validate(loop_config["run"])
    train = run.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(train.seed)
    if not train.use_gpu:  # a CPU worker computes with as many threads as CPUs it reserved
        torch.set_num_threads(train.cpu_threads or max(1, int(train.cpus_per_worker)))
    total = total_steps(train, loop_config["rows"])
    files = [DataFile(f["path"], f["rows"]) for f in loop_config["files"] or []]
    engine = Engine(run, total)
    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            engine.load(Path(folder))
            progress = Progress.load(Path(folder))
    metrics_file = Path(loop_config["storage"]) / "metrics.jsonl"
    held_out = HeldOut(run)
    if held_out.texts and progress.step == 0:
        start = {"step": 0, "tokens_seen": 0, **held_out.metrics(engine, rank)}
        if rank == 0:
            with metrics_file.open("a") as stream:
                stream.write(json.dumps(start) + "\n")
    streamed = loop_config["rows"] is None
    bos = loop_config["bos"]  # the target reads (and so trains on) its text after this BOS
    micro = train.micro_batch_size
    usable_micro = (
        float("inf")
        if streamed
        else (loop_config["rows"] // (micro * world)) // train.accumulation * train.accumulation
    )
    columns = teacher_columns(train.teacher)
    window, step_tokens, rows_read = _Window(), 0, 0
    tick = time.perf_counter()
    meter = Meter(progress.step / max(total, 1))  # time left, at this run's pace

    for epoch in range(progress.epoch, train.epochs):
        if progress.step >= total:
            break
        if streamed:  # split between the workers, in corpus order, from the checkpoint's position
            batches = ray.train.get_dataset_shard("train").iter_batches(
                batch_size=micro, batch_format="pyarrow", drop_last=True
            )
        else:  # this worker's share only, from its recorded position on
            share = WorkerShare(files, rank=rank, world=world, seed=train.seed)
            batches = share.batches(
                epoch, micro, skip=progress.micro_in_epoch * micro, columns=columns
            )
        for index, mine in enumerate(batches, start=progress.micro_in_epoch):
            if index >= usable_micro or progress.step >= total:
                break
            rows_read += len(mine)
            if streamed:
                progress.passed(mine["shard"].to_pylist())
            batch = {
                k: v.to(engine.device)
                for k, v in collate(
                    mine, train.teacher, mask_fallback=train.mask_fallback, bos=bos
                ).items()
            }
            parts, stepped = engine.micro_step(
                batch, train.lam, train.teacher_precision, train.kd_tail
            )
            window.add(parts)
            step_tokens += int(batch["attention_mask"].sum())
            progress.micro_in_epoch = index + 1
            if not stepped:
                continue
            progress.step += 1
            tokens = engine.sum_over_workers(step_tokens)  # every worker's tokens of the step
            progress.tokens_seen += tokens
            window.tokens += tokens
            step_tokens = 0
            finished = progress.step >= total or (
                progress.micro_in_epoch >= usable_micro and epoch + 1 == train.epochs
            )
            evaluate = held_out.due(progress.step, train.eval_every, finished)
            if (
                progress.step % train.log_every
                and progress.step % train.checkpoint_every
                and not finished
                and not evaluate
            ):
                continue
            elapsed = time.perf_counter() - tick
            metrics = {
                "step": progress.step,
                "epoch": epoch,
                **window.means(),
                "lr": engine.lr(),
                "tokens_seen": progress.tokens_seen,
                "tokens_per_s": window.tokens / max(elapsed, 1e-9),
            }
            if evaluate:
                metrics |= held_out.metrics(engine, rank)
            progress.losses.append([progress.step, metrics["loss"]])
            if rank == 0:
                with metrics_file.open("a") as stream:
                    stream.write(json.dumps(metrics) + "\n")
                if not loop_config["quiet"]:
                    print(_log_line(progress, total, metrics, meter), flush=True)
            if progress.step % train.checkpoint_every == 0 or finished:
                if progress.micro_in_epoch >= usable_micro:
                    progress.epoch, progress.micro_in_epoch = epoch + 1, 0
                _report_with_checkpoint(engine, _resumable(progress, engine, world), metrics, rank)
            # Other steps are not reported to Ray Train: a report is a round trip through the
            # controller (~1.5 s on a busy 2-core machine); metrics.jsonl has every logged step.
            window = _Window()
            tick = time.perf_counter()
        progress.epoch, progress.micro_in_epoch = epoch + 1, 0

    rows_read = engine.sum_over_workers(rows_read)  # by every worker, in this run
    if rank == 0 or (train.strategy == "deepspeed" and train.zero_stage == 3):
        _export(engine, run, progress, loop_config, rank, rows_read)


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model wrapped for data parallelism when a process group of several ranks exists."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _resumable(progress: Progress, engine: Engine, world: int) -> Progress:
    """The progress a checkpoint keeps. Several workers split a stream as they ask for rows,
    so only the shards before the earliest one any worker is in are surely consumed: the
    stream restarts at that shard's start (one worker: exactly after its last row)."""
    if world == 1 or progress.stream_shard < 0:
        return progress
    earliest = engine.min_over_workers(progress.stream_shard)
    return dataclasses.replace(progress, stream_shard=earliest, stream_rows=0)


def _report_with_checkpoint(engine: Engine, progress: Progress, metrics: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save(Path(folder), rank)
        if rank == 0:
            (Path(folder) / PROGRESS).write_text(json.dumps(progress.__dict__))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _export(
    engine: Engine,
    run: FusionConfig,
    progress: Progress,
    loop_config: dict,
    rank: int,
    rows_read: int,
) -> None:
    from fusion.train.export import export_model

    with engine.full_weights() as module:
        if rank == 0:
            export_model(
                module,
                run,
                progress,
                Path(loop_config["export_dir"]),
                loop_config["dataset"] | {"rows_read_this_run": rows_read},
            )
