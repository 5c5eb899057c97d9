"""What every section of the run config shares: strict models (unknown keys refused, frozen,
attribute docstrings as help) and the error that lists every problem."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fusion.errors import FusionError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ConfigError(FusionError):
    """A configuration that cannot run; the message lists every problem, one per line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# Ray's own resources, asked for through num_cpus / num_gpus; "accelerator_type:X" comes from
# the accelerator_type field.
BUILT_IN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")

CustomResources = dict[str, Annotated[float, Field(gt=0)]]


def check_custom_resources(value: dict[str, float]) -> dict[str, float]:
    """Refuse Ray's built-in resources among custom ones (they have fields of their own)."""
    for name in value:
        if name in BUILT_IN_RESOURCES or name.startswith(("node:", "accelerator_type:")):
            raise ValueError(
                f"{name!r} is not a custom resource: ask for CPUs and GPUs with num_cpus / "
                "num_gpus (cpus_per_worker / use_gpu in train) and for a GPU model with "
                "accelerator_type"
            )
    return value
