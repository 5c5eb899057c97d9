"""What a finished teacher data set is: its format, fingerprint, candidates and manifest.

A data set is complete when its manifest says so; the fingerprint names everything that
changes its rows, so a resumed or re-fused run can tell whether the rows on disk are its own.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import Counter
from dataclasses import dataclass

from fusion import __version__
from fusion.config import FusionConfig, SourceConfig
from fusion.data.corpus import Shard
from fusion.teacher.diagnostics import add_counts, diagnostics
from fusion.teacher.output import OutputDir, Progress
from fusion.teacher.rows import FUSED, TARGET

DATA_FORMAT = "fusion-teacher-data/3"  # /3: tail mass per distribution, NLL bytes, bytes method


@dataclass(frozen=True)
class PrepareSummary:
    """What a `fusion prepare` run left on disk."""

    output_dir: str
    rows: int
    tokens: int
    files: int
    bytes_per_token: dict[str, float]
    shards_total: int
    shards_skipped: int
    wall_seconds: float

    def line(self) -> str:
        per_source = ", ".join(f"{k} {v:.1f}" for k, v in self.bytes_per_token.items())
        return (
            f"{self.rows} rows, {self.tokens} tokens in {self.files} files "
            f"({self.shards_skipped}/{self.shards_total} shards already done); bytes per token: "
            f"{per_source}; {self.wall_seconds:.1f} s"
        )


def fingerprint(config: FusionConfig) -> str:
    """Hash of everything that changes the rows (not resources, Ray or where output goes)."""
    relevant = {
        "format": DATA_FORMAT,
        "target": config.target.model_dump(
            include={"path", "dtype", "attention", "as_teacher", "gguf_file", "bos"}
        ),
        "sources": [_source_settings(s) for s in config.sources],
        "data": config.data.model_dump(exclude={"block_chunks", "readers"}),
        "align": config.align.model_dump(exclude={"map_cache"}),
        "fuse": _fuse_settings(config),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _source_settings(source: SourceConfig) -> dict:
    """A source's settings that change its columns. ``max_length`` enters only where it is
    set, so data sets prepared before it was part of the fingerprint keep theirs."""
    settings = source.model_dump(
        include={"name", "path", "dtype", "attention", "backend", "gguf_file", "bos"}
    )
    if source.max_length is not None:
        settings["max_length"] = source.max_length
    return settings


def _fuse_settings(config: FusionConfig) -> dict:
    """The fuse settings that change the fused columns: ``window`` only under the rules that
    read it, so data sets prepared before it existed keep their fingerprint."""
    settings = config.fuse.model_dump()
    if config.fuse.granularity not in ("window", "prefix"):
        del settings["window"]
    return settings


def candidates(config: FusionConfig) -> list[str]:
    """Teacher candidates in MinCE order: the target first (when it teaches), then sources."""
    return ([TARGET] if config.target.as_teacher else []) + [s.name for s in config.sources]


def duplicate_ids(progress: Progress) -> list[str]:
    """Row ids written more than once: documents of several shards sharing an id."""
    counts = Counter(
        row_id for part in progress.parts for ids in part["ids"].values() for row_id in ids
    )
    return sorted(row_id for row_id, count in counts.items() if count > 1)


def summary_of(manifest: dict, output_dir: str, started: float) -> PrepareSummary:
    """The summary of a data set finished earlier, read from its manifest."""
    return PrepareSummary(
        output_dir=output_dir,
        rows=manifest["rows"],
        tokens=manifest["tokens"],
        files=len(manifest["files"]),
        bytes_per_token=manifest["bytes_per_token"],
        shards_total=len(manifest["shards"]),
        shards_skipped=len(manifest["shards"]),
        wall_seconds=time.perf_counter() - started,
    )


def finish(
    out: OutputDir,
    config: FusionConfig,
    progress: Progress,
    shards: list[Shard],
    skipped: int,
    started: float,
    resolved: dict,
    *,
    target_vocab: str,
    target_bos: int | None,
    units: dict[str, dict] | None = None,
    chunking: dict | None = None,
) -> PrepareSummary:
    """Write the manifest of a data set whose parts are all committed; return its summary.
    ``units`` says per candidate when and from what its columns were computed."""
    rows = sum(p["rows"] for p in progress.parts)
    tokens = sum(p["tokens"] for p in progress.parts)
    column_bytes: dict[str, int] = {}
    for part in progress.parts:
        for group, size in part["column_bytes"].items():
            column_bytes[group] = column_bytes.get(group, 0) + size
    distributions = [*candidates(config), FUSED]
    per_token = {g: column_bytes.get(g, 0) / max(tokens, 1) for g in distributions}
    counts: dict = {}
    for part in progress.parts:
        add_counts(counts, part.get("teacher_counts", {}))
    manifest = {
        "format": DATA_FORMAT,
        "status": "complete",
        "fingerprint": fingerprint(config),
        "config": resolved,
        "versions": _versions(),
        "rows": rows,
        "tokens": tokens,
        "top_k": config.align.top_k,
        "target_vocab": target_vocab,
        "target_bos": target_bos,
        "candidates": candidates(config),
        "bytes_per_token": per_token,
        "diagnostics": diagnostics(counts),
        "units": {name: unit["fingerprint"] for name, unit in (units or {}).items()} or None,
        "provenance": units,
        "chunking": chunking,
        "shards": [
            {"index": s.index, "name": s.name, "chunks": progress.shard_totals.get(s.index, 0)}
            for s in shards
        ],
        "files": [
            {k: p[k] for k in ("file", "rows", "tokens", "bytes", "sha256")}
            for p in sorted(progress.parts, key=lambda p: p["file"])
        ],
    }
    out.write_manifest(manifest)
    return PrepareSummary(
        output_dir=out.path,
        rows=rows,
        tokens=tokens,
        files=len(progress.parts),
        bytes_per_token=per_token,
        shards_total=len(shards),
        shards_skipped=skipped,
        wall_seconds=time.perf_counter() - started,
    )


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "fusion": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
    }
