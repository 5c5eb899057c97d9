"""`fusion demo`: build the world, prepare teacher data, train every arm, evaluate, report."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fusion.data.files import write_text_atomically
from fusion.demo.corpora import DOMAINS, build_corpora, write_jsonl
from fusion.demo.experiment import (
    LAM,
    LR,
    arms,
    ordered,
    prepare_dataset,
    train_arm,
    write_run_config,
)
from fusion.demo.real_source import NAME as GEMMA
from fusion.demo.real_source import gemma_folder
from fusion.demo.report import (
    intervals,
    learning_curve,
    token_efficiency,
    verdict,
    write_report,
)
from fusion.demo.world import PAIR, SOURCES, TARGET, TOKENIZERS, Scale, World, build_world

QUICK = Scale(
    code_chars=1_000_000,
    arith_lines=20_000,
    held_out_chars=12_000,
    expert_steps=40,
    target_steps=20,
    tuned_steps=15,
    pretrain_batch=16,
    continual_steps=30,
    continual_batch=16,
    eval_every=10,
    variants=False,
)
FULL = Scale(
    code_chars=1_500_000,
    arith_lines=30_000,
    held_out_chars=20_000,
    expert_steps=64,
    target_steps=30,
    tuned_steps=20,
    continual_steps=60,
    continual_batch=16,
    eval_every=20,
    variants=True,
)


def _baselines(world: World, out: Path, echo: Callable[[str], None]) -> dict[str, list[str]]:
    """Ensemble and merges of the same-architecture pair (merged folders cached by recipe)."""
    from fusion.evaluate.merge import merge_models

    pair = [str(world.models[spec.name]) for spec in PAIR]
    base = str(world.models[TARGET.name])
    members = {"ensemble_pair": pair}
    for method, options in (("linear", {}), ("ties", {"density": 0.5, "scale": 1.0})):
        folder = out / "baselines" / f"{method}_merge"
        recipe = {"method": method, "models": pair, "base": base if method == "ties" else None}
        recipe |= {"weights": None, **options}
        done = folder / "merge.json"
        if not (done.is_file() and json.loads(done.read_text()) == recipe):
            shutil.rmtree(folder, ignore_errors=True)
            merge_models(method, pair, folder, base=recipe["base"], **options)
            echo(f"  merged the pair ({method}) into {folder.relative_to(out)}")
        members[f"{method}_merge"] = [str(folder)]
    return members


def held_out_files(out: Path, scale: Scale) -> dict[str, Path]:
    """The held-out text the report scores every model on: ``scale.eval_chars`` per domain
    from the held-out modules and topics (a superset of the world's, which the training
    curves read), so that the evaluation part of an interval stays small (about 0.1 % on the
    average at 60 KB per domain, measured with bench/multi_source.py)."""
    corpora = build_corpora(
        code_chars=scale.code_chars,
        arith_lines=scale.arith_lines,
        held_out_chars=scale.eval_chars,
        continual_share=0.3,
        seed=scale.seed,
    )
    return {
        domain: write_jsonl(
            out / "held-out" / f"{domain}.jsonl",
            [{"id": f"{domain}-{i}", "text": t} for i, t in enumerate(corpora.held_out[domain])],
        )
        for domain in DOMAINS
    }


def _evaluate(
    members: dict[str, list[str]], held: dict[str, Path], scale: Scale, *, documents: bool = False
) -> dict[str, dict]:
    from fusion.evaluate.bpb import evaluate

    corpora = {domain: str(path) for domain, path in held.items()}
    return evaluate(
        members, corpora, max_length=scale.max_length, batch_size=16, documents=documents
    )


def _trained_lam(export: Path) -> float:
    """The λ an arm trained with (``auto`` resolved), from the config its export keeps."""
    import yaml

    return float(yaml.safe_load((export / "fusion-config.yaml").read_text())["train"]["lam"])


def _roles(arm_list, best: str) -> dict[str, str]:
    roles = {spec.name: f"source ({spec.architecture}, {spec.tokenizer})" for spec in SOURCES}
    roles[GEMMA] = "source (Gemma-3-270M, GGUF, 262,144 tokens)"
    roles |= {
        TARGET.name: "target before training",
        "code_tuned": "target_init tuned on code",
        "prose_tuned": "target_init tuned on prose",
        "ensemble_pair": "ensemble of the pair",
        "linear_merge": "linear merge of the pair",
        "ties_merge": "TIES merge of the pair",
    }
    return roles | {arm.name: "trained arm" for arm in arm_list}


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    scale: Scale | None = None,
    real_source: bool = False,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the whole experiment under ``out`` and return ``results.json``'s content; with
    ``real_source``, Gemma-3-270M teaches as a fourth source."""
    import ray
    import ray.data

    started = time.perf_counter()
    scale = scale or (QUICK if quick else FULL)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray").setLevel(logging.WARNING)  # the demo prints its own progress
    ray.data.DataContext.get_current().issue_detectors_config.detectors = []
    phases: dict[str, float] = {}

    def phase(name: str, tick: float) -> float:
        phases[name] = round(time.perf_counter() - tick, 1)
        return time.perf_counter()

    tick = time.perf_counter()
    echo(f"building the world under {out / 'world'} (cached after the first run)")
    world = build_world(out / "world", scale, echo=echo)
    if real_source:
        world.models[GEMMA] = gemma_folder(out / "world" / "models")
    config_file = write_run_config(world, out, scale)
    held = held_out_files(out, scale)
    tick = phase("world", tick)

    echo("evaluating the sources, the target and the pair's baselines")
    members = {name: [str(world.models[name])] for name in world.models}
    members |= _baselines(world, out, echo)
    models = _evaluate(members, held, scale)
    sources = [spec.name for spec in SOURCES] + ([GEMMA] if real_source else [])
    best = min(sources, key=lambda n: models[n]["avg_bpb"])
    arm_list = arms(scale, best)
    tick = phase("baselines", tick)

    echo("preparing teacher data (fusion prepare)")
    manifests = {
        dataset: prepare_dataset(world, out, scale, dataset, echo=echo)
        for dataset in dict.fromkeys(arm.dataset for arm in arm_list)
    }
    tick = phase("prepare", tick)

    echo(f"training {len(arm_list)} arms (fusion train): {', '.join(a.name for a in arm_list)}")
    exports = {arm.name: train_arm(world, out, scale, arm, echo=echo) for arm in arm_list}
    tick = phase("train", tick)

    echo("evaluating the trained arms")
    models |= _evaluate({n: [str(p)] for n, p in exports.items()}, held, scale, documents=True)
    phase("evaluate", tick)

    summaries = {
        name: json.loads((path / "training_summary.json").read_text())
        for name, path in exports.items()
    }
    lams = {name: _trained_lam(path) for name, path in exports.items()}
    tokens = {summary["tokens_seen"] for summary in summaries.values()}
    if len(tokens) != 1:
        raise RuntimeError(f"arms saw different token counts: {tokens}; the comparison is unfair")
    curves = {
        name: learning_curve(out / "arms" / name / "metrics.jsonl")
        for name in ("fused", "clm_only")
    }
    results = {
        "domains": list(DOMAINS),
        "models": models,
        "tokens_per_arm": tokens.pop(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "phase_seconds": phases,
        "verdict": verdict(models, DOMAINS),
        "orders": scale.orders,
        "intervals": intervals(
            models,
            DOMAINS,
            {
                arm: [ordered(arm, order) for order in range(scale.orders)]
                for arm in ("fused", "clm_only", f"distill_{best}")
            },
        ),
        "token_efficiency": token_efficiency(curves["fused"], curves["clm_only"]),
        "curves": curves,
        "best_source": best,
        "roles": _roles(arm_list, best),
        "arms": {arm.name: arm.description for arm in arm_list},
        "lam": lams,
        "teacher_data": {
            name: {k: m[k] for k in ("rows", "tokens", "bytes_per_token", "diagnostics")}
            for name, m in manifests.items()
        },
        "quick": scale.variants is False,
        "config": str(config_file),
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    settings = {
        "models": f"d={scale.width}, {scale.layers} layers, 4 heads; sources "
        + ", ".join(f"{s.name} = {s.architecture} + {TOKENIZERS[s.tokenizer]}" for s in SOURCES)
        + f"; target {TARGET.architecture} + {TOKENIZERS[TARGET.tokenizer]}",
        "pre-training": f"experts {scale.expert_steps} steps (8:1:1 mix towards their domain), "
        f"target_init {scale.target_steps} steps (1:1:1), pair {scale.tuned_steps} steps from "
        f"target_init, {scale.pretrain_batch} spans per step",
        "continual training": f"{scale.continual_steps} steps × {scale.continual_batch} chunks, "
        f"lr {LR:g} (10% warm-up, cosine to 10%), AdamW (0.9, 0.95), λ {LAM} for fusion arms: "
        + ", ".join(
            f"{name} {lam:g}"
            for name, lam in lams.items()
            if "_order" not in name and name != "clm_only"  # the other orders train alike
        ),
        "arms": "; ".join(f"`{arm.name}`: {arm.description}" for arm in arm_list),
        "teacher data": "; ".join(
            f"{name}: {m['rows']} rows, {m['tokens']:,} tokens" for name, m in manifests.items()
        ),
        "repeat it": f"`fusion prepare {config_file.name}` then `fusion train "
        f"{config_file.name}` in {out}",
    }
    write_report(out, results, settings)
    return results
