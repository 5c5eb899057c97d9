"""`fusion prepare`: from corpus to fused, materialised teacher data, one unit at a time.

Three passes, each a Ray Data pipeline that commits part by part and resumes from its
commits: chunk (read shards → target-token chunks, stored once), teach (stored chunks →
each missing candidate's model actors → align → its unit's columns), fuse (the chunks joined
with every candidate's unit by id → MinCE/AvgCE → the data set's parts). A unit whose
fingerprint is unchanged is reused: a config that adds a source runs only that source's
model, one that drops a source runs none, one that changes a source runs it again alone
(see fusion.teacher.units for the layout). ``teacher_dataset`` is the same stages streamed
from the corpus without disk, for `fusion train` without a prepared data set.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence

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
from fusion.config.models import ModelConfig
from fusion.data.corpus import CorpusError, Shard, plan_shards
from fusion.data.reader import ChunkStage
from fusion.errors import FusionError, user_error_from
from fusion.models.loading import check_models, special_tokens, vocab_list
from fusion.progress import Meter
from fusion.teacher.contract import (
    PrepareSummary,
    duplicate_ids,
    fingerprint,
    finish,
    summary_of,
)
from fusion.teacher.output import RUN_FILE, OutputDir, Progress
from fusion.teacher.plan import (
    RunPlan,
    chunking_key,
    model_files,
    resolve,
    unit_fingerprint,
    unit_settings,
)
from fusion.teacher.rows import TARGET
from fusion.teacher.stages import AlignStage, ForwardStage, fuse_batch
from fusion.teacher.unit_stages import ChunkLoader, fuse_part, write_chunks, write_units
from fusion.teacher.units import (
    CHUNKS,
    CHUNKS_FILE,
    UNIT_FILE,
    UNITS,
    check_unit_chunking,
    chunk_store,
    now,
    open_output,
    reset_fused,
    start_chunks,
    start_unit,
    unit_store,
)
from fusion.teacher.watch import NodeWatch, watched


class PrepareError(FusionError):
    """A prepare that cannot run as asked (e.g. ``--only`` a model the config lacks)."""


def build_projections(
    plan: RunPlan, names: Sequence[str] | None = None
) -> dict[str, ByteProjection]:
    """One byte projection per source in ``names`` (default: all; ``align.method: bytes``),
    built once in the driver (or read from ``align.map_cache``) and shipped to its actors."""
    config = plan.config
    if config.align.method != "bytes":
        return {}
    return {
        name: build_projection(
            source.tokenizer, plan.target.tokenizer, cache=config.align.map_cache
        )
        for name, source in plan.sources.items()
        if names is None or name in names
    }


def build_bridges(plan: RunPlan, names: Sequence[str] | None = None) -> dict[str, VocabBridge]:
    """One vocabulary bridge per source in ``names`` (default: all), computed once in the
    driver and shipped to actors (none with ``align.method: bytes``, which needs no map)."""
    config = plan.config
    if config.align.method == "bytes":
        return {}
    target = plan.target.tokenizer
    target_vocab, target_marker = vocab_list(target), detect_marker(target)
    target_specials = special_tokens(target)
    bridges = {}
    for name, source in plan.sources.items():
        if names is not None and name not in names:
            continue
        tokenizer = source.tokenizer
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
        bridges[name] = bridge
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


def narrowed(config: FusionConfig, names: Sequence[str]) -> FusionConfig:
    """``config`` with only the candidates ``names`` as teachers: what a pass that computes
    those alone places on the cluster."""
    return config.model_copy(
        update={
            "target": config.target.model_copy(update={"as_teacher": TARGET in names}),
            "sources": [s for s in config.sources if s.name in names],
        }
    )


def model_stages(dataset, plan: RunPlan, names: Sequence[str], shards: int | None = None):
    """``dataset`` (chunk rows) through the model actors of candidates ``names``, each
    source's columns moved into target ids (by its align stage or its own projection)."""
    config = narrowed(plan.config, names)
    bridges, projections = build_bridges(plan, names), build_projections(plan, names)
    import ray

    pool = ray.data.ActorPoolStrategy
    actors = stage_actors(config, shards)
    models = [(TARGET, config.target)] if TARGET in names else []
    models += [(s.name, s) for s in config.sources]
    for name, model in models:
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
            compute=pool(**model.pool_sizes()),
            num_cpus=model.num_cpus,
            num_gpus=model.num_gpus,
            **placement_args(model),
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
    return dataset


