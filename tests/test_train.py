"""`fusion train` on a real Ray instance with real DeepSpeed (gloo, CPU) and DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion.config import parse_config
from fusion.teacher.fuse import NO_TEACHER
from fusion.testing.toy import save_model_dir, tiny_causal_lm, train_tokenizer
from fusion.train.batches import collate
from fusion.train.trainer import DatasetMismatchError, check_dataset, train

pytestmark = pytest.mark.slow


def _with_train(raw: dict, storage: Path, **train) -> dict:
    settings = {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "lr": 3e-3,
        "warmup_ratio": 0.1,
        "checkpoint_every": 3,
        "max_steps": 12,
        "storage_path": str(storage),
    }
    return raw | {"train": settings | train}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def zero2_run(prepared_world, tmp_path_factory):
    _, raw = prepared_world
    storage = tmp_path_factory.mktemp("zero2")
    summary = train(parse_config(_with_train(raw, storage)), quiet=True)
    return raw, storage, summary


@pytest.mark.parametrize("strategy", ["deepspeed", "ddp"])
def test_training_lowers_the_loss_and_exports_a_loadable_model(zero2_run, strategy, tmp_path):
    raw, storage, summary = zero2_run
    lam = 0.9
    if strategy == "ddp":  # λ chosen from the data set's fidelity (train.lam: auto)
        storage = tmp_path / "ddp"
        found = json.loads((Path(raw["output"]["dir"]) / "manifest.json").read_text())
        assert found["config"]["fuse"]["granularity"] == "token"  # chosen by the label: auto
        teacher = found["diagnostics"]["candidates"]["src"]["bits_per_byte"]  # reads the source
        own = found["diagnostics"]["candidates"]["target"]["own_bits_per_byte"]
        gain = 1 - teacher / own
        lam = round(min(0.9, max(0.5, 0.9 - gain)), 4)
        config = parse_config(_with_train(raw, storage, strategy="ddp", lam="auto"))
        summary = train(config, quiet=True)
    metrics = [json.loads(line) for line in (storage / "metrics.jsonl").read_text().splitlines()]
    assert summary.steps == 12 and [m["step"] for m in metrics] == list(range(1, 13))
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"] and last["fusion_loss"] < first["fusion_loss"]
    assert all(k in first for k in ("clm_loss", "lr", "tokens_per_s", "tokens_seen"))
    export = Path(summary.export_dir)
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model(torch.tensor([[1, 5, 9]])).logits.shape[-1] == model.config.vocab_size
    card = (export / "README.md").read_text()
    assert f"λ:** {lam}\n" in card and "src" in card and "tokens seen" in card
    assert "**Compute dtype:** float32 (precision `auto`,\n  CPU workers" in card
    assert (
        yaml.safe_load((export / "fusion-config.yaml").read_text())["train"]["strategy"] == strategy
    )
    assert (export / "tokenizer.json").is_file()
    # Two workers each read only their own rows: 12 steps of 8 rows, 96 rows in all.
    read = json.loads((export / "training_summary.json").read_text())["dataset"]
    assert read["rows_read_this_run"] == 12 * 8


def test_killed_training_resumes_to_the_same_weights(zero2_run, tmp_path):
    from tests.test_pipeline import ray_address

    raw, _, uninterrupted = zero2_run
    storage = tmp_path / "killed"
    config = _with_train(raw, storage) | {"ray": {"address": ray_address()}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    kill_after_first_checkpoint("train", tmp_path / "run.yaml", storage)

    resumed = train(parse_config(_with_train(raw, storage)), quiet=True)
    assert resumed.steps == uninterrupted.steps
    steps = [
        json.loads(line)["step"] for line in (storage / "metrics.jsonl").read_text().splitlines()
    ]
    assert set(steps) == set(range(1, 13))  # every step logged, across the two runs
    assert steps.count(1) == 1  # the second run continued from a checkpoint, not from scratch
    # ... and started reading at its position: only the rows of the steps after the checkpoint.
    summary = json.loads((Path(resumed.export_dir) / "training_summary.json").read_text())
    read = summary["dataset"]["rows_read_this_run"]
    assert read % 24 == 0 and 0 < read < 12 * 8, read  # (12 - a multiple of 3 steps) × 8 rows
    expected, got = _weights(Path(uninterrupted.export_dir)), _weights(Path(resumed.export_dir))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def kill_after_first_checkpoint(command: str, config: Path, storage: Path) -> None:
    """Start `fusion COMMAND CONFIG`, SIGKILL it once Ray Train has registered a checkpoint."""
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("fusion")), command, str(config), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not _registered_checkpoint(storage / "fusion-train"):
        assert process.poll() is None, f"fusion {command} ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (storage / "export").exists()


def _registered_checkpoint(run_dir: Path) -> bool:
    """Ray Train has committed a checkpoint (its snapshot names one), not merely begun one."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_data_for_another_target_or_teacher_is_refused_before_training(prepared_world, tmp_path):
    root, raw = prepared_world
    other = train_tokenizer(["completely different text " * 50], "metaspace", 300)
    save_model_dir(tmp_path / "other", tiny_causal_lm("llama", len(other)), other)
    wrong_target = raw | {"target": {"path": str(tmp_path / "other")}, "train": {}}
    with pytest.raises(DatasetMismatchError, match="prepared for another target tokenizer"):
        check_dataset(parse_config(wrong_target))
    wrong_teacher = raw | {"train": {"teacher": "nobody"}}
    with pytest.raises(
        DatasetMismatchError, match=r"lacks columns .* one of \['fused', 'src', 'target'\]"
    ):
        check_dataset(parse_config(wrong_teacher))
    nowhere = raw | {"train": {"data": str(tmp_path / "empty")}}
    with pytest.raises(DatasetMismatchError, match="run `fusion prepare` first"):
        check_dataset(parse_config(nowhere))
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    bad_k = root / "bad-k"
    bad_k.mkdir()
    (bad_k / "data").symlink_to(root / "data" / "data")
    (bad_k / "manifest.json").write_text(json.dumps(manifest | {"top_k": 5}))
    with pytest.raises(DatasetMismatchError, match="top-10 teachers but the manifest says top-5"):
        check_dataset(parse_config(raw | {"train": {"data": str(bad_k)}}))


