"""The quick look's exit code, and what it shows of a pair on one tokenizer (fixer F24).

1. (D1) Every request lost after its retries (HTTP 500, connection errors): nothing compared, and
   exit 0 (`--json` exit_code 0); one prompt of two lost: 0, no line said so. `--prompts` with the
   same servers is exit 3. Now 3 past `error_rate_limit`, as a run, with its words, 3 beating 1.
2. (D5) A target without tokens: the reference's continuation is tokenized with the same
   /tokenize where its own ids are not that tokenizer's. Its real alternatives were dropped
   ("n/a (no logprobs)") and the note named only the target. Now said, and its own alternatives
   are shown where one of its tokens starts at the divergence.
3. (D6) Such a pair printed "divergence kind: WRONG" (DRIFT) under the note saying TIE/DRIFT
   classification is not measured, wherever the reference kept its own alternatives (over chat,
   or with canonical ids). No classification of a re-tokenized token now, in a run too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakes import FakeBehaviour
from live_fakes import live_fake
from quirk_fakes import live_app, quirk_app

from difftest.cli import main
from difftest.client import CompletionClient
from difftest.collect import Generation
from difftest.prompts import Prompt
from difftest.retokenize import own_alternatives
from difftest.scoring import score_prompt
from difftest.tokens_view import Position, TokensView

# ----------------------------------------------------------------------------- 1. lost requests


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's retries without their seconds of backoff."""
    monkeypatch.setitem(CompletionClient.__init__.__kwdefaults__, "backoff_base_s", 0.001)


def _look(ref: FakeBehaviour, tgt: FakeBehaviour, prompts: list[str], *extra: str) -> int:
    with live_fake(ref) as r, live_fake(tgt) as t:
        argv = ["compare", "--ref", r, "--target", t, "--max-tokens", "3", *extra]
        return main([*argv, *(a for p in prompts for a in ("--prompt", p))])


BOOM = FakeBehaviour(fault="http-500", fault_match="BOOM")


@pytest.mark.parametrize(
    ("prompts", "lost"), [(["BOOM only"], "1 of 1 prompts failed (100%"), (["fine", "BOOM b"], "1 of 2")]
)
def test_quick_look_with_prompts_lost_is_exit_3(
    prompts: list[str], lost: str, quick_retries: None, capsys: Any
) -> None:
    """Before: exit 0 and `exit_code: 0`, no line naming the lost prompt."""
    assert _look(FakeBehaviour(), BOOM, prompts, "--json") == 3
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["exit_code"] == 3
    (problem,) = result["infrastructure_problems"]
    assert problem.startswith(f"target vs reference: {lost}")
    assert f"difftest: infrastructure: {problem}" in out.err
    assert [v["lost"] for v in result["prompts"] if "error" in v] == [True]
    assert _look(FakeBehaviour(), BOOM, prompts) == 3
    assert f"difftest: infrastructure: {problem}" in capsys.readouterr().err
    assert _look(FakeBehaviour(), BOOM, ["fine"]) == 0  # the control: the same servers, nothing lost


def test_lost_prompts_beat_a_failed_probe_check(quick_retries: None, capsys: Any) -> None:
    """3 beats 1, as a run's exit code orders them (`RunResult.exit_code`)."""
    no_logprobs = BOOM.replace(max_logprobs=0)
    assert _look(FakeBehaviour(), no_logprobs, ["fine"], "--json") == 1  # its probe FAILs a check
    assert json.loads(capsys.readouterr().out)["failed_checks"]
    assert _look(FakeBehaviour(), no_logprobs, ["fine", "BOOM b"], "--json") == 3
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 3 and result["failed_checks"]


def test_a_broken_answer_is_no_lost_request(capsys: Any) -> None:
    """A target's broken answer is its bug, as in a run: not counted toward exit 3."""
    broken = FakeBehaviour(fault="half-logprobs", fault_match="BOOM")
    _look(FakeBehaviour(), broken, ["BOOM only"], "--json")
    result = json.loads(capsys.readouterr().out)
    assert result["infrastructure_problems"] == [] and result["prompts"][0]["lost"] is False


# ----------------------------------------------------------------------------- 2 and 3. one tokenizer

