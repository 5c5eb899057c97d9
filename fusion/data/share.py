"""Which rows of a materialised data set each training worker reads, epoch by epoch.

Every epoch the data set's files are put in an order drawn from (seed, epoch); that order,
read row after row, is one long sequence, and worker ``r`` of ``w`` takes its ``r``-th
contiguous ``1/w`` of it. So each row goes to one worker once per epoch, a worker reads
only the files its range touches (at most two of them in part), and a resumed worker
starts reading where its checkpoint says, skipping whole files unread. Inside each file a
worker shuffles its own rows with a generator drawn from (seed, epoch, file).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusion.data.corpus import open_filesystem


@dataclass(frozen=True)
class DataFile:
    """One Parquet file of the data set (local path or URI) and its row count."""

    path: str
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of file ``file`` (an index into the data set's files)."""

    file: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class WorkerShare:
    """One worker's rows of each epoch, in a deterministic order, read in micro-batches."""

    def __init__(self, files: list[DataFile], *, rank: int, world: int, seed: int):
        self.files, self.rank, self.world, self.seed = files, rank, world, seed
        self.total = sum(f.rows for f in files)

    def pieces(self, epoch: int) -> list[Piece]:
        """This worker's pieces of files in reading order (its slice of the epoch's order)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        per_worker = self.total // self.world  # the remainder (< world rows) sits out
        low, high = self.rank * per_worker, (self.rank + 1) * per_worker
        pieces, offset = [], 0
        for index in order.tolist():
            rows = self.files[index].rows
            start, stop = max(low, offset), min(high, offset + rows)
            if start < stop:
                pieces.append(Piece(index, start - offset, stop - offset))
            offset += rows
        return pieces

    def batches(
        self, epoch: int, batch_size: int, *, skip: int = 0, columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """Whole batches of this worker's rows, after its first ``skip`` rows (a resume
        point); files wholly before that point are never opened."""
        pending: list[pa.Table] = []
        held = 0
        for piece in self.pieces(epoch):
            if skip >= piece.rows:
                skip -= piece.rows
                continue
            table = self._read(piece, epoch, columns).slice(skip)
            skip = 0
            pending.append(table)
            held += table.num_rows
            while held >= batch_size:
                joined = pa.concat_tables(pending).combine_chunks()
                yield joined.slice(0, batch_size)
                rest = joined.slice(batch_size)
                pending, held = [rest], rest.num_rows

    def _read(self, piece: Piece, epoch: int, columns: list[str] | None) -> pa.Table:
        """The piece's rows, shuffled by (seed, epoch, file)."""
        filesystem, inner = open_filesystem(self.files[piece.file].path)
        with filesystem.open_input_file(inner) as stream:
            table = pq.read_table(stream, columns=columns).slice(piece.start, piece.rows)
        shuffle = np.random.default_rng([self.seed, epoch, piece.file]).permutation(piece.rows)
        return table.take(shuffle)
