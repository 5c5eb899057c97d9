"""`fusion demo` end to end on a reduced budget, and the pieces it is built from."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from fusion.demo.corpora import spans_of
from fusion.demo.report import tokens_to_reach
from fusion.demo.run import QUICK, run_demo
from fusion.evaluate.merge import MergeError, merge_state_dicts

TINY = replace(
    QUICK,
    code_chars=150_000,
    arith_lines=3_000,
    held_out_chars=3_000,
    eval_chars=3_000,
    expert_steps=3,
    target_steps=2,
    tuned_steps=2,
    pretrain_batch=8,
    continual_steps=3,
    continual_batch=8,
    eval_every=1,
    width=64,
    layers=2,
    orders=2,
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_demo_writes_a_complete_report_of_finite_numbers(ray_cluster, tmp_path):
    results = run_demo(tmp_path, quick=True, scale=TINY, echo=lambda _: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["domains"] == ["code", "prose", "arith"] == results["domains"]
    expected = {"fused", "clm_only", "target_init", "code_expert", "prose_expert", "arith_expert"}
    expected |= {"ensemble_pair", "linear_merge", "ties_merge", f"distill_{saved['best_source']}"}
    best = f"distill_{saved['best_source']}"
    expected |= {"fused_order2", "clm_only_order2", f"{best}_order2"}
    assert expected <= set(saved["models"])
    models = saved["models"]
    # each interval's per-order differences are the arms' own average bpb, set side by side
    for label, (a, b) in {
        "fused vs clm_only": ("fused", "clm_only"),
        f"fused vs {best}": ("fused", best),
        f"{best} vs clm_only": (best, "clm_only"),
    }.items():
        found = saved["intervals"][label]["avg"]
        by_hand = [
            100 * (models[a + o]["avg_bpb"] / models[b + o]["avg_bpb"] - 1) for o in ("", "_order2")
        ]
        assert found["per_seed_percent"] == pytest.approx(by_hand, abs=1e-2)
        assert found["low"] <= found["mean_percent"] <= found["high"]
        assert found["verdict"] in ("beats", "worse", "within noise")
    assert saved["orders"] == 2
    main = saved["teacher_data"]["main"]["diagnostics"]
    assert main["fused"]["fallback_over_real"] == 0
    assert set(main["candidates"]) == {"target", "code_expert", "prose_expert", "arith_expert"}
    # λ auto, recomputed from the manifest's figures: 0.9 less the share of the target's own
    # bits the teacher saves, held within [0.5, 0.9]
    own = main["candidates"]["target"]["own_bits_per_byte"]
    gain = 1 - main["fused"]["bits_per_byte"] / own
    assert saved["lam"]["fused"] == pytest.approx(min(0.9, max(0.5, 0.9 - gain)), abs=1e-4)
    assert saved["lam"]["fused_order2"] == saved["lam"]["fused"] and saved["lam"]["clm_only"] == 1
    for name, entry in saved["models"].items():
        assert set(entry["bpb"]) == set(saved["domains"]), name
        values = [*entry["bpb"].values(), entry["avg_bpb"]]
        assert all(math.isfinite(v) and 0 < v < 20 for v in values), (name, values)
    assert saved["tokens_per_arm"] > 0 and saved["wall_seconds"] > 0
    assert len(saved["curves"]["fused"]) == TINY.continual_steps + 1
    report = (tmp_path / "report.md").read_text()
    assert "fused vs clm_only over 2 data orders" in report and "| fused |" in report
    for image in ("bpb.png", "curve.png"):
        assert (tmp_path / image).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "config.yaml").is_file()
    # a second run reuses every model and every arm, and reports the same numbers
    again = run_demo(tmp_path, quick=True, scale=TINY, echo=lambda _: None)
    assert again["models"] == saved["models"]


def test_spans_cut_at_line_breaks_and_never_exceed_the_limit():
    text = "".join(f"line {i}\n" for i in range(100)) + "x" * 250 + "\n"
    spans = spans_of(text, 40)
    assert "".join(spans) == text
    assert all(len(span) <= 40 for span in spans)
    assert all(span.endswith("\n") for span in spans[:10])


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0, 4.0), (100, 3.0), (200, 2.0)]
    assert tokens_to_reach(curve, 2.5) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 1.0) is None


def test_linear_merge_is_the_weighted_average():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    merged = merge_state_dicts("linear", [a, b], weights=[1.0, 3.0])
    assert torch.allclose(merged["w"], torch.tensor([2.5, 5.0]))


def test_ties_trims_elects_a_sign_and_averages_the_agreeing_entries():
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, -0.1, 2.0, -3.0])}
    b = {"w": torch.tensor([3.0, 0.2, -1.0, 1.0])}
    merged = merge_state_dicts("ties", [a, b], base=base, density=0.5)
    # a keeps 2.0, -3.0; b keeps 3.0, -1.0 → signs: +, none, +(2-1), -(-3)
    assert torch.allclose(merged["w"], torch.tensor([3.0, 0.0, 2.0, -3.0]))


def test_merging_models_of_different_shapes_names_the_tensor():
    with pytest.raises(MergeError, match="w of shape"):
        merge_state_dicts("linear", [{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    with pytest.raises(MergeError, match="common base"):
        merge_state_dicts("ties", [{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
