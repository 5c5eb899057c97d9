"""The training section of the run config (`fusion train`, `fusion run`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from fusion.config.base import CustomResources, Strict, check_custom_resources


class TrainConfig(Strict):
    """Continual training of the target on ``λ·CLM + (1−λ)·fusion``.

    Defaults are the paper's settings: AdamW (0.9, 0.95), weight decay 0.1, lr 1e-5 with
    0.8% warm-up and cosine decay, gradient clipping 1.0, ZeRO-2, 128 sequences per step.
    """

    data: str | None = None
    """Prepared data folder (`fusion prepare` output); default output.dir."""
    teacher: str = "fused"
    """Which distribution to learn from: 'fused', a source name or 'target'."""
    lam: float | Literal["auto"] = 0.9
    """λ: weight of the CLM loss; 1 − λ weighs the fusion loss. 'auto' chooses it from the
    data set's fidelity: the further the teacher's stored bits per byte lie below the target's
    own, the more weight the teacher gets (0.9 for a teacher no better than the target, down
    to 0.5; see fusion.train.lam)."""
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
    resources: CustomResources = Field(default_factory=dict)
    """Custom Ray resources per worker, e.g. {trainer: 1}: workers run only on the nodes that
    declare them (one per node when each node declares one)."""
    accelerator_type: str | None = None
    """Run the workers only on nodes with this accelerator (A100, H100, ...); use_gpu only."""
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

    @field_validator("lam", mode="before")
    @classmethod
    def _lam_in_range(cls, value):
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"λ is a number between 0 and 1, or 'auto' (got {value!r})")
        return float(value)

    _custom_resources = field_validator("resources")(check_custom_resources)

    @model_validator(mode="after")
    def _accelerator_needs_gpus(self) -> TrainConfig:
        if self.accelerator_type is not None and not self.use_gpu:
            raise ValueError(
                f"train.accelerator_type ({self.accelerator_type}) places GPU workers: set "
                "train.use_gpu: true, or drop it"
            )
        return self

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
