"""What the terminal shows: the closing summary of a run, and `difftest compare --prompt`'s view.

rich decides about colour: a Console writing to a pipe or a CI log (force_terminal=None) prints no
escape codes, so everything that colour conveys is also written as text (verdict words, a `^`
marker line under the first divergence).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from difftest.report.markdown import (
    FAILED_HEADER,
    NA,
    failed_text,
    headline_cells,
    kl_ci,
    localisation_line,
    reasons,
    verdict_text,
    visible,
)
from difftest.report.words import GATE_WORDS, expectation_words, gate_of, skipped_check_groups
from difftest.results import RunResult

_STYLE = {"PASS": "bold green", "FAIL": "bold red", "INCONCLUSIVE": "bold yellow", "NO VERDICT": "bold red"}
_GATE_STYLE = {"PASS": "bold green", "INCONCLUSIVE": "bold yellow"}


def render_summary(run: RunResult, console: Console, *, report_dir: Path | None = None) -> None:
    """The closing block: per target and comparison the headline metrics, verdict and reasons."""
    table = Table(title="difftest summary", show_lines=False)
    table.add_column("target", overflow="fold")
    # numbers never wrap mid-figure ("1.000e-0 / 4"): the target name column gives way instead
    for col in ("part", "mean KL", "95% CI", "p99 KL", "top-1", "token match", "median 1st div"):
        table.add_column(col, no_wrap=True)
    for col in (FAILED_HEADER, "verdict", "as expected"):
        table.add_column(col, no_wrap=True)
    for t in run.targets:
        label, meets = verdict_text(t)
        comps = list(t.comparisons) or [None]
        for i, c in enumerate(comps):
            first = i == 0
            table.add_row(
                Text(t.name) if first else Text(""),
                Text(c.kind) if c else Text(NA),
                *[Text(x) for x in headline_cells(c, with_ci=False)[:1]],
                Text(kl_ci(c)),
                *[Text(x) for x in headline_cells(c)[1:]],
                Text(failed_text(t)) if first else Text(""),
                Text(label, style=_STYLE.get(label, "")) if first else Text(""),
                Text(meets, style={"yes": "", "undecided": "bold yellow"}.get(meets, "bold red"))
                if first
                else Text(""),
            )
    console.print(table)
    for t in run.targets:
        label, meets = verdict_text(t)
        head = Text(f"{t.name}: ")
        head.append(label, style=_STYLE.get(label, ""))
        head.append(f" ({expectation_words(t)[0]})")
        console.print(head)
        for c in t.comparisons:
            console.print(Text(f"  {c.kind} vs {c.baseline}: {len(c.prompts)} prompts"))
            for w in c.warnings:  # what the pair is not (other text over the same ids, input counts)
                console.print(Text(f"    warning: {w}", style="yellow"))
        loc = localisation_line(t)
        if loc:
            console.print(Text(f"  localisation: {loc}", style="yellow"))
        for r in reasons(t):
            console.print(Text(f"  - {r}"))
        for w in skipped_check_groups(t):
            console.print(Text(f"  - {w}", style="yellow"))
    for w in run.warnings:
        console.print(Text(f"warning: {w}", style="yellow"))
    gate = gate_of(run)
    console.print(Text(f"gate {gate}: {GATE_WORDS.get(gate, '')}", style=_GATE_STYLE.get(gate, "bold red")))
    if report_dir is not None:
        console.print(Text(f"report: {report_dir}"))


def _tok(s: str) -> str:
    return visible(s) if s else "∅"


def render_side_by_side(
    ref_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    first_divergence: int | None,
    ref_alts: dict[str, float] | None,
    tgt_alts: dict[str, float] | None,
    console: Console,
    *,
    ref_label: str = "ref",
    tgt_label: str = "target",
) -> None:
    """Both continuations, token columns aligned (CJK-width aware), wrapped to the console width.

    Tokens before the divergence are dim, the divergent pair reversed, later ones yellow; a `^`
    line marks the divergence for plain output. Below: both sides' top alternatives there.
    """
    n = max(len(ref_tokens), len(tgt_tokens))
    lab_w = max(cell_len(ref_label), cell_len(tgt_label)) + 2
    width = max(20, console.width - lab_w)
    chunks: list[list[tuple[int, str, str, int]]] = [[]]
    used = 0
    for i in range(n):
        r = _tok(ref_tokens[i]) if i < len(ref_tokens) else "∅"
        t = _tok(tgt_tokens[i]) if i < len(tgt_tokens) else "∅"
        w = max(cell_len(r), cell_len(t)) + 1  # one separating space
        if used + w > width and chunks[-1]:
            chunks.append([])
            used = 0
        chunks[-1].append((i, r, t, w))
        used += w
    for chunk in chunks:
        lines = [Text(ref_label.ljust(lab_w)), Text(tgt_label.ljust(lab_w))]
        marker = Text(" " * lab_w)
        for i, r, t, w in chunk:
            if first_divergence is None or i < first_divergence:
                style = "dim"
            elif i == first_divergence:
                style = "reverse bold red"
            else:
                style = "yellow"
            for line, s in ((lines[0], r), (lines[1], t)):
                line.append(s, style=style)
                line.append(" " * (w - cell_len(s)))
            marker.append(("^" * (w - 1) + " ") if i == first_divergence else " " * w)
        for line in lines:
            console.print(line, overflow="ignore", no_wrap=True, crop=False)
        if any(i == first_divergence for i, *_ in chunk):
            console.print(marker, no_wrap=True, crop=False)
        console.print()
    if first_divergence is None:
        same = len(ref_tokens) == len(tgt_tokens)
        console.print(
            "identical continuations" if same else "no divergence in the common prefix; lengths differ"
        )
        return
    console.print(Text(f"first divergence at token {first_divergence}", style="bold"))
    alts = Table(show_header=True)
    alts.add_column("#")
    alts.add_column(f"{ref_label} token")
    alts.add_column("logprob", justify="right")
    alts.add_column(f"{tgt_label} token")
    alts.add_column("logprob", justify="right")
    ra = sorted((ref_alts or {}).items(), key=lambda kv: -kv[1])
    ta = sorted((tgt_alts or {}).items(), key=lambda kv: -kv[1])
    for k in range(max(len(ra), len(ta))):
        row = [Text(str(k + 1))]
        for side in (ra, ta):
            if k < len(side):
                row += [Text(repr(side[k][0])), Text(f"{side[k][1]:.3f}")]
            else:
                row += [Text(""), Text("")]
        alts.add_row(*row)
    if ra or ta:
        console.print(alts)
    else:
        console.print("top alternatives: n/a (no logprobs)")
