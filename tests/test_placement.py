"""Where model actors put their models: settings built for GPUs, checked without one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fusion.config import SourceConfig
from fusion.placement import hf_placement, vllm_placement

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
