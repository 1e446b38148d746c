"""Verdicts: budgets per scheme, limits from the null model, NaN / missing / skipped, overrides,
informative checks, INCONCLUSIVE."""

from __future__ import annotations

import math

import pytest

from difftest.errors import ConfigError, UsageError
from difftest.noise import NoiseFloor
from difftest.null import exactness_limits, null_from_floor
from difftest.results import Check, Comparison, PartVerdict, PromptDiff
from difftest.verdict import (
    DEFAULT_BUDGETS,
    THRESHOLD_KEYS,
    budget_for,
    judge_target,
    tie_margin_for,
)


def nf(**values: float):
    """A null model from an A/A floor file with these values."""
    return null_from_floor(NoiseFloor(**values))


FP8 = budget_for("fp8-block")


def comp(kind: str = "accuracy", **agg: float) -> Comparison:
    return Comparison(
        kind=kind, baseline="golden" if kind == "exactness" else "fp16", target="t", aggregate=agg
    )


# docs/design.md "Calibration": fp8-block correct vs FP16 -> top-1 91.6%, KL 0.023
GOOD_ACC = dict(failed_rate=0.0, token_match=0.55, kl_mean=0.023, top1_agreement=0.916, kl_p99=0.3)
GOOD_EXACT = dict(failed_rate=0.0, token_match=0.97, kl_mean=0.001, top1_agreement=0.995, kl_p99=0.02)


def test_good_target_passes_both_parts():
    v = judge_target("fp8", "pass", comp("exactness", **GOOD_EXACT), comp(**GOOD_ACC), FP8, None)
    assert v.passed and v.label == "PASS" and v.meets_expectation and bool(v)
    assert [p.part for p in v.parts] == ["exactness", "accuracy"]
    assert v.reasons == []
    assert any("exactness limits from no null model" in w for w in v.warnings)
    notes = {c.name: c.note for c in v.parts[1].checks}
    assert notes["kl_mean"] == "budget fp8-block"
    assert "kl_p99" not in notes  # no default p99 budget until calibrated


def test_scale_skipped_fails_with_the_right_reasons():
    # docs/design.md "Calibration": fp8-block + scale-skipped in one module -> top-1 2.0%, KL 17.2
    bad = dict(GOOD_ACC, kl_mean=17.2, top1_agreement=0.02, token_match=0.01)
    v = judge_target("fp8-bad", "pass", None, comp(**bad), FP8, None)
    assert not v.passed and v.label == "FAIL" and not v.meets_expectation and not bool(v)
    assert "accuracy: kl_mean 17.2 > 0.08 (budget fp8-block)" in v.reasons
    assert "accuracy: top1_agreement 0.02 < 0.8 (budget fp8-block)" in v.reasons
    assert "accuracy: token_match 0.01 < 0.05 (budget fp8-block)" in v.reasons
    # a negative control: expected to fail, so the gate is satisfied
    neg = judge_target("fp8-bad", "fail", None, comp(**bad), FP8, None)
    assert neg.label == "FAIL" and neg.meets_expectation and bool(neg)
    # ... and a negative control that passes breaks the gate
    assert not judge_target("oops", "fail", None, comp(**GOOD_ACC), FP8, None).meets_expectation


@pytest.mark.parametrize(
    ("scheme", "top1", "kl", "passes"),
    [
        # docs/design.md "Calibration" measurements (smollm2-135m, fp32 reference)
        ("fp8-block", 0.916, 0.023, True),  # correct
        ("int4-g128", 0.679, 0.44, True),  # correct
        ("mxfp4", 0.597, 0.85, True),  # correct
        ("fp8-block", 0.770, 0.155, False),  # garbage-gemm in one module
        ("fp8-block", 0.020, 17.2, False),  # scale-skipped in one module
        ("int4-g128", 0.020, 17.2, False),
        ("mxfp4", 0.020, 17.2, False),
        # subtle bugs hide inside the fp8 accuracy budget: exactness must catch them
        ("fp8-block", 0.864, 0.050, True),  # scale-transposed
        ("fp8-block", 0.854, 0.056, True),  # fnuz-unnormalized
        # a secretly fp8-quantized target labelled "none" fails the tight budget
        ("none", 0.916, 0.023, False),
    ],
)
def test_default_budgets_against_design_measurements(scheme, top1, kl, passes):
    acc = comp(failed_rate=0.0, token_match=0.6, kl_mean=kl, top1_agreement=top1)
    v = judge_target("t", "pass", None, acc, budget_for(scheme), None)
    assert v.passed is passes, v.reasons


