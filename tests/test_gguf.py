"""GGUF models: the header read without a GGUF library, folders holding only a .gguf file,
and a GGUF source through validate, estimate, prepare and eval."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.config import ModelConfig
from fusion.gguf_header import GGUFError, read_gguf_header, require_gguf_packages
from fusion.models import ModelFolderError, check_model_folder


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
