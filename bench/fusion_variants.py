"""What moves the demo's fusion result: more arms trained on a finished `fusion demo` folder.

Every arm starts from `target_init` and sees the demo's chunks in one of the demo's two data
orders, exactly as `fused` and `clm_only` did; the fused variants are re-fused from the demo's
main teacher data (`fusion refuse`: no model runs again). Prints held-out bits per byte per
domain and the difference to `clm_only` trained on the same order, per domain and on average,
next to the demo's noise band (how far one arm moves between the two orders).

    python bench/fusion_variants.py fusion-demo [--quick] [--arms fused_lam0.7,fused_no_target]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import report
from fusion.demo.corpora import DOMAINS
from fusion.demo.experiment import Arm, prepare_dataset, train_arm
from fusion.demo.run import FULL, QUICK
from fusion.demo.world import build_world
from fusion.evaluate.bpb import evaluate

ARMS = {
    "fused_lam0.7": Arm("fused_lam0.7", "main", "MinCE per token, λ = 0.7", lam=0.7),
    "fused_lam0.5": Arm("fused_lam0.5", "main", "MinCE per token, λ = 0.5", lam=0.5),
    "fused_no_target": Arm("fused_no_target", "no_target", "MinCE per token, sources only"),
    "fused_mask": Arm("fused_mask", "mask", "MinCE per token, no-teacher positions masked"),
    "fused_sequence_token": Arm(
        "fused_sequence_token", "sequence_token", "MinCE per sequence, CE per token"
    ),
    "fused_sequence_byte": Arm(
        "fused_sequence_byte", "sequence_byte", "MinCE per sequence, CE per byte"
    ),
    "fused_sequence_byte_order2": Arm(
        "fused_sequence_byte_order2",
        "sequence_byte",
        "MinCE per sequence, CE per byte; second data order",
        order=1,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a folder `fusion demo` finished in")
    parser.add_argument("--quick", action="store_true", help="the folder was made with --quick")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    args = parser.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    out, scale = args.out.resolve(), QUICK if args.quick else FULL
    results = json.loads((out / "results.json").read_text())
    world = build_world(out / "world", scale, echo=lambda _: None)
    chosen = [ARMS[name] for name in args.arms.split(",")]
    started = time.perf_counter()
    diagnostics = {}
    for arm in chosen:
        manifest = prepare_dataset(world, out, scale, arm.dataset, echo=print)
        diagnostics[arm.dataset] = manifest["diagnostics"]
    exports = {arm.name: str(train_arm(world, out, scale, arm, echo=print)) for arm in chosen}
    corpora = {domain: str(path) for domain, path in world.held_out.items()}
    scores = evaluate(
        {n: [p] for n, p in exports.items()},
        corpora,
        max_length=scale.max_length,
        batch_size=16,
    )
    models = results["models"] | scores
    noise = results["noise"]
    rows = []
    names = ["fused", "fused_order2", "distill_" + results["best_source"], *exports]
    for name in dict.fromkeys(names):
        entry = models[name]
        clm = models["clm_only" + ("_order2" if name.endswith("_order2") else "")]
        rows.append(
            (
                name,
                *(
                    f"{entry['bpb'][d]:.4f} ({entry['bpb'][d] - clm['bpb'][d]:+.4f})"
                    for d in DOMAINS
                ),
                f"{entry['avg_bpb']:.4f}",
                f"{entry['avg_bpb'] - clm['avg_bpb']:+.4f}",
            )
        )
    for order in ("clm_only", "clm_only_order2"):
        entry = models[order]
        rows.append(
            (order, *(f"{entry['bpb'][d]:.4f}" for d in DOMAINS), f"{entry['avg_bpb']:.4f}", "0")
        )
    rows.append(
        (
            "noise band",
            *(f"{noise[d]['band']:.4f}" for d in DOMAINS),
            f"{noise['avg']['band']:.4f}",
            "",
        )
    )
    print(f"{time.perf_counter() - started:.0f} s for {len(chosen)} arms")
    report(
        "fusion_variants",
        rows,
        {
            "noise": noise,
            "diagnostics": diagnostics,
            "arms": {a.name: a.description for a in chosen},
        },
        header=("arm", *(f"{d} (Δ)" for d in DOMAINS), "avg", "Δ vs clm_only, same order"),
    )


if __name__ == "__main__":
    main()
