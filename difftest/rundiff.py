"""Run-to-run comparison (`difftest diff RUN_A RUN_B`): per target and metric, what moved between
two report.json files and whether the move is beyond noise. Pure functions of two RunResults.

"Beyond noise", per metric, from what each report stored:

- both runs have a bootstrap 95% interval for the metric over at least MIN_PROMPTS_FOR_CI prompts,
  counted as the verdict counts them (a KL over its teacher-forced prompts; fewer: a bootstrap is
  overconfident), not both of zero width: the move counts when the two
  intervals are disjoint (conservative: two independent 95% intervals are disjoint by chance in
  well under 1% of runs, so a flagged move is worth a look) and the move is larger than the
  smallest move worth a word for that metric (MIN_MOVE: the verdict's own absolute minimum, KL
  0.005, top-1 3 points, ...; a probability gap of 1e-3): an interval of one value (KL 0 on
  every prompt) is disjoint from any change at all, 1e-9 nats included, which no limit would
  ever call a difference;
- otherwise, where a noise floor bounds the metric (report.json's `noise_floor`: the A/A spread of
  kl_mean, kl_p99, top-1 disagreement, token mismatch), the move counts when it exceeds the floor
  and MIN_MOVE both: an A/A floor of 0 (usual on a CPU) would call a 1e-7 nat move a change;
- otherwise it is unknown (None): the report holds nothing to tell noise from a change.

A metric's direction says whether a move is a regression: lower is better for divergences and
error rates, higher for agreement and text similarity, closer to zero for a signed bias (dp_mean);
counts (n_prompts, tie, tf_prompts) and BLEU's n-gram order have none. A negative control (`expect = "fail"`) is meant to
fail, so for it the quality directions turn around: a move toward the limit is its fault nearly
escaping, a move away from it is the fault caught harder. Lost requests stay worse either way: they
leave a verdict open, a control's included.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from difftest.metrics.aggregate import TEACHER_FORCED_KEYS
from difftest.null import ABS_MIN
from difftest.report.words import CheckWords, all_checks
from difftest.results import Comparison, RunResult, TargetResult, finite_for_json
from difftest.verdict import MIN_PROMPTS_FOR_CI, judged_prompts

HIGHER_IS_BETTER = frozenset(
    {
        "token_match",
        "exact_match",
        "top1_agreement",
        "bleu",
        "chrf",
        "median_first_divergence",
        "kl_depth_min",
    }
)
LOWER_IS_BETTER = frozenset(
    {
        "kl_mean", "kl_lower_mean", "kl_upper_mean", "kl_p99", "dp_rms",
        "garbled_rate", "failed_rate", "failed_requests", "broken_rate", "broken_answers", "drift", "wrong",
        "kl_depth_cut_rate",
    }
)  # fmt: skip
CLOSER_TO_ZERO_IS_BETTER = frozenset({"dp_mean"})  # signed: a bias either way is worse
# what was measured, not how well: counts, and the n-gram order BLEU reached on these texts
NO_DIRECTION = frozenset({"n_prompts", "tie", "tf_prompts", "bleu_order"})
# requests that got no answer: worse for any target, since they leave its verdict open (a negative
# control's too: an undecided control is a control that no longer catches its fault)
REQUEST_LOSSES = frozenset({"failed_rate", "failed_requests"})
# metric -> the noise floor field that bounds its run-to-run spread
FLOOR_FIELDS = {
    "kl_mean": "kl_mean",
    "kl_upper_mean": "kl_mean",
    "kl_p99": "kl_p99",
    "top1_agreement": "top1_disagreement",
    "token_match": "token_mismatch",
}
# the smallest move a "beyond noise" may be: the verdict's own absolute minimum where it has one
# (difftest.null.ABS_MIN), else a size no limit would call a difference (a probability gap of
# 1e-3, half a BLEU point); rates and counts move in whole prompts, so any move counts
MIN_MOVE = {
    **{metric: ABS_MIN[field] for metric, field in FLOOR_FIELDS.items()},
    "kl_lower_mean": ABS_MIN["kl_mean"],
    "dp_mean": 1e-3,
    "dp_rms": 1e-3,
    "bleu": 0.5,
    "chrf": 0.5,
}
REL_EQUAL = 1e-12  # two numbers this close are the same number printed twice


@dataclass(frozen=True)
class MetricMove:
    metric: str
    a: float | None
    b: float | None
    delta: float | None
    ci_a: tuple[float, float] | None
    ci_b: tuple[float, float] | None
    # how beyond_noise was decided: "ci" (the two 95% intervals), "small" (disjoint intervals, a move
    # under MIN_MOVE), "floor" (the noise floor's spread), "floor-small" (over the floor, a move under
    # MIN_MOVE), "few" (intervals over too few prompts, no floor), "none" (nothing to judge by),
    # "unchanged", "missing" (a side has no number)
    noise: str
    beyond_noise: bool | None
    direction: str  # "better" | "worse" | "neutral" | ""

    @property
    def regressed(self) -> bool:
        return bool(self.beyond_noise) and self.direction == "worse"


@dataclass
class ComparisonDiff:
    kind: str  # "exactness" | "accuracy"
    baseline: str
    metrics: list[MetricMove] = field(default_factory=list)
    prompts_compared: int = 0
    continuations_changed: list[str] = field(default_factory=list)  # prompt ids whose target output moved


@dataclass
class TargetDiff:
    name: str
    verdict_a: str | None
    verdict_b: str | None
    comparisons: list[ComparisonDiff] = field(default_factory=list)
    note: str = ""  # "only in A" (B lost its verdict), "only in B"
    warnings: list[str] = field(default_factory=list)  # comparisons that could not be paired
    # the checks whose outcome differs (pass / FAIL / undecided / not informative), in words: what
    # turned the verdict. Re-judged with other limits, no metric moves and only these say why
    checks_changed: list[str] = field(default_factory=list)
    expect: str = "pass"  # run B's expectation ("fail": a negative control)
    expect_a: str | None = None  # run A's, where it differs from B's (None: the same)

    @property
    def verdict_changed(self) -> bool:
        return self.verdict_a != self.verdict_b

    @property
    def regressed(self) -> bool:
        """B's verdict contradicts B's expectation and A's verdict did not contradict A's (FAIL for a
        target that should pass -- after PASS, INCONCLUSIVE or no run at all; PASS for a negative
        control: its fault is no longer caught; either after an edited `expect`), B lost a verdict A
        had (a target only in A included: README's "B lost a verdict A had"), or a metric moved the
        wrong way beyond noise."""
        went_bad = contradicts(self.verdict_b, self.expect) and not contradicts(
            self.verdict_a, self.expect_a or self.expect
        )
        lost_verdict = self.verdict_a is not None and self.verdict_b is None
        return went_bad or lost_verdict or any(m.regressed for c in self.comparisons for m in c.metrics)


def contradicts(label: str | None, expect: str) -> bool:
    """`label` is the verdict `expect` rules out: FAIL for a target that should pass, PASS for a
    negative control (INCONCLUSIVE and no verdict contradict neither)."""
    return label == ("PASS" if expect == "fail" else "FAIL")


@dataclass
class RunDiff:
    a: str
    b: str
    targets: list[TargetDiff] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(t.regressed for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["regressed"] = self.regressed
        for t, td in zip(out["targets"], self.targets, strict=True):
            t["verdict_changed"], t["regressed"] = td.verdict_changed, td.regressed
            for c, cd in zip(t["comparisons"], td.comparisons, strict=True):
                for m, md in zip(c["metrics"], cd.metrics, strict=True):
                    m["regressed"] = md.regressed
        return finite_for_json(out)


def direction(metric: str, a: float, b: float, expect: str = "pass") -> str:
    """Whether a -> b is better or worse for a target with this `expect` (see the module's words)."""
    delta = b - a
    if metric in CLOSER_TO_ZERO_IS_BETTER:
        toward_good = abs(b) < abs(a)
    elif metric in HIGHER_IS_BETTER:
        toward_good = delta > 0
    elif metric in LOWER_IS_BETTER:
        toward_good = delta < 0
    else:
        return "neutral"
    if expect == "fail" and metric not in REQUEST_LOSSES:  # toward passing: the control escaping
        toward_good = not toward_good
    return "better" if toward_good else "worse"


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _ci(c: Comparison, metric: str) -> tuple[float, float] | None:
    ci = c.ci.get(metric)
    if not ci or len(ci) != 2 or any(_number(v) is None or math.isnan(v) for v in ci):
        return None
    return float(ci[0]), float(ci[1])


def _enough_prompts(c: Comparison, metric: str) -> bool:
    """Whether the metric's interval rests on MIN_PROMPTS_FOR_CI prompts or more, counted as the
    verdict counts them (`judged_prompts`: a KL over 2 teacher-forced prompts of 10 rests on 2,
    and n_prompts made its 2-prompt bootstrap "beyond noise"); a teacher-forced key never on more
    than tf_prompts, which it averages over. No count at all: taken as is."""
    n = judged_prompts(c, metric)
    tf = _number(c.aggregate.get("tf_prompts"))
    if metric in TEACHER_FORCED_KEYS and tf is not None:
        n = int(tf) if n is None else min(n, int(tf))
    return n is None or n >= MIN_PROMPTS_FOR_CI


def _beyond_cis(metric: str, ca: Comparison, cb: Comparison, delta: float) -> tuple[str, bool | None]:
    """Disjoint intervals and a move over the verdict's absolute minimum: ("ci", True); overlapping
    intervals: ("ci", False); disjoint but a move under that minimum: ("small", False), so that a
    reader seeing two disjoint intervals is told why they do not count. Undecided (None): ("few",
    None) when both intervals are there but one rests on fewer than MIN_PROMPTS_FOR_CI prompts --
    told apart from ("none", None), an interval missing or both a single value, since "no CI" read
    beside two printed intervals (t22 #4)."""
    ci_a, ci_b = _ci(ca, metric), _ci(cb, metric)
    if ci_a is None or ci_b is None or (ci_a[0] == ci_a[1] and ci_b[0] == ci_b[1]):
        return "none", None
    if not (_enough_prompts(ca, metric) and _enough_prompts(cb, metric)):
        return "few", None
    if not (ci_a[1] < ci_b[0] or ci_b[1] < ci_a[0]):
        return "ci", False
    return ("ci", True) if abs(delta) > MIN_MOVE.get(metric, 0.0) else ("small", False)


def floor_spread(floor: Mapping[str, Any] | None, metric: str) -> float | None:
    """The noise floor's spread for `metric`, when report.json stored a floor that bounds it.
    An in-run floor ({"in_run": {golden: floor}}) counts with its largest value (the loosest)."""
    if not floor or metric not in FLOOR_FIELDS:
        return None
    floors = list(floor["in_run"].values()) if "in_run" in floor else [floor]
    values = [_number(f.get(FLOOR_FIELDS[metric])) for f in floors if isinstance(f, Mapping)]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return max(values) if values else None


def metric_move(
    metric: str, ca: Comparison, cb: Comparison, floor: float | None, expect: str = "pass"
) -> MetricMove:
    """A -> B for one metric, beyond noise or not (the module's rules); `expect`: B's, for the
    direction."""
    a, b = _number(ca.aggregate.get(metric)), _number(cb.aggregate.get(metric))
    ci_a, ci_b = _ci(ca, metric), _ci(cb, metric)
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return MetricMove(metric, a, b, None, ci_a, ci_b, "missing", None, "")
    delta = b - a
    if abs(delta) <= REL_EQUAL * max(1.0, abs(a), abs(b)):
        return MetricMove(metric, a, b, 0.0, ci_a, ci_b, "unchanged", False, "")
    how, beyond = _beyond_cis(metric, ca, cb, delta)
    if beyond is None and floor is not None:
        how, beyond = _beyond_floor(metric, delta, floor)
    return MetricMove(metric, a, b, delta, ci_a, ci_b, how, beyond, direction(metric, a, b, expect))


def _beyond_floor(metric: str, delta: float, floor: float) -> tuple[str, bool]:
    """Over the floor and over MIN_MOVE: ("floor", True); within the floor: ("floor", False); over
    the floor but under MIN_MOVE: ("floor-small", False) -- an in-run A/A floor of 0 (identical
    twins on a CPU) would otherwise make any change at all, 1e-7 nats included, a regression."""
    if abs(delta) <= floor:
        return "floor", False
    return ("floor", True) if abs(delta) > MIN_MOVE.get(metric, 0.0) else ("floor-small", False)


def _changed_prompts(ca: Comparison, cb: Comparison) -> tuple[int, list[str]]:
    """Prompts in both runs, and those whose target continuation differs between them."""
    by_id = {p.prompt_id: p for p in ca.prompts}
    both, changed = 0, []
    for p in cb.prompts:
        q = by_id.get(p.prompt_id)
        if q is None:
            continue
        both += 1
        if (q.tgt_token_ids, q.tgt_text, q.error) != (p.tgt_token_ids, p.tgt_text, p.error):
            changed.append(p.prompt_id)
    return both, changed


def _target(
    ta: TargetResult | None, tb: TargetResult | None, floor_b: Mapping[str, Any] | None
) -> TargetDiff:
    name = (ta or tb).name  # type: ignore[union-attr]
    label = lambda t: t.verdict.label if t is not None and t.verdict is not None else None  # noqa: E731
    out = TargetDiff(name, label(ta), label(tb), expect=(tb or ta).expect)  # type: ignore[union-attr]
    if ta is not None and tb is not None and ta.expect != tb.expect:  # each verdict against its own
        out.expect_a = ta.expect
    if ta is None or tb is None:
        out.note = "only in B" if ta is None else "only in A"
        return out
    out.checks_changed = checks_changed(ta, tb)
    for ca in ta.comparisons:
        cb = tb.comparison(ca.kind)
        if cb is None:
            out.warnings.append(f"{name}: {ca.kind} vs {ca.baseline} is in A only")
            continue
        if cb.baseline != ca.baseline:
            out.warnings.append(f"{name}: {ca.kind} is against {ca.baseline} in A, {cb.baseline} in B")
        cd = ComparisonDiff(ca.kind, cb.baseline)
        keys = list(dict.fromkeys([*ca.aggregate, *cb.aggregate]))
        floor = floor_b if ca.kind == "exactness" else None  # floors bound the golden's A/A spread
        cd.metrics = [metric_move(k, ca, cb, floor_spread(floor, k), tb.expect) for k in keys]
        cd.prompts_compared, cd.continuations_changed = _changed_prompts(ca, cb)
        out.comparisons.append(cd)
    kinds_a = {ca.kind for ca in ta.comparisons}
    for cb in tb.comparisons:  # a comparison new in B (a golden added) is as unpaired as one B lost
        if cb.kind not in kinds_a:
            out.warnings.append(f"{name}: {cb.kind} vs {cb.baseline} is in B only")
    return out


def _moved(what: str, a: str, b: str) -> str:
    return f"{what} {a}" if a == b else f"{what} {a} -> {b}"


def checks_changed(ta: TargetResult, tb: TargetResult) -> list[str]:
    """'exactness: token match not informative -> undecided (value 36.7%, limit -123.7% -> 25.4%)'
    for every check (paired by part and metric, in order) whose `CheckWords.outcome` differs: the
    report's own words for it. Paired as `_target` pairs the comparisons, by part (a part per
    kind: exactness, accuracy, layers-exactness, ...), not by what it was against: a live reference
    `ref` and the same reference replayed from a baseline (`reference`) listed every accuracy check
    as "only in A" and again "only in B" (t22 #3); the comparisons' warning names the two baselines."""

    if ta.verdict is None or tb.verdict is None:
        return []  # a lost verdict is said on its own (TargetDiff.regressed), not check by check

    def keyed(t: TargetResult) -> dict[tuple[str, str, int], CheckWords]:
        seen: Counter[tuple[str, str]] = Counter()
        out = {}
        for w in all_checks(t):
            name = (w.part, w.metric)
            out[(*name, seen[name])] = w
            seen[name] += 1
        return out

    by_a, by_b = keyed(ta), keyed(tb)
    lines = []
    for key in dict.fromkeys([*by_a, *by_b]):
        wa, wb = by_a.get(key), by_b.get(key)
        if wa is None or wb is None:  # a check one side's limits did not have: its outcome all the same
            w = wb or wa
            state = "only in B" if wa is None else "only in A"
            lines.append(f"{w.part}: {key[1]} {state}: {w.outcome} (value {w.value}, limit {w.limit})")  # type: ignore[union-attr]
            continue
        if wa.outcome != wb.outcome:
            lines.append(
                f"{wb.part}: {wb.metric} {wa.outcome} -> {wb.outcome} ({_moved('value', wa.value, wb.value)}, "
                f"{_moved('limit', wa.limit, wb.limit)})"
            )
    return lines


def _settings_warnings(a: RunResult, b: RunResult) -> list[str]:
    warnings = []
    ra, rb = a.signature.get("run", {}), b.signature.get("run", {})
    for key in ("max_tokens", "logprobs", "seed", "endpoint"):
        if ra.get(key) != rb.get(key):
            warnings.append(
                f"runs differ in {key} ({ra.get(key)!r} vs {rb.get(key)!r}): moves may be the settings"
            )
    pa, pb = a.signature.get("prompts", {}), b.signature.get("prompts", {})
    if pa.get("count") != pb.get("count") or pa.get("ids") != pb.get("ids"):
        warnings.append(
            f"runs used different prompts ({pa.get('count')} vs {pb.get('count')}): compare like with like"
        )
    return warnings


def diff_runs(a: RunResult, b: RunResult, *, name_a: str = "A", name_b: str = "B") -> RunDiff:
    out = RunDiff(name_a, name_b, warnings=_settings_warnings(a, b))
    for run, which in ((a, name_a), (b, name_b)):
        if run.infrastructure:  # its verdicts rest on incomplete answers: a move may be that
            out.warnings.append(f"{which} ended in exit 3 (infrastructure: {'; '.join(run.infrastructure)})")
    by_a = {t.name: t for t in a.targets}
    by_b = {t.name: t for t in b.targets}
    floor = b.noise_floor or a.noise_floor
    for name in dict.fromkeys([*by_a, *by_b]):
        target = _target(by_a.get(name), by_b.get(name), floor)
        out.targets.append(target)
        out.warnings.extend(target.warnings)
    return out
