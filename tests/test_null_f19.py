"""F19 / t20 #6: a noise floor (file or in-run A/A) sets exactness limits from the null's upper 95%
bound, as the rounding twin does and README / docs/design.md say; it used the point value, so
the same A/A data gave a limit half as wide. Its TIE margin is the p90 of the A/A divergence
margins (as the twin's, and as `[thresholds] tie_margin`'s comment says), not the largest. A floor
file from an older difftest (point values only) still loads, its limits noted as narrower.
Numbers worked by hand in the comments."""

from __future__ import annotations

import pytest

from difftest.metrics.aggregate import aggregate_prompts
from difftest.noise import NoiseFloor, floor_from_comparisons
from difftest.null import exactness_limits, null_from_floor, null_from_twin, tie_margin
from difftest.results import Comparison, PromptDiff

MARGINS = [0.01, 0.02, 0.03, 0.04, 0.5]


def _diverged(i: int, margin: float) -> PromptDiff:
    """An A/A prompt whose two runs diverged where the reference's top-1/top-2 margin was `margin`."""
    return PromptDiff(
        prompt_id=f"p{i}", prompt="x", first_divergence=1, divergence_margin=margin,
        ref_alternatives={"a": 0.0, "b": -margin},
    )  # fmt: skip


def _aa() -> Comparison:
    """The twin test's numbers (tests/test_null.py::test_twin_limits_worked_by_hand) as an A/A."""
    return Comparison(
        kind="noise", baseline="gold", target="gold@serial",
        prompts=[_diverged(i, m) for i, m in enumerate(MARGINS)],
        aggregate={"n_prompts": 5.0, "kl_mean": 0.004, "kl_p99": 0.2, "top1_agreement": 0.97, "token_match": 0.8},
        ci={"kl_mean": [0.002, 0.006], "top1_agreement": [0.95, 0.99], "token_match": [0.7, 0.9]},
    )  # fmt: skip


def test_floor_limits_are_the_upper_95_bound_x_margin_worked_by_hand() -> None:
    floor = floor_from_comparisons([_aa()])
    assert floor.kl_mean == 0.004 and floor.kl_mean_ci_high == 0.006  # the point kept for `diff`
    lim = exactness_limits(null_from_floor(floor))
    assert lim["kl_mean"].value == pytest.approx(0.018)  # CI high .006 x 3 (was the point: .012)
    assert lim["top1_agreement"].value == pytest.approx(0.85)  # 1 - (1 - .95) x 3 (was 1 - .03 x 3)
    assert lim["token_match"].value == pytest.approx(0.1)  # 1 - (1 - .7) x 3 (was 1 - .2 x 3 = .4)
    assert lim["kl_p99"].value == pytest.approx(0.6)  # pooled p99 .2 x 3, as the twin's
    assert lim["kl_mean"].note == "floor file 0.006 x3"


@pytest.mark.parametrize("in_run", [False, True], ids=["floor file", "in-run A/A"])
def test_the_same_aa_data_gives_the_twins_limits(in_run: bool) -> None:
    """The tester's repro: one A/A comparison of 10 prompts, mean KL 0.002; the twin's limit rests
    on its CI high, the floor's on the point (0.006). Now both on the CI high x 3."""
    kls = [0.001, 0.002, 0.0, 0.004, 0.0, 0.003, 0.0, 0.001, 0.0, 0.009]
    prompts = [
        PromptDiff(prompt_id=f"p{i}", prompt="x", match_rate=1.0, exact=True, ref_token_ids=[1] * 4,
                   tgt_token_ids=[1] * 4, kl_mean=k, kl_lower=k, kl_upper=k, top1_agreement=1.0,
                   dp_mean=0.0, dp_rms=0.0, position_kl=[k] * 4)
        for i, k in enumerate(kls)
    ]  # fmt: skip
    agg, ci = aggregate_prompts(prompts)
    aa = Comparison(kind="noise", baseline="g", target="g@serial", prompts=prompts, aggregate=agg, ci=ci)
    assert agg["kl_mean"] == pytest.approx(0.002) and ci["kl_mean"][1] > 0.0035  # the point is half of it
    as_floor = null_from_floor(floor_from_comparisons([aa]), in_run=in_run).limit("kl_mean")
    assert as_floor.value == pytest.approx(null_from_twin(aa).limit("kl_mean").value)
    assert as_floor.value == pytest.approx(3 * ci["kl_mean"][1])


