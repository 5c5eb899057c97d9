"""The run configuration: one YAML file describes target, sources, data, alignment, fusion and
output. Every field has a default where one is sensible and help text; errors name the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusion.errors import FusionError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ConfigError(FusionError):
    """A configuration that cannot run; the message lists every problem, one per line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Strict):
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


class SourceConfig(ModelConfig):
    """One source ("blending") model and the Ray actors that run it."""

    name: str
    """Identifier used in column names: letters, digits, '_' and '-', starting with a letter."""
    backend: Literal["hf", "vllm", "simulated"] = "hf"
    """'hf' runs transformers; 'vllm' runs vLLM's engine (optional extra `fusion[vllm]`);
    'simulated' is for benchmarks only: it waits instead of computing a model."""
    simulated_tokens_per_s: Annotated[float, Field(gt=0)] | None = None
    """backend 'simulated' only: the model speed it stands in for; each forward pass waits
    its tokens / this many seconds and returns valid top-k of the tokenizer's vocabulary."""
    actors: Annotated[int, Field(ge=1)] = 1
    """Actors in this source's pool; more actors, more throughput."""
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
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a usable name: use letters, digits, '_' or '-', starting "
                "with a letter (it becomes part of column names)"
            )
        if value in ("fused", "target"):
            raise ValueError(f"{value!r} is reserved for the fused teacher and the target")
        return value


class TargetConfig(ModelConfig):
    """The model being trained; its tokenizer defines the data set's token ids."""

    as_teacher: bool = True
    """Run the target as a teacher candidate too (the paper does)."""
    actors: Annotated[int, Field(ge=1)] = 1
    """Actors running the target as a teacher; more actors, more throughput."""
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    """CPUs reserved per target-teacher actor."""
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    """GPUs reserved per target-teacher actor."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Chunks per forward pass of the target teacher."""


class DataConfig(_Strict):
    """The corpus."""

    paths: Annotated[list[str], Field(min_length=1)]
    """Files, folders or globs; local or any URI pyarrow understands (s3://, gs://)."""
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    """'auto' decides by file extension (.txt, .jsonl/.json, .parquet)."""
    text_field: str = "text"
    """Column or JSON key holding the document text."""
    id_field: str | None = None
    """Column holding a stable document id; by default the file and row number."""
    domain_field: str | None = None
    """Column holding a domain label, kept for per-domain evaluation."""
    max_length: Annotated[int, Field(ge=2)] = 2048
    """Longest chunk, in target tokens; longer documents are cut into several chunks."""
    shard_mb: Annotated[float, Field(gt=0)] = 64.0
    """Uncompressed JSONL files larger than this are read as byte ranges of this size, in
    parallel (each range is a unit of resume)."""
    block_chunks: Annotated[int, Field(ge=1)] = 64
    """Chunks per block handed from reading to the models: progress and commits come at
    least this often, however large a document or shard is."""
    readers: Annotated[int, Field(ge=1)] | None = None
    """Actors reading and chunking the corpus (0.1 CPU each); default: one per four model
    actors, at most one per shard."""


class AlignConfig(_Strict):
    """How source distributions are moved into the target vocabulary."""

    method: Literal["auto", "dtw", "offsets", "bytes"] = "auto"
    """'dtw' as the reference; 'offsets' pairs positions by character offsets (exact);
    'bytes' projects each source's full next-token distribution into the target vocabulary
    where the target's tokens end (clean mode, hf sources; vocab_map is then not used).
    'auto' is 'dtw' in reference mode and 'bytes' in clean mode ('offsets' where a source's
    backend gives only a top-k): the resolved config names the method that ran."""
    vocab_map: Literal["mined", "exact"] = "mined"
    """'mined' maps unmatched tokens to the nearest by edit distance; 'exact' drops them."""
    mode: Literal["reference", "clean"] = "reference"
    """'reference' reproduces FuseLLM's quirks; 'clean' fixes them (see README)."""
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    """Entries kept per position."""
    map_cache: str | None = "~/.cache/fusion/vocab-maps"
    """Folder where vocabulary maps and byte-projection tables are kept, keyed by what they
    depend on (both tokenizers, markers, kind), so a re-run or another job reuses them (null:
    always compute)."""


class FuseConfig(_Strict):
    """How candidate distributions become one teacher."""

    method: Literal["min_ce", "avg_ce"] = "min_ce"
    """MinCE takes the candidate with the lowest CE; AvgCE mixes them."""
    granularity: Literal["sequence", "token"] = "sequence"
    """Choose once per chunk or per position."""
    ce_unit: Literal["auto", "token", "byte"] = "auto"
    """What a per-sequence CE is divided by: 'token' (the reference: each model's mean NLL
    per token of its own tokenization, which favours tokenizers that split more) or 'byte'
    (total NLL over the chunk's UTF-8 bytes, comparable across tokenizers). 'auto' is
    'byte' in clean mode and 'token' in reference mode. Per-token fusion scores every
    candidate on the same target token, so the unit does not matter there."""
    no_teacher: Literal["one_hot", "mask"] = "one_hot"
    """A position where no candidate has a usable distribution (none aligned there, or per
    token none whose top-k holds the label): 'one_hot' teaches the label, 'mask' leaves the
    position out of the fusion loss."""

    def per_byte(self, mode: str) -> bool:
        """Whether per-sequence CEs are compared per byte under alignment ``mode``."""
        return self.ce_unit == "byte" or (self.ce_unit == "auto" and mode == "clean")