def placement_args(model: ModelConfig) -> dict:
    """The Ray options that place a model's actors on the nodes its config names."""
    args: dict = {}
    if model.resources:
        args["resources"] = dict(model.resources)
    if model.accelerator_type is not None:
        args["accelerator_type"] = model.accelerator_type
    return args


def chunk_dataset(
    plan: RunPlan,
    shards: list[Shard],
    done: dict[int, set[str]],
    skip: dict[int, int] | None = None,
):
    """The lazy Ray Dataset of ``shards``' chunk rows (rows in ``done`` skipped, and the first
    ``skip[shard]`` chunks of a shard: where a resumed stream starts)."""
    import ray

    config = plan.config
    descriptors = [s.descriptor() for s in shards]
    return ray.data.from_items(descriptors, override_num_blocks=len(shards)).map_batches(
        ChunkStage,
        fn_constructor_kwargs={
            "data": config.data,
            "done_ids": done,
            "bos": plan.target_bos,
            "skip": skip,
        }
        | reader_tokenizer(plan),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=stage_actors(config, len(shards))["read"]),
        num_cpus=SMALL_CPU,
    )


def teacher_dataset(
    config: FusionConfig,
    shards: list[Shard],
    done: dict[int, set[str]],
    skip: dict[int, int] | None = None,
):
    """The lazy Ray Dataset of fused teacher rows for ``shards``, streamed from the corpus
    (rows in ``done`` skipped, and the first ``skip[shard]`` chunks of a shard)."""
    plan = resolve(config)
    dataset = bounded_blocks(chunk_dataset(plan, shards, done, skip), config.data.block_chunks)
    dataset = model_stages(dataset, plan, plan.candidates, len(shards))
    return dataset.map_batches(
        fuse_batch,
        fn_kwargs={
            "candidates": plan.candidates,
            "fuse": config.fuse,
            "mode": config.align.mode,
            "vocab_size": plan.vocab_size,
        },
        num_cpus=SMALL_CPU,
    )


def reader_tokenizer(plan: RunPlan) -> dict:
    """The target's tokenizer for the readers: the plan's, shipped, or (remote code, whose
    classes a worker may not find otherwise) loaded by each reader."""
    from fusion.models.loading import model_tokenizer

    if plan.config.target.trust_remote_code:
        return {"load_tokenizer": functools.partial(model_tokenizer, plan.config.target, "target")}
    return {"tokenizer": plan.target.tokenizer}


def prepare(
    config: FusionConfig,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    only: Sequence[str] = (),
) -> PrepareSummary | None:
    """Run (or resume) the prepare passes and write the manifest when the data set is fused.

    ``only`` computes just the units of those candidates (and the chunks, if not stored yet)
    and fuses nothing: each source's job can run apart, the fusion once all are there.
    Returns the data set's summary, or None after an ``only`` run.
    """
    started = time.perf_counter()
    plan = resolve(config, check_models(config))
    if unknown := [name for name in only if name not in plan.candidates]:
        raise PrepareError(
            f"--only {', '.join(unknown)}: not a teacher of this config (its candidates: "
            f"{', '.join(plan.candidates)})"
        )
    shards = plan_shards(config.data)
    chunking = chunking_key(plan, shards)
    out = OutputDir(config.output.dir)
    wanted = list(only) or plan.candidates
    finished = None if only else out.manifest()
    if finished is not None and finished.get("fingerprint") == fingerprint(config):
        stored = finished.get("units")
        if stored is None or stored == _fingerprints(plan, chunking, out, wanted):
            echo(f"{out.path} is complete (manifest.json); nothing to do")
            return summary_of(finished, out.path, started)
    record = open_output(out, chunking, overwrite=overwrite)
    units = {name: _open_unit(plan, chunking, out, name, echo) for name in wanted}
    run = Pass(plan, out, quiet, echo)
    skipped = len(shards)
    if record is None or record.get("status") != "complete":
        skipped = run.chunks(shards, chunking)
    if missing := [name for name, unit in units.items() if unit["status"] != "complete"]:
        run.units(missing, units)
    if only:
        _echo_units(out, plan, echo)
        return None
    return run.fuse(shards, units, skipped, started)


