"""Verdict fixes: impossible answers fail however many there are, inclusive limits (float rounding
at the limit, intervals that end at it), BLEU on short continuations, inf in a bootstrap interval,
the interval a reason names, one label per metric. Numbers worked by hand in the comments."""

from __future__ import annotations

import math

import pytest

from difftest.metrics.aggregate import aggregate_prompts
from difftest.metrics.stats import bootstrap_mean_ci
from difftest.metrics.text import text_scores
from difftest.null import exactness_limits, null_from_twin
from difftest.report.words import METRIC_NAMES, check_words, fmt_value, metric_name
from difftest.results import Comparison, PromptDiff
from difftest.results import straddles as _straddles
from difftest.results import within as _within
from difftest.verdict import budget_for, judge_target

FP8 = budget_for("fp8-block")


def _ok(i: int, kl: float = 0.001, top1: float = 1.0, text: str = "a b c") -> PromptDiff:
    p = PromptDiff(prompt_id=f"p{i}", prompt="x")
    p.ref_text = p.tgt_text = text
    p.ref_tokens = p.tgt_tokens = text.split()
    p.match_rate, p.exact, p.garbled = 1.0, True, False
    p.kl_mean = p.kl_lower = p.kl_upper = kl
    p.position_kl = [kl] * 3
    p.top1_agreement, p.dp_mean, p.dp_rms = top1, 0.0, 0.0
    return p


def _broken(i: int) -> PromptDiff:
    return PromptDiff(prompt_id=f"b{i}", prompt="x", error="target: NaN logprobs", broken=True)


def _comp(prompts: list[PromptDiff]) -> Comparison:
    agg, ci = aggregate_prompts(prompts)
    return Comparison(kind="accuracy", baseline="fp16", target="t", prompts=prompts, aggregate=agg, ci=ci)


def _check(v, name: str, part: int = -1):
    return next(c for c in v.parts[part].checks if c.name == name)


# ------------------------------------------------------------------ 1. broken_rate always decides


def test_every_answer_impossible_fails_not_inconclusive() -> None:
    """The bug: broken_rate counted only answered prompts (a broken one always carries an error),
    so 10 of 10 impossible answers were "0 prompts: no spread" and the verdict INCONCLUSIVE."""
    ov = {"token_match_min": 0.0}  # as in ci-small: nothing else could fail it
    v = judge_target("t", "pass", None, _comp([_broken(i) for i in range(10)]), budget_for("fp8-block", ov),
                     None, overrides=ov, skipped={"teacher_forced": "chat: no echo"})  # fmt: skip
    broken = _check(v, "broken_rate")
    assert broken.value == 1.0 and broken.decided and broken.fails
    assert v.label == "FAIL"


@pytest.mark.parametrize("n_ok", [0, 1])
def test_one_impossible_answer_fails_however_few_prompts(n_ok: int) -> None:
    """All but one, or the only prompt: an impossible answer is a counted fact, not a draw."""
    prompts = [_ok(i) for i in range(n_ok)] + [_broken(0)]
    v = judge_target("t", "pass", None, _comp(prompts), FP8, None)
    assert _check(v, "broken_rate").fails and v.label == "FAIL"


def test_garbled_rate_counts_broken_answers_as_its_prompts() -> None:
    """9 broken + 1 answered-but-garbled: garbled_rate 10/10 rests on 10 prompts, not on the 1."""
    garbled = _ok(9)
    garbled.match_rate, garbled.exact, garbled.garbled = 0.1, False, True
    v = judge_target("t", "pass", None, _comp([_broken(i) for i in range(9)] + [garbled]), FP8, None,
                     overrides={"garbled_rate_max": 0.5})  # fmt: skip
    g = _check(v, "garbled_rate")
    assert g.value == 1.0 and g.decided and g.fails


# --------------------------------------------------------------- 2, 3. inclusive limits, exactly


def test_a_mean_exactly_at_the_limit_passes() -> None:
    """6 prompts of top-1 0.8: the float mean is 0.7999999999999999, which failed 'top-1 < 80%'."""
    v = judge_target("t", "pass", None, _comp([_ok(i, kl=0.08, top1=0.8) for i in range(6)]), FP8, None)
    top1 = _check(v, "top1_agreement")
    assert top1.value < 0.8 and top1.passed and top1.decided  # rounded under, still at the limit
    assert _check(v, "kl_mean").passed and v.label == "PASS"
    # the tolerance is rounding, not leniency: a point under the limit still fails
    assert not _within(0.7999, 0.8, ">=") and not _within(0.0800001, 0.08, "<=")
    assert not _within(1e-12, 0.0, "<=")  # a zero limit (broken_rate_max) stays exact


