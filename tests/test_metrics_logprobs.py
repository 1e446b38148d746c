"""Teacher-forced metrics: top-k KL with tail bucket and its bounds, top-1, delta-p, full KL."""

from __future__ import annotations

import math
from math import log

import numpy as np
import pytest

from difftest.metrics.logprobs import (
    PositionLogprobs,
    delta_p,
    full_kl,
    teacher_forced_stats,
    top1_agree,
    topk_kl,
)


def lp(**probs: float) -> dict[str, float]:
    return {k: log(v) for k, v in probs.items()}


def test_kl_full_distributions_listed_is_exact():
    # p = [.5, .5], q = [.25, .75]: KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln2 + .5 ln(2/3) = 0.143841036...
    e = topk_kl(lp(a=0.5, b=0.5), lp(a=0.25, b=0.75))
    assert e.estimate == pytest.approx(0.143841036, abs=1e-9)
    assert e.lower == pytest.approx(e.estimate, abs=1e-12)
    assert e.upper == pytest.approx(e.estimate, abs=1e-12)


def test_kl_same_tokens_listed_tail_bucket():
    # p: a .6, b .3, tail .1; q: a .5, b .3, tail .2. Nothing missing, so all three agree:
    # .6 ln(.6/.5) + .3 ln 1 + .1 ln(.1/.2) = .109393 - .069315 = 0.040078
    e = topk_kl(lp(a=0.6, b=0.3), lp(a=0.5, b=0.3))
    want = 0.6 * log(0.6 / 0.5) + 0.1 * log(0.1 / 0.2)
    assert want == pytest.approx(0.0400782, abs=1e-7)
    for v in (e.estimate, e.lower, e.upper):
        assert v == pytest.approx(want, abs=1e-12)


def test_kl_token_missing_on_each_side_estimate_and_bounds():
    # p top-2: a .6, b .3 (T_p = .1, cap c_p = min(.3, .1) = .1)
    # q top-2: a .7, c .2 (T_q = .1, cap c_q = min(.2, .1) = .1)
    p, q = lp(a=0.6, b=0.3), lp(a=0.7, c=0.2)
    e = topk_kl(p, q, k=2)
    # estimate: missing p_c = min(.1, T_p/2) = .05, p_rest = .05; missing q_b = min(.1, T_q/2) = .05, q_rest = .05
    #   .6 ln(.6/.7) + .3 ln(.3/.05) + .05 ln(.05/.2) + .05 ln(.05/.05)
    #   = -.0924904 + .5375278 - .0693147 + 0 = 0.3757227
    est = 0.6 * log(0.6 / 0.7) + 0.3 * log(0.3 / 0.05) + 0.05 * log(0.05 / 0.2)
    assert est == pytest.approx(0.3757227, abs=1e-7)
    assert e.estimate == pytest.approx(est, abs=1e-12)
    # lower: partition {a}, {b}, rest. q_b in [0, c_q=.1]; q_rest = .3 - q_b >= S = q_c = .2.
    # KKT wants q_b/.3 = q_rest/.1 -> q_b = .225 > cap, so q_b = .1, q_rest = .2:
    #   .6 ln(.6/.7) + .3 ln(.3/.1) + .1 ln(.1/.2) = -.0924904 + .3295837 - .0693147 = 0.1677786
    low = 0.6 * log(0.6 / 0.7) + 0.3 * log(3) + 0.1 * log(0.5)
    assert low == pytest.approx(0.1677786, abs=1e-7)
    assert e.lower == pytest.approx(low, abs=1e-12)
    # brute force: no feasible q_b does better than the water-filled one
    grid = np.linspace(1e-6, 0.1, 2001)
    brute = 0.6 * log(0.6 / 0.7) + 0.3 * np.log(0.3 / grid) + 0.1 * np.log(0.1 / (0.3 - grid))
    assert e.lower == pytest.approx(float(brute.min()), abs=1e-9)
    # upper (floor 1e-10): a exact; b: .3 ln(.3/1e-10) = 6.5465634; c: max(0, .1 ln(.1/.2)) = 0;
    # rest: p_R in [0, .1], q_R in [1e-10, .1], worst corner .1 ln(.1/1e-10) = 2.0723266
    up = 0.6 * log(0.6 / 0.7) + 0.3 * log(0.3 / 1e-10) + 0.1 * log(0.1 / 1e-10)
    assert up == pytest.approx(8.5263996, abs=1e-6)
    assert e.upper == pytest.approx(up, abs=1e-9)


