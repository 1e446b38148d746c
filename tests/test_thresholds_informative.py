"""`[thresholds]` overrides that can never fail are not informative; broken_rate 1 is refused.

The bug: `bleu_min = 0`, `garbled_rate_max = 1`, `failed_rate_max = 1` and `broken_rate_max = 1`
were reported informative (README: "a [thresholds] override a broken target would pass is not
informative"), broken_rate_max = 1 let impossible answers through, and the exactness part named
an overridden broken_rate / failed_rate limit "budget int8 broken_rate_max".

Hand-worked limits: a rate lies in [0, 1] and BLEU in [0, 100]; garbage-gemm and scale-skipped
measured garbled rate 1.0 and BLEU 0.0 (tiny-llama int8, tester B's run). So a garbled / failed /
broken rate limit of 1 and a BLEU minimum of 0 pass every target; 0.99 and 0.5 can fail one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from difftest.config import load_thresholds
from difftest.errors import ConfigError
from difftest.null import UNINFORMATIVE, informative
from difftest.results import Comparison
from difftest.verdict import ACCURACY_UNINFORMATIVE, budget_for, judge_target

INT8 = budget_for("int8")
# garbage-gemm_L1.mlp.up_proj vs its golden and vs the reference (tester B, runs/int8)
GARBAGE = dict(
    failed_rate=0.0, broken_rate=0.0, token_match=0.025, garbled_rate=1.0, bleu=0.0, kl_mean=2.0,
    top1_agreement=0.3,
)  # fmt: skip


def _comp(kind: str, **agg: float) -> Comparison:
    return Comparison(kind=kind, baseline="g" if kind == "exactness" else "ref", target="t", aggregate=agg)


def _checks(overrides: dict[str, float]) -> dict[tuple[str, str], object]:
    v = judge_target(
        "t", "fail", _comp("exactness", **GARBAGE), _comp("accuracy", **GARBAGE), INT8, None,
        overrides=overrides,
    )  # fmt: skip
    return {(p.part, c.name): c for p in v.parts for c in p.checks}


@pytest.mark.parametrize(
    ("check", "limit", "expected"),
    [
        ("bleu", 0.0, False),  # BLEU is never under 0
        ("bleu", 0.5, True),  # garbage's BLEU 0.0 fails it
        ("garbled_rate", 1.0, False),  # a rate is never over 1
        ("garbled_rate", 0.99, True),  # a target garbled on every prompt (1.0) fails it
        ("failed_rate", 1.0, False),
        ("failed_rate", 0.5, True),
        ("broken_rate", 1.0, False),
        ("broken_rate", 0.0, True),
        ("token_match", 0.0, False),  # unchanged rules
        ("token_match", 0.01, True),
    ],
)
def test_rules_against_hand_worked_limits(check: str, limit: float, expected: bool) -> None:
    assert informative(check, limit, ACCURACY_UNINFORMATIVE) is expected
    if check != "token_match":  # exactness has its own (null-sized) token-match rule
        assert informative(check, limit, UNINFORMATIVE) is expected


def test_overrides_that_can_never_fail_are_not_informative() -> None:
    checks = _checks({"bleu_min": 0.0, "garbled_rate_max": 1.0, "failed_rate_max": 1.0})
    for key in (("accuracy", "bleu"), ("accuracy", "garbled_rate"), ("accuracy", "failed_rate"),
                ("exactness", "failed_rate")):  # fmt: skip
        c = checks[key]
        assert c.passed and not c.informative, key
        assert c.note.endswith("; a broken target would pass this limit"), (key, c.note)
    # garbage passed them all: only they were wrong; one that can fail still fails it
    tight = _checks({"bleu_min": 0.5, "garbled_rate_max": 0.99})
    assert not tight[("accuracy", "bleu")].passed and tight[("accuracy", "bleu")].informative
    assert not tight[("accuracy", "garbled_rate")].passed and tight[("accuracy", "garbled_rate")].informative


def test_exactness_request_limits_name_their_override() -> None:
    checks = _checks({"broken_rate_max": 0.5, "failed_rate_max": 0.2})
    assert checks[("exactness", "broken_rate")].note == "override [thresholds] broken_rate_max"
    assert checks[("exactness", "failed_rate")].note == "override [thresholds] failed_rate_max"
    assert checks[("exactness", "broken_rate")].informative  # 0.5 fails a target broken on every prompt
    plain = _checks({})
    assert plain[("exactness", "broken_rate")].note == "budget int8 broken_rate_max"


@pytest.mark.parametrize("key", ["broken_rate_max", "exactness.broken_rate", "accuracy.broken_rate"])
def test_broken_rate_limit_of_one_is_refused(key: str, tmp_path: Path) -> None:
    """An impossible answer (NaN or malformed logprobs) fails a target (README): a limit of 1 would
    pass one whose every answer is impossible. Refused at load (exit 2, the file's line) and by
    the verdict (`report --thresholds` and the API)."""
    with pytest.raises(ConfigError, match=rf"{key} = 1\.0 can never fail"):
        judge_target("t", "pass", None, _comp("accuracy", **GARBAGE), INT8, None, overrides={key: 1.0})
    body = f"{key} = 1\n"  # a TOML dotted key: exactness.broken_rate = 1
    path = tmp_path / "th.toml"
    path.write_text("[thresholds]\n" + body)
    with pytest.raises(ConfigError, match=rf"th\.toml:\d+: .*'{key}' = 1 can never fail") as info:
        load_thresholds(path)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    path.write_text("[thresholds]\n" + body.replace("= 1", "= 0.5"))
    assert load_thresholds(path)["default"] == {key: 0.5}
