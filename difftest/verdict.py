"""PASS / FAIL per target, in two parts (docs/design.md "Two references" and "Verdicts and null models").

- exactness (target vs its golden: same model and scheme on the reference backend) — limits from
  the null model (difftest.null: the golden's rounding twin, a floor file, or absolute minimums):
  limit = max(null x margin, absolute minimum); a limit a broken target would pass is marked not
  informative. This is what catches bugs.
- accuracy (target vs the FP16 reference) — the scheme's loss against a per-scheme `Budget`.

Measure first, judge later: this module only reads stored per-prompt statistics and aggregates,
so `difftest report DIR --thresholds FILE` re-judges offline. A check whose 95% interval
straddles its limit (holds values on both sides; limits are inclusive, so an end at the limit is
on its passing side) is undecided; a verdict with an undecided (or no) informative check and no
decided failure is INCONCLUSIVE (exit 4).

Every Check's note says where its limit came from ("budget fp8-block", "twin 0.0011 x3",
"absolute minimum 0.005 (none: not measured)", "override [thresholds] accuracy.kl_mean"). Rules:
NaN always fails, informative or not; a metric that was not measured is a failing required check,
unless its whole group was skipped with a visible reason (`skipped={"teacher_forced": "no echo"}`),
which then shows as a non-required "not measured (skipped: ...)" check and a verdict warning. A
check resting on one prompt decides nothing, except broken_rate: an impossible answer is a
counted fact, not a draw with spread. Lost requests (`failed_rate`) leave a verdict open;
impossible answers (`broken_rate`: NaN, malformed logprobs) fail it; neither makes a PASS alone.
Overrides and budgets a broken target would pass are not informative (`_guarded`).

Default budgets (recalibrate on your model: `difftest noise` / calibration runs). Measured on
smollm2-135m vs fp32, 10 prompts x 24 tokens (docs/design.md "Calibration"):

| scheme | measured, correct: top-1 / KL | budget: top-1 >= / KL <= / token match >= |
|---|---|---|
| none | (dtype / accumulation order only) | 0.95 / 0.01 / 0.60 |
| fp8-tensor, fp8-token, fp8-block | fp8-block 91.6% / 0.023 | 0.80 / 0.08 / 0.05 |
| int8 | (8-bit like fp8) | 0.80 / 0.08 / 0.05 |
| int4-g128 | 67.9% / 0.44 | 0.55 / 0.90 / 0.02 |
| mxfp4 | 59.7% / 0.85 | 0.45 / 1.50 / 0.02 |

Each budget sits about 2x the measured KL and ~12 points of top-1 under the measurement: room
for prompt-to-prompt spread (10 prompts) without reaching a broken build — `scale-skipped` in one
module gives top-1 2% / KL 17, `garbage-gemm` in one module 77% / 0.155 (fails the fp8 budget).
Subtle bugs (`scale-transposed` 86.4% / 0.050, `fnuz-unnormalized` 85.4% / 0.056) pass the fp8
budget: against FP16 one subtle bug costs about what the scheme does, which is why exactness
exists. `none` is tight: its only differences are dtype and accumulation order, and fp8-block's
own loss (KL 0.023) is over twice its KL budget, so a secretly quantized "none" fails.
Token-match budgets are garbage guards: on a 135M model a single flipped token changes the whole
greedy continuation, so free-running match only guards against garbage when echo is unavailable.
They sit well under the measured values so that the 95% interval of 10 prompts decides them
(correct fp8-block: 29.6%, interval [0.12, 0.50] — a 0.15 guard left it undecided).
kl_p99 has no default budget until calibrated (a guess would either never fire or fire on
correct targets); set `kl_p99_max` in `[thresholds]` to check it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from difftest.errors import ConfigError, UsageError
from difftest.metrics.aggregate import broken_answers, lost_requests, refused_prompts
from difftest.metrics.logprobs import FULL_KL_DEPTH, KL_DEPTH_MIN
from difftest.metrics.text import MAX_ORDER
from difftest.metrics.tokens import is_garbled
from difftest.null import (
    MARGIN,
    NO_NULL,
    UNINFORMATIVE,
    UNINFORMATIVE_NOTE,
    Limit,
    NullModel,
    exactness_limits,
    informative,
    tie_margin,
)
from difftest.results import (
    BLEU_ORDERS,
    INTERVAL_PIECE,
    SKIPPED_CHECKS,
    SKIPPED_NOTE,
    Check,
    Comparison,
    PartVerdict,
    TargetVerdict,
    straddles,
    within,
)


@dataclass(frozen=True)
class Budget:
    """Accuracy limits of one scheme against the FP16 reference (None: not checked)."""

    scheme: str
    kl_mean_max: float
    top1_min: float
    token_match_min: float | None
    kl_p99_max: float | None = None
    # The client already retries; a request that still failed leaves a prompt unjudged (undecided).
    failed_rate_max: float = 0.0
    # an answer that cannot be right (NaN logprobs, a malformed block) is a target bug: it fails
    broken_rate_max: float = 0.0
    garbled_rate_max: float | None = None
    bleu_min: float | None = None


# 8-bit token match: correct builds measured 29.6% (fp8-block) and 50.4% (fp8-token) on smollm2,
# fp32 CPU, 10 smoke prompts x 24 tokens (top-1 90%): one flip rewrites a greedy continuation.
_FP8 = dict(kl_mean_max=0.08, top1_min=0.80, token_match_min=0.05)
DEFAULT_BUDGETS: dict[str, Budget] = {
    "none": Budget("none", kl_mean_max=0.01, top1_min=0.95, token_match_min=0.60),
    "fp8-tensor": Budget("fp8-tensor", **_FP8),
    "fp8-token": Budget("fp8-token", **_FP8),
    "fp8-block": Budget("fp8-block", **_FP8),
    "int8": Budget("int8", **_FP8),
    # 4-bit token match: correct builds measured 10% (int4-g128) and 6.7% (mxfp4) on smollm2 in
    # fp16 on an H100 (top-1 68.7% / 67.5%): one flip rewrites a 135M model's greedy continuation,
    # so this only guards against garbage; KL and top-1 do the judging.
    "int4-g128": Budget("int4-g128", kl_mean_max=0.90, top1_min=0.55, token_match_min=0.02),
    "mxfp4": Budget("mxfp4", kl_mean_max=1.50, top1_min=0.45, token_match_min=0.02),
}

# A budget on the wrong side of these would pass a target whose output no longer follows the model:
# against FP16, scale-skipped in one module costs smollm2 top-1 2% / KL 17 nats, and a target that
# answers uniformly at random costs KL ~ ln(vocab) - entropy, several nats. The widest default
# budget (mxfp4: KL 1.5, top-1 0.45) is well inside. Overrides past these are marked not informative.
ACCURACY_UNINFORMATIVE = {
    "kl_mean": ("<=", 3.0),
    "kl_p99": ("<=", 30.0),
    "top1_agreement": (">=", 0.05),
    "token_match": (">=", 0.01),  # 0 can never fail: token match is never negative
    # can never fail: a rate is never over 1, BLEU never under 0 (garbage-gemm and scale-skipped
    # measured garbled rate 1.0 and BLEU 0.0); broken_rate 1 is refused (_check_overrides)
    **{rate: ("<", 1.0) for rate in ("garbled_rate", "failed_rate", "broken_rate")},
    "bleu": (">", 0.0),
}

# check name -> (op, group)  (group is what `skipped` names)
_CHECKS = {
    "failed_rate": ("<=", "requests"),
    "broken_rate": ("<=", "requests"),
    "token_match": (">=", "tokens"),
    "garbled_rate": ("<=", "tokens"),
    "bleu": (">=", "text"),
    "kl_mean": ("<=", "teacher_forced"),
    "kl_p99": ("<=", "teacher_forced"),
    "top1_agreement": (">=", "teacher_forced"),
}
_BUDGET_FIELDS = {
    "failed_rate": "failed_rate_max",
    "broken_rate": "broken_rate_max",
    "token_match": "token_match_min",
    "garbled_rate": "garbled_rate_max",
    "bleu": "bleu_min",
    "kl_mean": "kl_mean_max",
    "kl_p99": "kl_p99_max",
    "top1_agreement": "top1_min",
}
_FIELD_CHECKS = {attr: name for name, attr in _BUDGET_FIELDS.items()}
# the exactness part takes these limits from the budget too (judge_target); the rest from the null
_BUDGET_EXACTNESS = ("failed_rate", "broken_rate")
THRESHOLD_KEYS = frozenset(
    {f.name for f in dataclasses.fields(Budget)} - {"scheme"}
    | {"margin", "tie_margin"}
    | {f"{part}.{name}" for part in ("exactness", "accuracy") for name in _CHECKS}
)
# Overrides that are rates: a limit over 1 (95 meaning 95%) could never fail or never pass
_FRACTIONS = ("failed_rate", "broken_rate", "token_match", "garbled_rate", "top1_agreement")
FRACTION_KEYS = frozenset(
    {_BUDGET_FIELDS[name] for name in _FRACTIONS}
    | {f"{part}.{name}" for part in ("exactness", "accuracy") for name in _FRACTIONS}
)

# A broken_rate limit of 1 passes a target whose every answer cannot be right (README: impossible
# answers FAIL): refused, not merely marked not informative
BROKEN_KEYS = frozenset({"broken_rate_max", "exactness.broken_rate", "accuracy.broken_rate"})
BROKEN_WHY = (
    "can never fail: it passes a target whose every answer is impossible (NaN or malformed logprobs); "
    "give a fraction under 1"
)


def threshold_checks(key: str) -> frozenset[str]:
    """The checks ("accuracy.top1_agreement") whose limit a [thresholds] key sets: a dotted key its
    own, a budget field its accuracy check and, for the request rates, the exactness one too; any
    other key (margin) itself. Keys sharing a check are two spellings of one limit, which
    config.thresholds_for ranks by table and config refuses to see disagree within one table."""
    name = _FIELD_CHECKS.get(key)
    if name is None:
        return frozenset({key})
    parts = ("exactness", "accuracy") if name in _BUDGET_EXACTNESS else ("accuracy",)
    return frozenset(f"{part}.{name}" for part in parts)


class Overrides(dict[str, float]):
    """One scheme's flat `[thresholds]` overrides (config.thresholds_for) that remember which table
    gave each key, so that a check's note names the table its limit came from: a scheme's own
    limit reading "override [thresholds]" sent users to the wrong table."""

    def __init__(self, values: Mapping[str, float] = {}, tables: Mapping[str, str] = {}) -> None:
        super().__init__(values)
        self.tables = dict(tables)


def _override_note(overrides: Mapping[str, float], key: str) -> str:
    """ "override [thresholds.fp8-block] top1_min": the table is "[thresholds]" unless `overrides`
    (an Overrides) says otherwise."""
    table = getattr(overrides, "tables", {}).get(key, "[thresholds]")
    return f"override {table} {key}"


def budget_for(scheme: str | None, overrides: Mapping[str, float] = {}) -> Budget:
    """The scheme's default budget with bare `[thresholds]` field overrides applied.

    No scheme (an external target that did not declare one) gets the tight "none" budget: the
    differ cannot guess how much loss a server is allowed.
    """
    _check_overrides(overrides)
    name = scheme or "none"
    if name not in DEFAULT_BUDGETS:
        raise ConfigError(f"unknown scheme {name!r} (known: {', '.join(DEFAULT_BUDGETS)})")
    fields = {f.name for f in dataclasses.fields(Budget)}
    changes = {k: float(v) for k, v in overrides.items() if k in fields}
    return dataclasses.replace(DEFAULT_BUDGETS[name], **changes)


def _check_overrides(overrides: Mapping[str, float]) -> None:
    for key, value in overrides.items():
        if key not in THRESHOLD_KEYS:
            raise ConfigError(
                f"unknown [thresholds] key {key!r} (known: {', '.join(sorted(THRESHOLD_KEYS))})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(f"[thresholds] {key} must be a finite number >= 0, got {value!r}")
        if key in FRACTION_KEYS and value > 1:
            raise ConfigError(
                f"[thresholds] {key} must be in 0..1 (a fraction, not a percent), got {value!r}"
            )
        if key in BROKEN_KEYS and value >= 1:
            raise ConfigError(f"[thresholds] {key} = {value!r} {BROKEN_WHY}")


def tie_margin_for(null: NullModel | None, overrides: Mapping[str, float] = {}) -> float:
    """The TIE margin (nats) to classify divergences with: override, else from the null."""
    return tie_margin(null or NO_NULL, overrides)[0]


MIN_PROMPTS_FOR_CI = 5  # under this, the interval is the range of the per-prompt values
MIN_PROMPTS_TO_DECIDE = 2  # one prompt has no spread: nothing it measures decides a check


def _per_prompt(comp: Comparison, name: str) -> list[float] | None:
    """The per-prompt values behind an aggregate (None: not a mean over prompts)."""
    if name == "token_match":  # a failed prompt counts as 0, as in the aggregate
        return [p.match_rate if p.error is None and p.match_rate is not None else 0.0 for p in comp.prompts]
    if name in ("kl_mean", "top1_agreement"):
        values = [getattr(p, name) for p in comp.prompts if p.error is None]
        return [v for v in values if v is not None]
    return None


def judged_prompts(comp: Comparison, name: str) -> int | None:
    """How many prompts the value rests on: its per-prompt values, the prompts a rate counts, else
    the prompts answered (None: a comparison of aggregates alone, with no count to go by).
    broken_rate never asks: an impossible answer decides on any count (`_why_open`)."""
    if not comp.prompts:
        n = comp.aggregate.get("n_prompts")
        return None if n is None else int(n)
    values = _per_prompt(comp, name)
    if values is not None:
        return len(values)
    if name == "garbled_rate":  # a broken answer counts as garbled; lost ones are _why_open's
        return len(comp.prompts) - _lost(comp)
    return sum(1 for p in comp.prompts if p.error is None)


def _interval(comp: Comparison, name: str) -> tuple[list[float], str] | None:
    """The value's 95% interval and its name for the report: the bootstrap CI over prompts ("")
    or — under MIN_PROMPTS_FOR_CI prompts, where a bootstrap is overconfident — the range of the
    per-prompt values, which the reason must call so (the table's CI column is the bootstrap's)."""
    if name not in comp.ci:
        return None
    per_prompt = _per_prompt(comp, name) or []
    if 0 < len(per_prompt) < MIN_PROMPTS_FOR_CI:
        return [float(min(per_prompt)), float(max(per_prompt))], f"range of the {len(per_prompt)} prompts"
    return [float(comp.ci[name][0]), float(comp.ci[name][1])], ""


# A check's note piece naming an interval that is not the bootstrap's 95% CI (Check.interval_name
# reads it back, so reports say "range of the 3 prompts [a, b] straddles the limit").
INTERVAL_NOTE = "; " + INTERVAL_PIECE


def _prompts_to_decide(n: int, ci: Sequence[float], value: float, limit: float) -> int | None:
    """Prompts at which the interval (shrinking as 1/sqrt(n)) would clear the limit (None: no
    estimate, as where an end of the interval is infinite)."""
    half = (ci[1] - ci[0]) / 2
    gap = abs(value - limit)
    if gap == 0 or half == 0 or not math.isfinite(half) or not math.isfinite(gap):
        return None
    return max(n + 1, math.ceil(n * (half / gap) ** 2))


def _make_check(
    name: str, value: float | None, limit: Limit, op: str, comp: Comparison | None = None
) -> Check:
    assert limit.value is not None  # callers only build checks for set limits
    inf = limit.informative
    lost = _lost(comp) if comp is not None else 0
    if value is None:
        if lost and comp is not None and lost == len(comp.prompts):  # nothing answered: nothing to measure
            note = f"{limit.note}; not measured: all {lost} requests were lost"
            return Check(name, None, limit.value, op, False, True, note, inf, decided=False)
        return Check(name, None, limit.value, op, False, True, f"{limit.note}; required, missing", inf)
    if math.isnan(value):
        return Check(name, value, limit.value, op, False, True, f"{limit.note}; NaN always fails", inf)
    passed = within(value, limit.value, op)
    if math.isinf(value) and not passed:  # no interval can judge an infinite mean: a fact, as NaN is
        where = _infinite_prompts(comp, name) if comp is not None else ""
        return Check(
            name, value, limit.value, op, False, True, f"{limit.note}; infinite{where}: always fails", inf
        )
    if name == "broken_rate" and not passed and comp is not None:  # what was broken, not only how often
        limit = dataclasses.replace(limit, note=limit.note + _first_broken(comp))
    interval = _interval(comp, name) if comp is not None else None
    ci, ci_name = interval if interval is not None else (None, "")
    why = _why_open(name, value, passed, limit.value, op, comp, ci, lost)
    if why is None:
        return Check(name, float(value), limit.value, op, passed, True, limit.note, inf, True, ci, None)
    note, needed = why
    if ci_name and ci is not None and straddles(ci, limit.value, op):
        note += INTERVAL_NOTE + ci_name
    return Check(name, float(value), limit.value, op, passed, True, limit.note + note, inf, False, ci, needed)


def _infinite_prompts(comp: Comparison, name: str) -> str:
    """ " on p3, p7" -- the prompts whose own value is infinite, at most three named."""
    if name not in ("kl_mean", "top1_agreement"):
        return ""
    ids = [p.prompt_id for p in comp.prompts if p.error is None and math.isinf(getattr(p, name) or 0.0)]
    if not ids:
        return ""
    more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
    return f" on {', '.join(ids[:3])}{more}"


def _first_broken(comp: Comparison) -> str:
    """The first broken answer's prompt and error, cut short: the terminal showed "impossible-answer
    rate 100.0%" and the cause ("content is null", "NaN logprobs at ...") was in report.json alone."""
    first = next((p for p in comp.prompts if p.broken and p.error), None)
    if first is None:
        return ""
    error = " ".join(first.error.split()).replace(";", ",")  # a note's pieces are split at ";"
    return f"; first: {first.prompt_id}: {error[:160]}{'…' if len(error) > 160 else ''}"