class OutputConfig(_Strict):
    """Where the fused data set goes."""

    dir: str
    """Folder (or URI) of the Parquet data set and its manifest.json."""
    rows_per_file: Annotated[int, Field(ge=1)] = 512
    """Rows per Parquet file, each a commit: a killed run keeps every file it finished."""


class TrainConfig(_Strict):
    """Continual training of the target on ``λ·CLM + (1−λ)·fusion``.

    Defaults are the paper's settings: AdamW (0.9, 0.95), weight decay 0.1, lr 1e-5 with
    0.8% warm-up and cosine decay, gradient clipping 1.0, ZeRO-2, 128 sequences per step.
    """

    data: str | None = None
    """Prepared data folder (`fusion prepare` output); default output.dir."""
    teacher: str = "fused"
    """Which distribution to learn from: 'fused', a source name or 'target'."""
    lam: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    """λ: weight of the CLM loss; 1 − λ weighs the fusion loss."""
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    """DeepSpeed ZeRO or plain PyTorch DDP."""
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 2
    """DeepSpeed ZeRO stage (0–3). Stage 3 builds the target already partitioned across the
    workers, so no worker ever holds a full copy (what lets a 7B target train on 8 GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: much less memory
    for long sequences (a 7B target at 2048 tokens), about a third more compute."""
    num_workers: Annotated[int, Field(ge=1)] = 1
    """Training workers (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); CPU workers use gloo."""
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    """CPUs reserved per worker; fractions leave room for streamed pipeline actors."""
    cpu_threads: Annotated[int, Field(ge=1)] | None = None
    """Torch threads of a CPU worker (default: its whole CPUs, at least one); more threads
    than reserved CPUs let a worker use cores the reservation leaves to short data tasks."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: 'auto' is bf16 with use_gpu, fp32 otherwise (master weights fp32)."""
    lr: Annotated[float, Field(gt=0)] = 1e-5
    """Peak learning rate."""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Cosine decays to lr × min_lr_ratio."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.008
    """Share of the steps spent warming up linearly."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warm-up."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    """AdamW weight decay (not applied to biases and norms)."""
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Global gradient-norm clip (0: off)."""
    global_batch_size: Annotated[int, Field(ge=1)] = 128
    """Sequences per optimizer step, over all workers."""
    micro_batch_size: Annotated[int, Field(ge=1)] = 8
    """Sequences per worker per forward pass; accumulation fills the global batch."""
    epochs: Annotated[int, Field(ge=1)] = 1
    """Passes over the data."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (default: epochs over the data)."""
    seed: int = 42
    """Seeds weights' dropout, data order and everything else random."""
    mask_fallback: bool = False
    """Leave positions whose teacher is a one-hot fallback out of the fusion loss (clean)."""
    teacher_precision: Literal["fp32", "bf16"] = "fp32"
    """'bf16' rounds teacher probabilities as the reference's dense target does."""
    kd_tail: Literal["renormalise", "bucket"] = "renormalise"
    """The teacher's mass outside its stored top-k: 'renormalise' drops it and rescales the
    top-k to sum to 1 (the reference); 'bucket' keeps the top-k's own probabilities and
    teaches the rest as one bucket: the student's mass on every other token."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 100
    """Optimizer steps between checkpoints."""
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    """Checkpoints kept on storage."""
    resume: Literal["auto", "never"] = "auto"
    """'auto' continues from the latest checkpoint when there is one."""
    max_failures: Annotated[int, Field(ge=0)] = 0
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint)."""
    verify_data: Literal["sha256", "size"] = "sha256"
    """How the teacher files are checked against the manifest before training: 'sha256'
    reads every byte once; 'size' only compares lengths (for data sets of many terabytes)."""
    storage_path: str | None = None
    """Checkpoints, metrics and export live here; default <output.dir>/train."""
    log_every: Annotated[int, Field(ge=1)] = 1
    """Optimizer steps between metric lines."""
    eval_data: dict[str, str] = Field(default_factory=dict)
    """Held-out corpora by domain name (any corpus format): bits-per-byte is logged at the
    start, every eval_every steps and at the end."""
    eval_every: Annotated[int, Field(ge=1)] | None = None
    """Optimizer steps between held-out evaluations (default: start and end only)."""
    eval_max_length: Annotated[int, Field(ge=2)] = 1024
    """Window of the held-out evaluation, in target tokens."""

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size × num_workers ({per_step})"
            )
        return self

    @property
    def bf16(self) -> bool:
        """Whether training computes in bf16."""
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    @property
    def accumulation(self) -> int:
        """Micro-batches per worker per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


class RayConfig(_Strict):
    """The Ray cluster to use."""

    address: str | None = None
    """'auto' or ray://… for a running cluster; empty starts a local Ray."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime_env for the job's workers."""
    max_resources: dict[str, Annotated[float, Field(ge=0)]] | None = None
    """What an autoscaling cluster can grow to, e.g. {CPU: 224, GPU: 32}, where its
    autoscaler does not publish it; a run that fits only after it grows waits instead of
    being refused."""


