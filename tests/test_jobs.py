"""`ray job submit` against a real local Ray head: the jobs/ entrypoints behave as the CLI.

The head runs on free ports with its own temp dir, started with ``ray start --block`` in its
own process group and stopped by signalling that group (never ``ray stop``, which would stop
every Ray process on the machine).
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


@pytest.fixture(scope="module")
def job_head():
    """A local Ray head with the job server; yields its dashboard address and environment."""
    temp = Path(tempfile.mkdtemp(prefix="fj", dir="/tmp"))  # short: Ray's socket paths are
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            f"--ray-client-server-port={_free_port()}",
            # its own agent ports: another Ray on this machine may hold the defaults
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            "--num-cpus=2",
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
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # a graceful stop idles ~30 s; the head's files go with it anyway
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)


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
    two_actors = {"sources.actors": 2, "sources.batch_size": 1}
    result = _submit(
        address, env, "run", _config(model_dirs, tmp_path, training_texts, **two_actors)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    used = _forward_actors(address) - before
    assert len(used) == 3, used  # the target's actor and both of the source's
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


def _forward_actors(address: str) -> set[str]:
    """Ids of the actors that have finished ForwardStage batches on the cluster so far."""
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=address,
        filters=[("state", "=", "FINISHED")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {t.actor_id for t in tasks if t.actor_id and "ForwardStage" in (t.name or "")}
