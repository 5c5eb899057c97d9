"""Adding a source to a prepared data set: time and equality against a prepare from scratch.

On the demo's world (its target, three experts, its continual corpus; bytes projection, clean
mode, MinCE per sequence as `bench.multi_source` prepares it): prepare with two experts,
add the third (only its model runs, then every chunk is fused again), and prepare all three
from scratch; then the same with Gemma-3-270M (GGUF, 262k vocabulary) added as a fourth
source. Each incremental data set is compared with its from-scratch one, column for column.

    .venv/bin/python -m bench.add_source                  # experts, then Gemma as a fourth
    .venv/bin/python -m bench.add_source --no-gemma

Results go to bench/results/add_source.json; ``--out`` keeps the world (shared with
`bench.multi_source`'s) and the prepared sets.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import report
from bench.multi_source import _gemma, _world, prepare_config


def _timed_prepare(raw: dict) -> tuple[float, set[str]]:
    """Seconds a prepare took and the candidates whose columns it computed."""
    from fusion.config import parse_config
    from fusion.teacher.pipeline import prepare

    said: list[str] = []
    started = time.perf_counter()
    prepare(parse_config(raw), quiet=False, echo=said.append)
    seconds = time.perf_counter() - started
    ran = {line.split("/")[1] for line in said if line.startswith("wrote units/")}
    print(f"  {Path(raw['output']['dir']).name}: {seconds:.0f} s, ran {sorted(ran)}", flush=True)
    return seconds, ran


def _differences(got: Path, expected: Path) -> list[str]:
    """Columns whose values differ between two data sets (rows matched by id)."""
    mine = pq.read_table(got / "data").sort_by("id")
    theirs = pq.read_table(expected / "data").sort_by("id")
    if mine.column_names != theirs.column_names:
        return [f"columns {mine.column_names} vs {theirs.column_names}"]
    return [name for name in theirs.column_names if not mine[name].equals(theirs[name])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/multi/demo"))
    parser.add_argument("--sets", type=Path, default=Path("runs/add-source"))
    parser.add_argument("--no-gemma", action="store_true")
    args = parser.parse_args()
    world, experts, _ = _world("demo", args.out)
    sources = {name: world.models[name] for name in experts}
    if not args.no_gemma:
        sources["gemma"] = _gemma(args.out.resolve())
    shutil.rmtree(args.sets, ignore_errors=True)
    sets = args.sets.resolve()

    def config(names: list[str], folder: str) -> dict:
        return prepare_config(world, {n: sources[n] for n in names}, sets, folder)

    rows, figures = [], {}
    steps = [(experts, "scratch-3")]
    steps += [(experts[:2], "incremental"), (experts, "incremental")]
    if not args.no_gemma:
        steps += [([*experts, "gemma"], "scratch-4"), ([*experts, "gemma"], "incremental")]
    for names, folder in steps:
        print(f"prepare {folder} with {', '.join(names)}", flush=True)
        seconds, ran = _timed_prepare(config(names, folder))
        figures[f"{folder}:{len(names)}"] = {"seconds": round(seconds, 1), "ran": sorted(ran)}
        if folder == "incremental" and len(names) > 2:
            reference = sets / "teacher" / f"scratch-{len(names)}"
            differ = _differences(sets / "teacher" / folder, reference)
            from_scratch = figures[f"scratch-{len(names)}:{len(names)}"]["seconds"]
            rows.append(
                (
                    f"add {names[-1]} to {', '.join(names[:-1])}",
                    f"{seconds:.0f} s",
                    f"{from_scratch:.0f} s",
                    f"{from_scratch / seconds:.1f}×",
                    ", ".join(sorted(ran)) or "none",
                    "equal" if not differ else f"differ: {', '.join(differ)}",
                )
            )
    header = ("change", "incremental", "from scratch", "ratio", "models run", "vs scratch")
    report("add_source", rows, {"runs": figures}, header=header)


if __name__ == "__main__":
    main()
