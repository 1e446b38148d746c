"""The per-layer text heatmap of report.md: layers x (target, comparison), by log10(1 - cosine).

Why log10(1 - cosine): a correct FP8 module sits near cosine 0.9995 and a broken one near 0.93 or
0.0 (docs/design.md "Calibration"); on a linear cosine scale both look "about 1". One decade per
shading step separates accumulation-order noise (1e-6), scheme rounding (1e-3) and bugs (1e-1).

report.html draws the same data as SVG line charts with the limits (difftest.report.plots); the
hand-written PNG and its pixel font that used to live here are gone: SVG is crisper, has real
fonts, and needs no encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from difftest.results import LayerDiff, RunResult

# Fixed scale so that colours mean the same thing in every report: 1e-7 is float32 rounding of a
# residual stream, 1 is cosine 0 (garbage-gemm). Anything outside is clamped.
VMIN, VMAX = -7.0, 0.0


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
    """The residual stream after the block when measured, the worse of prefill and decode (as the
    logits row, and as report.html's per-layer plot: the two showed one layer differently); else
    the worst point of that layer."""
    pts = [p for p in diff.points if p.layer == layer and (kind is None or p.kind == kind)]
    if not pts:
        return None
    resid = [p.cosine for p in pts if p.kind == "residual"]
    vals = resid or [p.cosine for p in pts]
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
    # names are config / server text inside a ``` block: one line each, no backtick run that closes it
    lines.extend(
        f"[{j + 1}] {' '.join(str(name).split()).replace('`', chr(39))}" for j, name in enumerate(grid.cols)
    )
    lines.append(
        "shading: log10(1 - cosine)  '  ' <= -6  '░░' <= -4  '▒▒' <= -2  '▓▓' <= -1  '██' > -1"
        "  '??' NaN  '..' not measured"
    )
    return "\n".join(lines)
