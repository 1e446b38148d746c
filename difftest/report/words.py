"""Checks in words: "exactness: mean KL 0.1994 > limit 0.005 (limit: noise floor 0.0011 x3)".

The verdict's `Check` carries a metric key, a value, a limit, an operator, a note that says where
the limit came from, whether it is informative (a broken target would not pass it too) and
decided (its 95% interval does not straddle the limit); people read "mean KL", "top-1 agreement
85.7%", "at model.layers.3.mlp.down_proj", "95% CI [0.03, 0.07] straddles the limit" (or "range of
the 3 prompts [0.03, 0.07]", where the verdict judged on that: its note says "interval: ..."). This module
turns one into the other for every renderer. Fields are read with `getattr` defaults so that a
report.json from before they existed still renders.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from difftest.results import (
    BLEU_ORDERS,
    INTERVAL_PIECE,
    SKIPPED_CHECKS,
    SKIPPED_NOTE,
    Check,
    PartVerdict,
    RunResult,
    TargetResult,
    fmt_apart,
)

# check key -> words; a key not listed is shown with underscores as spaces
METRIC_NAMES = {
    "kl_mean": "mean KL",
    "kl_p99": "p99 KL",
    "kl_max": "max KL",
    "top1_agreement": "top-1 agreement",
    "token_match": "token match",
    # one label per metric, rates named as rates: a count and its rate side by side in
    # `difftest diff --all` read as the same number twice
    "failed_requests": "failed requests",
    "failed_rate": "failed-request rate",
    "broken_answers": "impossible answers",
    "broken_rate": "impossible-answer rate",
    "garbled_rate": "garbled-prompt rate",
    "bleu": "BLEU",
    "chrf": "chrF",
    "local_rel_err_max": "worst module-local relative error",
    "point_rel_err_max": "worst accumulated relative error",
    "local_cosine_min": "worst module-local cosine",
    "local_norm_ratio_min": "smallest module norm ratio",
    "local_norm_ratio_max": "largest module norm ratio",
    "local_err_vs_siblings_max": "module error vs its siblings' median",
    "replays_unjudged": "modules whose replay failed",
    "slot_logprob_max_diff": "batch-slot logprob difference",
    "placement_logprob_max_diff": "batched-vs-alone logprob difference",
    "slot_token_mismatches": "batch-slot token flips",
    # aggregates that no check judges (`difftest diff` lists them)
    "kl_lower_mean": "mean KL, lower bound",
    "kl_upper_mean": "mean KL, upper bound",
    "dp_mean": "mean p(ref token) gap",
    "dp_rms": "rms p(ref token) gap",
    "exact_match": "identical-continuation rate",
    "median_first_divergence": "median 1st divergence",
    "tie": "1st divergences: TIE",
    "drift": "1st divergences: DRIFT",
    "wrong": "1st divergences: WRONG",
    "length": "1st divergences: LENGTH",
    "n_prompts": "prompts",
    "tf_prompts": "teacher-forced prompts",
    "bleu_order": "BLEU n-gram order",
}
_RATES = ("top1_agreement", "token_match", "failed_rate", "broken_rate", "garbled_rate", "exact_match")
# the point a white-box check names: a dotted module name (no spaces), or the logits
_MODULE = re.compile(r"^(?:logits|[\w.\[\]-]+\.[\w.\[\]-]+)$")


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key, key.replace("_", " "))


def fmt_value(key: str, x: float | None, digits: int = 4) -> str:
    """A check's value or limit: rates as percentages (one decimal at 4 digits), others 4
    significant digits (`digits`)."""
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if key in _RATES:
        return f"{100 * x:.{max(digits - 3, 1)}f}%"
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def fmt_value_and_limit(key: str, value: float | None, limit: float | None) -> tuple[str, str]:
    """Both as `fmt_value`, with more digits where they would read alike though they differ
    ("top-1 agreement 95.0% < limit 95.0%" for 0.9496 against 0.95)."""
    if value is None or limit is None:
        return fmt_value(key, value), fmt_value(key, limit)
    return fmt_apart(value, limit, lambda x, digits: fmt_value(key, x, digits))


def label_of(t: TargetResult) -> str:
    """PASS, FAIL, INCONCLUSIVE (when the model grows it) or NO VERDICT."""
    return "NO VERDICT" if t.verdict is None else str(t.verdict.label)


def is_informative(c: Check) -> bool:
    return bool(getattr(c, "informative", True))


def check_fails(c: Check) -> bool:
    """Counts against the target: informative, decided and on the wrong side."""
    return bool(getattr(c, "fails", not c.passed))


def check_undecided(c: Check) -> bool:
    return bool(getattr(c, "undecided", False))


NOT_INFORMATIVE = "a broken target would pass this limit too"


@dataclass(frozen=True)
class CheckWords:
    """One check, ready to print: every field plain text."""

    part: str
    against: str
    metric: str  # "mean KL"
    value: str  # "0.1994"
    relation: str  # ">" when failing a "<=" check, else the check's own operator
    limit: str  # "0.005"
    source: str  # where the limit came from
    where: str  # module the check points at, "" if none
    passed: bool
    required: bool
    informative: bool
    why_not_informative: str
    measured: bool
    fails: bool = False  # counts against the target (informative, decided, wrong side)
    undecided: bool = False  # informative, but the 95% interval straddles the limit (or prompts were lost)
    straddles: bool = False  # the interval's ends judge differently (Check.straddles)
    ci: str = ""  # "[0.03, 0.07]" when the check has one
    interval: str = "95% CI"  # what `ci` is: "range of the 3 prompts" under the verdict's MIN_PROMPTS_FOR_CI
    prompts_to_decide: int | None = None

    @property
    def outcome(self) -> str:
        """FAIL, not informative, undecided or pass: what the check did to its verdict. FAIL
        first: a NaN on a not-informative check still fails, and must read so."""
        if self.fails:
            return "FAIL"
        if not self.informative:
            return "not informative"
        return "undecided" if self.undecided else "pass"

    def sentence(self) -> str:
        """'exactness: mean KL 0.1994 > limit 0.005 at X (limit: noise floor x3)'."""
        if not self.measured:
            core = f"{self.metric} not measured"
        elif self.undecided:
            core = f"{self.metric} {self.value} vs limit {self.limit}"
            if self.ci and self.straddles:  # else the note says why (prompts lost)
                core += f", {self.interval} {self.ci} straddles the limit"
            if self.prompts_to_decide:
                core += f" (~{self.prompts_to_decide} prompts would decide)"
        else:
            core = f"{self.metric} {self.value} {self.relation} limit {self.limit}"
        if self.where:
            core += f" at {self.where}"
        if self.source.startswith(SKIPPED_NOTE):  # a group not measured: no limit was applied
            core += f" ({self.source})"
        elif self.source:
            core += f" (limit: {self.source})"
        if not self.informative and self.measured:  # "not measured" says why already
            core += " — not informative" + (
                f": {self.why_not_informative}" if self.why_not_informative else ""
            )
        return f"{self.part}: {core}"


def check_words(part: PartVerdict, c: Check) -> CheckWords:
    source = str(getattr(c, "limit_source", "") or "")
    note = c.note or ""
    where = ""
    pieces = [p.strip() for p in note.split(";")]
    if pieces and _MODULE.match(pieces[0]):  # white-box checks: "module; where the limit came from"
        where, pieces = pieces[0], pieces[1:]
    rest = "; ".join(p for p in pieces if p and not p.startswith(INTERVAL_PIECE))
    if not source:
        source = rest
    elif rest and rest not in source:
        source = f"{source}; {rest}"
    if isinstance(c.value, float) and math.isnan(c.value):
        relation = "(NaN always fails) vs"  # never "NaN <= limit", which reads as a pass
    elif c.value is None or c.passed:
        relation = c.op
    else:
        relation = {"<=": ">", ">=": "<"}.get(c.op, "vs")
    value, limit = fmt_value_and_limit(c.name, c.value, c.limit)
    return CheckWords(
        part=part.part if not part.against or part.part != "layers" else f"layers vs {part.against}",
        against=part.against,
        metric=metric_name(c.name),
        value=value,
        relation=relation,
        limit=limit,
        source=source,
        where=where,
        passed=c.passed,
        required=c.required,
        informative=is_informative(c),
        why_not_informative=_why_not_informative(c, source),
        measured=c.value is not None,
        fails=check_fails(c),
        undecided=check_undecided(c),
        ci=_ci_text(c.name, getattr(c, "ci", None)),
        straddles=c.straddles,
        interval=c.interval_name,
        prompts_to_decide=getattr(c, "prompts_to_decide", None),
    )


def _why_not_informative(c: Check, source: str) -> str:
    """The reason, unless the limit's own note already gives it (the verdict writes it there)."""
    reason = str(getattr(c, "informative_reason", "") or NOT_INFORMATIVE)
    return "" if "broken target would pass" in source else reason


