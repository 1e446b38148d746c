"""The per-layer heatmap: layers x (target, comparison), colour by log10(1 - cosine).

Why log10(1 - cosine): a correct FP8 module sits near cosine 0.9995 and a broken one near 0.93 or
0.0 (docs/design.md "Calibration"); on a linear cosine scale both look "about 1". One decade per
colour step separates accumulation-order noise (1e-6), scheme rounding (1e-3) and bugs (1e-1).

The PNG is written with zlib + struct only: difftest's install stays light (no Pillow, no
matplotlib). A 3x5 pixel font labels rows (layer index, `L` for logits) and columns (1-based, the
HTML caption names them), and a legend strip under the grid shows the scale in decades.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from difftest.results import LayerDiff, RunResult

# Fixed scale so that colours mean the same thing in every report: 1e-7 is float32 rounding of a
# residual stream, 1 is cosine 0 (garbage-gemm). Anything outside is clamped.
VMIN, VMAX = -7.0, 0.0
# viridis at 0, .25, .5, .75, 1 (dark = agrees, yellow = broken)
_ANCHORS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
NAN_RGB = (255, 0, 255)  # NaN in a tensor always fails: make it impossible to miss
EMPTY_RGB = (235, 235, 235)  # not measured
_BG = (255, 255, 255)
_FG = (40, 40, 40)
_MARK = (220, 20, 60)  # outline of a column's first divergent layer


@dataclass(frozen=True)
class Grid:
    rows: list[str]  # "0", "1", ..., "logits"
    cols: list[str]  # "target / exactness"
    values: list[list[float | None]]  # [row][col] log10(1 - cosine), None = not measured
    first_divergent: dict[int, str]  # col -> row label of its first divergent layer


def error_exponent(cosine: float) -> float:
    """log10(1 - cosine), clamped into [VMIN, VMAX]; NaN stays NaN."""
    if math.isnan(cosine):
        return math.nan
    gap = 1.0 - cosine
    if gap <= 10.0**VMIN:  # identical, or cosine a hair above 1 from rounding
        return VMIN
    return min(VMAX, max(VMIN, math.log10(gap)))


def _layer_cosine(diff: LayerDiff, layer: int | None, kind: str | None) -> float | None:
    """The residual stream after the block when measured; else the worst point of that layer."""
    pts = [p for p in diff.points if p.layer == layer and (kind is None or p.kind == kind)]
    if not pts:
        return None
    resid = [p.cosine for p in pts if p.kind == "residual"]
    if resid:
        return resid[0]
    vals = [p.cosine for p in pts]
    return math.nan if any(math.isnan(v) for v in vals) else min(vals)


def layer_grid(run: RunResult) -> Grid | None:
    """Collect every target's LayerDiffs into one grid; None when no target has layer data."""
    cols: list[tuple[str, LayerDiff]] = []
    for t in run.targets:
        for d in t.layers:
            if d.points:
                cols.append((f"{t.name} / {d.kind}", d))
    if not cols:
        return None
    layers = sorted({p.layer for _, d in cols for p in d.points if p.layer is not None})
    has_logits = any(p.kind == "logits" for _, d in cols for p in d.points)
    rows = [str(i) for i in layers] + (["logits"] if has_logits else [])
    values: list[list[float | None]] = []
    for i in layers:
        row = []
        for _, d in cols:
            c = _layer_cosine(d, i, None)
            row.append(None if c is None else error_exponent(c))
        values.append(row)
    if has_logits:
        row = []
        for _, d in cols:
            c = _layer_cosine(d, None, "logits")
            row.append(None if c is None else error_exponent(c))
        values.append(row)
    first = {
        j: str(d.first_divergent_layer)
        for j, (_, d) in enumerate(cols)
        if d.first_divergent_layer is not None
    }
    return Grid(rows=rows, cols=[c for c, _ in cols], values=values, first_divergent=first)


def colormap(v: float | None) -> tuple[int, int, int]:
    """Map an exponent in [VMIN, VMAX] onto the anchors by linear interpolation."""
    if v is None:
        return EMPTY_RGB
    if math.isnan(v):
        return NAN_RGB
    x = (min(VMAX, max(VMIN, v)) - VMIN) / (VMAX - VMIN) * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    f = x - i
    a, b = _ANCHORS[i], _ANCHORS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- text version

_SHADES = ((-6.0, "  "), (-4.0, "░░"), (-2.0, "▒▒"), (-1.0, "▓▓"))