class FusionConfig(_Strict):
    """A whole fusion run."""

    target: TargetConfig
    sources: Annotated[list[SourceConfig], Field(min_length=1)]
    data: DataConfig
    align: AlignConfig = AlignConfig()
    fuse: FuseConfig = FuseConfig()
    output: OutputConfig
    train: TrainConfig | None = None
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _distinct_sources(self) -> FusionConfig:
        seen: dict[str, int] = {}
        for index, source in enumerate(self.sources):
            if source.name in seen:
                raise ValueError(
                    f"sources.{index}.name: {source.name!r} is already the name of "
                    f"sources.{seen[source.name]}; source names must be distinct"
                )
            seen[source.name] = index
        return self

    @model_validator(mode="after")
    def _projection_needs(self) -> FusionConfig:
        if self.align.method == "auto":
            return self.model_copy(
                update={"align": self.align.model_copy(update={"method": self._auto_method()})}
            )
        if self.align.method != "bytes":
            return self
        if self.align.mode != "clean":
            raise ValueError(
                "align.method 'bytes' is a clean-mode method (the reference has no byte "
                "projection): set align.mode: clean"
            )
        for index, source in enumerate(self.sources):
            if source.backend != "hf":
                raise ValueError(
                    f"sources.{index}.backend: {source.backend!r} gives only a top-k, but "
                    "align.method 'bytes' projects each source's full distribution: use "
                    "backend 'hf' (or align.method 'offsets')"
                )
        return self

    def _auto_method(self) -> str:
        """What ``align.method: auto`` means for this config (see AlignConfig.method)."""
        if self.align.mode == "reference":
            return "dtw"
        return "bytes" if all(s.backend == "hf" for s in self.sources) else "offsets"


def _describe(error: dict[str, Any]) -> str:
    """One line per problem: the dotted field path, then what is wrong in words."""
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check its spelling and nesting)"
    if error["type"] == "missing":
        return f"{where}: required but missing"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), str | int | float | bool) and error["type"] != "value_error":
        message += f" (got {error['input']!r})"
    return f"{where}: {message}" if where else message


def parse_config(raw: dict[str, Any], base: Path | None = None) -> FusionConfig:
    """Validate a config mapping; relative local paths are taken relative to ``base``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    try:
        config = FusionConfig.model_validate(raw)
    except ValidationError as error:
        lines = [_describe(e) for e in error.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    return resolve_paths(config, base) if base is not None else config


def _resolve(path: str, base: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base / path).resolve())


def _resolve_model(path: str, base: Path) -> str:
    """A model folder against ``base``; a hub id (``org/name``, no such folder) stays as it is,
    so that loading can say it is one instead of naming a folder the user never wrote."""
    resolved = _resolve(path, base)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/"))
    return path if looks_like_hub_id and not Path(resolved).exists() else resolved


def resolve_paths(config: FusionConfig, base: Path) -> FusionConfig:
    """Make local paths absolute against ``base`` (the config file's folder)."""
    return config.model_copy(
        update={
            "target": config.target.model_copy(
                update={"path": _resolve_model(config.target.path, base)}
            ),
            "sources": [
                s.model_copy(update={"path": _resolve_model(s.path, base)}) for s in config.sources
            ],
            "data": config.data.model_copy(
                update={"paths": [_resolve(p, base) for p in config.data.paths]}
            ),
            "output": config.output.model_copy(update={"dir": _resolve(config.output.dir, base)}),
            "train": None
            if config.train is None
            else config.train.model_copy(
                update={
                    key: _resolve(value, base)
                    for key in ("data", "storage_path")
                    if (value := getattr(config.train, key)) is not None
                }
                | {
                    "eval_data": {
                        domain: _resolve(path, base)
                        for domain, path in config.train.eval_data.items()
                    }
                }
            ),
        }
    )


def load_config(path: str | Path) -> FusionConfig:
    """Read and validate a YAML config file."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(file)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(file)!r} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {error}") from None
    return parse_config(raw, base=file.resolve().parent)


def config_to_yaml(config: FusionConfig) -> str:
    """The resolved config as YAML (written next to every output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