def _fingerprints(plan: RunPlan, chunking: dict, out: OutputDir, names: list[str]) -> dict:
    """The fingerprint each candidate's unit would have now (hashes reused from its record)."""
    result = {}
    for name in names:
        record = unit_store(out.path, name).read_json(UNIT_FILE) or {}
        model = plan.model(name)
        files = model_files(model.model, model.field, record.get("files"))
        result[name] = unit_fingerprint(chunking, unit_settings(plan, name), files)
    return result


def _open_unit(plan: RunPlan, chunking: dict, out: OutputDir, name: str, echo) -> dict:
    """Candidate ``name``'s unit record: the stored one when it is still this config's own,
    else a new one (a changed unit's columns are deleted: they are computed again)."""
    store = unit_store(out.path, name)
    record = store.read_json(UNIT_FILE)
    if record is not None:
        check_unit_chunking(name, record, chunking, out.path)
    model = plan.model(name)
    files = model_files(model.model, model.field, (record or {}).get("files"))
    settings = unit_settings(plan, name)
    unit_id = unit_fingerprint(chunking, settings, files)
    if record is not None and record.get("fingerprint") == unit_id:
        return record
    if record is not None:
        changed = [key for key in settings if record.get("settings", {}).get(key) != settings[key]]
        if {n: e["sha256"] for n, e in record.get("files", {}).items()} != {
            n: e["sha256"] for n, e in files.items()
        }:
            changed.append(f"files of {model.model.path}")
        echo(
            f"{name}: changed since its columns were computed ({', '.join(changed)}); "
            "computing them again"
        )
        out.remove(f"{UNITS}/{name}")
    record = {
        "fingerprint": unit_id,
        "status": "running",
        "model": model.model.path,
        "settings": settings,
        "files": files,
        "chunking": chunking,
        "started": now(),
    }
    start_unit(out.path, name, record)
    return record


def _echo_units(out: OutputDir, plan: RunPlan, echo) -> None:
    """Which of the config's units are complete, and what is left to do."""
    complete, missing = [], []
    for name in plan.candidates:
        record = unit_store(out.path, name).read_json(UNIT_FILE)
        (complete if record and record.get("status") == "complete" else missing).append(name)
    echo(
        f"units complete: {', '.join(complete) or 'none'}; missing: {', '.join(missing) or 'none'}"
    )
    if not missing:
        echo("every unit is there: `fusion prepare` with the whole config fuses them")