def _why_open(
    name: str, value: float, passed: bool, limit: float, op: str, comp: Comparison | None,
    ci: list[float] | None, lost: int,
) -> tuple[str, int | None] | None:  # fmt: skip
    """Why a check cannot decide -- the note to add and the prompts that would decide -- the first
    rule that applies; None: it decides."""
    if name == "failed_rate":
        # a request that failed after the client's retries leaves its prompt unjudged: that is not
        # evidence of a regression (nor can it catch a negative control), and over the run's
        # error_rate_limit the run is an infrastructure failure (exit 3) anyway
        if passed:
            return None
        refused = len(refused_prompts(comp.prompts)) if comp else 0
        again = (  # no ";" inside: a note's pieces are split at it
            f", but {refused} {'was' if refused == 1 else 'were'} refused as invalid, HTTP 4xx: those only after the prompts or the "
            "server's limits change"
            if refused
            else ""
        )
        return f"; failed requests leave their prompts unjudged (--resume asks them again{again})", None
    if comp is None or name == "broken_rate":
        # an impossible answer (NaN logprobs, a malformed block) is a counted fact about the
        # target, not an estimate with spread: one of them fails, however few prompts were asked
        return None
    if not passed and lost and name in _WORST_VALUE_CHECKS:
        # lost prompts count as the worst value here (a server must not hide its bad prompts behind
        # failures), so a failure may be theirs alone: decided only if the answered prompts fail too
        answered = _answered_value(comp, name)
        if answered is None or within(answered, limit, op):
            return f"; fails only with the {lost} lost prompt(s) counted as the worst value", None
    n = judged_prompts(comp, name)
    if n is not None and n < MIN_PROMPTS_TO_DECIDE:
        return f"; {n} prompt{'' if n == 1 else 's'}: no spread to decide with", MIN_PROMPTS_FOR_CI
    if ci is not None and straddles(ci, limit, op):
        n_prompts = int(comp.aggregate.get("n_prompts", len(comp.prompts)))
        return "", _prompts_to_decide(n_prompts, ci, value, limit)
    return None


