"""A 1 MB JSONL corpus: byte-range shards, small blocks, a commit every few rows, progress a
user can read, and a kill midway that keeps every committed part."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from fusion.config import parse_config
from fusion.teacher.pipeline import prepare

pytestmark = pytest.mark.slow


def _corpus(path: Path, texts: list[str], size: int) -> int:
    """JSONL documents cycled from ``texts`` up to ``size`` bytes; returns the line count."""
    lines, written = 0, 0
    with path.open("w", encoding="utf-8") as stream:
        while written < size:
            text = texts[lines % len(texts)][:1500] + f" ✓ {lines}"  # every document unique
            line = json.dumps({"text": text, "id": f"doc-{lines}"}, ensure_ascii=False) + "\n"
            stream.write(line)
            written += len(line.encode("utf-8"))
            lines += 1
    return lines


def test_a_killed_prepare_of_a_large_jsonl_keeps_its_committed_parts(
    model_dirs, training_texts, ray_cluster, tmp_path
):
    from tests.test_pipeline import ray_address

    corpus = tmp_path / "big.jsonl"
    documents = _corpus(corpus, training_texts, 1 << 20)
    out = tmp_path / "out"
    raw = {
        "target": {"path": str(model_dirs["target"]), "num_cpus": 0.3, "as_teacher": False},
        "sources": [  # the data path is under test, not a model: a source that only waits
            {
                "name": "coder",
                "path": str(model_dirs["gpt2"]),
                "backend": "simulated",
                "simulated_tokens_per_s": 1e6,
                "num_cpus": 0.3,
            }
        ],
        "data": {
            "paths": [str(corpus)],
            "id_field": "id",
            "max_length": 512,
            "shard_mb": 0.25,
            "block_chunks": 16,
        },
        "align": {"method": "offsets", "mode": "clean"},
        "output": {"dir": str(out), "rows_per_file": 16},
        "ray": {"address": ray_address()},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("fusion")), "prepare", str(tmp_path / "run.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines, deadline = [], time.monotonic() + 300
    while len(lines) < 3:  # three parts committed and reported
        line = process.stdout.readline()
        assert line or process.poll() is None, "prepare ended before three parts"
        assert time.monotonic() < deadline, "no progress in time"
        if line.startswith("wrote units/coder/"):  # the source's columns, part by part
            lines.append(line)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # Each line says what was written, the totals, the rate and the time left.
    assert all(
        re.fullmatch(
            r"wrote units/coder/data/part-\w+\.parquet: \d+ rows · [\d,]+ rows, [\d,]+ tokens "
            r"this run · [\d,]+ tok/s · \d+% · (\d+[hms][\dms]*|…) left\n",
            line,
        )
        for line in lines
    ), lines
    unit = out / "units" / "coder"
    kept = {p.name: p.read_bytes() for p in (unit / "data").glob("part-*.parquet")}
    committed = {p.name[: -len(".json")] for p in (unit / "commits").glob("*.json")}
    assert len(committed) >= 3 and committed <= set(kept)

    summary = prepare(parse_config(raw | {"ray": {}}), quiet=True)
    assert summary.shards_total == -(-corpus.stat().st_size // (1 << 18))  # quarter-MB ranges
    for name in committed:  # committed parts survive the resume untouched
        assert (unit / "data" / name).read_bytes() == kept[name]
    assert len(committed) < len(list((unit / "data").glob("*.parquet")))  # killed midway
    assert summary.files >= 40  # many parts
    ids = pq.read_table(out / "data", columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary.rows
    assert {i.rsplit(":", 1)[0] for i in ids} == {f"doc-{n}" for n in range(documents)}