def _ci_text(key: str, ci: Any) -> str:
    if not ci or len(ci) != 2:
        return ""
    return f"[{fmt_value(key, ci[0])}, {fmt_value(key, ci[1])}]"


def all_checks(t: TargetResult) -> list[CheckWords]:
    if t.verdict is None:
        return []
    return [check_words(p, c) for p in t.verdict.parts for c in p.checks]


def failing_checks(t: TargetResult) -> list[CheckWords]:
    """The checks that decide a FAIL, required first; what a person should read first."""
    out = [w for w in all_checks(t) if w.fails]
    return sorted(out, key=lambda w: not w.required)


def open_checks(t: TargetResult) -> list[CheckWords]:
    """Informative checks this sample could not decide: why a verdict is INCONCLUSIVE."""
    return [w for w in all_checks(t) if w.undecided]


def skipped_parts(t: TargetResult) -> list[str]:
    if t.verdict is None:
        return []
    return [f"{p.part}: skipped ({p.skipped})" for p in t.verdict.parts if p.skipped]


def skipped_check_groups(t: TargetResult) -> list[str]:
    """The verdict's warnings that checks measured less than they are named for: a group not
    measured (no echo: no KL, no top-1), or BLEU on fewer n-gram orders than BLEU-4 (every
    continuation shorter than 4 tokens). A PASS does not show either by itself: the summary
    table's n/a or BLEU value is easy to read past."""
    if t.verdict is None:
        return []
    return [
        w for w in t.verdict.warnings if SKIPPED_CHECKS in w or w.partition(": ")[2].startswith(BLEU_ORDERS)
    ]


