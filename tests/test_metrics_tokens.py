"""Token match, first divergence, TIE / DRIFT / WRONG and garbled: hand-worked tables."""

from __future__ import annotations

import math

import pytest

from difftest.metrics.tokens import classify_divergence, is_garbled, token_match, top_margin


@pytest.mark.parametrize(
    ("ref", "tgt", "rate", "exact", "prefix", "first"),
    [
        ([1, 2, 3], [1, 2, 3], 1.0, True, 3, None),  # identical
        ([1, 2, 3], [1, 5, 3], 2 / 3, False, 1, 1),  # positions 0 and 2 match: 2 of 3
        ([1, 2, 3], [9, 2, 3], 2 / 3, False, 0, 0),  # positional: later matches still count
        ([1, 2, 3, 4], [1, 2], 2 / 4, False, 2, 2),  # target stopped early: 2 matches / max len 4
        ([1, 2], [1, 2, 7, 8], 2 / 4, False, 2, 2),  # target ran on: same charge
        ([], [], 1.0, True, 0, None),  # both stopped at once: identical
        ([], [7], 0.0, False, 0, 0),  # 0 matches / 1
        (["a", "b"], ["a", "c", "d"], 1 / 3, False, 1, 1),  # token strings work alike
    ],
)
def test_token_match(ref, tgt, rate, exact, prefix, first):
    tm = token_match(ref, tgt)
    assert tm.match_rate == pytest.approx(rate, abs=1e-15)
    assert tm.exact is exact
    assert bool(tm) is exact
    assert tm.common_prefix == prefix
    assert tm.first_divergence == first
    assert (tm.ref_len, tm.tgt_len) == (len(ref), len(tgt))


# ref top logprobs a=-0.69, b=-0.71, c=-3.0: top-1/top-2 margin = 0.02
NEAR_TIE = {"a": -0.69, "b": -0.71, "c": -3.0}


@pytest.mark.parametrize(
    ("top", "ref_tok", "tgt_tok", "margin", "kind"),
    [
        # margin 0.02 <= 0.05 and lp1 - lp(b) = 0.02 <= 0.05 -> TIE
        (NEAR_TIE, "a", "b", 0.05, "TIE"),
        # same divergence with a tighter floor: 0.02 > 0.01 -> not a tie; b is listed -> DRIFT
        (NEAR_TIE, "a", "b", 0.01, "DRIFT"),
        # c is listed but lp1 - lp(c) = 2.31 > 0.05 -> DRIFT
        (NEAR_TIE, "a", "c", 0.05, "DRIFT"),
        # z is not in the reference's top-k -> WRONG
        (NEAR_TIE, "a", "z", 0.05, "WRONG"),
        # three-way near tie: c is 3rd but lp1 - lp(c) = 0.02 <= 0.05 -> TIE
        ({"a": -1.0, "b": -1.01, "c": -1.02}, "a", "c", 0.05, "TIE"),
        # boundary, exact in binary: margin 0.25 == tie_margin 0.25 counts as a tie (<=)
        ({"x": -0.5, "y": -0.75}, "x", "y", 0.25, "TIE"),
        # the target took the ref's top-1 while the ref emitted its runner-up; gap 2.9 -> DRIFT
        ({"a": -0.1, "b": -3.0}, "b", "a", 0.05, "DRIFT"),
        # integer token ids: gap 0.4 <= 0.5 -> TIE
        ({5: -0.5, 7: -0.9}, 5, 7, 0.5, "TIE"),
        # a single listed token: no runner-up, margin is +inf -> DRIFT only if listed
        ({5: -0.01}, 5, 5, 10.0, "DRIFT"),
        ({5: -0.01}, 5, 6, 10.0, "WRONG"),
        # zero noise floor: only an exact tie is a tie
        ({"a": -0.7, "b": -0.7}, "a", "b", 0.0, "TIE"),
    ],
)
def test_classify_divergence(top, ref_tok, tgt_tok, margin, kind):
    assert classify_divergence(top, ref_tok, tgt_tok, margin) == kind


def test_classify_divergence_refuses_missing_logprobs_and_bad_margin():
    with pytest.raises(ValueError, match="no reference top logprobs"):
        classify_divergence({}, 1, 2, 0.1)
    with pytest.raises(ValueError, match="tie_margin"):
        classify_divergence(NEAR_TIE, "a", "b", math.nan)
    with pytest.raises(ValueError, match="tie_margin"):
        classify_divergence(NEAR_TIE, "a", "b", -0.1)


def test_top_margin():
    assert top_margin(NEAR_TIE) == pytest.approx(0.02, abs=1e-12)
    assert top_margin({"a": -1.0}) == math.inf


@pytest.mark.parametrize(
    ("rate", "garbled"), [(0.49, True), (0.5, False), (1.0, False), (0.0, True), (math.nan, True)]
)
def test_is_garbled(rate, garbled):
    assert is_garbled(rate) is garbled
