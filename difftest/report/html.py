"""report.html: one self-contained file that answers "which target failed, why, where" first.

Layout, top to bottom:
1. the gate and, per target, a card: verdict, the failing checks in words (value vs limit and
   where the limit came from), the localisation sentence, and a per-layer sparkline with the
   guilty layer marked — the first screen;
2. the headline table (mean KL with CI, p99 KL, top-1, token match, median first divergence);
3. plots as inline SVG (difftest.report.plots; the same files are in `plots/`);
4. the per-tag breakdown (prompt `tags`);
5. the prompt explorer: worst first, search, filters, pages, rendered by a small inline script
   from compact JSON (difftest.report.explorer) so that 20 000 prompts stay one light page;
6. per target: aggregate tables, warnings, the quantization audit; then signature, noise floor.

Prompts and outputs are untrusted — a prompt may well be `<script>...` — so every piece of text
goes through `html.escape(quote=True)` (`_e`), the JSON block is `<`-escaped, the script writes
text with `textContent` only, and a Content-Security-Policy forbids fetching anything.
"""

from __future__ import annotations

import html
from typing import Any

from difftest.report import plotdata as pd
from difftest.report.explorer import default_comparison, explorer_data, gc_paused, script_json
from difftest.report.markdown import (
    FAILED_HEADER,
    HEADLINE,
    NA,
    VERDICT_HEADER,
    failed_text,
    fmt_metric,
    fmt_num,
    headline_cells,
    layer_summary,
    localisation_line,
    verdict_row_parts,
)
from difftest.report.page import CSP, CSS, JS
from difftest.report.plots import Plot, first_screen_spark, run_plots
from difftest.report.words import (
    GATE_WORDS,
    all_checks,
    expectation_words,
    failing_checks,
    gate_of,
    kv_rows,
    label_of,
    open_checks,
    shape_words,
    skipped_parts,
)
from difftest.results import Comparison, RunResult, TargetResult

MAX_CARD_CHECKS = 4  # failing checks listed on the first screen per target; the rest further down