def value_words(v: Any) -> str:
    """A free-form value (audit cell, signature entry) for people: no JSON, no Python reprs.

    Lists of numbers read "5 × 12" when they are shapes (`*_shape`), else comma-separated;
    dicts read "key value, key value"; paths are their string; booleans yes / no.
    """
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt_value("", v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, dict):
        if v and all(isinstance(x, dict) for x in v.values()):  # e.g. per backend: "torch: ...; triton: ..."
            return "; ".join(f"{k}: {value_words(x)}" for k, x in v.items())
        return ", ".join(f"{str(k).replace('_', ' ')} {value_words(x)}" for k, x in v.items()) or "—"
    if isinstance(v, list | tuple):
        return ", ".join(value_words(x) for x in v) or "—"
    return _clean_repr(str(v))


_PATH_REPR = re.compile(r"(?:Posix|Windows)?Path\('([^']*)'\)")


def _clean_repr(s: str) -> str:
    """`(PosixPath('a.jsonl'),)` -> `a.jsonl`: a tuple of paths stringified by a producer."""
    if "Path('" not in s:
        return s
    paths = _PATH_REPR.findall(s)
    return ", ".join(paths) if paths else s


def shape_words(key: str, v: Any) -> str:
    if (
        key.endswith(("shape", "stride"))
        and isinstance(v, list | tuple)
        and all(isinstance(x, int) for x in v)
    ):
        return " × ".join(str(x) for x in v)
    return value_words(v)


def kv_rows(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as dotted keys, values in words (no JSON, no Python reprs)."""
    if isinstance(d, dict) and d:
        out: list[tuple[str, str]] = []
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.extend(kv_rows(v, key))
            else:
                out.append((key, shape_words(str(k), v)))
        return out
    return [(prefix, value_words(d))]


def reasons_in_words(t: TargetResult) -> list[str]:
    """Why a target is not PASS: failing checks as sentences, then skipped parts."""
    if t.verdict is None:
        return ["no verdict: the target did not produce results"]
    out = [w.sentence() for w in failing_checks(t)]
    out += [f"undecided: {w.sentence()}" for w in open_checks(t)]
    out += skipped_parts(t)
    checks = [c for p in t.verdict.parts for c in p.checks]
    if not checks:
        out.append("no check could be made (every part skipped)")
    elif not t.verdict.numbers_inform:
        out.append("no informative check could be made: every limit would pass a broken target too")
    return out


GATE_WORDS = {
    "PASS": "every target as expected",
    "FAIL": "a target is not as expected",
    "INCONCLUSIVE": "no target contradicts its expectation, but a verdict is undecided (exit 4)",
    "INFRASTRUCTURE": "a server or its requests failed: the verdicts rest on incomplete answers (exit 3)",
}


def gate_of(run: RunResult) -> str:
    """INFRASTRUCTURE (exit 3), else PASS / FAIL / INCONCLUSIVE (RunResult.gate), or PASS / FAIL
    from an older model."""
    if getattr(run, "infrastructure", None):
        return "INFRASTRUCTURE"
    gate = getattr(run, "gate", None)
    if isinstance(gate, str):
        return gate
    return "PASS" if run.gate_passed else "FAIL"


def expectation_words(t: TargetResult) -> tuple[str, bool]:
    """("expected FAIL: as expected", True) / ("expected PASS, got FAIL: NOT as expected", False)."""
    if t.verdict is None:
        return "no verdict", False
    label = label_of(t)
    if t.verdict.meets_expectation:
        return f"expected {t.expect.upper()}: as expected", True
    if label == "INCONCLUSIVE":
        return f"expected {t.expect.upper()}, got INCONCLUSIVE: undecided", False
    return f"expected {t.expect.upper()}, got {label}: NOT as expected", False
