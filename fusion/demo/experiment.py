"""The demo's arms: the same target, data, order and token budget, trained different ways.

Teacher data sets are made by the real ``fusion prepare`` pipeline and every arm is trained by
the real ``fusion train`` (Ray Train). The main data set (the clean defaults: each source's
full distribution projected byte-consistently, MinCE per sequence on per-byte CE) serves
``fused``, ``clm_only`` (λ = 1: the teacher is ignored) and single-teacher distillation from
the best source, each on ``scale.orders`` data orders, so the report can give each difference
with its 95 % interval (t over the orders, a paired bootstrap over held-out documents).
Variants that only fuse differently (AvgCE, MinCE per token) are re-fused from the main data
set's stored candidates (`fusion refuse`, no model runs); variants that align differently
(character offsets with MinED, the reference settings: DTW, the reference's quirks, bf16
teacher) need their own `fusion prepare`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fusion.config import FusionConfig, config_to_yaml, parse_config
from fusion.data.files import write_text_atomically
from fusion.demo.real_source import NAME as GEMMA
from fusion.demo.world import SOURCES, TARGET, Scale, World
from fusion.models.device import cpu_computes_bf16

# λ from each data set's fidelity (`train.lam: auto`): 0.83 for the demo's three experts, whose
# fused teacher saves the target 7 % of its bits, 0.5 with Gemma-3-270M (bench/multi_source.py:
# λ 0.5 with weak sources was 2.6 % worse than CLM, auto within noise of it).
LAM = "auto"
LR = 1e-3
MAIN_FUSE = {"method": "min_ce", "granularity": "sequence", "ce_unit": "byte"}
MAIN_ALIGN = {"method": "bytes", "mode": "clean", "top_k": 10}


@dataclass(frozen=True)
class Arm:
    """One way of training the target: which data set, which teacher, which λ."""

    name: str
    dataset: str
    description: str
    teacher: str = "fused"
    lam: float | str = LAM  # "auto": chosen from the data set's fidelity
    order: int = 0
    train: dict = field(default_factory=dict, hash=False)


def ordered(name: str, order: int) -> str:
    """The name of an arm trained on data order ``order`` (0: the name itself)."""
    return name if order == 0 else f"{name}_order{order + 1}"


PREPARED: dict[str, dict] = {
    "main": {},
    "offsets": {
        "align": {"method": "offsets", "vocab_map": "mined", "mode": "clean"},
        "fuse": {"method": "min_ce", "granularity": "token"},
    },
    "reference": {
        "align": {"method": "dtw", "vocab_map": "mined", "mode": "reference"},
        "fuse": {"method": "min_ce", "granularity": "sequence"},
    },
}
REFUSED: dict[str, dict] = {  # fused again from "main"'s stored candidates: fuse, candidates
    "avg_ce": {"fuse": {"method": "avg_ce", "granularity": "sequence", "ce_unit": "byte"}},
    "token": {"fuse": {"method": "min_ce", "granularity": "token"}},
}


def arms(scale: Scale, best_source: str) -> list[Arm]:
    """The arms of this scale: the baselines on every data order, the FuseLLM variants on the
    first when the scale allows."""
    fused = f"fusion, λ {LAM}: MinCE per sequence over target + sources, bytes projection"
    clm = "continual training on the same text, λ=1"
    single = f"single-teacher distillation from the best source ({best_source}), λ {LAM}"
    chosen = []
    for order in range(scale.orders):
        which = "" if order == 0 else f"; data order {order + 1}"
        chosen += [
            Arm(ordered("fused", order), "main", fused + which, order=order),
            Arm(ordered("clm_only", order), "main", clm + which, lam=1.0, order=order),
            Arm(
                ordered(f"distill_{best_source}", order),
                "main",
                single + which,
                teacher=best_source,
                order=order,
            ),
        ]
    if scale.variants:
        chosen += [
            Arm("fused_avg_ce", "avg_ce", "fusion with AvgCE instead of MinCE"),
            Arm("fused_token", "token", "fusion with MinCE per token instead of per sequence"),
            Arm(
                "fused_offsets",
                "offsets",
                "fusion from character-offset alignment with MinED (top-10 of each source) "
                "instead of the bytes projection, MinCE per token",
            ),
            Arm(
                "fused_reference",
                "reference",
                "FuseLLM with the reference settings (DTW, quirks, MinCE per sequence, bf16 "
                "teacher)",
                train={"teacher_precision": "bf16"},
            ),
        ]
    return chosen


def _relative(path: Path, root: Path) -> str:
    return str(path.resolve().relative_to(root.resolve()))


def raw_config(world: World, out: Path, scale: Scale, dataset: str = "main") -> dict:
    """The run config of a data set (paths relative to ``out``), with the fused arm's training."""
    sources = [
        {"name": spec.name, "path": _relative(world.models[spec.name], out), "num_cpus": 0.25}
        for spec in SOURCES
    ]
    if GEMMA in world.models:  # --real-source: a 270M model, the slowest reader by far
        gemma = {"num_cpus": 0.5, "cpu_threads": 2, "batch_size": 4}
        sources.append({"name": GEMMA, "path": _relative(world.models[GEMMA], out), **gemma})
    # Fractions small enough that `fusion run` (actors and the training worker side by side)
    # also fits two CPUs; the threads a worker computes with are set by cpu_threads.
    raw = {
        "target": {"path": _relative(world.models[TARGET.name], out), "num_cpus": 0.25},
        "sources": sources,
        "data": {
            "paths": [_relative(world.continual, out)],
            "domain_field": "domain",
            "id_field": "id",
            "max_length": scale.max_length,
        },
        "align": dict(MAIN_ALIGN),
        "fuse": dict(MAIN_FUSE),
        "output": {"dir": f"teacher/{dataset}", "rows_per_file": 1024},
        "train": {
            "lam": LAM,
            "lr": LR,
            "strategy": "ddp",
            "num_workers": 1,
            "cpus_per_worker": 0.4,
            "cpu_threads": 2,
            "precision": "bf16" if cpu_computes_bf16() else "fp32",
            "global_batch_size": scale.continual_batch,
            "micro_batch_size": scale.continual_batch,
            "max_steps": scale.continual_steps,
            "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "seed": scale.seed,
            "checkpoint_every": scale.continual_steps,
            "storage_path": "arms/fused",
            "eval_data": {d: _relative(p, out) for d, p in world.held_out.items()},
            "eval_every": scale.eval_every,
            "eval_max_length": scale.max_length,
        },
    }
    for section, values in PREPARED.get(dataset, {}).items():
        raw[section] = values if section == "fuse" else raw[section] | values
    if dataset in REFUSED:
        raw["fuse"] = REFUSED[dataset]["fuse"]
        raw["target"] |= {"as_teacher": REFUSED[dataset].get("as_teacher", True)}
    return raw