def test_exactness_limits_from_floor_and_absolute_minimums():
    floor = nf(kl_mean=0.002, top1_disagreement=0.02, token_mismatch=0.01, kl_p99=0.001)
    lim = exactness_limits(floor)
    assert lim["kl_mean"].value == pytest.approx(0.006)  # 3 x .002 > .005
    assert lim["kl_mean"].note == "floor file 0.002 x3"
    assert lim["top1_agreement"].value == pytest.approx(0.94)  # 1 - 3 x .02
    assert lim["kl_p99"].value == 0.05  # 3 x .001 < absolute minimum .05
    assert lim["kl_p99"].note == "absolute minimum 0.05 (floor file 0.001 x3 is below it)"
    assert lim["token_match"].value == pytest.approx(0.75)  # 1 - max(3 x .01, .25)
    assert lim["point_rel_err_max"].value == pytest.approx(0.03)
    assert "not measured" in lim["point_rel_err_max"].note
    assert exactness_limits(nf())["kl_mean"].note == "absolute minimum 0.005 (floor file: not measured)"
    assert exactness_limits(floor, margin=5)["kl_mean"].value == pytest.approx(0.01)
    assert all(limit.informative for limit in lim.values())


def test_exactness_catches_a_subtle_bug_inside_the_accuracy_budget():
    floor = nf(kl_mean=0.002, top1_disagreement=0.02, token_mismatch=0.05)
    subtle = dict(GOOD_EXACT, kl_mean=0.03, top1_agreement=0.90)  # scale-transposed vs its golden
    v = judge_target(
        "fp8", "pass", comp("exactness", **subtle), comp(**dict(GOOD_ACC, kl_mean=0.05)), FP8, floor
    )
    assert not v.passed
    assert v.parts[1].passed  # accuracy alone would have passed it
    assert "exactness: kl_mean 0.03 > 0.006 (floor file 0.002 x3)" in v.reasons
    assert "exactness: top1_agreement 0.9 < 0.94 (1 - floor file 0.02 x3)" in v.reasons
    assert any("exactness limits from noise floor" in w for w in v.warnings)


def test_nan_always_fails_even_under_a_huge_limit():
    v = judge_target(
        "t", "pass", None, comp(**dict(GOOD_ACC, kl_mean=math.nan)), FP8, None, overrides={"kl_mean_max": 1e9}
    )
    assert not v.passed
    (reason,) = v.reasons
    assert reason.startswith("accuracy: kl_mean nan > 1.000e+09") and "NaN always fails" in reason


def test_missing_metric_fails_unless_its_group_is_skipped():
    no_tf = {k: v for k, v in GOOD_ACC.items() if k not in ("kl_mean", "top1_agreement", "kl_p99")}
    v = judge_target("t", "pass", None, comp(**no_tf), FP8, None)
    assert not v.passed
    assert "accuracy: kl_mean not measured (budget fp8-block; required, missing)" in v.reasons
    assert "accuracy: top1_agreement not measured (budget fp8-block; required, missing)" in v.reasons
    # the same run, with conformance having said "no echo": teacher-forced skipped visibly, tokens still judged
    s = judge_target(
        "t", "pass", None, comp(**no_tf), FP8, None, skipped={"teacher_forced": "target has no echo"}
    )
    assert s.passed, s.reasons
    assert "accuracy: teacher-forced checks skipped: target has no echo" in s.warnings
    kl = next(c for c in s.parts[1].checks if c.name == "kl_mean")
    assert kl.value is None and not kl.required and kl.note == "skipped: target has no echo"
    tm = next(c for c in s.parts[1].checks if c.name == "token_match")
    assert tm.required and tm.value == 0.55
    # skipping does not hide a token-level failure
    bad_tokens = dict(no_tf, token_match=0.01)
    assert not judge_target(
        "t", "pass", None, comp(**bad_tokens), FP8, None, skipped={"teacher_forced": "no echo"}
    ).passed


def test_part_scoped_skip():
    no_tf = {k: v for k, v in GOOD_EXACT.items() if k not in ("kl_mean", "top1_agreement", "kl_p99")}
    v = judge_target(
        "t",
        "pass",
        comp("exactness", **no_tf),
        comp(**GOOD_ACC),
        FP8,
        None,
        skipped={"exactness.teacher_forced": "golden has no echo"},
    )
    assert v.passed, v.reasons
    assert any(c.name == "kl_mean" and c.required for c in v.parts[1].checks)  # accuracy still requires it


