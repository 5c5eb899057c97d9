"""The transformers backend: top-k per position, padded vocabularies, NaN refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.config import ModelConfig
from fusion.teacher.backends.hf import HFTopK, ModelOutputError
from fusion.testing.toy import save_model_dir, tiny_causal_lm


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


@pytest.fixture(scope="module")
def bos_trained_dir(tmp_path_factory, metaspace_tokenizer, training_texts):
    """A tiny Llama trained only on BOS-started text, with a tokenizer that adds BOS."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(metaspace_tokenizer)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    model = tiny_causal_lm("llama", len(tokenizer), seed=5)
    pieces = [
        ids[i : i + 31]
        for text in training_texts[:60]
        for ids in [tokenizer(text, add_special_tokens=False)["input_ids"]]
        for i in range(0, len(ids) - 31, 31)
    ]
    batch = torch.tensor([[bos, *p] for p in pieces[:512]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        rows = batch[torch.randint(0, len(batch), (16,))]
        loss = model(rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_model_dir(tmp_path_factory.mktemp("bos") / "model", model.eval(), tokenizer), bos


def _text_ce(model, ids: list[int], prefix: list[int]) -> float:
    """Mean CE of the text's own next-token predictions (token 1 on), after ``prefix``."""
    full = torch.tensor([[*prefix, *ids]])
    with torch.no_grad():
        log_probs = model(full).logits[0].log_softmax(-1)
    start = len(prefix)
    targets = full[0, start + 1 :]
    picked = log_probs[start : len(full[0]) - 1].gather(-1, targets[:, None])
    return float(-picked.mean())


def test_a_model_trained_with_bos_is_read_after_it_and_stores_the_lower_ce(
    bos_trained_dir, training_texts
):
    from transformers import AutoModelForCausalLM

    from fusion.config import SourceConfig, TargetConfig
    from fusion.data.reader import object_array
    from fusion.teacher.rows import TARGET
    from fusion.teacher.stages import ForwardStage

    folder, bos = bos_trained_dir
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = [text[:80] for text in training_texts[70:80]]
    reader = HFTopK(ModelConfig(path=str(folder)), "s", num_gpus=0, top_k=3)
    encoded = [reader.encode(text, has_eos=False) for text in texts]
    with_bos = [_text_ce(model, ids.tolist(), [bos]) for ids, _ in encoded]
    without_bos = [_text_ce(model, ids.tolist(), []) for ids, _ in encoded]
    assert np.mean(with_bos) < np.mean(without_bos) - 0.05  # it learned to expect its BOS
    batch = {
        "id": np.asarray([f"d{i}:0" for i in range(len(texts))], dtype=object),
        "text": np.asarray(texts, dtype=object),
        "input_ids": object_array([ids for ids, _ in encoded]),
        "offsets": object_array([offsets for _, offsets in encoded]),
    }
    stored = {}
    for mode in ("clean", "reference"):
        source = SourceConfig(name="s", path=str(folder))
        stage = ForwardStage("s", source, num_cpus=1, num_gpus=0, top_k=3, mode=mode)
        out = stage(dict(batch))
        stored[mode] = out["s.ce"].tolist()
        for row, (ids, _) in enumerate(encoded):  # the BOS position is dropped
            assert out["s.raw_topk_ids"][row].shape == (len(ids), 3)
        target = TargetConfig(path=str(folder))
        stage = ForwardStage(TARGET, target, num_cpus=1, num_gpus=0, top_k=3, mode=mode)
        out = stage(dict(batch))  # the target reads its own ids the same way
        assert out["target.ce"].tolist() == pytest.approx(stored[mode], abs=1e-5)
        assert [len(ids) for ids in out["target.topk_ids"]] == [len(ids) for ids, _ in encoded]
    assert stored["clean"] == pytest.approx(with_bos, abs=1e-4)
    assert stored["reference"] == pytest.approx(without_bos, abs=1e-4)
    never = SourceConfig(name="s", path=str(folder), bos="never")
    stage = ForwardStage("s", never, num_cpus=1, num_gpus=0, top_k=3, mode="clean")
    assert stage.reader.bos is None


def test_a_row_reads_the_same_alone_or_padded_into_any_batch(model_dirs):
    reader = HFTopK(ModelConfig(path=str(model_dirs["target"])), "t", num_gpus=0, top_k=5)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 600, size=int(n)).astype(np.int32) for n in [3, 95, 2, 40, 7, 14]]
    alone = [reader.read([row], ["a"])[0] for row in rows]
    for size in (2, 3, 6):
        for start in range(0, len(rows), size):
            together = reader.read(
                rows[start : start + size], ["a"] * len(rows[start : start + size])
            )
            for got, want in zip(together, alone[start : start + size], strict=True):
                assert got.ce == want.ce and got.nll == want.nll
                assert np.array_equal(got.logits, want.logits)
                assert np.array_equal(got.ids, want.ids)


def test_chunks_of_a_bos_target_leave_room_for_its_bos(bos_trained_dir, training_texts):
    from fusion.config import DataConfig
    from fusion.data.corpus import plan_shards
    from fusion.data.reader import ChunkStage
    from fusion.models.loading import load_tokenizer

    folder, bos = bos_trained_dir
    corpus = folder.parent / "corpus.txt"
    corpus.write_text(" ".join(training_texts[70:74]))
    data = DataConfig(paths=[str(corpus)], max_length=16)
    shard = plan_shards(data)[0]
    descriptor = {key: [value] for key, value in shard.descriptor().items()}
    lengths = {}
    for read_bos in (None, bos):
        stage = ChunkStage(data, {}, bos=read_bos, tokenizer=load_tokenizer(folder))
        lengths[read_bos] = [len(ids) for ids in stage(descriptor)["input_ids"]]
    assert max(lengths[None]) == 16 and max(lengths[bos]) == 15  # BOS + 15 tokens = 16
