"""Write a tiny HF Llama model and its tokenizer as one GGUF file, for tests of GGUF loading.

Only ``gguf.GGUFWriter`` is used (no llama.cpp script). Weights are stored as F32; Q and K rows
get llama.cpp's rotary permutation, which transformers undoes on load. The architecture metadata
is complete enough for transformers to rebuild the same ``LlamaConfig``.

The tokenizer is stored as the GGUF tokenizer model that transformers rebuilds to the same ids:

* ``"llama"`` for a ``▁`` (Metaspace) BPE with ``<0xNN>`` byte fallback: transformers rebuilds it
  as ``LlamaTokenizer`` (BPE with byte fallback, Metaspace with ``prepend_scheme="first"``) from
  the file's tokens and merges, so ids match as long as merges never cross a word boundary.
* ``"gpt2"`` for a GPT-2 style byte-level (``Ġ``) BPE: rebuilt as ``GPT2Tokenizer``, which
  encodes the same (not with ``isolate_digits``, whose split GGUF cannot state) but appends
  its default ``<|endoftext|>`` to a vocabulary that lacks it.

Special tokens are written as CONTROL so they stay whole; ``add_bos`` sets
``tokenizer.ggml.add_bos_token``, which the loaded tokenizer follows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def _tokenizer_model(backend: dict) -> str:
    """``"llama"`` or ``"gpt2"``: the GGUF tokenizer model that rebuilds this backend."""
    pre = json.dumps(backend.get("pre_tokenizer"))
    if backend["model"].get("byte_fallback") and '"Metaspace"' in pre:
        return "llama"
    if '"ByteLevel"' in pre:
        return "gpt2"
    raise ValueError(
        "only Metaspace-with-byte-fallback and byte-level BPE tokenizers are supported"
    )


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's two rotary halves interleaved."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf_llama(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path, *, add_bos: bool = True
) -> Path:
    """Write ``model`` and ``tokenizer`` to the F32 GGUF file ``path``; return ``path``.

    Load them back with ``from_pretrained(path.parent, gguf_file=path.name)``, from a folder of
    its own: a ``tokenizer_config.json`` beside the file overrides its ``add_bos`` flag.
    """
    config = model.config
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError("only the default rope is supported")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = _tokenizer_model(backend)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids are not contiguous")
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for i, token in enumerate(tokens):
        if token in special:
            types[i] = gguf.TokenType.CONTROL
        elif kind == "llama" and len(token) == 6 and token.startswith("<0x"):
            types[i] = gguf.TokenType.BYTE
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if (token_id := getattr(tokenizer, f"{name}_token_id")) is not None:
            add(token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        if (gguf_stem := names.get_name(stem)) is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        name = f"{gguf_stem}.{suffix}"
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = _permute(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