def test_an_interval_ending_at_the_limit_decides() -> None:
    """KL 0.08, 0.02, 0.03 against 0.08: range [0.02, 0.08] lies on the passing side of an
    inclusive limit (was: undecided). The other end at the limit does straddle it."""
    v = judge_target("t", "pass", None, _comp([_ok(0, kl=0.08), _ok(1, kl=0.02), _ok(2, kl=0.03)]), FP8, None)
    kl = _check(v, "kl_mean")
    assert kl.ci == [0.02, 0.08] and kl.decided and kl.passed and v.label == "PASS"
    assert not _straddles([0.02, 0.08], 0.08, "<=") and _straddles([0.08, 0.1], 0.08, "<=")
    assert not _straddles([0.8, 0.9], 0.8, ">=") and _straddles([0.7, 0.8], 0.8, ">=")
    assert not _straddles([0.5, 0.5], 0.5, "<=")  # a point interval decides


# ------------------------------------------------------------------------ 4. BLEU, short texts


def test_identical_short_and_empty_texts_score_100() -> None:
    """Corpus BLEU of ["a b", "c"] against itself was 0 (no 3- or 4-grams); chrF of all-empty 0."""
    short = text_scores(["a b", "c"], ["a b", "c"])
    assert short.bleu == 100.0 and short.chrf == 100.0 and short.bleu_order == 2
    empty = text_scores(["", ""], ["", ""])
    assert empty.bleu == 100.0 and empty.chrf == 100.0 and empty.bleu_order == 0
    assert text_scores(["", ""], ["a", "b"]).bleu == 0.0  # nothing answered is still nothing


def test_effective_order_bleu_by_hand() -> None:
    # hyps "a b c", "x y" vs refs "a b d", "x y": 1-grams 4/5, 2-grams 2/3 (a b, x y), 3-grams 0/1
    # -> sacrebleu's exp smoothing 1/(2*1); order 3 (no 4-grams); BP 1 (5 vs 5)
    # BLEU = (4/5 * 2/3 * 1/2)^(1/3) = (4/15)^(1/3) = 0.64366
    s = text_scores(["a b c", "x y"], ["a b d", "x y"])
    assert s.bleu_order == 3
    assert s.bleu == pytest.approx(100 * (4 / 15) ** (1 / 3), abs=1e-9)
    # any 4-gram in the corpus: plain BLEU-4, sacrebleu's corpus score unchanged
    assert text_scores(["a b c d e"], ["a b c d f"]).bleu_order == 4


def test_bleu_min_on_short_continuations_says_what_it_measured() -> None:
    """An identical target with 3-token continuations failed bleu_min 10 (BLEU 0); now it passes,
    and the check and a verdict warning say the score is of 1- to 3-grams only."""
    ov = {"bleu_min": 10.0}
    v = judge_target("t", "pass", None, _comp([_ok(i, text=f"w{i} x y") for i in range(6)]),
                     budget_for("fp8-block", ov), None, overrides=ov)  # fmt: skip
    bleu = _check(v, "bleu")
    assert bleu.value == 100.0 and bleu.passed and v.label == "PASS"
    assert "1- to 3-grams only" in bleu.note
    assert any("1- to 3-grams only" in w for w in v.warnings)
    # a full-length corpus carries no such note
    long = judge_target("t", "pass", None, _comp([_ok(i, text=f"w{i} x y z") for i in range(6)]),
                        budget_for("fp8-block", ov), None, overrides=ov)  # fmt: skip
    assert "grams only" not in _check(long, "bleu").note


# ------------------------------------------------------------------------------ 5. inf in a CI


def test_bootstrap_upper_bound_is_inf_not_nan() -> None:
    """One inf KL: ~66% of resamples hold it ((5/6)^6 = 33% miss it), so the 97.5% quantile is
    inf; np.quantile interpolated inf - inf to NaN."""
    lo, hi = bootstrap_mean_ci([0.1, math.inf, 0.2, 0.3, 0.1, 0.2])
    assert hi == math.inf
    assert math.isfinite(lo) and 0.1 <= lo <= 0.3


def test_a_twin_with_an_inf_kl_gives_an_inf_limit_not_the_minimum() -> None:
    """The null's upper bound inf (not NaN 'unusable'): the twin says a correct kernel may move KL
    without bound, so the limit is inf and marked not informative."""
    twin = Comparison(kind="null", baseline="gold", target="twin", prompts=[],
                      aggregate={"n_prompts": 6.0, "kl_mean": math.inf},
                      ci={"kl_mean": list(bootstrap_mean_ci([0.1, math.inf, 0.2, 0.3, 0.1, 0.2]))})  # fmt: skip
    null = null_from_twin(twin)
    assert null.kl_mean == math.inf
    lim = exactness_limits(null)["kl_mean"]
    assert lim.value == math.inf and not lim.informative and "unusable" not in lim.note


