"""report.md: self-contained, readable in a terminal and on GitHub (CI step summary, PR comment).

Order: verdict table, then per target (localisation line first, reasons, aggregate tables for
exactness and accuracy, worst prompts, quant audit), the per-layer text heatmap, and at the end
the signature and the noise floor. Prompts and outputs are untrusted text: every cell goes
through `md_cell`, which backslash-escapes what markdown or GitHub's HTML pass would interpret.

The small formatting helpers at the top are shared by the HTML, JUnit and terminal renderers so
that every output says "n/a" for a metric that was not measured (None) — never 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from difftest.report.heatmap import layer_grid, text_heatmap
from difftest.report.plotdata import TagRow, tag_rows
from difftest.report.words import GATE_WORDS, gate_of, kv_rows, reasons_in_words, shape_words, value_words
from difftest.results import Comparison, LayerDiff, PromptDiff, RunResult, TargetResult
from difftest.textsafe import safe, truncate
from difftest.whitebox.localise import localisation_line as whitebox_localisation_line

NA = "n/a"
MAX_PROMPT_ROWS = 20  # GitHub step summaries are capped at 1 MiB; the rest is in report.html
# Aggregate keys the headline columns read (difftest.metrics.aggregate), with accepted aliases.
HEADLINE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mean KL ± 95% CI", ("kl_mean",)),
    ("p99 KL", ("kl_p99", "p99_kl")),
    ("top-1 agreement", ("top1_agreement", "top1")),
    ("token match", ("token_match", "match_rate")),
    ("median first divergence", ("median_first_divergence", "first_divergence_median")),
)
_RATE_KEYS = ("agreement", "match", "rate", "exact", "garbled", "frac")


# ----------------------------------------------------------------------------- shared helpers


def fmt_num(x: Any, *, pct: bool = False) -> str:
    """A number for humans: None -> n/a, NaN -> nan, rates as percentages, 4 significant digits."""
    if x is None:
        return NA
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if not isinstance(x, float):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if pct:
        return f"{100 * x:.1f}%"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def is_rate(key: str) -> bool:
    return any(k in key for k in _RATE_KEYS)


def fmt_metric(key: str, value: Any) -> str:
    return fmt_num(value, pct=is_rate(key) and isinstance(value, float))


def lookup(mapping: dict[str, Any], keys: Sequence[str]) -> tuple[str, Any]:
    """The first alias present (its key and value); (keys[0], None) when none is."""
    for k in keys:
        if k in mapping and mapping[k] is not None:
            return k, mapping[k]
    return keys[0], None


def kl_ci(comp: Comparison | None) -> str:
    """The bootstrap CI of the mean KL as "[low, high]", n/a when not computed."""
    if comp is None:
        return NA
    key, _ = lookup(comp.aggregate, HEADLINE[0][1])
    ci = comp.ci.get(key)
    return f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]" if ci and len(ci) == 2 else NA


def headline_cells(comp: Comparison | None, *, with_ci: bool = True) -> list[str]:
    """The five headline metrics of one comparison, formatted; mean KL carries its CI."""
    out = []
    for i, (_, keys) in enumerate(HEADLINE):
        if comp is None:
            out.append(NA)
            continue
        key, val = lookup(comp.aggregate, keys)
        cell = fmt_metric(key, val)
        if i == 0 and val is not None and with_ci and kl_ci(comp) != NA:
            cell += f" {kl_ci(comp)}"
        out.append(cell)
    return out


# what failed_text counts (runner.failed_prompts): prompts lost on either side, in any phase
FAILED_HEADER = "failed prompts"


def failed_text(t: TargetResult) -> str:
    return f"{t.failed_requests}/{t.total_requests}" if t.total_requests else str(t.failed_requests)


def verdict_text(t: TargetResult) -> tuple[str, str]:
    """(verdict label, meets-expectation) for a target; no verdict reads as such, not as PASS."""
    if t.verdict is None:
        return "NO VERDICT", "NO"
    if t.verdict.meets_expectation:
        return t.verdict.label, "yes"
    return t.verdict.label, "undecided" if t.verdict.label == "INCONCLUSIVE" else "NO"


def reasons(t: TargetResult) -> list[str]:
    """Why a target is not PASS, in words (difftest.report.words): value vs limit, and where the
    limit came from."""
    return reasons_in_words(t)


def localisation_line(t: TargetResult) -> str | None:
    """The verdict's localisation, else the sentence of the first LayerDiff that localised; none for
    a PASS: its first divergent layer stayed within the bounds it was judged by, and every renderer
    (terminal, markdown, HTML, junit) reads this one rule so that none shows it as a finding."""
    if t.verdict is not None and t.verdict.passed:
        return None
    if t.verdict is not None and t.verdict.localisation:
        return t.verdict.localisation
    return whitebox_localisation_line(t.layers)


PASSED_LAYERS_NOTE = " (within the bounds the target passed: per-layer data, not a finding)"


def layer_summary(t: TargetResult, d: LayerDiff) -> str:
    """A layer diff's sentence in the per-layer detail; beside a PASS it says it found nothing the
    verdict counts, since "first divergent layer 9" alone reads as a fault."""
    if not d.summary:
        return NA
    passed = t.verdict is not None and t.verdict.passed
    return d.summary + (PASSED_LAYERS_NOTE if passed and whitebox_localisation_line([d]) else "")


def prompt_order(prompts: Iterable[PromptDiff]) -> list[PromptDiff]:
    """Worst first: failed requests, then by teacher-forced KL, token match, first divergence."""

    def key(p: PromptDiff) -> tuple[int, float, float, float]:
        kl = p.kl_mean if p.kl_mean is not None and not math.isnan(p.kl_mean) else -1.0
        mr = p.match_rate if p.match_rate is not None else 2.0
        fd = p.first_divergence if p.first_divergence is not None else math.inf
        return (p.error is None, -kl, mr, fd)

    return sorted(prompts, key=key)


def divergence_text(p: PromptDiff) -> str:
    if p.first_divergence is not None:
        return f"{p.first_divergence} {p.divergence_kind or ''}".strip()
    if p.exact or (p.match_rate is not None and p.tgt_tokens):
        return "none"
    return NA


def visible(text: str) -> str:
    """Newlines, tabs and control characters made visible (they would break a table row)."""
    text = text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥")
    return safe(text)


# `_` only where it could open emphasis: GFM leaves intraword underscores (down_proj) alone.
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~]|(?<!\w)_|_(?!\w))")
_ENTITY = re.compile(r"&(?=#?\w+;)")


def md_cell(text: Any, limit: int | None = None) -> str:
    """Untrusted text as one markdown table cell: visible, truncated, then escaped."""
    s = visible("" if text is None else str(text))
    if limit is not None:
        s = truncate(s, limit)
    return _ENTITY.sub("&amp;", _MD_SPECIAL.sub(r"\\\1", s))


def md_code(text: Any, *, cell: bool = False) -> str:
    """A name as an inline code span: nothing inside is interpreted, so only backticks go. In a
    table `cell`, GFM splits at a pipe even inside a code span: it is escaped there (`\\|`)."""
    code = "`" + visible(str(text)).replace("`", "'") + "`"
    return code.replace("|", "\\|") if cell else code


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Cells must already be escaped (md_cell) or be trusted literals."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(r) + " |" for r in rows)
    return lines


# ----------------------------------------------------------------------------- sections


VERDICT_HEADER = ["target", "scheme", "expect", "verdict", "meets expectation", "against"]


def verdict_row_parts(run: RunResult) -> Iterator[tuple[TargetResult, str, str, int, Comparison | None]]:
    """(target, verdict label, meets expectation, index, comparison): one per target and
    comparison (one with None where a target has none); both report formats render these."""
    for t in run.targets:
        label, meets = verdict_text(t)
        for i, c in enumerate(list(t.comparisons) or [None]):
            yield t, label, meets, i, c


def verdict_rows(run: RunResult) -> list[list[str]]:
    """One row per target and comparison; the target's own columns only on its first row."""
    rows = []
    for t, label, meets, i, c in verdict_row_parts(run):
        own = (
            [md_cell(t.name), md_cell(t.scheme or NA), t.expect, f"**{label}**", meets]
            if i == 0
            else [""] * 5
        )
        against = f"{c.kind} vs {md_code(c.baseline, cell=True)}" if c else NA
        rows.append(own + [against] + headline_cells(c) + [failed_text(t) if i == 0 else ""])
    return rows


