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
import torch
import yaml
from typer.testing import CliRunner

from fusion.cli import app
from fusion.cluster import ClusterError, check_cluster, cluster_maximum
from fusion.config import parse_config
from fusion.data.chunking import encode
from fusion.models.loading import load_tokenizer
from fusion.teacher.backends.hf import HFTopK
from fusion.teacher.fuse import NO_TEACHER
from fusion.teacher.pipeline import build_bridges, build_projections, prepare
from fusion.teacher.plan import resolve
from fusion.teacher.refuse import refuse
from fusion.teacher.stages import align_row
from fusion.testing.toy import save_model_dir, tiny_causal_lm, train_tokenizer

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
    bridges = build_bridges(resolve(config))
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
            ids, logits, aligned = bridges[source.name].transfer(
                input_ids, source_ids, topk.ids, topk.logits, alignment
            )
            assert row[f"{source.name}.aligned"] == aligned.tolist()
            assert np.asarray(row[f"{source.name}.topk_ids"]).tolist() == ids.tolist()
            stored = np.asarray(row[f"{source.name}.topk_logits"], dtype=np.float32)
            assert np.array_equal(stored, logits.astype(np.float16).astype(np.float32))


def _fidelity_by_hand(rows: list[dict], name: str, target_tokenizer) -> tuple[float, float]:
    """Bits per byte of the next target token under distribution ``name`` as stored (float16
    values; top-k scaled by 1 - tail, else the tail shared by the ids the top-k lacks, a tail
    of 0 counted as 2^-24) over the positions it teaches, and the model's own bits per byte."""
    nats = size = own_nats = own_size = 0.0
    vocab = len(target_tokenizer)
    for row in rows:
        text, ids = row["text"], row["input_ids"]
        ends = [end for _, end in encode(target_tokenizer, text, False)[1]]
        for t in range(len(ids) - 1):
            teaches = (
                row["fused.choice"][t] != NO_TEACHER
                if name == "fused"
                else row[f"{name}.aligned"][t]
            )
            if not teaches:
                continue
            kept = [
                (i, float(np.float16(v)))
                for i, v in zip(
                    row[f"{name}.topk_ids"][t], row[f"{name}.topk_logits"][t], strict=True
                )
                if i >= 0 and v > -np.inf
            ]
            tail = max(float(np.float16(row[f"{name}.tail"][t])), 2.0**-24)
            label = ids[t + 1]
            if label in [i for i, _ in kept]:
                weights = {i: np.exp(v) for i, v in kept}
                p = (1 - min(tail, 1 - 2.0**-24)) * weights[label] / sum(weights.values())
            else:
                p = tail / (vocab - len(kept))
            nats -= np.log(p)
            size += len(text[ends[t] : ends[t + 1]].encode()) if t + 1 < len(ends) else 0
        if name != "fused" and np.isfinite(row[f"{name}.nll"]):
            own_nats += row[f"{name}.nll"]
            own_size += row[f"{name}.nll_bytes"]
    bits = 1 / np.log(2)
    return nats * bits / size, (own_nats * bits / own_size if own_size else 0.0)


