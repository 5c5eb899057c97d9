"""How `fusion prepare` scales when the models, not the CPUs, set the pace.

Each source here is the benchmark-only ``simulated`` backend: its forward pass waits a fixed
time per token (it holds no CPU, as a GPU model would not) and returns valid top-k. With the
models the bottleneck, target tokens/s should grow with the number of model actors until
the CPU stages (chunking, alignment, fusion, writing) can no longer keep up. The run prints:

1. target tokens/s for 1, 2 and 4 actors of one source, and for 1, 2 and 4 sources;
2. the CPU cost per target token of every CPU stage, measured in this process on one core;
3. from (2), the CPU cores a cluster needs per source GPU at a given model speed;
4. with ``--nodes``: four sources on a Ray cluster of 1, 2 and 4 simulated nodes (separate
   raylets on this machine, ``ray.cluster_utils.Cluster``), each source's actor placed on
   its node by a custom resource: target tokens/s per source against one node, i.e. what
   spreading the sources over nodes costs (object transfers between raylets, scheduling).

    .venv/bin/python -m bench.scale                       # 1,000 simulated tokens/s per actor
    .venv/bin/python -m bench.scale --gpu-tokens-per-s 20000
    .venv/bin/python -m bench.scale --nodes               # the multi-node runs only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np

from bench.common import report, stdlib_text
from fusion.config import parse_config
from fusion.data.corpus import plan_shards
from fusion.data.reader import ChunkStage
from fusion.models.loading import load_tokenizer, model_tokenizer
from fusion.teacher.contract import candidates
from fusion.teacher.pipeline import build_bridges, prepare
from fusion.teacher.plan import resolve
from fusion.teacher.rows import FUSED, schema
from fusion.teacher.stages import AlignStage, ForwardStage, fuse_batch, write_batch
from fusion.testing.toy import save_model_dir, tiny_causal_lm, train_tokenizer

# Four vocabularies of one kind: each source reads about as many tokens of its own per target
# token, so at one speed each alone sets about the same pace (a Metaspace source reads code's
# indentation as many more tokens, and would be the slow one by that alone).
SOURCES = (
    ("alpha", "byte_level", 6000),
    ("beta", "byte_level", 5600),
    ("gamma", "byte_level", 5200),
    ("delta", "byte_level", 4800),
)
MAX_LENGTH = 512
TOP_K = 10


def build_world(root: Path, corpus_chars: int) -> None:
    """A Metaspace target, three sources with their own tokenizers, and a JSONL corpus."""
    text = stdlib_text(2_000_000 + corpus_chars)
    pieces = [text[i : i + 4000] for i in range(0, 2_000_000, 4000)]
    target = train_tokenizer(pieces[:300], "metaspace", 8192)
    save_model_dir(root / "target", tiny_causal_lm("llama", len(target)), target)
    for name, kind, size in SOURCES:
        tokenizer = train_tokenizer(pieces[:300], kind, size)
        save_model_dir(root / name, tiny_causal_lm("gpt2", len(tokenizer)), tokenizer)
    held_out = text[2_000_000:]
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as stream:
        for i in range(0, len(held_out), 6000):
            stream.write(json.dumps({"text": held_out[i : i + 6000]}) + "\n")


def config_for(
    root: Path,
    out: Path,
    *,
    sources: int,
    actors: int,
    speed: float,
    nodes: int = 0,
    address: str | None = None,
):
    """The run on ``sources`` simulated sources; with ``nodes``, source i's actors go to
    node ``i % nodes`` (its custom resource ``node-<n>``)."""
    raw = parse_config(
        {
            "target": {"path": str(root / "target"), "as_teacher": False},
            "sources": [
                {
                    "name": name,
                    "path": str(root / name),
                    "backend": "simulated",
                    "simulated_tokens_per_s": speed,
                    "actors": actors,
                    "num_cpus": 0,  # it waits: a GPU model holds no CPU of the pipeline's
                    "batch_size": 4,
                }
                for name, _, _ in SOURCES[:sources]
            ],
            "data": {
                "paths": [str(root / "corpus.jsonl")],
                "max_length": MAX_LENGTH,
                "block_chunks": 8,  # two batches of 4: blocks to share out among 4 actors
            },
            "align": {"method": "offsets", "mode": "clean", "top_k": TOP_K, "map_cache": None},
            "output": {"dir": str(out), "rows_per_file": 16},
            "ray": {"address": address},
        }
    ).model_dump(mode="json")
    for index, source in enumerate(raw["sources"]):
        if nodes:
            source["resources"] = {f"node-{index % nodes}": 1}
    return parse_config(raw)


def multinode(root: Path, speed: float) -> dict[str, float]:
    """Target tokens/s of four sources spread over 1, 2 and 4 simulated nodes (a head for
    the driver and the CPU stages, and N nodes that hold only the source actors)."""
    import ray
    from ray.cluster_utils import Cluster

    figures = {}
    for nodes in (1, 2, 4):
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": os.cpu_count(), "include_dashboard": False},
        )
        for n in range(nodes):
            cluster.add_node(num_cpus=0, resources={f"node-{n}": 4})
        out = root / f"out-nodes-{nodes}"
        config = config_for(
            root, out, sources=4, actors=1, speed=speed, nodes=nodes, address=cluster.address
        )
        try:
            figures[f"4 sources on {nodes} node{'s' * (nodes > 1)}"] = throughput(config)
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(out, ignore_errors=True)
    return figures


def throughput(config) -> float:
    """Target tokens/s of the pass that runs the models, between its first and its last part
    written (start-up excluded). Each source's unit counts the chunk's target tokens once, so
    the pass's tokens are divided by the number of units."""
    marks: list[tuple[float, int]] = []  # (when, tokens written so far by this pass)
    units = len(config.sources) + int(config.target.as_teacher)

    def note(line: str) -> None:
        if line.startswith("wrote units/"):
            total = line.split(" rows, ")[1].split(" tokens")[0]
            marks.append((time.perf_counter(), int(total.replace(",", "")) // units))

    prepare(config, quiet=False, echo=note)
    (first_time, first_tokens), (last_time, last_tokens) = marks[0], marks[-1]
    return (last_tokens - first_tokens) / (last_time - first_time)


def stage_costs(root: Path, out: Path) -> dict[str, float]:
    """CPU seconds per target token of each CPU stage, one process, one thread."""
    import torch

    torch.set_num_threads(1)
    config = config_for(root, out, sources=4, actors=1, speed=1e12)
    shards = [s.descriptor() for s in plan_shards(config.data)]
    costs: dict[str, float] = {}

    def timed(name: str, run, *args):
        started = time.process_time()
        result = run(*args)
        costs[name] = costs.get(name, 0.0) + time.process_time() - started
        return result

    reader = ChunkStage(config.data, {}, tokenizer=model_tokenizer(config.target))
    batch_of = {k: np.asarray([s[k] for s in shards]) for k in shards[0]}
    batch = timed("chunk (read, tokenize, cut)", reader, batch_of)
    tokens = sum(len(ids) for ids in batch["input_ids"])
    bridges = build_bridges(resolve(config))
    for source in config.sources:
        forward = ForwardStage(
            source.name, source, num_cpus=1, num_gpus=0, top_k=TOP_K, mode="clean"
        )
        batch = timed("source tokenize (in the model actor)", forward, batch)
        dtw = AlignStage(
            source.name, bridges[source.name], config.align.model_copy(update={"method": "dtw"})
        )
        timed("align, dtw (per source)", dtw, dict(batch))
        aligner = AlignStage(source.name, bridges[source.name], config.align)
        batch = timed("align, offsets (per source)", aligner, batch)
    names = candidates(config)
    vocab = len(load_tokenizer(config.target.path))
    batch = timed(
        "fuse (4 sources)",
        lambda: fuse_batch(batch, names, config.fuse, config.align.mode, vocab),
    )
    table_schema = schema([*names, FUSED], TOP_K)
    (out / "data").mkdir(parents=True)
    (out / "commits").mkdir()
    timed(
        "write Parquet (4 sources)",
        lambda: write_batch(batch, str(out), table_schema, TOP_K, names, vocab),
    )
    per_token = {name: seconds / tokens for name, seconds in costs.items()}
    for name in per_token:
        if "per source" in name or "tokenize" in name:
            per_token[name] /= len(config.sources)
    return per_token | {"tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", type=float, default=1000.0, help="simulated tokens/s per actor")
    parser.add_argument("--corpus-chars", type=int, default=200_000)
    parser.add_argument("--gpu-tokens-per-s", type=float, default=20_000.0)
    parser.add_argument("--nodes", action="store_true", help="the multi-node runs only")
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="fusion-scale-"))
    try:
        build_world(root, args.corpus_chars)
        if args.nodes:
            figures = multinode(root, args.speed)
            base = figures["4 sources on 1 node"]
            report(
                "scale_nodes",
                [(label, f"{rate:,.0f}", f"{rate / base:.2f}×") for label, rate in figures.items()],
                {"speed_per_actor": args.speed, "target_tokens_per_s": figures},
                header=("placement", "target tokens/s", "vs 1 node"),
            )
            return
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        rows, figures = [], {}
        for label, sources, actors in (
            ("1 source × 1 actor", 1, 1),
            ("1 source × 2 actors", 1, 2),
            ("1 source × 4 actors", 1, 4),
            ("2 sources × 1 actor", 2, 1),
            ("4 sources × 1 actor", 4, 1),
        ):
            out = root / f"out-{sources}-{actors}"
            config = config_for(root, out, sources=sources, actors=actors, speed=args.speed)
            figures[label] = throughput(config)
            shutil.rmtree(out)
        base = figures["1 source × 1 actor"]
        for label, rate in figures.items():
            rows.append((label, f"{rate:,.0f}", f"{rate / base:.2f}×"))
        ray.shutdown()
        report(
            "scale",
            rows,
            {"speed_per_actor": args.speed, "target_tokens_per_s": figures},
            header=("model actors", "target tokens/s", "vs 1 actor"),
        )

        costs = stage_costs(root, root / "costs")
        tokens = costs.pop("tokens")
        cost_rows = [(name, f"{1e6 * s:,.1f}") for name, s in costs.items()]
        shared = sum(s for n, s in costs.items() if "per source" not in n and "tokenize" not in n)
        speed = args.gpu_tokens_per_s
        for method in ("offsets", "dtw"):
            per_source = costs[f"align, {method} (per source)"]
            per_source += costs["source tokenize (in the model actor)"]
            for n in (1, 4):
                cores = speed * (shared / n + per_source)
                label = f"CPU cores per source GPU at {speed:,.0f} tok/s, {n} source(s), {method}"
                cost_rows.append((label, f"{cores:.2f}"))
        report(
            "scale_costs",
            cost_rows,
            {"costs_s_per_token": costs, "tokens": tokens, "gpu_tokens_per_s": speed},
            header=("CPU stage", "µs per target token"),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