def test_kl_upper_is_infinite_without_a_floor():
    # with floor 0 an unlisted q could be exactly 0: no finite upper bound exists
    e = topk_kl(lp(a=0.6, b=0.3), lp(a=0.7, c=0.2), k=2, floor=0.0)
    assert e.upper == math.inf
    assert math.isfinite(e.lower) and math.isfinite(e.estimate)


def test_kl_k_limits_which_listed_tokens_bound_the_unlisted():
    # vLLM lists the sampled token on top of the top-k: here q lists b at .01 beyond its top-2.
    # With k=2 the cap on the unlisted d is min(.2, T_q=.09) = .09; read as top-3 it would be .01,
    # a claim the data does not support (d could hold .05) and a larger "lower" bound.
    p, q = lp(a=0.6, d=0.3), lp(a=0.7, c=0.2, b=0.01)
    honest, overclaimed = topk_kl(p, q, k=2), topk_kl(p, q)
    assert honest.lower < overclaimed.lower
    # hand value with k=2: q_d in [0, .09]; q_d + q_rest = M = S + T_q = (.2 + .01) + .09 = .3 with
    # q_rest >= S = .21; KKT q_d/.3 = q_rest/.1 -> q_d = .225 > .09 -> q_d = .09, q_rest = .21
    want = 0.6 * log(0.6 / 0.7) + 0.3 * log(0.3 / 0.09) + 0.1 * log(0.1 / 0.21)
    assert honest.lower == pytest.approx(want, abs=1e-12)


def test_kl_extra_known_logprob_tightens_lower_bound():
    # the target's top-2 is c, d; the echoed token a has target logprob ln .05 (known extra)
    p, q = lp(a=0.6, b=0.3), lp(c=0.5, d=0.3)
    without = topk_kl(p, q, k=2)
    with_extra = topk_kl(p, q, k=2, q_extra=lp(a=0.05))
    assert with_extra.lower >= without.lower
    # estimate by hand: q known c .5, d .3, a .05 -> T_q = .15, cap .15; p known a .6, b .3 -> T_p = .1.
    # p missing c, d: each min(.1, .1/3) = 1/30, p_rest = 1/30; q missing b: min(.15, .15/2) = .075,
    # q_rest = .075. Terms: .6 ln(.6/.05) + .3 ln(.3/.075) + (1/30)[ln((1/30)/.5) + ln((1/30)/.3) + ln((1/30)/.075)]
    t = 1 / 30
    want = 0.6 * log(0.6 / 0.05) + 0.3 * log(4) + t * (log(t / 0.5) + log(t / 0.3) + log(t / 0.075))
    assert with_extra.estimate == pytest.approx(want, abs=1e-12)


def test_kl_nan_propagates_and_empty_is_refused():
    e = topk_kl({"a": math.nan}, lp(a=1.0))
    assert math.isnan(e.estimate) and math.isnan(e.lower) and math.isnan(e.upper)
    with pytest.raises(ValueError):
        topk_kl({}, lp(a=1.0))


def test_kl_bounds_hold_on_random_distributions():
    # lower <= true full-vocab KL always (data processing); lower <= estimate <= upper always
    rng = np.random.default_rng(0)
    for _ in range(300):
        vocab, k = int(rng.integers(5, 80)), int(rng.integers(1, 10))
        lp_logits = rng.normal(size=vocab) * rng.uniform(0.5, 4)
        lq_logits = lp_logits + rng.normal(size=vocab) * rng.uniform(0, 3)
        true = full_kl(lp_logits, lq_logits)
        pl = lp_logits - np.log(np.exp(lp_logits).sum())
        ql = lq_logits - np.log(np.exp(lq_logits).sum())
        p_top = {int(i): float(pl[i]) for i in np.argsort(-pl)[:k]}
        q_top = {int(i): float(ql[i]) for i in np.argsort(-ql)[:k]}
        tok = int(np.argmax(pl))
        e = topk_kl(p_top, q_top, p_extra={tok: float(pl[tok])}, q_extra={tok: float(ql[tok])}, k=k)
        assert e.lower <= true + 1e-9
        assert e.lower <= e.estimate <= e.upper