# aggregates that count a failed prompt as the worst value (difftest.metrics.aggregate)
_WORST_VALUE_CHECKS = frozenset({"token_match", "garbled_rate", "bleu"})


def _lost(comp: Comparison) -> int:
    """Prompts whose request was lost (an error that is not the target's impossible answer)."""
    return lost_requests(comp.prompts)


def _answered_value(comp: Comparison, name: str) -> float | None:
    """A worst-value check's value over the answered prompts alone (None: not recomputable, BLEU
    being a corpus score, or no prompt answered)."""
    answered = [p for p in comp.prompts if p.error is None]
    if not answered or name == "bleu":
        return None
    if name == "token_match":
        return sum(p.match_rate or 0.0 for p in answered) / len(answered)
    return sum(p.match_rate is None or is_garbled(p.match_rate) for p in answered) / len(answered)


def _bleu_order_note(comp: Comparison) -> str:
    """Why BLEU rests on fewer n-gram orders than BLEU-4 ("" where it does not), said on the check
    and as a warning: corpus BLEU uses sacrebleu's effective order (difftest.metrics.text), so
    continuations all under 4 tokens are judged on 1..k-grams, neither a silent 0 (FAIL) nor a
    BLEU-4 it did not measure. A report from before `bleu_order` was stored says nothing."""
    order = comp.aggregate.get("bleu_order")
    if order is None or order >= MAX_ORDER:
        return ""
    short, empty = BLEU_ORDERS  # the terminal picks these warnings out by their words
    if order < 1:
        return f"{empty} to measure: every target continuation is empty"
    return (
        f"{short}{int(order)}-grams only: no target continuation reaches {MAX_ORDER} tokens "
        "(raise max_tokens for BLEU-4)"
    )


