"""Adding a source to a prepared data set: time and equality against a prepare from scratch.

On the demo's world (its target, three experts, its continual corpus; bytes projection, clean
mode, MinCE per sequence as `bench.multi_source` prepares it): prepare with two experts,
add the third (only its model runs, then every chunk is fused again), and prepare all three
from scratch; then the same with Gemma-3-270M (GGUF, 262k vocabulary) added as a fourth
source. Each incremental data set is compared with its from-scratch one, column for column.

    .venv/bin/python -m bench.add_source --part experts                  # whole corpus
    .venv/bin/python -m bench.add_source --part gemma --documents 64     # first 64 documents

Results go to bench/results/add_source-PART.json; ``--out`` keeps the world (shared with
`bench.multi_source`'s), ``--sets`` the prepared sets.
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
    parser.add_argument("--part", choices=("experts", "gemma"), default="experts")
    parser.add_argument(
        "--documents",
        type=int,
        default=None,
        help="prepare the first N documents of the world's corpus only (Gemma on two CPUs "
        "reads about 3 s per chunk: the whole corpus takes ~50 min per prepare)",
    )
    args = parser.parse_args()
    world, experts, _ = _world("demo", args.out)
    sources = {name: world.models[name] for name in experts}
    if args.part == "gemma":
        sources["gemma"] = _gemma(args.out.resolve())
    sets = (args.sets / args.part).resolve()
    shutil.rmtree(sets, ignore_errors=True)
    sets.mkdir(parents=True)
    corpus = world.continual
    if args.documents is not None:
        lines = Path(world.continual).read_text(encoding="utf-8").splitlines(keepends=True)
        corpus = sets / f"continual-{args.documents}.jsonl"
        corpus.write_text("".join(lines[: args.documents]), encoding="utf-8")

    def config(names: list[str], folder: str) -> dict:
        raw = prepare_config(world, {n: sources[n] for n in names}, sets, folder)
        raw["data"]["paths"] = [str(corpus)]
        return raw

    rows, figures = [], {}
    first, added = (
        (experts[:2], experts) if args.part == "experts" else (experts, [*experts, "gemma"])
    )
    steps = [(added, f"scratch-{len(added)}"), (first, "incremental"), (added, "incremental")]
    for names, folder in steps:
        print(f"prepare {folder} with {', '.join(names)}", flush=True)
        seconds, ran = _timed_prepare(config(names, folder))
        figures[f"{folder}:{len(names)}"] = {"seconds": round(seconds, 1), "ran": sorted(ran)}
    teacher = sets / "teacher"
    differ = _differences(teacher / "incremental", teacher / f"scratch-{len(added)}")
    from_scratch = figures[f"scratch-{len(added)}:{len(added)}"]["seconds"]
    added_seconds = figures[f"incremental:{len(added)}"]["seconds"]
    rows.append(
        (
            f"add {added[-1]} to {', '.join(first)}",
            f"{added_seconds:.0f} s",
            f"{from_scratch:.0f} s",
            f"{from_scratch / added_seconds:.1f}×",
            ", ".join(figures[f"incremental:{len(added)}"]["ran"]) or "none",
            "equal" if not differ else f"differ: {', '.join(differ)}",
        )
    )
    chunks = pq.read_table(teacher / "incremental" / "data", columns=["input_ids"])
    extra = {
        "runs": figures,
        "corpus": {
            "documents": args.documents or "all",
            "chunks": chunks.num_rows,
            "tokens": sum(len(ids) for ids in chunks["input_ids"].to_pylist()),
        },
    }
    header = ("change", "incremental", "from scratch", "ratio", "models run", "vs scratch")
    report(f"add_source-{args.part}", rows, extra, header=header)


if __name__ == "__main__":
    main()
