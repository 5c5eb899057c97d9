"""Loading models and tokenizers from local HF folders, with errors that name the culprit.

Safe defaults: safetensors only unless pickle is allowed, no remote code unless allowed, and
never a hub download (a hub id gets an immediate error instead of a retry loop).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fusion.config import FusionConfig, ModelConfig
from fusion.errors import FusionError
from fusion.models.gguf_header import read_gguf_header, require_gguf_packages

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelFolderError(FusionError):
    """A model or tokenizer folder that cannot be used as configured."""


def _folder(path: str | Path, what: str) -> Path:
    text = str(path)
    folder = Path(text)
    if "://" in text:
        raise ModelFolderError(
            f"{what} {text!r} is a URI; models are loaded from local folders — copy it to "
            "local disk (or shared storage mounted on every node) first"
        )
    if not folder.is_dir():
        hint = (
            " It looks like a hub id: fusion never downloads; save the model locally with "
            "save_pretrained and point to that folder."
            if text.count("/") == 1 and not text.startswith((".", "/"))
            else ""
        )
        raise ModelFolderError(f"{what} {text!r} does not exist or is not a folder.{hint}")
    return folder


def gguf_file_in(folder: Path, configured: str | None, field: str) -> str | None:
    """The GGUF file a model folder is read from: the configured one, or the only ``*.gguf``
    of a folder without config.json (its config, tokenizer and weights all come from it)."""
    if configured is not None:
        if not (folder / configured).is_file():
            raise ModelFolderError(f"{field}.gguf_file {configured!r} is not in {str(folder)!r}")
        return configured
    if (folder / "config.json").is_file():
        return None
    found = sorted(path.name for path in folder.glob("*.gguf"))
    if len(found) > 1:
        raise ModelFolderError(
            f"{field}.path {str(folder)!r} holds several GGUF files ({', '.join(found)}); set "
            f"{field}.gguf_file to the one to load"
        )
    return found[0] if found else None


def load_tokenizer(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    field: str = "tokenizer",
) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local folder (or inside its GGUF file); never reaches
    for a hub."""
    folder = _folder(path, f"{field} folder")
    gguf_file = gguf_file_in(folder, gguf_file, field)
    if gguf_file is not None:
        require_gguf_packages(field)
    elif not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelFolderError(
            f"{str(folder)!r} holds no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)} "
            "or a .gguf file"
        )
    return AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust_remote_code, gguf_file=gguf_file
    )


