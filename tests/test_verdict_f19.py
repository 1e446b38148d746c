"""F19 / t20 #5: an impossible answer is judged by broken_rate alone. It was counted in failed_rate
too, so `broken_rate_max = 0.2` allowing 1 broken answer in 10 still left the verdict INCONCLUSIVE
("failed requests leave their prompts unjudged (--resume asks them again)") though no request was
lost. Numbers worked by hand in the comments."""

from __future__ import annotations

from difftest.metrics.aggregate import aggregate_prompts
from difftest.results import Check, Comparison, PromptDiff, TargetVerdict
from difftest.verdict import budget_for, judge_target

ALLOW_ONE_IN_FIVE = {"broken_rate_max": 0.2}


def _ok(i: int) -> PromptDiff:
    p = PromptDiff(prompt_id=f"p{i}", prompt="x")
    p.ref_text = p.tgt_text = "a b c"
    p.ref_tokens = p.tgt_tokens = ["a", "b", "c"]
    p.match_rate, p.exact, p.garbled = 1.0, True, False
    p.kl_mean = p.kl_lower = p.kl_upper = 0.001
    p.position_kl = [0.001] * 3
    p.top1_agreement, p.dp_mean, p.dp_rms = 1.0, 0.0, 0.0
    return p


def _broken(i: int) -> PromptDiff:
    error = "target: top logprobs at generated positions [4] whose probabilities add up to 1.5 (more than 1)"
    return PromptDiff(prompt_id=f"b{i}", prompt="x", error=error, broken=True)


def _lost(i: int) -> PromptDiff:
    return PromptDiff(prompt_id=f"l{i}", prompt="x", error="target: HTTP 500")


def _comp(prompts: list[PromptDiff]) -> Comparison:
    agg, ci = aggregate_prompts(prompts)
    return Comparison(kind="accuracy", baseline="ref", target="t", prompts=prompts, aggregate=agg, ci=ci)


def _judge(comp: Comparison, overrides: dict[str, float]) -> TargetVerdict:
    return judge_target(
        "t", "pass", None, comp, budget_for("fp8-block", overrides), None, overrides=overrides
    )


def _check(v: TargetVerdict, name: str) -> Check:
    return next(c for c in v.parts[-1].checks if c.name == name)


def test_failed_rate_counts_lost_requests_not_broken_answers() -> None:
    """9 answered + 1 broken: failed_requests 1 (no usable answer), failed_rate 0/10 (nothing
    lost), broken_rate 1/10. With one lost request more (11 prompts): failed 2, failed_rate 1/11."""
    agg, _ = aggregate_prompts([*map(_ok, range(9)), _broken(0)])
    assert agg["failed_requests"] == 1 and agg["failed_rate"] == 0.0 and agg["broken_rate"] == 0.1
    agg, _ = aggregate_prompts([*map(_ok, range(9)), _broken(0), _lost(0)])
    assert agg["failed_requests"] == 2 and agg["failed_rate"] == 1 / 11 and agg["broken_rate"] == 1 / 11


def test_an_allowed_impossible_answer_passes_with_nothing_lost() -> None:
    """broken_rate 0.1 <= 0.2 passes; failed_rate 0 <= 0 passes and decides; the broken prompt's
    token match counts 0 (mean 0.9, over the fp8 guard 0.05): PASS. Before: INCONCLUSIVE (exit 4)."""
    v = _judge(_comp([*map(_ok, range(9)), _broken(0)]), ALLOW_ONE_IN_FIVE)
    failed, broken = _check(v, "failed_rate"), _check(v, "broken_rate")
    assert failed.value == 0.0 and failed.decided and not failed.fails
    assert broken.value == 0.1 and broken.decided and not broken.fails
    assert v.label == "PASS", v.reasons


def test_without_the_allowance_it_fails_on_broken_rate_alone() -> None:
    """Limit 0: broken_rate 0.1 FAILs, and no "unjudged, --resume asks again" line for the answered
    prompt (before, failed_rate 0.1 was open beside the FAIL)."""
    v = _judge(_comp([*map(_ok, range(9)), _broken(0)]), {})
    assert v.label == "FAIL" and _check(v, "broken_rate").fails
    failed = _check(v, "failed_rate")
    assert failed.value == 0.0 and failed.decided and "--resume" not in failed.note


def test_a_lost_request_still_leaves_the_verdict_open() -> None:
    """9 answered + 1 broken (allowed) + 1 lost: failed_rate 1/11 > 0 is undecided (--resume asks
    the lost one again), broken_rate 1/11 <= 0.2 passes: INCONCLUSIVE, as before for lost requests."""
    v = _judge(_comp([*map(_ok, range(9)), _broken(0), _lost(0)]), ALLOW_ONE_IN_FIVE)
    failed = _check(v, "failed_rate")
    assert failed.value == 1 / 11 and not failed.decided and "--resume asks them again" in failed.note
    assert not _check(v, "broken_rate").fails and v.label == "INCONCLUSIVE"


def test_an_older_report_is_rejudged_by_the_same_rule() -> None:
    """A report.json written before: its stored failed_rate 0.1 counted the broken answer. The
    verdict recounts from the stored prompts: 0 lost of 10, PASS with the allowance."""
    comp = _comp([*map(_ok, range(9)), _broken(0)])
    comp.aggregate["failed_rate"] = 0.1
    v = _judge(comp, ALLOW_ONE_IN_FIVE)
    assert _check(v, "failed_rate").value == 0.0 and v.label == "PASS", v.reasons
