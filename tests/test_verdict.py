"""Paired verdicts against hand-computed intervals."""

from __future__ import annotations

import math

import pytest

from fusion.evaluate.verdict import DocumentScores, compare, t975

LN2 = math.log(2)


def _arm(per_seed: dict[int, dict[str, list[float]]]) -> dict[int, DocumentScores]:
    """Scores given in bits per document (a document of one byte scores its bits per byte)."""
    return {
        seed: DocumentScores({d: [bits * LN2 for bits in v] for d, v in domains.items()})
        for seed, domains in per_seed.items()
    }


def test_student_t_quantiles_are_the_tabled_ones():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(100) == pytest.approx(1.984, abs=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        t975(0)


def test_the_seed_part_is_t_over_the_per_seed_differences():
    """Differences −1, −2, −3 %: mean −2, sd 1, half-width 4.303/√3 = 2.484; one document of
    one byte, so every bootstrap draw is the same and the evaluation part is 0."""
    b = _arm({s: {"x": [1.0]} for s in (1, 2, 3)})
    a = _arm({1: {"x": [0.99]}, 2: {"x": [0.98]}, 3: {"x": [0.97]}})
    found = compare(a, b, {"x": [1]})
    assert found.per_seed == pytest.approx((-1.0, -2.0, -3.0))
    assert found.mean == pytest.approx(-2.0)
    assert found.seed_half_width == pytest.approx(4.303 / math.sqrt(3))
    assert found.eval_half_width == pytest.approx(0.0, abs=1e-9)
    assert found.verdict == "within noise" and found.high == pytest.approx(0.4843, abs=1e-4)
    tight = compare(_arm({1: {"x": [0.98]}, 2: {"x": [0.978]}, 3: {"x": [0.982]}}), b, {"x": [1]})
    assert tight.seed_half_width == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert tight.verdict == "beats" and "beats" in tight.line()
    better = _arm({1: {"x": [0.98]}, 2: {"x": [0.98]}, 3: {"x": [0.98]}})
    assert compare(b, better, {"x": [1]}).verdict == "worse"


def test_the_evaluation_part_is_a_paired_bootstrap_over_documents():
    """Two one-byte documents, A 0.9 and 1.1 bits where B has 1.0 and 1.0: a draw of both
    documents (p 1/2) differs by 0 %, two of the first (1/4) by −10 %, two of the second by
    +10 %; sd √50 = 7.07 %, half-width 1.96 · 7.07 = 13.86 %. Both seeds alike: no seed part."""
    b = _arm({s: {"x": [1.0, 1.0]} for s in (1, 2)})
    a = _arm({s: {"x": [0.9, 1.1]} for s in (1, 2)})
    found = compare(a, b, {"x": [1, 1]}, resamples=40_000)
    assert found.mean == pytest.approx(0.0, abs=1e-9)
    assert found.seed_half_width == pytest.approx(0.0, abs=1e-9)
    assert found.eval_half_width == pytest.approx(1.959964 * math.sqrt(50), rel=0.02)


def test_the_two_parts_add_in_quadrature():
    """Seeds −1 and −3 % (one byte each): seed part 12.706 · √2 / √2 = 12.706; two documents
    that differ by ∓10 % on every seed: evaluation part 13.86 (above); the half-width is
    √(12.706² + 13.86²) = 18.80, not their sum 26.57."""
    b = _arm({s: {"x": [1.0, 1.0]} for s in (1, 2)})
    a = _arm({1: {"x": [0.89, 1.09]}, 2: {"x": [0.87, 1.07]}})
    found = compare(a, b, {"x": [1, 1]}, resamples=40_000)
    assert found.mean == pytest.approx(-2.0)
    assert found.seed_half_width == pytest.approx(12.706)
    assert found.eval_half_width == pytest.approx(1.959964 * math.sqrt(50), rel=0.02)
    expected = math.hypot(12.706, 1.959964 * math.sqrt(50))
    assert found.high - found.mean == pytest.approx(expected, rel=0.01)
    assert found.low == pytest.approx(found.mean - (found.high - found.mean))


def test_a_difference_the_same_on_every_document_has_no_evaluation_noise():
    """Documents of very different difficulty, A 5 % below B on each: every paired draw
    differs by exactly −5 % (an unpaired bootstrap would see the documents' spread)."""
    hard, easy = [3.0, 0.5, 2.0, 1.2], [1.0, 1.0, 1.0, 1.0]
    b = _arm({s: {"x": hard, "y": easy} for s in (1, 2)})
    a = _arm({s: {"x": [0.95 * v for v in hard], "y": [0.95 * v for v in easy]} for s in (1, 2)})
    found = compare(a, b, {"x": [1, 2, 3, 4], "y": [1, 1, 1, 1]})
    assert found.mean == pytest.approx(-5.0)
    assert found.eval_half_width == pytest.approx(0.0, abs=1e-9)


def test_the_average_is_over_domains_not_bytes():
    """x: 1.0 bits/byte in both arms over 10 bytes; y: A 2.0, B 3.0 over 1 byte. The average
    of domains is 1.5 against 2.0 (−25 %); weighting by bytes would give −8.3 %."""
    b = _arm({s: {"x": [10.0], "y": [3.0]} for s in (1, 2)})
    a = _arm({s: {"x": [10.0], "y": [2.0]} for s in (1, 2)})
    found = compare(a, b, {"x": [10], "y": [1]})
    assert found.mean == pytest.approx(-25.0)
    assert compare(a, b, {"x": [10], "y": [1]}, domains=["y"]).mean == pytest.approx(
        100 * (2 / 3 - 1)
    )


def test_arms_without_a_shared_seed_or_with_missing_documents_are_refused():
    b = _arm({1: {"x": [1.0]}})
    with pytest.raises(ValueError, match="share no seed"):
        compare(_arm({2: {"x": [1.0]}}), b, {"x": [1]})
    with pytest.raises(ValueError, match="1 document scores for 2 documents"):
        compare(_arm({1: {"x": [1.0]}}), b, {"x": [1, 1]})
    assert compare(b, b, {"x": [1]}).seed_half_width == math.inf  # one seed: no t interval
