"""The row contract (design §2) as an Arrow schema, and batches turned into Arrow tables.

One row per chunk, real tokens only: ``id``, ``domain``, ``text``, ``input_ids`` (int32), per
distribution ``<name>.topk_ids`` (list of fixed-size lists of int32, target ids, -1 unused),
``<name>.topk_logits`` (float16, -inf unused) and ``<name>.tail`` (list of float16: the
probability outside the stored top-k); per candidate ``<name>.ce`` (mean next-token NLL per
token of its own tokenization), ``<name>.nll`` (their sum, nats) and ``<name>.nll_bytes`` (the
UTF-8 bytes those tokens cover); per
source ``<name>.aligned`` (list of bool: the position holds the source's own aligned
distribution, not the one-hot fallback); and ``fused.choice`` (list of int8 per position:
the candidate taken, -1 an AvgCE mixture, -2 no candidate could teach there). Plain Arrow
types: any Parquet reader opens the files.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

FUSED = "fused"
TARGET = "target"


def schema(distributions: Sequence[str], top_k: int) -> pa.Schema:
    """The data set's schema for the named distributions (candidates, then ``fused``)."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("domain", pa.string()),
        pa.field("text", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
    for name in distributions:
        fields += [
            pa.field(f"{name}.topk_ids", pa.list_(pa.list_(pa.int32(), top_k)), nullable=False),
            pa.field(
                f"{name}.topk_logits", pa.list_(pa.list_(pa.float16(), top_k)), nullable=False
            ),
            pa.field(f"{name}.tail", pa.list_(pa.float16()), nullable=False),
        ]
        if name != FUSED:
            fields.append(pa.field(f"{name}.ce", pa.float32(), nullable=False))
            fields.append(pa.field(f"{name}.nll", pa.float32(), nullable=False))
            fields.append(pa.field(f"{name}.nll_bytes", pa.int32(), nullable=False))
        if name not in (FUSED, TARGET):
            fields.append(pa.field(f"{name}.aligned", pa.list_(pa.bool_()), nullable=False))
    fields.append(pa.field(f"{FUSED}.choice", pa.list_(pa.int8()), nullable=False))
    return pa.schema(fields)


def next_tokens(input_ids: np.ndarray) -> np.ndarray:
    """The token each position predicts: ``input_ids[t + 1]``, and -1 at the last position."""
    return np.append(np.asarray(input_ids[1:], np.int64), -1)


def candidate_aligned(batch: dict[str, np.ndarray], name: str, row: int) -> np.ndarray:
    """Where candidate ``name`` has its own distribution in ``row``: the target everywhere."""
    if name == TARGET:
        return np.ones(len(batch["input_ids"][row]), dtype=bool)
    return np.asarray(batch[f"{name}.aligned"][row], dtype=bool)


def _nested(arrays: Sequence[np.ndarray], dtype: pa.DataType, top_k: int) -> pa.Array:
    """Per-row [L, k] arrays as list<fixed_size_list<dtype, k>>."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if len(arrays) else []
    values = pa.array(flat, type=dtype)
    inner = pa.FixedSizeListArray.from_arrays(values, top_k)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def to_table(batch: dict[str, np.ndarray], table_schema: pa.Schema, top_k: int) -> pa.Table:
    """Build an Arrow table of the contract from a batch of per-row numpy values."""
    columns = []
    for field in table_schema:
        values = batch[field.name]
        if field.name.endswith(".topk_ids"):
            columns.append(_nested([np.asarray(v, np.int32) for v in values], pa.int32(), top_k))
        elif field.name.endswith(".topk_logits"):
            columns.append(
                _nested([np.asarray(v, np.float16) for v in values], pa.float16(), top_k)
            )
        elif field.name == "input_ids" or pa.types.is_list(field.type):
            inner = field.type.value_type.to_pandas_dtype()
            columns.append(pa.array([np.asarray(v, inner) for v in values], field.type))
        elif pa.types.is_string(field.type):
            # A column of nulls reaches us as floats (NaN) after Ray's block conversions.
            columns.append(
                pa.array([v if isinstance(v, str) else None for v in values], field.type)
            )
        else:
            columns.append(pa.array(list(values), field.type))
    return pa.Table.from_arrays(columns, schema=table_schema)


def table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_table`: per-row numpy values (``[L, k]`` for top-k columns)."""
    batch: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table[name].combine_chunks()
        if pa.types.is_list(column.type):
            offsets = column.offsets.to_numpy()
            values = column.flatten()
            if pa.types.is_fixed_size_list(values.type):
                k = values.type.list_size
                values = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
            else:
                values = values.to_numpy(zero_copy_only=False)
            out = np.empty(len(column), dtype=object)
            out[:] = [values[a:b] for a, b in itertools.pairwise(offsets)]
            batch[name] = out
        else:
            batch[name] = column.to_numpy(zero_copy_only=False)
    return batch
