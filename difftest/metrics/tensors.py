"""Tensor comparison metrics (white-box activations, module replays, logits).

`a` is the baseline (reference or golden), `b` the target; both are flattened and cast to
float64 before anything is summed, so a float16 activation cannot overflow a norm.

Cosine alone is blind to magnitude bugs (docs/design.md "Calibration": `fnuz-unnormalized` leaves cosine at 0.99955
with a norm ratio of 0.50), so every comparison also reports the norm ratio and relative error.

Non-finite values: if either array holds a NaN or an infinity, every metric is NaN (and
`TensorDiff.finite` is False). A NaN compares False against any limit, so a check built on it
fails: NaN always fails (Polygraphy's rule), it never averages away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:  # same numel in another shape is still a layout bug, not a match
        raise ValueError(f"tensor shapes differ: {x.shape} vs {y.shape}")
    return x.ravel(), y.ravel()


def _finite(x: np.ndarray, y: np.ndarray) -> bool:
    return bool(np.isfinite(x).all() and np.isfinite(y).all())


def _norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """<a,b> / (|a| |b|) in [-1, 1]. Both zero -> 1.0 (identical); one zero -> 0.0; NaN/inf -> NaN."""
    x, y = _pair(a, b)
    if not _finite(x, y):
        return math.nan
    na, nb = _norm(x), _norm(y)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(x / na, y / nb), -1.0, 1.0))


def norm_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """|b| / |a|: 1.0 when magnitudes agree. |a| = 0: 1.0 if |b| = 0 too, else +inf."""
    x, y = _pair(a, b)
    if not _finite(x, y):
        return math.nan
    na, nb = _norm(x), _norm(y)
    if na == 0.0:
        return 1.0 if nb == 0.0 else math.inf
    return nb / na


def max_abs_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| (0.0 for empty arrays)."""
    x, y = _pair(a, b)
    if not _finite(x, y):
        return math.nan
    return float(np.max(np.abs(x - y))) if x.size else 0.0


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b| / |a|. |a| = 0: 0.0 if b is zero too, else +inf."""
    x, y = _pair(a, b)
    if not _finite(x, y):
        return math.nan
    na, nd = _norm(x), _norm(x - y)
    if na == 0.0:
        return 0.0 if nd == 0.0 else math.inf
    return nd / na


def sqnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """10 log10(|a|^2 / |a - b|^2) dB: +inf when equal, -inf when a = 0 != b."""
    x, y = _pair(a, b)
    if not _finite(x, y):
        return math.nan
    na, nd = _norm(x), _norm(x - y)
    if nd == 0.0:
        return math.inf
    if na == 0.0:
        return -math.inf
    return 20.0 * math.log10(na / nd)


@dataclass(frozen=True)
class TensorDiff:
    cosine: float
    norm_ratio: float
    max_abs_err: float
    rel_err: float
    sqnr_db: float
    finite: bool  # False when either side held a NaN or an infinity (then every metric is NaN)
    numel: int


def tensor_diff(a: np.ndarray, b: np.ndarray) -> TensorDiff:
    """Every tensor metric at once (the float64 cast is done once and shared)."""
    x, y = _pair(a, b)
    if not _finite(x, y):
        nan = math.nan
        return TensorDiff(nan, nan, nan, nan, nan, False, int(x.size))
    return TensorDiff(
        cosine=cosine(x, y),
        norm_ratio=norm_ratio(x, y),
        max_abs_err=max_abs_err(x, y),
        rel_err=rel_err(x, y),
        sqnr_db=sqnr_db(x, y),
        finite=True,
        numel=int(x.size),
    )
