"""`fusion prepare` end to end on a real Ray instance with three tiny sources."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import ByT5Tokenizer
from typer.testing import CliRunner

from fusion.backends.hf import HFTopK
from fusion.chunking import encode
from fusion.cli import app
from fusion.config import parse_config
from fusion.models import load_tokenizer
from fusion.pipeline import ClusterError, build_bridges, check_cluster, prepare
from fusion.stages import align_row
from fusion.toy import save_model_dir, tiny_causal_lm, train_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, training_texts):
    """Target Llama (Metaspace ▁), sources GPT-2 and GPT-NeoX (byte-level Ġ, two vocabularies)
    and a Llama source with its own Metaspace tokenizer; a corpus in all three formats."""
    root = tmp_path_factory.mktemp("world")
    target_tok = train_tokenizer(training_texts[:40], "metaspace", 700)
    byte_a = train_tokenizer(training_texts[:40], "byte_level", 600)
    byte_b = train_tokenizer(training_texts[10:50], "byte_level", 450)
    meta_b = train_tokenizer(training_texts[20:60], "metaspace", 520)
    models = {
        "target": ("llama", target_tok, 0),
        "coder": ("gpt2", byte_a, 1),
        "writer": ("gpt_neox", byte_b, 2),
        "counter": ("llama", meta_b, 3),
    }
    for name, (arch, tok, seed) in models.items():
        save_model_dir(root / name, tiny_causal_lm(arch, len(tok), seed=seed), tok)
    docs = [t[:1500] for t in training_texts[40:64]]
    corpus = root / "corpus"
    corpus.mkdir()
    with (corpus / "a.jsonl").open("w") as f:
        for i, text in enumerate(docs[:14]):
            f.write(json.dumps({"text": text, "kind": "prose" if i % 2 else "code"}) + "\n")
    (corpus / "b.txt").write_text(docs[14], encoding="utf-8")
    pq.write_table(
        pa.table({"text": docs[15:], "kind": ["prose"] * len(docs[15:])}),
        corpus / "c.parquet",
        row_group_size=4,
    )
    return root


def _raw_config(world: Path, out: Path, **extra) -> dict:
    sources = [
        {"name": name, "path": str(world / name), "num_cpus": 0.35}
        for name in ("coder", "writer", "counter")
    ]
    raw = {
        "target": {"path": str(world / "target"), "num_cpus": 0.35},
        "sources": sources,
        "data": {"paths": [str(world / "corpus")], "max_length": 96, "domain_field": "kind"},
        "output": {"dir": str(out), "rows_per_file": 8},
    }
    return raw | extra


@pytest.fixture(scope="module")
def prepared(world, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    config = parse_config(_raw_config(world, out))
    summary = prepare(config, quiet=True)
    return config, summary, out


def test_prepare_writes_the_row_contract_and_a_manifest(prepared):
    _, summary, out = prepared
    table = pq.read_table(out / "data")
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary.rows > 24  # long documents give several chunks
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == summary.rows
    assert manifest["tokens"] == sum(len(x) for x in table["input_ids"].to_pylist())
    assert manifest["candidates"] == ["target", "coder", "writer", "counter"]
    assert {f["file"] for f in manifest["files"]} == {
        f"data/{p.name}" for p in (out / "data").glob("*.parquet")
    }
    for name in ("coder", "writer", "counter", "fused"):
        assert table.schema.field(f"{name}.topk_ids").type == pa.list_(pa.list_(pa.int32(), 10))
        assert table.schema.field(f"{name}.topk_logits").type == pa.list_(
            pa.list_(pa.float16(), 10)
        )
        assert manifest["bytes_per_token"][name] <= 64
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["fused.topk_ids"]) == len(row["input_ids"])
    assert set(table["domain"].to_pylist()) == {"prose", "code", None}
    assert all(max(max(p) for p in r) < 700 for r in table["fused.topk_ids"].to_pylist())


def test_aligned_top_k_equals_the_alignment_functions_called_directly(prepared):
    config, _, out = prepared
    rows = pq.read_table(out / "data").sort_by("id").slice(0, 6).to_pylist()
    bridges = build_bridges(config)
    target_tokenizer = load_tokenizer(config.target.path)
    for index, source in enumerate(config.sources):
        reader = HFTopK(source, f"sources.{index}", num_gpus=0, top_k=10)
        for row in rows:
            input_ids = np.asarray(row["input_ids"], np.int32)
            target_offsets = encode(target_tokenizer, row["text"], False)[1]
            source_ids, source_offsets = reader.encode(
                row["text"], len(input_ids) > len(target_offsets)
            )
            topk = reader.read([source_ids], [row["id"]])[0]
            alignment = align_row(
                bridges[source.name],
                config.align,
                input_ids,
                target_offsets,
                source_ids,
                source_offsets,
                row["text"],
            )
            ids, logits = bridges[source.name].transfer(
                input_ids, source_ids, topk.ids, topk.logits, alignment
            )
            assert np.asarray(row[f"{source.name}.topk_ids"]).tolist() == ids.tolist()
            stored = np.asarray(row[f"{source.name}.topk_logits"], dtype=np.float32)
            assert np.array_equal(stored, logits.astype(np.float16).astype(np.float32))


def test_rerun_on_a_complete_output_does_nothing_and_keeps_the_files(prepared):
    config, summary, out = prepared
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    again = prepare(config, quiet=True)
    assert (again.rows, again.tokens, again.shards_skipped) == (
        summary.rows,
        summary.tokens,
        summary.shards_total,
    )
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before


def test_killed_prepare_resumes_with_no_duplicated_or_missing_ids(world, prepared, tmp_path):
    _, summary, full_out = prepared
    out = tmp_path / "out"
    raw = _raw_config(world, out)
    raw["output"]["rows_per_file"] = 2
    raw["ray"] = {"address": ray_address()}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    fusion = Path(sys.executable).with_name("fusion")
    process = subprocess.Popen(
        [str(fusion), "prepare", str(tmp_path / "run.yaml"), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    commits = out / "commits"
    deadline = time.monotonic() + 240
    while not (commits.is_dir() and any(commits.glob("*.json"))):
        assert process.poll() is None, "prepare ended before committing a part"
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed_at_kill = len(list(commits.glob("*.json")))
    assert not (out / "manifest.json").exists()

    resumed = prepare(parse_config(raw | {"ray": {}}), quiet=True)
    ids = pq.read_table(out / "data")["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(pq.read_table(full_out / "data")["id"].to_pylist())
    assert resumed.rows == summary.rows and committed_at_kill < resumed.files


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_another_config_on_the_same_output_is_refused(world, prepared):
    _, _, out = prepared
    raw = _raw_config(world, out)
    raw["align"] = {"method": "offsets"}
    result = CliRunner().invoke(app, ["prepare", _write(raw, out.parent / "other.yaml")])
    assert result.exit_code == 2
    assert "holds another run" in result.output


def _write(raw: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_unreadable_corpus_file_names_the_file_and_leaves_no_part(world, ray_cluster, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine text here"}\n{"text": "\xff\xfe"}\n')
    raw = _raw_config(world, tmp_path / "out")
    raw["data"]["paths"] = [str(tmp_path / "bad.jsonl")]
    result = CliRunner().invoke(app, ["prepare", _write(raw, tmp_path / "run.yaml")])
    assert result.exit_code == 2, result.output
    assert "bad.jsonl: not valid UTF-8" in result.output
    assert "Traceback" not in result.output
    assert not list((tmp_path / "out" / "data").glob("*.parquet"))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "sources.0.path .* does not exist"),
        ("no_weights", "holds no weights"),
        ("no_offsets", "slow tokenizer without character offsets"),
        ("bad_config", "sources.0.actors: .*greater than or equal to 1"),
        ("no_corpus", "matches no file"),
    ],
)
def test_unusable_inputs_exit_non_zero_naming_the_culprit(world, tmp_path, breakage, message):
    raw = _raw_config(world, tmp_path / "out")
    broken = tmp_path / "broken"
    if breakage == "missing":
        raw["sources"][0]["path"] = str(broken)
    elif breakage in ("no_weights", "no_offsets"):
        shutil.copytree(world / "coder", broken)
        raw["sources"][0]["path"] = str(broken)
        if breakage == "no_weights":
            (broken / "model.safetensors").unlink()
        else:
            (broken / "tokenizer.json").unlink()
            (broken / "tokenizer_config.json").unlink()
            ByT5Tokenizer().save_pretrained(broken)
    elif breakage == "bad_config":
        raw["sources"][0]["actors"] = 0
    else:
        raw["data"]["paths"] = [str(tmp_path / "nothing-here" / "*.jsonl")]
    result = CliRunner().invoke(app, ["prepare", _write(raw, tmp_path / "run.yaml")])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "data").exists() or not any(
        (tmp_path / "out" / "data").iterdir()
    )


def test_asking_for_more_than_the_cluster_has_fails_fast(world, tmp_path):
    raw = _raw_config(world, tmp_path / "out")
    raw["sources"][0]["num_gpus"] = 1
    with pytest.raises(ClusterError, match=r"asks for 1 GPUs .* the cluster has 0"):
        check_cluster(parse_config(raw), {"CPU": 2.0})
    raw["sources"][0] |= {"num_gpus": 0, "num_cpus": 2}
    with pytest.raises(ClusterError, match=r"need .* CPUs but the cluster has 2"):
        check_cluster(parse_config(raw), {"CPU": 2.0})


def test_estimate_predicts_tokens_and_bounds_disk_before_running(world, prepared, tmp_path):
    from fusion.estimate import estimate

    config, summary, out = prepared
    result = estimate(config)
    assert 0.7 * summary.tokens < result.tokens < 1.3 * summary.tokens
    written = sum(p.stat().st_size for p in (out / "data").glob("*.parquet"))
    assert result.disk_bytes > written
    assert [m.name for m in result.models] == ["target", "coder", "writer", "counter"]
    assert all(m.parameters > 0 and m.memory_bytes > 0 for m in result.models)
    cli = CliRunner().invoke(
        app, ["estimate", _write(_raw_config(world, out), tmp_path / "e.yaml")]
    )
    assert cli.exit_code == 0, cli.output
    assert "target tokens" in cli.output and "per actor" in cli.output


def test_fusion_run_streams_three_sources_into_a_trained_model(world, ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = _raw_config(world, tmp_path / "unused")
    for model in [raw["target"], *raw["sources"]]:
        model["num_cpus"] = 0.25
    raw["train"] = {
        "num_workers": 2,
        "cpus_per_worker": 0.2,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "lr": 3e-3,
        "max_steps": 4,
        "checkpoint_every": 2,
        "storage_path": str(tmp_path / "train"),
    }
    result = CliRunner().invoke(app, ["run", _write(raw, tmp_path / "run.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    export = tmp_path / "train" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size >= 700
    assert "coder" in (export / "README.md").read_text()
    assert yaml.safe_load((export / "fusion-config.yaml").read_text())["train"]["max_steps"] == 4
    assert not (tmp_path / "unused").exists()  # nothing materialised


@pytest.mark.parametrize(
    ("train", "message"),
    [({}, "train.max_steps: required"), ({"max_steps": 3, "epochs": 2}, "train.epochs: .* once")],
)
def test_fusion_run_needs_max_steps_and_one_epoch(world, tmp_path, train, message):
    raw = _raw_config(world, tmp_path / "out") | {"train": train}
    result = CliRunner().invoke(app, ["run", _write(raw, tmp_path / "run.yaml")])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