def _verdict_table(run: RunResult) -> list[str]:
    header = [*VERDICT_HEADER, *(h for h, _ in HEADLINE), FAILED_HEADER]
    gate = gate_of(run)
    out = [f"**Gate: {gate} — {GATE_WORDS.get(gate, '')}**", ""]
    out += [f"- infrastructure: {w}" for w in run.infrastructure] + ([""] if run.infrastructure else [])
    return out + md_table(header, verdict_rows(run))


def _aggregate_table(c: Comparison) -> list[str]:
    title = "Exactness vs golden" if c.kind == "exactness" else "Accuracy vs reference"
    out = [f"#### {title} {md_code(c.baseline)} ({len(c.prompts)} prompts)", ""]
    if c.aggregate:
        rows = []
        for k, v in c.aggregate.items():
            ci = c.ci.get(k)
            ci_s = f"[{fmt_metric(k, ci[0])}, {fmt_metric(k, ci[1])}]" if ci and len(ci) == 2 else NA
            rows.append([md_cell(k), fmt_metric(k, v), ci_s])
        out += md_table(["metric", "value", "95% CI"], rows)
    else:
        out.append("_no aggregate metrics (n/a)_")
    if c.warnings:
        out += ["", *[f"- ⚠ {md_cell(w)}" for w in c.warnings]]
    return out


