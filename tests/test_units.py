"""Each source's columns are a unit of their own: a config that adds, drops or changes a
source runs only what it must, `--only` computes one unit apart, and every way ends in the
same data set, column for column, as one prepare from scratch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from hashlib import sha256
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fusion.cli import app
from fusion.config import parse_config
from fusion.teacher.output import OutputError
from fusion.teacher.pipeline import prepare

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory,
    model_dirs,
    training_texts,
    byte_level_tokenizer,
    metaspace_tokenizer,
    ray_cluster,
):
    """A Llama target and three sources of two tokenizers (a, b: GPT-2 of other seeds; c:
    a Llama), a stand-in for c with other weights, and a small corpus."""
    from fusion.testing.toy import save_model_dir, tiny_causal_lm

    root = tmp_path_factory.mktemp("units")
    shutil.copytree(model_dirs["target"], root / "target")
    llama_tokenizer = metaspace_tokenizer
    vocab = len(byte_level_tokenizer)
    save_model_dir(root / "a", tiny_causal_lm("gpt2", vocab, seed=11), byte_level_tokenizer)
    save_model_dir(root / "b", tiny_causal_lm("gpt2", vocab, seed=12), byte_level_tokenizer)
    save_model_dir(
        root / "c", tiny_causal_lm("llama", len(llama_tokenizer), seed=13), llama_tokenizer
    )
    save_model_dir(
        root / "c-old", tiny_causal_lm("llama", len(llama_tokenizer), seed=14), llama_tokenizer
    )
    with (root / "corpus.jsonl").open("w") as stream:
        for text in training_texts[70:82]:
            stream.write(json.dumps({"text": text[:500]}) + "\n")
    return root


def _raw(world: Path, out: Path, sources: str, **paths: str) -> dict:
    return {
        "target": {"path": str(world / "target"), "num_cpus": 0.2, "as_teacher": False},
        "sources": [
            {"name": name, "path": str(world / paths.get(name, name)), "num_cpus": 0.2}
            for name in sources
        ],
        "data": {"paths": [str(world / "corpus.jsonl")], "max_length": 48},
        "align": {"method": "offsets", "mode": "clean"},
        "fuse": {"method": "min_ce", "granularity": "token"},
        "output": {"dir": str(out), "rows_per_file": 8},
    }


def _prepare(raw: dict, **options) -> list[str]:
    """Run a prepare; return what it said."""
    said: list[str] = []
    prepare(parse_config(raw), echo=said.append, **options)
    return said


def _table(out: Path):
    return pq.read_table(out / "data").sort_by("id")


def _assert_same_data(got: Path, expected: Path) -> None:
    """Every column of both data sets equal, row for row (parts may be cut differently)."""
    mine, theirs = _table(got), _table(expected)
    assert mine.column_names == theirs.column_names
    for name in theirs.column_names:
        assert mine[name].to_pylist() == theirs[name].to_pylist(), name
    manifests = [json.loads((o / "manifest.json").read_text()) for o in (got, expected)]
    assert manifests[0]["diagnostics"] == manifests[1]["diagnostics"]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def _models_run(said: list[str]) -> set[str]:
    """The candidates whose columns a run wrote (from its progress lines)."""
    return {line.split("/")[1] for line in said if line.startswith("wrote units/")}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def scratch(world, tmp_path_factory) -> dict[str, Path]:
    """From-scratch prepares, the reference every other way must equal."""
    outs = {}
    for sources in ("abc", "ac"):
        outs[sources] = tmp_path_factory.mktemp(f"scratch-{sources}") / "out"
        said = _prepare(_raw(world, outs[sources], sources))
        assert _models_run(said) == set(sources)
    return outs


def test_a_changed_source_an_added_one_and_a_dropped_one_each_run_only_what_they_must(
    world, scratch, tmp_path, monkeypatch
):
    import fusion.models.loading as loading

    loads: list[str] = []
    load = loading.AutoTokenizer.from_pretrained

    def counted(path, *args, **kwargs):
        loads.append(Path(path).name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", counted)
    out = tmp_path / "out"
    said = _prepare(_raw(world, out, "ac", c="c-old"))
    assert _models_run(said) == {"a", "c"}
    assert sorted(loads) == ["a", "c-old", "target"]  # the driver resolves each model once
    monkeypatch.undo()
    a_unit = _snapshot(out / "units" / "a")

    # c's files changed: c alone runs again; a's columns are kept as they were
    said = _prepare(_raw(world, out, "ac"))
    assert _models_run(said) == {"c"}
    assert any("c: changed since its columns were computed (files of" in line for line in said)
    assert _snapshot(out / "units" / "a") == a_unit
    _assert_same_data(out, scratch["ac"])

    # b added: only b runs; the data set equals one prepared with all three
    said = _prepare(_raw(world, out, "abc"))
    assert _models_run(said) == {"b"}
    assert _snapshot(out / "units" / "a") == a_unit
    _assert_same_data(out, scratch["abc"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["provenance"]) == ["a", "b", "c"]
    assert manifest["provenance"]["b"]["model"] == str(world / "b")
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    b_files = sorted(p.name for p in (world / "b").iterdir())
    line = next(x for x in shown.output.splitlines() if x.startswith("  b: "))
    assert line.startswith(f"  b: {world / 'b'} ({len(b_files)} files, sha256 ")
    assert "; dtype auto, bos auto, backend hf; align offsets top-10; computed 20" in line
    assert manifest["provenance"]["b"]["files"].keys() == set(b_files)
    weights = (world / "b" / "model.safetensors").read_bytes()
    assert manifest["provenance"]["b"]["files"]["model.safetensors"] == sha256(weights).hexdigest()

    # b dropped: no model runs, b's columns stay on disk for a later config
    b_unit = _snapshot(out / "units" / "b")
    said = _prepare(_raw(world, out, "ac"))
    assert _models_run(said) == set()
    _assert_same_data(out, scratch["ac"])
    assert _snapshot(out / "units" / "b") == b_unit
    assert "b.topk_ids" not in pq.read_schema(next((out / "data").glob("*.parquet"))).names


def test_only_twice_then_the_fusion_equals_one_run(world, scratch, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(world, out, "ac")))
    for name in ("c", "a"):
        result = CliRunner().invoke(app, ["prepare", str(config), "--only", name, "--quiet"])
        assert result.exit_code == 0, result.output
        assert not (out / "manifest.json").exists()
    assert "units complete: a, c; missing: none" in result.output
    said = _prepare(_raw(world, out, "ac"))
    assert _models_run(said) == set()
    _assert_same_data(out, scratch["ac"])


def test_only_a_model_the_config_lacks_is_refused(world, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(world, tmp_path / "out", "ac")))
    result = CliRunner().invoke(app, ["prepare", str(config), "--only", "b"])
    assert result.exit_code == 2
    assert "--only b: not a teacher of this config (its candidates: a, c)" in result.output
    assert not (tmp_path / "out").exists()


def test_a_kill_while_an_added_source_runs_resumes_to_the_same_data(world, scratch, tmp_path):
    from tests.test_pipeline import ray_address

    out = tmp_path / "out"
    shutil.copytree(scratch["ac"], out)
    raw = _raw(world, out, "abc")
    raw["output"]["rows_per_file"] = 2
    raw["data"]["block_chunks"] = 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw | {"ray": {"address": ray_address()}}))
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("fusion")), "prepare", str(tmp_path / "run.yaml")],
        stdout=(tmp_path / "killed.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    commits, deadline = out / "units" / "b" / "commits", time.monotonic() + 300
    while not (commits.is_dir() and any(commits.glob("*.json"))):
        assert process.poll() is None, "prepare ended before committing a part of b"
        assert time.monotonic() < deadline, "no part of b committed in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed = {p.name for p in commits.glob("*.json")}
    total = len(pq.read_table(out / "chunks" / "data", columns=["id"]))
    done = sum(json.loads((commits / n).read_text())["rows"] for n in committed)
    assert done < total
    kept = _snapshot(out / "units" / "b" / "data")

    said = _prepare(raw)
    assert _models_run(said) == {"b"}, (tmp_path / "killed.log").read_text()[-3000:]
    # a write task of the killed driver may still commit its part while Ray reaps it, so
    # the resumed run may find more than was committed when the driver died, never less
    resumed = [re.search(r"units/b: (\d+) rows committed by an earlier run", x) for x in said]
    found = [int(match[1]) for match in resumed if match]
    assert len(found) == 1 and done <= found[0] < total, said[:8]
    written = [re.search(r": (\d+) rows · ", line) for line in said if "units/b/" in line]
    assert sum(int(m[1]) for m in written if m) == total - found[0]  # the rest, nothing again
    b_ids = pq.read_table(out / "units" / "b" / "data", columns=["id"])["id"].to_pylist()
    chunk_ids = pq.read_table(out / "chunks" / "data", columns=["id"])["id"].to_pylist()
    assert sorted(b_ids) == sorted(chunk_ids)  # every row once: none missing or repeated
    after = _snapshot(out / "units" / "b" / "data")
    for name in committed:  # parts committed before the kill are kept as they were
        assert after[name.removesuffix(".json")] == kept[name.removesuffix(".json")]
    _assert_same_data(out, scratch["abc"])


def test_a_unit_copied_in_is_used_and_one_of_another_chunking_is_refused(world, scratch, tmp_path):
    out = tmp_path / "out"  # b's columns computed elsewhere, copied in beside a and c
    shutil.copytree(scratch["ac"], out)
    shutil.copytree(scratch["abc"] / "units" / "b", out / "units" / "b")
    said = _prepare(_raw(world, out, "abc"))
    assert _models_run(said) == set()
    _assert_same_data(out, scratch["abc"])

    other = tmp_path / "other"  # b copied in from a run that cut the corpus into 64 tokens
    shutil.copytree(scratch["ac"], other)
    shutil.copytree(scratch["abc"] / "units" / "b", other / "units" / "b")
    record = json.loads((other / "units" / "b" / "unit.json").read_text())
    record["chunking"]["data.max_length"] = 64
    (other / "units" / "b" / "unit.json").write_text(json.dumps(record))
    with pytest.raises(
        OutputError,
        match=r"units/b was computed on chunks cut another way \(data\.max_length: the "
        r"stored chunks were cut with 64, this config gives 48\)",
    ):
        _prepare(_raw(world, other, "abc"))
