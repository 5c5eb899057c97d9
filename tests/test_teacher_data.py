"""What a prepared data set teaches, checked from its Parquet files: the fallback never wins,
diagnostics are exact, `fusion inspect` shows them, `fusion refuse` re-fuses without models."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fusion.cli import app

pytestmark = pytest.mark.slow

CANDIDATES = ["target", "src"]


def _rows(folder):
    return pq.read_table(folder / "data").sort_by("id").to_pylist()


def _label_in(ids, label) -> bool:
    return label in [i for i in ids if i >= 0]


def _expected_counts(rows):
    """Coverage, label-in-top-k and choices counted directly from the rows."""
    positions, aligned, holds, taught = 0, {"src": 0}, dict.fromkeys(CANDIDATES, 0), {}
    over_real = no_teacher = 0
    for row in rows:
        ids = row["input_ids"]
        for t in range(len(ids) - 1):
            label = ids[t + 1]
            positions += 1
            aligned["src"] += row["src.aligned"][t]
            real = {
                "target": _label_in(row["target.topk_ids"][t], label),
                "src": row["src.aligned"][t] and _label_in(row["src.topk_ids"][t], label),
            }
            for name in CANDIDATES:
                holds[name] += real[name]
            choice = row["fused.choice"][t]
            taught[choice] = taught.get(choice, 0) + 1
            if choice == -2:
                no_teacher += 1
                over_real += any(real.values())
    return positions, aligned, holds, taught, no_teacher, over_real


def test_per_token_fusion_takes_only_candidates_whose_top_k_holds_the_label(prepared_world):
    root, _ = prepared_world
    rows = _rows(root / "data")
    seen_fallback_and_target = False
    for row in rows:
        ids = row["input_ids"]
        for t in range(len(ids) - 1):
            choice = row["fused.choice"][t]
            if choice == -2:  # nobody holds the label: the one-hot on the next token
                assert row["fused.topk_ids"][t][:2] == [ids[t + 1], -1]
                continue
            name = CANDIDATES[choice]
            assert name == "target" or row["src.aligned"][t]
            assert _label_in(row[f"{name}.topk_ids"][t], ids[t + 1])
            assert row["fused.topk_ids"][t] == row[f"{name}.topk_ids"][t]
            seen_fallback_and_target |= name == "target" and not row["src.aligned"][t]
    # The world holds positions where the source fell back and the target taught instead.
    assert seen_fallback_and_target


def _label_probability(ids, logits, tail, label, vocab_size) -> float:
    """p(label) of a stored distribution: its top-k renormalised and scaled by 1 - tail, or
    the tail shared evenly by the ids it does not hold (a tail of 0 counts as 2**-24)."""
    kept = [(i, z) for i, z in zip(ids, logits, strict=True) if i >= 0 and z > -math.inf]
    tail = max(tail, 2.0**-24)
    top = max(z for _, z in kept)
    total = sum(math.exp(z - top) for _, z in kept)
    for i, z in kept:
        if i == label:
            return (1 - tail) * math.exp(z - top) / total
    return tail / (vocab_size - len(kept))


def _fidelity(rows, root):
    """Per candidate: stored nats and label bytes where it has its own distribution, its own
    NLL and the bytes that NLL predicts; for the fused teacher, over every position it teaches.
    Bytes are label spans end to end, from each model's own character offsets."""
    target = AutoTokenizer.from_pretrained(root / "target")
    source = AutoTokenizer.from_pretrained(root / "source")
    vocab = len(target.get_vocab())
    sums = {name: [0.0, 0, 0.0, 0] for name in [*CANDIDATES, "fused"]}
    for row in rows:
        text, ids = row["text"], row["input_ids"]
        ends = [
            e
            for _, e in target(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
        ]
        for name, tokenizer in (("target", target), ("src", source)):
            own = [
                e
                for _, e in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
                    "offset_mapping"
                ]
            ]
            sums[name][2] += row[f"{name}.nll"]
            sums[name][3] += len(text[own[0] : own[-1]].encode())  # no BOS: token 0 unread
        for t in range(len(ids) - 1):
            size = len(text[ends[t] : ends[t + 1]].encode()) if t + 1 < len(ends) else 0
            has = {
                "target": True,
                "src": row["src.aligned"][t],
                "fused": row["fused.choice"][t] != -2,
            }
            for name in sums:
                if has[name]:
                    p = _label_probability(
                        row[f"{name}.topk_ids"][t],
                        row[f"{name}.topk_logits"][t],
                        row[f"{name}.tail"][t],
                        ids[t + 1],
                        vocab,
                    )
                    sums[name][0] -= math.log(p)
                    sums[name][1] += size
    return sums