def arm_config(world: World, out: Path, scale: Scale, arm: Arm) -> FusionConfig:
    """The config that trains ``arm``: its data set's, with the arm's teacher, λ and storage."""
    raw = raw_config(world, out, scale, arm.dataset)
    raw["train"] |= {
        "teacher": arm.teacher,
        "lam": arm.lam,
        "seed": scale.seed + arm.order,
        "storage_path": f"arms/{arm.name}",
        **arm.train,
    }
    if arm.name not in ("fused", "clm_only"):
        raw["train"] |= {"eval_data": {}, "eval_every": None}  # curves for the two main arms
    return parse_config(raw, base=out)


def write_run_config(world: World, out: Path, scale: Scale) -> Path:
    """``DIR/config.yaml``: the fused arm, runnable with `fusion prepare` + `fusion train`."""
    raw = raw_config(world, out, scale)
    header = (
        "# The demo's fused arm. Repeat it with `fusion prepare config.yaml && fusion train\n"
        "# config.yaml`; paths are relative to this file, so edit them to point at your own\n"
        "# models and corpus. To stream it with `fusion run config.yaml`, set train.lam to the\n"
        "# number `fusion train` printed (auto reads the prepared data set's fidelity).\n"
    )
    import yaml

    file = out / "config.yaml"
    write_text_atomically(file, header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    parse_config(raw, base=out)  # what we wrote must be a valid config
    return file


def prepare_dataset(
    world: World, out: Path, scale: Scale, dataset: str, *, echo: Callable[[str], None]
) -> dict:
    """Run (or resume) `fusion prepare` for one data set, or re-fuse it from the main one;
    return its manifest."""
    from fusion.teacher.pipeline import prepare
    from fusion.teacher.refuse import refuse

    config = parse_config(raw_config(world, out, scale, dataset), base=out)
    if dataset in REFUSED:
        main = parse_config(raw_config(world, out, scale, "main"), base=out).output.dir
        summary = refuse(
            main,
            config.output.dir,
            config.fuse.model_dump(),
            with_target=config.target.as_teacher,
            overwrite=True,
        )
    else:
        summary = prepare(config, overwrite=True, quiet=True, echo=lambda _: None)
    echo(f"  teacher data {dataset}: {summary.line()}")
    return json.loads((Path(config.output.dir) / "manifest.json").read_text())


def train_arm(
    world: World, out: Path, scale: Scale, arm: Arm, *, echo: Callable[[str], None]
) -> Path:
    """Train one arm with `fusion train` (resuming its checkpoints) unless it is done."""
    from fusion.train.trainer import train

    config = arm_config(world, out, scale, arm)
    storage = Path(config.train.storage_path)
    recipe = storage / "arm-config.yaml"
    export = storage / "export"
    wanted = config_to_yaml(config)
    same = recipe.is_file() and recipe.read_text() == wanted
    if same and (export / "training_summary.json").is_file():
        echo(f"  {arm.name}: trained earlier, reusing {_relative(export, out)}")
        return export
    if not same:  # another recipe's checkpoints must not be resumed
        shutil.rmtree(storage, ignore_errors=True)
        storage.mkdir(parents=True)
        recipe.write_text(wanted)
    summary = train(config, quiet=True)
    echo(f"  {arm.name}: {summary.steps} steps, {summary.tokens_seen:,} tokens")
    return Path(summary.export_dir)
