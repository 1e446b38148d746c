"""Hand-written SVG charts: a line chart, a horizontal bar chart and a sparkline.

Why hand-written SVG: the differ's install stays light (no matplotlib, no Pillow), the charts are
text (crisp at any zoom, real fonts, searchable, diffable in CI artifacts), and the same string is
both inlined in report.html and written as a standalone .svg file. A chart is ~100 lines of
geometry; a plotting library would be thousands of lines of dependency for the same four plots.

Every chart states pass/fail in words in its title (colour is never the only carrier), draws the
limit it is judged against as a dashed line labelled with its value, and colours the points on
the wrong side of that limit red. Values are plotted on a log scale when they span decades (KL,
relative error); zero is drawn at the bottom of the axis ("≤ floor"), NaN as a magenta marker at
the top labelled "NaN", and None (not measured) leaves a gap.

All text goes through `_e` (XML escaping): module and target names come from user configs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

STATUS_COLOUR = {
    "PASS": "#1b7a34",
    "FAIL": "#c62828",
    "INCONCLUSIVE": "#b26a00",
    "NO VERDICT": "#c62828",
    None: "#555",
}
BAD = "#c62828"
GOOD = "#1f5fa8"
NAN = "#d100d1"
GRID = "#e4e4e4"
MUTED = "#999"
FONT = "system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
PALETTE = ("#1f5fa8", "#e07b00", "#2a9d3f", "#8e44ad", "#17a2b8", "#6d4c41")


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def fmt(x: float | None) -> str:
    """Tick and label numbers: 3 significant digits, scientific outside [1e-3, 1e4)."""
    if x is None:
        return "n/a"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e")


@dataclass(frozen=True)
class Limit:
    """A threshold drawn as a dashed line. `op` is the passing side: "<=" or ">="."""

    value: float
    op: str = "<="
    label: str = ""  # e.g. "limit 0.005 (noise floor x3)"

    def violated(self, v: float | None) -> bool:
        if v is None:
            return False
        if math.isnan(v):
            return True
        return v > self.value if self.op == "<=" else v < self.value


@dataclass
class Series:
    name: str
    ys: Sequence[float | None]
    colour: str = GOOD
    dashed: bool = False
    limit: Limit | None = None  # points on the wrong side are drawn red


@dataclass
class Scale:
    """Value -> pixel along one axis; log10 when `log`, with values <= 0 pinned to `lo`."""

    lo: float
    hi: float
    p0: float  # pixel of lo
    p1: float  # pixel of hi
    log: bool = True
    ticks: list[float] = field(default_factory=list)

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            a, b, x = math.log10(self.lo), math.log10(self.hi), math.log10(v)
        else:
            a, b, x = self.lo, self.hi, v
        t = 0.0 if b == a else (x - a) / (b - a)
        t = min(1.0, max(0.0, t))
        return self.p0 + t * (self.p1 - self.p0)


def make_scale(values: Sequence[float], p0: float, p1: float, *, log: bool) -> Scale:
    """A scale covering `values` (finite ones) with round ticks; log when asked and possible."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if log:
        pos = [v for v in finite if v > 0]
        if not pos:
            return Scale(1e-6, 1.0, p0, p1, True, [1e-6, 1e-4, 1e-2, 1.0])
        lo = 10 ** math.floor(math.log10(min(pos)))
        hi = 10 ** math.ceil(math.log10(max(pos)))
        if hi <= lo:
            hi = lo * 10
        decades = round(math.log10(hi / lo))
        step = max(1, math.ceil(decades / 5))
        ticks = [lo * 10 ** (k * step) for k in range(decades // step + 1)]
        return Scale(lo, hi, p0, p1, True, ticks)
    lo = min([0.0, *finite])
    hi = max([*finite, lo + 1e-12])
    span = hi - lo
    mag = 10 ** math.floor(math.log10(span)) if span > 0 else 1.0
    step = next(s * mag for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10) if span / (s * mag) <= 5)
    hi = math.ceil(hi / step) * step
    ticks = [lo + k * step for k in range(int(round((hi - lo) / step)) + 1)]
    return Scale(lo, hi, p0, p1, False, ticks)


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(title)}" font-family="{FONT}" font-size="11">'
        f"<title>{_e(title)}</title>" + "".join(body) + "</svg>"
    )


