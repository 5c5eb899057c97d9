"""Reading the corpus: shards, formats, stable ids, and errors that name file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion.chunking import chunk_document
from fusion.config import DataConfig
from fusion.corpus import CorpusError, Document, plan_shards, read_documents


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
