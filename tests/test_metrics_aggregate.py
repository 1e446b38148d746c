"""PromptDiff list -> aggregate keys and CIs; failed prompts never leave the denominators."""

from __future__ import annotations

import math
from math import log

import pytest
import sacrebleu

from difftest.metrics.aggregate import aggregate_prompts, fill_generation, fill_teacher_forced
from difftest.metrics.logprobs import PositionLogprobs, teacher_forced_stats
from difftest.results import PromptDiff


def _prompts() -> list[PromptDiff]:
    p1 = PromptDiff(
        "p1",
        "a",
        ref_text="one two three four",
        tgt_text="one two three four",
        ref_token_ids=[1, 2, 3, 4],
        tgt_token_ids=[1, 2, 3, 4],
        match_rate=1.0,
        exact=True,
        first_divergence=None,
        kl_mean=0.01,
        kl_lower=0.005,
        kl_upper=0.02,
        top1_agreement=1.0,
        dp_mean=0.0,
        dp_rms=0.1,
        position_kl=[0.0, 0.01, 0.02, 0.01],
    )
    p2 = PromptDiff(
        "p2",
        "b",
        ref_text="the cat sat down",
        tgt_text="the dog ran off",
        ref_token_ids=[5, 6, 7, 8],
        tgt_token_ids=[5, 9, 10, 11],
        match_rate=0.25,
        exact=False,
        first_divergence=1,
        divergence_kind="DRIFT",
        kl_mean=0.3,
        kl_lower=0.2,
        kl_upper=0.9,
        top1_agreement=0.5,
        dp_mean=0.2,
        dp_rms=0.3,
        position_kl=[0.0, 0.4, 0.5, 0.3],
    )
    p3 = PromptDiff("p3", "c", error="HTTP 500", ref_text="hello world")
    return [p1, p2, p3]


