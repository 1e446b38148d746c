"""Impossible values (NaN, above 0, a top list over 1) in the run's teacher-forcing echoes are a
broken answer of their side, never a KL (tester t20's report, section 1)."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import FakeBehaviour, FakeServer

from difftest.collect import Endpoint, Forced, force, generate, prompt_token_ids
from difftest.conformance import probe
from difftest.prompts import Prompt
from difftest.scoring import score_prompt

# the probe's own echo ("The quick brown fox ...") stays clean: only the run's prompt breaks, as a
# kernel that breaks on some prompts only does
BROKEN = Prompt("p1", "BROKEN the lazy dog is")


async def _scored(ref_fault: str | None, tgt_fault: str | None) -> tuple[Forced, Forced, Any]:
    """One prompt generated on a clean reference, its continuation echoed into both sides (each
    side's echo of BROKEN given `fault`), scored."""

    def server(fault: str | None) -> FakeServer:
        if fault is None:
            return FakeServer()
        return FakeServer(FakeBehaviour(fault=fault, fault_echo_only=True, fault_match="BROKEN"))

    async with server(ref_fault).client(name="ref") as rc, server(tgt_fault).client(name="tgt") as tc:
        ref, tgt = Endpoint("ref", rc, await probe(rc)), Endpoint("tgt", tc, await probe(tc))
        ref_gen = await generate(ref, BROKEN, max_tokens=8, k=5, seed=0)
        tgt_gen = await generate(tgt, BROKEN, max_tokens=8, k=5, seed=0)
        ids = await prompt_token_ids(ref, BROKEN.prompt)
        forced = [
            await force(ep, BROKEN, ref_gen, prompt_ids=ids, as_ids=True, k=5, own=ep is ref)
            for ep in (ref, tgt)
        ]
    diff = score_prompt(BROKEN, ref_gen, tgt_gen, ref_forced=forced[0], tgt_forced=forced[1], k=5)
    return forced[0], forced[1], diff


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("nan-logprobs", "NaN logprobs at echoed continuation positions [0, 1, 2"),
        ("probability-logprobs", "logprobs above 0 at echoed continuation positions [0"),
    ],
)
async def test_the_targets_impossible_echo_is_its_broken_answer_never_a_kl(fault: str, said: str) -> None:
    """Scored as a KL before: NaN failed as "mean KL NaN", probabilities as a KL regression
    (0.97 nats), counted 0 in broken_rate. Now the prompt is the target's broken answer."""
    ref_forced, tgt_forced, diff = await _scored(None, fault)
    assert ref_forced.error is None
    assert tgt_forced.failed and tgt_forced.broken and said in (tgt_forced.error or "")
    assert diff.error is not None and f"target echo: tgt: {said}" in diff.error
    assert diff.broken  # broken_rate counts it: the target FAILs
    assert diff.kl_mean is None and diff.top1_agreement is None  # nothing of it is scored


@pytest.mark.parametrize("fault", ["nan-logprobs", "probability-logprobs"])
async def test_the_references_impossible_echo_leaves_the_prompt_unjudged(fault: str) -> None:
    """A reference's NaN failed the *target* ("mean KL NaN", a fake top-1 of 87.5%), its values
    above 0 gave the target a plausible KL of 0.5. Now the prompt is lost for the comparison, as
    after a broken reference generation: unjudged (exit 3 / INCONCLUSIVE), never the target's FAIL."""
    ref_forced, tgt_forced, diff = await _scored(fault, None)
    assert tgt_forced.error is None and ref_forced.failed
    assert diff.error is not None and "baseline echo: ref: " in diff.error
    assert not diff.broken  # not the target's bug
    assert diff.kl_mean is None


async def test_a_reference_giving_its_own_greedy_tokens_probability_0_is_broken() -> None:
    """The reference echoes the continuation it chose greedily: each token was its argmax, so -inf
    for one is impossible (a broken prefill, not a disagreement), and was scored against the target.
    The target may give the reference's token probability 0: that is a disagreement, scored."""
    ref_forced, tgt_forced, diff = await _scored("zero-chosen", None)
    assert ref_forced.failed and "chosen tokens of probability 0 (-inf logprob) at echoed" in (
        ref_forced.error or ""
    )
    assert diff.error is not None and "baseline echo: ref: " in diff.error and not diff.broken
    ref_forced, tgt_forced, diff = await _scored(None, "zero-chosen")
    assert ref_forced.error is None and tgt_forced.error is None  # not the greedy rule: not its tokens
    assert diff.error is None and diff.kl_mean is not None
