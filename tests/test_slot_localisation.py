"""A target failed on the batch-slot check alone, where the two-slot replay saw nothing: the
verdict says why it is not localised (it used to carry no localisation line at all)."""

from __future__ import annotations

import dataclasses

from sample_results import sample_run

from difftest.judge import SLOT_NOT_REPLAYED, judge_one
from difftest.results import Check, PartVerdict


def _with_slot_check(passed: bool):
    run = sample_run()
    target = run.targets[0]  # the correct one: its layer diffs flag nothing
    assert target.verdict is not None
    inv = PartVerdict(
        "invariance", "", (Check("slot_token_mismatches", 0.0 if passed else 1.0, 0.0, "<=", passed),)
    )
    target.verdict = dataclasses.replace(target.verdict, localisation=None)
    judge_one(run, target, {}, carried=[inv])
    assert target.verdict is not None
    return target.verdict


def test_a_slot_failure_the_replay_cannot_see_says_so() -> None:
    verdict = _with_slot_check(passed=False)
    assert verdict.label == "FAIL" and verdict.localisation == SLOT_NOT_REPLAYED


def test_a_passing_slot_check_adds_no_such_line() -> None:
    verdict = _with_slot_check(passed=True)
    assert verdict.localisation is None  # whatever else the sample fails on