def _title(x: float, title: str, status: str | None, subtitle: str = "") -> list[str]:
    out = []
    tx = x
    if status:
        colour = STATUS_COLOUR.get(status, STATUS_COLOUR[None])
        w = 7 * len(status) + 10
        out.append(f'<rect x="{x}" y="4" width="{w}" height="17" rx="3" fill="{colour}"/>')
        out.append(
            f'<text x="{x + w / 2}" y="16.5" fill="#fff" font-weight="bold" text-anchor="middle">'
            f"{_e(status)}</text>"
        )
        tx = x + w + 6
    out.append(f'<text x="{tx}" y="17" font-size="13" font-weight="600">{_e(title)}</text>')
    if subtitle:
        out.append(f'<text x="{x}" y="33" fill="#555">{_e(subtitle)}</text>')
    return out


def line_chart(
    series: Sequence[Series],
    xlabels: Sequence[str],
    *,
    title: str,
    status: str | None = None,
    subtitle: str = "",
    ylabel: str = "",
    log: bool = True,
    marks: Sequence[tuple[int, str, str]] = (),
    width: int = 560,
    height: int = 240,
    xlabel: str = "",
) -> str:
    """Lines over categorical x positions; each series' limit dashed; `marks` = (x index, label,
    colour) vertical markers (the first divergent layer: red when it fails, grey when within limits)."""
    legend = len(series) > 1
    left, right, top = 58, 16, 44 if subtitle else 30
    bottom = 20 + (14 if xlabel else 0) + (18 if legend else 0)
    n = max(1, len(xlabels))
    pw = width - left - right
    xs = [left + (pw * (i + 0.5) / n) for i in range(n)]
    values: list[float] = [v for s in series for v in s.ys if v is not None]
    values += [s.limit.value for s in series if s.limit is not None]
    ys = make_scale(values, height - bottom, top, log=log)
    zeros = log and any(v is not None and v <= 0 for v in values)
    out = _title(8, title, status, subtitle)
    for k, t in enumerate(ys.ticks):
        y = ys(t)
        lab = ("≤" if zeros and k == 0 else "") + fmt(t)  # zeros (identical) sit on the bottom line
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end" fill="#555">{lab}</text>')
    if ylabel:
        cy = (top + height - bottom) / 2
        out.append(
            f'<text transform="translate(12,{cy:.0f}) rotate(-90)" text-anchor="middle" fill="#555">'
            f"{_e(ylabel)}</text>"
        )
    step = max(1, math.ceil(n / (pw / 26)))
    for i, lab in enumerate(xlabels):
        if i % step == 0 or i == n - 1:
            out.append(
                f'<text x="{xs[i]:.1f}" y="{height - bottom + 14}" text-anchor="middle" fill="#555">'
                f"{_e(lab)}</text>"
            )
    if xlabel:
        out.append(
            f'<text x="{left + pw / 2:.0f}" y="{height - bottom + 28}" text-anchor="middle" fill="#555">{_e(xlabel)}</text>'
        )
    for k, (i, lab, colour) in enumerate(marks):
        if 0 <= i < n:
            out.append(
                f'<line x1="{xs[i]:.1f}" x2="{xs[i]:.1f}" y1="{top}" y2="{height - bottom}" stroke="{colour}" '
                f'stroke-width="1.5" stroke-dasharray="2 2" class="mark"/>'
            )
            anchor = "end" if xs[i] > left + pw * 0.6 else "start"
            dx = -3 if anchor == "end" else 3
            out.append(
                f'<text x="{xs[i] + dx:.1f}" y="{top + 10 + 12 * k}" fill="{colour}" text-anchor="{anchor}" '
                f'font-weight="600">{_e(lab)}</text>'
            )
    for s in series:
        if s.limit is not None:
            y = ys(s.limit.value)
            out.append(
                f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{s.colour}" '
                f'stroke-width="1.2" stroke-dasharray="6 3" class="limit"/>'
            )
            out.append(
                f'<text x="{width - right - 2}" y="{y - 3:.1f}" text-anchor="end" fill="{s.colour}">'
                f"{_e(s.limit.label or 'limit ' + fmt(s.limit.value))}</text>"
            )
        path: list[str] = []
        for i, v in enumerate(s.ys[:n]):
            if v is None or math.isnan(v):
                if len(path) > 1:
                    out.append(_polyline(path, s))
                path = []
                continue
            path.append(f"{xs[i]:.1f},{ys(v):.1f}")
        if len(path) > 1:
            out.append(_polyline(path, s))
        for i, v in enumerate(s.ys[:n]):
            if v is None:
                continue
            if math.isnan(v):
                out.append(f'<circle cx="{xs[i]:.1f}" cy="{top + 4}" r="4" fill="{NAN}"/>')
                out.append(f'<text x="{xs[i] + 5:.1f}" y="{top + 8}" fill="{NAN}">NaN</text>')
                continue
            bad = s.limit is not None and s.limit.violated(v)
            out.append(
                f'<circle cx="{xs[i]:.1f}" cy="{ys(v):.1f}" r="{3.5 if bad else 2.5}" '
                f'fill="{BAD if bad else s.colour}"><title>{_e(s.name)} {_e(xlabels[i] if i < len(xlabels) else i)}: '
                f"{fmt(v)}</title></circle>"
            )
    out += _legend(series, left, height - 4, width - right)
    return _svg(width, height, out, f"{status + ': ' if status else ''}{title}")


