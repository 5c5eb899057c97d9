"""`fusion prepare`: the Ray Data pipeline from corpus to fused, materialised teacher data.

read shards → chunk (target tokens, exact character spans) → target teacher (optional) →
per source: forward (actor pool) → align (vocabulary bridge built once per source) → fuse →
write committed Parquet parts. Completed shards are skipped on a re-run and rows of a shard
already written are filtered out right after chunking, so a killed run resumes with no
duplicated or missing ids.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable

from fusion.align import VocabBridge, detect_marker, exact_vocab_map, mined_vocab_map
from fusion.align.cache import cached_map
from fusion.align.projection import ByteProjection, build_projection
from fusion.cluster import (
    SMALL_CPU,
    check_cluster,
    cluster_maximum,
    ensure_ray,
    stage_actors,
    unused_gpus,
)
from fusion.config import FusionConfig
from fusion.data.corpus import CorpusError, Shard, plan_shards
from fusion.data.reader import ChunkStage
from fusion.errors import user_error_from
from fusion.models.loading import (
    check_models,
    model_tokenizer,
    special_tokens,
    training_bos,
    vocab_list,
)
from fusion.progress import Meter
from fusion.teacher.contract import (
    PrepareSummary,
    candidates,
    duplicate_ids,
    fingerprint,
    finish,
    summary_of,
)
from fusion.teacher.output import OutputDir, Progress
from fusion.teacher.rows import FUSED, TARGET, schema
from fusion.teacher.stages import AlignStage, ForwardStage, fuse_batch, write_batch


def build_projections(config: FusionConfig) -> dict[str, ByteProjection]:
    """One byte projection per source (``align.method: bytes``), built once in the driver
    (or read from ``align.map_cache``) and shipped to the source's actors."""
    if config.align.method != "bytes":
        return {}
    target = model_tokenizer(config.target)
    return {
        source.name: build_projection(model_tokenizer(source), target, cache=config.align.map_cache)
        for source in config.sources
    }


def build_bridges(config: FusionConfig) -> dict[str, VocabBridge]:
    """One vocabulary bridge per source, computed once in the driver and shipped to actors
    (none with ``align.method: bytes``, which needs no vocabulary map)."""
    if config.align.method == "bytes":
        return {}
    target = model_tokenizer(config.target)
    target_vocab, target_marker = vocab_list(target), detect_marker(target)
    target_specials = special_tokens(target)
    bridges = {}
    for source in config.sources:
        tokenizer = model_tokenizer(source)
        source_vocab, source_marker = vocab_list(tokenizer), detect_marker(tokenizer)
        build_map = mined_vocab_map if config.align.vocab_map == "mined" else exact_vocab_map
        mapping = cached_map(
            config.align.map_cache,
            build_map,
            source_vocab,
            target_vocab,
            source_marker=source_marker,
            target_marker=target_marker,
        )
        bridge = VocabBridge.build(
            source_vocab,
            target_vocab,
            mapping,
            source_marker=source_marker,
            target_marker=target_marker,
        )
        if config.align.mode == "clean":  # special tokens by role, not by spelling
            bridge = bridge.with_special_roles(special_tokens(tokenizer), target_specials)
        bridges[source.name] = bridge
    return bridges


def bounded_blocks(dataset, rows: int):
    """``dataset`` cut into blocks of at most ``rows`` rows, by a light task.

    A shard's chunks leave the reading stage as one block; cut, the model pools share it out
    and progress and commits come every ``rows`` rows, however large the shard. Ray Data
    gives the cutting op no resource argument and runs it as 1-CPU tasks, which a small or
    busy cluster may never place beside the actors: it reserves SMALL_CPU like the other
    light stages.
    """
    cut = dataset.repartition(target_num_rows_per_block=rows)
    cut._logical_plan.dag.ray_remote_args["num_cpus"] = SMALL_CPU
    return cut


def teacher_dataset(
    config: FusionConfig,
    shards: list[Shard],
    done: dict[int, set[str]],
    skip: dict[int, int] | None = None,
):
    """The lazy Ray Dataset of fused teacher rows for ``shards`` (rows in ``done`` skipped,
    and the first ``skip[shard]`` chunks of a shard: where a resumed stream starts)."""
    import ray

    bridges, projections = build_bridges(config), build_projections(config)
    pool = ray.data.ActorPoolStrategy
    actors = stage_actors(config, len(shards))
    descriptors = [s.descriptor() for s in shards]
    dataset = ray.data.from_items(descriptors, override_num_blocks=len(shards)).map_batches(
        ChunkStage,
        fn_constructor_kwargs={
            "data": config.data,
            "done_ids": done,
            "bos": training_bos(config),
            "skip": skip,
        }
        | reader_tokenizer(config),
        batch_size=1,
        compute=pool(size=actors["read"]),
        num_cpus=SMALL_CPU,
    )
    dataset = bounded_blocks(dataset, config.data.block_chunks)
    models = [(TARGET, config.target, config.target.actors)] if config.target.as_teacher else []
    models += [(s.name, s, s.actors) for s in config.sources]
    for name, model, count in models:
        dataset = dataset.map_batches(
            ForwardStage,
            fn_constructor_kwargs={
                "name": name,
                "model": model,
                "num_cpus": model.num_cpus,
                "num_gpus": model.num_gpus,
                "top_k": config.align.top_k,
                "mode": config.align.mode,
                "projection": projections.get(name),
            },
            batch_size=model.batch_size,
            compute=pool(size=count),
            num_cpus=model.num_cpus,
            num_gpus=model.num_gpus,
        )
        if name in bridges:
            dataset = dataset.map_batches(
                AlignStage,
                fn_constructor_kwargs={
                    "name": name,
                    "bridge": bridges[name],
                    "align": config.align,
                },
                compute=pool(size=actors[f"align:{name}"]),
                num_cpus=SMALL_CPU,
            )
    return dataset.map_batches(
        fuse_batch,
        fn_kwargs={
            "candidates": candidates(config),
            "fuse": config.fuse,
            "mode": config.align.mode,
            "vocab_size": len(vocab_list(model_tokenizer(config.target))),
        },
        num_cpus=SMALL_CPU,
    )


