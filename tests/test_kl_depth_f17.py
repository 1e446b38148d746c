"""The depth KL actually compared at (scoring.same_depth cuts each pair of top lists to the shorter)
is recorded and said, and a top-1-only KL is not informative (tester t20's report, section 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeServer, rewritten_completions
from fastapi import FastAPI
from quirk_fakes import live_app

from difftest.cli import main
from difftest.collect import Forced
from difftest.report import load_run
from difftest.results import Comparison, PromptDiff
from difftest.tokens_view import Position
from difftest.verdict import budget_for, judge_target


def _forced(*tops: dict[int, float]) -> Forced:
    """Teacher-forced positions whose chosen token is id 1, with these alternatives."""
    return Forced(tuple(Position(f"t{i}", 1, top[1], top, None) for i, top in enumerate(tops)))


FULL = {1: -0.1, 2: -2.5, 3: -3.0}


def test_the_depth_kl_compared_is_recorded_and_said_naming_the_short_side() -> None:
    """same_depth cut a target listing 1 alternative of the 3 asked to top-1 at every position:
    KL 0 and PASS, not a word. Now the tally names the side, the depth and the share cut."""
    from difftest.metrics.logprobs import KL_DEPTH_CUT_RATE, KL_DEPTH_MIN
    from difftest.scoring import compared_depths, finish_comparison

    diffs = [PromptDiff("p0", "q"), PromptDiff("p1", "q", error="target: HTTP 500")]
    ref = {"p0": _forced(FULL, FULL), "p1": _forced(FULL)}
    tgt = {"p0": _forced({1: -0.1}, FULL), "p1": _forced({1: -0.1})}  # p1 failed: not compared
    tally = compared_depths(diffs, ref, tgt, k=3)
    assert (tally.positions, tally.cut, tally.shallowest, tally.short) == (2, 1, 1, {"target": 1})
    comp = finish_comparison("accuracy", "ref", "t", diffs, depths=tally)
    assert comp.aggregate[KL_DEPTH_MIN] == 1 and comp.aggregate[KL_DEPTH_CUT_RATE] == 0.5
    assert (
        "KL compared at fewer alternatives than the 3 asked on 1 of 2 teacher-forced positions (50%), "
        "down to top-1: t's echoes list as few as 1 (on 1 position)"
    ) in comp.warnings[0]
    assert "KL at top-1 only (t lists 1 alternative)" in comp.warnings[1]


def test_a_list_longer_than_asked_or_a_full_depth_says_nothing() -> None:
    """vLLM lists the forced token beside its top-k: one side k+1 long is no cut."""
    from difftest.metrics.logprobs import KL_DEPTH_CUT_RATE, KL_DEPTH_MIN
    from difftest.scoring import DepthTally, depth_notes

    tally = DepthTally(2)
    tally.add(FULL, {1: -0.1, 2: -2.5})
    other = DepthTally(2)
    other.add({1: -0.1, 2: -2.5}, {1: -0.1, 2: -2.5})
    tally.merge(other)
    assert (tally.positions, tally.cut, tally.shallowest) == (2, 0, 2)
    assert depth_notes(tally, "ref", "t") == []
    assert tally.aggregate() == {KL_DEPTH_MIN: 2.0, KL_DEPTH_CUT_RATE: 0.0}


def test_a_top1_only_kl_is_not_informative() -> None:
    """KL over {top-1, rest} cannot see a redistribution among the alternatives: its pass is
    shown, marked not informative; the same numbers at full depth decide as before."""
    good = dict(failed_rate=0.0, broken_rate=0.0, token_match=1.0, kl_mean=0.0, top1_agreement=1.0)

    def kl_check(**agg: float):  # noqa: ANN202
        comp = Comparison(kind="accuracy", baseline="ref", target="t", aggregate=dict(good, **agg))
        v = judge_target("t", "pass", None, comp, budget_for("none"), None)
        return next(c for p in v.parts for c in p.checks if c.name == "kl_mean")

    shallow = kl_check(kl_depth_min=1.0)
    assert not shallow.informative and "KL compared at top-1 only" in shallow.note
    assert kl_check(kl_depth_min=2.0).informative and kl_check().informative


# ----------------------------------------------------------------------------- whole runs


def _top1_echo(req: dict[str, Any], answer: dict[str, Any]) -> None:
    """Every echo lists only the top-1 of the alternatives asked (its generations list them all)."""
    if not req.get("echo"):
        return
    for choice in answer["choices"]:
        block = choice.get("logprobs") or {}
        block["top_logprobs"] = [
            t and dict([max(t.items(), key=lambda kv: kv[1])]) for t in block.get("top_logprobs", [])
        ]


def _app(rewrite: Any = None) -> FastAPI:
    server = FakeServer()
    app = FastAPI()
    if rewrite is not None:
        rewritten_completions(app, server, rewrite)
    app.mount("/", server.app)
    return app


@pytest.mark.parametrize("side", ["ref", "t"])
def test_a_run_says_the_depth_its_echoes_cut_kl_to(tmp_path: Path, side: str) -> None:
    """One side's echoes list 1 of the 5 alternatives asked: the run's comparison says so, naming
    the side, stores the depth, and its KL check is not informative."""
    prompts = tmp_path / "p.jsonl"
    texts = ["the quick brown fox", "1+2+3=", "a lazy dog is"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    ref_app = _app(_top1_echo if side == "ref" else None)
    tgt_app = _app(_top1_echo if side == "t" else None)
    out = tmp_path / "out"
    with live_app(ref_app) as r, live_app(tgt_app) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompts", str(prompts), "--scheme", "none"]
        main([*argv, "--max-tokens", "6", "-o", str(out), "--json"])
    run = load_run(out)
    (target,) = run.targets
    acc = target.comparison("accuracy")
    assert (
        acc is not None and acc.aggregate.get("kl_depth_min") == 1 and acc.aggregate["kl_depth_cut_rate"] == 1
    )
    name = "reference" if side == "ref" else "target"
    assert any(f"{name}'s echoes list as few as 1" in w for w in acc.warnings), acc.warnings
    assert any(f"KL at top-1 only ({name} lists 1 alternative)" in w for w in acc.warnings)
    assert target.verdict is not None
    kl = next(c for p in target.verdict.parts for c in p.checks if c.name == "kl_mean")
    assert not kl.informative


def test_run_diff_reads_the_depth_keys_with_a_direction():
    """A diff of two runs calls a shallower KL comparison worse, not "neutral"."""
    from difftest.rundiff import direction

    assert direction("kl_depth_min", 5, 1) == "worse"
    assert direction("kl_depth_cut_rate", 0.0, 0.8) == "worse"
