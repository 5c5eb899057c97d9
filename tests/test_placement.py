"""Where model actors put their models: settings built for GPUs, checked without one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusion.config import SourceConfig
from fusion.models.placement import hf_placement, vllm_placement

GIB = 2**30


def test_a_two_gpu_hf_source_is_spread_over_both_under_its_budget():
    placement = hf_placement(2, "cuda", [80 * GIB, 80 * GIB], 0.9)
    assert placement == {"device_map": "auto", "max_memory": {0: 72 * GIB, 1: 72 * GIB}}


@pytest.mark.parametrize(("num_gpus", "device"), [(1, "cuda"), (0.5, "cuda"), (0, "cpu")])
def test_a_model_on_one_gpu_or_less_is_moved_whole(num_gpus, device):
    assert hf_placement(num_gpus, device, [80 * GIB], 0.9) == {}


def test_a_vllm_source_gets_its_share_of_a_gpu_or_tensor_parallelism_over_several():
    assert vllm_placement(0.5, 0.9) == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.45}
    assert vllm_placement(1, 0.8) == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.8}
    assert vllm_placement(4, 0.9) == {
        "tensor_parallel_size": 4,
        "gpu_memory_utilization": 0.9,
        "distributed_executor_backend": "mp",
    }
    assert vllm_placement(0, 0.9) == {}


def test_more_than_one_gpu_must_be_whole_gpus():
    assert SourceConfig(name="s", path="m", num_gpus=2).num_gpus == 2
    with pytest.raises(ValidationError, match=r"1.5: a model spread over several GPUs takes whole"):
        SourceConfig(name="s", path="m", num_gpus=1.5)


@pytest.fixture()
def gpu_config(tmp_path, model_dirs, training_texts):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(training_texts[:5]))
    return {
        "target": {"path": str(model_dirs["target"])},
        "sources": [{"name": "big", "path": str(model_dirs["gpt2"]), "num_gpus": 2}],
        "data": {"paths": [str(corpus)], "max_length": 128},
        "output": {"dir": str(tmp_path / "out")},
    }


def _parameters(folder) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).num_parameters()


@pytest.mark.parametrize(
    ("train", "bytes_per_parameter"),
    [
        ({"strategy": "ddp", "num_workers": 2}, 16),  # fp32 weights 4 + grads 4 + moments 8
        ({"zero_stage": 2, "num_workers": 4}, 4 + 12 / 4),
        ({"zero_stage": 3, "num_workers": 4, "use_gpu": True}, 16 / 4),  # bf16 2+2, fp32 12
        ({"zero_stage": 1, "num_workers": 2, "use_gpu": True}, 2 + 2 + 12 / 2),
    ],
)
def test_training_memory_per_worker_follows_the_zero_stage(gpu_config, train, bytes_per_parameter):
    from fusion.config import parse_config
    from fusion.teacher.estimate import estimate

    settings = {"global_batch_size": 8, "micro_batch_size": 1} | train
    result = estimate(parse_config(gpu_config | {"train": settings}))
    parameters = _parameters(gpu_config["target"]["path"])
    assert result.training.bytes_per_worker == int(parameters * bytes_per_parameter)


def test_estimate_reports_memory_per_gpu_and_warns_when_a_model_will_not_fit(gpu_config, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from fusion.cli import app
    from fusion.config import parse_config
    from fusion.teacher.estimate import estimate

    source = estimate(parse_config(gpu_config)).models[-1]
    assert source.gpus == 2 and source.per_gpu_bytes == source.memory_bytes // 2
    assert source.fits and source.gpu_budget_bytes == int(80 * GIB * 0.9)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(gpu_config))
    tiny = source.per_gpu_bytes / 2 / GIB  # GPUs of half what it needs on each
    result = CliRunner().invoke(
        app, ["estimate", str(tmp_path / "run.yaml"), "--gpu-gib", str(tiny)]
    )
    assert result.exit_code == 0, result.output
    assert "on each of 2 GPU" in result.output
    assert "warning: big needs" in result.output and "num_gpus" in result.output


def test_a_cluster_with_gpus_that_the_config_leaves_idle_is_noted(gpu_config):
    from fusion.cluster import unused_gpus
    from fusion.config import parse_config

    cpu_only = gpu_config | {"sources": [gpu_config["sources"][0] | {"num_gpus": 0}]}
    note = unused_gpus(parse_config(cpu_only), {"CPU": 16.0, "GPU": 8.0})
    assert note is not None and "8 GPUs but this config asks for none" in note
    assert unused_gpus(parse_config(cpu_only), {"CPU": 16.0}) is None
    assert unused_gpus(parse_config(gpu_config), {"CPU": 16.0, "GPU": 8.0}) is None


def test_a_custom_resource_no_node_declares_is_refused_naming_it_and_who_asks(gpu_config):
    from fusion.cluster import ClusterError, check_cluster
    from fusion.config import parse_config

    big = gpu_config["sources"][0] | {"num_gpus": 0, "resources": {"a100_80g": 1}, "actors": 2}
    config = parse_config(gpu_config | {"sources": [big]})
    with pytest.raises(
        ClusterError,
        match=r"^source 'big' asks for resource 'a100_80g', but no node of the cluster declares "
        r"it; start nodes with `ray start --resources '\{\"a100_80g\": N\}'`",
    ):
        check_cluster(config, {"CPU": 64.0})
    with pytest.raises(ClusterError, match=r"^source 'big' needs 2 of resource 'a100_80g' in all "):
        check_cluster(config, {"CPU": 64.0, "a100_80g": 1.0})  # one node's worth, two actors
    assert check_cluster(config, {"CPU": 64.0, "a100_80g": 2.0}) is None
    note = check_cluster(config, {"CPU": 64.0}, maximum={"CPU": 64.0, "a100_80g": 4.0})
    assert note.endswith("need 2 of resource 'a100_80g' (it has 0 now)")  # the autoscaler's
    with pytest.raises(ClusterError, match="none of its autoscaler's node types does"):
        check_cluster(config, {"CPU": 64.0}, maximum={"CPU": 64.0})


def test_an_accelerator_type_is_a_label_every_actor_shares_and_is_refused_where_absent(
    gpu_config,
):
    from fusion.cluster import ClusterError, check_cluster, cluster_demand
    from fusion.config import parse_config

    big = gpu_config["sources"][0] | {"num_gpus": 1, "accelerator_type": "A100", "actors": 3}
    config = parse_config(gpu_config | {"sources": [big]})
    demand = cluster_demand(config)
    assert demand["GPU"] == 3 and demand["accelerator_type:A100"] == pytest.approx(0.003)
    cluster = {"CPU": 16.0, "GPU": 8.0, "accelerator_type:A100": 1.0}  # Ray: 1 per node
    assert check_cluster(config, cluster) is None
    with pytest.raises(ClusterError, match=r"source 'big' asks for accelerator_type A100, but no"):
        check_cluster(config, {"CPU": 16.0, "GPU": 8.0, "accelerator_type:H100": 1.0})


@pytest.mark.parametrize(
    ("actors", "pool"),
    [
        (3, {"size": 3}),
        ("1-4", {"min_size": 1, "max_size": 4}),
        (" 2 - 6 ", {"min_size": 2, "max_size": 6}),
        ({"min": 2, "max": 2}, {"size": 2}),
    ],
)
def test_actors_give_a_fixed_pool_or_one_that_grows_with_the_cluster(actors, pool):
    source = SourceConfig(name="s", path="m", actors=actors)
    assert source.pool_sizes() == pool
    assert source.actors == (pool.get("size") or pool["min_size"])  # what must start


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"actors": "4-1"}, r"largest size \(1\) is below its smallest \(4\)"),
        ({"actors": "1-4", "max_actors": 6}, "give the pool's range once"),
        ({"resources": {"GPU": 1}}, "'GPU' is not a custom resource: ask for CPUs and GPUs"),
        ({"resources": {"big": 0}}, "greater than 0"),
    ],
)
def test_a_pool_range_or_resource_that_cannot_work_is_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        SourceConfig(name="s", path="m", **settings)


def test_estimate_says_what_the_cluster_gives_prepare_and_training(gpu_config, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from fusion.cli import app

    big = gpu_config["sources"][0] | {"resources": {"a100_80g": 1}, "accelerator_type": "A100"}
    train = {"num_workers": 2, "global_batch_size": 2, "micro_batch_size": 1, "use_gpu": True}
    train |= {"resources": {"trainer": 1}}
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump(gpu_config | {"sources": [big], "train": train})
    )
    result = CliRunner().invoke(app, ["estimate", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    # target 1 CPU + source 1 CPU + stages 0.1 × (2 + 1 reader + 1 aligner); GPUs: the source's 2
    assert (
        "the cluster gives prepare: 2.4 CPUs, 2 GPUs, 1 a100_80g, nodes with accelerator A100"
        in result.output
    )
    assert "the cluster gives training: 2 CPUs, 2 GPUs, 2 trainer" in result.output


def test_validate_without_a_cluster_refuses_a_custom_resource_a_local_ray_never_has(
    gpu_config, tmp_path, monkeypatch
):
    import yaml
    from typer.testing import CliRunner

    from fusion.cli import app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "run.yaml"
    big = gpu_config["sources"][0] | {"num_gpus": 0, "resources": {"a100_80g": 1}}
    path.write_text(yaml.safe_dump(gpu_config | {"sources": [big]}))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert (
        "source 'big' asks for resource 'a100_80g', but no ray.address is set and the local Ray"
        in result.output
    )
    path.write_text(yaml.safe_dump(gpu_config | {"sources": [big | {"resources": {}}]}))
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0
