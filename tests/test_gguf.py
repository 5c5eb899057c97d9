"""GGUF models: the header read without a GGUF library, folders holding only a .gguf file,
and a GGUF source through validate, estimate, prepare and eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fusion.cli import app
from fusion.config import ModelConfig
from fusion.models.gguf_header import GGUFError, read_gguf_header, require_gguf_packages
from fusion.models.loading import ModelFolderError, check_model_folder


def _write_small_gguf(path, tokens: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(96)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.5] * len(tokens))
    writer.add_array("general.tags", ["α", "multi\nline", ""])
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_gguf_header_gives_what_a_full_reader_gives(tmp_path):
    import gguf

    tokens = ["<s>", "</s>", "▁the", "é", "→", " ", "\n", "日本"] + [f"t{i}" for i in range(40)]
    shapes = {"token_embd.weight": (50, 16), "blk.0.ffn_up.weight": (24, 16), "norm": (16,)}
    _write_small_gguf(tmp_path / "m.gguf", tokens, shapes)
    header = read_gguf_header(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert (
        header.parameters
        == sum(int(t.n_elements) for t in reader.tensors)
        == 50 * 16 + 24 * 16 + 16
    )
    assert header.vocab_size == 50  # the embedding's rows, not the 48 tokens
    assert header.context_length == reader.fields["llama.context_length"].contents() == 96
    assert header.architecture == "llama"


def test_keys_of_every_type_before_the_ones_read_are_skipped_as_a_full_reader_reads_them(
    tmp_path,
):
    """Every GGUF value type (bools, 64-bit numbers, arrays of numbers, strings and arrays)
    stands before the keys and tensors the header reads: a value skipped by a wrong size
    moves everything after it."""
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_bool("x.bool", True)
    writer.add_uint8("x.u8", 7)
    writer.add_int8("x.i8", -7)
    writer.add_uint16("x.u16", 700)
    writer.add_int16("x.i16", -700)
    writer.add_uint32("x.u32", 70_000)
    writer.add_int32("x.i32", -70_000)
    writer.add_float32("x.f32", 0.5)
    writer.add_uint64("x.u64", 2**40 + 3)
    writer.add_int64("x.i64", -(2**40))
    writer.add_float64("x.f64", 0.25)
    writer.add_array("x.bools", [True, False, True])
    writer.add_key_value(
        "x.u64s", [2**40, 1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64
    )
    writer.add_array("x.nested", [[1, 2, 3], [4], ["a", "bc"], [[5], [6, 7]]])
    writer.add_context_length(77)
    writer.add_bool("x.after", False)
    writer.add_tensor("token_embd.weight", np.zeros((30, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf_header(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["x.u64"].contents() == 2**40 + 3  # the file holds what was written
    nested = reader.fields["x.nested"].types[:2]  # an array whose elements are arrays
    assert nested == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY]
    assert header.context_length == reader.fields["llama.context_length"].contents() == 77
    assert header.parameters == sum(int(t.n_elements) for t in reader.tensors) == 30 * 8 + 64
    assert header.vocab_size == 30


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match=r"m.gguf is not a GGUF file"):
        read_gguf_header(tmp_path / "m.gguf")
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")  # cut inside the header
    with pytest.raises(GGUFError, match=r"t.gguf: not a readable GGUF file"):
        read_gguf_header(tmp_path / "t.gguf")


def test_a_folder_with_several_gguf_files_asks_which_one(tmp_path):
    for name in ("a-q4.gguf", "a-q8.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(
        ModelFolderError,
        match=r"several GGUF files \(a-q4.gguf, a-q8.gguf\).*sources\.1\.gguf_file",
    ):
        check_model_folder(ModelConfig(path=str(tmp_path)), "sources.1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match=r"neither config.json nor a .gguf file"):
        check_model_folder(ModelConfig(path=str(tmp_path / "empty")), "target")


def test_missing_gguf_packages_are_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(GGUFError) as caught:
        require_gguf_packages("sources.0")
    message = str(caught.value)
    assert "\n" not in message and "sources.0" in message and "fusion[gguf]" in message
    assert "gguf" in message and "accelerate" not in message


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, metaspace_tokenizer, model_dirs, training_texts, ray_cluster):
    """A folder holding only a tiny Llama's .gguf (its tokenizer adds BOS) as the source of a
    GPT-2 target, its config, and the model as transformers loads it from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion.testing.toy import tiny_causal_lm
    from tests.gguf_model import write_gguf_llama

    root = tmp_path_factory.mktemp("gguf")
    (root / "source").mkdir()
    original = tiny_causal_lm("llama", len(metaspace_tokenizer), seed=7)
    write_gguf_llama(original, metaspace_tokenizer, root / "source" / "tiny.gguf", add_bos=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": text[:500]}) + "\n" for text in training_texts[60:64])
    )
    raw = {
        "target": {"path": str(model_dirs["gpt2"]), "num_cpus": 0.4, "as_teacher": False},
        "sources": [{"name": "g", "path": str(root / "source"), "num_cpus": 0.4}],
        "data": {"paths": [str(corpus)], "max_length": 32},
        "align": {"mode": "clean"},  # the reference reads without BOS
        "output": {"dir": str(root / "data"), "rows_per_file": 16},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    loaded = AutoModelForCausalLM.from_pretrained(root / "source", gguf_file="tiny.gguf").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "source", gguf_file="tiny.gguf")
    return root, raw, loaded, tokenizer, original.num_parameters()