def _polyline(path: list[str], s: Series) -> str:
    dash = ' stroke-dasharray="4 3"' if s.dashed else ""
    return f'<polyline points="{" ".join(path)}" fill="none" stroke="{s.colour}" stroke-width="1.6"{dash}/>'


def _legend(series: Sequence[Series], left: float, y: float, right: float) -> list[str]:
    if len(series) < 2:
        return []
    out, x = [], left
    for s in series:
        w = 26 + 5.8 * len(s.name)
        if x + w > right:  # no room: the caption under the plot names every line anyway
            break
        dash = ' stroke-dasharray="4 3"' if s.dashed else ""
        out.append(
            f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{s.colour}" stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{x + 20}" y="{y}" fill="#333" font-size="10.5">{_e(s.name)}</text>')
        x += w + 8
    return out


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None
    highlight: bool = False  # drawn bold (the guilty module, the rung a check reads)
    limit: Limit | None = None  # this bar's own limit (drawn as a tick across the bar row)
    note: str = ""
    ref: float | None = None  # a reference value on the same row (the null model), grey diamond


def bar_chart(
    bars: Sequence[Bar],
    *,
    title: str,
    status: str | None = None,
    subtitle: str = "",
    log: bool = True,
    limit: Limit | None = None,
    width: int = 560,
    label_width: int = 150,
    xlabel: str = "",
) -> str:
    """Horizontal bars, one row each; a chart-wide `limit` as a vertical dashed line, per-bar
    limits as short red ticks on their row. Bars past their limit are red."""
    row_h = 20
    top = 44 if subtitle else 30
    left, right = label_width, 70
    height = top + row_h * len(bars) + (34 if xlabel else 22)
    values = [b.value for b in bars if b.value is not None]
    values += [b.limit.value for b in bars if b.limit is not None]
    values += [b.ref for b in bars if b.ref is not None and math.isfinite(b.ref)]
    if limit is not None:
        values.append(limit.value)
    xs = make_scale(values, left, width - right, log=log)
    out = _title(8, title, status, subtitle)
    base = height - (34 if xlabel else 22)
    for t in xs.ticks:
        x = xs(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 2}" y2="{base}" stroke="{GRID}"/>')
        out.append(f'<text x="{x:.1f}" y="{base + 13}" text-anchor="middle" fill="#555">{fmt(t)}</text>')
    if xlabel:
        out.append(
            f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle" fill="#555">'
            f"{_e(xlabel)}</text>"
        )
    for k, b in enumerate(bars):
        y = top + k * row_h
        lim = b.limit or limit
        bad = lim is not None and lim.violated(b.value)
        weight = ' font-weight="bold"' if b.highlight else ""
        out.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end"{weight} fill="{BAD if bad else "#222"}">'
            f"{_e(_clip(b.label, label_width // 6))}<title>{_e(b.label)}</title></text>"
        )
        if b.value is None:
            out.append(f'<text x="{left + 4}" y="{y + 14}" fill="{MUTED}">n/a</text>')
            continue
        if math.isnan(b.value):
            out.append(
                f'<rect x="{left}" y="{y + 3}" width="{width - right - left}" height="{row_h - 6}" fill="{NAN}" opacity=".35"/>'
            )
            out.append(f'<text x="{left + 4}" y="{y + 14}" fill="{NAN}" font-weight="bold">NaN</text>')
            continue
        x1 = xs(b.value)
        colour = BAD if bad else (GOOD if not b.highlight else "#0d3c73")
        stroke = ' stroke="#000" stroke-width="1.2"' if b.highlight else ""
        out.append(
            f'<rect x="{left}" y="{y + 3}" width="{max(1.0, x1 - left):.1f}" height="{row_h - 6}" '
            f'fill="{colour}"{stroke}><title>{_e(b.label)}: {fmt(b.value)}</title></rect>'
        )
        out.append(f'<text x="{x1 + 4:.1f}" y="{y + 14}" fill="#222">{fmt(b.value)}{_e(b.note)}</text>')
        if b.ref is not None and math.isfinite(b.ref):
            rx, cy = xs(b.ref), y + row_h / 2
            out.append(
                f'<path d="M{rx:.1f},{cy - 5:.1f} l5,5 l-5,5 l-5,-5 z" fill="#9e9e9e" stroke="#fff" class="ref">'
                f"<title>null: {fmt(b.ref)}</title></path>"
            )
        if b.limit is not None:
            lx = xs(b.limit.value)
            out.append(
                f'<line x1="{lx:.1f}" x2="{lx:.1f}" y1="{y}" y2="{y + row_h}" stroke="{BAD}" stroke-width="2" class="limit"/>'
            )
    if limit is not None:
        lx = xs(limit.value)
        out.append(
            f'<line x1="{lx:.1f}" x2="{lx:.1f}" y1="{top - 4}" y2="{base}" stroke="{BAD}" '
            f'stroke-width="1.2" stroke-dasharray="6 3" class="limit"/>'
        )
        out.append(
            f'<text x="{min(lx + 3, width - right):.1f}" y="{top - 6}" fill="{BAD}">'
            f"{_e(limit.label or 'limit ' + fmt(limit.value))}</text>"
        )
    return _svg(width, height, out, f"{status + ': ' if status else ''}{title}")


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1) :]


