"""`fusion refuse`: fuse a prepared data set again, another way, without running any model.

The per-candidate columns of a prepared data set hold everything fusion needs (aligned top-k,
fallback marks, CEs), so MinCE/AvgCE, per-token or per-sequence, per-byte CE, the no-teacher
treatment and the set of candidates can be changed by re-fusing them into a new folder: a few
seconds where a new `fusion prepare` would run every model again. The new folder is a complete
data set (parts, commits, manifest with its own diagnostics) that `fusion train` reads as any
other; a killed run resumes part by part.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import ValidationError

from fusion.config import FuseConfig, FusionConfig
from fusion.data.chunking import encode
from fusion.data.corpus import Shard
from fusion.data.reader import object_array
from fusion.errors import FusionError
from fusion.models.loading import model_tokenizer, vocab_fingerprint, vocab_list
from fusion.teacher.contract import PrepareSummary, candidates, fingerprint, finish, summary_of
from fusion.teacher.output import OutputDir, complete_manifest
from fusion.teacher.rows import FUSED, schema, table_to_batch
from fusion.teacher.stages import fuse_batch, write_batch


class RefuseError(FusionError):
    """A data set that cannot be fused again as asked."""


def refuse(
    data_dir: str | Path,
    out_dir: str | Path,
    fuse: Mapping[str, object],
    *,
    with_target: bool | None = None,
    drop: Sequence[str] = (),
    overwrite: bool = False,
) -> PrepareSummary:
    """Fuse the candidates of the prepared data set in ``data_dir`` into ``out_dir`` with its
    ``fuse`` settings changed by ``fuse`` (e.g. ``{"method": "avg_ce"}``).
    ``with_target=False`` leaves the target's own distribution out of the candidates
    (``None`` keeps the data set's choice); ``drop`` leaves out the sources it names (their
    columns too): "without this source" from one prepare, no model run."""
    started = time.perf_counter()
    source = Path(data_dir)
    manifest = complete_manifest(source, RefuseError, "run `fusion prepare` first")
    config = FusionConfig.model_validate(manifest["config"])
    if with_target and not config.target.as_teacher:
        raise RefuseError(
            f"{source} was prepared without the target as a teacher (target.as_teacher: false); "
            "its distribution is not there to fuse"
        )
    target = config.target.model_copy(
        update={"as_teacher": config.target.as_teacher if with_target is None else with_target}
    )
    sources = [s.name for s in config.sources]
    if unknown := [name for name in drop if name not in sources]:
        raise RefuseError(
            f"--drop {', '.join(unknown)}: {source} holds no such source (its sources: "
            f"{', '.join(sources)})"
        )
    kept = [s for s in config.sources if s.name not in drop]
    if not kept:
        raise RefuseError(
            f"--drop {', '.join(drop)} leaves no source; keep at least one (a data set without "
            "sources is CLM with the target's own distribution: train with train.teacher target)"
        )
    try:
        changed = FuseConfig.model_validate(config.fuse.model_dump() | dict(fuse))
    except ValidationError as error:
        raise RefuseError(
            "; ".join(f"fuse.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        ) from None
    config = config.model_copy(
        update={
            "target": target,
            "sources": kept,
            "fuse": changed,
            "output": config.output.model_copy(update={"dir": str(out_dir)}),
        }
    )
    names = candidates(config)
    out = OutputDir(str(out_dir))
    resolved = config.model_dump(mode="json")
    done = out.manifest() if Path(out_dir).is_dir() else None
    if done is not None and done.get("fingerprint") == fingerprint(config):
        return summary_of(done, out.path, started)  # fused this way already
    out.claim(fingerprint(config), resolved, overwrite=overwrite)
    tokenizer = model_tokenizer(config.target)
    table_schema = schema([*names, FUSED], config.align.top_k)
    shards = [
        Shard(index, str(source / entry["file"]), "parquet")
        for index, entry in enumerate(manifest["files"])
    ]
    progress = out.progress()
    for shard in shards:
        if shard.index in progress.complete_shards():
            continue
        table = pq.read_table(shard.path)
        batch = table_to_batch(table)
        batch["offsets"] = object_array(
            [encode(tokenizer, str(text), False)[1] for text in batch["text"]]
        )
        batch["shard"] = [shard.index] * table.num_rows
        batch["shard_total"] = [table.num_rows] * table.num_rows
        vocab_size = len(vocab_list(tokenizer))
        fused = fuse_batch(batch, names, config.fuse, config.align.mode, vocab_size)
        write_batch(fused, out.path, table_schema, config.align.top_k, names, vocab_size)
    provenance = manifest.get("provenance") or {}
    return finish(
        out,
        config,
        out.progress(),
        shards,
        0,
        started,
        resolved,
        target_vocab=vocab_fingerprint(tokenizer),
        target_bos=manifest.get("target_bos"),
        units={name: provenance[name] for name in names if name in provenance} or None,
        chunking=manifest.get("chunking"),
    )
