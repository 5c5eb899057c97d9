"""A Ray cluster of several nodes on this machine: placement by node, a node lost under a
running prepare, a node that joins while actors wait for it.

``ray.cluster_utils.Cluster`` starts a head and extra raylets as separate node processes,
each with its own CPUs and custom resources; ``add_node`` / ``remove_node`` are a node
joining and dying. One cluster serves the module; `fusion prepare` runs as users run it on a
cluster, a process joining ``ray.address``. The source is the simulated backend (a fixed
wait per token, deterministic top-k) so that a run lasts long enough to lose a node in it;
the target is a real tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a cluster starts slowly here
FUSION = str(Path(sys.executable).with_name("fusion"))


@pytest.fixture(scope="module")
def cluster():
    """A head (the drivers and light stages), a node with resource ``small`` (the target's
    actors) and one with ``big`` (the source's)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes = {
        "small": cluster.add_node(num_cpus=1, resources={"small": 1}),
        "big": cluster.add_node(num_cpus=1, resources={"big": 1}),
    }
    yield cluster, nodes
    cluster.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, training_texts) -> str:
    path = tmp_path_factory.mktemp("multinode") / "corpus.jsonl"
    with path.open("w") as f:
        for text in training_texts[40:48]:
            f.write(json.dumps({"text": text[:1000]}) + "\n")
    return str(path)


def _raw(model_dirs: dict, corpus: str, out: Path, address: str) -> dict:
    return {
        "target": {
            "path": str(model_dirs["target"]),
            "num_cpus": 0.2,
            "resources": {"small": 0.5},
        },
        "sources": [
            {
                "name": "sim",
                "path": str(model_dirs["gpt2"]),
                "backend": "simulated",
                "simulated_tokens_per_s": 1500,
                "num_cpus": 0.2,
                "batch_size": 4,
                "resources": {"big": 0.5},
            }
        ],
        "data": {"paths": [corpus], "max_length": 64, "block_chunks": 2},
        "align": {"method": "offsets", "mode": "clean"},  # light beside the models
        "output": {"dir": str(out), "rows_per_file": 8},
        "ray": {"address": address},
    }


