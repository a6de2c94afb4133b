"""Quality metrics on one prompt's outputs, and bootstrap intervals over prompts.

Pure functions of strings, token lists and arrays: no model in here, so each is tested
on fixed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of `prediction` against `reference` (rouge-score, Porter stemming)."""
    scores = _scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first generated token where two greedy outputs differ.

    A sequence that ended (stop string, EOS, length) while the other went on differs at its
    end; identical sequences never diverge and give their length.
    """
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | None]:
        """Plain JSON: an undefined value (NaN) becomes None."""
        clean = lambda x: None if x != x else x  # noqa: E731
        return {"mean": clean(self.mean), "low": clean(self.low), "high": clean(self.high), "n": self.n}


def bootstrap(columns: Sequence[Sequence[float]], stat: Callable[..., np.ndarray] | None = None, *,
              resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `stat` over prompts.

    `columns` are per-prompt values of equal length, resampled *together* (the same prompts
    in every column), so paired statistics such as a difference or a ratio to the full model
    get the paired interval. `stat(*arrays)` maps arrays [B, n] to [B]; the default is the
    mean of the single column.
    """
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        raise ValueError("bootstrap columns differ in length")
    stat = stat or (lambda x: x.mean(axis=-1))
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    point = float(stat(*(c[None] for c in cols))[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # [B, n]
    dist = stat(*(c[idx] for c in cols))  # [B]
    dist = dist[np.isfinite(dist)]  # a ratio is undefined where a resample's reference mean is 0
    if dist.size == 0:
        return Interval(point, float("nan"), float("nan"), n)
    alpha = (1 - level) / 2
    low, high = np.quantile(dist, [alpha, 1 - alpha])
    return Interval(point, float(low), float(high), n)


def mean_ci(values: Sequence[float], **kw) -> Interval:
    return bootstrap([values], **kw)


def diff_ci(values: Sequence[float], reference: Sequence[float], **kw) -> Interval:
    """Mean of per-prompt differences (values - reference), paired."""
    return bootstrap([values, reference], lambda x, r: (x - r).mean(axis=-1), **kw)


def ratio_ci(values: Sequence[float], reference: Sequence[float], **kw) -> Interval:
    """Ratio of means (mean values / mean reference), prompts resampled together."""
    def ratio(x, r):
        denom = r.mean(axis=-1)
        return np.divide(x.mean(axis=-1), denom, out=np.full_like(denom, np.nan), where=denom != 0)

    return bootstrap([values, reference], ratio, **kw)
