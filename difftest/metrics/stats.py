"""Small statistics: percentile-bootstrap confidence intervals and percentiles.

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the per-prompt values with
replacement, take the statistic of each resample, read the interval off the quantiles. Seeded,
so a report re-rendered from the same numbers shows the same interval. Resamples are drawn in
chunks so that memory stays bounded by `_CHUNK_ELEMS` whatever the number of prompts (the
benchmark checks memory stays flat from 1k to 20k prompts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
_CHUNK_ELEMS = 1 << 21  # ~16 MiB of int64 indices per chunk


def _resampled(n: int, n_resamples: int, seed: int, stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply `stat` to index matrices [chunk, n] drawn with replacement; concatenated results."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_ELEMS // max(n, 1))
    out: list[np.ndarray] = []
    done = 0
    while done < n_resamples:
        m = min(per_chunk, n_resamples - done)
        out.append(stat(rng.integers(0, n, size=(m, n))))
        done += m
    return np.concatenate(out)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """The quantiles through `percentile`: np.quantile interpolates inf - inf to NaN, so one inf
    value (a -inf target logprob makes a prompt's KL inf) gave an upper bound of NaN, which a
    null model reads as unusable; the bound is inf."""
    alpha = (1.0 - confidence) / 2.0
    if np.isfinite(samples).all():
        lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
        return float(lo), float(hi)
    return percentile(samples, 100.0 * alpha), percentile(samples, 100.0 * (1.0 - alpha))


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean. Empty -> (nan, nan); any NaN -> (nan, nan)."""
    _check(n_resamples, confidence)
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or np.isnan(x).any():
        return (math.nan, math.nan)
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    means = _resampled(x.size, n_resamples, seed, lambda idx: x[idx].mean(axis=1))
    return _interval(means, confidence)


def bootstrap_ratio_ci(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of sum(num) / sum(den), resampling (num, den) pairs together.

    For pooled rates such as matched positions / total positions, where prompts of different
    lengths must weigh by their length. A resample whose denominators sum to 0 is dropped
    (it has no ratio); if all are, or any input is NaN, the result is (nan, nan).
    """
    _check(n_resamples, confidence)
    a = np.asarray(numerators, dtype=np.float64).ravel()
    b = np.asarray(denominators, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{a.size} numerators for {b.size} denominators")
    if a.size == 0 or np.isnan(a).any() or np.isnan(b).any():
        return (math.nan, math.nan)

    def stat(idx: np.ndarray) -> np.ndarray:
        den = b[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den != 0, a[idx].sum(axis=1) / den, np.nan)

    ratios = _resampled(a.size, n_resamples, seed, stat)
    ratios = ratios[~np.isnan(ratios)]
    if ratios.size == 0:
        return (math.nan, math.nan)
    return _interval(ratios, confidence)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """q-th percentile (linear interpolation, numpy's default); empty -> nan; NaN propagates.

    Infinite values (a -inf target logprob makes a position's KL inf) are ranked like any other:
    numpy interpolates as lo + (hi - lo) * f, which is NaN for inf - inf or 0 * inf, so a p99
    reached by an inf KL came out NaN ("NaN always fails", but for the wrong reason); here it is
    inf, and a percentile below every inf stays finite."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan
    if np.isnan(x).any():
        return math.nan
    if np.isfinite(x).all():
        return float(np.percentile(x, q))
    x = np.sort(x)
    rank = (x.size - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    frac = rank - lo
    if frac == 0 or x[lo] == x[hi]:
        return float(x[lo])
    return float(x[lo] + (x[hi] - x[lo]) * frac)


def p99(values: Sequence[float] | np.ndarray) -> float:
    """99th percentile: the tail a mean hides (one position where the target collapses)."""
    return percentile(values, 99.0)