@pytest.mark.parametrize(
    ("p", "q", "agree"),
    [
        ({"a": -0.1, "b": -2.0}, {"a": -0.2, "b": -1.9}, True),
        ({"a": -0.1, "b": -2.0}, {"b": -0.1, "a": -3.0}, False),
        ({"a": -0.1}, {"c": -0.1}, False),  # ref's top-1 not even listed by the target
        ({"a": -0.7, "b": -0.7}, {"b": -0.1, "a": -3.0}, True),  # exact tie in the ref: either top counts
    ],
)
def test_top1_agree(p, q, agree):
    assert top1_agree(p, q) is agree


def test_delta_p():
    assert delta_p(log(0.8), log(0.6)) == pytest.approx(0.2, abs=1e-15)
    assert delta_p(log(0.5), log(0.9)) == pytest.approx(-0.4, abs=1e-15)


def test_teacher_forced_stats_two_positions():
    same = lp(a=0.5, b=0.5)
    positions = [
        # identical: KL 0, top-1 tie shared -> agree, dp 0
        PositionLogprobs("a", log(0.5), log(0.5), same, same),
        # ref a .75 b .25, target a .25 b .75: KL = .75 ln3 + .25 ln(1/3) = .5 ln3 = 0.549306;
        # top-1 a vs b -> disagree; dp = .75 - .25 = .5
        PositionLogprobs("a", log(0.75), log(0.25), lp(a=0.75, b=0.25), lp(a=0.25, b=0.75)),
    ]
    s = teacher_forced_stats(positions)
    assert s is not None
    half_ln3 = 0.5 * log(3)
    assert s.position_kl == pytest.approx([0.0, half_ln3], abs=1e-12)
    assert s.kl_mean == pytest.approx(half_ln3 / 2, abs=1e-12)
    assert s.kl_lower_mean == pytest.approx(half_ln3 / 2, abs=1e-12)
    assert s.kl_p99 == pytest.approx(0.99 * half_ln3, abs=1e-12)  # linear interpolation of [0, x]
    assert s.top1_agreement == 0.5
    assert s.dp_mean == pytest.approx(0.25, abs=1e-12)
    assert s.dp_rms == pytest.approx(math.sqrt(0.125), abs=1e-12)  # sqrt((0^2 + .5^2) / 2)
    assert s.n_positions == 2
    assert teacher_forced_stats([]) is None


def test_full_kl_hand_values():
    # softmax([0, 0]) = [.5, .5]; softmax([0, ln3]) = [.25, .75] -> 0.143841036
    assert full_kl(np.array([0.0, 0.0]), np.array([0.0, log(3)])) == pytest.approx(0.143841036, abs=1e-9)
    # logits are shift-invariant
    assert full_kl(np.array([5.0, 5.0]), np.array([-2.0, -2.0 + log(3)])) == pytest.approx(
        0.143841036, abs=1e-9
    )
    # a masked (-inf) token in p contributes nothing: p = [1, 0], q = [.5, .5] -> ln 2
    assert full_kl(np.array([0.0, -np.inf]), np.array([0.0, 0.0])) == pytest.approx(log(2), abs=1e-12)
    # q = 0 where p > 0 -> +inf
    assert full_kl(np.array([0.0, 0.0]), np.array([0.0, -np.inf])) == math.inf
    # rows: [2, vocab] -> [2]
    rows = full_kl(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[0.0, log(3)], [1.0, 1.0]]))
    assert rows == pytest.approx([0.143841036, 0.0], abs=1e-9)
    with pytest.raises(ValueError):
        full_kl(np.zeros(3), np.zeros(4))


def test_full_kl_matches_topk_kl_when_everything_is_listed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=12), rng.normal(size=12)
    pa, pb = a - np.log(np.exp(a).sum()), b - np.log(np.exp(b).sum())
    e = topk_kl(dict(enumerate(pa.tolist())), dict(enumerate(pb.tolist())))
    assert e.estimate == pytest.approx(full_kl(a, b), abs=1e-12)
