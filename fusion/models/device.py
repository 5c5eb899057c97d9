"""One device and dtype policy for every model actor and training worker, and a CPU check of
the rule GPUs enforce: collectives run on tensors that live on the engine's device.

``dtype: auto`` is bfloat16 on a CUDA device that supports it and float32 elsewhere. NCCL
refuses a collective on a CPU tensor, so on a CPU machine the same mistake goes unnoticed;
``strict_device`` makes it fail there too: tensors that fusion's own code creates without
naming a device land on ``meta`` (as they would land on the CPU beside a CUDA engine), and
every collective refuses a tensor that is not on the engine's device.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from fusion.errors import FusionError

_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce",
)


class DeviceRuleError(FusionError):
    """A collective on a tensor off the engine's device: NCCL would refuse it on GPUs."""


def resolve_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype of a ``dtype`` setting on ``device`` ('auto': bf16 on capable GPUs)."""
    if setting != "auto":
        return getattr(torch, setting)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (AVX-512 BF16 or AMX). Without it,
    bf16 autocast on the CPU is emulated: a small Llama's training step took 7x as long as in
    float32 on an AVX2-only EPYC, where it is faster on CPUs that have it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class _FusionTensorsOnMeta(TorchFunctionMode):
    """Factory calls made by fusion's own modules without a device get ``meta`` instead of the
    default device, so a tensor that would sit on the wrong device on a GPU is caught."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("fusion.") and caller != __name__:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_device(device: torch.device | str) -> Iterator[None]:
    """Within the block, refuse collectives on tensors off ``device`` (see the module doc)."""
    import torch.distributed as dist

    device = torch.device(device)
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def guarded(name: str, collective):
        def check(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                for each in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(each, torch.Tensor) and each.device.type != device.type:
                        raise DeviceRuleError(
                            f"torch.distributed.{name} on a tensor on {each.device}, but the "
                            f"engine's device is {device}: NCCL refuses this on GPUs; create "
                            "the tensor on the engine's device"
                        )
            return collective(*args, **kwargs)

        return check

    for name, collective in originals.items():
        setattr(dist, name, guarded(name, collective))
    try:
        with _FusionTensorsOnMeta():
            yield
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
