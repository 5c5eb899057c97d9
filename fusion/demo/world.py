"""The demo's world: corpora, four tokenizers, three domain experts, the target and a pair.

* three sources of different architectures and tokenizer families, each pre-trained mostly on
  one domain: ``code_expert`` (GPT-2, byte-level BPE 4096), ``prose_expert`` (GPT-NeoX,
  Metaspace BPE 4096 with byte fallback), ``arith_expert`` (Llama, byte-level BPE 2048);
* ``target_init``: a Llama with its own Metaspace tokenizer (3072), pre-trained briefly on an
  even mix, the model every continual-training arm starts from;
* ``code_tuned`` and ``prose_tuned``: ``target_init`` fine-tuned towards one domain each, a pair
  of one architecture and vocabulary so that ensembling and weight merging are real baselines.

Every tokenizer splits off newlines and single digits, so numbers and line ends are segmented
alike and align position by position. Models are pre-trained as Ray tasks (one CPU each), so
the experts train side by side; everything built is cached under the world folder by recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusion.demo.corpora import Corpora, build_corpora, write_jsonl


@dataclass(frozen=True)
class Scale:
    """How large the world and the continual training are."""

    code_chars: int
    arith_lines: int
    held_out_chars: int
    expert_steps: int
    target_steps: int
    tuned_steps: int
    continual_steps: int
    continual_batch: int
    eval_every: int
    variants: bool
    width: int = 192
    layers: int = 4
    pretrain_batch: int = 32
    max_length: int = 320
    seed: int = 0
    orders: int = 3  # data orders (seeds) of the arms compared with an interval
    eval_chars: int = 60_000  # held-out text per domain the report's verdicts are scored on


@dataclass(frozen=True)
class ModelSpec:
    """One model of the world: architecture, tokenizer, domain mix and where it starts."""

    name: str
    architecture: str
    tokenizer: str
    mix: dict[str, float] = field(hash=False)
    steps: str
    lr: float = 2e-3
    init: str | None = None


TOKENIZERS = {
    "bytes4096": ("byte_level", 4096),
    "meta4096": ("metaspace", 4096),
    "bytes2048": ("byte_level", 2048),
    "target3072": ("metaspace", 3072),
}
SOURCES = (
    ModelSpec("code_expert", "gpt2", "bytes4096", {"code": 8, "prose": 1, "arith": 1}, "expert"),
    ModelSpec(
        "prose_expert", "gpt_neox", "meta4096", {"code": 1, "prose": 8, "arith": 1}, "expert"
    ),
    ModelSpec("arith_expert", "llama", "bytes2048", {"code": 1, "prose": 1, "arith": 8}, "expert"),
)
TARGET = ModelSpec(
    "target_init", "llama", "target3072", {"code": 1, "prose": 1, "arith": 1}, "target"
)
PAIR = (
    ModelSpec(
        "code_tuned",
        "llama",
        "target3072",
        {"code": 8, "prose": 1, "arith": 0},
        "tuned",
        lr=1e-3,
        init="target_init",
    ),
    ModelSpec(
        "prose_tuned",
        "llama",
        "target3072",
        {"code": 1, "prose": 8, "arith": 0},
        "tuned",
        lr=1e-3,
        init="target_init",
    ),
)
RECIPE = "recipe.json"


@dataclass(frozen=True)
class World:
    """Paths of everything built: model folders by name, the continual and held-out corpora."""

    root: Path
    models: dict[str, Path]
    continual: Path
    held_out: dict[str, Path]
    stats: dict


def _fingerprint(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _is_built(folder: Path, recipe: dict) -> bool:
    file = folder / RECIPE
    return file.is_file() and json.loads(file.read_text()).get("fingerprint") == _fingerprint(
        recipe
    )


def _stage(folder: Path) -> Path:
    """A clean staging folder next to ``folder``; what it holds is renamed into place."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _commit(staging: Path, folder: Path, recipe: dict) -> None:
    (staging / RECIPE).write_text(json.dumps(recipe | {"fingerprint": _fingerprint(recipe)}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)


def corpora_id(corpora: Corpora) -> str:
    """A hash of every span: models and tokenizers are rebuilt when the text changes."""
    digest = hashlib.sha256()
    for part in (corpora.pretrain, corpora.continual, corpora.held_out):
        for domain in part:
            digest.update("\x00".join(part[domain]).encode())
    return digest.hexdigest()[:16]


def _tokenizer_recipe(key: str, scale: Scale, corpus: str) -> dict:
    return {"tokenizer": TOKENIZERS[key], "seed": scale.seed, "corpora": corpus}


def _build_tokenizers(
    root: Path, corpora: Corpora, scale: Scale, corpus: str, target: ModelSpec
) -> dict[str, Path]:
    """Train the four tokenizers (the target's on another sample than the sources')."""
    import random

    from fusion.testing.toy import train_tokenizer

    folders = {}
    for key, (kind, size) in TOKENIZERS.items():
        folder = root / "tokenizers" / key
        folders[key] = folder
        recipe = _tokenizer_recipe(key, scale, corpus)
        if _is_built(folder, recipe):
            continue
        sample = [span for spans in corpora.pretrain.values() for span in spans[:3000]]
        random.Random(scale.seed + (7 if key == target.tokenizer else 0)).shuffle(sample)
        sample = sample[: len(sample) // 2] if key == target.tokenizer else sample
        staging = _stage(folder)
        train_tokenizer(sample, kind, size, isolate_digits=True).save_pretrained(staging)
        _commit(staging, folder, recipe)
    return folders


def _model_recipe(spec: ModelSpec, scale: Scale, corpus: str) -> dict:
    return {
        "spec": asdict(spec),
        "steps": getattr(scale, f"{spec.steps}_steps"),
        "tokenizer": _tokenizer_recipe(spec.tokenizer, scale, corpus),
        **{k: getattr(scale, k) for k in ("width", "layers", "pretrain_batch", "max_length")},
        "seed": scale.seed,
    }


def pretrain_model(
    spec: ModelSpec,
    scale: Scale,
    recipe: dict,
    tokenizer_dir: str,
    out: str,
    spans: dict,
    init_dir: str | None,
) -> str:
    """Build (or start from ``init_dir``), pre-train and save one model; return its folder.

    Runs as a Ray task with one CPU: it uses one thread, so two tasks share two cores.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from fusion.demo.pretrain import pretrain
    from fusion.models.device import cpu_computes_bf16
    from fusion.models.loading import load_tokenizer
    from fusion.testing.toy import tiny_causal_lm

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tokenizer_dir)
    if init_dir is None:
        model = tiny_causal_lm(
            spec.architecture,
            len(tokenizer),
            seed=scale.seed,
            width=scale.width,
            layers=scale.layers,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(init_dir, local_files_only=True)
    losses = pretrain(
        model,
        tokenizer,
        spans,
        spec.mix,
        steps=getattr(scale, f"{spec.steps}_steps"),
        batch_size=scale.pretrain_batch,
        lr=spec.lr,
        max_length=scale.max_length,
        seed=scale.seed + sum(map(ord, spec.name)),
        bf16=cpu_computes_bf16(),
    )
    folder = Path(out)
    staging = _stage(folder)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "pretrain_losses.json").write_text(json.dumps(losses))
    _commit(staging, folder, recipe)
    return str(folder)


def build_world(
    root: Path,
    scale: Scale,
    *,
    echo: Callable[[str], None] = print,
    corpora: Corpora | None = None,
    models: tuple[ModelSpec, ...] | None = None,
) -> World:
    """Build (or reuse) corpora, tokenizers and models under ``root``; Ray must be running.
    By default the demo's (its three domains, sources, target and pair); ``corpora`` and
    ``models`` (sources, then the target, named as :data:`TARGET` is) build another world."""
    import ray

    if corpora is None:
        corpora = build_corpora(
            code_chars=scale.code_chars,
            arith_lines=scale.arith_lines,
            held_out_chars=scale.held_out_chars,
            continual_share=0.3,
            seed=scale.seed,
        )
    models = models or (*SOURCES, TARGET, *PAIR)
    target = next(spec for spec in models if spec.name == TARGET.name)
    domains = list(corpora.continual)
    data = root / "data"
    held_out = {
        domain: write_jsonl(
            data / f"heldout-{domain}.jsonl",
            [{"id": f"{domain}-{i}", "text": t} for i, t in enumerate(corpora.held_out[domain])],
        )
        for domain in domains
    }
    wanted = scale.continual_steps * scale.continual_batch
    per_domain = -(-wanted // len(domains))
    records = [
        {"id": f"{domain}-{i}", "text": corpora.continual[domain][i], "domain": domain}
        for i in range(per_domain)
        for domain in domains
        if i < len(corpora.continual[domain])
    ]
    continual = write_jsonl(data / "continual.jsonl", records)
    corpus = corpora_id(corpora)
    tokenizers = _build_tokenizers(root, corpora, scale, corpus, target)

    pretrain_task = ray.remote(num_cpus=1)(pretrain_model)
    spans = ray.put(corpora.pretrain)
    folders: dict[str, Path] = {}
    pending = {}
    for spec in models:
        folder = root / "models" / spec.name
        folders[spec.name] = folder
        recipe = _model_recipe(spec, scale, corpus)
        if _is_built(folder, recipe):
            pending[spec.name] = str(folder)
            continue
        init = pending.get(spec.init) if spec.init else None
        pending[spec.name] = pretrain_task.remote(
            spec, scale, recipe, str(tokenizers[spec.tokenizer]), str(folder), spans, init
        )
    to_build = [name for name, ref in pending.items() if not isinstance(ref, str)]
    if to_build:
        echo(f"pre-training {', '.join(to_build)} (Ray tasks, one CPU each)")
        for name in to_build:
            ray.get(pending[name])
            echo(f"  built {name}")
    stats = {
        "spans": {
            part: {d: len(getattr(corpora, part)[d]) for d in domains}
            for part in ("pretrain", "continual", "held_out")
        },
        "continual_spans": len(records),
        "held_out_bytes": {d: sum(len(t.encode()) for t in corpora.held_out[d]) for d in domains},
    }
    return World(root, folders, continual, held_out, stats)
