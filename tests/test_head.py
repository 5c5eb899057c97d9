"""The output head applied chunk by chunk reads what the dense logits say, in bounded memory."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config

from fusion.models.head import ChunkedHead
from fusion.testing.toy import tiny_causal_lm

VOCAB = 300


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:], mask[2, 5:] = 0, 0  # right padding
    return ids, mask


def _dense(model, ids, mask, masked, k):
    """The reading computed the obvious way, from the model's full [B, L, V] logits."""
    logits = model(ids, attention_mask=mask).logits.float()
    logits = logits.masked_fill(masked, float("-inf"))
    values, indices = logits.topk(k, dim=-1)
    lse = torch.logsumexp(logits, -1)
    label = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return values, indices, lse, label


def _masked():
    masked = torch.zeros(VOCAB, dtype=torch.bool)
    masked[[0, 7, VOCAB - 1]] = True  # e.g. padded embedding rows
    return masked


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_equals_the_dense_logits(architecture, dtype):
    model = tiny_causal_lm(architecture, VOCAB).to(dtype).eval()
    with torch.no_grad():  # the masked ids get logits far from the others: masking them matters
        model.get_output_embeddings().weight[_masked()] *= 40
    ids, mask = _batch()
    # a budget of 4 KiB: one position per chunk, so every chunk boundary is crossed
    head = ChunkedHead(model, masked=_masked(), budget_mb=1)
    head.budget = 4096
    assert head.chunked
    reading = head.read(ids, mask, top_k=5)
    values, indices, lse, label = _dense(model, ids, mask, _masked(), 5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    real = mask.bool()
    unmasked = torch.logsumexp(model(ids, attention_mask=mask).logits.float(), -1)
    assert (unmasked[real] - lse[real]).abs().max() > 10 * tolerance  # the test can tell
    assert torch.allclose(reading.values[real], values[real], atol=tolerance)
    assert torch.allclose(reading.lse[real], lse[real], atol=tolerance)
    assert torch.allclose(reading.label_logit[:, :-1], label, atol=tolerance)
    if dtype == torch.float32:
        assert torch.equal(reading.indices[real], indices[real])
    assert not torch.isin(reading.indices, torch.tensor([0, 7, VOCAB - 1])).any()


def test_a_final_soft_cap_is_applied_and_other_head_arithmetic_falls_back_to_dense():
    ids, mask = _batch()
    capped = AutoModelForCausalLM.from_config(
        Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=2.0,
        )
    ).eval()
    scaled = AutoModelForCausalLM.from_config(
        CohereConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            logit_scale=0.37,
        )
    ).eval()
    for model, chunked in ((capped, True), (scaled, False)):
        head = ChunkedHead(model, masked=None)
        assert head.chunked is chunked
        reading = head.read(ids, mask, top_k=4)
        values, _, lse, _ = _dense(model, ids, mask, torch.zeros(VOCAB, dtype=torch.bool), 4)
        real = mask.bool()
        assert torch.allclose(reading.values[real], values[real], atol=1e-5)
        assert torch.allclose(reading.lse[real], lse[real], atol=1e-5)
