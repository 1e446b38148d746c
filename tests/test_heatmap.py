"""The per-layer grid behind report.md's text heatmap: exponents, grid layout, shading."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from difftest.report.heatmap import VMAX, VMIN, error_exponent, layer_grid, shade, text_heatmap

sys.path.insert(0, str(Path(__file__).parent))
from sample_results import NUM_LAYERS, sample_run  # noqa: E402


@pytest.mark.parametrize(
    ("cosine", "expected"),
    [
        (1.0, VMIN),  # identical: clamped to the floor, not -inf
        (1.0 + 1e-12, VMIN),  # a hair above 1 from rounding
        (0.999, -3.0),
        (0.9, -1.0),
        (0.0, 0.0),
        (-1.0, VMAX),  # anti-correlated: clamped to the top
    ],
)
def test_error_exponent(cosine: float, expected: float) -> None:
    assert error_exponent(cosine) == pytest.approx(expected, abs=1e-9)


def test_error_exponent_nan() -> None:
    assert math.isnan(error_exponent(math.nan))


def test_layer_grid_from_sample_run() -> None:
    grid = layer_grid(sample_run())
    assert grid is not None
    assert grid.rows == [str(i) for i in range(NUM_LAYERS)] + ["logits"]
    assert grid.cols == [
        "fp8-block / exactness",
        "fp8-block / accuracy",
        "fp8-block-faulty / exactness",
        "fp8-block-faulty / accuracy",
    ]
    # residual cosine 0.93 at the faulty layer 3 -> log10(0.07)
    assert grid.values[3][2] == pytest.approx(math.log10(0.07))
    assert grid.values[3][0] < -5  # the correct target stays at rounding noise
    assert grid.first_divergent == {2: "3", 3: "3"}


def test_text_heatmap_marks_first_divergence() -> None:
    grid = layer_grid(sample_run())
    assert grid is not None
    text = text_heatmap(grid)
    line3 = next(line for line in text.splitlines() if line.strip().startswith("3 "))
    assert "<- first divergent [3] [4]" in line3
    assert "▓▓ -1.2" in line3
    assert shade(None) == ".." and shade(math.nan) == "??" and shade(-0.5) == "██" and shade(-7) == "  "
