"""Real tokenizers that ship inside PyPI packages, for benchmarks and tests without a hub.

``mistral-common`` carries Mistral-7B's 32k SentencePiece model (``▁``, byte fallback) and
``openai-whisper`` carries GPT-2's 50k byte-level BPE ranks (``Ġ``). Only their data files are
read; neither package is imported.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from transformers import LlamaTokenizer, PreTrainedTokenizerFast

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {package!r} package is not installed; install it with "
            f"`pip install --no-deps {install}` (scripts/bootstrap.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
    return path


def mistral_tokenizer() -> LlamaTokenizer:
    """Mistral-7B's SentencePiece tokenizer (32,000 tokens, ``▁``, byte fallback)."""
    model = _package_file("mistral_common", "data/tokenizer.model.v1", "mistral-common")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(model, Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE (50,256 ranks plus ``<|endoftext|>``, ``Ġ``)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _package_file("whisper", "assets/gpt2.tiktoken", "openai-whisper")
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=GPT2_PATTERN).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    return tokenizer
