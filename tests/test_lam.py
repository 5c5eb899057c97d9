"""``train.lam: auto``: λ from the teacher's stored bits per byte against the target's own."""

from __future__ import annotations

import pytest

from fusion.config import ConfigError, parse_config
from fusion.train.lam import LamError, auto_lam, lam_from_fidelity


@pytest.mark.parametrize(
    ("teacher", "target", "lam"),
    [
        (1.6, 3.2, 0.5),  # saves half the target's bits: as much weight as the labels
        (2.4, 3.2, 0.65),  # saves a quarter: 0.9 - 0.25
        (3.0, 3.2, 0.8375),  # saves 1/16
        (3.5, 3.2, 0.9),  # worse than the target: the paper's 0.9
    ],
)
def test_lam_falls_with_the_share_of_bits_the_teacher_saves(teacher, target, lam):
    assert lam_from_fidelity(teacher, target) == pytest.approx(lam)


def _manifest(target_own: float | None) -> dict:
    candidates = {"src": {"bits_per_byte": 2.4}}
    if target_own is not None:
        candidates["target"] = {"bits_per_byte": 3.3, "own_bits_per_byte": target_own}
    return {"diagnostics": {"candidates": candidates, "fused": {"bits_per_byte": 1.6}}}


def test_auto_reads_the_teachers_and_the_targets_figures_from_the_manifest():
    assert auto_lam(_manifest(3.2), "fused", "data")[0] == 0.5
    lam, why = auto_lam(_manifest(3.2), "src", "data")
    assert lam == 0.65 and "2.400 bits/byte" in why and "own 3.200" in why
    with pytest.raises(LamError, match=r"data lacks .*set train\.lam to a number"):
        auto_lam(_manifest(None), "fused", "data")


def test_a_teacher_fused_per_token_is_read_as_its_best_source():
    """Per token the fused teacher is chosen by the label (1.6 here, as good as it looks only
    because some candidate held each label): auto reads the best source instead, src2 at 2.4
    against the target's own 3.2 — 0.9 − 0.25 — and never the target's own column."""
    manifest = _manifest(3.2)
    manifest["diagnostics"]["candidates"] |= {"src2": {"bits_per_byte": 2.4}}
    manifest["diagnostics"]["candidates"]["src"]["bits_per_byte"] = 2.8
    manifest["diagnostics"]["candidates"]["target"]["bits_per_byte"] = 2.0
    manifest["config"] = {"fuse": {"granularity": "token"}}
    lam, why = auto_lam(manifest, "fused", "data")
    assert lam == 0.65 and "'src2'" in why and "2.400 bits/byte" in why
    manifest["config"] = {"fuse": {"granularity": "sequence"}}
    assert auto_lam(manifest, "fused", "data")[0] == 0.5  # per sequence: the fused teacher


def test_auto_is_a_setting_and_streaming_refuses_it(tmp_path):
    raw = {
        "target": {"path": "t"},
        "sources": [{"name": "s", "path": "s"}],
        "data": {"paths": ["c.jsonl"]},
        "output": {"dir": str(tmp_path / "out")},
        "train": {"lam": "auto", "max_steps": 3},
    }
    assert parse_config(raw).train.lam == "auto"
    with pytest.raises(ConfigError, match=r"train\.lam"):
        parse_config(raw | {"train": {"lam": "half"}})
    from fusion.train.run import run

    with pytest.raises(ConfigError, match="'auto' reads the teacher's fidelity"):
        run(parse_config(raw))