def _e(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _cls(label: str) -> str:
    return label.replace(" ", "-")


def badge(label: str) -> str:
    return f'<span class="badge b-{_cls(label)}">{_e(label)}</span>'


def _table(header: list[str], rows: list[list[str]], num_cols: frozenset[int] = frozenset()) -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i in num_cols else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------- first screen


def _expectation(t: TargetResult) -> str:
    words, ok = expectation_words(t)
    cls = "ok" if ok else ("t-INCONCLUSIVE" if label_of(t) == "INCONCLUSIVE" else "unexp")
    return f'<span class="{cls}">{_e(words)}</span>'


def _check_li(w: Any) -> str:
    text = _e(w.sentence())
    if w.fails:  # a failing check is never greyed, informative or not (NaN)
        return f"<li>{text}</li>"
    if not w.informative:
        return f'<li class="ni">{text}</li>'  # the sentence says "not informative"
    if not w.required:
        return f'<li class="ni">{text}<span class="tag">not required</span></li>'
    if w.undecided:
        return f'<li class="t-INCONCLUSIVE">{text}</li>'
    return f"<li>{text}</li>"


def _card(t: TargetResult) -> str:
    label = label_of(t)
    checks = all_checks(t)
    failing = failing_checks(t)
    out = [
        f'<div class="card s-{_cls(label)}" data-target="{_e(t.name)}">',
        f'<div class="head">{badge(label)} <b><a href="#t-{_e(t.name)}">{_e(t.name)}</a></b>'
        f' <span class="meta">scheme {_e(t.scheme or NA)} · golden {_e(t.golden or "none")}</span>'
        f" · {_expectation(t)}</div>",
    ]
    undecided = open_checks(t)
    body: list[str] = []
    if t.verdict is None:
        body.append("<ul><li>no verdict: the target did not produce results</li></ul>")
    elif failing or undecided:
        for title, ws in (("Why", failing), ("Undecided", undecided)):
            if not ws:
                continue
            items = [_check_li(w) for w in ws[:MAX_CARD_CHECKS]]
            if len(ws) > MAX_CARD_CHECKS:
                items.append(f'<li class="muted">{len(ws) - MAX_CARD_CHECKS} more below</li>')
            body.append(f'<div class="why"><b>{title}:</b><ul>' + "".join(items) + "</ul></div>")
    elif not t.verdict.numbers_inform:
        body.append(
            '<div class="why"><b>Why:</b> no informative check: every limit would pass a broken target too</div>'
        )
    else:
        acc = next((w for w in checks if w.metric == "mean KL" and w.part == "accuracy"), None)
        informing = [w for w in checks if w.informative]
        summary = f"all {len(informing)} informative checks passed"
        if acc is not None and acc.measured:  # never "mean KL n/a ≤ limit": nothing was compared
            summary += f"; accuracy mean KL {acc.value} ≤ limit {acc.limit} ({acc.source})"
        body.append(f'<div class="why">{_e(summary)}</div>')
    ni = [w for w in checks if not w.informative]
    if ni:
        body.append('<ul class="ni">' + "".join(_check_li(w) for w in ni[:MAX_CARD_CHECKS]) + "</ul>")
    loc = localisation_line(t)
    if loc:
        body.append(f'<div class="where"><b>Where:</b> {_e(loc)}</div>')
    skipped = skipped_parts(t)
    if skipped:
        body.append(f'<div class="muted">{_e("; ".join(skipped))}</div>')
    spark = first_screen_spark(t)
    side = (
        f'<div class="sp">{spark[0]}<div>{_e(spark[1])}</div></div>'
        if spark
        else '<div class="sp">no per-layer data</div>'
    )
    # one grid item for the whole left column: loose children would be auto-placed into the
    # sparkline's column once there are more of them than the sparkline spans rows
    out.append(f'<div class="body">{"".join(body)}</div>')
    out.append(side)
    out.append("</div>")
    return "".join(out)


def _first_screen(run: RunResult) -> str:
    gate = gate_of(run)
    words = GATE_WORDS.get(gate, "")
    n_prompts = max((len(c.prompts) for t in run.targets for c in t.comparisons), default=0)
    head = (
        f'<p class="gate">Gate {badge(gate)} {_e(words)} · reference <code>{_e(run.reference)}</code>'
        f" · {len(run.targets)} targets · {n_prompts} prompts · {fmt_num(run.elapsed_s)} s"
        f'<span class="meta"> · started {_e(run.started_at or NA)}</span></p>'
    )
    cards = '<div class="cards" id="verdicts">' + "".join(_card(t) for t in run.targets) + "</div>"
    infra = "".join(f'<p class="warn">✖ infrastructure: {_e(w)}</p>' for w in run.infrastructure)
    warns = "".join(f'<p class="warn">⚠ {_e(w)}</p>' for w in run.warnings)
    return head + infra + cards + warns


# ----------------------------------------------------------------------------- tables


def _verdict_table(run: RunResult) -> str:
    rows = []
    for t, label, meets, i, c in verdict_row_parts(run):
        own = (
            [
                f'<a href="#t-{_e(t.name)}">{_e(t.name)}</a>',
                _e(t.scheme or NA),
                _e(t.expect),
                f'<span class="t-{_cls(label)}">{_e(label)}</span>',
                f'<span class="t-{meets}">{meets}</span>',
            ]
            if i == 0
            else [""] * 5
        )
        against = f"{_e(c.kind)} vs <code>{_e(c.baseline)}</code>" if c else NA
        rows.append(
            own + [against] + [_e(x) for x in headline_cells(c)] + [_e(failed_text(t)) if i == 0 else ""]
        )
    header = [*VERDICT_HEADER, *(_e(h) for h, _ in HEADLINE), FAILED_HEADER]
    return _table(header, rows, frozenset(range(6, 12)))


def _nulls(run: RunResult) -> str:
    """The null model behind the exactness limits: each rounding twin against its golden."""
    nulls = list(getattr(run, "nulls", []) or [])
    sig = run.signature.get("null") if isinstance(run.signature, dict) else None
    if not nulls and not sig:
        return ""
    out = ['<h2 id="null">Null model (where exactness limits come from)</h2>']
    if sig:
        out.append(f"<p>{_e('; '.join(f'{k} {v}' for k, v in kv_rows(sig)))}</p>")
    if nulls:
        rows = []
        for c in nulls:
            noise = getattr(c, "module_noise", None)
            rows.append(
                [f"<code>{_e(c.baseline)}</code>", f"<code>{_e(c.target)}</code>", str(len(c.prompts))]
                + [_e(x) for x in headline_cells(c)]
                + [_e(fmt_num(noise))]
            )
        header = ["golden", "null (twin)", "prompts"] + [_e(h) for h, _ in HEADLINE] + ["module noise"]
        out.append(_table(header, rows, frozenset(range(2, len(header)))))
        out.append(
            '<p class="muted">Limits are the null\'s upper 95% bound times the margin, never under an absolute '
            "minimum; the exactness plots show the null as grey.</p>"
        )
    return "".join(out)


_OUTCOME_CLASS = {"FAIL": "t-FAIL", "not informative": "ni", "undecided": "t-INCONCLUSIVE", "pass": "t-PASS"}


def _checks_table(t: TargetResult) -> str:
    rows = []
    for w in all_checks(t):
        status = w.outcome
        cls = _OUTCOME_CLASS[status]
        rows.append(
            [
                _e(w.part),
                _e(w.metric) + (f" <span class='muted'>at {_e(w.where)}</span>" if w.where else ""),
                _e(w.value),
                _e(w.relation),
                _e(w.limit),
                _e(w.source),
                f'<span class="{cls}">{_e(status)}</span>',
            ]
        )
    if not rows:
        return ""
    return _table(["part", "check", "value", "", "limit", "limit from", "result"], rows, frozenset({2, 4}))


def _aggregate_table(c: Comparison) -> str:
    rows = []
    for k, v in c.aggregate.items():
        ci = c.ci.get(k)
        ci_s = f"[{fmt_metric(k, ci[0])}, {fmt_metric(k, ci[1])}]" if ci and len(ci) == 2 else NA
        rows.append([_e(k), _e(fmt_metric(k, v)), _e(ci_s)])
    return (
        _table(["metric", "value", "95% CI"], rows, frozenset({1}))
        if rows
        else "<p>no aggregate metrics (n/a)</p>"
    )


def audit_table(audit: list[dict[str, Any]]) -> str:
    """The quantization audit as words: shapes as 5 × 12, booleans yes / no, nested values flat."""
    keys: list[str] = []
    for row in audit:
        keys.extend(k for k in row if k not in keys)
    rows = []
    for row in audit:
        cells = [_e(shape_words(k, row[k])) if k in row else NA for k in keys]
        flagged = row.get("flagged") is True
        rows.append([f"<b>{c}</b>" if flagged else c for c in cells])
    return _table([_e(k.replace("_", " ")) for k in keys], rows)


def _tag_table(t: TargetResult) -> str:
    comps = [c for c in t.comparisons if c.prompts]
    if not comps or not any(getattr(p, "tags", None) for c in comps for p in c.prompts):
        return ""
    by_tag: dict[str, dict[str, pd.TagRow]] = {}
    for c in comps:
        for r in pd.tag_rows(c.prompts):
            by_tag.setdefault(r.tag, {})[c.kind] = r
    header = ["tag", "prompts", "failed"]
    for c in comps:
        header += [f"{_e(c.kind)}: diverged", f"{_e(c.kind)}: mean KL", f"{_e(c.kind)}: top-1"]
    rows = []
    for tag, per in by_tag.items():
        first = next(iter(per.values()))
        row = [_e(tag), str(first.n), str(first.failed)]
        for c in comps:
            r = per.get(c.kind)
            if r is None:
                row += [NA] * 3
                continue
            ok = r.n - r.failed
            row += [
                f"{r.diverged}/{ok}" if ok else NA,
                _e(fmt_num(r.kl_mean)),
                _e(fmt_num(r.top1, pct=True)),
            ]
        rows.append(row)
    return f"<h3>{_e(t.name)}</h3>" + _table(header, rows, frozenset(range(1, len(header))))


# ----------------------------------------------------------------------------- sections


def _plots(plots: list[Plot], run: RunResult) -> str:
    if not plots:
        return "<p>no plots: no per-prompt KL and no white-box layer data (n/a)</p>"
    out = []
    for t in run.targets:
        mine = [p for p in plots if p.target == t.name]
        if not mine:
            continue
        figs = "".join(
            f'<figure class="plot" data-kind="{_e(p.kind)}" id="plot-{_e(p.slug)}">{p.svg}'
            f'<figcaption>{_e(p.caption)} <span class="muted">(plots/{_e(p.slug)}.svg)</span></figcaption></figure>'
            for p in mine
        )
        label = label_of(t)
        head = f"{badge(label)} {_e(t.name)} <span class='meta'>({len(mine)} plots)</span>"
        if label == "PASS":  # collapsed: the plots of a passing target are there to compare with
            out.append(
                f'<details class="tplots"><summary><b>{head}</b></summary><div class="plots">{figs}</div></details>'
            )
        else:
            out.append(f'<h3>{head}</h3><div class="plots">{figs}</div>')
    return "".join(out)


def _explorer(run: RunResult) -> str:
    data = explorer_data(run)
    if not data["cmps"]:
        return "<p>no per-prompt results (n/a)</p>"
    order = [i for i, t in enumerate(run.targets) if t.verdict is None or not t.verdict.meets_expectation]
    order += [i for i, t in enumerate(run.targets) if label_of(t) != "PASS"]
    default = default_comparison(data, order)
    pager = (
        '<div class="pager"><button class="prev" type="button">◀ worse</button><span class="pinfo"></span>'
        '<button class="next" type="button">better ▶</button></div>'
    )
    return (
        '<div class="ctl" id="controls">'
        f'<label>comparison <select id="cmp" data-default="{default}"></select></label>'
        '<label>search <input type="search" id="q" placeholder="prompt id, text or tag"></label>'
        '<label><input type="checkbox" id="f-failed"> failed requests</label>'
        '<label><input type="checkbox" id="f-div"> diverged</label>'
        '<label>tag <select id="f-tag"><option value="">any</option></select></label></div>'
        '<p class="legend muted">Worst first (failed requests, then mean teacher-forced KL). The token '
        'diff is aligned like <code>diff</code>: <span class="del">struck red</span> only in the reference, '
        '<span class="ins">green</span> only in the target; a reference token\'s underline is its KL '
        "(clear &lt; 1e-3 nats, red ≥ 1 nat); the outlined token is the first divergence.</p>"
        + pager
        + '<div id="plist"><noscript>The prompt explorer needs JavaScript; every number is in report.json.</noscript></div>'
        + pager
        + f'<script type="application/json" id="difftest-data">{script_json(data)}</script>'
    )


def _target_detail(t: TargetResult) -> str:
    label = label_of(t)
    out = [
        f'<h3 id="t-{_e(t.name)}">{badge(label)} {_e(t.name)} <span class="meta">{_expectation(t)}</span></h3>'
    ]
    loc = localisation_line(t)
    if loc:
        out.append(f'<p class="where"><b>Where:</b> {_e(loc)}</p>')
    out.append(_checks_table(t))
    out += [f'<p class="warn">⚠ {_e(w)}</p>' for w in (t.verdict.warnings if t.verdict else ())]
    out.append(
        f"<p>scheme <code>{_e(t.scheme or NA)}</code> · golden <code>{_e(t.golden or 'none')}</code>"
        f" · {FAILED_HEADER} {_e(failed_text(t))}</p>"
    )
    if t.golden is None:
        out.append(
            "<p><i>No golden: judged on the accuracy budget alone; subtle bugs may hide inside it.</i></p>"
        )
    for c in t.comparisons:
        title = "Exactness vs golden" if c.kind == "exactness" else "Accuracy vs reference"
        out.append(f"<h4>{title} <code>{_e(c.baseline)}</code> ({len(c.prompts)} prompts)</h4>")
        out.append(_aggregate_table(c))
        out += [f'<p class="warn">⚠ {_e(w)}</p>' for w in c.warnings]
    for d in t.layers:
        if d.summary or d.warnings:
            out.append(
                f"<p>Layers vs <code>{_e(d.against)}</code> ({_e(d.kind)}): {_e(layer_summary(t, d))}</p>"
            )
            out += [f'<p class="warn">⚠ {_e(w)}</p>' for w in d.warnings]
    if t.invariance:
        out.append("<h4>Batch-slot invariance</h4>" + _kv_table(t.invariance))
    if t.audit:
        out += ["<h4>Quantization audit</h4>", audit_table(t.audit)]
    return "\n".join(out)


def _kv_table(d: dict[str, Any]) -> str:
    return _table(["setting", "value"], [[_e(k), _e(v)] for k, v in kv_rows(d)])


def render_html(run: RunResult, plots: list[Plot] | None = None) -> str:
    with gc_paused():
        return _render_html(run, plots)


def _render_html(run: RunResult, plots: list[Plot] | None) -> str:
    plots = run_plots(run) if plots is None else plots
    tag_tables = "".join(_tag_table(t) for t in run.targets)
    body = [
        "<h1>difftest report</h1>",
        _first_screen(run),
        "<h2>Headline metrics</h2>",
        _verdict_table(run),
        _nulls(run),
        '<h2 id="plots">Plots</h2>',
        _plots(plots, run),
    ]
    if tag_tables:
        body += ['<h2 id="tags">By prompt tag</h2>', tag_tables]
    body += [
        '<h2 id="prompts">Prompts</h2>',
        _explorer(run),
        "<h2>Targets in detail</h2>",
        *[_target_detail(t) for t in run.targets],
        "<h2>Signature</h2>",
        _table(
            ["setting", "value"],
            [[_e(k), _e(v)] for k, v in kv_rows(run.signature)]
            + [["schema_version", _e(run.schema_version)]],
        ),
        "<h2>Noise floor</h2>",
        _kv_table(run.noise_floor) if run.noise_floor else "<p>no noise floor used (n/a)</p>",
    ]
    title = f"difftest: {gate_of(run)}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        "<body>\n" + "\n".join(body) + f"\n<script>{JS}</script>\n</body></html>\n"
    )
