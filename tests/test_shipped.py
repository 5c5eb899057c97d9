"""The shipped config, cluster files and job manifests, run as written as far as this
machine allows: only the model folders (tiny local ones), GPUs (none here) and sizes change."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fusion.cli import app
from fusion.cluster import ClusterError, check_cluster, total, training_check, training_demand
from fusion.config import load_config
from fusion.teacher.pipeline import prepare
from fusion.train.trainer import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "three-sources.yaml"


def _on_this_machine(model_dirs: dict, tmp_path: Path) -> dict:
    """The shipped config with tiny models, no GPUs, small sizes, and URIs for the corpus
    (a glob) and the prepared data."""
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["target"] |= {"path": str(model_dirs["target"]), "num_gpus": 0, "num_cpus": 0.2}
    for source, folder in zip(raw["sources"], ("gpt2", "target", "gpt2"), strict=True):
        source |= {"path": str(model_dirs[folder]), "num_gpus": 0, "num_cpus": 0.2}
    raw["data"] |= {"paths": [f"file://{tmp_path}/minipile/*.parquet"], "max_length": 64}
    raw["output"]["dir"] = f"file://{tmp_path}/fused"
    raw["train"] |= {
        "num_workers": 1,
        "use_gpu": False,
        "cpus_per_worker": 0.5,
        "global_batch_size": 4,
        "max_steps": 2,
        "storage_path": str(tmp_path / "train"),
        "data": f"file://{tmp_path}/fused",
    }
    return raw


def test_the_shipped_config_prepares_from_a_uri_glob_and_trains_from_a_uri(
    model_dirs, training_texts, ray_cluster, tmp_path
):
    (tmp_path / "minipile").mkdir()
    for part in range(2):
        texts = [t[:600] for t in training_texts[70 + 3 * part : 73 + 3 * part]]
        pq.write_table(pa.table({"text": texts}), tmp_path / "minipile" / f"{part}.parquet")
    (tmp_path / "minipile" / "notes.txt").write_text("not matched by *.parquet")
    config_file = tmp_path / "three-sources.yaml"
    config_file.write_text(yaml.safe_dump(_on_this_machine(model_dirs, tmp_path)))
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(config_file)]).exit_code == 0
    config = load_config(config_file)

    summary = prepare(config, quiet=True)
    manifest = json.loads((tmp_path / "fused" / "manifest.json").read_text())
    assert [s["name"].rsplit("/", 1)[-1] for s in manifest["shards"]] == [
        "0.parquet@0",
        "1.parquet@0",
    ]
    assert manifest["candidates"] == ["target", "mpt", "openllama", "neox"]
    shown = runner.invoke(app, ["inspect", f"file://{tmp_path}/fused"])
    assert shown.exit_code == 0 and f"{summary.rows:,} rows" in shown.output

    trained = train(config, quiet=True)
    assert trained.steps == 2
    card = (Path(trained.export_dir) / "README.md").read_text()
    assert f"file://{tmp_path}/fused" in card


def _cluster_launcher_maximum() -> dict[str, float]:
    cluster = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    maximum = {"CPU": 0.0, "GPU": 0.0}
    for name, node in cluster["available_node_types"].items():
        count = 1 if name == cluster["head_node_type"] else node["max_workers"]
        for resource in maximum:
            maximum[resource] += count * node["resources"].get(resource, 0)
    return maximum


def _rayjob_maximum(job: dict) -> dict[str, float]:
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["rayStartParams"]
    maximum = {"CPU": float(head["num-cpus"]), "GPU": 0.0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        maximum["CPU"] += group["maxReplicas"] * float(limits["cpu"])
        maximum["GPU"] += group["maxReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    return maximum


def test_the_cluster_files_can_grow_to_run_the_shipped_config_and_wait_for_it():
    config = load_config(SHIPPED)
    workers = total([training_demand(config)])
    head_only = {"CPU": 32.0}  # what the launcher's cluster has before any GPU node starts
    for maximum in (_cluster_launcher_maximum(), _rayjob_maximum(_rayjob())):
        note = check_cluster(config, head_only, also=workers, maximum=maximum)
        assert note is not None and note.startswith("waiting for the autoscaler")
        assert training_check(config, head_only, maximum).startswith("waiting")
    with pytest.raises(ClusterError, match="can grow to at most"):
        check_cluster(config, head_only, also={"GPU": 1000}, maximum=_cluster_launcher_maximum())


def _rayjob() -> dict:
    return yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())


def test_the_rayjob_runs_a_job_script_on_a_config_fusion_run_accepts():
    import ray

    job = _rayjob()
    python, script, config_path = job["spec"]["entrypoint"].split()
    assert python == "python" and (REPO / script).is_file()
    assert config_path.endswith("configs/three-sources.yaml")
    train_settings = load_config(SHIPPED).train
    assert train_settings.max_steps and train_settings.epochs == 1  # what `fusion run` needs
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    images = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]] + [
        g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]
    ]
    assert all(f":{ray.__version__}-" in image for image in images)
    assert yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())["env_vars"]