def test_bytes_method_stores_each_sources_projection_as_the_backend_computes_it(
    world, ray_cluster, tmp_path
):
    """align.method bytes: every source teaches at every target position of the text, in
    target ids, as HFTopK.read_projected gives it; the manifest reports fidelity. Fused by
    the look-back mixture, which scores the stored (float16) distributions: fusing the data
    set again from its files gives the same fused columns."""
    raw = _raw_config(
        world,
        tmp_path / "out",
        align={"method": "bytes", "mode": "clean", "map_cache": str(tmp_path / "maps")},
        fuse={"method": "avg_ce", "granularity": "prefix", "window": 8},
    )
    raw["data"]["paths"] = [str(world / "corpus" / "a.jsonl")]
    raw["sources"] = [s for s in raw["sources"] if s["name"] in ("coder", "counter")]
    config = parse_config(raw)
    prepare(config, quiet=True)
    out = tmp_path / "out"
    found = json.loads((out / "manifest.json").read_text())["diagnostics"]
    target_tokenizer = load_tokenizer(config.target.path)
    everything = pq.read_table(out / "data").to_pylist()
    for name in ("coder", "counter"):
        stats = found["candidates"][name]
        assert stats["coverage"] > 0.99
        stored, own = _fidelity_by_hand(everything, name, target_tokenizer)
        assert stats["bits_per_byte"] == pytest.approx(stored, abs=2e-4)
        assert stats["own_bits_per_byte"] == pytest.approx(own, abs=2e-4)
    assert found["fused"]["bits_per_byte"] == pytest.approx(
        _fidelity_by_hand(everything, "fused", target_tokenizer)[0], abs=2e-4
    )
    projections = build_projections(resolve(config))
    rows = pq.read_table(out / "data").sort_by("id").slice(0, 4).to_pylist()
    for index, source in enumerate(config.sources):
        reader = HFTopK(source, f"sources.{index}", num_gpus=0, top_k=10)
        for row in rows:
            input_ids = np.asarray(row["input_ids"], np.int32)
            target_offsets = encode(target_tokenizer, row["text"], False)[1]
            ids, offsets = reader.encode(row["text"], len(input_ids) > len(target_offsets))
            plan = projections[source.name].plan(
                row["text"], input_ids, target_offsets, ids, offsets, reader.bos is not None
            )
            got = reader.read_projected([ids], [row["id"]], [plan], projections[source.name])[0]
            n = len(target_offsets)
            assert row[f"{source.name}.aligned"][:n] == got.aligned.tolist()
            assert not any(row[f"{source.name}.aligned"][n:])  # the EOS position
            assert np.asarray(row[f"{source.name}.topk_ids"])[:n].tolist() == got.ids.tolist()
            stored = np.asarray(row[f"{source.name}.topk_logits"], dtype=np.float32)[:n]
            assert np.array_equal(stored, got.logits.astype(np.float16).astype(np.float32))
            tail = np.asarray(row[f"{source.name}.tail"], dtype=np.float32)[:n]
            assert np.array_equal(tail, got.tail.astype(np.float16).astype(np.float32))
    refuse(out, tmp_path / "again", {})
    again = pq.read_table(tmp_path / "again" / "data").sort_by("id")
    first = pq.read_table(out / "data").sort_by("id")
    for column in ("fused.topk_ids", "fused.topk_logits", "fused.tail", "fused.choice"):
        assert again[column].to_pylist() == first[column].to_pylist(), column


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