def test_failed_requests_leave_the_verdict_open_never_a_regression():
    """A request that failed after the retries leaves its prompt unjudged: INCONCLUSIVE, not FAIL
    (before: 1 failure in 100 was exit 1, 'the kernel regressed', while 6 were exit 3)."""
    v = judge_target("t", "pass", None, comp(**dict(GOOD_ACC, failed_rate=0.1)), FP8, None)
    assert v.label == "INCONCLUSIVE" and not v.meets_expectation
    assert v.reasons == [
        "inconclusive: accuracy: failed_rate 0.1 > 0 (budget fp8-block; failed requests leave their"
        " prompts unjudged (--resume asks them again))"
    ]
    # nor does a failed request catch a negative control whose numbers pass (before: gate PASS)
    control = judge_target("t", "fail", None, comp(**dict(GOOD_ACC, failed_rate=0.025)), FP8, None)
    assert control.label == "INCONCLUSIVE" and not control.meets_expectation
    # a control caught by its numbers is caught, failed requests or not
    caught = judge_target(
        "t", "fail", None, comp(**dict(GOOD_ACC, failed_rate=0.025, kl_mean=17.0)), FP8, None
    )
    assert caught.label == "FAIL" and caught.meets_expectation
    # an answer that cannot be right (NaN logprobs, a malformed block) is the target's bug: FAIL
    broken = dict(GOOD_ACC, failed_rate=0.025, broken_rate=0.025)
    nan = judge_target("t", "pass", None, comp(**broken), FP8, None)
    assert nan.label == "FAIL" and nan.reasons == ["accuracy: broken_rate 0.025 > 0 (budget fp8-block)"]
    ok = judge_target(
        "t",
        "pass",
        None,
        comp(**dict(GOOD_ACC, failed_rate=0.1)),
        FP8,
        None,
        overrides={"failed_rate_max": 0.2},
    )
    assert ok.passed
    assert (
        next(c for c in ok.parts[1].checks if c.name == "failed_rate").note
        == "override [thresholds] failed_rate_max"
    )


def test_overrides_by_key():
    floor = nf(kl_mean=0.002)
    ex = comp("exactness", **dict(GOOD_EXACT, kl_mean=0.03))
    v = judge_target("t", "pass", ex, comp(**GOOD_ACC), FP8, floor, overrides={"exactness.kl_mean": 0.05})
    assert v.passed
    c = next(c for c in v.parts[0].checks if c.name == "kl_mean")
    assert (c.limit, c.note) == (0.05, "override [thresholds] exactness.kl_mean")
    assert judge_target(
        "t", "pass", ex, comp(**GOOD_ACC), FP8, floor, overrides={"margin": 20}
    ).passed  # 20 x .002
    p99 = judge_target("t", "pass", None, comp(**GOOD_ACC), FP8, None, overrides={"kl_p99_max": 0.1})
    assert "accuracy: kl_p99 0.3 > 0.1 (override [thresholds] kl_p99_max)" in p99.reasons
    with pytest.raises(ConfigError, match="kl_man_max"):
        judge_target("t", "pass", None, comp(**GOOD_ACC), FP8, None, overrides={"kl_man_max": 1.0})
    with pytest.raises(ConfigError, match=">= 0"):
        judge_target("t", "pass", None, comp(**GOOD_ACC), FP8, None, overrides={"top1_min": -1})
    assert {
        "kl_mean_max",
        "exactness.kl_mean",
        "accuracy.top1_agreement",
        "margin",
        "tie_margin",
    } <= THRESHOLD_KEYS


def test_no_golden_and_extra_parts():
    v = judge_target("t", "pass", None, comp(**GOOD_ACC), FP8, None)
    assert v.parts[0].skipped and "subtle bugs may hide" in v.parts[0].skipped
    assert v.passed
    layers = PartVerdict("layers", "golden", (Check("layer_cosine", 0.5, 0.9995, ">=", False),))
    v2 = judge_target("t", "pass", None, comp(**GOOD_ACC), FP8, None, extra_parts=[layers])
    assert not v2.passed and v2.reasons == ["layers: layer_cosine 0.5 < 0.9995"]