# The fake reference's 8 greedy tokens after "def f" are not its tokenizer's for their text
# (" " + " of" where it makes "  " + "o" + "f"); a target at this noise diverges at token 2.
OWN = ["X", "&", "C", "U", "4", " ", " of", "l"]


def _tokenless(prompt: str, noise: float, capsys: Any, *extra: str) -> tuple[dict[str, Any], str]:
    """The quick look's `--json` view and its console text, the target ignoring `logprobs`."""
    ref = quirk_app(FakeBehaviour())
    tgt = quirk_app(FakeBehaviour(perturb_noise=noise), ignore_logprobs=True)
    with live_app(ref) as r, live_app(tgt) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompt", prompt, "--max-tokens", "8", *extra]
        main([*argv, "--json"])
        (view,) = json.loads(capsys.readouterr().out)["prompts"]
        main(argv)
    return view, capsys.readouterr().out


def test_the_reference_tokenized_anew_is_said_and_keeps_its_alternatives(capsys: Any) -> None:
    """Before: notes named the target only, `ref_alternatives` {} and "n/a (no logprobs)"."""
    view, out = _tokenless("def f", 0.5, capsys)
    assert view["ref_tokens"] == ["X", "&", "C", "U", "4", "  ", "o", "f", "l"]  # compared: one tokenizer
    assert view["first_divergence"] == 2 and view["compared"] == "tokens"
    said = [n for n in view["notes"] if n.startswith("reference's continuation was tokenized")]
    assert said and f"it generated {', '.join(map(repr, OWN))}" in said[0]
    alts = view["ref_alternatives"]
    assert len(alts) == 5 and max(alts, key=alts.get) == "C"  # greedy: its own token is its top-1
    assert "n/a (no logprobs)" not in out and "reference's continuation was tokenized" in " ".join(
        out.split()
    )


@pytest.mark.parametrize(
    ("prompt", "noise", "endpoint"), [("def f", 0.5, "chat"), ("1+2=", 3.0, "completions")]
)
def test_no_divergence_kind_for_a_target_tokenized_anew(
    prompt: str, noise: float, endpoint: str, capsys: Any
) -> None:
    """The reference keeps its own alternatives here (its ids are its tokenizer's): before, DRIFT
    and WRONG were printed under the note that says classification is not measured."""
    view, out = _tokenless(prompt, noise, capsys, "--endpoint", endpoint)
    assert view["first_divergence"] is not None and view["ref_alternatives"]
    assert "TIE/DRIFT classification is not" in view["notes"][0]
    assert view["divergence_kind"] is None and "divergence kind" not in out


def _gen(tokens: list[str], ids: list[int], *, tops: bool, retokenized: bool = False) -> Generation:
    offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    positions = tuple(
        Position(t, i, -0.5 if tops else None, {i: -0.5, 99: -1.5} if tops else {}, o)
        for t, i, o in zip(tokens, ids, offsets, strict=True)
    )
    return Generation("".join(tokens), TokensView(positions, "".join(tokens)), retokenized=retokenized)


def test_own_alternatives_only_where_an_own_token_starts() -> None:
    """Own tokens " " + " of" against the tokenizer's "  " + "o" + "f": offsets 0 and 1 vs 0, 2, 3."""
    own = _gen([" ", " of"], [1, 2], tops=True)
    shown = _gen(["  ", "o", "f"], [3, 4, 5], tops=False, retokenized=True)
    assert own_alternatives(own, shown, 0) == {"1": -0.5, "99": -1.5}
    assert own_alternatives(own, shown, 1) == {}  # " of" starts at 1, "o" at 2
    assert own_alternatives(own, shown, 3) == own_alternatives(own, shown, None) == {}


@pytest.mark.parametrize("retokenized", [False, True])
def test_scoring_classifies_no_retokenized_target(retokenized: bool) -> None:
    """The reference's alternatives kept either way; the target's 99 is listed (DRIFT) only when
    the target generated it."""
    ref = _gen(["a", "b"], [1, 2], tops=True)
    tgt = _gen(["a", "c"], [1, 99], tops=False, retokenized=retokenized)
    d = score_prompt(Prompt("p", "q"), ref, tgt, ref_forced=None, tgt_forced=None, tie_margin=0.1, k=5)
    assert d.first_divergence == 1 and d.ref_alternatives
    assert d.divergence_kind == (None if retokenized else "DRIFT")
    assert (d.divergence_margin is None) is retokenized
