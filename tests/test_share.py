"""Each training worker's share of a materialised data set: every row once per epoch,
equal shares, and a resume that starts reading at its position."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.data.share import DataFile, WorkerShare

SIZES = [5, 1, 7, 3, 11, 4]  # uneven files, one of a single row


@pytest.fixture
def files(tmp_path) -> list[DataFile]:
    out, first = [], 0
    for number, rows in enumerate(SIZES):
        path = tmp_path / f"part-{number}.parquet"
        ids = [f"row{first + i:02d}" for i in range(rows)]
        pq.write_table(pa.table({"id": ids, "value": list(range(first, first + rows))}), path)
        out.append(DataFile(str(path), rows))
        first += rows
    return out


def _ids(share: WorkerShare, epoch: int, batch: int, skip: int = 0) -> list[list[str]]:
    return [t["id"].to_pylist() for t in share.batches(epoch, batch, skip=skip, columns=["id"])]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_row_goes_to_one_worker_once_per_epoch(files, world):
    total = sum(SIZES)
    for epoch in range(3):
        shares = [WorkerShare(files, rank=r, world=world, seed=7) for r in range(world)]
        taken = [[i for b in _ids(share, epoch, 1) for i in b] for share in shares]
        assert [len(t) for t in taken] == [total // world] * world  # equal shares
        every = [i for t in taken for i in t]
        assert len(set(every)) == len(every) == total // world * world  # no row twice


def test_the_order_is_fixed_by_seed_and_epoch_and_changes_between_epochs(files):
    def order(seed: int, epoch: int) -> list[str]:
        share = WorkerShare(files, rank=0, world=1, seed=seed)
        return [i for b in _ids(share, epoch, 1) for i in b]

    assert order(7, 0) == order(7, 0)
    assert order(7, 0) != order(7, 1) and order(7, 0) != order(8, 0)
    assert sorted(order(7, 0)) == sorted(order(7, 1))


def test_rows_are_shuffled_within_each_file_differently_every_epoch(files):
    """Within a file the rows do not come in file order, and not in the same order twice:
    a data set written sorted (by document) still trains in a mixed order."""
    share = WorkerShare(files, rank=0, world=1, seed=7)
    orders = []
    for epoch in range(3):
        read = [i for b in _ids(share, epoch, 1) for i in b]
        largest = [i for i in read if 16 <= int(i[3:]) < 27]  # part-4: rows 16..26, in order
        assert sorted(largest) == [f"row{n:02d}" for n in range(16, 27)]
        orders.append(largest)
    assert all(order != sorted(order) for order in orders)
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.parametrize("skip_batches", [0, 1, 3, 5])
def test_a_resume_continues_with_the_batches_an_uninterrupted_worker_reads(files, skip_batches):
    share = WorkerShare(files, rank=1, world=2, seed=3)
    whole = _ids(share, 2, 3)
    assert _ids(share, 2, 3, skip=3 * skip_batches) == whole[skip_batches:]
    assert all(len(b) == 3 for b in whole)  # whole batches only


def test_a_resume_never_opens_the_files_it_has_finished(files):
    share = WorkerShare(files, rank=0, world=1, seed=3)
    pieces = share.pieces(0)
    finished = pieces[0].rows + pieces[1].rows
    expected = _ids(share, 0, 2, skip=finished)
    for piece in pieces[:2]:  # the files read before the resume point are gone
        os.remove(files[piece.file].path)
    assert _ids(share, 0, 2, skip=finished) == expected
