"""Weight merging of models that share an architecture: the baselines fusion is measured against.

Methods live in a registry keyed by name:

* ``linear`` — the weighted average of the weights (model soups, https://arxiv.org/abs/2203.05482);
* ``ties`` — TIES-merging of task vectors against a common base (https://arxiv.org/abs/2306.01708):
  trim each task vector to its largest-magnitude ``density`` share, elect a sign per weight by
  the summed vectors, average the entries that agree with it, add ``scale`` × that to the base.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from fusion.config import ModelConfig
from fusion.errors import FusionError
from fusion.models.loading import load_causal_lm, load_tokenizer, vocab_fingerprint

StateDict = Mapping[str, torch.Tensor]


class MergeError(FusionError):
    """Models that cannot be merged (architectures, shapes or vocabularies differ)."""


def _linear(
    models: Sequence[StateDict], weights: Sequence[float], base: StateDict | None, **_
) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        name: sum(w * m[name].double() for w, m in zip(weights, models, strict=True)) / total
        for name in models[0]
    }


def _ties(
    models: Sequence[StateDict],
    weights: Sequence[float],
    base: StateDict | None,
    *,
    density: float = 0.5,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    if base is None:
        raise MergeError("ties merges task vectors: it needs the models' common base model")
    merged = {}
    for name, anchor in base.items():
        anchor = anchor.double()
        vectors = []
        for model in models:
            vector = model[name].double() - anchor
            keep = max(1, round(density * vector.numel()))
            threshold = vector.abs().flatten().kthvalue(vector.numel() - keep + 1).values
            vectors.append(torch.where(vector.abs() >= threshold, vector, 0.0))
        stacked = torch.stack([w * v for w, v in zip(weights, vectors, strict=True)])
        sign = torch.sign(stacked.sum(dim=0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        shape = (len(weights),) + (1,) * anchor.dim()
        weight_sum = (torch.tensor(weights, dtype=torch.float64).view(shape) * agree).sum(dim=0)
        # the weighted mean of the entries that agree with the elected sign (0 where none do)
        delta = (stacked * agree).sum(dim=0) / weight_sum.clamp(min=1e-12)
        merged[name] = anchor + scale * delta
    return merged


MERGE_METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "linear": _linear,
    "ties": _ties,
}


def merge_state_dicts(
    method: str,
    models: Sequence[StateDict],
    *,
    weights: Sequence[float] | None = None,
    base: StateDict | None = None,
    **options: float,
) -> dict[str, torch.Tensor]:
    """Merge floating-point tensors of equal names and shapes; other tensors come from model 0."""
    if method not in MERGE_METHODS:
        raise MergeError(f"merge method must be one of {sorted(MERGE_METHODS)}, got {method!r}")
    if len(models) < 2:
        raise MergeError(f"merging needs at least two models, got {len(models)}")
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models) or min(weights) < 0 or sum(weights) <= 0:
        raise MergeError(f"weights must be one non-negative number per model, got {weights}")
    reference = models[0]
    others = [(f"model {i}", m) for i, m in enumerate(models[1:], start=1)]
    for label, model in others + ([("the base", base)] if base is not None else []):
        for name, tensor in reference.items():
            other = model.get(name)
            if other is None or other.shape != tensor.shape:
                found = None if other is None else tuple(other.shape)
                raise MergeError(
                    f"{label} has {name} of shape {found}, model 0 {tuple(tensor.shape)}: "
                    "only models of one architecture and size can be merged"
                )
    floats = [n for n, t in reference.items() if t.is_floating_point()]
    if base is not None:
        base = {n: base[n] for n in floats}
    merged = MERGE_METHODS[method](
        [{n: m[n] for n in floats} for m in models], weights, base, **options
    )
    return {
        name: merged[name].to(tensor.dtype) if name in merged else tensor.clone()
        for name, tensor in reference.items()
    }


def merge_models(
    method: str,
    folders: Sequence[str],
    out: Path,
    *,
    base: str | None = None,
    weights: Sequence[float] | None = None,
    **options: float,
) -> Path:
    """Merge local HF model folders into ``out`` (weights, tokenizer of the first, recipe)."""
    from transformers.utils import logging

    if out.exists():
        raise MergeError(f"{out} already exists: choose another output folder")
    logging.disable_progress_bar()
    loaded = [load_causal_lm(ModelConfig(path=f), f, "cpu") for f in folders]
    architectures = {tuple(m.config.architectures or [type(m).__name__]) for m in loaded}
    if len(architectures) > 1:
        raise MergeError(f"{list(folders)} are of different architectures: {sorted(architectures)}")
    tokenizers = [load_tokenizer(f) for f in folders]
    if len({vocab_fingerprint(t) for t in tokenizers}) > 1:
        raise MergeError(f"{list(folders)} have different vocabularies: their rows do not match")
    anchor = None
    if base is not None:
        anchor = load_causal_lm(ModelConfig(path=base), base, "cpu").state_dict()
    state = merge_state_dicts(
        method, [m.state_dict() for m in loaded], weights=weights, base=anchor, **options
    )
    merged = loaded[0]
    merged.load_state_dict(state)
    staging = out.with_name(out.name + ".partial")
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizers[0].save_pretrained(staging)
    recipe = {"method": method, "models": list(folders), "base": base, "weights": weights}
    recipe |= options
    (staging / "merge.json").write_text(json.dumps(recipe, indent=2) + "\n")
    staging.replace(out)
    return out
