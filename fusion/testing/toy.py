"""Small tokenizers and models built on this machine, for tests and the demo.

Nothing here downloads: tokenizers are trained with the ``tokenizers`` library on text passed
in, models are randomly initialised from tiny configs, and both are saved as ordinary HF
folders (``tokenizer.json``, ``config.json``, ``model.safetensors``) that ``Auto*`` classes
load with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
TokenizerKind = Literal["byte_level", "metaspace"]


def _isolating(pre_tokenizer, isolate: bool):
    """``pre_tokenizer``, after newlines and single digits are split off when ``isolate``.

    Tokenizers that all isolate digits and newlines segment numbers and line ends alike, so
    their distributions align position by position there.
    """
    if not isolate:
        return pre_tokenizer
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizer,
        ]
    )


def _byte_level(texts: Iterable[str], vocab_size: int, isolate: bool) -> Tokenizer:
    """GPT-2 style byte-level BPE: spaces are ``Ġ``, every byte is in the alphabet."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _isolating(pre_tokenizers.ByteLevel(add_prefix_space=False), isolate)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _metaspace(texts: Iterable[str], vocab_size: int, isolate: bool) -> Tokenizer:
    """SentencePiece-style BPE: spaces are ``▁``, unknown characters fall back to ``<0xNN>``."""
    pre_tokenizer = _isolating(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), isolate
    )
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - 256, len(SPECIAL_TOKENS) + 1),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    draft.train_from_iterator(texts, trainer)
    trained = json.loads(draft.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], kind: TokenizerKind, vocab_size: int, *, isolate_digits: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level (``Ġ``) or Metaspace-with-byte-fallback (``▁``) BPE tokenizer.

    ``isolate_digits`` splits newlines and every digit into pre-tokens of their own.
    """
    builders = {"byte_level": _byte_level, "metaspace": _metaspace}
    if kind not in builders:
        raise ValueError(f"tokenizer kind must be one of {sorted(builders)}, got {kind!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=builders[kind](texts, vocab_size, isolate_digits),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


Architecture = Literal["llama", "gpt2", "gpt_neox"]


def tiny_causal_lm(
    architecture: Architecture, vocab_size: int, *, seed: int = 0, width: int = 64, layers: int = 2
):
    """A randomly initialised small causal LM of the given architecture (4 heads)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2}
    configs = {
        "llama": lambda: LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            **common,
        ),
        "gpt2": lambda: GPT2Config(
            n_embd=width, n_layer=layers, n_head=4, n_positions=1024, **common
        ),
        "gpt_neox": lambda: GPTNeoXConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=1024,
            **common,
        ),
    }
    if architecture not in configs:
        raise ValueError(f"architecture must be one of {sorted(configs)}, got {architecture!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(configs[architecture]())


def save_model_dir(path: Path, model, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Save model (safetensors) and tokenizer together as one local HF folder."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
