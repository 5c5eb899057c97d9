"""Reading the corpus: shards, formats, stable ids, and errors that name file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.config import DataConfig
from fusion.data.chunking import chunk_document
from fusion.data.corpus import CorpusError, Document, plan_shards, read_documents


def _data(tmp_path, **extra) -> DataConfig:
    return DataConfig(paths=[str(tmp_path)], **extra)


def test_each_format_gives_documents_with_stable_ids(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"text": "one", "id": "x1"}\n\n{"text": "two", "id": "x2"}\n'
    )
    (tmp_path / "b.txt").write_text("a whole file")
    pq.write_table(pa.table({"text": ["p", "q", "r"]}), tmp_path / "c.parquet", row_group_size=2)
    data = _data(tmp_path, id_field=None)
    shards = plan_shards(data)
    assert [(s.format, s.row_group) for s in shards] == [
        ("jsonl", None),
        ("text", None),
        ("parquet", 0),
        ("parquet", 1),
    ]
    ids = [d.doc_id for s in shards for d in read_documents(s, data)]
    assert ids == [
        f"{tmp_path}/a.jsonl#1",
        f"{tmp_path}/a.jsonl#3",
        f"{tmp_path}/b.txt",
        f"{tmp_path}/c.parquet@0#0",
        f"{tmp_path}/c.parquet@0#1",
        f"{tmp_path}/c.parquet@1#0",
    ]
    with_ids = _data(tmp_path / "a.jsonl", id_field="id")
    assert [d.doc_id for d in read_documents(plan_shards(with_ids)[0], with_ids)] == ["x1", "x2"]


def test_uris_are_read_through_pyarrow(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "through a URI"}) + "\n")
    data = DataConfig(paths=[f"file://{tmp_path}"])
    shards = plan_shards(data)
    assert [d.text for d in read_documents(shards[0], data)] == ["through a URI"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": 5}\n', r"a.jsonl:2: field 'text' \(data.text_field\) is int"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"a.jsonl:2: field 'text' .* is missing"),
        (b'{"text": "ok"}\nnot json\n', r"a.jsonl:2: not valid JSON"),
        (b'{"text": "caf\xe9"}\n', r"a.jsonl: not valid UTF-8 at byte 13"),
    ],
)
def test_bad_documents_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_bytes(content)
    data = _data(tmp_path)
    with pytest.raises(CorpusError, match=message):
        list(read_documents(plan_shards(data)[0], data))


def test_unknown_extensions_and_empty_patterns_are_refused(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(CorpusError, match=r"set data\.format"):
        plan_shards(DataConfig(paths=[str(tmp_path / "notes.md")]))
    with pytest.raises(CorpusError, match="matches no file"):
        plan_shards(DataConfig(paths=[str(tmp_path / "*.jsonl")]))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match=r"broken\.parquet: not a readable Parquet file"):
        plan_shards(DataConfig(paths=[str(tmp_path / "broken.parquet")]))


def test_chunks_partition_the_document_and_fit_the_budget(metaspace_tokenizer, training_texts):
    text = "".join(training_texts[:3])
    chunks = chunk_document(Document("d", text, "prose"), metaspace_tokenizer, 64)
    assert "".join(c.text for c in chunks) == text
    assert all(len(c.input_ids) <= 64 for c in chunks)
    assert [c.chunk_id for c in chunks] == [f"d:{i}" for i in range(len(chunks))]
    assert chunks[-1].has_eos and not any(c.has_eos for c in chunks[:-1])
    assert chunks[-1].input_ids[-1] == metaspace_tokenizer.eos_token_id


def test_empty_and_one_token_documents_give_no_chunk(metaspace_tokenizer):
    assert chunk_document(Document("e", "", None), metaspace_tokenizer, 64) == []
    one = chunk_document(Document("o", "a", None), metaspace_tokenizer, 64)
    assert len(one) == 1 and len(one[0].input_ids) == 2  # the token and EOS: one prediction


def test_uri_globs_expand_through_the_filesystem_listing(tmp_path):
    (tmp_path / "2024" / "deep").mkdir(parents=True)
    for name in ("2024/a.parquet", "2024/b.parquet", "2024/deep/c.parquet", "2024/notes.txt"):
        pq.write_table(pa.table({"text": [name]}), tmp_path / name)
    uri = f"file://{tmp_path}"
    one_level = plan_shards(DataConfig(paths=[f"{uri}/2024/*.parquet"]))
    assert [s.path for s in one_level] == [f"{uri}/2024/a.parquet", f"{uri}/2024/b.parquet"]
    recursive = plan_shards(DataConfig(paths=[f"{uri}/**/*.parquet"]))
    assert [s.path.removeprefix(uri) for s in recursive] == [
        "/2024/a.parquet",
        "/2024/b.parquet",
        "/2024/deep/c.parquet",
    ]
    data = DataConfig(paths=[f"{uri}/20[0-9][0-9]/[ab].parquet"])
    assert [d.text for s in plan_shards(data) for d in read_documents(s, data)] == [
        "2024/a.parquet",
        "2024/b.parquet",
    ]
    with pytest.raises(CorpusError, match=r"'file://.*/2025/\*\.parquet' matches no file"):
        plan_shards(DataConfig(paths=[f"{uri}/2025/*.parquet"]))


def test_compressed_corpora_are_read_whole_and_named_by_their_inner_extension(tmp_path):
    import gzip

    lines = [json.dumps({"text": t}) for t in ("première ligne", "second\nline", "三")]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    with pa.CompressedOutputStream(str(tmp_path / "b.txt.zst"), "zstd") as stream:
        stream.write("a whole\nfile ✓".encode())
    data = DataConfig(paths=[str(tmp_path)], shard_mb=1e-6)  # compressed files never split
    shards = plan_shards(data)
    assert [(s.format, s.end) for s in shards] == [("jsonl", None), ("text", None)]
    texts = [d.text for s in shards for d in read_documents(s, data)]
    assert texts == ["première ligne", "second\nline", "三", "a whole\nfile ✓"]


def _write_lines(path, records: list[str]) -> bytes:
    raw = "".join(records).encode("utf-8")
    path.write_bytes(raw)
    return raw


@pytest.mark.parametrize("shard_bytes", [1, 7, 40, 41, 97, 10_000])
def test_byte_range_shards_read_every_line_once_in_order(tmp_path, shard_bytes):
    records = [
        json.dumps({"text": "ascii"}) + "\n",
        "\n",  # an empty line
        json.dumps({"text": "café ✓ 三"}, ensure_ascii=False) + "\r\n",
        json.dumps({"text": "  "}) + "\n",  # whitespace-only text is a document
        json.dumps({"text": "a\nnewline inside"}) + "\n",
        json.dumps({"text": "no final newline"}),
    ]
    raw = _write_lines(tmp_path / "big.jsonl", records)
    data = DataConfig(paths=[str(tmp_path / "big.jsonl")], shard_mb=shard_bytes / (1 << 20))
    shards = plan_shards(data)
    assert sum(s.size for s in shards) == len(raw)
    documents = [d for s in shards for d in read_documents(s, data)]
    expected = [json.loads(line)["text"] for line in raw.decode().split("\n") if line.strip()]
    assert [d.text for d in documents] == expected
    ids = [d.doc_id for d in documents]
    assert len(set(ids)) == len(ids)
    if len(shards) > 1:  # ids name each line's first byte
        starts = [0] + [i + 1 for i, b in enumerate(raw) if b == ord("\n")]
        non_empty = [s for s in starts if raw[s:].split(b"\n", 1)[0].strip()]
        assert ids == [f"{tmp_path}/big.jsonl@{s}" for s in non_empty]


def test_a_line_longer_than_the_read_ahead_is_read_whole_by_the_range_it_starts_in(tmp_path):
    long_text = "x" * 150_000 + " ✓"  # longer than two 64 KiB read-ahead blocks
    records = [
        json.dumps({"text": "first"}) + "\n",
        json.dumps({"text": long_text}, ensure_ascii=False) + "\n",
        json.dumps({"text": "last"}) + "\n",
    ]
    raw = _write_lines(tmp_path / "long.jsonl", records)
    data = DataConfig(paths=[str(tmp_path / "long.jsonl")], shard_mb=1000 / (1 << 20))
    shards = plan_shards(data)
    assert len(shards) > 100 and sum(s.size for s in shards) == len(raw)
    texts = [d.text for s in shards for d in read_documents(s, data)]
    assert texts == ["first", long_text, "last"]


def test_a_bad_line_in_a_byte_range_is_named_by_its_byte_offset(tmp_path):
    lines = ['{"text": "ok"}\n', "not json\n", '{"text": "ok"}\n']
    raw = _write_lines(tmp_path / "big.jsonl", lines)
    data = DataConfig(paths=[str(tmp_path / "big.jsonl")], shard_mb=10 / (1 << 20))
    with pytest.raises(CorpusError, match=rf"big\.jsonl:byte {raw.index(b'not')}: not valid JSON"):
        [d for s in plan_shards(data) for d in read_documents(s, data)]
