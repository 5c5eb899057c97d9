"""`fusion estimate`: disk, memory and rough time of a prepare run, before anything runs.

Tokens come from the corpus size and the target tokenizer's tokens per byte on a sample;
disk from the row contract's bytes per token, for the stored chunks and units and the fused
set (an upper bound: Parquet compresses); memory from
the parameter counts in the safetensors or GGUF headers plus the logits of one chunk of
positions (each model's own vocabulary); time from forward FLOPs (2 × parameters per token)
at an assumed device throughput — a rough guide only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fusion.cluster import cluster_demand, total, training_demand
from fusion.config import FusionConfig, ModelConfig
from fusion.data.chunking import encode
from fusion.data.corpus import Shard, compression_of, open_filesystem, plan_shards, read_documents
from fusion.models.gguf_header import read_gguf_header
from fusion.models.loading import gguf_file_in, model_config_values, model_tokenizer

ASSUMED_FLOPS = {"cpu_core": 2e10, "gpu": 1e14}  # effective forward FLOP/s
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAMPLE_BYTES = 400_000
_SAMPLE_SHARDS = 8


@dataclass(frozen=True)
class ModelEstimate:
    """One model's share of the run."""

    name: str
    parameters: int
    memory_bytes: int
    seconds: float
    gpus: float = 0.0
    gpu_budget_bytes: int = 0  # what its GPUs (or its share of one) may hold

    @property
    def per_gpu_bytes(self) -> int:
        """Memory on each of its GPUs (spread evenly over whole GPUs), 0 on CPUs."""
        return int(self.memory_bytes / max(self.gpus, 1)) if self.gpus > 0 else 0

    @property
    def fits(self) -> bool:
        """Whether its GPUs hold it (always, on CPUs)."""
        return self.gpus == 0 or self.per_gpu_bytes <= self.gpu_budget_bytes


@dataclass(frozen=True)
class TrainingEstimate:
    """Memory of one training worker: weights, gradients and optimizer state (ZeRO shares
    them out over the workers), activations not included."""

    parameters: int
    stage: int
    workers: int
    bytes_per_worker: int


@dataclass(frozen=True)
class Estimate:
    """The whole run."""

    corpus_bytes: int
    tokens: int
    disk_bytes: int
    models: list[ModelEstimate]
    training: TrainingEstimate | None = None
    prepare_demand: dict[str, float] | None = None
    """Ray resources the prepare pipeline reserves (model actors and CPU stages)."""
    training_demand: dict[str, float] | None = None
    """Ray resources of the training workers."""

    @property
    def seconds(self) -> float:
        """Stages stream, so the slowest stage bounds the run."""
        return max(m.seconds for m in self.models)


def _size(shard: Shard, text_field: str) -> int:
    """Bytes of text in a shard (uncompressed text column for Parquet)."""
    if shard.format == "parquet":
        filesystem, inner = open_filesystem(shard.path)
        metadata = pq.ParquetFile(filesystem.open_input_file(inner)).metadata
        group = metadata.row_group(shard.row_group)
        return sum(
            group.column(c).total_uncompressed_size
            for c in range(group.num_columns)
            if group.column(c).path_in_schema == text_field
        )
    size = shard.size  # its byte range of a split JSONL file; compressed bytes if compressed
    if shard.format == "jsonl":
        filesystem, inner = open_filesystem(shard.path)
        size = int(size * _jsonl_text_fraction(filesystem, inner, text_field, shard.path))
    return size


def _jsonl_text_fraction(
    filesystem: pafs.FileSystem, path: str, text_field: str, name: str
) -> float:
    """Share of a JSONL file's bytes that is document text, measured on its first lines."""
    with filesystem.open_input_stream(path, compression=compression_of(name)) as stream:
        head = stream.read(_SAMPLE_BYTES)
    lines = head.split(b"\n")[:-1] or [head]
    text = line_bytes = 0
    for line in lines:
        try:
            value = json.loads(line).get(text_field, "")
        except (ValueError, AttributeError):
            continue
        text += len(str(value).encode("utf-8"))
        line_bytes += len(line) + 1
    return text / line_bytes if line_bytes else 1.0


def _weight_bytes(dtype: str, gpus: float) -> int:
    """Bytes per parameter: 'auto' is bfloat16 on GPUs, float32 on CPUs."""
    if dtype == "auto":
        dtype = "bfloat16" if gpus > 0 else "float32"
    return _DTYPE_BYTES[dtype]


