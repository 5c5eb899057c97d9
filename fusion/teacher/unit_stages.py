"""The Ray Data stages that write and join the stored units (see fusion.teacher.units).

``write_chunks`` commits the reader's chunks; ``ChunkLoader`` reads them back for the model
stages, marking per candidate the rows its unit still lacks; ``write_units`` commits each
candidate's columns of those rows; ``fuse_part`` joins one chunk part with every candidate's
rows by id, fuses them and commits the data set's part of the same rows.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from fusion.config import FuseConfig
from fusion.data.reader import object_array
from fusion.teacher.output import OutputError
from fusion.teacher.rows import FUSED, schema, table_to_batch, to_table
from fusion.teacher.stages import fuse_batch, node_column, write_batch
from fusion.teacher.units import ROUTING, chunk_schema, chunk_store, unit_schema, unit_store


def _summary(sidecar: dict, tokens: int, unit: str) -> dict:
    written = {s: [len(ids), total] for (s, ids), total in _totals(sidecar)}
    return {
        "unit": unit,
        "file": sidecar["file"],
        "rows": sidecar["rows"],
        "tokens": tokens,
        "shards": json.dumps(written),
    }


def _totals(sidecar: dict):
    return [((s, ids), sidecar["shard_totals"][s]) for s, ids in sidecar["ids"].items()]


def _rows(summaries: list[dict]) -> dict[str, np.ndarray]:
    """Summary rows for the driver (one per part written), as a batch."""
    keys = ("unit", "file", "rows", "tokens", "shards")
    return {
        key: np.asarray(
            [s[key] for s in summaries],
            dtype=object if key in ("unit", "file", "shards") else np.int64,
        )
        for key in keys
    }


def _tokens(batch: dict[str, np.ndarray], rows: np.ndarray | None = None) -> int:
    ids = batch["input_ids"] if rows is None else batch["input_ids"][rows]
    return int(sum(len(i) for i in ids))


def write_chunks(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Commit the reader's chunks as one part of the chunk store."""
    chunks = dict(batch)
    chunks["offsets"] = object_array([np.asarray(o).reshape(-1) for o in batch["offsets"]])
    table = to_table(chunks, chunk_schema(), 1)
    shards = [int(s) for s in batch["shard"]]
    totals = {int(s): int(t) for s, t in zip(batch["shard"], batch["shard_total"], strict=True)}
    sidecar = chunk_store(root).write_part(table, shards, totals)
    return _rows([_summary(sidecar, _tokens(batch), "chunks")])


def chunk_rows(table: pa.Table) -> dict[str, np.ndarray]:
    """A chunk part's rows as the model stages take them (offsets as ``[L, 2]``)."""
    batch = table_to_batch(table)
    batch["offsets"] = object_array([np.asarray(o).reshape(-1, 2) for o in batch["offsets"]])
    return batch


class ChunkLoader:
    """Reads parts of the chunk store and keeps the rows some unit of this run still lacks;
    ``todo.<name>`` marks, per candidate, the rows its unit needs."""

    def __init__(self, root: str, done: dict[str, set[str]]):
        self.chunks = chunk_store(root)
        self.done = done

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tables = [self.chunks.read_table(str(name)) for name in batch["file"]]
        rows = chunk_rows(pa.concat_tables(tables))
        todo = {
            name: np.asarray([row_id not in done for row_id in rows["id"]], dtype=bool)
            for name, done in self.done.items()
        }
        keep = np.logical_or.reduce(list(todo.values())) if todo else np.zeros(0, bool)
        out = {key: values[keep] for key, values in rows.items()}
        for name, needed in todo.items():
            out[f"todo.{name}"] = needed[keep]
        return out


def write_units(
    batch: dict[str, np.ndarray], root: str, names: list[str], top_k: int
) -> dict[str, np.ndarray]:
    """Commit each candidate's columns of the rows its unit lacks (one part per unit)."""
    summaries = []
    for name in names:
        rows = np.flatnonzero(batch[f"todo.{name}"])
        if not rows.size:
            continue
        table_schema = unit_schema(name, top_k)
        columns = {field.name: batch[field.name][rows] for field in table_schema}
        table = to_table(columns, table_schema, top_k)
        shards = [int(s) for s in columns["shard"]]
        totals = dict(zip(shards, (int(t) for t in columns["shard_total"]), strict=True))
        nodes = batch.get(node_column(name))
        read_on = sorted({str(n) for n in nodes[rows]}) if nodes is not None else None
        sidecar = unit_store(root, name).write_part(table, shards, totals, nodes=read_on)
        summaries.append(_summary(sidecar, _tokens(batch, rows), name))
    return _rows(summaries)


def fuse_part(
    batch: dict[str, np.ndarray],
    root: str,
    candidates: list[str],
    fuse: FuseConfig,
    mode: str,
    top_k: int,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """Join chunk parts (``chunk``) with the unit parts that hold their rows (``units``:
    JSON, name → part files) by id, fuse, and commit the data set's part of the same rows."""
    summaries = []
    for chunk_file, unit_files in zip(batch["chunk"], batch["units"], strict=True):
        rows = chunk_rows(chunk_store(root).read_table(str(chunk_file)))
        for name, files in json.loads(str(unit_files)).items():
            rows |= _unit_rows(root, name, files, rows["id"])
        fused = fuse_batch(rows, candidates, fuse, mode, vocab_size)
        table_schema = schema([*candidates, FUSED], top_k)
        written = write_batch(fused, root, table_schema, top_k, candidates, vocab_size)
        summaries.append(
            {
                "unit": FUSED,
                "file": str(written["file"][0]),
                "rows": int(written["rows"][0]),
                "tokens": int(written["tokens"][0]),
                "shards": str(written["shards"][0]),
            }
        )
    return _rows(summaries)


def _unit_rows(root: str, name: str, files: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate ``name``'s columns for the rows ``ids``, in their order, from its parts."""
    store = unit_store(root, name)
    table = pa.concat_tables([store.read_table(file) for file in files])
    position = {row_id: index for index, row_id in enumerate(table["id"].to_pylist())}
    missing = [row_id for row_id in ids if row_id not in position]
    if missing:
        raise OutputError(
            f"{store.path} lacks {len(missing)} rows of the chunks, e.g. {missing[:3]}: the "
            "unit is incomplete; run `fusion prepare` again to compute them"
        )
    taken = table.take(pa.array([position[row_id] for row_id in ids], pa.int64()))
    columns = table_to_batch(taken.drop_columns(list(ROUTING)))
    return columns