def test_collate_pads_rows_and_masks_exactly_the_marked_fallback_positions(prepared_world):
    import pyarrow.parquet as pq

    root, _ = prepared_world
    table = pq.read_table(root / "data" / "data").slice(0, 3)
    lengths = [len(x) for x in table["input_ids"].to_pylist()]
    for teacher, marks in (
        ("src", [[not a for a in row] for row in table["src.aligned"].to_pylist()]),
        ("fused", [[c == NO_TEACHER for c in row] for row in table["fused.choice"].to_pylist()]),
    ):
        batch = collate(table, teacher, mask_fallback=True)
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert batch["input_ids"].shape == batch["topk_ids"].shape[:2] == (3, max(lengths))
        expected = [
            [0.0 if fallback else 1.0 for fallback in row] + [0.0] * (max(lengths) - len(row))
            for row in marks
        ]
        assert batch["teacher_mask"].tolist() == expected
    # the source is unaligned somewhere, so the mask has something to leave out
    assert any(not a for row in table["src.aligned"].to_pylist() for a in row)


def test_a_bos_target_trains_on_rows_that_start_with_bos_and_scores_as_eval_does(prepared_world):
    """With the target's BOS in front, each row's teacher moves one position right, the BOS
    position has no teacher, and the CLM loss over rows equals `fusion eval`'s per-token NLL of
    the same texts (eval windows start with BOS too)."""
    import pyarrow.parquet as pq

    from fusion.models.scoring import score
    from fusion.train.loss import fusion_objective

    root, _ = prepared_world
    table = pq.read_table(root / "data" / "data")
    tokenizer = AutoTokenizer.from_pretrained(root / "target")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    keep = [i for i, ids in enumerate(table["input_ids"].to_pylist()) if ids[-1] != eos][:4]
    table = table.take(keep)
    rows = table["input_ids"].to_pylist()
    batch = collate(table, "fused", bos=bos)
    width = max(map(len, rows)) + 1
    assert batch["input_ids"].tolist() == [[bos, *r] + [0] * (width - 1 - len(r)) for r in rows]
    assert batch["attention_mask"].tolist() == [
        [1] * (1 + len(r)) + [0] * (width - 1 - len(r)) for r in rows
    ]
    for row, ids in enumerate(table["fused.topk_ids"].to_pylist()):
        assert batch["topk_ids"][row, 0].tolist() == [-1] * 10
        assert batch["topk_ids"][row, 1 : 1 + len(ids)].tolist() == ids
        assert batch["teacher_mask"][row].tolist() == [0.0] + [1.0] * len(ids) + [0.0] * (
            width - 1 - len(ids)
        )
    model = AutoModelForCausalLM.from_pretrained(root / "target").eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        parts = fusion_objective(
            logits,
            batch["input_ids"],
            batch["attention_mask"],
            batch["topk_ids"],
            batch["topk_logits"],
            batch["teacher_mask"],
            lam=1.0,
        )
    evaluated = score([model], tokenizer, table["text"].to_pylist(), max_length=width)
    assert evaluated.tokens == sum(map(len, rows))
    assert float(parts.clm) == pytest.approx(evaluated.nll / evaluated.tokens, rel=1e-4)
