"""The device and dtype policy, and the GPU rule (collectives on the engine's device) checked
on a CPU: the training engine runs outside Ray in a one-rank process group."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fusion.models.device import DeviceRuleError, resolve_dtype, strict_device


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A gloo process group of one rank in this process, described as a launcher (or Ray
    Train) describes it to each worker; one for the module, as DeepSpeed keeps the first."""
    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {name: os.environ.get(name) for name in launcher}
    os.environ.update(launcher)
    rendezvous = tmp_path_factory.mktemp("group") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_auto_dtype_is_float32_on_cpus_and_explicit_dtypes_stand():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cuda") == torch.float16


def test_a_collective_on_a_tensor_off_the_engines_device_is_refused(one_rank_group):
    with strict_device("cpu"):
        on_device = torch.tensor([3])
        dist.all_reduce(on_device)  # a test module's tensors keep the default device
        assert on_device.item() == 3
        with pytest.raises(DeviceRuleError, match=r"all_reduce on a tensor on meta.*NCCL"):
            dist.all_reduce(torch.zeros(1, device="meta"))
        with pytest.raises(DeviceRuleError, match=r"all_gather on a tensor on meta"):
            dist.all_gather([torch.zeros(1)], torch.zeros(1, device="meta"))
    dist.all_reduce(torch.zeros(1))  # the collectives are themselves again after the block


def _run(prepared_world, **train):
    from fusion.config import parse_config

    _, raw = prepared_world
    settings = {"num_workers": 1, "global_batch_size": 2, "micro_batch_size": 2, "lr": 3e-3}
    return parse_config(raw | {"train": settings | train})


def _batch(prepared_world, rows: int = 2):
    import pyarrow.parquet as pq

    from fusion.train.batches import collate

    root, _ = prepared_world
    return collate(pq.read_table(root / "data" / "data").slice(0, rows), "fused")


@pytest.mark.parametrize("strategy", ["deepspeed", "ddp"])
def test_training_steps_keep_every_collective_on_the_engines_device(
    prepared_world, one_rank_group, strategy
):
    from fusion.train.engine import Engine

    run = _run(prepared_world, strategy=strategy)
    with strict_device("cpu"):
        engine = Engine(run, total=4, device=torch.device("cpu"))
        parts, stepped = engine.micro_step(
            _batch(prepared_world), lam=0.9, teacher_precision="fp32"
        )
        assert stepped and torch.isfinite(parts.total)
        assert engine.sum_over_workers(7) == 7


def test_zero3_builds_the_target_partitioned_trains_and_exports_the_gathered_weights(
    prepared_world, one_rank_group, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM as Auto
    from transformers.integrations import is_deepspeed_zero3_enabled

    from fusion.train.engine import Engine
    from fusion.train.loop import _export
    from fusion.train.resume import Progress

    built_under_zero3 = []
    load = Auto.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        built_under_zero3.append(is_deepspeed_zero3_enabled())
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Auto, "from_pretrained", classmethod(recording))
    run = _run(prepared_world, zero_stage=3, gradient_checkpointing=True)
    with strict_device("cpu"):
        engine = Engine(run, total=12, device=torch.device("cpu"))
    monkeypatch.undo()
    assert built_under_zero3 == [True]  # from_pretrained partitions as it loads (zero.Init)
    with strict_device("cpu"):
        parameters = list(engine.module.parameters())
        assert parameters and all(hasattr(p, "ds_id") for p in parameters)  # built partitioned
        assert all(p.numel() == 0 for p in parameters)  # outside a gather nothing is held whole
        batch = _batch(prepared_world)
        losses = [
            float(engine.micro_step(batch, lam=0.9, teacher_precision="fp32")[0].total.detach())
            for _ in range(12)
        ]
    assert losses[-1] < losses[0] - 0.5, losses
    with engine.full_weights() as module:
        gathered = {name: value.detach().clone() for name, value in module.state_dict().items()}
    progress = Progress(step=12, tokens_seen=12)
    config = {"export_dir": str(tmp_path / "export"), "dataset": {"path": "test"}}
    _export(engine, run, progress, config, rank=0, rows_read=0)
    exported = Auto.from_pretrained(tmp_path / "export").state_dict()
    assert gathered.keys() == exported.keys()
    for name, value in gathered.items():
        assert torch.equal(value, exported[name]), name


def test_a_bucket_micro_step_teaches_the_tail_as_stored(prepared_world, one_rank_group):
    """``kd_tail: bucket`` end to end through the engine: collate carries each position's
    stored tail (read here from the Parquet rows), and the engine's fusion loss is the bucket
    loss over it, not the renormalised one."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from fusion.train.batches import collate
    from fusion.train.engine import Engine
    from fusion.train.loss import fusion_objective

    root, _ = prepared_world
    table = pq.read_table(root / "data" / "data").slice(0, 2)
    batch = collate(table, "fused")
    stored = torch.zeros_like(batch["tail"])
    for row, tails in enumerate(table["fused.tail"].to_pylist()):
        stored[row, : len(tails)] = torch.from_numpy(np.asarray(tails, np.float32))
    assert torch.equal(batch["tail"], stored) and (stored > 0.01).any()
    model = AutoModelForCausalLM.from_pretrained(root / "target", dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher = [batch[k] for k in ("topk_ids", "topk_logits", "teacher_mask")]
    inputs = (logits, batch["input_ids"], batch["attention_mask"], *teacher)
    bucket = fusion_objective(*inputs, lam=0.5, tail=stored).fusion
    renormalised = fusion_objective(*inputs, lam=0.5).fusion
    assert float(bucket) != pytest.approx(float(renormalised), rel=1e-3)
    with strict_device("cpu"):
        engine = Engine(_run(prepared_world, strategy="ddp"), total=4, device=torch.device("cpu"))
        parts, _ = engine.micro_step(batch, lam=0.5, teacher_precision="fp32", kd_tail="bucket")
    assert float(parts.fusion) == pytest.approx(float(bucket), rel=1e-5)
