"""report.html: one file, no external resources (inline CSS and JS, the heatmap as a data: URI).

Prompts and outputs are untrusted — a prompt may well be `<script>...` — so every piece of text
goes through `html.escape(quote=True)` (`_e`), attributes included, and a Content-Security-Policy
meta tag forbids fetching anything, so that even a missed escape cannot load a resource.

Per prompt the two continuations are shown token by token, one column per position (reference
above, target below), so alignment survives wrapping; each target token is shaded by the
teacher-forced KL at that position, and the first divergence is outlined with both sides' top
alternatives in its tooltip.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

from difftest.report.heatmap import VMAX, VMIN, heatmap_png, layer_grid
from difftest.report.markdown import (
    HEADLINE,
    NA,
    divergence_text,
    failed_text,
    flatten,
    fmt_metric,
    fmt_num,
    headline_cells,
    localisation_line,
    prompt_order,
    reasons,
    value_text,
    verdict_text,
    visible,
)
from difftest.results import Comparison, PromptDiff, RunResult, TargetResult

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#f3f3f3}.PASS{color:#0a7d28;font-weight:bold}.FAIL{color:#c62828;font-weight:bold}
.NO{color:#c62828;font-weight:bold}.loc{background:#fff3e0;border-left:4px solid #e65100;padding:6px 10px}
.warn{color:#8a6d00}.prompt{border:1px solid #ddd;border-radius:4px;margin:8px 0;padding:6px}
.ph{font-size:13px;color:#444}.toks{display:flex;flex-wrap:wrap;font-family:ui-monospace,monospace;
font-size:13px;margin-top:4px}.tk{display:inline-flex;flex-direction:column;margin:0 1px 4px 0}
.tk span{white-space:pre;padding:0 2px;min-width:.6em;min-height:1.3em}.tk .r{color:#555;background:#f7f7f7}
.tk.lab span{color:#888;font-style:italic}.tk.div{outline:2px solid #c62828}.tk .gap{color:#bbb}
.err{color:#c62828}pre{white-space:pre-wrap;background:#f7f7f7;padding:4px;margin:2px 0}
.ctl{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd;z-index:1}
"""
_JS = """
function applyFilters(){
  var only=document.getElementById('diffonly').checked;
  var n=parseInt(document.getElementById('worstn').value,10)||0;
  document.querySelectorAll('.plist').forEach(function(list){
    var shown=0;
    list.querySelectorAll('.prompt').forEach(function(p){
      var ok=!only||p.getAttribute('data-diff')==='1';
      if(ok&&n>0&&shown>=n){ok=false;}
      if(ok){shown++;}
      p.style.display=ok?'':'none';
    });
  });
}
document.addEventListener('DOMContentLoaded',function(){
  document.getElementById('diffonly').addEventListener('change',applyFilters);
  document.getElementById('worstn').addEventListener('input',applyFilters);
});
"""


def _e(s: Any) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kl_colour(kl: float | None) -> str:
    """Background for a target token: clear under 1e-3 nats, full red at 1 nat and above."""
    if kl is None:
        return ""
    if math.isnan(kl):
        return "background:rgba(255,0,255,.6)"
    alpha = 0.0 if kl <= 1e-3 else min(1.0, (math.log10(kl) + 3) / 3)
    return f"background:rgba(220,50,47,{0.85 * alpha:.2f})" if alpha > 0 else ""


def _alts(alts: dict[str, float]) -> str:
    return ", ".join(
        f"{visible(repr(tok))} {lp:.3f}" for tok, lp in sorted(alts.items(), key=lambda kv: -kv[1])
    )


def _tokens(p: PromptDiff) -> str:
    cells = ['<span class="tk lab"><span class="r">ref</span><span class="t">target</span></span>']
    n = max(len(p.ref_tokens), len(p.tgt_tokens))
    for i in range(n):
        ref = p.ref_tokens[i] if i < len(p.ref_tokens) else None
        tgt = p.tgt_tokens[i] if i < len(p.tgt_tokens) else None
        kl = p.position_kl[i] if p.position_kl is not None and i < len(p.position_kl) else None
        title = f"position {i} · KL {fmt_num(kl)} nats"
        cls = "tk"
        if i == p.first_divergence:
            cls += " div"
            title += f"\nfirst divergence ({p.divergence_kind or '?'})"
            title += f"\nreference top: {_alts(p.ref_alternatives) or NA}\ntarget top: {_alts(p.tgt_alternatives) or NA}"
        r = (
            f'<span class="r">{_e(visible(ref))}</span>'
            if ref is not None
            else '<span class="r gap">∅</span>'
        )
        t = (
            f'<span class="t" style="{kl_colour(kl)}">{_e(visible(tgt))}</span>'
            if tgt is not None
            else '<span class="t gap">∅</span>'
        )
        cells.append(f'<span class="{cls}" title="{_e(title)}">{r}{t}</span>')
    return '<div class="toks">' + "".join(cells) + "</div>"