def _nll(model, ids: list[int]) -> list[float]:
    """Each token's negative log-likelihood after the ones before it (ids[0] is context)."""
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [-float(log_probs[p, ids[p + 1]]) for p in range(len(ids) - 1)]


def test_a_gguf_only_source_validates_and_is_estimated_from_its_header(gguf_run):
    from fusion.config import load_config
    from fusion.teacher.estimate import estimate

    root, raw, _, tokenizer, parameters = gguf_run
    result = CliRunner().invoke(app, ["validate", str(root / "run.yaml")])
    assert result.exit_code == 0, result.output
    source = estimate(load_config(root / "run.yaml")).models[-1]
    assert source.name == "g" and source.parameters == parameters
    batch, length = 8, raw["data"]["max_length"]  # the source's logits: its own 700 tokens
    assert source.memory_bytes - 4 * parameters == 2 * batch * length * len(tokenizer) * 4


def test_a_gguf_only_source_is_prepared_after_its_bos_and_evaluated(gguf_run, tmp_path):
    import pyarrow.parquet as pq

    from fusion.config import load_config
    from fusion.teacher.pipeline import prepare

    root, _, loaded, tokenizer, _ = gguf_run
    prepare(load_config(root / "run.yaml"), quiet=True)
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["target_bos"] is None  # the GPT-2 target's tokenizer adds none
    table = pq.read_table(root / "data" / "data", columns=["id", "text", "g.ce"])
    first_chunks = [row for row in table.to_pylist() if row["id"].endswith(":0")]
    assert first_chunks
    for row in first_chunks:  # a document's first chunk: no EOS appended
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        expected = np.mean(_nll(loaded, [tokenizer.bos_token_id, *ids])[1:])
        assert row["g.ce"] == pytest.approx(expected, abs=1e-4)
    text = "Assignment statements bind names to values.\nThey nest: a = b = 1 → é"
    (tmp_path / "held.txt").write_text(text)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "-m",
            f"g={root / 'source'}",
            "-d",
            f"prose={tmp_path / 'held.txt'}",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = _nll(loaded, [tokenizer.bos_token_id, *ids])
    perplexity = json.loads(out.read_text())["g"]["perplexity"]["prose"]
    assert perplexity == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-3)


def test_without_the_gguf_packages_validate_and_prepare_stop_in_one_line_before_ray(
    gguf_run, monkeypatch
):
    import importlib.util

    import fusion.teacher.pipeline
    from fusion.config import load_config

    root = gguf_run[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real(name, *a),
    )

    def no_ray(_config):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(fusion.teacher.pipeline, "ensure_ray", no_ray)
    result = CliRunner().invoke(app, ["validate", str(root / "run.yaml")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "sources.0" in lines[0] and "fusion[gguf]" in lines[0], lines
    with pytest.raises(GGUFError, match=r"accelerate: pip install 'fusion\[gguf\]'"):
        fusion.teacher.pipeline.prepare(load_config(root / "run.yaml"), quiet=True, overwrite=True)