def _prompt_table(c: Comparison) -> list[str]:
    ordered = prompt_order(c.prompts)
    rows = []
    for p in ordered[:MAX_PROMPT_ROWS]:
        rows.append(
            [
                md_cell(p.prompt_id, 24),
                md_cell(p.prompt, 40),
                fmt_num(p.match_rate, pct=True),
                divergence_text(p),
                fmt_num(p.kl_mean),
                fmt_num(p.top1_agreement, pct=True),
                md_cell(p.ref_text, 40) if p.ref_text is not None else NA,
                md_cell(p.tgt_text, 40) if p.tgt_text is not None else NA,
                md_cell(p.error, 60) if p.error else "",
            ]
        )
    header = [
        "id",
        "prompt",
        "token match",
        "first divergence",
        "KL",
        "top-1",
        "reference",
        "target",
        "error",
    ]
    out = [f"Prompts vs {md_code(c.baseline)}, worst first:", "", *md_table(header, rows)]
    if len(ordered) > MAX_PROMPT_ROWS:
        out.append(f"\n_{len(ordered) - MAX_PROMPT_ROWS} more prompts in report.html and report.json_")
    return out


def _audit_table(audit: list[dict[str, Any]]) -> list[str]:
    """In words: shapes as `5 × 12`, booleans yes / no, nested values flat (never JSON)."""
    keys: list[str] = []
    for row in audit:
        keys.extend(k for k in row if k not in keys)
    rows = [[md_cell(shape_words(k, row[k]) if k in row else NA, 60) for k in keys] for row in audit]
    return md_table([md_cell(k.replace("_", " ")) for k in keys], rows)


def _tag_table(t: TargetResult) -> list[str]:
    """Per prompt tag (the prompt files' `tags`): prompts, diverged, mean KL and top-1 per part."""
    comps = [c for c in t.comparisons if any(p.tags for p in c.prompts)]
    if not comps:
        return []
    header = ["tag", "prompts"]
    per: dict[str, dict[str, TagRow]] = {}
    for c in comps:
        header += [f"{c.kind}: diverged", f"{c.kind}: mean KL", f"{c.kind}: top-1"]
        for r in tag_rows(c.prompts):
            per.setdefault(r.tag, {})[c.kind] = r
    rows = []
    for tag, by_kind in per.items():
        row = [md_cell(tag), str(next(iter(by_kind.values())).n)]
        for c in comps:
            r = by_kind.get(c.kind)
            ok = r.n - r.failed if r else 0
            row += (
                [f"{r.diverged}/{ok}" if ok else NA, fmt_num(r.kl_mean), fmt_num(r.top1, pct=True)]
                if r
                else [NA] * 3
            )
        rows.append(row)
    return ["#### By prompt tag", "", *md_table(header, rows), ""]


