"""Every plot of a run as SVG: inlined in report.html and written to `plots/*.svg` for CI artifacts.

Per target: the per-layer error of each white-box comparison (limit lines, first divergent layer,
guilty layer), the KL percentile ladder and the per-position KL of each black-box comparison, and
the guilty module against its siblings when a module was named. `first_screen_spark` is the small
per-layer line the first screen shows next to each verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difftest.report import plotdata as pd
from difftest.report import svg
from difftest.report.words import label_of
from difftest.results import RunResult, TargetResult

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Plot:
    target: str
    kind: str  # "layers" | "kl-ladder" | "kl-position" | "siblings"
    slug: str  # file name without .svg: "<target>-<kind>-<part>"
    caption: str  # one sentence under the plot: what to look at
    svg: str


def slug(*parts: str) -> str:
    return "-".join(_SLUG.sub("_", p).strip("_") or "x" for p in parts if p)


def finding(t: TargetResult, prof: pd.LayerProfile) -> bool:
    """Is this profile's first divergence a finding? Yes when its "layers" part failed, or when
    no "layers" part judged it and the target did not pass; a passing target's is noise."""
    if prof.status is not None:
        return prof.status == "FAIL"
    return label_of(t) != "PASS"


def layer_plot(t: TargetResult, prof: pd.LayerProfile) -> Plot:
    series = []
    if any(v is not None for v in prof.local):
        lim = prof.local_limit
        series.append(
            svg.Series(
                "local (worst module)",
                prof.local,
                colour=svg.PALETTE[0],
                limit=svg.Limit(lim[0], "<=", f"local limit {svg.fmt(lim[0])}") if lim else None,
            )
        )
    lim = prof.accumulated_limit
    series.append(
        svg.Series(
            "accumulated (residual)",
            prof.accumulated,
            colour=svg.PALETTE[1],
            dashed=True,
            limit=svg.Limit(lim[0], "<=", f"accumulated limit {svg.fmt(lim[0])}") if lim else None,
        )
    )
    if prof.null is not None and any(v is not None for v in prof.null):
        series.append(svg.Series("null (twin vs golden)", prof.null, colour="#9e9e9e", dashed=True))
    marks: list[tuple[int, str, str]] = []
    found = finding(t, prof)
    colour = svg.BAD if found else svg.MUTED
    if prof.first_divergent is not None:
        within = "" if found else " (within limits)"
        marks.append(
            (
                prof.first_divergent,
                f"first divergent layer {prof.xlabels[prof.first_divergent]}{within}",
                colour,
            )
        )
    if prof.guilty is not None and prof.guilty != prof.first_divergent:
        marks.append((prof.guilty, f"guilty module's layer {prof.xlabels[prof.guilty]}", colour))
    sub = f"y: {prof.unit}, log scale"
    status = prof.status
    if status is None:  # no "layers" part judged this diff: show the target's verdict, say so
        status = label_of(t)
        sub += " · badge: target verdict (layers not judged)"
    if prof.guilty_module:
        sub += f" · guilty: {prof.guilty_module}"
    elif prof.status != "FAIL":
        sub += " · no module out of bounds"
    where = [
        f"{name} limit: {lim_[2]}"
        for name, lim_ in (("local", prof.local_limit), ("accumulated", lim))
        if lim_
    ]
    caption = (
        f"Per-layer error of {t.name}, {prof.title}: each point is a layer, dashed lines are the limits "
        f"the 'layers' part judged ({'; '.join(where) or 'none for this part'}); red points are out of bounds."
    )
    chart = svg.line_chart(
        series,
        prof.xlabels,
        title=f"{t.name} · {prof.title}: per-layer error",
        status=status,
        subtitle=sub,
        ylabel=prof.unit,
        marks=marks,
        xlabel="layer",
    )
    return Plot(t.name, "layers", slug(t.name, "layers", prof.title.split(" ")[0]), caption, chart)


# bar_chart clips a row label to label_width // 6 characters and ends it 6 px left of the bars
_LABEL_CHAR_PX = 7  # bold 11 px text, with room to spare
_LABEL_GAP_PX = 10


def ladder_plot(t: TargetResult, kind: str, baseline: str, ladder: pd.Ladder, status: str | None) -> Plot:
    bars = []
    for label, value in ladder.rungs:
        lim = ladder.limits.get(label)
        bars.append(
            svg.Bar(
                # the limit rides in the row label, not after the value: bar_chart keeps 70 px right
                # of the longest bar, and "0.135  (limit 0.005)" there ran out of the viewBox
                label=f"{label} KL ≤ {svg.fmt(lim[0])}" if lim else f"{label} KL",
                value=value,
                highlight=lim is not None,
                limit=svg.Limit(lim[0], "<=") if lim else None,
                ref=ladder.null.get(label),
            )
        )
    longest = max((len(b.label) for b in bars), default=0)
    sources = "; ".join(f"{r}: {src}" for r, (_, src) in ladder.limits.items()) or "no KL limit on this part"
    if ladder.null:
        sources += "; grey diamonds: the null model (rounding twin vs golden) on the same rungs"
    caption = (
        f"KL percentiles of {t.name} vs {baseline} ({kind}) over {ladder.n_positions} generated positions; "
        f"red ticks are the verdict's limits ({sources}). The mean is the mean of per-prompt means (what the check reads)."
    )
    chart = svg.bar_chart(
        bars,
        title=f"{t.name} · {kind} vs {baseline}: KL ladder",
        status=status,
        subtitle="nats per position, log scale · bold rungs are checked, against the limit they name",
        label_width=max(90, _LABEL_CHAR_PX * longest + _LABEL_GAP_PX),
        xlabel="KL (nats)",
    )
    return Plot(t.name, "kl-ladder", slug(t.name, "kl-ladder", kind), caption, chart)


