"""Teacher diagnostics on a hand-made batch, every figure computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion.align import PAD_ID
from fusion.data.reader import object_array
from fusion.teacher.diagnostics import diagnostics, teacher_counts
from fusion.teacher.fuse import MIXED, NO_TEACHER

VOCAB = 10
NINF = -np.inf


def _rows(values, dtype):
    return object_array([np.asarray(values, dtype)])


def _batch(choice: list[int]) -> dict:
    """One chunk "ab c": target tokens a | b | ␠c (ids 5, 6, 7), so position 0 predicts 6
    (1 byte) and position 1 predicts 7 (2 bytes: its span runs from the end of "b")."""
    return {
        "id": np.asarray(["d:0"], dtype=object),
        "text": np.asarray(["ab c"], dtype=object),
        "input_ids": _rows([5, 6, 7], np.int32),
        "offsets": _rows([[0, 1], [1, 2], [3, 4]], np.int32),  # " c" spans only "c"
        "target.topk_ids": _rows([[6, 1], [2, 3], [PAD_ID, PAD_ID]], np.int32),
        "target.topk_logits": _rows([[0.0, 0.0], [0.0, 0.0], [NINF, NINF]], np.float32),
        "target.tail": _rows([0.5, 0.25, 0.0], np.float32),
        "target.nll": np.asarray([3.0], np.float32),
        "target.nll_bytes": np.asarray([3], np.int64),
        "src.topk_ids": _rows([[1, PAD_ID], [7, 4], [PAD_ID, PAD_ID]], np.int32),
        "src.topk_logits": _rows([[0.0, NINF], [0.0, 0.0], [NINF, NINF]], np.float32),
        "src.tail": _rows([0.125, 0.375, 0.0], np.float32),
        "src.aligned": _rows([True, True, False], bool),
        "src.nll": np.asarray([2.0], np.float32),
        "src.nll_bytes": np.asarray([4], np.int64),
        "fused.topk_ids": _rows([[6, PAD_ID], [7, 4], [PAD_ID, PAD_ID]], np.int32),
        "fused.topk_logits": _rows([[1.0, NINF], [0.0, 0.0], [NINF, NINF]], np.float32),
        "fused.tail": _rows([0.0, 0.375, 0.0], np.float32),
        "fused.choice": _rows(choice, np.int8),
    }


def test_every_figure_equals_a_count_by_hand():
    found = diagnostics(
        teacher_counts(_batch([NO_TEACHER, 1, NO_TEACHER]), ["target", "src"], VOCAB)
    )
    bits = 1 / math.log(2)
    assert found["positions"] == 2
    target, src, fused = found["candidates"]["target"], found["candidates"]["src"], found["fused"]
    # target: position 0 holds the label (half of 1 - 0.5), position 1 does not (0.25 spread
    # over the 8 ids it does not hold)
    assert (target["coverage"], target["label_in_topk"], target["taught"]) == (1.0, 0.5, 0.0)
    stored = (math.log(4) - math.log(0.25 / 8)) * bits / 3
    assert target["bits_per_byte"] == pytest.approx(stored, abs=1e-4)
    assert target["own_bits_per_byte"] == pytest.approx(3.0 * bits / 3, abs=1e-4)
    assert target["stored_vs_own"] == pytest.approx(stored / bits, abs=1e-3)
    # src: position 0 lacks the label (0.125 over 9 ids), position 1 holds it (half of 0.625)
    assert (src["coverage"], src["label_in_topk"], src["taught"]) == (1.0, 0.5, 0.5)
    stored = (-math.log(0.125 / 9) - math.log(0.3125)) * bits / 3
    assert src["bits_per_byte"] == pytest.approx(stored, abs=1e-4)
    assert src["own_bits_per_byte"] == pytest.approx(2.0 * bits / 4, abs=1e-4)
    # fused: position 0 fell back although the target held the label; it teaches position 1
    assert fused["no_teacher"] == 0.5 and fused["fallback_over_real"] == 1
    assert fused["mixed"] == 0.0 and fused["label_in_topk"] == 0.5
    assert fused["ce_nats_per_token"] == pytest.approx(-math.log(0.3125), abs=1e-4)
    assert fused["bits_per_byte"] == pytest.approx(-math.log(0.3125) * bits / 2, abs=1e-4)


def test_mixed_positions_are_counted_and_taught():
    found = diagnostics(teacher_counts(_batch([MIXED, MIXED, MIXED]), ["target", "src"], VOCAB))
    fused = found["fused"]
    assert fused["mixed"] == 1.0 and fused["no_teacher"] == 0.0
    assert fused["fallback_over_real"] == 0
    # both labelled positions teach: the one-hot 6 at position 0 (p = 1), 0.3125 at 1
    assert fused["bits_per_byte"] == pytest.approx(-math.log(0.3125) / math.log(2) / 3, abs=1e-4)


def test_fidelity_reads_the_values_as_stored_in_float16_and_floors_a_zero_tail():
    """A tail of 0.9993 is stored as float16's 0.99951..., which leaves the kept label a third
    less mass (and 0.1 as 0.0999755...); a stored tail of 0 where the label is not kept counts
    as float16's smallest step spread over the ids the top-k does not hold, never as -log 0."""
    batch = _batch([1, 1, NO_TEACHER])
    batch["src.topk_ids"] = _rows([[6, 3], [5, 4], [PAD_ID, PAD_ID]], np.int32)
    batch["src.topk_logits"] = _rows([[0.1, 0.0], [0.0, NINF], [NINF, NINF]], np.float32)
    batch["src.tail"] = _rows([0.9993, 0.0, 0.0], np.float32)
    found = diagnostics(teacher_counts(batch, ["target", "src"], VOCAB))["candidates"]["src"]
    tail, logit = float(np.float16(0.9993)), float(np.float16(0.1))
    assert tail != pytest.approx(0.9993, abs=1e-4)  # the rounding matters here
    share = math.exp(logit) / (math.exp(logit) + 1.0)
    position_0 = -math.log((1 - tail) * share)  # label 6 kept
    position_1 = -math.log(2.0**-24 / (VOCAB - 1))  # label 7 not kept, tail 0
    stored = (position_0 + position_1) / math.log(2) / 3
    assert found["bits_per_byte"] == pytest.approx(stored, abs=1e-4)