def _guarded(part: str, name: str, limit: Limit) -> Limit:
    """`limit` marked not informative where a broken target would pass it -- the null's limits are
    marked where they are made; overrides and budgets, which a user sets, are marked here."""
    assert limit.value is not None
    table = ACCURACY_UNINFORMATIVE if part == "accuracy" else UNINFORMATIVE
    if not limit.informative or informative(name, limit.value, table):
        return limit
    return Limit(limit.value, limit.note + UNINFORMATIVE_NOTE, informative=False)


def _shallow_kl(name: str, limit: Limit, comp: Comparison) -> Limit:
    """A KL limit marked not informative where KL was compared at top-1 only somewhere (a side's
    echo listed 1 alternative, scoring.DepthTally): over {top-1, rest} a wrong model scores KL 0,
    so a pass says nothing; NaN and inf still fail, as everywhere."""
    depth = comp.aggregate.get(KL_DEPTH_MIN)
    if name not in ("kl_mean", "kl_p99") or depth is None or depth >= FULL_KL_DEPTH or not limit.informative:
        return limit
    note = f"; KL compared at top-{depth:g} only: blind to probability moved among the alternatives"
    return Limit(limit.value, limit.note + note, informative=False)


def _skip_reason(skipped: Mapping[str, str], part: str, group: str) -> str | None:
    return skipped.get(f"{part}.{group}", skipped.get(group))


