"""The null model and the verdict rules of issue 15: limits from the rounding twin, checks that
cannot fail marked not informative, INCONCLUSIVE on small or straddling samples, classification
at judge time. Numbers worked by hand in the comments."""

from __future__ import annotations

import math

import pytest

from difftest.metrics.aggregate import classify_prompts
from difftest.noise import NoiseFloor
from difftest.null import (
    ABS_MIN,
    NullModel,
    exactness_limits,
    informative,
    null_from_floor,
    null_from_twin,
    pick_null,
    replay_bound,
    tie_margin,
)
from difftest.results import Comparison, LayerDiff, LayerPoint, PromptDiff, RunResult, TargetResult
from difftest.verdict import budget_for, judge_target


def _prompt(i: int, **fields: object) -> PromptDiff:
    return PromptDiff(prompt_id=f"p{i}", prompt="x", **fields)  # type: ignore[arg-type]


def test_twin_limits_worked_by_hand() -> None:
    twin = Comparison(
        kind="null", baseline="gold", target="gold-twin",
        prompts=[_prompt(i, divergence_margin=m) for i, m in enumerate([0.01, 0.02, 0.03, 0.04, 0.5])],
        aggregate={"n_prompts": 5.0, "kl_mean": 0.004, "kl_p99": 0.2, "top1_agreement": 0.97, "token_match": 0.8},
        ci={"kl_mean": [0.002, 0.006], "top1_agreement": [0.95, 0.99], "token_match": [0.7, 0.9]},
    )  # fmt: skip
    layers = LayerDiff(against="gold", kind="null", points=[
        LayerPoint("model.layers.0", 0, "residual", 1.0, 1.0, 0.001, 0.0, 60.0),
        LayerPoint("logits", None, "logits", 1.0, 1.0, 0.02, 0.0, 30.0),
        LayerPoint("model.layers.0.mlp.down_proj", 0, "linear", 1.0, 1.0, 0.9, 0.0, 1.0),  # not residual
    ])  # fmt: skip
    null = null_from_twin(twin, layers, amplitude=2.5e-4)
    lim = exactness_limits(null)
    assert lim["kl_mean"].value == pytest.approx(0.018)  # CI high .006 x 3
    assert lim["kl_p99"].value == pytest.approx(0.6)  # pooled p99 .2 x 3
    assert lim["top1_agreement"].value == pytest.approx(0.85)  # 1 - (1 - .95) x 3
    assert lim["token_match"].value == pytest.approx(0.1)  # 1 - (1 - .7) x 3 ...
    assert not lim["token_match"].informative  # ... under 0.25: a garbled target would pass it
    assert "broken target would pass" in lim["token_match"].note
    assert lim["point_rel_err_max"].value == pytest.approx(0.06)  # worst residual/logits .02 x 3
    # TIE margin: p90 of the twin's own divergence margins (linear interpolation: .04 + .9*(.5-.04)*... )
    assert tie_margin(null)[0] == pytest.approx(0.04 + 0.6 * (0.5 - 0.04))
    assert "twin" in null.description and "module noise 0.00025" in null.description


def test_informative_rules() -> None:
    assert informative("token_match", 0.25) and not informative("token_match", 0.0375)
    assert informative("kl_mean", 1.0) and not informative("kl_mean", 1.01)
    assert informative("local_rel_err_max", 99.0)  # no rule: always informative


def test_a_floor_that_widens_token_match_is_reported_not_informative() -> None:
    # today's CPU case: the golden's A/A measured token mismatch 0.32 -> 1 - 0.96 = 0.04
    null = null_from_floor(NoiseFloor(token_mismatch=0.32, kl_mean=0.0011, top1_disagreement=0.02))
    exact = Comparison("exactness", "gold", "t", aggregate={"failed_rate": 0.0, "token_match": 0.1,
                                                              "kl_mean": 0.044, "top1_agreement": 0.9})  # fmt: skip
    acc = Comparison("accuracy", "ref", "t", aggregate={"failed_rate": 0.0, "token_match": 0.3,
                                                         "kl_mean": 0.02, "top1_agreement": 0.9})  # fmt: skip
    v = judge_target("t", "fail", exact, acc, budget_for("fp8-block"), null)
    tm = next(c for c in v.parts[0].checks if c.name == "token_match")
    assert tm.limit == pytest.approx(0.04) and not tm.informative and "[not informative]" in tm.describe()
    assert not tm.fails  # it decides nothing ...
    assert v.label == "FAIL"  # ... and the verdict rests on KL (0.044 > 0.005) and top-1 (0.9 < 0.94)
    assert all("token_match" not in r for r in v.reasons)


def test_nothing_informative_left_is_inconclusive() -> None:
    null = null_from_floor(NoiseFloor(token_mismatch=0.9))
    exact = Comparison("exactness", "gold", "t", aggregate={"token_match": 0.5})
    acc = Comparison("accuracy", "ref", "t", aggregate={})
    v = judge_target("t", "pass", exact, acc, budget_for("none"), null,
                     skipped={"accuracy.teacher_forced": "no echo", "accuracy.tokens": "x",
                              "accuracy.requests": "x", "exactness.requests": "x",
                              "exactness.teacher_forced": "no echo"})  # fmt: skip
    assert v.label == "INCONCLUSIVE" and not v.passed and not v.meets_expectation
    assert "inconclusive: no informative check could be made" in v.reasons


