"""What every section of the run config shares: strict models (unknown keys refused, frozen,
attribute docstrings as help) and the error that lists every problem."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from fusion.errors import FusionError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ConfigError(FusionError):
    """A configuration that cannot run; the message lists every problem, one per line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