def _env() -> dict[str, str]:
    """A `fusion` process's environment: it joins the cluster its config's ray.address names."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _start(
    raw: dict, folder: Path, command: str = "prepare", *options: str
) -> tuple[subprocess.Popen, Path]:
    """`fusion COMMAND` on the cluster, in its own process; its output goes to a log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{command}.yaml").write_text(yaml.safe_dump(raw))
    log = folder / f"{command}.log"
    process = subprocess.Popen(
        [FUSION, command, str(folder / f"{command}.yaml"), *options],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    return process, log


def _ended(process: subprocess.Popen, timeout: float, log: Path) -> None:
    """Wait for ``process``; one still running after ``timeout`` is killed (and fails)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"still running after {timeout:g} s:\n{log.read_text()[-3000:]}")


def _finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    _ended(process, timeout, log)
    said = log.read_text()
    assert process.returncode == 0, said[-4000:]
    return said


def _wait_for(condition, process: subprocess.Popen, log: Path, what: str, limit: float = 240):
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"prepare ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {limit:g} s"
        time.sleep(0.05)


def _provenance(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["provenance"]


def _assert_same_rows(got: Path, expected: Path) -> None:
    """Every column of both data sets equal, row for row (parts may be cut differently)."""
    mine = pq.read_table(got / "data").sort_by("id")
    theirs = pq.read_table(expected / "data").sort_by("id")
    assert mine.num_rows == theirs.num_rows > 0
    assert mine.schema.names == theirs.schema.names
    for name in theirs.schema.names:
        assert mine[name].to_pylist() == theirs[name].to_pylist(), name


@pytest.fixture(scope="module")
def placed(cluster, model_dirs, corpus, tmp_path_factory) -> Path:
    """An uninterrupted prepare: the target's actors on ``small``, the source's on ``big``."""
    head, _nodes = cluster
    folder = tmp_path_factory.mktemp("placed")
    process, log = _start(_raw(model_dirs, corpus, folder / "out", head.address), folder)
    _finish(process, log)
    return folder / "out"


def test_each_model_runs_on_the_nodes_its_resources_name_and_the_manifest_says_which(
    cluster, placed
):
    _head, nodes = cluster
    provenance = _provenance(placed)
    assert provenance["target"]["nodes"] == [nodes["small"].node_id]
    assert provenance["sim"]["nodes"] == [nodes["big"].node_id]
    rows = pq.read_table(placed / "data", columns=["id"]).num_rows
    assert provenance["sim"]["rows"] == provenance["target"]["rows"] == rows > 8


def test_a_node_lost_under_a_running_prepare_moves_its_source_to_another_and_loses_no_row(
    cluster, placed, model_dirs, corpus, tmp_path
):
    head, nodes = cluster
    nodes["big-2"] = head.add_node(num_cpus=1, resources={"big": 1})  # where it can go
    raw = _raw(model_dirs, corpus, tmp_path / "out", head.address)
    raw["sources"][0] |= {"simulated_tokens_per_s": 150, "batch_size": 2}  # ~20 s of reading
    process, log = _start(raw, tmp_path)
    commits = tmp_path / "out" / "units" / "sim" / "commits"
    _wait_for(lambda: any(commits.glob("*.json")), process, log, "committed part of sim")
    first = json.loads(next(commits.glob("*.json")).read_text())
    (lost,) = [name for name, node in nodes.items() if node.node_id in first["nodes"]]
    head.remove_node(nodes.pop(lost), allow_graceful=False)  # the source's node dies
    said = _finish(process, log)
    assert "units/sim" in said
    _assert_same_rows(tmp_path / "out", placed)
    read_on = _provenance(tmp_path / "out")["sim"]["nodes"]
    assert len(read_on) == 2 and first["nodes"][0] in read_on  # begun there, ended elsewhere


def test_a_source_waits_for_a_node_with_its_resource_and_starts_when_one_joins(
    cluster, placed, model_dirs, corpus, tmp_path
):
    head, nodes = cluster
    raw = _raw(model_dirs, corpus, tmp_path / "out", head.address)
    raw["sources"][0] |= {"resources": {"late": 0.5}, "actors": "1-2"}  # an autoscaling pool
    raw["ray"]["max_resources"] = {"late": 2}  # what the cluster's node types can grow to
    process, log = _start(raw, tmp_path)
    _wait_for(lambda: "waiting for the autoscaler" in log.read_text(), process, log, "note")
    assert "need 0.5 of resource 'late' (it has 0 now)" in log.read_text()
    time.sleep(2)
    assert process.poll() is None  # it waits, it does not fail
    nodes["late"] = head.add_node(num_cpus=1, resources={"late": 1})
    _finish(process, log)
    _assert_same_rows(tmp_path / "out", placed)
    assert _provenance(tmp_path / "out")["sim"]["nodes"] == [nodes["late"].node_id]


def test_a_resource_no_node_has_is_refused_naming_it_and_who_asks(
    cluster, model_dirs, corpus, tmp_path
):
    head, _nodes = cluster
    raw = _raw(model_dirs, corpus, tmp_path / "out", head.address)
    raw["sources"][0]["resources"] = {"a100_80g": 1}
    (tmp_path / "validate.yaml").write_text(yaml.safe_dump(raw))
    checked = subprocess.run(
        [FUSION, "validate", str(tmp_path / "validate.yaml")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "source 'sim' asks for resource 'a100_80g', but no node of the" in checked.stderr
    process, log = _start(raw, tmp_path)
    _ended(process, 120, log)
    said = log.read_text()
    assert process.returncode != 0
    assert "source 'sim' asks for resource 'a100_80g', but no node of the cluster declares" in said


def _train_raw(model_dirs: dict, corpus: str, data: Path, storage: Path, address: str) -> dict:
    """Training on ``data`` with two DDP workers, one per node declaring ``trainer``."""
    raw = _raw(model_dirs, corpus, data, address)
    raw["train"] = {
        "num_workers": 2,
        "cpus_per_worker": 0.3,
        "resources": {"trainer": 1},
        "strategy": "ddp",
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "lr": 3e-3,
        "warmup_ratio": 0.1,
        "checkpoint_every": 2,
        "max_steps": 10,
        "max_failures": 1,
        "storage_path": str(storage),
    }
    return raw


def test_training_that_loses_a_workers_node_restores_its_checkpoint_on_a_new_one(
    cluster, placed, model_dirs, corpus, tmp_path
):
    from tests.test_train import _registered_checkpoint, _weights

    head, nodes = cluster
    for name in ("trainer-1", "trainer-2"):
        nodes[name] = head.add_node(num_cpus=1, resources={"trainer": 1})
    whole = tmp_path / "uninterrupted"
    raw = _train_raw(model_dirs, corpus, placed, whole, head.address)
    _finish(*_start(raw, whole, "train", "-q"))

    storage = tmp_path / "interrupted"
    raw = _train_raw(model_dirs, corpus, placed, storage, head.address)
    process, log = _start(raw, storage, "train", "-q")
    _wait_for(lambda: _registered_checkpoint(storage / "fusion-train"), process, log, "checkpoint")
    head.remove_node(nodes.pop("trainer-2"), allow_graceful=False)  # a worker's node dies
    assert not (storage / "export").exists()
    nodes["trainer-3"] = head.add_node(num_cpus=1, resources={"trainer": 1})
    _finish(process, log)
    steps = [json.loads(line)["step"] for line in (storage / "metrics.jsonl").open()]
    assert sorted(set(steps)) == list(range(1, 11))  # every step, some again after the restore
    expected, got = _weights(whole / "export"), _weights(storage / "export")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_source_whose_last_node_is_lost_stops_naming_it_and_a_rerun_resumes(
    cluster, placed, model_dirs, corpus, tmp_path
):
    head, nodes = cluster
    (name,) = [n for n, node in nodes.items() if n.startswith("big")]  # the one node with big
    raw = _raw(model_dirs, corpus, tmp_path / "out", head.address)
    raw["sources"][0] |= {"simulated_tokens_per_s": 150, "batch_size": 2}
    process, log = _start(raw, tmp_path / "killed")
    commits = tmp_path / "out" / "units" / "sim" / "commits"
    _wait_for(lambda: any(commits.glob("*.json")), process, log, "committed part of sim")
    lost = nodes.pop(name)
    head.remove_node(lost, allow_graceful=False)
    _ended(process, 180, log)
    said = log.read_text()
    assert process.returncode == 2, said[-3000:]
    assert f"source 'sim': the node its actors ran on ({lost.node_id}) is gone" in said
    assert "no live node of the cluster can hold its actors (0.2 CPU, 0.5 big)" in said

    nodes["big-3"] = head.add_node(num_cpus=1, resources={"big": 1})
    process, log = _start(raw, tmp_path / "again")
    said = _finish(process, log)
    assert "rows committed by an earlier run" in said
    _assert_same_rows(tmp_path / "out", placed)