class Pass:
    """The three passes of one prepare, on the same output folder and Ray session."""

    def __init__(self, plan: RunPlan, out: OutputDir, quiet: bool, echo):
        self.plan, self.out, self.quiet, self.echo = plan, out, quiet, echo
        self._ray = None
        self._watch: NodeWatch | None = None

    def ray(self, names: Sequence[str], shards: int):
        """The Ray session, with a note where the cluster cannot hold what this pass asks."""
        ray = self._ray or ensure_ray(self.plan.config)
        self._ray = ray
        ray.data.DataContext.get_current().enable_progress_bars = not self.quiet
        config = narrowed(self.plan.config, names)
        available = ray.cluster_resources()
        maximum = cluster_maximum(config)
        if note := check_cluster(config, available, shards=shards, maximum=maximum):
            self.echo(note)
        if note := unused_gpus(config, available):
            self.echo(note)
        # a fixed cluster that loses the only nodes a model fits on would wait forever
        self._watch = NodeWatch(config, ray.nodes) if names and maximum is None else None
        return ray

    def _drain(self, dataset, counter: Callable[[dict], str]) -> None:
        """Run ``dataset`` to its end, a progress line per part written."""
        rows = dataset.iter_rows()
        if self._watch is not None:
            rows = watched(rows, self._watch.check)
        try:
            for part in rows:
                line = counter(part)
                if not self.quiet:
                    self.echo(line)
        except Exception as error:
            user_error = user_error_from(error)
            if user_error is None:
                raise
            raise user_error from None

    def chunks(self, shards: list[Shard], chunking: dict) -> int:
        """Cut the corpus into chunks and commit them (resuming from earlier commits);
        return how many shards an earlier run had cut already."""
        config, out = self.plan.config, self.out
        start_chunks(out, chunking)
        store = chunk_store(out.path)
        progress = store.progress()
        complete = progress.complete_shards()
        if todo := [s for s in shards if s.index not in complete]:
            self.ray([], len(todo))
            done = {s: ids for s, ids in progress.done_ids.items() if s not in complete}
            dataset = chunk_dataset(self.plan, todo, done).map_batches(
                write_chunks,
                fn_kwargs={"root": out.path},
                batch_size=config.output.rows_per_file,
                num_cpus=SMALL_CPU,
            )
            self._drain(dataset, CorpusProgress(shards, progress, CHUNKS).add)
            progress = store.progress()
        _check_chunks(config, shards, progress)
        record = store.read_json(CHUNKS_FILE) or {}
        record |= {
            "status": "complete",
            "completed": now(),
            "rows": sum(p["rows"] for p in progress.parts),
            "tokens": sum(p["tokens"] for p in progress.parts),
        }
        store.write_json(CHUNKS_FILE, record)
        return len(shards) - len(todo)

    def units(self, names: list[str], records: dict[str, dict]) -> None:
        """Compute the columns of candidates ``names`` over the stored chunks, one pass."""
        config, out = self.plan.config, self.out
        chunks = chunk_store(out.path).progress()
        done = {name: _ids(unit_store(out.path, name).progress()) for name in names}
        files = [
            part["file"]
            for part in sorted(chunks.parts, key=lambda p: p["file"])
            if any(not set(_part_ids(part)) <= done[name] for name in names)
        ]
        for name in names:
            if done[name]:
                self.echo(
                    f"{UNITS}/{name}: {len(done[name]):,} rows committed by an earlier run; "
                    f"computing the other {len(_ids(chunks) - done[name]):,}"
                )
        if files:
            ray = self.ray(names, len(files))
            dataset = ray.data.from_items(
                [{"file": f} for f in files], override_num_blocks=len(files)
            ).map_batches(
                ChunkLoader,
                fn_constructor_kwargs={"root": out.path, "done": done},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(
                    size=stage_actors(narrowed(config, names), len(files))["read"]
                ),
                num_cpus=SMALL_CPU,
            )
            dataset = bounded_blocks(dataset, config.data.block_chunks)
            dataset = model_stages(dataset, self.plan, names, len(files)).map_batches(
                write_units,
                fn_kwargs={"root": out.path, "names": names, "top_k": config.align.top_k},
                batch_size=config.output.rows_per_file,
                num_cpus=SMALL_CPU,
            )
            total = sum(p["rows"] for p in chunks.parts) * len(names)
            self._drain(dataset, RowProgress(total, sum(map(len, done.values()))).add)
        every = _ids(chunks)
        for name in names:
            store = unit_store(out.path, name)
            progress = store.progress()
            have = _ids(progress)
            if lacking := every - have:
                raise RuntimeError(
                    f"{name}: {len(lacking)} rows left without columns after the run"
                )
            nodes = sorted({node for part in progress.parts for node in part.get("nodes", [])})
            records[name] |= {
                "status": "complete",
                "completed": now(),
                "rows": len(have),
                "nodes": nodes,
            }
            store.write_json(UNIT_FILE, store.read_json(UNIT_FILE) | records[name])

    def fuse(
        self, shards: list[Shard], units: dict[str, dict], skipped: int, started: float
    ) -> PrepareSummary:
        """Fuse every chunk with its candidates' units into the data set; write the manifest."""
        config, out, plan = self.plan.config, self.out, self.plan
        resolved = config.model_dump(mode="json")
        unit_ids = {name: units[name]["fingerprint"] for name in plan.candidates}
        pin = {"fingerprint": fingerprint(config), "units": unit_ids}
        earlier = out.read_json(RUN_FILE) or {}
        if {k: earlier.get(k) for k in pin} != pin:
            reset_fused(out)
            out.ensure_folders()
            out.write_json(RUN_FILE, pin | {"config": resolved})
        fused = {part["file"] for part in out.progress().parts}
        chunks = chunk_store(out.path).progress()
        where = {
            name: _locations(unit_store(out.path, name).progress()) for name in plan.candidates
        }
        jobs = [
            {
                "chunk": part["file"],
                "units": json.dumps(
                    {
                        name: sorted({where[name][row] for row in _part_ids(part)})
                        for name in plan.candidates
                    }
                ),
            }
            for part in sorted(chunks.parts, key=lambda p: p["file"])
            if part["file"] not in fused
        ]
        if jobs:
            ray = self.ray([], len(jobs))
            dataset = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
                fuse_part,
                fn_kwargs={
                    "root": out.path,
                    "candidates": plan.candidates,
                    "fuse": config.fuse,
                    "mode": config.align.mode,
                    "top_k": config.align.top_k,
                    "vocab_size": plan.vocab_size,
                },
                batch_size=1,
                num_cpus=SMALL_CPU,
            )
            self._drain(dataset, CorpusProgress(shards, out.progress(), "").add)
        provenance = {
            name: {
                key: units[name].get(key)
                for key in (
                    "fingerprint",
                    "model",
                    "started",
                    "completed",
                    "rows",
                    "settings",
                    "nodes",
                )
            }
            | {"files": {n: e["sha256"] for n, e in units[name]["files"].items()}}
            for name in plan.candidates
        }
        chunk_record = chunk_store(out.path).read_json(CHUNKS_FILE) or {}
        return finish(
            out,
            config,
            out.progress(),
            shards,
            skipped,
            started,
            resolved,
            target_vocab=plan.target_vocab,
            target_bos=plan.target_bos,
            units=provenance,
            chunking=chunk_record.get("key"),
        )


