"""The model sections of the run config: the target and the sources, each a local HF folder
or GGUF file with its dtype, device resources and actor count."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fusion.config.base import (
    NAME,
    CustomResources,
    Device,
    Dtype,
    Strict,
    check_custom_resources,
)


class ModelConfig(Strict):
    """A model in a local Hugging Face folder."""

    path: str
    """Local folder holding config.json, weights and tokenizer (hub ids are not fetched)."""
    dtype: Dtype = "auto"
    """Weights and compute dtype: 'auto' is bfloat16 on a GPU that supports it, float32 on
    CPUs (GGUF weights are dequantised to it)."""
    gpu_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Share of each of its GPUs the model may fill (weights, cache, logits): the per-GPU
    budget of a model spread over several GPUs, and vLLM's gpu_memory_utilization (times a
    fractional num_gpus)."""
    device: Device = "auto"
    """'auto' uses CUDA when the actor was given a GPU, else the CPU."""
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel. 'auto' is 'eager' on CPUs, where it makes every row's logits
    independent of the batch it was padded into (a resumed run writes the same bytes as an
    uninterrupted one), and the transformers default on GPUs."""
    trust_remote_code: bool = False
    """Allow code shipped with the model to run. Off unless you trust its source."""
    allow_pickle: bool = False
    """Allow pickle (.bin/.pt) weights; safetensors only otherwise, since pickle can run code."""
    gguf_file: str | None = None
    """A GGUF file inside `path` to load (dequantised by transformers) instead of safetensors."""
    cpu_threads: Annotated[int, Field(ge=1)] | None = None
    """Torch threads of this model's actors on CPUs (default: the whole CPUs reserved, at
    least one); more threads than reserved CPUs let a fractional actor use idle cores."""
    bos: Literal["auto", "always", "never"] = "auto"
    """Read each chunk after the tokenizer's BOS token: 'auto' when the tokenizer adds one by
    default (a model trained with BOS reads much worse without it), 'always', or 'never'.
    The BOS position predicts nothing of the chunk and is dropped from the teacher data; a
    target read with BOS is trained on rows that start with it. Reference mode reads without
    BOS, as the reference does."""
    logits_budget_mb: Annotated[int, Field(ge=1)] = 256
    """Memory for the float32 logits of one chunk of positions: the output head runs over as
    many positions at a time as fit, so a batch's [B, L, V] logits never exist at once."""
    resources: CustomResources = Field(default_factory=dict)
    """Custom Ray resources each actor of this model takes, e.g. {a100_80g: 1}: its actors
    run only on nodes that declare them (`ray start --resources`, a node type's
    `resources`), so a 70B source goes to the big-GPU group and small ones elsewhere."""
    accelerator_type: str | None = None
    """Run this model's actors only on nodes with this accelerator (Ray's names: A100, H100,
    L4, ...; `ray.util.accelerators`)."""

    _custom_resources = field_validator("resources")(check_custom_resources)


def actor_range(data: object) -> object:
    """``actors: "1-4"`` or ``{min: 1, max: 4}`` is a pool that grows from ``actors`` to
    ``max_actors`` as nodes join (and shrinks when they go); a plain number is a fixed pool."""
    if not isinstance(data, dict):
        return data
    value = data.get("actors")
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", value):
        low, high = (int(part) for part in value.split("-"))
    elif isinstance(value, dict) and set(value) == {"min", "max"}:
        low, high = value["min"], value["max"]
    else:
        return data
    if "max_actors" in data:
        raise ValueError("give the pool's range once: actors: 'MIN-MAX' or max_actors, not both")
    return data | {"actors": low, "max_actors": high}


class ActorPool(Strict):
    """How many Ray actors run a model: a fixed pool, or one that autoscales."""

    actors: Annotated[int, Field(ge=1)] = 1
    """Actors running this model; more actors, more throughput. 'MIN-MAX' (or {min, max})
    is a pool that starts with MIN and grows to MAX as the cluster has room (Ray Data's
    autoscaling actor pool), shrinking again when nodes go."""
    max_actors: Annotated[int, Field(ge=1)] | None = None
    """The autoscaling pool's largest size (set by actors: 'MIN-MAX'); none: a fixed pool."""

    _actor_range = model_validator(mode="before")(actor_range)

    @model_validator(mode="after")
    def _range_ordered(self):
        if self.max_actors is not None and self.max_actors < self.actors:
            raise ValueError(
                f"actors: the pool's largest size ({self.max_actors}) is below its smallest "
                f"({self.actors})"
            )
        return self

    def pool_sizes(self) -> dict[str, int]:
        """Ray Data's ActorPoolStrategy arguments for this pool."""
        if self.max_actors is None or self.max_actors == self.actors:
            return {"size": self.actors}
        return {"min_size": self.actors, "max_size": self.max_actors}


class SourceConfig(ActorPool, ModelConfig):
    """One source ("blending") model and the Ray actors that run it."""

    name: str
    """Identifier used in column names: letters, digits, '_' and '-', starting with a letter."""
    backend: Literal["hf", "vllm", "simulated"] = "hf"
    """'hf' runs transformers; 'vllm' runs vLLM's engine (optional extra `fusion[vllm]`);
    'simulated' is for benchmarks only: it waits instead of computing a model."""
    simulated_tokens_per_s: Annotated[float, Field(gt=0)] | None = None
    """backend 'simulated' only: the model speed it stands in for; each forward pass waits
    its tokens / this many seconds and returns valid top-k of the tokenizer's vocabulary."""
    align_actors: Annotated[int, Field(ge=1)] | None = None
    """Actors aligning this source's top-k to the target (0.1 CPU each); default: one per
    model actor, so alignment keeps up as the model pool grows."""
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    """CPUs reserved per actor (fractions allowed)."""
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    """GPUs per actor: a fraction shares one GPU between actors; 2 or more (whole numbers)
    spread the model across that many GPUs (too large for one)."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Chunks per forward pass."""
    max_length: Annotated[int, Field(ge=2)] | None = None
    """Longest token sequence this model reads (default: its max_position_embeddings);
    target positions beyond what it read get the one-hot fallback."""

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus_beyond_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(
                f"{value:g}: a model spread over several GPUs takes whole GPUs (2, 4, 8); "
                "fractions share a single GPU (0.5)"
            )
        return value

    @model_validator(mode="after")
    def _simulated_speed(self) -> SourceConfig:
        if (self.backend == "simulated") != (self.simulated_tokens_per_s is not None):
            raise ValueError(
                "simulated_tokens_per_s goes with backend 'simulated' (a benchmark stand-in "
                "for a model) and only with it"
            )
        return self

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(
                f"{value!r} is not a usable name: use letters, digits, '_' or '-', starting "
                "with a letter (it becomes part of column names)"
            )
        if value in ("fused", "target"):
            raise ValueError(f"{value!r} is reserved for the fused teacher and the target")
        return value


class TargetConfig(ActorPool, ModelConfig):
    """The model being trained; its tokenizer defines the data set's token ids."""

    as_teacher: bool = True
    """Run the target as a teacher candidate too (the paper does)."""
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    """CPUs reserved per target-teacher actor."""
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    """GPUs reserved per target-teacher actor."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Chunks per forward pass of the target teacher."""