def sparkline(
    ys: Sequence[float | None],
    *,
    mark: int | None = None,
    status: str | None = None,
    limit: float | None = None,
    width: int = 150,
    height: int = 30,
    label: str = "",
) -> str:
    """A tiny log-scale line (e.g. per-layer error), the marked index circled red with a
    label under it; `status` colours the line (FAIL red, PASS green)."""
    colour = STATUS_COLOUR.get(status, STATUS_COLOUR[None])
    n = max(1, len(ys))
    pad = 4
    vals = [v for v in ys if v is not None and math.isfinite(v)]
    if limit is not None:
        vals.append(limit)
    sc = make_scale(vals, height - pad, pad, log=True)
    xs = [pad + (width - 2 * pad) * (i / max(1, n - 1)) for i in range(n)]
    out: list[str] = []
    if limit is not None:
        y = sc(limit)
        out.append(
            f'<line x1="0" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#888" stroke-dasharray="3 2"/>'
        )
    pts = [f"{xs[i]:.1f},{sc(v):.1f}" for i, v in enumerate(ys) if v is not None and math.isfinite(v)]
    if len(pts) > 1:
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    for i, v in enumerate(ys):
        if v is not None and math.isnan(v):
            out.append(f'<circle cx="{xs[i]:.1f}" cy="{pad}" r="2.5" fill="{NAN}"/>')
    if mark is not None and 0 <= mark < len(ys):
        v = ys[mark]
        y = sc(v) if v is not None and math.isfinite(v) else pad
        out.append(
            f'<circle cx="{xs[mark]:.1f}" cy="{y:.1f}" r="3.5" fill="none" stroke="{BAD}" stroke-width="2"/>'
        )
    title = label or "per-layer error"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="spark" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>'
        + "".join(out)
        + "</svg>"
    )