def test_aggregate_hand_values():
    agg, ci = aggregate_prompts(_prompts())
    assert agg["n_prompts"] == 3 and agg["failed_requests"] == 1
    assert agg["failed_rate"] == pytest.approx(1 / 3)
    assert agg["token_match"] == pytest.approx((1.0 + 0.25 + 0.0) / 3)  # failed counts as 0
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["garbled_rate"] == pytest.approx(2 / 3)  # p2 (0.25) and the failed p3
    assert agg["median_first_divergence"] == 1.0  # median of [4 (no divergence: length), 1, 0 (failed)]
    assert (agg["tie"], agg["drift"], agg["wrong"]) == (0, 1, 0)
    assert agg["tf_prompts"] == 2  # teacher-forced means over the two prompts that have it
    assert agg["kl_mean"] == pytest.approx((0.01 + 0.3) / 2)
    assert agg["kl_lower_mean"] == pytest.approx(0.1025) and agg["kl_upper_mean"] == pytest.approx(0.46)
    assert agg["top1_agreement"] == pytest.approx(0.75)
    assert agg["dp_mean"] == pytest.approx(0.1)
    assert agg["dp_rms"] == pytest.approx(math.sqrt((0.1**2 + 0.3**2) / 2))
    # pooled positions [0, .01, .02, .01, 0, .4, .5, .3]: sorted ... .4, .5 -> p99 = .4 + .93 * .1
    assert agg["kl_p99"] == pytest.approx(0.4 + 0.93 * 0.1)
    hyps, refs = (
        ["one two three four", "the dog ran off", ""],
        ["one two three four", "the cat sat down", "hello world"],
    )
    assert agg["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert agg["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert set(ci) == {"token_match", "exact_match", "kl_mean", "kl_upper_mean", "top1_agreement", "dp_mean"}
    lo, hi = ci["token_match"]
    assert lo <= agg["token_match"] <= hi
    assert aggregate_prompts(_prompts()) == (agg, ci)  # seeded
    # per-prompt sentence scores filled from the same statistics; the failed prompt stays None
    ps = _prompts()
    aggregate_prompts(ps)
    assert ps[0].bleu == 100.0 and ps[0].chrf == 100.0
    assert ps[1].bleu == pytest.approx(
        sacrebleu.sentence_bleu("the dog ran off", ["the cat sat down"]).score, abs=1e-12
    )
    assert ps[1].chrf == pytest.approx(
        sacrebleu.sentence_chrf("the dog ran off", ["the cat sat down"]).score, abs=1e-12
    )
    assert ps[2].bleu is None


def test_unmeasured_keys_are_absent_not_zero():
    p = PromptDiff("p", "x", ref_text="a", tgt_text="a", match_rate=1.0, exact=True)
    agg, _ = aggregate_prompts([p])
    assert "kl_mean" not in agg and "top1_agreement" not in agg and "kl_p99" not in agg
    assert agg["token_match"] == 1.0
    assert aggregate_prompts([]) == ({"n_prompts": 0.0}, {})


def test_nan_propagates_into_the_aggregate():
    p = PromptDiff("p", "x", match_rate=1.0, exact=True, kl_mean=math.nan, top1_agreement=1.0)
    agg, ci = aggregate_prompts(
        [p, PromptDiff("q", "y", match_rate=1.0, exact=True, kl_mean=0.1, top1_agreement=1.0)]
    )
    assert math.isnan(agg["kl_mean"]) and all(math.isnan(v) for v in ci["kl_mean"])


def test_fill_generation_and_teacher_forced():
    p = PromptDiff("p", "x", ref_text="a b c", tgt_text="a b d")
    top = [{1: -0.1}, {2: -0.69, 9: -0.71}, {3: -0.2, 4: -2.0}]
    fill_generation(
        p,
        [1, 2, 3],
        [1, 9, 3],
        ref_top_logprobs=top,
        tgt_top_logprobs=[{1: -0.1}, {9: -0.6}, {3: -0.1}],
        tie_margin=0.05,
    )
    assert (p.match_rate, p.exact, p.common_prefix, p.first_divergence) == (pytest.approx(2 / 3), False, 1, 1)
    assert p.divergence_kind == "TIE"  # margin .02 <= .05 and token 9 is the ref's runner-up
    assert p.ref_alternatives == {"2": -0.69, "9": -0.71} and p.tgt_alternatives == {"9": -0.6}
    assert p.garbled is False and p.bleu is None  # text scores come from aggregate_prompts
    q = PromptDiff("q", "y")
    fill_generation(q, [1, 2], [1, 3], ref_top_logprobs=None, tie_margin=0.05)
    assert q.divergence_kind is None  # no logprobs: unclassified, never guessed
    stats = teacher_forced_stats(
        [
            PositionLogprobs(
                "a", log(0.75), log(0.25), {"a": log(0.75), "b": log(0.25)}, {"a": log(0.25), "b": log(0.75)}
            )
        ]
    )
    fill_teacher_forced(q, stats)
    assert (
        q.kl_mean == pytest.approx(0.5 * log(3)) and q.top1_agreement == 0.0 and q.position_kl == [q.kl_mean]
    )


def test_broken_answers_are_counted_apart_from_lost_requests() -> None:
    """4 prompts: one lost (HTTP 500), one broken (NaN logprobs from the target): failed 2/4, of
    which broken 1/4 and lost 1/4 (failed_rate counts lost requests only)."""
    ok = _prompts()[:2]
    lost = PromptDiff("p3", "c", error="target: HTTP 500")
    nan = PromptDiff("p4", "d", error="target: NaN logprobs at generated positions [0]", broken=True)
    agg, _ = aggregate_prompts([*ok, lost, nan])
    assert agg["failed_requests"] == 2 and agg["failed_rate"] == 0.25
    assert agg["broken_answers"] == 1 and agg["broken_rate"] == 0.25
    # a stray flag on an answered prompt counts nothing: only errors are answers that failed
    agg, _ = aggregate_prompts([*ok, PromptDiff("p5", "e", broken=True)])
    assert agg["broken_answers"] == 0
