"""Paired verdicts: how much one trained arm's held-out bits per byte differ from another's,
and whether the difference is more than noise.

Two arms are compared seed by seed (a seed fixes the data order and the initial noise both
arms share), as the relative difference of their held-out bits per byte, ``bpb_a / bpb_b - 1``.
The 95 % interval of its mean has two parts, added in quadrature:

* **training noise**: Student's t over the per-seed differences (``t(0.975, n - 1)·sd/√n``);
* **evaluation noise**: the held-out documents are one sample of the domain, the same for
  every seed and arm, so a paired bootstrap resamples documents (within each domain, the same
  draw for both arms and every seed) and the half-width is 1.96 standard deviations of the
  mean difference over the draws.

"Beats" means the whole interval lies below zero (lower bits per byte). The average over
domains is the unweighted mean of the domains' bits per byte, as ``fusion eval`` reports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Student's t at 0.975 for 1-30 degrees of freedom; beyond, the normal's 1.96 plus its
# first-order correction (within 0.001 of the exact value from 30 on).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z975 = 1.959964


def t975(degrees: int) -> float:
    """The 97.5 % quantile of Student's t with ``degrees`` degrees of freedom."""
    if degrees < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {degrees}")
    if degrees <= len(_T975):
        return _T975[degrees - 1]
    return Z975 + (Z975**3 + Z975) / (4 * degrees)


@dataclass(frozen=True)
class DocumentScores:
    """One arm's held-out scores at one seed: per domain, each document's NLL in nats."""

    nll: Mapping[str, Sequence[float]]


@dataclass(frozen=True)
class Comparison:
    """The paired difference of arm A against arm B, in percent of B's bits per byte."""

    per_seed: tuple[float, ...]
    mean: float
    seed_half_width: float
    eval_half_width: float

    @property
    def half_width(self) -> float:
        return math.hypot(self.seed_half_width, self.eval_half_width)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def verdict(self) -> str:
        """'beats' (the interval lies below 0), 'worse' (above) or 'within noise'."""
        if self.high < 0:
            return "beats"
        return "worse" if self.low > 0 else "within noise"

    def line(self) -> str:
        """``-0.52 % [-0.81, -0.23] (3 seeds: beats)``."""
        return (
            f"{self.mean:+.2f} % [{self.low:+.2f}, {self.high:+.2f}] "
            f"({len(self.per_seed)} seeds: {self.verdict})"
        )

    def as_dict(self) -> dict:
        return {
            "per_seed_percent": list(self.per_seed),
            "mean_percent": self.mean,
            "seed_half_width": self.seed_half_width,
            "eval_half_width": self.eval_half_width,
            "low": self.low,
            "high": self.high,
            "verdict": self.verdict,
        }


def _bpb(nll: np.ndarray, weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Bits per byte per (draw, seed): ``weights`` ``[R, D]`` document counts, ``nll`` ``[S, D]``,
    ``sizes`` ``[D]`` bytes."""
    return (weights @ nll.T) / (weights @ sizes)[:, None] / math.log(2)


def compare(
    a: Mapping[int, DocumentScores],
    b: Mapping[int, DocumentScores],
    sizes: Mapping[str, Sequence[int]],
    *,
    domains: Sequence[str] | None = None,
    resamples: int = 4000,
    rng_seed: int = 0,
) -> Comparison:
    """Arm ``a`` against arm ``b`` over the seeds both have, on the average of ``domains``
    (default: every domain of ``sizes``, each document's UTF-8 bytes)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no seed: nothing to compare")
    domains = list(domains or sizes)
    rng = np.random.default_rng(rng_seed)
    observed = np.zeros((2, len(seeds)))
    drawn = np.zeros((2, resamples, len(seeds)))
    for domain in domains:
        size = np.asarray(sizes[domain], dtype=np.float64)
        count = len(size)
        if count == 0:
            raise ValueError(f"domain {domain!r} has no document")
        draws = rng.multinomial(count, np.full(count, 1 / count), size=resamples).astype(float)
        for arm, scores in enumerate((a, b)):
            nll = np.asarray([scores[s].nll[domain] for s in seeds], dtype=np.float64)
            if nll.shape != (len(seeds), count):
                raise ValueError(
                    f"domain {domain!r}: {nll.shape[1]} document scores for {count} documents"
                )
            observed[arm] += _bpb(nll, np.ones((1, count)), size)[0] / len(domains)
            drawn[arm] += _bpb(nll, draws, size) / len(domains)
    per_seed = 100 * (observed[0] / observed[1] - 1)
    mean = float(per_seed.mean())
    spread = (
        t975(len(seeds) - 1) * per_seed.std(ddof=1) / math.sqrt(len(seeds))
        if len(seeds) > 1
        else math.inf
    )
    over_draws = (100 * (drawn[0] / drawn[1] - 1)).mean(axis=1)
    return Comparison(
        per_seed=tuple(float(x) for x in per_seed),
        mean=mean,
        seed_half_width=float(spread),
        eval_half_width=float(Z975 * over_draws.std(ddof=1)),
    )