def _prompt(p: PromptDiff, rank: int) -> str:
    differs = "0" if p.exact is True and p.error is None else "1"
    head = (
        f"<b>{_e(p.prompt_id)}</b> · token match {fmt_num(p.match_rate, pct=True)} · "
        f"first divergence {_e(divergence_text(p))} · KL {fmt_num(p.kl_mean)}"
        f" [{fmt_num(p.kl_lower)}, {fmt_num(p.kl_upper)}] · top-1 {fmt_num(p.top1_agreement, pct=True)}"
        f" · BLEU {fmt_num(p.bleu)} · chrF {fmt_num(p.chrf)}"
        + (" · <b class='warn'>garbled</b>" if p.garbled else "")
    )
    body = f"<details><summary>prompt</summary><pre>{_e(p.prompt)}</pre></details>"
    if p.error:
        body += f'<div class="err">failed request: {_e(p.error)}</div>'
    if p.ref_tokens or p.tgt_tokens:
        body += _tokens(p)
    elif p.ref_text is not None or p.tgt_text is not None:
        body += f"<pre>{_e(p.ref_text)}</pre><pre>{_e(p.tgt_text)}</pre>"
    return f'<div class="prompt" data-diff="{differs}" data-rank="{rank}"><div class="ph">{head}</div>{body}</div>'


def _comparison(c: Comparison) -> str:
    title = "Exactness vs golden" if c.kind == "exactness" else "Accuracy vs reference"
    out = [f"<h4>{title} <code>{_e(c.baseline)}</code> ({len(c.prompts)} prompts)</h4>"]
    rows = []
    for k, v in c.aggregate.items():
        ci = c.ci.get(k)
        ci_s = f"[{fmt_metric(k, ci[0])}, {fmt_metric(k, ci[1])}]" if ci and len(ci) == 2 else NA
        rows.append([_e(k), _e(fmt_metric(k, v)), _e(ci_s)])
    out.append(_table(["metric", "value", "95% CI"], rows) if rows else "<p>no aggregate metrics (n/a)</p>")
    out += [f'<p class="warn">⚠ {_e(w)}</p>' for w in c.warnings]
    out.append(
        '<div class="plist">'
        + "".join(_prompt(p, i) for i, p in enumerate(prompt_order(c.prompts)))
        + "</div>"
    )
    return "\n".join(out)


def _free_table(rows_in: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows_in:
        keys.extend(k for k in row if k not in keys)
    rows = [[_e(value_text(row[k])) if k in row else NA for k in keys] for row in rows_in]
    return _table([_e(k) for k in keys], rows)


def _target(t: TargetResult) -> str:
    label, meets = verdict_text(t)
    out = [
        f'<h3 id="t-{_e(t.name)}">{_e(t.name)} — <span class="{label.split()[0]}">{_e(label)}</span>'
        f" (expect {_e(t.expect)}, meets expectation: {meets})</h3>"
    ]
    loc = localisation_line(t)
    if loc and label != "PASS":
        out.append(f'<p class="loc"><b>Localisation:</b> {_e(loc)}</p>')
    rs = reasons(t)
    if rs:
        out.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in rs) + "</ul>")
    if t.verdict is not None:
        out += [f'<p class="warn">⚠ {_e(w)}</p>' for w in t.verdict.warnings]
    out.append(
        f"<p>scheme <code>{_e(t.scheme or NA)}</code> · golden <code>{_e(t.golden or 'none')}</code>"
        f" · failed requests {_e(failed_text(t))}</p>"
    )
    if t.golden is None:
        out.append(
            "<p><i>No golden: judged on the accuracy budget alone; subtle bugs may hide inside it.</i></p>"
        )
    out += [_comparison(c) for c in t.comparisons]
    for d in t.layers:
        if d.summary or d.warnings:
            out.append(f"<p>Layers vs <code>{_e(d.against)}</code> ({_e(d.kind)}): {_e(d.summary or NA)}</p>")
            out += [f'<p class="warn">⚠ {_e(w)}</p>' for w in d.warnings]
    if t.audit:
        out += ["<h4>Quantization audit</h4>", _free_table(t.audit)]
    return "\n".join(out)