def shade(v: float | None) -> str:
    """Two cells of unicode shading per decade band; `??` for NaN, `..` for not measured."""
    if v is None:
        return ".."
    if math.isnan(v):
        return "??"
    for top, s in _SHADES:
        if v <= top:
            return s
    return "██"


def text_heatmap(grid: Grid) -> str:
    """A monospace grid for report.md: shading plus the exponent, columns numbered."""
    width = 10
    lines = ["layer  " + "".join(f"[{j + 1}]".ljust(width) for j in range(len(grid.cols)))]
    for r, label in enumerate(grid.rows):
        cells = []
        for v in grid.values[r]:
            num = "n/a" if v is None else ("nan" if math.isnan(v) else f"{v:.1f}")
            cells.append(f"{shade(v)} {num}".ljust(width))
        marks = [f"[{j + 1}]" for j, lab in grid.first_divergent.items() if lab == label]
        tail = f"  <- first divergent {' '.join(marks)}" if marks else ""
        lines.append(f"{label:>6} " + "".join(cells) + tail)
    lines.append("")
    lines.extend(f"[{j + 1}] {name}" for j, name in enumerate(grid.cols))
    lines.append(
        "shading: log10(1 - cosine)  '  ' <= -6  '░░' <= -4  '▒▒' <= -2  '▓▓' <= -1  '██' > -1"
        "  '??' NaN  '..' not measured"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- PNG

# 3x5 glyphs, one string of 15 bits per character, row by row.
_FONT = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001001001",
    "8": "111101111101111",
    "9": "111101111001111",
    "-": "000000111000000",
    "L": "100100100100111",
}


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.px = bytearray(bytes(_BG) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, rgb: Sequence[int]) -> None:
        line = bytes(rgb) * w
        for yy in range(max(0, y), min(self.height, y + h)):
            start = (yy * self.width + x) * 3
            self.px[start : start + 3 * w] = line

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s:
            bits = _FONT.get(ch)
            if bits:
                for k, bit in enumerate(bits):
                    if bit == "1":
                        self.rect(x + (k % 3) * scale, y + (k // 3) * scale, scale, scale, _FG)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.px[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )
        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b"")
        )


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@dataclass(frozen=True)
class Layout:
    """Pixel geometry, exposed so that tests can find a cell's centre."""

    cell_w: int = 28
    cell_h: int = 14
    left: int = 40  # row labels
    top: int = 18  # column numbers
    legend_h: int = 12
    legend_gap: int = 10

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        return self.left + col * self.cell_w, self.top + row * self.cell_h


def heatmap_png(grid: Grid, layout: Layout = Layout()) -> bytes:
    """Render the grid, its labels and a legend strip (VMIN..VMAX in decades) as PNG bytes."""
    n_rows, n_cols = len(grid.rows), len(grid.cols)
    grid_w = max(n_cols * layout.cell_w, 8 * 22)  # wide enough for the legend labels
    width = layout.left + grid_w + 8
    legend_y = layout.top + n_rows * layout.cell_h + layout.legend_gap
    height = legend_y + layout.legend_h + 16
    cv = _Canvas(width, height)
    for j in range(n_cols):
        cv.text(layout.left + j * layout.cell_w + 4, 3, str(j + 1))
    for r, label in enumerate(grid.rows):
        lab = "L" if label == "logits" else label
        _, y = layout.cell_origin(r, 0)
        cv.text(4, y + (layout.cell_h - 10) // 2, lab)
        for j in range(n_cols):
            x, y = layout.cell_origin(r, j)
            # one pixel of background between cells keeps neighbours of equal colour apart
            cv.rect(x, y, layout.cell_w - 1, layout.cell_h - 1, colormap(grid.values[r][j]))
    for j, label in grid.first_divergent.items():
        if label in grid.rows:  # outline the first divergent layer of each column in red
            x, y = layout.cell_origin(grid.rows.index(label), j)
            w, h = layout.cell_w - 1, layout.cell_h - 1
            for rx, ry, rw, rh in ((x, y, w, 2), (x, y + h - 2, w, 2), (x, y, 2, h), (x + w - 2, y, 2, h)):
                cv.rect(rx, ry, rw, rh, _MARK)
    strip_w = grid_w - 4
    for x in range(strip_w):
        v = VMIN + (VMAX - VMIN) * x / max(1, strip_w - 1)
        cv.rect(layout.left + x, legend_y, 1, layout.legend_h, colormap(v))
    decades = int(VMAX - VMIN)
    for d in range(decades + 1):
        x = layout.left + round(d * (strip_w - 1) / decades)
        cv.text(max(0, x - 4), legend_y + layout.legend_h + 3, str(int(VMIN) + d), scale=1)
    return cv.png()
