"""Noise floor from A/A comparisons, and its file format."""

from __future__ import annotations

import math

import pytest

from difftest.errors import NoiseFloorError
from difftest.noise import NoiseFloor, floor_from_comparisons
from difftest.results import Comparison, LayerDiff, LayerPoint, PromptDiff


def _aa(agg: dict[str, float], prompts: list[PromptDiff] | None = None) -> Comparison:
    return Comparison(kind="exactness", baseline="ref", target="ref", prompts=prompts or [], aggregate=agg)


def _point(name: str, cos: float, ratio: float, rel: float) -> LayerPoint:
    return LayerPoint(
        name=name,
        layer=0,
        kind="residual",
        cosine=cos,
        norm_ratio=ratio,
        rel_err=rel,
        max_abs=0.0,
        sqnr_db=60.0,
    )


def test_floor_is_the_worst_aa_value_per_metric():
    diverged = PromptDiff("p1", "x", first_divergence=5, ref_alternatives={"a": -0.70, "b": -0.72, "c": -3.0})
    diverged2 = PromptDiff("p2", "y", first_divergence=2, ref_alternatives={"a": -0.60, "b": -0.70})
    same = PromptDiff("p3", "z", first_divergence=None)
    failed = PromptDiff("p4", "w", error="timeout")
    comps = [
        _aa(
            {
                "kl_mean": 0.001,
                "kl_p99": 0.02,
                "top1_agreement": 0.99,
                "token_match": 0.95,
                "exact_match": 0.9,
                "dp_rms": 0.004,
                "failed_requests": 0.0,
            },
            [diverged, same],
        ),
        _aa(
            {
                "kl_mean": 0.003,
                "kl_p99": 0.01,
                "top1_agreement": 0.97,
                "token_match": 1.0,
                "exact_match": 1.0,
                "failed_requests": 1.0,
            },
            [diverged2, failed],
        ),
    ]
    layers = [
        LayerDiff(
            against="ref",
            kind="exactness",
            points=[
                _point("model.layers.0", 0.99999, 1.001, 0.002),
                _point("model.layers.1", 0.9999, 0.998, 0.01),
            ],
        )
    ]
    f = floor_from_comparisons(comps, layers, reference="ref", how=["repeat", "concurrency 1 vs 8"])
    assert f.kl_mean == 0.003 and f.kl_p99 == 0.02 and f.dp_rms == 0.004
    assert f.top1_disagreement == pytest.approx(0.03)  # 1 - min(.99, .97)
    assert f.token_mismatch == pytest.approx(0.05)  # 1 - min(.95, 1.0)
    assert f.exact_mismatch == pytest.approx(0.1)
    # margins .02 (p1) and .10 (p2): their p90, .02 + 0.9 x .08 (as the twin's; was the largest, .10)
    assert f.tie_margin == pytest.approx(0.092)
    assert f.layer_cosine_deficit == pytest.approx(1e-4)
    assert f.layer_rel_err == 0.01
    assert f.layer_norm_dev == pytest.approx(0.002)  # |0.998 - 1|
    assert (f.n_comparisons, f.n_prompts, f.failed_requests, f.divergences) == (2, 4, 1, 2)
    assert f.how == ("repeat", "concurrency 1 vs 8")
    assert "2 A/A comparison(s) over 4 prompts (repeat, concurrency 1 vs 8)" in f.describe()


def test_unmeasured_metrics_stay_none():
    f = floor_from_comparisons([_aa({"token_match": 1.0})])
    assert f.token_mismatch == 0.0
    assert f.kl_mean is None and f.tie_margin is None and f.layer_cosine_deficit is None


def test_nan_or_nothing_gives_no_floor():
    with pytest.raises(NoiseFloorError, match="NaN kl_mean"):
        floor_from_comparisons([_aa({"kl_mean": math.nan})])
    with pytest.raises(NoiseFloorError, match="NaN"):
        floor_from_comparisons([_aa({})], [LayerDiff("r", "exactness", [_point("l", math.nan, 1.0, 0.0)])])
    with pytest.raises(NoiseFloorError, match="no A/A"):
        floor_from_comparisons([])


def test_json_round_trip_including_inf():
    f = NoiseFloor(
        kl_mean=0.002,
        kl_p99=math.inf,
        tie_margin=0.03,
        n_comparisons=3,
        reference="ref",
        how=("repeat",),
        created_at="2025-01-01T00:00:00Z",
    )
    text = f.to_json()
    assert '"inf"' in text and '"schema": "difftest-noise-floor"' in text
    assert NoiseFloor.from_json(text) == f


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not JSON"),
        ('{"kl_mean": 0.1}', "not a difftest noise-floor file"),
        ('{"schema": "difftest-noise-floor", "version": 99}', "version 99"),
        ('{"schema": "difftest-noise-floor", "version": 1, "kl_man": 0.1}', "unknown key.*kl_man"),
        ('{"schema": "difftest-noise-floor", "version": 1, "kl_mean": "nan"}', "NaN for kl_mean"),
        # a number as a string loaded, then crashed the run at judge time with a traceback
        (
            '{"schema": "difftest-noise-floor", "version": 1, "kl_mean": "0.001"}',
            'kl_mean is "0.001", not a number',
        ),
        (
            '{"schema": "difftest-noise-floor", "version": 1, "kl_p99": [0.1]}',
            "kl_p99 is \\[0.1\\], not a number",
        ),
        (
            '{"schema": "difftest-noise-floor", "version": 1, "kl_mean": -0.01}',
            "kl_mean is -0.01, not a number >= 0",
        ),
        ('{"schema": "difftest-noise-floor", "version": 1, "kl_mean": true}', "kl_mean is true"),
        (
            '{"schema": "difftest-noise-floor", "version": 1, "n_prompts": "6"}',
            'n_prompts is "6", not an integer',
        ),
        (
            '{"schema": "difftest-noise-floor", "version": 1, "how": "repeat"}',
            "how is .*not a list of strings",
        ),
        ('{"schema": "difftest-noise-floor", "version": 1, "reference": 3}', "reference is 3, not a string"),
    ],
)
def test_bad_files_are_refused_by_name(text, match):
    with pytest.raises(NoiseFloorError, match=match):
        NoiseFloor.from_json(text)


def test_a_failed_request_is_no_noise():
    """The bug: HTTP 500 on one prompt of 6, every answered prompt identical, gave token_mismatch
    0.1667 (the aggregate counts a failed prompt as a full mismatch), which widened every limit."""
    from difftest.metrics.aggregate import aggregate_prompts
    from difftest.noise import floor_from_comparisons
    from difftest.results import Comparison, PromptDiff

    prompts = [PromptDiff(f"p{i}", "x", match_rate=1.0, exact=True, first_divergence=None) for i in range(5)]
    prompts.append(PromptDiff("p5", "x", error="baseline: HTTP 500"))
    agg, ci = aggregate_prompts(prompts)
    assert abs(agg["token_match"] - 5 / 6) < 1e-12  # the aggregate: a failure as a mismatch
    floor = floor_from_comparisons([Comparison("noise", "ref", "ref", prompts, agg, ci)])
    assert floor.token_mismatch == 0.0 and floor.exact_mismatch == 0.0 and floor.failed_requests == 1