def _heatmap(run: RunResult) -> str:
    grid = layer_grid(run)
    if grid is None:
        return "<p>no white-box layer data (n/a)</p>"
    png = heatmap_png(grid)
    b64 = base64.b64encode(png).decode("ascii")
    width = int.from_bytes(png[16:20], "big")  # IHDR width: shown at 2x, pixels kept sharp
    cols = "".join(f"<li>{_e(name)}</li>" for name in grid.cols)
    firsts = ", ".join(f"[{j + 1}] layer {_e(lab)}" for j, lab in grid.first_divergent.items()) or "none"
    return (
        f'<img alt="per-layer heatmap, log10(1 - cosine)" style="image-rendering:pixelated;width:{2 * width}px" '
        f'src="data:image/png;base64,{b64}">'
        f"<p>Rows: layer index (residual stream after the block, else the layer's worst point), "
        f"L = logits. Colour: log10(1 − cosine) from {VMIN:g} (dark) to {VMAX:g} (yellow); "
        f"magenta = NaN, grey = not measured; outlined in red: first divergent layer ({firsts}).</p><ol>{cols}</ol>"
    )


def _verdict_table(run: RunResult) -> str:
    rows = []
    for t in run.targets:
        label, meets = verdict_text(t)
        comps: list[Comparison | None] = list(t.comparisons) or [None]
        for i, c in enumerate(comps):
            own = (
                [
                    f'<a href="#t-{_e(t.name)}">{_e(t.name)}</a>',
                    _e(t.scheme or NA),
                    _e(t.expect),
                    f'<span class="{label.split()[0]}">{_e(label)}</span>',
                    f'<span class="{meets}">{meets}</span>',
                ]
                if i == 0
                else [""] * 5
            )
            against = f"{_e(c.kind)} vs <code>{_e(c.baseline)}</code>" if c else NA
            rows.append(
                own + [against] + [_e(x) for x in headline_cells(c)] + [_e(failed_text(t)) if i == 0 else ""]
            )
    header = ["target", "scheme", "expect", "verdict", "meets expectation", "against"]
    return _table(header + [_e(h) for h, _ in HEADLINE] + ["failed requests"], rows)


def render_html(run: RunResult) -> str:
    gate = "PASS" if run.gate_passed else "FAIL"
    body = [
        "<h1>difftest report</h1>",
        f"<p>Reference <code>{_e(run.reference)}</code> · gate <span class='{gate}'>{gate}</span>"
        f" · started {_e(run.started_at or NA)} · {fmt_num(run.elapsed_s)} s</p>",
        "<h2>Verdict</h2>",
        _verdict_table(run),
        *[f'<p class="warn">⚠ {_e(w)}</p>' for w in run.warnings],
        '<div class="ctl"><label><input type="checkbox" id="diffonly"> different only</label> · '
        '<label>worst N <input type="number" id="worstn" min="0" value="0" style="width:5em"></label> '
        "(0 = all) · target tokens shaded by teacher-forced KL (clear &lt; 1e-3 nats, red ≥ 1 nat); "
        "the outlined column is the first divergence (hover for alternatives)</div>",
        "<h2>Targets</h2>",
        *[_target(t) for t in run.targets],
        "<h2>Per-layer error</h2>",
        _heatmap(run),
        "<h2>Signature</h2>",
        _table(
            ["setting", "value"],
            [[_e(k), _e(v)] for k, v in flatten(run.signature)]
            + [["schema_version", _e(run.schema_version)]],
        ),
        "<h2>Noise floor</h2>",
        _table(["metric", "value"], [[_e(k), _e(v)] for k, v in flatten(run.noise_floor)])
        if run.noise_floor
        else "<p>no noise floor used (n/a)</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>difftest report</title><style>{_CSS}</style><script>{_JS}</script></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
