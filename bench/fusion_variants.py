"""What moves the demo's fusion result: more arms trained on a finished `fusion demo` folder.

Every arm starts from `target_init` and sees the demo's chunks on each of the demo's data
orders, exactly as `fused` and `clm_only` did; the fused variants are re-fused from the demo's
main teacher data (`fusion refuse`: no model runs again). Prints held-out bits per byte per
domain and each variant against `clm_only` and against `fused` on the same orders, as paired
verdicts with 95 % intervals (t over the orders, paired bootstrap over held-out documents).

    python -m bench.fusion_variants fusion-demo [--quick] [--arms lam0.9,token]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import report
from fusion.demo.corpora import DOMAINS
from fusion.demo.experiment import Arm, ordered, prepare_dataset, train_arm
from fusion.demo.run import FULL, QUICK, held_out_files
from fusion.demo.world import build_world
from fusion.evaluate.bpb import evaluate
from fusion.evaluate.verdict import DocumentScores, compare


@dataclass(frozen=True)
class Variant:
    """An arm trained like `fused` but for its λ or its data set (``fuse`` re-fuses main)."""

    description: str
    lam: float | str = 0.5
    fuse: dict | None = None
    with_target: bool = True


VARIANTS = {
    "lam0.9": Variant("λ = 0.9 (the paper's)", lam=0.9),
    "lam0.7": Variant("λ = 0.7", lam=0.7),
    "lam_auto": Variant("λ from the teacher's fidelity (train.lam: auto)", lam="auto"),
    "no_target": Variant(
        "sources only (the target is no candidate)",
        fuse={"method": "min_ce", "granularity": "sequence", "ce_unit": "byte"},
        with_target=False,
    ),
    "token": Variant("MinCE per token", fuse={"method": "min_ce", "granularity": "token"}),
    "window": Variant(
        "MinCE per window of 32 positions",
        fuse={"method": "min_ce", "granularity": "window", "window": 32},
    ),
    "prefix": Variant(
        "mixture weighted by each candidate's CE on the 32 positions before",
        fuse={"method": "avg_ce", "granularity": "prefix", "window": 32},
    ),
}


def _dataset(out: Path, name: str, variant: Variant) -> str:
    """The data set a variant trains on: the demo's main one, or main re-fused its way."""
    if variant.fuse is None:
        return "main"
    from fusion.teacher.refuse import refuse

    refuse(
        out / "teacher" / "main",
        out / "teacher" / name,
        variant.fuse,
        with_target=variant.with_target,
        overwrite=True,
    )
    return name


def _scores(models: dict, name: str, orders: int) -> dict[int, DocumentScores]:
    return {
        order: DocumentScores(
            {d: models[ordered(name, order)]["documents"][d]["nll"] for d in DOMAINS}
        )
        for order in range(orders)
    }


def _cell(found: dict) -> str:
    return f"{found['mean_percent']:+.2f} % [{found['low']:+.2f}, {found['high']:+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a folder `fusion demo` finished in")
    parser.add_argument("--quick", action="store_true", help="the folder was made with --quick")
    parser.add_argument("--arms", default=",".join(VARIANTS), help="comma-separated variants")
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    out, scale = args.out.resolve(), QUICK if args.quick else FULL
    results = json.loads((out / "results.json").read_text())
    world = build_world(out / "world", scale, echo=lambda _: None)
    prepare_dataset(world, out, scale, "main", echo=print)
    chosen = args.arms.split(",")
    started = time.perf_counter()
    exports = {}
    for name in chosen:
        variant = VARIANTS[name]
        dataset = _dataset(out, name, variant)
        for order in range(scale.orders):
            arm = Arm(
                ordered(name, order), dataset, variant.description, lam=variant.lam, order=order
            )
            exports[arm.name] = str(train_arm(world, out, scale, arm, echo=print))
    corpora = {domain: str(path) for domain, path in held_out_files(out, scale).items()}
    scores = evaluate(
        {n: [p] for n, p in exports.items()},
        corpora,
        max_length=scale.max_length,
        batch_size=16,
        documents=True,
    )
    models = results["models"] | scores
    first = results["models"]["fused"]["documents"]
    sizes = {d: first[d]["bytes"] for d in DOMAINS}
    rows, figures = [], {}
    for name in ["fused", *chosen]:
        against = {}
        for other in ("clm_only", "fused"):
            if other == name:
                continue
            against[other] = {
                domain: compare(
                    _scores(models, name, scale.orders),
                    _scores(models, other, scale.orders),
                    sizes,
                    domains=None if domain == "avg" else [domain],
                ).as_dict()
                for domain in ("avg", *DOMAINS)
            }
        figures[name] = against
        mean = sum(models[ordered(name, o)]["avg_bpb"] for o in range(scale.orders))
        rows.append(
            (
                name,
                f"{mean / scale.orders:.4f}",
                *(_cell(against["clm_only"][d]) for d in DOMAINS),
                _cell(against["clm_only"]["avg"]),
                _cell(against["fused"]["avg"]) if "fused" in against else "—",
            )
        )
    print(f"{time.perf_counter() - started:.0f} s for {len(exports)} arms")
    report(
        "fusion_variants",
        rows,
        {
            "comparisons": figures,
            "orders": scale.orders,
            "variants": {n: VARIANTS[n].description for n in chosen},
        },
        header=(
            "arm",
            "avg bpb",
            *(f"{d} vs clm_only" for d in DOMAINS),
            "avg vs clm_only (95 %)",
            "avg vs fused (95 %)",
        ),
    )


if __name__ == "__main__":
    main()
