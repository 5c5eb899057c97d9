"""`ray job submit` against a real local Ray cluster of two nodes: the jobs/ entrypoints
behave as the CLI, and a submitted run's actors go where their resources send them.

The head and a worker node run on free ports with their own temp dir, each started with
``ray start --block`` in its own process group and stopped by signalling that group (never
``ray stop``, which would stop every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent_ports() -> list[str]:
    """Each node's own agent ports: another Ray on this machine may hold the defaults."""
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


@pytest.fixture(scope="module")
def job_head():
    """A local Ray head with the job server (resource ``head``) and a worker node (resource
    ``worker``); yields the dashboard address and environment."""
    temp = Path(tempfile.mkdtemp(prefix="fj", dir="/tmp"))  # short: Ray's socket paths are
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard, port = _free_port(), _free_port()
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            f"--ray-client-server-port={_free_port()}",
            *_agent_ports(),
            "--num-cpus=2",
            '--resources={"head": 1}',
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "the Ray head exited while starting"
            assert time.monotonic() < deadline, "the Ray head's job server did not come up"
            time.sleep(0.5)
    worker = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            f"--address=127.0.0.1:{port}",
            "--block",
            *_agent_ports(),
            "--num-cpus=1",
            '--resources={"worker": 1}',
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while len(_alive_nodes(address)) < 2:
        assert worker.poll() is None, "the worker node exited while starting"
        assert time.monotonic() < deadline, "the worker node did not join the head"
        time.sleep(0.5)
    yield address, env
    for node in (worker, head):
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=5)  # a graceful stop idles ~30 s; its files go with the head's
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    shutil.rmtree(temp, ignore_errors=True)


def _alive_nodes(address: str) -> list:
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, raise_on_missing_output=False)
    except Exception:  # the state API answers once the head's dashboard has its nodes
        return []
    return [node for node in nodes if node.state == "ALIVE"]


def _submit(address: str, env: dict, entrypoint: str, config: Path) -> subprocess.CompletedProcess:
    """Submit a job; while the head's job agent has not registered yet, ask again."""
    deadline = time.monotonic() + 120
    while True:
        result = _submit_once(address, env, entrypoint, config)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(1)


def _submit_once(
    address: str, env: dict, entrypoint: str, config: Path
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            f"jobs/{entrypoint}.py",
            str(config),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _config(model_dirs: dict, tmp_path: Path, training_texts: list[str], **changes) -> Path:
    with (tmp_path / "corpus.jsonl").open("w") as f:
        for text in training_texts[40:52]:
            f.write(json.dumps({"text": text[:800]}) + "\n")
    raw = {
        "target": {"path": str(model_dirs["target"]), "num_cpus": 0.3},
        "sources": [{"name": "coder", "path": str(model_dirs["gpt2"]), "num_cpus": 0.3}],
        "data": {"paths": [str(tmp_path / "corpus.jsonl")], "max_length": 64},
        "output": {"dir": str(tmp_path / "out")},
        "train": {
            "num_workers": 1,
            "cpus_per_worker": 0.3,
            "global_batch_size": 2,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "max_steps": 2,
            "checkpoint_every": 1,
            "storage_path": str(tmp_path / "train"),
        },
    }
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        node = raw[section][0] if section == "sources" else raw[section]
        node[key] = value
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "run.yaml"


def test_submitted_fusion_run_succeeds_and_exports_a_model_with_every_actor_working(
    job_head, model_dirs, training_texts, tmp_path
):
    from transformers import AutoModelForCausalLM

    address, env = job_head
    before = _forward_actors(address)
    two_actors = {
        "sources.actors": 2,
        "sources.batch_size": 1,
        "sources.resources": {"worker": 0.3},  # the source on the worker node
        "target.resources": {"head": 0.3},  # the target on the head
    }
    result = _submit(
        address, env, "run", _config(model_dirs, tmp_path, training_texts, **two_actors)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    used = {a: node for a, node in _forward_actors(address).items() if a not in before}
    assert len(used) == 3, used  # the target's actor and both of the source's
    nodes = {node.node_id: node.resources_total for node in _alive_nodes(address)}
    assert {"head" in nodes[node] for node in used.values()} == {True, False}, used
    export = tmp_path / "train" / "export"
    assert AutoModelForCausalLM.from_pretrained(export).config.vocab_size > 0
    assert (export / "README.md").is_file() and (export / "fusion-config.yaml").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sources.num_gpus": 1}, "need 1 GPUs but the cluster has 0"),
        ({"sources.path": "/nowhere/on/this/cluster"}, "does not exist"),
    ],
)
def test_a_job_the_cluster_cannot_run_fails_fast_with_the_reason(
    job_head, model_dirs, training_texts, tmp_path, change, message
):
    address, env = job_head
    started = time.monotonic()
    result = _submit(
        address, env, "prepare", _config(model_dirs, tmp_path, training_texts, **change)
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert time.monotonic() - started < 120


def _forward_actors(address: str) -> dict[str, str | None]:
    """The actors that have finished ForwardStage batches on the cluster so far, with the
    node each ran on (where the state API knows it)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=address,
        filters=[("state", "=", "FINISHED")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    nodes: dict[str, str] = {}
    for task in tasks:
        if task.actor_id and "ForwardStage" in (task.name or ""):
            nodes[task.actor_id] = task.node_id or nodes.get(task.actor_id)
    return nodes
