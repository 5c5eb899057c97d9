"""Where training stands and how a run resumes: the position kept with every checkpoint,
the steps a run takes, and the checkpoint reported to Ray Train.

The data order is deterministic (fusion.data.share), so a resumed run that starts reading
at the recorded position sees exactly the batches an uninterrupted one would; a streamed
run records the shard and row it reached.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fusion.config import TrainConfig
from fusion.errors import FusionError
from fusion.train.engine import Engine

PROGRESS = "progress.json"


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


def resumable(progress: Progress, engine: Engine, world: int) -> Progress:
    """The progress a checkpoint keeps. Several workers split a stream as they ask for rows,
    so only the shards before the earliest one any worker is in are surely consumed: the
    stream restarts at that shard's start (one worker: exactly after its last row)."""
    if world == 1 or progress.stream_shard < 0:
        return progress
    earliest = engine.min_over_workers(progress.stream_shard)
    return dataclasses.replace(progress, stream_shard=earliest, stream_rows=0)


def report_checkpoint(engine: Engine, progress: Progress, metrics: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save(Path(folder), rank)
        if rank == 0:
            (Path(folder) / PROGRESS).write_text(json.dumps(progress.__dict__))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