def position_plot(
    t: TargetResult,
    kind: str,
    baseline: str,
    prof: pd.PositionProfile,
    limit: tuple[float, str] | None,
    status: str | None,
) -> Plot:
    series = [
        svg.Series(
            "mean",
            prof.mean,
            colour=svg.PALETTE[0],
            limit=svg.Limit(limit[0], "<=", f"mean-KL limit {svg.fmt(limit[0])}") if limit else None,
        ),
        svg.Series("p90", prof.p90, colour=svg.PALETTE[1], dashed=True),
        svg.Series("max", prof.max, colour="#888", dashed=True),
    ]
    caption = (
        f"KL of {t.name} vs {baseline} ({kind}) along the generated sequence: mean, p90 and max over the "
        "prompts that reached each position. A rise at one position points at a token-level event; a "
        "steady level at the scheme's own loss."
    )
    chart = svg.line_chart(
        series,
        [str(i) for i in prof.positions],
        title=f"{t.name} · {kind} vs {baseline}: KL per position",
        status=status,
        subtitle="nats, log scale · the limit line is the mean-KL limit, for scale",
        ylabel="KL (nats)",
        xlabel="generated token position",
    )
    return Plot(t.name, "kl-position", slug(t.name, "kl-position", kind), caption, chart)


def siblings_plot(t: TargetResult, kind: str, sib: pd.Siblings) -> Plot:
    bars = [svg.Bar(name, value, highlight=guilty) for name, value, guilty in sib.rows]
    lim = svg.Limit(sib.limit[0], "<=", f"limit {svg.fmt(sib.limit[0])}") if sib.limit else None
    caption = (
        f"{sib.guilty} (bold) against its siblings {sib.role} in {t.name}, {kind}: module-local relative "
        f"error, each module replayed on the baseline's own input"
        + (f"; dashed: {sib.limit[1]}" if sib.limit else "")
        + "."
    )
    chart = svg.bar_chart(
        bars,
        title=f"{t.name} · {kind}: guilty module vs its siblings",
        status=sib.status,
        subtitle=f"{sib.role} · {sib.unit}, log scale",
        limit=lim,
        label_width=230,
        width=620,
        xlabel=sib.unit,
    )
    return Plot(t.name, "siblings", slug(t.name, "siblings", kind), caption, chart)


def target_plots(t: TargetResult, run: RunResult | None = None) -> list[Plot]:
    nulls = list(run.nulls) if run is not None else []
    null_layers = list(run.null_layers) if run is not None else []
    out = [layer_plot(t, prof) for prof in pd.layer_profiles(t, null_layers)]
    for c in t.comparisons:
        part = pd.part_for(t, c.kind, c.baseline)
        status = pd.part_status(part) or label_of(t)  # no part judged it: the target's verdict
        null = next((n for n in nulls if n.baseline == c.baseline), None) if c.kind == "exactness" else None
        ladder = pd.kl_ladder(c, part, null)
        if ladder is not None:
            out.append(ladder_plot(t, c.kind, c.baseline, ladder, status))
        prof = pd.position_profile(c)
        if prof is not None:
            out.append(
                position_plot(
                    t, c.kind, c.baseline, prof, ladder.limits.get("mean") if ladder else None, status
                )
            )
    for d in t.layers:
        sib = pd.sibling_errors(t, d)
        if sib is not None:
            out.append(siblings_plot(t, d.kind, sib))
    return out


def run_plots(run: RunResult) -> list[Plot]:
    """Every plot of the run, targets in order; slugs unique (a suffix when names collide)."""
    plots: list[Plot] = []
    seen: set[str] = set()
    for t in run.targets:
        for p in target_plots(t, run):
            s, k = p.slug, 2
            while s in seen:
                s, k = f"{p.slug}-{k}", k + 1
            seen.add(s)
            plots.append(Plot(p.target, p.kind, s, p.caption, p.svg))
    return plots


def first_screen_spark(t: TargetResult) -> tuple[str, str] | None:
    """(svg, caption) of the per-layer sparkline next to a verdict; None without layer data."""
    prof = pd.spark_profile(t)
    if prof is None:
        return None
    ys = prof.spark()
    n_layers = len(ys) - (1 if prof.xlabels and prof.xlabels[-1] == "logits" else 0)
    ys = ys[:n_layers] if n_layers > 0 else ys
    mark = prof.guilty if prof.guilty is not None else prof.first_divergent
    if not finding(t, prof):
        mark = None  # a passing target's first divergence is no finding: nothing marked
    if mark is not None and mark >= len(ys):
        mark = None
    caption = f"per-layer {prof.unit}, {prof.title}"
    if mark is not None:
        caption += f"; layer {prof.xlabels[mark]} marked"
    status = prof.status or ("FAIL" if mark is not None else None)
    chart = svg.sparkline(ys, mark=mark, status=status, limit=prof.spark_limit(), label=caption)
    return chart, caption