def model_tokenizer(model: ModelConfig, field: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of a configured model, with its remote-code and GGUF settings."""
    return load_tokenizer(
        model.path,
        trust_remote_code=model.trust_remote_code,
        gguf_file=model.gguf_file,
        field=field,
    )


def model_config_values(model: ModelConfig, field: str) -> dict:
    """A model's config.json, or for a GGUF model what its header says of the same keys."""
    folder = _folder(model.path, f"{field}.path")
    gguf_file = gguf_file_in(folder, model.gguf_file, field)
    if gguf_file is None:
        return _model_config(folder)
    header = read_gguf_header(folder / gguf_file)
    values = {"model_type": header.architecture, "vocab_size": header.vocab_size}
    if header.context_length is not None:
        values["max_position_embeddings"] = header.context_length
    return values


def check_model_folder(
    model: ModelConfig, field: str, *, label: str | None = None
) -> PreTrainedTokenizerBase:
    """Check, before any actor starts, that a configured model folder can be loaded safely;
    ``label`` names the folder in errors where no config field holds it (eval's --model).
    Returns the tokenizer it loaded, so a caller need not load it again."""
    where = label or f"{field}.path"
    folder = _folder(model.path, where)
    place = f"{where} {str(folder)!r}"
    gguf_file = gguf_file_in(folder, model.gguf_file, field)
    if gguf_file is not None:
        require_gguf_packages(label or field)
    elif not (folder / "config.json").is_file():
        raise ModelFolderError(
            f"{place} has neither config.json nor a .gguf file: not a model folder"
        )
    else:
        files = [p.name for p in folder.iterdir()]
        safetensors = [f for f in files if f.endswith(".safetensors")]
        pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        if not safetensors and not pickled:
            raise ModelFolderError(
                f"{place} holds no weights (*.safetensors or, with allow_pickle, *.bin)"
            )
        if not safetensors and not model.allow_pickle:
            raise ModelFolderError(
                f"{place} has only pickle weights ({', '.join(pickled)}); pickle can run code "
                f"when loaded. Convert them to safetensors, or set {field}.allow_pickle: true "
                "if you trust their origin"
            )
    config = model_config_values(model, field)
    if config.get("auto_map") and not model.trust_remote_code:
        raise ModelFolderError(
            f"{place} needs its own code (config.json has auto_map); set "
            f"{field}.trust_remote_code: true only if you trust that code"
        )
    tokenizer = model_tokenizer(model, field)
    if not tokenizer.is_fast:
        raise ModelFolderError(
            f"{place}: its tokenizer ({type(tokenizer).__name__}) is a slow tokenizer without "
            "character offsets; save a fast tokenizer (tokenizer.json)"
        )
    vocab_size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    described = "config.json" if gguf_file is None else f"{gguf_file}'s header"
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ModelFolderError(
            f"{place}: its tokenizer has {len(tokenizer)} tokens but {described} says "
            f"vocab_size {vocab_size}, so ids from {vocab_size} on have no embedding; the "
            "tokenizer and the weights do not belong together"
        )
    return tokenizer


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def _model_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return {}
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{config_file} is not valid JSON ({error})") from None


def check_context(model: ModelConfig, field: str, length: int, length_field: str) -> None:
    """Refuse sequences of ``length`` tokens that the model cannot read in one window."""
    config = model_config_values(model, field)
    config = config | config.get("text_config", {})
    context = next((config[key] for key in _CONTEXT_KEYS if isinstance(config.get(key), int)), None)
    if context is not None and length > context:
        raise ModelFolderError(
            f"{length_field} is {length} tokens but {field} reads at most {context} "
            f"(its config); lower {length_field}"
        )


def load_causal_lm(
    model: ModelConfig,
    field: str,
    device: str,
    *,
    label: str | None = None,
    num_gpus: float = 0.0,
):
    """Load a configured causal LM for inference on ``device`` (after check_model_folder):
    in its ``dtype`` (resolved for the device), spread over the actor's GPUs when it holds
    more than one."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusion.models.device import resolve_dtype
    from fusion.models.placement import hf_placement

    check_model_folder(model, field, label=label)
    gguf_file = gguf_file_in(Path(model.path), model.gguf_file, field)
    attention = model.attention
    if attention == "auto":
        attention = "eager" if device == "cpu" else None
    sizes = []
    if device == "cuda" and num_gpus > 1:
        sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(int(num_gpus))]
    placement = hf_placement(num_gpus, device, sizes, model.gpu_memory_fraction)
    loaded = AutoModelForCausalLM.from_pretrained(
        model.path,
        dtype=resolve_dtype(model.dtype, device),
        attn_implementation=attention,
        local_files_only=True,
        use_safetensors=None if model.allow_pickle or gguf_file else True,
        trust_remote_code=model.trust_remote_code,
        gguf_file=gguf_file,
        **placement,
    )
    return (loaded if placement else loaded.to(device)).eval()


def resolve_device(model: ModelConfig, num_gpus: float) -> str:
    """'cuda' when asked for, or when 'auto' and the actor holds a GPU; else 'cpu'."""
    import torch

    if model.device == "cuda" or (model.device == "auto" and num_gpus > 0):
        if not torch.cuda.is_available():
            raise ModelFolderError(
                f"{model.path!r} is configured for a GPU but this worker sees none"
            )
        return "cuda"
    return "cpu"


UNUSED_PREFIX = "<|fusion:unused:"  # the placeholder of an id no token uses


def vocab_list(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Token strings in id order; an id no token uses gets a placeholder that matches nothing."""
    vocab = tokenizer.get_vocab()
    tokens = [f"{UNUSED_PREFIX}{i}|>" for i in range(max(vocab.values()) + 1)]
    for token, token_id in vocab.items():
        tokens[token_id] = token
    return tokens


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """A tokenizer's special tokens by role: ``bos``, ``eos``, ``unk``, ``pad`` (those it has)
    and every other special token under its own spelling."""
    roles = {
        role: token_id
        for role in ("bos", "eos", "unk", "pad")
        if (token_id := getattr(tokenizer, f"{role}_token_id", None)) is not None
    }
    taken = set(roles.values())
    for token, token_id in zip(
        tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True
    ):
        if token_id not in taken:
            roles[token] = token_id
    return roles


def bos_to_prepend(tokenizer: PreTrainedTokenizerBase, setting: str, field: str) -> int | None:
    """The BOS id a model's chunks are read after under a ``bos`` setting, or None."""
    if setting == "never":
        return None
    bos = tokenizer.bos_token_id
    if setting == "always":
        if bos is None:
            raise ModelFolderError(f"{field}.bos is 'always' but its tokenizer has no BOS token")
        return int(bos)
    adds = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and adds[:1] == [bos] else None


def reading_bos(
    tokenizer: PreTrainedTokenizerBase, model: ModelConfig, field: str, read_bos: bool
) -> int | None:
    """The BOS a backend reads first: the model's ``bos`` setting when ``read_bos``, else none."""
    return bos_to_prepend(tokenizer, model.bos if read_bos else "never", field)


def training_bos(config: FusionConfig) -> int | None:
    """The BOS the target reads its chunks after, so its training rows start with it too
    (clean mode only: the reference reads without BOS)."""
    if config.align.mode != "clean":
        return None
    return bos_to_prepend(model_tokenizer(config.target), config.target.bos, "target")


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the token strings in id order: equal exactly when the ids mean the same."""
    return hashlib.sha256("\n".join(vocab_list(tokenizer)).encode()).hexdigest()[:16]


def check_models(config: FusionConfig) -> dict[str, PreTrainedTokenizerBase]:
    """Every configured model folder, and the target's context against the chunk length;
    every problem is reported, one per line (a single one as itself). Returns the tokenizers
    it loaded, by config field (``target``, ``sources.0``, …)."""
    problems: list[FusionError] = []
    tokenizers: dict[str, PreTrainedTokenizerBase] = {}

    def collect(check, *args) -> None:
        try:
            result = check(*args)
        except FusionError as error:
            problems.append(error)
        else:
            if result is not None:
                tokenizers[args[1]] = result

    collect(check_model_folder, config.target, "target")
    if not problems:  # the window is read from a folder that loads
        collect(check_context, config.target, "target", config.data.max_length, "data.max_length")
    for index, source in enumerate(config.sources):
        collect(check_model_folder, source, f"sources.{index}")
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ModelFolderError(
            f"{len(problems)} problems with the models:\n  " + "\n  ".join(map(str, problems))
        )
    return tokenizers
