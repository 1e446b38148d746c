"""The heatmap PNG decoded by hand (chunks, CRCs, IDAT), its colour map and its text version."""

from __future__ import annotations

import math
import struct
import sys
import zlib
from pathlib import Path

import pytest

from difftest.report.heatmap import (
    _ANCHORS,
    _MARK,
    EMPTY_RGB,
    NAN_RGB,
    VMAX,
    VMIN,
    Grid,
    Layout,
    colormap,
    error_exponent,
    heatmap_png,
    layer_grid,
    shade,
    text_heatmap,
)

sys.path.insert(0, str(Path(__file__).parent))
from sample_results import NUM_LAYERS, sample_run  # noqa: E402


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """A minimal PNG reader: checks signature and every CRC, returns width, height, RGB rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        pos += 12 + length
    tags = [t for t, _ in chunks]
    assert tags[0] == b"IHDR" and tags[-1] == b"IEND"
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = []
    for y in range(height):
        line = raw[y * stride : (y + 1) * stride]
        assert line[0] == 0  # filter "None": the writer uses no other
        rows.append(line[1:])
    return width, height, rows


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][3 * x : 3 * x + 3])  # type: ignore[return-value]


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


def test_colormap_anchors_and_interpolation() -> None:
    assert colormap(VMIN) == _ANCHORS[0]
    assert colormap(VMAX) == _ANCHORS[-1]
    assert colormap(VMAX + 5) == _ANCHORS[-1]
    # halfway between anchor 0 (at -7) and anchor 1 (at -5.25): the midpoint, rounded
    mid = colormap(VMIN + (VMAX - VMIN) / 8)
    assert mid == tuple(round((a + b) / 2) for a, b in zip(_ANCHORS[0], _ANCHORS[1], strict=True))
    assert colormap(None) == EMPTY_RGB
    assert colormap(math.nan) == NAN_RGB


def test_png_dimensions_and_cell_colours() -> None:
    grid = Grid(
        rows=["0", "1", "logits"],
        cols=["a / exactness", "b / accuracy"],
        values=[[VMIN, -3.0], [None, math.nan], [VMAX, -1.0]],
        first_divergent={},
    )
    layout = Layout()
    width, height, rows = decode_png(heatmap_png(grid, layout))
    assert width >= layout.left + 2 * layout.cell_w
    assert height > layout.top + 3 * layout.cell_h
    for r in range(3):
        for c in range(2):
            x, y = layout.cell_origin(r, c)
            centre = pixel(rows, x + layout.cell_w // 2, y + layout.cell_h // 2)
            assert centre == colormap(grid.values[r][c]), (r, c)
    # the legend strip runs from the low anchor (left) to the high anchor (right)
    legend_y = layout.top + 3 * layout.cell_h + layout.legend_gap + layout.legend_h // 2
    assert pixel(rows, layout.left, legend_y) == _ANCHORS[0]
    assert pixel(rows, width - 8 - 5, legend_y) == _ANCHORS[-1]


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
    layout = Layout()
    _, _, rows = decode_png(heatmap_png(grid, layout))
    x, y = layout.cell_origin(3, 2)
    assert pixel(rows, x, y) == _MARK  # the first divergent cell is outlined
    assert pixel(rows, x + layout.cell_w // 2, y + layout.cell_h // 2) == colormap(grid.values[3][2])
    x, y = layout.cell_origin(2, 2)
    assert pixel(rows, x, y) == colormap(grid.values[2][2])  # its neighbour is not


def test_text_heatmap_marks_first_divergence() -> None:
    grid = layer_grid(sample_run())
    assert grid is not None
    text = text_heatmap(grid)
    line3 = next(line for line in text.splitlines() if line.strip().startswith("3 "))
    assert "<- first divergent [3] [4]" in line3
    assert "▓▓ -1.2" in line3
    assert shade(None) == ".." and shade(math.nan) == "??" and shade(-0.5) == "██" and shade(-7) == "  "