def _part_ids(part: dict) -> list[str]:
    return [row for ids in part["ids"].values() for row in ids]


def _ids(progress: Progress) -> set[str]:
    return {row for part in progress.parts for row in _part_ids(part)}


def _locations(progress: Progress) -> dict[str, str]:
    """Row id → the part file that holds it."""
    return {row: part["file"] for part in progress.parts for row in _part_ids(part)}


def _check_chunks(config: FusionConfig, shards: list[Shard], progress: Progress) -> None:
    """Every shard complete, ids unique across shards, and some chunk at all."""
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


class RowProgress:
    """How many rows of the units this pass computes are written."""

    def __init__(self, total: int, done: int):
        self.total, self.done = max(total, 1), done
        self.rows = self.tokens = 0
        self.meter = Meter(done / self.total)

    def add(self, part: dict) -> str:
        self.done += int(part["rows"])
        self.rows += int(part["rows"])
        self.tokens += int(part["tokens"])
        rate = self.meter.line(min(1.0, self.done / self.total), int(part["tokens"]))
        return (
            f"wrote {UNITS}/{part['unit']}/{part['file']}: {part['rows']} rows · "
            f"{self.rows:,} rows, {self.tokens:,} tokens this run · {rate}"
        )


class CorpusProgress:
    """How much of the corpus is fused: each shard counts by its bytes times the share of
    its chunks written (a shard's chunk count is known once a part of it is)."""

    def __init__(self, shards: list[Shard], earlier: Progress, store: str):
        self.store = f"{store}/" if store else ""
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
            f"wrote {self.store}{part['file']}: {part['rows']} rows · {self.rows:,} rows, "
            f"{self.tokens:,} tokens this run · {rate}"
        )
