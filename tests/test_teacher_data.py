"""What a prepared data set teaches, checked from its Parquet files: the fallback never wins,
diagnostics are exact, `fusion inspect` shows them, `fusion refuse` re-fuses without models."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
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


def test_manifest_diagnostics_equal_counts_taken_from_the_rows(prepared_world):
    root, _ = prepared_world
    found = json.loads((root / "data" / "manifest.json").read_text())["diagnostics"]
    positions, aligned, holds, taught, no_teacher, over_real = _expected_counts(
        _rows(root / "data")
    )
    assert found["positions"] == positions
    assert found["candidates"]["src"]["coverage"] == round(aligned["src"] / positions, 4)
    assert found["candidates"]["target"]["coverage"] == 1.0
    for index, name in enumerate(CANDIDATES):
        assert found["candidates"][name]["label_in_topk"] == round(holds[name] / positions, 4)
        assert found["candidates"][name]["taught"] == round(taught.get(index, 0) / positions, 4)
    assert found["fused"]["no_teacher"] == round(no_teacher / positions, 4)
    assert found["fused"]["fallback_over_real"] == over_real == 0
    assert 0 < found["fused"]["ce_bits_per_byte"] < 30


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
