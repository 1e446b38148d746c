"""Bootstrap confidence intervals and percentiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from difftest.metrics import stats
from difftest.metrics.stats import bootstrap_mean_ci, bootstrap_ratio_ci, p99, percentile


def test_degenerate_inputs():
    assert bootstrap_mean_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([]))
    assert all(math.isnan(v) for v in bootstrap_mean_ci([1.0, math.nan, 2.0]))  # NaN never vanishes
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0, 2.0], confidence=1.0)


def test_seeded_and_deterministic():
    x = np.random.default_rng(1).normal(size=50)
    assert bootstrap_mean_ci(x, seed=7) == bootstrap_mean_ci(x, seed=7)
    assert bootstrap_mean_ci(x, seed=7) != bootstrap_mean_ci(x, seed=8)


def test_contains_mean_and_has_normal_width():
    x = np.random.default_rng(2).normal(1.0, 1.0, size=400)
    lo, hi = bootstrap_mean_ci(x)
    assert lo < x.mean() < hi
    # normal theory: half-width 1.96 sd / sqrt(n)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_coverage_close_to_nominal():
    rng = np.random.default_rng(3)
    hits = 0
    trials = 200
    for i in range(trials):
        lo, hi = bootstrap_mean_ci(rng.normal(0.0, 1.0, size=60), seed=i)
        hits += lo <= 0.0 <= hi
    # nominal 95%; percentile bootstrap under-covers slightly at n = 60; binomial sd ~1.5%
    assert 0.88 <= hits / trials <= 0.99


def test_chunked_resampling_is_deterministic_and_equivalent(monkeypatch):
    x = np.random.default_rng(4).exponential(size=300)
    whole = bootstrap_mean_ci(x)
    monkeypatch.setattr(stats, "_CHUNK_ELEMS", 1000)  # 3 resamples per chunk
    chunked = bootstrap_mean_ci(x)
    assert chunked == bootstrap_mean_ci(x)
    assert chunked == pytest.approx(whole, abs=0.03)


def test_ratio_ci():
    # pooled matched/total positions: sum 6 / sum 6 = 1.0 must lie inside
    lo, hi = bootstrap_ratio_ci([1, 2, 3], [2, 2, 2])
    assert lo <= 1.0 <= hi and lo >= 0.5 and hi <= 1.5
    num = np.random.default_rng(5).integers(0, 20, size=100)
    den = np.full(100, 20)
    lo, hi = bootstrap_ratio_ci(num, den)
    assert lo < num.sum() / den.sum() < hi
    assert all(math.isnan(v) for v in bootstrap_ratio_ci([1.0, 2.0], [0.0, 0.0]))
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0], [1.0, 2.0])


def test_percentiles():
    assert p99(np.arange(101.0)) == pytest.approx(99.0)  # 0..100: the 99th is 99
    assert p99([0.0, 1.0]) == pytest.approx(0.99)  # linear interpolation
    assert percentile([4.0, 1.0, 3.0], 50) == 3.0
    assert math.isnan(p99([])) and math.isnan(p99([1.0, math.nan]))


def test_percentiles_rank_infinities_instead_of_turning_them_into_nan():
    """A -inf target logprob makes a position's KL inf; numpy's interpolation gave NaN (inf - inf)."""
    kl = [0.1] * 8 + [math.inf] * 2  # ranks 0..9: p99 sits at 8.91, between 0.1 and inf
    assert percentile(kl, 99) == math.inf and p99(kl) == math.inf
    assert percentile(kl, 50) == 0.1  # below every inf: finite, as before
    assert percentile([1.0, 2.0, math.inf], 50) == 2.0  # exactly on a rank: that value, no 0 * inf
    assert percentile([1.0, 3.0, math.inf], 25) == 2.0  # by hand: rank 0.5 between 1 and 3
    assert percentile([-math.inf, 0.0], 0) == -math.inf
    assert math.isnan(percentile([1.0, math.nan, math.inf], 50))  # NaN still propagates