def test_the_tie_margin_is_the_p90_of_the_aa_margins() -> None:
    """Margins .01 .02 .03 .04 .5: p90 (linear) = .04 + 0.6 x (.5 - .04) = 0.316 -- the twin's
    for the same margins; the largest (.5) before."""
    floor = floor_from_comparisons([_aa()])
    assert floor.tie_margin == pytest.approx(0.316)
    value, note = tie_margin(null_from_floor(floor))
    assert value == pytest.approx(0.316) and note == "p90 of floor file divergence margins"
    assert value == pytest.approx(tie_margin(null_from_twin(_aa()))[0])


def test_a_failed_aa_request_is_not_noise_in_the_bound_either() -> None:
    """4 answered prompts matching 0.5 each + 1 lost: the aggregate counts the lost one as 0 (0.4),
    the floor the answered alone: point and bound 1 - 0.5 = 0.5 (every resample's mean is 0.5)."""
    prompts = [PromptDiff(prompt_id=f"p{i}", prompt="x", match_rate=0.5, exact=False) for i in range(4)]
    prompts.append(PromptDiff(prompt_id="p4", prompt="x", error="ref: HTTP 500"))
    agg, ci = aggregate_prompts(prompts)
    assert agg["token_match"] == pytest.approx(0.4) and ci["token_match"][0] < 0.4
    aa = Comparison(kind="noise", baseline="g", target="g@serial", prompts=prompts, aggregate=agg, ci=ci)
    floor = floor_from_comparisons([aa])
    assert floor.token_mismatch == pytest.approx(0.5) and floor.token_mismatch_ci_high == pytest.approx(0.5)


def test_the_bounds_survive_the_file_round_trip() -> None:
    floor = floor_from_comparisons([_aa()], reference="gold")
    loaded = NoiseFloor.from_json(floor.to_json())
    assert loaded == floor and loaded.point_values_only() == ()
    assert (loaded.top1_disagreement_ci_high, loaded.token_mismatch_ci_high) == pytest.approx((0.05, 0.3))


def test_an_older_floor_file_loads_with_its_point_values_and_says_so() -> None:
    """A file written before the bounds were stored: limits from its point values (kl 0.004 x 3 =
    0.012, token match 1 - 0.2 x 3 = 0.4), and the trust line names them and `difftest noise`."""
    old = NoiseFloor.from_json(
        '{"schema": "difftest-noise-floor", "version": 1, "kl_mean": 0.004, "token_mismatch": 0.2,'
        ' "tie_margin": 0.5, "reference": "gold"}'
    )
    assert old.point_values_only() == ("kl_mean", "token_mismatch")
    null = null_from_floor(old)
    lim = exactness_limits(null)
    assert lim["kl_mean"].value == pytest.approx(0.012) and lim["token_match"].value == pytest.approx(0.4)
    assert "point values (kl_mean, token_mismatch), not upper 95% bounds" in null.trust
    assert "largest A/A margin" in null.trust and "`difftest noise CONFIG`" in null.trust
    assert "re-run it" in null_from_floor(old, in_run=True).trust  # an older report's in-run floor


def test_a_current_floor_says_nothing_of_point_values() -> None:
    assert "point values" not in null_from_floor(floor_from_comparisons([_aa()])).trust
    assert "point values" not in null_from_floor(NoiseFloor()).trust  # nothing measured: nothing to say
