"""The stored units of a prepared data set, beside the fused data set they make.

Layout of ``output.dir``:

- ``chunks/`` — the corpus cut into target-token chunks (``id``, ``domain``, ``text``,
  ``input_ids``, the target's ``offsets``, ``shard``, ``shard_total``), committed part by part,
  with ``chunks.json``: the chunking key (what fixes ids and target ids) and its status.
- ``units/<name>/`` — one teacher candidate's columns (``id``, ``shard``, ``shard_total`` and
  ``<name>.*``) for every chunk, committed part by part, with ``unit.json``: its fingerprint,
  settings, model files by hash, when it was computed, and its status.
- ``data/``, ``commits/``, ``run.json``, ``manifest.json`` — the fused data set, as readers and
  `fusion train` open it; derived from the units, so it is rewritten when the candidates change.

A unit is joined to the chunks by row id; each store resumes from its own commits.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.fs as pafs

from fusion.teacher.output import MANIFEST, RUN_FILE, OutputDir, OutputError, join
from fusion.teacher.plan import UNIT_FORMAT, chunking_difference
from fusion.teacher.rows import schema

CHUNKS = "chunks"
UNITS = "units"
CHUNKS_FILE = "chunks.json"
UNIT_FILE = "unit.json"
CHUNKS_FORMAT = "fusion-chunks/1"
ROUTING = ("id", "shard", "shard_total")


def chunk_schema() -> pa.Schema:
    """The chunk store's columns: a data row's own fields, the target's character spans
    (flat ``[start, end, ...]``) and where the chunk came from."""
    base = schema([], 1)
    return pa.schema(
        [
            *(base.field(name) for name in ("id", "domain", "text", "input_ids")),
            pa.field("offsets", pa.list_(pa.int32()), nullable=False),
            pa.field("shard", pa.int64(), nullable=False),
            pa.field("shard_total", pa.int64(), nullable=False),
        ]
    )


def unit_schema(name: str, top_k: int) -> pa.Schema:
    """Candidate ``name``'s columns of the data set, keyed by ``id`` (and its shard)."""
    fields = [f for f in schema([name], top_k) if f.name.startswith(f"{name}.")]
    routing = [f for f in chunk_schema() if f.name in ROUTING]
    return pa.schema([*routing, *fields])


def chunk_store(root: str) -> OutputDir:
    return OutputDir(join(root, CHUNKS))


def unit_store(root: str, name: str) -> OutputDir:
    return OutputDir(join(root, f"{UNITS}/{name}"))


def stored_units(out: OutputDir) -> list[str]:
    """Names of the candidate units present in ``output.dir`` (complete or not)."""
    folder = f"{out.root}/{UNITS}"
    selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
    return sorted(
        info.base_name
        for info in out.filesystem.get_file_info(selector)
        if info.type == pafs.FileType.Directory
    )


def open_output(out: OutputDir, chunking: dict, *, overwrite: bool) -> dict | None:
    """Take ``output.dir`` for this run: an empty or fusion folder whose chunks, if any, were
    cut as ``chunking`` says (``overwrite`` empties one that is not). Returns the stored
    chunks' record (None: none stored yet)."""
    record = chunk_store(out.path).read_json(CHUNKS_FILE)
    problem = None
    if record is not None:
        if difference := chunking_difference(record["key"], chunking):
            problem = (
                f"output.dir {out.path!r} holds chunks cut another way ({difference}); columns "
                "computed on different chunkings cannot be combined: prepare into another "
                "output.dir, or pass --overwrite to delete it"
            )
    elif out.read_json(RUN_FILE) is not None:
        problem = (
            f"output.dir {out.path!r} holds a run without stored units (prepared by an "
            "earlier fusion): its sources cannot be reused; prepare into another output.dir, "
            "or pass --overwrite to delete it"
        )
    elif out.filesystem.get_file_info(pafs.FileSelector(out.root, allow_not_found=True)):
        problem = (
            f"output.dir {out.path!r} is not empty and holds no fusion run; choose an "
            "empty folder, or pass --overwrite to delete its contents"
        )
    if problem is None:
        return record
    if not overwrite:
        raise OutputError(problem)
    out.filesystem.delete_dir_contents(out.root)
    return None


def start_chunks(out: OutputDir, chunking: dict) -> None:
    """Pin the chunking before any chunk is written."""
    chunks = chunk_store(out.path)
    chunks.ensure_folders()
    if chunks.read_json(CHUNKS_FILE) is None:
        record = {"format": CHUNKS_FORMAT, "key": chunking, "status": "running", "started": now()}
        chunks.write_json(CHUNKS_FILE, record)


def check_unit_chunking(name: str, record: dict, chunking: dict, root: str) -> None:
    """Refuse a unit (e.g. copied in from another machine) computed on other chunks."""
    if difference := chunking_difference(record.get("chunking", {}), chunking):
        raise OutputError(
            f"{join(root, f'{UNITS}/{name}')} was computed on chunks cut another way "
            f"({difference}); columns computed on different chunkings cannot be combined: "
            f"delete that folder to compute {name!r} again on these chunks"
        )


def start_unit(root: str, name: str, record: dict) -> None:
    """Pin a unit's fingerprint and provenance before any of its parts is written."""
    store = unit_store(root, name)
    store.ensure_folders()
    store.write_json(UNIT_FILE, {"format": UNIT_FORMAT, "name": name} | record)


def reset_fused(out: OutputDir) -> None:
    """Delete the fused data set (derived from the units): manifest first, so a kill in
    between leaves a folder no reader takes as complete."""
    for name in (MANIFEST, RUN_FILE, "data", "commits"):
        out.remove(name)


def now() -> str:
    """The time, for provenance records (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