def test_killed_prepare_resumes_to_the_same_rows_with_none_missing_or_repeated(
    world, prepared, tmp_path
):
    _, summary, full_out = prepared
    out = tmp_path / "out"
    raw = _raw_config(world, out)
    raw["sources"] = raw["sources"][:1]  # resuming is under test, not the number of models
    raw["output"]["rows_per_file"] = 4
    raw["ray"] = {"address": ray_address()}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    fusion = Path(sys.executable).with_name("fusion")
    process = subprocess.Popen(
        [str(fusion), "prepare", str(tmp_path / "run.yaml"), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    unit = out / "units" / "coder"  # killed while the source's columns are being written
    deadline = time.monotonic() + 240
    while not ((unit / "commits").is_dir() and any((unit / "commits").glob("*.json"))):
        assert process.poll() is None, "prepare ended before committing a part"
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kept = {p.name: p.read_bytes() for p in (unit / "data").glob("*.parquet")}
    committed = {p.name.removesuffix(".json") for p in (unit / "commits").glob("*.json")}
    assert not (out / "manifest.json").exists()

    resumed = prepare(parse_config(raw | {"ray": {}}), quiet=True)
    ids = pq.read_table(out / "data")["id"].to_pylist()
    assert len(ids) == len(set(ids))
    unit_ids = pq.read_table(unit / "data", columns=["id"])["id"].to_pylist()
    assert sorted(unit_ids) == sorted(set(unit_ids)) == sorted(ids)
    for name in committed:  # what was committed before the kill is kept as it was
        assert (unit / "data" / name).read_bytes() == kept[name]
    assert resumed.rows == summary.rows and len(committed) < len(list(unit.glob("data/*")))
    # The same rows, value for value, as the uninterrupted run (parts are cut differently; the
    # fused columns differ as that run fused more sources).
    got = pq.read_table(out / "data").sort_by("id")
    expected = pq.read_table(full_out / "data").sort_by("id")
    shared = [c for c in got.column_names if not c.startswith("fused.")]
    assert {"id", "target.topk_logits", "coder.topk_ids", "coder.ce"} <= set(shared)
    assert set(shared) <= set(expected.column_names)
    for name in shared:
        assert got[name].to_pylist() == expected[name].to_pylist(), name


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


CRASH_ONCE = """
import os

from transformers import GPT2LMHeadModel


class CrashOnceGPT2(GPT2LMHeadModel):
    \"\"\"GPT-2 whose process dies in the third pass through its body (the first is the
    load-time check of the output head, the second the first batch), the first time only.\"\"\"

    calls = 0

    def __init__(self, config):
        super().__init__(config)
        self.transformer.register_forward_pre_hook(self._crash_once)

    def _crash_once(self, module, args):
        CrashOnceGPT2.calls += 1
        if CrashOnceGPT2.calls == 3:
            try:
                os.close(os.open(self.config.crash_marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass  # already died once: this is the restarted actor
            else:
                os._exit(1)
"""


def test_a_source_actor_dying_mid_batch_is_restarted_and_no_row_is_lost_or_repeated(
    world, prepared, tmp_path
):
    _, summary, full_out = prepared
    crashing = shutil.copytree(world / "coder", tmp_path / "coder")
    (crashing / "modeling_crash_once.py").write_text(CRASH_ONCE)
    marker = tmp_path / "died-once"
    config = json.loads((crashing / "config.json").read_text())
    config |= {
        "auto_map": {"AutoModelForCausalLM": "modeling_crash_once.CrashOnceGPT2"},
        "crash_marker": str(marker),
    }
    (crashing / "config.json").write_text(json.dumps(config))
    raw = _raw_config(world, tmp_path / "out")
    raw["sources"] = [raw["sources"][0] | {"path": str(crashing), "trust_remote_code": True}]

    resumed = prepare(parse_config(raw), quiet=True)
    assert marker.exists(), "the source actor never died"
    assert resumed.rows == summary.rows
    got = pq.read_table(tmp_path / "out" / "data").sort_by("id")
    expected = pq.read_table(full_out / "data").sort_by("id")
    shared = [c for c in got.column_names if not c.startswith("fused.")]  # fewer candidates
    assert {"id", "target.topk_logits", "coder.topk_ids", "coder.ce"} <= set(shared)
    for name in shared:
        assert got[name].to_pylist() == expected[name].to_pylist(), name


def test_refuse_without_a_source_keeps_every_other_choice_and_drops_its_columns(prepared, tmp_path):
    """`fusion refuse --drop NAME`: MinCE over the other candidates picks, wherever the full
    fusion did not pick NAME, the candidate it picked there (the writer wins every row here:
    dropping the coder keeps each choice, dropping the writer moves every one); NAME's columns
    are gone; a name the data set lacks, or dropping every source, is refused."""
    _, _, out = prepared
    full = json.loads((out / "manifest.json").read_text())["candidates"]
    before = {r["id"]: r for r in pq.read_table(out / "data").to_pylist()}
    for dropped in ("coder", "writer"):
        refused = tmp_path / f"no-{dropped}"
        result = CliRunner().invoke(app, ["refuse", str(out), str(refused), "--drop", dropped])
        assert result.exit_code == 0, result.output
        kept = json.loads((refused / "manifest.json").read_text())["candidates"]
        assert kept == [name for name in full if name != dropped]
        after = pq.read_table(refused / "data")
        assert not [c for c in after.column_names if c.startswith(f"{dropped}.")]
        kept_choices = moved = 0
        for row in after.to_pylist():
            old = before[row["id"]]["fused.choice"]
            for t, choice in enumerate(row["fused.choice"]):
                if choice >= 0:
                    assert row["fused.topk_ids"][t] == row[f"{kept[choice]}.topk_ids"][t]
                if old[t] >= 0 and full[old[t]] != dropped:
                    assert kept[choice] == full[old[t]]
                    kept_choices += 1
                moved += old[t] >= 0 and full[old[t]] == dropped and choice >= 0
        assert (kept_choices > 1000) if dropped == "coder" else (moved > 1000)
    unknown = CliRunner().invoke(app, ["refuse", str(out), str(tmp_path / "x"), "--drop", "poet"])
    assert unknown.exit_code == 2 and "holds no such source" in unknown.output
    every = ["refuse", str(out), str(tmp_path / "y")]
    every += ["--drop", "coder", "--drop", "writer", "--drop", "counter"]
    nothing = CliRunner().invoke(app, every)
    assert nothing.exit_code == 2 and "leaves no source" in nothing.output


def test_a_config_that_cuts_the_corpus_another_way_is_refused_naming_the_field(world, prepared):
    _, _, out = prepared
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    raw = _raw_config(world, out)
    raw["data"]["max_length"] -= 8
    result = CliRunner().invoke(app, ["prepare", _write(raw, out.parent / "other.yaml")])
    assert result.exit_code == 2
    assert "holds chunks cut another way (data.max_length: the stored chunks were cut with " in (
        " ".join(result.output.split())
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def _write(raw: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_cluster_check_refuses_only_what_the_cluster_can_never_provide(
    world, ray_cluster, tmp_path
):
    raw = _raw_config(world, tmp_path / "out")
    raw["sources"][0]["num_gpus"] = 1
    gpu = parse_config(raw)
    with pytest.raises(ClusterError, match=r"need 1 GPUs but the cluster has 0 and does not"):
        check_cluster(gpu, {"CPU": 2.0})  # a fixed cluster: refused at once
    note = check_cluster(gpu, {"CPU": 2.0}, maximum={"CPU": 66.0, "GPU": 8.0})
    assert note == (
        "waiting for the autoscaler: the config's model actors, CPU stages and training "
        "workers need 1 GPUs (it has 0 now)"
    )
    with pytest.raises(ClusterError, match=r"need 1 GPUs but the cluster can grow to at most 0"):
        check_cluster(gpu, {"CPU": 2.0}, maximum={"CPU": 66.0})  # no GPU node group
    raw["sources"][0] |= {"num_gpus": 0, "num_cpus": 2}
    with pytest.raises(ClusterError, match=r"need 3.65 CPUs but the cluster has 2"):
        check_cluster(parse_config(raw), {"CPU": 2.0})  # 4 × 0.35 + 2 - 0.35 + 6 × 0.1 stages
    raw["sources"][0]["num_cpus"] = 0.35
    assert check_cluster(parse_config(raw), {"CPU": 2.0}) is None
    assert cluster_maximum(gpu) is None  # the test cluster publishes no autoscaling limits
    limits = gpu.model_copy(
        update={"ray": gpu.ray.model_copy(update={"max_resources": {"GPU": 4}})}
    )
    assert cluster_maximum(limits) == {"GPU": 4}  # a config may say what the cluster grows to


def test_estimate_predicts_tokens_and_bounds_disk_before_running(world, prepared, tmp_path):
    from fusion.teacher.estimate import estimate

    config, summary, out = prepared
    result = estimate(config)
    assert 0.7 * summary.tokens < result.tokens < 1.3 * summary.tokens
    written = sum(p.stat().st_size for p in out.rglob("*.parquet"))  # units and chunks too
    assert result.disk_bytes > written
    assert [m.name for m in result.models] == ["target", "coder", "writer", "counter"]
    assert all(m.parameters > 0 and m.memory_bytes > 0 for m in result.models)
    cli = CliRunner().invoke(
        app, ["estimate", _write(_raw_config(world, out), tmp_path / "e.yaml")]
    )
    assert cli.exit_code == 0, cli.output
    assert "target tokens" in cli.output and "per actor" in cli.output


def _streamed_raw(world: Path, storage: Path) -> dict:
    raw = _raw_config(world, storage / "unused")
    raw["sources"] = raw["sources"][:1]  # one source keeps the three streamed runs short
    for model in [raw["target"], *raw["sources"]]:
        model["num_cpus"] = 0.25
    raw["train"] = {
        "num_workers": 1,
        "cpus_per_worker": 0.4,
        "global_batch_size": 2,
        "micro_batch_size": 2,
        "lr": 3e-3,
        "max_steps": 6,
        "checkpoint_every": 2,
        "storage_path": str(storage),
    }
    return raw


@pytest.fixture(scope="module")
def streamed(world, ray_cluster, tmp_path_factory):
    """An uninterrupted `fusion run`: target and a source streamed into one training worker."""
    storage = tmp_path_factory.mktemp("streamed")
    raw = _streamed_raw(world, storage)
    result = CliRunner().invoke(app, ["run", _write(raw, storage.parent / "run.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    return storage


def test_fusion_run_streams_teacher_rows_into_a_trained_model(streamed):
    from transformers import AutoModelForCausalLM

    export = streamed / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size >= 700
    assert "coder" in (export / "README.md").read_text()
    assert yaml.safe_load((export / "fusion-config.yaml").read_text())["train"]["max_steps"] == 6
    assert not (streamed / "unused").exists()  # nothing materialised


def test_killed_streamed_run_resumes_to_the_same_weights(world, streamed, tmp_path, capsys):
    from fusion.train.run import run
    from tests.test_train import _weights, kill_after_first_checkpoint

    storage = tmp_path / "killed"
    raw = _streamed_raw(world, storage)
    config = _write(raw | {"ray": {"address": ray_address()}}, tmp_path / "run.yaml")
    kill_after_first_checkpoint("run", Path(config), storage)

    resumed = run(parse_config(raw), quiet=True)
    steps = [
        json.loads(line)["step"] for line in (storage / "metrics.jsonl").read_text().splitlines()
    ]
    assert set(steps) == set(range(1, 7)) and steps.count(1) == 1  # continued, not restarted
    # The stream restarted after the rows of the checkpoint's steps (a checkpoint every 2
    # steps of 2 rows, all from the first shard): no model read them again.
    restart = re.search(
        r"resuming the stream at shard 0, after its first (\d+) rows", capsys.readouterr().err
    )
    assert restart is not None and int(restart[1]) in (4, 8)
    assert resumed.steps == 6
    expected, got = _weights(streamed / "export"), _weights(Path(resumed.export_dir))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("train", "message"),
    [({}, "train.max_steps: required"), ({"max_steps": 3, "epochs": 2}, "train.epochs: .* once")],
)
def test_fusion_run_needs_max_steps_and_one_epoch(world, tmp_path, train, message):
    raw = _raw_config(world, tmp_path / "out") | {"train": train}
    result = CliRunner().invoke(app, ["run", _write(raw, tmp_path / "run.yaml")])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
