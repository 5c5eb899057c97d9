"""`fusion run`: the prepare pipeline streamed straight into training, no intermediate files.

The fused teacher rows flow from the Ray Data pipeline to the training workers as they are
made; model actors and training workers share the cluster, so their CPU and GPU requests are
checked together up front. The number of rows is not known before the stream ends, so
``train.max_steps`` sets the schedule. Resuming continues from the latest checkpoint's weights,
optimizer and step, and the stream starts at the checkpoint's position: shards consumed before
it are never read again and no model reads their rows again. The stream keeps corpus order,
so with one training worker the position is exact (shard, rows of it) and a resumed run
trains on exactly the rows an uninterrupted one would; several workers take rows as they ask
for them, so the stream restarts at the earliest shard any worker was in and some rows around
the resume point may be seen twice — for an exact resume there, materialise with
`fusion prepare` and `fusion train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa

from fusion.cluster import (
    SMALL_CPU,
    check_cluster,
    cluster_maximum,
    ensure_ray,
    total,
    training_demand,
    unused_gpus,
)
from fusion.config import ConfigError, FusionConfig
from fusion.data.corpus import plan_shards
from fusion.models.loading import check_models, training_bos
from fusion.teacher.contract import candidates
from fusion.teacher.pipeline import teacher_dataset
from fusion.teacher.rows import FUSED, schema, to_table
from fusion.train.batches import teacher_columns
from fusion.train.resume import Progress
from fusion.train.trainer import RUN_NAME, TrainSummary, fit, storage_dir, train_settings


def stream_position(config: FusionConfig) -> tuple[int | None, int]:
    """Where the latest checkpoint of this run's storage left the stream: the shard and how
    many of its rows were trained on; (None, 0) when there is nothing to resume."""
    import ray.train

    run_dir = storage_dir(config) / RUN_NAME
    if train_settings(config).resume != "auto" or not run_dir.is_dir():
        return None, 0
    try:
        checkpoint = ray.train.Result.from_path(str(run_dir)).checkpoint
    except RuntimeError:  # a run killed before its first checkpoint
        return None, 0
    if checkpoint is None:
        return None, 0
    with checkpoint.as_directory() as folder:
        progress = Progress.load(Path(folder))
    return (
        (progress.stream_shard, progress.stream_rows) if progress.stream_shard >= 0 else (None, 0)
    )


def run(config: FusionConfig, *, quiet: bool = False) -> TrainSummary:
    """Stream fused teacher rows into the trainer; return where the HF export went."""
    train = train_settings(config)
    if train.max_steps is None:
        raise ConfigError(
            "train.max_steps: required by `fusion run`, which cannot count its rows before the "
            "stream ends (`fusion estimate` predicts the tokens)"
        )
    if train.lam == "auto":
        raise ConfigError(
            "train.lam: 'auto' reads the teacher's fidelity from a prepared data set's manifest, "
            "which `fusion run` (streaming) has not yet written: set a number, or `fusion "
            "prepare` then `fusion train`"
        )
    if train.epochs != 1:
        raise ConfigError(
            "train.epochs: `fusion run` reads the corpus once; for several epochs, materialise "
            "with `fusion prepare` and use `fusion train`"
        )
    config = config.model_copy(update={"train": train})
    check_models(config)
    shards = plan_shards(config.data)
    ray = ensure_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    workers = total([training_demand(config)])
    maximum = cluster_maximum(config)
    if note := check_cluster(
        config, ray.cluster_resources(), also=workers, shards=len(shards), maximum=maximum
    ):
        print(note, file=sys.stderr)
    if note := unused_gpus(config, ray.cluster_resources()):
        print(note, file=sys.stderr)
    teacher = train.teacher
    if teacher not in [*candidates(config), FUSED]:
        raise ConfigError(
            f"train.teacher: {teacher!r} is not one of {[*candidates(config), FUSED]}"
        )
    full = schema([*candidates(config), FUSED], config.align.top_k)
    rows_schema = pa.schema(
        [full.field(name) for name in teacher_columns(teacher)] + [pa.field("shard", pa.int64())]
    )
    shard, rows = stream_position(config)
    if shard is not None:
        print(f"resuming the stream at shard {shard}, after its first {rows} rows", file=sys.stderr)
        shards = [s for s in shards if s.index >= shard]
    # Training reads row-contract Arrow tables with only the columns it needs (and the shard,
    # for its position in the stream).
    dataset = teacher_dataset(config, shards, {}, skip={shard: rows} if rows else None).map_batches(
        to_table,
        fn_kwargs={"table_schema": rows_schema, "top_k": config.align.top_k},
        num_cpus=SMALL_CPU,
    )
    info = {"path": f"streamed from {config.data.paths}", "rows": None, "tokens": None}
    bos = training_bos(config)
    return fit(config, dataset, bos=bos, dataset_info=info, quiet=quiet)
