"""The batch-slot check through the shim on tiny-llama (the CI model; seconds on the CPU). Its
nearly flat distributions put the probe's first-token margin well inside 2x the 0.05 tolerance
(0.07 nats here, 0.005 on the CI probe), so a slot fault flips the first token at a margin the old
rule tied: `slot-tile` and `slot-variant` passed. At the same batch shape only the baseline's and
the control's own move may tie a flip; a correct server moves 0 there and still passes."""

from __future__ import annotations

from test_invariance_shim import served

from difftest.invariance import InvarianceResult, check_batch_slots
from difftest.prompts import Prompt

PROBE = [Prompt("p0", "The capital of France is Paris. The capital of Germany is")]


async def check(faults: tuple[str, ...] = ()) -> InvarianceResult:
    async with served(faults, model="tiny-llama") as ep:
        return await check_batch_slots(ep, PROBE, max_tokens=8, k=3)


def strict_flips(r: InvarianceResult) -> set[str]:
    """The strict placements that flipped, each at the first token, thinner than 2x the tolerance
    (what the old rule tied) and reported as a move, not "moved 0"."""
    flipped = [s for s in r.strict_placements if not s.same_tokens]
    for s in flipped:
        assert s.first_difference == 0 and s.margin_at_difference < 2 * r.tolerance, s
        assert not s.tie_at_difference and s.max_logprob_diff >= s.margin_at_difference / 2 > 0, s
    return {s.placement for s in flipped}


async def test_slot_tile_fails_against_a_correct_baseline_that_passes() -> None:
    """As the runner judges it: the target against a baseline's draws (here the correct server's
    own check, bit-exact across slots of one batch shape on the CPU, so its allowance is 0)."""
    correct = await check()
    assert all(s.same_tokens and s.max_logprob_diff == 0.0 for s in correct.strict_placements)
    assert correct.verdict().passed and correct.token_failures == 0
    r = (await check(("slot-tile",))).relative_to("golden", correct)
    assert strict_flips(r) == {"batch slot 17 of 20"}  # only past the first 16-row tile
    tokens = r.verdict().checks[0]
    assert r.baseline_strict_worst == 0.0 and tokens.value == 1 and not tokens.passed and tokens.informative
    assert (
        "flips within 2x golden's and its reordered neighbours' own move there (0 nats) are ties"
        in tokens.note
    )


async def test_slot_variant_fails_in_every_strict_placement() -> None:
    r = await check(("slot-variant",))
    assert strict_flips(r) == {
        "batch slot 1 of 4",
        "batch slot 3 of 4",
        "batch slot 9 of 20",
        "batch slot 17 of 20",
    }
    assert r.token_failures >= 4 and not r.verdict().passed
    assert r.repeat_worst == 0.0 and not r.repeat_flips  # deterministic: the flips are the slot's