# --------------------------------------------------------------- 6. the interval a reason names


def test_reason_names_the_range_under_five_prompts_and_the_ci_over() -> None:
    few = judge_target(
        "t", "pass", None, _comp([_ok(0, kl=0.02), _ok(1, kl=0.12), _ok(2, kl=0.03)]), FP8, None
    )
    kl = _check(few, "kl_mean")
    assert not kl.decided
    words = check_words(few.parts[-1], kl)
    assert "range of the 3 prompts [0.02, 0.12] straddles the limit" in words.sentence()
    assert "95% CI" not in words.sentence() and "interval:" not in words.source
    described = kl.describe()  # the verdict's reasons and junit read this one
    assert ", range of the 3 prompts [0.02, 0.12] straddles the limit" in described
    assert "95% CI" not in described and "interval:" not in described
    many = judge_target("t", "pass", None, _comp([_ok(i, kl=k) for i, k in enumerate([0.02, 0.12, 0.03, 0.1, 0.09, 0.05])]),
                        FP8, None)  # fmt: skip
    kl = _check(many, "kl_mean")
    assert not kl.decided
    assert ", 95% CI [" in check_words(many.parts[-1], kl).sentence()


# ---------------------------------------------------------------------------------- 7. labels


def test_every_aggregate_key_has_one_distinct_label() -> None:
    """`difftest diff --all` printed "failed requests" for both failed_requests and failed_rate."""
    agg, _ = aggregate_prompts([_ok(0), _broken(1), _ok(2)])
    labels = [metric_name(k) for k in agg]
    assert len(set(labels)) == len(labels), labels
    assert len(set(METRIC_NAMES.values())) == len(METRIC_NAMES)
    for rate in ("failed_rate", "broken_rate", "garbled_rate", "exact_match"):
        assert "rate" in metric_name(rate) and fmt_value(rate, 0.0) == "0.0%"


def test_an_error_is_put_under_its_side_once() -> None:
    """compare names its target "target": its own errors read "target: target: ..." before."""
    from difftest.scoring import _sided

    assert _sided("target", "target: text and logprobs disagree") == "target: text and logprobs disagree"
    assert _sided("target", "tgt: text and logprobs disagree") == "target: tgt: text and logprobs disagree"
    assert _sided("baseline echo", None) is None


def test_a_failed_broken_rate_names_the_first_broken_answer() -> None:
    """The terminal said "impossible-answer rate 100.0%" and nothing of what was broken."""
    import dataclasses

    broken = dataclasses.replace(
        _ok(1), error="target: tgt: answer without message content: content is null", broken=True
    )
    v = judge_target("t", "pass", None, _comp([_ok(0), broken, _ok(2)]), FP8, None)
    check = _check(v, "broken_rate")
    assert (
        check.fails
        and "first: p1: target: tgt: answer without message content: content is null" in check.note
    )
    assert (
        "first:"
        not in _check(judge_target("t", "pass", None, _comp([_ok(0), _ok(1)]), FP8, None), "broken_rate").note
    )


def test_an_interval_that_does_not_straddle_is_not_said_to() -> None:
    """A check left open by lost prompts read "95% CI [0.0%, 0.0%] straddles the limit" (of 60%)."""
    from difftest.results import Check

    lost = Check(
        "token_match",
        0.0,
        0.6,
        ">=",
        False,
        True,
        "budget; 10 of 10 prompts lost",
        decided=False,
        ci=[0.0, 0.0],
    )
    assert not lost.straddles and "straddles" not in lost.describe()
    open_ = Check("kl_mean", 0.07, 0.06, "<=", False, True, "twin", decided=False, ci=[0.03, 0.14])
    assert open_.straddles and ", 95% CI [0.03, 0.14] straddles the limit" in open_.describe()


def test_an_exit_3_run_has_one_gate_everywhere() -> None:
    """(t22) report.json's `gate` and `--json`'s `gate` / `gate_passed` said PASS / true for a run
    whose exit code, console and report.md said INFRASTRUCTURE: a CI job reading `.gate` took it."""
    from sample_results import sample_run

    from difftest.report.words import gate_of

    run = sample_run()
    assert run.gate == "PASS" and run.gate_passed and run.exit_code == 0
    run.infrastructure = ["server good exited with code 0 during the run"]
    assert run.gate == gate_of(run) == "INFRASTRUCTURE" and not run.gate_passed and run.exit_code == 3
    stored = run.to_dict()
    assert stored["gate"] == "INFRASTRUCTURE" and stored["exit_code"] == 3