def test_three_prompts_straddling_the_limit_are_inconclusive() -> None:
    # issue 15: `compare` with 3 prompts FAILed top-1 0.9167 < 0.95 with no word about the sample
    prompts = [_prompt(i, top1_agreement=v, kl_mean=0.001, match_rate=1.0)
               for i, v in enumerate([0.875, 0.917, 0.958])]  # fmt: skip
    acc = Comparison("accuracy", "ref", "t", prompts=prompts, aggregate={
        "n_prompts": 3.0, "failed_rate": 0.0, "token_match": 1.0, "kl_mean": 0.001, "top1_agreement": 0.9167},
        ci={"top1_agreement": [0.875, 0.958], "kl_mean": [0.001, 0.001], "token_match": [1.0, 1.0]})  # fmt: skip
    v = judge_target("t", "pass", None, acc, budget_for("none"), None)
    top1 = next(c for c in v.parts[1].checks if c.name == "top1_agreement")
    assert not top1.passed and not top1.decided and top1.ci == [0.875, 0.958]
    # half width .0415, gap .0333: 3 x (.0415/.0333)^2 = 4.66 -> 5 prompts
    assert top1.prompts_to_decide == 5
    assert v.label == "INCONCLUSIVE"
    assert any("straddles the limit" in r and "~5 prompts would decide" in r for r in v.reasons)
    # a decisive failure still fails: every prompt far under the limit
    far = [_prompt(i, top1_agreement=0.5, kl_mean=0.001, match_rate=1.0) for i in range(3)]
    bad = Comparison("accuracy", "ref", "t", prompts=far, aggregate=dict(acc.aggregate, top1_agreement=0.5),
                     ci={"top1_agreement": [0.5, 0.5]})  # fmt: skip
    assert judge_target("t", "pass", None, bad, budget_for("none"), None).label == "FAIL"


def test_gate_is_inconclusive_not_pass() -> None:
    prompts = [_prompt(i, top1_agreement=v) for i, v in enumerate([0.875, 0.917, 0.958])]
    acc = Comparison("accuracy", "ref", "t", prompts=prompts,
                     aggregate={"n_prompts": 3.0, "failed_rate": 0.0, "token_match": 1.0, "kl_mean": 0.001,
                                "top1_agreement": 0.9167}, ci={"top1_agreement": [0.875, 0.958]})  # fmt: skip
    t = TargetResult(name="t", scheme="none", expect="pass", comparisons=[acc])
    t.verdict = judge_target("t", "pass", None, acc, budget_for("none"), None)
    run = RunResult(reference="ref", targets=[t])
    assert run.gate == "INCONCLUSIVE" and not run.gate_passed


def test_classification_is_derived_at_judge_time() -> None:
    prompts = [
        _prompt(0, divergence_margin=0.01, divergence_gap=0.01),  # a near-tie
        _prompt(1, divergence_margin=0.30, divergence_gap=0.30),  # runner-up, but not close
        _prompt(2, divergence_margin=0.02, divergence_gap=None),  # target's token not in ref top-k
        _prompt(3, divergence_kind="LENGTH"),
    ]
    assert classify_prompts(prompts, 0.05) == {"tie": 1.0, "drift": 1.0, "wrong": 1.0}
    assert [p.divergence_kind for p in prompts] == ["TIE", "DRIFT", "WRONG", "LENGTH"]
    assert classify_prompts(prompts, 0.5) == {"tie": 2.0, "drift": 0.0, "wrong": 1.0}  # re-judged


def test_replay_bound_by_dtype_and_null_choice() -> None:
    assert replay_bound("float16")[0] == pytest.approx(2 * 2 * 2**-11)
    assert replay_bound("bfloat16")[0] == pytest.approx(2 * 2 * 2**-8)
    assert replay_bound("float32")[0] == pytest.approx(5e-4)
    assert replay_bound(None)[0] == replay_bound("float32")[0]
    assert pick_null(None, None).source == "none"
    assert pick_null(None, NoiseFloor(kl_mean=0.0, token_mismatch=0.0)).trust.startswith("weak")


def test_rejudge_uses_the_in_run_floor_the_run_recorded() -> None:
    """`report --thresholds` re-judges with the nulls the run used: a `null = "aa"` run's in-run
    A/A floor is read back per golden from report.json, not replaced by absolute minimums."""
    from difftest.judge import rejudge

    floor = NoiseFloor(kl_mean=0.004, reference="g")
    agg = {"failed_rate": 0.0, "token_match": 1.0, "kl_mean": 0.001, "top1_agreement": 1.0}
    t = TargetResult(name="t", scheme="fp8-block", expect="pass", golden="g", comparisons=[
        Comparison("exactness", "g", "t", aggregate=dict(agg)), Comparison("accuracy", "ref", "t", aggregate=dict(agg))])  # fmt: skip
    run = RunResult(reference="ref", targets=[t], noise_floor={"in_run": {"g": floor.to_dict()}})
    rejudge(run, {"fp8-block": {}})
    kl = next(c for c in t.verdict.parts[0].checks if c.name == "kl_mean")  # type: ignore[union-attr]
    assert kl.limit == pytest.approx(0.012) and kl.note == "in-run A/A 0.004 x3"


def test_a_nan_null_is_named_unusable_not_below_the_minimum():
    """A twin whose KL came out NaN: the absolute minimum, with a note that says why (before:
    'twin nan x3 is below it')."""
    broken = NullModel("twin", "a broken twin", "measured", kl_mean=math.nan)
    lim = broken.limit("kl_mean")
    assert lim.value == ABS_MIN["kl_mean"] and lim.note == "absolute minimum 0.005 (twin: NaN, unusable)"
    assert NullModel("twin", "d", "t", kl_mean=math.inf).limit("kl_mean").value == math.inf
