"""What every Ray Train worker runs: the target, its optimizer, the data shard and the loss.

DeepSpeed (ZeRO 0–3) or DDP step the same objective. The data order is deterministic: each
worker reads only its own share of the materialised data set, in an order drawn from seed and
epoch (fusion.data.share). A checkpoint stores the engine state and the position in that order, so
a resumed run starts reading there and sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion.config import FusionConfig
from fusion.models.device import strict_device
from fusion.progress import Meter
from fusion.train.engine import Engine
from fusion.train.resume import Progress, report_checkpoint, resumable, total_steps


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
                report_checkpoint(engine, resumable(progress, engine, world), metrics, rank)
            # Other steps are not reported to Ray Train: a report is a round trip through the
            # controller (~1.5 s on a busy 2-core machine); metrics.jsonl has every logged step.
            window = _Window()
            tick = time.perf_counter()
        progress.epoch, progress.micro_in_epoch = epoch + 1, 0

    rows_read = engine.sum_over_workers(rows_read)  # by every worker, in this run
    if rank == 0 or (train.strategy == "deepspeed" and train.zero_stage == 3):
        _export(engine, run, progress, loop_config, rank, rows_read)


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
