"""Where a model actor puts its model: its share of one GPU, or its layers across several.

Ray gives an actor with ``num_gpus: 2`` two GPUs (``CUDA_VISIBLE_DEVICES``); a transformers
model is then spread across them layer by layer (``device_map="auto"`` under a per-GPU
budget), and a vLLM engine runs tensor-parallel over them. A fractional share (``0.5``: two
actors on one GPU) caps how much of the GPU vLLM may fill.
"""

from __future__ import annotations

from collections.abc import Sequence


def hf_placement(num_gpus: float, device: str, gpu_bytes: Sequence[int], fraction: float) -> dict:
    """``from_pretrained`` keyword arguments placing a model on its actor's GPUs (none: the
    whole model goes to ``device``)."""
    if device != "cuda" or num_gpus <= 1:
        return {}
    budget = {index: int(gpu_bytes[index] * fraction) for index in range(int(num_gpus))}
    return {"device_map": "auto", "max_memory": budget}


def vllm_placement(num_gpus: float, fraction: float) -> dict:
    """vLLM engine arguments for an actor holding ``num_gpus`` (whole GPUs: tensor
    parallelism over them; a share of one: that share of its memory)."""
    if num_gpus <= 0:
        return {}
    if num_gpus >= 1:
        placement = {"tensor_parallel_size": int(num_gpus), "gpu_memory_utilization": fraction}
        if num_gpus > 1:
            placement["distributed_executor_backend"] = "mp"  # inside the actor, on its GPUs
        return placement
    return {"tensor_parallel_size": 1, "gpu_memory_utilization": round(num_gpus * fraction, 4)}
