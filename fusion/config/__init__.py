"""The run configuration: one YAML file describes target, sources, data, alignment, fusion and
output. Every field has a default where one is sensible and help text; errors name the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, model_validator

from fusion.config.base import ConfigError, Device, Dtype, Strict
from fusion.config.models import ModelConfig, SourceConfig, TargetConfig
from fusion.config.prepare import AlignConfig, DataConfig, FuseConfig, OutputConfig
from fusion.config.training import TrainConfig

__all__ = [
    "AlignConfig",
    "ConfigError",
    "DataConfig",
    "Device",
    "Dtype",
    "FuseConfig",
    "FusionConfig",
    "ModelConfig",
    "OutputConfig",
    "RayConfig",
    "SourceConfig",
    "TargetConfig",
    "TrainConfig",
    "config_to_yaml",
    "load_config",
    "parse_config",
    "resolve_paths",
]


class RayConfig(Strict):
    """The Ray cluster to use."""

    address: str | None = None
    """'auto' or ray://… for a running cluster; empty starts a local Ray."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime_env for the job's workers."""
    max_resources: dict[str, Annotated[float, Field(ge=0)]] | None = None
    """What an autoscaling cluster can grow to, e.g. {CPU: 224, GPU: 32}, where its
    autoscaler does not publish it; a run that fits only after it grows waits instead of
    being refused."""


class FusionConfig(Strict):
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
    def _local_rules_are_clean(self) -> FusionConfig:
        if self.fuse.granularity in ("window", "prefix") and self.align.mode != "clean":
            raise ValueError(
                f"fuse.granularity {self.fuse.granularity!r} scores candidates on their stored "
                "distributions, a clean-mode rule (the reference chooses per sequence or per "
                "token): set align.mode: clean"
            )
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
