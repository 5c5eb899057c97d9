"""Corpus and prepared data through a real S3 API: an S3-compatible server on loopback."""

from __future__ import annotations

import gzip
import json
import socket

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fusion.config import DataConfig, parse_config
from fusion.data.corpus import plan_shards, read_documents
from fusion.data.share import DataFile, WorkerShare
from fusion.teacher.inspect import inspect_lines
from fusion.train.trainer import DatasetMismatchError, check_dataset

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "fusion-test",
    "AWS_SECRET_ACCESS_KEY": "fusion-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server with a bucket ``corpus``; yields (filesystem, URI query)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in CREDENTIALS.items():
                patch.setenv(key, value)
            endpoint = f"127.0.0.1:{port}"
            filesystem = pafs.S3FileSystem(
                endpoint_override=endpoint, scheme="http", allow_bucket_creation=True
            )
            filesystem.create_dir("corpus")
            yield filesystem, f"?endpoint_override={endpoint}&scheme=http"
    finally:
        server.stop()


def test_a_corpus_glob_in_a_bucket_lists_and_reads_through_s3(s3):
    filesystem, query = s3
    for number in range(2):
        with filesystem.open_output_stream(f"corpus/minipile/{number}.parquet") as stream:
            pq.write_table(pa.table({"text": [f"parquet {number} ✓"]}), stream)
    with filesystem.open_output_stream(
        "corpus/minipile/notes.jsonl.gz", compression=None
    ) as stream:
        stream.write(gzip.compress(json.dumps({"text": "gzip ✓\nline"}).encode()))
    data = DataConfig(paths=[f"s3://corpus/minipile/*.parquet{query}"])
    shards = plan_shards(data)
    assert [s.path.split("?")[0] for s in shards] == [
        "s3://corpus/minipile/0.parquet",
        "s3://corpus/minipile/1.parquet",
    ]
    assert [d.text for s in shards for d in read_documents(s, data)] == [
        "parquet 0 ✓",
        "parquet 1 ✓",
    ]
    both = DataConfig(paths=[f"s3://corpus/minipile{query}"])  # a folder: every corpus file
    assert [d.text for s in plan_shards(both) for d in read_documents(s, both)] == [
        "parquet 0 ✓",
        "parquet 1 ✓",
        "gzip ✓\nline",
    ]


def test_a_prepared_data_set_in_a_bucket_is_checked_inspected_and_read(s3, prepared_world):
    filesystem, query = s3
    root, raw = prepared_world
    pafs.copy_files(str(root / "data"), "corpus/prepared", destination_filesystem=filesystem)
    uri = f"s3://corpus/prepared{query}"
    config = parse_config(raw | {"train": {"data": uri, "storage_path": "unused"}})
    manifest = check_dataset(config)  # sizes and SHA-256 of every file, read through S3
    assert manifest["rows"] > 0
    assert f"{manifest['rows']:,} rows" in inspect_lines(uri)[0]
    files = [
        DataFile(f"s3://corpus/prepared/{entry['file']}{query}", entry["rows"])
        for entry in manifest["files"]
    ]
    share = WorkerShare(files, rank=0, world=1, seed=0)
    ids = [i for t in share.batches(0, 4, columns=["id"]) for i in t["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == manifest["rows"] // 4 * 4
    first = manifest["files"][0]["file"]
    with filesystem.open_output_stream(f"corpus/prepared/{first}") as stream:
        stream.write(b"replaced")
    with pytest.raises(DatasetMismatchError, match="has 8 bytes but the manifest says"):
        check_dataset(config)
