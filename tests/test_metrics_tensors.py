"""Tensor metrics: cosine, norm ratio, max abs error, relative error, SQNR — hand-worked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from difftest.metrics.tensors import cosine, max_abs_err, norm_ratio, rel_err, sqnr_db, tensor_diff

INF = math.inf


@pytest.mark.parametrize(
    ("a", "b", "cos", "ratio", "maxabs", "rel", "sqnr"),
    [
        # orthogonal: cos 0, |b|/|a| = 1, |a-b| = sqrt2, SQNR = 10 log10(1/2) = -3.0103 dB
        ([1, 0], [0, 1], 0.0, 1.0, 1.0, math.sqrt(2), -3.010299957),
        # equal: SQNR +inf
        ([3, 4], [3, 4], 1.0, 1.0, 0.0, 0.0, INF),
        # scale x2 (scale-skipped-like): cos 1, ratio 2, |a-b| = 5 = |a| -> rel 1, SQNR 0 dB
        ([3, 4], [6, 8], 1.0, 2.0, 4.0, 1.0, 0.0),
        # scale x0.5 (fnuz-unnormalized): cos 1 (blind!), ratio .5, rel .5, SQNR 10 log10(25/6.25) = 6.0206
        ([3, 4], [1.5, 2], 1.0, 0.5, 2.0, 0.5, 6.020599913),
        # small error: <a,b> = 4.1, |a| = 2, |b| = sqrt(4.21) -> cos = 4.1 / (2 sqrt 4.21) = 0.99910891;
        # rel = .1/2 = .05; SQNR = 10 log10(4 / .01) = 26.0206
        (
            [1, 1, 1, 1],
            [1, 1, 1, 1.1],
            4.1 / (2 * math.sqrt(4.21)),
            math.sqrt(4.21) / 2,
            0.1,
            0.05,
            26.020599913,
        ),
        # sign flip: cos -1, ratio 1, rel 2, SQNR 10 log10(1/4) = -6.0206
        ([1, 2], [-1, -2], -1.0, 1.0, 4.0, 2.0, -6.020599913),
        # both zero: identical -> cos 1, ratio 1, rel 0, SQNR +inf
        ([0, 0], [0, 0], 1.0, 1.0, 0.0, 0.0, INF),
        # baseline zero, target not: cos 0, ratio +inf, rel +inf, SQNR -inf
        ([0, 0], [1, 0], 0.0, INF, 1.0, INF, -INF),
        # target zero (a dead output): cos 0, ratio 0, rel 1, SQNR 10 log10(1) = 0
        ([3, 4], [0, 0], 0.0, 0.0, 4.0, 1.0, 0.0),
    ],
)
def test_tensor_metrics_table(a, b, cos, ratio, maxabs, rel, sqnr):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    d = tensor_diff(a, b)
    for got, want in (
        (d.cosine, cos),
        (d.norm_ratio, ratio),
        (d.max_abs_err, maxabs),
        (d.rel_err, rel),
        (d.sqnr_db, sqnr),
    ):
        assert got == pytest.approx(want, abs=1e-8)
    assert d.finite and d.numel == a.size
    assert (cosine(a, b), norm_ratio(a, b), max_abs_err(a, b), rel_err(a, b), sqnr_db(a, b)) == (
        d.cosine,
        d.norm_ratio,
        d.max_abs_err,
        d.rel_err,
        d.sqnr_db,
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_makes_every_metric_nan_and_fail(bad):
    a = np.ones(4)
    b = np.array([1.0, bad, 1.0, 1.0])
    d = tensor_diff(a, b)
    assert not d.finite
    for v in (d.cosine, d.norm_ratio, d.max_abs_err, d.rel_err, d.sqnr_db):
        assert math.isnan(v)
    # NaN fails any limit, whichever direction it is checked in
    assert not d.cosine >= 0.999 and not d.rel_err <= 0.05
    assert math.isnan(cosine(b, a))  # in the baseline too


def test_float16_inputs_are_summed_in_float64():
    # 1000 x 60000 in float16: |a|^2 = 3.6e12 overflows float16 (max 65504) but not float64
    a = np.full(1000, 60000, dtype=np.float16)
    d = tensor_diff(a, a)
    assert d.cosine == 1.0 and d.norm_ratio == 1.0 and d.sqnr_db == INF


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        tensor_diff(np.zeros((2, 3)), np.zeros(6))


def test_empty_arrays():
    d = tensor_diff(np.zeros(0), np.zeros(0))
    assert d.cosine == 1.0 and d.max_abs_err == 0.0 and d.rel_err == 0.0
