"""The transformers backend: top-k per position, padded vocabularies, NaN refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.backends.hf import HFTopK, ModelOutputError
from fusion.config import ModelConfig
from fusion.toy import save_model_dir, tiny_causal_lm


@pytest.fixture()
def padded_model_dir(tmp_path, byte_level_tokenizer):
    """A model whose embedding matrix has 37 rows beyond the tokenizer, made to win top-k."""
    size = len(byte_level_tokenizer)
    model = tiny_causal_lm("gpt2", size + 37, seed=4)
    with torch.no_grad():
        model.get_output_embeddings().weight[size:] *= 1000
    return save_model_dir(tmp_path / "padded", model, byte_level_tokenizer)


def test_ids_beyond_the_tokenizer_never_leave_the_backend(padded_model_dir, byte_level_tokenizer):
    reader = HFTopK(ModelConfig(path=str(padded_model_dir)), "sources.0", num_gpus=0, top_k=10)
    ids, _ = reader.encode("def f(x): return x", has_eos=True)
    result = reader.read([ids, ids[:5]], ["a:0", "b:0"])
    assert all(r.ids.max() < len(byte_level_tokenizer) for r in result)
    assert result[0].ids.shape == (len(ids), 10) and result[1].ids.shape == (5, 10)
    assert (np.diff(result[0].logits, axis=1) <= 0).all()  # highest first


def test_padding_does_not_change_a_sequence_reading(model_dirs):
    reader = HFTopK(ModelConfig(path=str(model_dirs["gpt2"])), "sources.0", num_gpus=0, top_k=5)
    ids, _ = reader.encode("a short text, then a longer one follows", has_eos=False)
    alone = reader.read([ids[:6]], ["x:0"])[0]
    batched = reader.read([ids[:6], ids], ["x:0", "y:0"])[0]
    assert np.array_equal(alone.ids, batched.ids)
    assert alone.ce == pytest.approx(batched.ce, rel=1e-5)


def test_nan_logits_are_refused_naming_the_row(model_dirs):
    reader = HFTopK(ModelConfig(path=str(model_dirs["gpt2"])), "sources.2", num_gpus=0, top_k=5)
    with torch.no_grad():
        reader.model.get_output_embeddings().weight[3] = float("nan")
    ids, _ = reader.encode("hello there", has_eos=False)
    with pytest.raises(ModelOutputError, match=r"sources.2 produced NaN .* row 'doc:7'"):
        reader.read([ids], ["doc:7"])


def test_a_source_reads_at_most_its_max_length(model_dirs):
    from fusion.config import SourceConfig

    source = SourceConfig(name="s", path=str(model_dirs["gpt2"]), max_length=4)
    reader = HFTopK(source, "sources.0", num_gpus=0, top_k=3)
    ids, offsets = reader.encode("a longer text than four tokens, surely", has_eos=True)
    assert len(ids) == len(offsets) == 4  # truncated: no EOS either