def test_budget_lookup_and_expect_validation():
    assert budget_for(None) == DEFAULT_BUDGETS["none"]
    assert budget_for("int4-g128", {"top1_min": 0.5}).top1_min == 0.5
    with pytest.raises(ConfigError, match="unknown scheme 'fp7'"):
        budget_for("fp7")
    with pytest.raises(UsageError, match="expect"):
        judge_target("t", "maybe", None, comp(**GOOD_ACC), FP8, None)


def test_tie_margin_for():
    assert tie_margin_for(None) == 0.05
    assert tie_margin_for(nf(tie_margin=0.1)) == pytest.approx(0.1)  # the null's own margins, no x3
    assert tie_margin_for(nf(tie_margin=0.01)) == 0.05  # never under the absolute minimum
    assert tie_margin_for(nf(tie_margin=0.1), {"tie_margin": 0.02}) == 0.02


def _prompts(kls: list[float]) -> list[PromptDiff]:
    out = []
    for i, kl in enumerate(kls):
        p = PromptDiff(prompt_id=f"p{i}", prompt="x", match_rate=1.0, kl_mean=kl, top1_agreement=1.0)
        out.append(p)
    return out


def test_one_prompt_decides_nothing():
    """The bug: a run of one prompt gave point intervals, so KL 0.079 against a 0.08 budget was a
    decided PASS. One prompt has no spread: every check it measures is undecided (INCONCLUSIVE)."""
    one = Comparison(kind="accuracy", baseline="fp16", target="t", prompts=_prompts([0.079]),
                     aggregate=dict(GOOD_ACC, kl_mean=0.079, n_prompts=1),
                     ci={"kl_mean": [0.079, 0.079]})  # fmt: skip
    v = judge_target("t", "pass", None, one, FP8, None)
    assert v.label == "INCONCLUSIVE"
    kl = next(c for c in v.parts[1].checks if c.name == "kl_mean")
    assert not kl.decided and kl.prompts_to_decide == 5 and "1 prompt: no spread" in kl.note
    # two prompts give a range, which decides where it does not straddle the limit
    two = Comparison(kind="accuracy", baseline="fp16", target="t", prompts=_prompts([0.02, 0.03]),
                     aggregate=dict(GOOD_ACC, kl_mean=0.025, n_prompts=2),
                     ci={"kl_mean": [0.02, 0.03]})  # fmt: skip
    assert judge_target("t", "pass", None, two, FP8, None).label == "PASS"


def test_nan_and_missing_values_fail_even_where_the_limit_informs_nothing():
    """design.md: NaN and missing required values always fail -- also on a check whose limit a
    noisy null widened past use (before: NaN KL passed a not-informative check)."""
    noisy = nf(kl_mean=0.4, kl_p99=4.0, top1_disagreement=0.3, token_mismatch=0.3)
    bad = judge_target("t", "pass", comp("exactness", **dict(GOOD_EXACT, kl_mean=math.nan)), comp(**GOOD_ACC),
                       FP8, noisy)  # fmt: skip
    kl = next(c for c in bad.parts[0].checks if c.name == "kl_mean")
    assert not kl.informative and kl.fails and bad.label == "FAIL"
    assert Check("kl_mean", None, 1.0, "<=", False, True, informative=False).fails
    assert not Check(
        "kl_mean", None, 1.0, "<=", True, False, informative=False
    ).fails  # skipped: not required


def test_overrides_a_broken_target_would_pass_inform_nothing():
    """The bug: [thresholds] overrides skipped the guard the null's limits go through, so limits
    wide open (KL 100, top-1 0) judged a scale-skipped-like target (KL 17, top-1 2%) a decided PASS."""
    wide = {
        "exactness.kl_mean": 100.0, "exactness.top1_agreement": 0.0, "exactness.token_match": 0.0,
        "exactness.kl_p99": 1000.0, "kl_mean_max": 100.0, "top1_min": 0.0, "token_match_min": 0.0,
        "kl_p99_max": 1000.0,
    }  # fmt: skip
    broken = dict(failed_rate=0.0, token_match=0.01, kl_mean=17.0, top1_agreement=0.02, kl_p99=40.0)
    v = judge_target("t", "pass", comp("exactness", **broken), comp(**broken), FP8, None, overrides=wide)
    assert v.label == "INCONCLUSIVE", v.reasons
    widened = [c for p in v.parts for c in p.checks if c.name != "failed_rate"]
    assert widened and all(not c.informative and "a broken target would pass" in c.note for c in widened)
    assert "inconclusive: no informative check could be made" in v.reasons  # answering is not computing
    # an override inside the guard still decides, and the default budgets all inform
    tight = judge_target("t", "pass", comp("exactness", **broken), comp(**broken), FP8, None,
                         overrides={"exactness.kl_mean": 0.5, "kl_mean_max": 2.0})  # fmt: skip
    assert tight.label == "FAIL"
    for scheme in DEFAULT_BUDGETS:
        v = judge_target("t", "pass", None, comp(**GOOD_ACC), budget_for(scheme), None)
        assert all(c.informative for c in v.parts[1].checks), scheme


