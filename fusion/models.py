"""Loading tokenizers from local HF folders, with errors that name the culprit."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local folder; never reaches for a hub."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {str(folder)!r} does not exist (a local folder is required; "
            "hub ids are not fetched)"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{str(folder)!r} holds no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def vocab_list(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Token strings in id order; an id no token uses gets a placeholder that matches nothing."""
    vocab = tokenizer.get_vocab()
    tokens = [f"<|fusion:unused:{i}|>" for i in range(max(vocab.values()) + 1)]
    for token, token_id in vocab.items():
        tokens[token_id] = token
    return tokens