def _part(
    part: str,
    comp: Comparison,
    limits: Mapping[str, Limit],
    overrides: Mapping[str, float],
    skipped: Mapping[str, str],
    warnings: list[str],
) -> PartVerdict:
    checks: list[Check] = []
    for name, (op, group) in _CHECKS.items():
        key = f"{part}.{name}"
        limit = (
            Limit(float(overrides[key]), _override_note(overrides, key))
            if key in overrides
            else limits.get(name)
        )
        if limit is None or limit.value is None:
            continue
        limit = _shallow_kl(name, _guarded(part, name, limit), comp)
        reason = _skip_reason(skipped, part, group)
        if reason is not None:
            checks.append(
                Check(name, None, limit.value, op, True, False, f"{SKIPPED_NOTE}{reason}", informative=False)
            )
            msg = f"{part}: {group.replace('_', '-')}{SKIPPED_CHECKS}{reason}"
            if msg not in warnings:
                warnings.append(msg)
            continue
        if name == "bleu" and (short := _bleu_order_note(comp)):
            limit = Limit(limit.value, limit.note + "; " + short, limit.informative)
            if (msg := f"{part}: {short}") not in warnings:
                warnings.append(msg)
        value = _request_rate(comp, name) if name in _RECOUNTED else comp.aggregate.get(name)
        if value is None and name == "broken_rate":  # aggregates alone, from before they were told apart
            continue
        checks.append(_make_check(name, value, limit, op, comp))
    return PartVerdict(part=part, against=comp.baseline, checks=tuple(checks))