def _target_section(t: TargetResult) -> list[str]:
    label, meets = verdict_text(t)
    out = [f"### {md_cell(t.name)} — {label} (expect {t.expect}, meets expectation: {meets})", ""]
    loc = localisation_line(t)
    if loc:
        out += [f"> **Localisation:** {md_cell(loc)}", ""]
    rs = reasons(t)
    if rs:
        out += ["Reasons:", *[f"- {md_cell(r)}" for r in rs], ""]
    if t.verdict is not None and t.verdict.warnings:
        out += [*[f"- ⚠ {md_cell(w)}" for w in t.verdict.warnings], ""]
    meta = [f"scheme {md_code(t.scheme or NA)}", f"golden {md_code(t.golden or 'none')}"]
    meta.append(f"{FAILED_HEADER} {failed_text(t)}")
    out += [", ".join(meta), ""]
    if t.golden is None:
        out += ["_No golden: judged on the accuracy budget alone; subtle bugs may hide inside it._", ""]
    for c in t.comparisons:
        out += [*_aggregate_table(c), "", *_prompt_table(c), ""]
    for d in t.layers:
        if d.summary or d.warnings:
            out.append(f"Layers vs {md_code(d.against)} ({d.kind}): {md_cell(layer_summary(t, d))}")
            out += [f"- ⚠ {md_cell(w)}" for w in d.warnings]
            out.append("")
    out += _tag_table(t)
    if t.audit:
        out += ["#### Quantization audit", "", *_audit_table(t.audit), ""]
    if t.invariance:
        out += ["#### Batch-slot invariance", "", *_invariance_tables(t.invariance), ""]
    return out


def _invariance_tables(inv: dict[str, Any]) -> list[str]:
    """The batch-slot check as two small tables: its settings and totals, then one row per
    placement (one comma-separated line of ~3,000 characters before, raw keys and all)."""
    slots = inv.get("slots")
    slots = slots if isinstance(slots, list) and slots and all(isinstance(x, dict) for x in slots) else []
    rest = {k.replace("_", " "): v for k, v in inv.items() if not (k == "slots" and slots)}
    out = md_table(["setting", "value"], [[md_cell(k), md_cell(v, 120)] for k, v in kv_rows(rest)])
    if slots:
        keys = list(dict.fromkeys(k for s in slots for k in s))
        header = [k.replace("_", " ") for k in keys]
        rows = [[md_cell(value_words(s.get(k))) for k in keys] for s in slots]
        out += ["", *md_table(header, rows)]
    return out


def _null_section(run: RunResult) -> list[str]:
    """Where the exactness limits came from, as report.html's "Null model" says: the null the
    signature names, each rounding twin against its golden, then the floor file if one was used
    (the twin's limits read "no noise floor used: limits fall back to defaults" before)."""
    out = ["## Null model (where exactness limits come from)", ""]
    said = run.signature.get("null") if isinstance(run.signature, dict) else None
    if said:
        out += [f"Null model: {md_cell(value_words(said))}", ""]
    if run.nulls:
        header = ["golden", "null (twin)", "prompts", *(h for h, _ in HEADLINE), "module noise"]
        rows = [
            [md_code(c.baseline, cell=True), md_code(c.target, cell=True), str(len(c.prompts))]
            + headline_cells(c)
            + [fmt_num(c.module_noise)]
            for c in run.nulls
        ]
        out += [*md_table(header, rows), ""]
        out += [
            "Limits are the null's upper 95% bound times the margin, never under an absolute minimum.",
            "",
        ]
    out += ["### Noise floor", ""]
    if run.noise_floor:
        out += md_table(
            ["metric", "value"], [[md_cell(k), md_cell(v, 120)] for k, v in kv_rows(run.noise_floor)]
        )
    elif run.nulls:
        out.append("_no noise floor file (n/a): the limits come from the rounding twin above_")
    else:
        out.append("_no noise floor (n/a): exactness limits are the absolute minimums_")
    return out


def render_markdown(run: RunResult) -> str:
    out = ["# difftest report", "", f"Reference: {md_code(run.reference)}", ""]
    out += [*_verdict_table(run), ""]
    out += [f"- ⚠ {md_cell(w)}" for w in run.warnings]
    out += ["", "## Targets", ""]
    for t in run.targets:
        out += _target_section(t)
    grid = layer_grid(run)
    out += ["## Per-layer error (log10(1 − cosine))", ""]
    out += ["```text", text_heatmap(grid), "```", ""] if grid else ["_no white-box layer data (n/a)_", ""]
    out += ["## Signature", ""]
    sig = kv_rows(run.signature) + [("started_at", run.started_at), ("elapsed_s", fmt_num(run.elapsed_s))]
    sig.append(("schema_version", str(run.schema_version)))
    out += md_table(["setting", "value"], [[md_cell(k), md_cell(v, 120)] for k, v in sig])
    out += ["", *_null_section(run)]
    return "\n".join(out) + "\n"