def reader_tokenizer(config: FusionConfig) -> dict:
    """The target's tokenizer for the readers: loaded here and shipped, or (remote code,
    whose classes a worker may not find otherwise) loaded by each reader."""
    if config.target.trust_remote_code:
        return {"load_tokenizer": functools.partial(model_tokenizer, config.target, "target")}
    return {"tokenizer": model_tokenizer(config.target, "target")}


def prepare(
    config: FusionConfig,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> PrepareSummary:
    """Run (or resume) the prepare pipeline and write the manifest when every shard is done."""
    started = time.perf_counter()
    check_models(config)
    shards = plan_shards(config.data)
    out = OutputDir(config.output.dir)
    resolved = config.model_dump(mode="json")
    out.claim(fingerprint(config), resolved, overwrite=overwrite)
    finished = out.manifest()
    if finished is not None and finished.get("fingerprint") == fingerprint(config):
        echo(f"{out.path} is complete (manifest.json); nothing to do")
        return summary_of(finished, out.path, started)
    progress = out.progress()
    complete = progress.complete_shards()
    todo = [s for s in shards if s.index not in complete]
    names = candidates(config)
    table_schema = schema([*names, FUSED], config.align.top_k)

    if todo:
        ray = ensure_ray(config)
        ray.data.DataContext.get_current().enable_progress_bars = not quiet
        if note := check_cluster(
            config, ray.cluster_resources(), shards=len(todo), maximum=cluster_maximum(config)
        ):
            echo(note)
        if note := unused_gpus(config, ray.cluster_resources()):
            echo(note)
        done = {s: ids for s, ids in progress.done_ids.items() if s not in complete}
        dataset = teacher_dataset(config, todo, done).map_batches(
            write_batch,
            fn_kwargs={
                "out_dir": out.path,
                "table_schema": table_schema,
                "top_k": config.align.top_k,
                "candidates": names,
                "vocab_size": len(vocab_list(model_tokenizer(config.target))),
            },
            batch_size=config.output.rows_per_file,
            num_cpus=SMALL_CPU,
        )
        corpus = CorpusProgress(shards, progress)
        try:
            for part in dataset.iter_rows():
                line = corpus.add(part)
                if not quiet:
                    echo(line)
        except Exception as error:
            user_error = user_error_from(error)
            if user_error is None:
                raise
            raise user_error from None
        progress = out.progress()

    unfinished = [
        s.name
        for s in shards
        if s.index in progress.shard_totals and s.index not in progress.complete_shards()
    ]
    if unfinished:
        raise RuntimeError(f"shards left incomplete after the run: {unfinished[:5]}")
    if repeated := duplicate_ids(progress):
        field = f"data.id_field {config.data.id_field!r}" if config.data.id_field else "id"
        raise CorpusError(
            f"{len(repeated)} chunk ids occur in several shards, e.g. {repeated[:3]}: two "
            f"documents share the {field}; ids must be unique: fix the corpus (or unset "
            "data.id_field) and prepare into a new output.dir"
        )
    if not progress.parts:
        raise CorpusError(
            f"data.paths {config.data.paths} yield no chunk of two or more target tokens: the "
            "corpus is empty (or every document is)"
        )
    return finish(out, config, progress, shards, len(shards) - len(todo), started, resolved)


class CorpusProgress:
    """How much of the corpus is fused: each shard counts by its bytes times the share of
    its chunks written (a shard's chunk count is known once a part of it is)."""

    def __init__(self, shards: list[Shard], earlier: Progress):
        self.sizes = {s.index: max(s.size, 1) for s in shards}
        self.total = sum(self.sizes.values())
        self.done = {s: len(ids) for s, ids in earlier.done_ids.items()}
        self.chunks = dict(earlier.shard_totals)
        self.rows = self.tokens = 0
        self.meter = Meter(self.fraction())

    def fraction(self) -> float:
        done = sum(
            self.sizes.get(s, 0) * min(1.0, self.done.get(s, 0) / total)
            for s, total in self.chunks.items()
            if total
        )
        return done / self.total

    def add(self, part: dict) -> str:
        """Count one written part (a row of the writing stage); return its progress line."""
        for shard, (count, total) in json.loads(part["shards"]).items():
            self.done[int(shard)] = self.done.get(int(shard), 0) + count
            self.chunks[int(shard)] = total
        self.rows += int(part["rows"])
        self.tokens += int(part["tokens"])
        rate = self.meter.line(self.fraction(), int(part["tokens"]))
        return (
            f"wrote {part['file']}: {part['rows']} rows · {self.rows:,} rows, {self.tokens:,} "
            f"tokens this run · {rate}"
        )