def _answered(rates: list[float], lost: int = 0) -> Comparison:
    prompts = [PromptDiff(prompt_id=f"p{i}", prompt="x", match_rate=r, kl_mean=0.02, top1_agreement=0.9)
               for i, r in enumerate(rates)]  # fmt: skip
    prompts += [PromptDiff(prompt_id=f"l{i}", prompt="x", error="target: HTTP 503") for i in range(lost)]
    n = len(prompts)
    tm = sum(rates) / n  # lost prompts count 0, as the aggregate counts them
    return Comparison(kind="accuracy", baseline="fp16", target="t", prompts=prompts,
                      aggregate=dict(GOOD_ACC, token_match=tm, failed_rate=lost / n, n_prompts=n),
                      ci={"token_match": [tm - 0.01, tm + 0.01]})  # fmt: skip


def test_lost_prompts_never_decide_a_failure_on_their_own():
    """Lost prompts count 0 in token match (a server must not hide bad prompts behind failures),
    so a token-match failure may be theirs alone: it decides only if the answered prompts fail
    too (before: a target that died mid-run was a decided FAIL, and a dead negative control
    counted as caught)."""
    strict = {"token_match_min": 0.5}
    # answered prompts match 0.6 > 0.5; with 6 of 10 lost the mean is 0.24 < 0.5
    open_ = judge_target("t", "fail", None, _answered([0.6] * 4, lost=6), FP8, None, overrides=strict)
    tm = next(c for c in open_.parts[1].checks if c.name == "token_match")
    assert not tm.decided and "fails only with the 6 lost prompt(s)" in tm.note
    assert open_.label == "INCONCLUSIVE" and not open_.meets_expectation
    # the answered prompts fail too (0.3 < 0.5): decided
    shut = judge_target("t", "pass", None, _answered([0.3] * 4, lost=6), FP8, None, overrides=strict)
    assert shut.label == "FAIL"
    # nothing answered: teacher-forced values are missing because everything was lost -- open
    dead = Comparison(kind="accuracy", baseline="fp16", target="t",
                      prompts=[PromptDiff(prompt_id=f"l{i}", prompt="x", error="target: reset") for i in range(5)],
                      aggregate={"failed_rate": 1.0, "broken_rate": 0.0, "token_match": 0.0, "n_prompts": 5})  # fmt: skip
    v = judge_target("t", "fail", None, dead, FP8, None)
    assert v.label == "INCONCLUSIVE" and not v.meets_expectation, v.reasons


def test_prompts_the_server_refused_as_invalid_are_not_said_to_come_back_with_resume():
    """A prompt over the server's context (HTTP 400) was told '--resume asks them again', which gets
    the same 400; the exit-3 line named nothing either."""
    from difftest.runner import refused_note

    c = comp(**dict(GOOD_ACC, failed_rate=2 / 3))
    c.prompts = [
        PromptDiff("ok", "x"),
        PromptDiff(
            "huge", "x" * 9, error="baseline: RequestRejected: ref: HTTP 400: prompt has 1200000 characters"
        ),
        PromptDiff("lost", "y", error="target: ServerError: tgt: timed out"),
    ]
    v = judge_target("t", "pass", None, c, FP8, None)
    assert v.reasons[0] == (
        "inconclusive: accuracy: failed_rate 0.6667 > 0 (budget fp8-block; failed requests leave their prompts "
        "unjudged (--resume asks them again, but 1 was refused as invalid, HTTP 4xx: those only after the "
        "prompts or the server's limits change))"
    )
    assert refused_note(c) == (
        "; 1 of them refused as invalid, which --resume would ask again in vain: shorten those prompts or raise "
        "the server's limits (first: huge: baseline: RequestRejected: ref: HTTP 400: prompt has 1200000 characters)"
    )
    c.prompts = c.prompts[::2]  # only a lost one: nothing said
    assert refused_note(c) == ""