# rates recounted from the prompts where they are stored: a report.json from before broken answers
# were told apart has no broken_rate, and its failed_rate counted them as lost requests too
_RECOUNTED = frozenset({"failed_rate", "broken_rate"})


def _request_rate(comp: Comparison, name: str) -> float | None:
    """failed_rate (requests lost) or broken_rate (impossible answers) over the comparison's prompts
    -- one rule: an impossible answer is judged by broken_rate alone, never as a lost request --
    else the stored aggregate (a comparison of aggregates alone)."""
    if not comp.prompts:
        return comp.aggregate.get(name)
    count = lost_requests(comp.prompts) if name == "failed_rate" else broken_answers(comp.prompts)
    return count / len(comp.prompts)


def judge_target(
    target: str,
    expect: str,
    exactness: Comparison | None,
    accuracy: Comparison,
    budget: Budget,
    null: NullModel | None,
    extra_parts: Sequence[PartVerdict] = (),
    overrides: Mapping[str, float] = {},
    *,
    skipped: Mapping[str, str] = {},
) -> TargetVerdict:
    """Judge one target: exactness (vs golden, limits from the null) and accuracy (vs FP16, budget).

    `budget` should come from `budget_for(scheme, overrides)`; bare budget keys in `overrides`
    are applied here too, so passing the default budget with overrides is equivalent.
    `overrides`: `[thresholds]` keys — bare Budget field names (accuracy), `<part>.<check>` for
    one check's limit (e.g. `exactness.kl_mean`), `margin` (null-model multiplier); where both
    spellings of one check are given, the dotted key wins, so a scheme's table must already have
    displaced the general table's twin (config.thresholds_for does).
    `skipped`: group -> visible reason, for groups the run could not measure (conformance said
    so): "teacher_forced", "tokens", "text", "requests", or `<part>.<group>` for one part only.
    `extra_parts`: already-judged parts (white-box layers, batch-slot invariance), appended.
    """
    if expect not in ("pass", "fail"):
        raise UsageError(f"target {target!r}: expect must be 'pass' or 'fail', got {expect!r}")
    _check_overrides(overrides)
    fields = {f.name for f in dataclasses.fields(Budget)}
    budget = dataclasses.replace(budget, **{k: float(v) for k, v in overrides.items() if k in fields})
    margin = float(overrides.get("margin", MARGIN))
    warnings: list[str] = []
    parts: list[PartVerdict] = []

    if exactness is None:
        reason = "no golden: accuracy only, subtle bugs may hide inside the budget"
        parts.append(PartVerdict(part="exactness", against="", skipped=reason))
        warnings.append(f"exactness skipped: {reason}")
    else:
        null = null or NO_NULL
        limits = {k: v for k, v in exactness_limits(null, margin).items() if k != "point_rel_err_max"}
        for name in _BUDGET_EXACTNESS:  # the budget's request limits, or their override
            attr = _BUDGET_FIELDS[name]
            source = (
                _override_note(overrides, attr) if attr in overrides else f"budget {budget.scheme} {attr}"
            )
            limits[name] = Limit(getattr(budget, attr), source)
        warnings.append(f"exactness limits from {null.description}; trust: {null.trust}")
        parts.append(_part("exactness", exactness, limits, overrides, skipped, warnings))

    acc_limits: dict[str, Limit] = {}
    for name, attr in _BUDGET_FIELDS.items():
        value = getattr(budget, attr)
        if value is not None:
            note = _override_note(overrides, attr) if attr in overrides else f"budget {budget.scheme}"
            acc_limits[name] = Limit(float(value), note)
    parts.append(_part("accuracy", accuracy, acc_limits, overrides, skipped, warnings))
    parts.extend(extra_parts)
    return TargetVerdict(target=target, expect=expect, parts=tuple(parts), warnings=tuple(warnings))