def parameter_count(model: ModelConfig, field: str = "model") -> int:
    """Parameters listed in the safetensors headers, or in the GGUF file's tensor table
    (no weights are read)."""
    folder = Path(model.path)
    gguf_file = gguf_file_in(folder, model.gguf_file, field)
    if gguf_file is not None:
        return read_gguf_header(folder / gguf_file).parameters
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def output_vocabulary(model: ModelConfig, field: str) -> int:
    """Width of the model's logits: its config's vocab_size (embedding rows, padding
    included), else its tokenizer's length."""
    config = model_config_values(model, field)
    size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return size if isinstance(size, int) else len(model_tokenizer(model, field))


def logits_memory(model: ModelConfig, field: str, batch: int, length: int) -> int:
    """Peak bytes of float32 logits while one batch is read: the output head runs over as
    many positions as fit ``logits_budget_mb`` (twice: the logits and their softmax)."""
    dense = batch * length * output_vocabulary(model, field) * 4
    return 2 * min(dense, model.logits_budget_mb * 2**20)


def estimate(config: FusionConfig, *, gpu_bytes: int = 80 * 2**30) -> Estimate:
    """Predict tokens, disk, memory per actor (and per GPU, against GPUs of ``gpu_bytes``),
    training memory per worker and time for ``config``."""
    shards = plan_shards(config.data)
    corpus_bytes = sum(_size(s, config.data.text_field) for s in shards)
    tokenizer = model_tokenizer(config.target, "target")
    sample_bytes = sample_tokens = 0
    step = max(1, len(shards) // _SAMPLE_SHARDS)
    for shard in shards[::step][:_SAMPLE_SHARDS]:  # spread over the corpus: densities differ
        shard_bytes = 0
        for document in read_documents(shard, config.data):
            shard_bytes += len(document.text.encode("utf-8"))
            sample_tokens += len(encode(tokenizer, document.text, True)[0])
            if shard_bytes >= _SAMPLE_BYTES // _SAMPLE_SHARDS:
                break
        sample_bytes += shard_bytes
    tokens = int(corpus_bytes * sample_tokens / max(sample_bytes, 1))
    k = config.align.top_k
    candidates = len(config.sources) + int(config.target.as_teacher)
    text = 4 + 1.2 * (corpus_bytes / max(tokens, 1))  # an id and the text's bytes per token
    fused_set = text + (candidates + 1) * 6 * k  # every candidate's columns and the fused
    units = text + 8 + candidates * 6 * k  # the stored chunks (with offsets) and each unit
    per_token = fused_set + units
    models = []
    entries: list[tuple[str, ModelConfig, float, float, int, int]] = [
        (s.name, s, s.num_cpus, s.num_gpus, s.actors, s.batch_size) for s in config.sources
    ]
    if config.target.as_teacher:
        t = config.target
        entries.insert(0, ("target", t, t.num_cpus, t.num_gpus, 1, t.batch_size))
    for name, model, cpus, gpus, actors, batch in entries:
        field = "target" if name == "target" else f"source {name!r}"
        parameters = parameter_count(model, field)
        logits = logits_memory(model, field, batch, config.data.max_length)
        rate = ASSUMED_FLOPS["gpu"] * gpus if gpus > 0 else ASSUMED_FLOPS["cpu_core"] * max(cpus, 1)
        models.append(
            ModelEstimate(
                name=name,
                parameters=parameters,
                memory_bytes=parameters * _weight_bytes(model.dtype, gpus) + logits,
                seconds=2 * parameters * tokens / (rate * actors),
                gpus=gpus,
                gpu_budget_bytes=int(gpu_bytes * model.gpu_memory_fraction * min(gpus, 1)),
            )
        )
    training = training_memory(config) if config.train is not None else None
    workers = training_demand(config)
    return Estimate(
        corpus_bytes,
        tokens,
        int(tokens * per_token),
        models,
        training,
        prepare_demand=cluster_demand(config, shards=len(shards)),
        training_demand=total([workers]) if workers else None,
    )


def training_memory(config: FusionConfig) -> TrainingEstimate:
    """Bytes per training worker for the target's weights, gradients and AdamW state under
    the configured ZeRO stage (DDP: stage 0): bf16 keeps 2-byte weights and gradients beside
    fp32 master weights, fp32 keeps 4-byte ones; AdamW adds two fp32 moments."""
    train = config.train
    parameters = parameter_count(config.target, "target")
    weights = gradients = 2 if train.bf16 else 4
    optimizer = 12 if train.bf16 else 8  # (fp32 master +) two moments
    stage = train.zero_stage if train.strategy == "deepspeed" else 0
    n = train.num_workers
    per_parameter = {
        0: weights + gradients + optimizer,
        1: weights + gradients + optimizer / n,
        2: weights + (gradients + optimizer) / n,
        3: (weights + gradients + optimizer) / n,
    }[stage]
    return TrainingEstimate(parameters, stage, n, int(parameters * per_parameter))
