"""The prompt explorer's data: every prompt of every comparison as compact JSON, worst first.

report.html must stay usable at 20 000 prompts x several targets, so prompts are not HTML: they
are rows of a JSON block that a small inline script filters, searches and renders a page at a
time (the DOM holds one page, whatever the run's size). Per comparison, every prompt has an index
row (a few numbers: enough to sort, filter and search); the worst `detail_budget` prompts per
comparison also carry their token detail (aligned diff, per-position KL, alternatives at the
divergence as text). Prompt texts and tags are stored once per run, not once per comparison.

Row layout (arrays, not objects: 20 000 x targets x parts rows):
    [prompt index, flags, mean KL, token match, first divergence, kind, top-1, detail index]
flags: 1 failed request, 2 diverged, 4 garbled (difftest.report.tokendiff.garbled: garbled_rate's rule).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from difftest.metrics.aggregate import gc_paused  # the same reason: millions of acyclic objects
from difftest.report.markdown import prompt_order
from difftest.report.plotdata import part_for, part_status
from difftest.report.tokendiff import Vocab, alternatives, chosen_labels, garbled, prompt_alignment
from difftest.report.words import label_of
from difftest.results import Comparison, PromptDiff, RunResult

DATA_VERSION = 1
DETAIL_BUDGET = 3000  # prompt details embedded per run, shared among comparisons (worst first)
MIN_DETAILS = 50  # ...but at least this many per comparison
INDEX_TEXT = 240  # characters of a prompt kept for display and search in the index
DETAIL_TEXT = 4000  # characters of a prompt shown in full in a detail
_OPS = {"equal": 0, "replace": 1, "delete": 2, "insert": 3}
_KINDS = {"WRONG": "W", "DRIFT": "D", "TIE": "T", "LENGTH": "L"}


def num(x: float | None, digits: int = 3) -> float | str | None:
    """A compact JSON number: 3 significant digits; NaN / inf as strings, None as null."""
    if x is None:
        return None
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return 0
    v = float(f"{x:.{digits}g}")
    return int(v) if v.is_integer() and abs(v) < 1e15 else v


def _flags(p: PromptDiff) -> int:
    f = 1 if p.error is not None else 0
    if p.first_divergence is not None or (p.exact is False):
        f |= 2
    if garbled(p):
        f |= 4
    return f


def _empty_token_ids(p: PromptDiff) -> dict[str, dict[int, int]]:
    """The ids of tokens with no text of their own (byte pieces, special tokens), by position:
    ri / ti. The aligned diff draws them all as ∅; their ids tell two of them apart. Sparse, so
    a report does not carry every token's id."""
    out: dict[str, dict[int, int]] = {}
    for key, tokens, ids in (("ri", p.ref_tokens, p.ref_token_ids), ("ti", p.tgt_tokens, p.tgt_token_ids)):
        if ids and len(ids) == len(tokens):
            found = {i: tok_id for i, (tok, tok_id) in enumerate(zip(tokens, ids, strict=True)) if tok == ""}
            if found:
                out[key] = found
    return out


def _detail(p: PromptDiff, vocab: Vocab) -> dict[str, Any]:
    d: dict[str, Any] = {"r": p.ref_tokens, "t": p.tgt_tokens}
    if p.ref_tokens or p.tgt_tokens:
        d["o"] = [[_OPS[tag], i1, i2, j1, j2] for tag, i1, i2, j1, j2 in prompt_alignment(p)]
    if p.position_kl:
        d["k"] = [num(v, 2) for v in p.position_kl]
    for side, key in (("ref", "ra"), ("tgt", "ta")):
        alts = alternatives(p, side, vocab)
        if alts:
            d[key] = [[text, num(lp, 3), 1 if known else 0] for text, lp, known in alts]
    d.update(chosen_labels(p))
    d.update(_empty_token_ids(p))
    if p.error:
        d["e"] = p.error
    if len(p.prompt) > INDEX_TEXT:
        d["p"] = p.prompt[:DETAIL_TEXT]
    if p.ref_text is not None and not p.ref_tokens:
        d["rt"] = p.ref_text
    if p.tgt_text is not None and not p.tgt_tokens:
        d["tt"] = p.tgt_text
    extra = {"b": p.bleu, "c": p.chrf, "lo": p.kl_lower, "hi": p.kl_upper}
    d.update({k: num(v) for k, v in extra.items() if v is not None})
    return d


class _Prompts:
    """Prompt texts and tags stored once; comparisons refer to them by index."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.rows: list[list[Any]] = []
        self.tags: dict[str, int] = {}

    def add(self, p: PromptDiff) -> int:
        key = (p.prompt_id, p.prompt)
        k = self.index.get(key)
        if k is None:
            tags = [self.tags.setdefault(t, len(self.tags)) for t in (getattr(p, "tags", None) or [])]
            k = self.index[key] = len(self.rows)
            self.rows.append([p.prompt_id, p.prompt[:INDEX_TEXT], tags])
        return k


def _comparison(
    t_index: int, label: str, c: Comparison, status: str | None, prompts: _Prompts, vocab: Vocab, budget: int
) -> dict[str, Any]:
    rows, details = [], []
    for rank, p in enumerate(prompt_order(c.prompts)):
        di = -1
        if rank < budget:
            di = len(details)
            details.append(_detail(p, vocab))
        rows.append(
            [
                prompts.add(p),
                _flags(p),
                num(p.kl_mean),
                num(p.match_rate),
                p.first_divergence,
                _KINDS.get(p.divergence_kind or "", p.divergence_kind or ""),
                num(p.top1_agreement),
                di,
            ]
        )
    return {
        "t": t_index,
        "target": label,
        "kind": c.kind,
        "baseline": c.baseline,
        "status": status,
        "n": len(rows),
        "rows": rows,
        "details": details,
    }


def explorer_data(run: RunResult, detail_budget: int = DETAIL_BUDGET) -> dict[str, Any]:
    with gc_paused():
        return _explorer_data(run, detail_budget)


def _explorer_data(run: RunResult, detail_budget: int) -> dict[str, Any]:
    comps = [(i, t, c) for i, t in enumerate(run.targets) for c in t.comparisons]
    per = max(MIN_DETAILS, detail_budget // max(1, len(comps)))
    vocab = Vocab.from_prompts(p for _, _, c in comps for p in c.prompts)
    prompts = _Prompts()
    out = []
    for i, t, c in comps:
        status = part_status(part_for(t, c.kind, c.baseline))
        out.append(_comparison(i, t.name, c, status, prompts, vocab, per))
    return {
        "v": DATA_VERSION,
        "targets": [{"name": t.name, "label": label_of(t)} for t in run.targets],
        "tags": list(prompts.tags),
        "prompts": prompts.rows,
        "cmps": out,
        "detail_per_comparison": per,
    }


def default_comparison(data: dict[str, Any], order: Sequence[int]) -> int:
    """The comparison the explorer opens on: the first failing (else undecided) one of the
    first target in `order` that has one."""
    cmps = data["cmps"]
    for status in ("FAIL", "INCONCLUSIVE"):
        for ti in order:
            for k, c in enumerate(cmps):
                if c["t"] == ti and c["status"] == status:
                    return k
    return 0


def script_json(data: dict[str, Any]) -> str:
    """JSON safe inside <script type="application/json">: `<` escaped, so no `</script>` breakout."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
