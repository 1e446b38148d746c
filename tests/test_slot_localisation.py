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


def _slot(placement: str, same: bool, diff: float, wide: bool = False) -> dict:
    return {
        "placement": placement,
        "same_tokens": same,
        "max_logprob_diff": diff,
        "wide": wide,
        "error": None,
    }


def test_a_slot_failure_already_in_the_first_batch_is_not_blamed_on_a_later_slot_fault() -> None:
    """Was: a proxy moving every slot past 0 by 0.3 nats (a KV-cache or sampler bug, outside the
    linears) was told 'a fault that acts from a later slot (slot-tile: slot 16 on) does not show'."""
    from difftest.judge import slot_not_localised

    inv = {"tolerance": 0.05, "slots": [_slot("batch slot 1 of 4", True, 0.3), _slot("batch slot 3 of 4", False, 0.3),
                                        _slot("batch slot 9 of 20", True, 0.0, wide=True)]}  # fmt: skip
    said = slot_not_localised(inv)
    assert said.startswith("not localised: the batch-slot check moved already in the first batch "
                           "(batch slot 1 of 4, batch slot 3 of 4)") and "slot-tile" not in said  # fmt: skip
    # only the wide batch's slots moved: a later-slot fault is what the replay cannot see
    inv["slots"] = [
        _slot("batch slot 1 of 4", True, 0.0),
        _slot("batch slot 17 of 20", False, 0.4, wide=True),
    ]
    assert slot_not_localised(inv) == SLOT_NOT_REPLAYED