def test_manifest_diagnostics_equal_counts_taken_from_the_rows(prepared_world):
    root, _ = prepared_world
    found = json.loads((root / "data" / "manifest.json").read_text())["diagnostics"]
    rows = _rows(root / "data")
    positions, aligned, holds, taught, no_teacher, over_real = _expected_counts(rows)
    assert found["positions"] == positions
    assert found["candidates"]["src"]["coverage"] == round(aligned["src"] / positions, 4)
    assert found["candidates"]["target"]["coverage"] == 1.0
    for index, name in enumerate(CANDIDATES):
        assert found["candidates"][name]["label_in_topk"] == round(holds[name] / positions, 4)
        assert found["candidates"][name]["taught"] == round(taught.get(index, 0) / positions, 4)
    assert found["fused"]["no_teacher"] == round(no_teacher / positions, 4)
    assert found["fused"]["fallback_over_real"] == over_real == 0
    assert found["fused"]["mixed"] == 0  # MinCE never mixes
    fused_holds = sum(
        _label_in(row["fused.topk_ids"][t], row["input_ids"][t + 1])
        for row in rows
        for t in range(len(row["input_ids"]) - 1)
        if row["fused.choice"][t] != -2
    )
    assert found["fused"]["label_in_topk"] == round(fused_holds / positions, 4)
    sums = _fidelity(rows, root)
    for name in CANDIDATES:
        stored, own = (
            found["candidates"][name]["bits_per_byte"],
            found["candidates"][name]["own_bits_per_byte"],
        )
        assert stored == pytest.approx(sums[name][0] / math.log(2) / sums[name][1], abs=1e-4)
        assert own == pytest.approx(sums[name][2] / math.log(2) / sums[name][3], abs=1e-4)
        assert found["candidates"][name]["stored_vs_own"] == pytest.approx(stored / own, abs=1e-3)
    nats, size = sums["fused"][0], sums["fused"][1]
    assert found["fused"]["bits_per_byte"] == pytest.approx(nats / math.log(2) / size, abs=1e-4)
    assert found["fused"]["ce_nats_per_token"] == pytest.approx(
        nats / (positions - no_teacher), abs=1e-4
    )


def test_inspect_prints_the_figures_and_one_row_side_by_side(prepared_world):
    root, _ = prepared_world
    row_id = _rows(root / "data")[0]["id"]
    result = CliRunner().invoke(app, ["inspect", str(root / "data"), "--row", row_id])
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    coverage = manifest["diagnostics"]["candidates"]["src"]["coverage"]
    assert "src" in result.output and f"{coverage:.3f}" in result.output
    assert f"row {row_id}" in result.output and "bits/byte" in result.output
    missing = CliRunner().invoke(app, ["inspect", str(root / "data"), "--row", "nope:0"])
    assert missing.exit_code == 2 and "no row with id 'nope:0'" in missing.output
    empty = CliRunner().invoke(app, ["inspect", str(root)])
    assert empty.exit_code == 2 and "no manifest.json" in empty.output


def test_refuse_with_the_same_settings_reproduces_the_prepared_fusion(prepared_world, tmp_path):
    root, _ = prepared_world
    result = CliRunner().invoke(app, ["refuse", str(root / "data"), str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    before, after = _rows(root / "data"), _rows(tmp_path / "again")
    for column in ("fused.topk_ids", "fused.topk_logits", "fused.choice", "src.topk_ids"):
        assert [r[column] for r in after] == [r[column] for r in before]
    diagnostics = [
        json.loads((folder / "manifest.json").read_text())["diagnostics"]
        for folder in (root / "data", tmp_path / "again")
    ]
    assert diagnostics[0] == diagnostics[1]


def test_refuse_without_the_target_teaches_only_from_the_source(prepared_world, tmp_path):
    root, _ = prepared_world
    out = tmp_path / "no-target"
    result = CliRunner().invoke(
        app, ["refuse", str(root / "data"), str(out), "--no-target", "--no-teacher", "mask"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["candidates"] == ["src"] and manifest["config"]["fuse"]["no_teacher"] == "mask"
    for row in _rows(out):
        for t, choice in enumerate(row["fused.choice"]):
            if choice == 0:
                assert row["fused.topk_ids"][t] == row["src.topk_ids"][t]
            else:
                assert choice == -2 and row["fused.topk_ids"][t] == [-1] * 10
    bad = CliRunner().invoke(app, ["refuse", str(root / "data"), str(out), "--method", "max"])
    assert bad.exit_code == 2 and "fuse.method: Input should be 'min_ce' or 'avg_ce'" in bad.output
