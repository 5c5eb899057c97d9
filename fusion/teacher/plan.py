"""The run's plan: every model resolved once in the driver (tokenizer, vocabulary, BOS) and
the keys that say which stored columns are still this config's own.

A prepared data set is built from units: the chunks (cut once, keyed by the target's
tokenizer and the corpus) and one unit of columns per teacher candidate, each with its own
fingerprint (its model's files by hash, its read settings, the chunking it was read on). A
unit whose fingerprint is unchanged is reused as it is; that is what lets a config add, drop
or change one source without running the others again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fusion.config import FusionConfig, ModelConfig
from fusion.data.corpus import Shard
from fusion.models.loading import (
    bos_to_prepend,
    gguf_file_in,
    model_tokenizer,
    vocab_fingerprint,
    vocab_list,
)
from fusion.teacher.rows import TARGET

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

UNIT_FORMAT = "fusion-unit/1"
_HASH_BLOCK = 8 << 20


@dataclass
class ModelPlan:
    """One model of the run, resolved: its config, config field and tokenizer."""

    name: str
    model: ModelConfig
    field: str
    tokenizer: PreTrainedTokenizerBase


@dataclass
class RunPlan:
    """Everything the driver resolves once and the stages receive."""

    config: FusionConfig
    target: ModelPlan
    sources: dict[str, ModelPlan]
    vocab_size: int
    target_vocab: str
    target_bos: int | None
    candidates: list[str] = field(default_factory=list)

    def model(self, name: str) -> ModelPlan:
        """The plan of candidate ``name`` (``target`` or a source's name)."""
        return self.target if name == TARGET else self.sources[name]


def resolve(config: FusionConfig, loaded: dict | None = None) -> RunPlan:
    """Load each model's tokenizer once (or take it from ``loaded``, by config field, as
    ``check_models`` returns them) and derive what every stage needs from it."""
    loaded = loaded or {}

    def tokenizer(model: ModelConfig, field: str) -> PreTrainedTokenizerBase:
        return loaded[field] if field in loaded else model_tokenizer(model, field)

    target_tokenizer = tokenizer(config.target, "target")
    target = ModelPlan(TARGET, config.target, "target", target_tokenizer)
    sources = {
        s.name: ModelPlan(s.name, s, f"sources.{i}", tokenizer(s, f"sources.{i}"))
        for i, s in enumerate(config.sources)
    }
    bos = None
    if config.align.mode == "clean":  # the reference reads without BOS
        bos = bos_to_prepend(target_tokenizer, config.target.bos, "target")
    names = ([TARGET] if config.target.as_teacher else []) + list(sources)
    return RunPlan(
        config=config,
        target=target,
        sources=sources,
        vocab_size=len(vocab_list(target_tokenizer)),
        target_vocab=vocab_fingerprint(target_tokenizer),
        target_bos=bos,
        candidates=names,
    )


def chunking_key(plan: RunPlan, shards: list[Shard]) -> dict[str, object]:
    """What fixes the chunk ids and target ids, field by field (so a difference is named):
    the target's tokenizer and BOS, the data settings that cut the corpus, its files."""
    data = plan.config.data.model_dump(mode="json", exclude={"block_chunks", "readers"})
    key: dict[str, object] = {"target tokenizer": plan.target_vocab, "target BOS": plan.target_bos}
    key |= {f"data.{name}": value for name, value in sorted(data.items())}
    key["corpus shards (name, bytes)"] = [[s.name, s.size] for s in shards]
    return key


def chunking_difference(stored: dict, wanted: dict) -> str | None:
    """The first field whose value differs between two chunking keys, told for a user."""
    for name in dict.fromkeys([*stored, *wanted]):
        if stored.get(name) != wanted.get(name):
            return (
                f"{name}: the stored chunks were cut with {stored.get(name)!r}, this config "
                f"gives {wanted.get(name)!r}"
            )
    return None


def unit_settings(plan: RunPlan, name: str) -> dict[str, object]:
    """The settings that change candidate ``name``'s columns (not where or how fast it runs)."""
    model = plan.model(name).model
    keys = {"dtype", "attention", "gguf_file", "bos"}  # the files themselves are hashed
    if name != TARGET:
        keys |= {"backend", "max_length"}
    settings = model.model_dump(mode="json", include=keys)
    settings["align"] = plan.config.align.model_dump(mode="json", exclude={"map_cache"})
    return settings


def model_files(model: ModelConfig, field: str, known: dict | None = None) -> dict[str, dict]:
    """Each file a model is read from, by SHA-256 (relative path → size, mtime, hash).

    A hash in ``known`` (the stored unit's) is reused while the file's size and modification
    time are unchanged, so a re-run does not read a 14 GB checkpoint again to find it equal.
    """
    folder = Path(model.path)
    gguf = gguf_file_in(folder, model.gguf_file, field)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or "/." in relative:
            continue
        if path.suffix == ".gguf" and relative != gguf:
            continue  # another quantisation in the same folder is not read
        stat = path.stat()
        entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        earlier = (known or {}).get(relative)
        if earlier and {k: earlier.get(k) for k in entry} == entry and earlier.get("sha256"):
            entry["sha256"] = earlier["sha256"]
        else:
            entry["sha256"] = _sha256(path)
        files[relative] = entry
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def unit_fingerprint(chunking: dict, settings: dict, files: dict[str, dict]) -> str:
    """The hash of what a unit's columns are computed from: the chunking, the settings and
    the model's files by content (not their paths' timestamps)."""
    relevant = {
        "format": UNIT_FORMAT,
        "chunking": chunking,
        "settings": settings,
        "files": {name: entry["sha256"] for name, entry in sorted(files.items())},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
