"""Training batches from teacher rows: padded token ids, attention mask and sparse teacher.

Rows arrive as Arrow tables (one chunk per row, real tokens only) and leave as tensors:
``input_ids``/``attention_mask`` ``[B, L]`` right-padded, ``topk_ids``/``topk_logits``
``[B, L, k]`` (absent entries: id -1, logit -inf), ``tail`` ``[B, L]`` (the teacher's mass
outside its top-k) and ``teacher_mask`` ``[B, L]``. The teacher at
position t stands for the student's prediction at position t (no shift, reference §7); a
target trained with BOS gets it in front, and every position moves one to the right.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fusion.align import PAD_ID
from fusion.teacher.fuse import NO_TEACHER
from fusion.teacher.rows import FUSED, TARGET


def _flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The innermost values of a (nested) list column as one numpy array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False)


def own_column(teacher: str) -> str | None:
    """The column that says where ``teacher`` holds a distribution of its own: ``fused.choice``
    (-2 where no candidate could teach), ``<source>.aligned``; the target is its own always."""
    if teacher == FUSED:
        return f"{FUSED}.choice"
    return None if teacher == TARGET else f"{teacher}.aligned"


def teacher_columns(teacher: str) -> list[str]:
    """The columns training reads for ``teacher``."""
    own = own_column(teacher)
    return [
        "id",
        "input_ids",
        f"{teacher}.topk_ids",
        f"{teacher}.topk_logits",
        f"{teacher}.tail",
    ] + ([own] if own else [])


def fallback_positions(table: pa.Table, teacher: str) -> np.ndarray:
    """Flat mask over the table's tokens: where ``teacher`` holds a fallback, not its own
    distribution (read from the data, never guessed from a row's shape)."""
    column = own_column(teacher)
    if column is None:
        return np.zeros(int(pc.sum(pc.list_value_length(table["input_ids"])).as_py()), bool)
    marks = _flat(table[column])
    return marks == NO_TEACHER if teacher == FUSED else ~marks.astype(bool)


def collate(
    table: pa.Table, teacher: str, *, mask_fallback: bool = False, bos: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad a table of teacher rows into the tensors the objective takes.

    With ``bos`` (a target that reads its text after BOS) every row starts with it: the BOS
    position is trained to predict the first token (CLM only; it has no teacher).
    """
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    first = int(bos is not None)
    batch, longest = len(lengths), int(lengths.max()) + first
    k = table.schema.field(f"{teacher}.topk_ids").type.value_type.list_size
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(n) for n in lengths]) + first
    input_ids = np.zeros((batch, longest), dtype=np.int64)
    input_ids[rows, cols] = _flat(table["input_ids"])
    attention = np.zeros((batch, longest), dtype=np.int64)
    attention[rows, cols] = 1
    if bos is not None:
        input_ids[:, 0], attention[:, 0] = bos, 1
    topk_ids = np.full((batch, longest, k), PAD_ID, dtype=np.int64)
    topk_ids[rows, cols] = _flat(table[f"{teacher}.topk_ids"]).reshape(-1, k)
    topk_logits = np.full((batch, longest, k), -np.inf, dtype=np.float32)
    logits = _flat(table[f"{teacher}.topk_logits"]).astype(np.float32).reshape(-1, k)
    topk_logits[rows, cols] = logits
    tail = np.zeros((batch, longest), dtype=np.float32)
    tail[rows, cols] = _flat(table[f"{teacher}.tail"]).astype(np.float32)
    teacher_mask = attention.astype(np.float32)
    teacher_mask[:, :first] = 0.0
    if mask_fallback:
        fallback = fallback_positions(table, teacher)
        teacher_mask[rows[fallback], cols[fallback]] = 0.0
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "topk_ids": torch.from_numpy(topk_ids),
        "topk_logits": torch.from_numpy(topk_logits),
        "tail": torch.from_numpy(tail),
        "teacher_mask": torch.from_numpy(teacher_mask),
    }
