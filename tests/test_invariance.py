"""Batch-slot invariance: hand-worked comparisons, the tie rule, and the baseline-relative verdict."""

from __future__ import annotations

import math

import pytest
from fakes import FakeBehaviour, FakeServer

from difftest.collect import Endpoint
from difftest.conformance import probe
from difftest.invariance import InvarianceResult, SlotResult, check_batch_slots, compare_views
from difftest.prompts import Prompt
from difftest.results import Check
from difftest.tokens_view import Position, TokensView


def view(tokens: list[int], logprobs: list[float], tops: list[dict[int, float]] | None = None) -> TokensView:
    tops = tops or [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)]
    return TokensView(
        tuple(
            Position(f"token_id:{t}", t, lp, top, None)
            for t, lp, top in zip(tokens, logprobs, tops, strict=True)
        )
    )


def test_identical_views_match_exactly() -> None:
    a = view([1, 2, 3], [-0.1, -0.2, -0.3])
    r = compare_views(a, a, "slot 1", 0.05)
    assert r.same_tokens and r.first_difference is None and r.max_logprob_diff == 0.0


def test_logprob_shift_is_measured_on_the_common_prefix() -> None:
    # |-0.1 - -0.13| = 0.03, |-0.2 - -0.1| = 0.1 -> worst 0.1; position 2 differs and is not compared
    a = view([1, 2, 3], [-0.1, -0.2, -0.3], [{1: -0.1}, {2: -0.2}, {3: -0.3, 9: -1.5}])
    b = view([1, 2, 9], [-0.13, -0.1, -0.9])
    r = compare_views(a, b, "slot 1", 0.05)
    assert not r.same_tokens and r.first_difference == 2
    assert r.max_logprob_diff == pytest.approx(0.1)
    # margin at the flip: -0.3 - (-1.5) = 1.2 > 2 x max(0.05, 0.1) = 0.2 -> not a tie
    assert not r.tie_at_difference


def test_flip_within_twice_the_observed_shift_is_a_tie() -> None:
    # margin -0.60 - (-0.75) = 0.15 <= 2 x 0.1 = 0.2 -> a tie the perturbation can bridge
    a = view([1, 5], [-0.2, -0.60], [{1: -0.2}, {5: -0.60, 6: -0.75}])
    b = view([1, 6], [-0.3, -0.70])
    r = compare_views(a, b, "slot 1", 0.05)
    assert r.first_difference == 1 and r.tie_at_difference


def test_length_difference_is_a_difference() -> None:
    a = view([1, 2], [-0.1, -0.1])
    b = view([1], [-0.1])
    r = compare_views(a, b, "slot 1", 0.05)
    assert r.first_difference == 1 and not r.same_tokens


def test_nan_logprob_is_infinite_difference() -> None:
    a = view([1], [-0.1])
    b = view([1], [math.nan])
    assert compare_views(a, b, "slot 1", 0.05).max_logprob_diff == math.inf


def result(diff: float, *, same: bool = True, tie: bool = False) -> InvarianceResult:
    return InvarianceResult("p", 0.05, [SlotResult("slot 1", same, None if same else 3, diff, tie)])


def test_verdict_absolute_when_no_baseline() -> None:
    assert result(0.04).verdict().passed
    v = result(0.06).verdict()
    assert not v.passed and any("slot_logprob_max_diff" in r for r in v.reasons)
    assert not result(0.0, same=False).verdict().passed
    # slot 1 against slot 0 is strict: the sequence's own shift or the tolerance ties nothing there
    assert not result(0.0, same=False, tie=True).verdict().passed
    loose = InvarianceResult("p", 0.05, [SlotResult("concurrent request 1 of 4", False, 3, 0.0, True,
                                                    timing_dependent=True)])  # fmt: skip
    assert loose.verdict().passed  # against the probe alone a tie flip is noise


def test_verdict_relative_to_the_baselines_own_slot_variance() -> None:
    # the golden itself moves 0.05 between slots -> limit max(0.05, 3 x 0.05) = 0.15
    target = result(0.12).relative_to("golden", result(0.05))
    assert target.verdict().passed and target.verdict().against == "golden"
    assert not result(0.2).relative_to("golden", result(0.05)).verdict().passed
    # token flips are allowed only as often as the golden flips
    assert not result(0.0, same=False).relative_to("golden", result(0.0)).verdict().passed
    assert result(0.0, same=False).relative_to("golden", result(0.0, same=False)).verdict().passed


def test_the_baseline_variance_is_the_worst_of_its_draws() -> None:
    """A max over placements whose neighbours depend on timing: one draw is a weak null. Draws
    0.05, 0.11 (golden again) and 0.02 (its twin) -> limit 3 x 0.11 = 0.33, said in the note."""
    draws = (result(0.05), result(0.11), result(0.02))
    target = result(0.3).relative_to("golden", *draws)
    assert target.baseline_worst == 0.11 and target.baseline_draws == 3
    check = next(c for c in target.verdict().checks if c.name == "slot_logprob_max_diff")
    assert check.limit == pytest.approx(0.33) and check.passed and "worst of 3 draws" in check.note
    assert not result(0.34).relative_to("golden", *draws).verdict().passed
    # one draw that flipped its one placement allows one flip; skipped / failed draws count nothing
    flips = result(0.0, same=False).relative_to("golden", result(0.0), result(0.0, same=False))
    assert flips.verdict().passed and flips.baseline_token_failures == 1
    failed = InvarianceResult("p", 0.05, [SlotResult("slot 1", False, None, 9.0, error="boom")])
    lone = result(0.2).relative_to("golden", result(0.05), failed, InvarianceResult("p", 0.05, skipped="x"))
    assert lone.baseline_draws == 1 and not lone.verdict().passed  # 0.2 > 3 x 0.05
    assert result(0.2).relative_to("golden").baseline == ""  # nothing measured: judged alone


def test_baseline_flips_are_counted_by_the_targets_tie_rule() -> None:
    """The golden's flips at a margin within the TIE margin are ties for it too: they must not
    widen the target's allowance (measured on an H200: a bf16 fp8-tensor golden flipped 2-4 of 4
    placements per draw, which allowed a target every flip)."""

    def flipped(margin: float) -> InvarianceResult:  # concurrent placements: the TIE margin applies
        slots = [SlotResult(f"concurrent request {i} of 4", False, 3, 0.0, margin_at_difference=margin,
                            timing_dependent=True) for i in (1, 3)]  # fmt: skip
        return InvarianceResult("p", 0.05, slots)

    target = flipped(0.9)  # the target flips both placements at a wide margin: a real flip
    target.tie_margin = 0.5
    thin = target.relative_to("golden", flipped(0.1), flipped(0.2))
    assert thin.baseline_draw_flips == [0, 0] and thin.baseline_token_failures == 0
    check = next(c for c in thin.verdict().checks if c.name == "slot_token_mismatches")
    assert check.value == 2 and check.limit == 0 and not check.passed and check.informative
    # a baseline that flips every placement outside the margin: the check cannot fail -> not informative
    wide = flipped(0.9)
    wide.tie_margin = 0.5
    wide.relative_to("golden", flipped(0.1), flipped(0.7))
    check = next(c for c in wide.verdict().checks if c.name == "slot_token_mismatches")
    assert wide.baseline_draw_flips == [0, 2] and check.passed and not check.informative
    assert "flips every such placement itself" in check.note


def test_skipped_and_errored_placements_never_pass_silently() -> None:
    v = InvarianceResult("p", 0.05, skipped="no logprobs").verdict()
    assert v.skipped and not v.checks
    errs = InvarianceResult("p", 0.05, [SlotResult("slot 1", False, None, 0.0, error="boom")]).verdict()
    assert errs.skipped == "no batch placement could be measured"


async def test_check_batch_slots_on_a_deterministic_fake_passes() -> None:
    server = FakeServer(FakeBehaviour())
    async with server.client(name="fake") as client:
        ep = Endpoint("fake", client, await probe(client))
        r = await check_batch_slots(ep, [Prompt("p0", "the quick brown fox")], max_tokens=6, k=3)
    assert r.skipped is None and len(r.slots) == 9 and len(r.placements) == 7
    assert all(s.same_tokens and s.max_logprob_diff == 0.0 for s in r.slots)
    assert r.verdict().passed and r.repeat_worst == 0.0 and not r.repeat_flips


async def test_check_batch_slots_catches_a_server_that_answers_differently() -> None:
    """A fake that flips every other request's first token: the batch sent twice disagrees with
    itself, so slots 1 and 3 against slot 0 prove nothing (not a slot dependence); the placements
    against the probe alone still flip, and with no baseline to excuse them the check fails."""
    server = FakeServer(FakeBehaviour(nondeterministic=True))
    async with server.client(name="fake") as client:
        ep = Endpoint("fake", client, await probe(client))
        r = await check_batch_slots(ep, [Prompt("p0", "the quick brown fox")], max_tokens=6, k=3)
    tokens = r.verdict().checks[0]
    assert r.repeat_flips and "not deterministic" in tokens.note
    assert not r.verdict().passed and tokens.informative


def test_a_repeated_request_bounds_what_same_shape_flips_prove() -> None:
    """Slots 1 and 3 against slot 0 flipped at a margin of 0.25 nats. A server whose answers to the
    same request sent twice move 0.2 nats (non-deterministic reductions) can bridge 2 x 0.2 = 0.4:
    ties; one whose repeat moves nothing cannot: 2 flips. A repeat that flips a token itself makes
    those placements prove nothing. The repeat is a control: never a counted placement itself."""

    def target(repeat: SlotResult) -> InvarianceResult:
        slots = [
            SlotResult(f"batch slot {i} of 4", False, 2, 0.01, margin_at_difference=0.25) for i in (1, 3)
        ]
        repeat.repeat = True
        return InvarianceResult("p", 0.05, [*slots, repeat], tie_margin=0.375)

    noisy = target(SlotResult("batch slot 1 of 4, sent again", True, None, 0.2))
    assert noisy.repeat_worst == 0.2 and noisy.token_failures == 0 and noisy.verdict().passed
    strict = noisy.verdict().checks[1]
    assert strict.limit == pytest.approx(0.6) and "two sends of one request" in strict.note
    exact = target(SlotResult("batch slot 1 of 4, sent again", True, None, 0.0))
    assert exact.token_failures == 2 and not exact.verdict().passed
    flipping = target(SlotResult("batch slot 1 of 4, sent again", False, 0, 0.0, margin_at_difference=0.9))
    tokens = flipping.verdict().checks[0]
    assert flipping.repeat_flips and tokens.value == 0 and not tokens.informative and not tokens.fails
    assert len(flipping.placements) == 2 and flipping.worst_logprob_diff == 0.01


def test_twin_widens_the_slot_limits_of_a_batch_variant_but_correct_kernel() -> None:
    """bf16 on an H200: a correct Triton fp8-block target flipped 2 slot tokens where its cuBLAS
    golden flipped none. The golden's rounding twin flips the same probe: a flip proves nothing."""
    from difftest.invariance import InvarianceResult, SlotResult, with_twin

    def result() -> InvarianceResult:  # the probe batched against it alone: across batch shapes
        r = InvarianceResult("p0", 0.05, slots=[
            SlotResult("batch slot 0 of 4", False, 3, 0.11, margin_at_difference=0.9, shape_dependent=True),
            SlotResult("concurrent request 1 of 4", True, None, 0.02, timing_dependent=True)])  # fmt: skip
        r.baseline, r.baseline_draw_worst, r.baseline_draw_flips = "golden", [0.0], [0]
        return r

    before = result().verdict()
    assert not before.passed  # 1 token failure > 0, 0.11 > 0.05
    after = with_twin(result(), SlotResult("rounding twin of golden", False, 5, 0.06)).verdict()
    tokens, logprobs = after.checks
    assert not tokens.informative and tokens.value == 0.0 and not tokens.fails
    assert "the rounding twin flips this probe's tokens" in tokens.note
    assert logprobs.name == "placement_logprob_max_diff"
    assert logprobs.limit == pytest.approx(0.18) and logprobs.passed  # 3 x the twin's 0.06
    assert after.passed
    # a twin that does not flip the probe leaves the token check informative and strict
    strict = with_twin(result(), SlotResult("rounding twin of golden", True, None, 0.01)).verdict()
    assert strict.checks[0].informative and not strict.passed


def test_same_shape_slot_flips_get_only_the_baselines_same_shape_allowance() -> None:
    """The bfloat16 gate of 2026-12-06 (H100), in numbers: the slot-variant control flipped slots 1
    and 3 at the first token, margin 0.25 nats, against slot 0 of the same batch shape. Its TIE
    margin was 0.375 and its golden's worst move 0.75 nats (under the batched-vs-alone
    placements), so a rule borrowed from those placements tied both flips and the black-box check
    passed it. In the same-shape placements the golden moved 0.0: both flips count. Its rounding
    twin flipping the probe waives nothing there either: the twin is another kernel, a slot is
    the same kernel."""
    from difftest.invariance import with_twin

    def slots() -> list[SlotResult]:
        return [SlotResult("batch slot 0 of 4", False, 4, 0.178, margin_at_difference=0.375, shape_dependent=True),
                *(SlotResult(f"batch slot {i} of 4", False, 0, 0.0, margin_at_difference=0.25) for i in (1, 3)),
                *(SlotResult(f"concurrent request {i} of 4", False, 4, 0.12, margin_at_difference=0.375,
                             timing_dependent=True) for i in (1, 3))]  # fmt: skip

    def golden(strict_move: float) -> InvarianceResult:
        return InvarianceResult("arith-sum", 0.05, [
            SlotResult("batch slot 0 of 4", True, None, 0.747, shape_dependent=True),
            SlotResult("batch slot 1 of 4", True, None, strict_move),
            SlotResult("batch slot 3 of 4", True, None, strict_move)])  # fmt: skip

    control = InvarianceResult("arith-sum", 0.05, slots(), tie_margin=0.375)
    control.relative_to("golden", golden(0.0), golden(0.0), golden(0.0))
    assert control.baseline_strict_worst == 0.0 and control.baseline_worst == 0.747
    tokens, strict, loose = control.verdict().checks
    assert control.token_failures == 2 and tokens.limit == 0 and not tokens.passed and tokens.informative
    assert "every flip counts" not in tokens.note and "(0 nats) are ties" in tokens.note
    assert strict.name == "slot_logprob_max_diff" and strict.limit == 0.05 and strict.passed
    assert loose.name == "placement_logprob_max_diff" and loose.limit == pytest.approx(3 * 0.747)
    twin = SlotResult("rounding twin of golden", False, 2, 0.7)
    assert with_twin(InvarianceResult("arith-sum", 0.05, slots()), twin, 0.375).relative_to(
        "golden", golden(0.0)).token_failures == 2  # fmt: skip
    # a baseline that itself moves 0.2 in those placements: a flip within 2 x 0.2 is its noise
    noisy = InvarianceResult("arith-sum", 0.05, slots(), tie_margin=0.375).relative_to("golden", golden(0.2))
    assert noisy.token_failures == 0 and noisy.verdict().passed
    # no baseline at all: a same-shape flip outside the sequence's own shift counts
    assert InvarianceResult("arith-sum", 0.05, slots(), tie_margin=0.375).token_failures == 2


def test_slot_flips_within_the_nulls_tie_margin_are_ties() -> None:
    """bf16 on an H200, new engine: a correct Triton fp8-block target flipped the probe batched
    against it alone (M=1 runs a GEMV, M=4 a tile: other rounding) while its twin happened not to
    flip that one probe. The twin's TIE margin, from all 30 prompts, judges the flip instead."""
    from difftest.invariance import with_twin

    def result() -> InvarianceResult:
        slots = [
            SlotResult("batch slot 0 of 4", False, 3, 0.02, margin_at_difference=0.08, shape_dependent=True),
            SlotResult(
                "concurrent request 1 of 4", False, 5, 0.02, margin_at_difference=0.30, timing_dependent=True
            ),
        ]
        r = InvarianceResult("p0", 0.05, slots=slots)
        r.baseline, r.baseline_draw_worst, r.baseline_draw_flips = "golden", [0.0], [0]
        return r

    twin = SlotResult("rounding twin of golden", True, None, 0.01)  # the twin does not flip this probe
    assert with_twin(result(), twin).token_failures == 2  # without a margin: both flips count
    judged = with_twin(result(), twin, tie_margin=0.12)
    assert judged.token_failures == 1  # 0.08 <= 0.12 is a tie; 0.30 is not
    tokens = judged.verdict().checks[0]
    assert tokens.informative and tokens.value == 1.0 and not tokens.passed
    assert "TIE margin 0.12" in tokens.note
    assert with_twin(result(), twin, tie_margin=0.5).verdict().passed  # both within: no evidence


def loose_draw(diff: float) -> InvarianceResult:
    """A baseline draw that moves `diff` against the probe alone and not at all in slots 1 and 3."""
    return InvarianceResult("p", 0.05, [SlotResult("concurrent request 1 of 4", True, None, diff, timing_dependent=True),
                                        SlotResult("batch slot 1 of 4", True, None, 0.0)])  # fmt: skip


def test_concurrent_flips_within_twice_the_baselines_worst_move_are_ties() -> None:
    """The H200 float16 gate's false alarm, in numbers: a correct fp8-tensor target flipped both
    concurrent placements at a margin of 0.625 (TIE margin 0.531); its golden moved up to 0.333
    there without flipping. 0.625 <= 2 x 0.333 = 0.666: ties. The same flips in batch slots
    (fixed neighbours) still count, and a concurrent flip wider than 0.666 counts too."""

    def target(placement: str, margin: float, timing: bool) -> InvarianceResult:
        slots = [
            SlotResult(
                f"{placement} {i} of 4", False, 9, 0.18, margin_at_difference=margin, timing_dependent=timing
            )
            for i in (1, 3)
        ]
        r = InvarianceResult("arith-sum", 0.05, slots, tie_margin=0.531)
        return r.relative_to("golden", loose_draw(0.284), loose_draw(0.330), loose_draw(0.333))

    concurrent = target("concurrent request", 0.625, True)
    tokens = concurrent.verdict().checks[0]
    assert concurrent.token_failures == 0 and tokens.passed and tokens.informative
    assert "2x golden's worst move (0.666 nats)" in tokens.note
    slot = target("batch slot", 0.625, False)
    assert slot.token_failures == 2 and not slot.verdict().passed
    wide = target("concurrent request", 0.70, True)
    assert wide.token_failures == 2 and not wide.verdict().passed
    alone = InvarianceResult("p", 0.05, [SlotResult("concurrent request 1 of 4", False, 9, 0.1,
                                                    margin_at_difference=0.2, timing_dependent=True)])  # fmt: skip
    assert alone.token_failures == 1  # no baseline measured: no allowance


async def test_check_batch_slots_marks_concurrent_placements_timing_dependent() -> None:
    async with FakeServer(FakeBehaviour()).client(name="fake") as client:
        ep = Endpoint("fake", client, await probe(client))
        r = await check_batch_slots(ep, [Prompt("p0", "the quick brown fox")], max_tokens=4, k=3)
    flags = {s.placement: (s.timing_dependent, s.shape_dependent, s.repeat, s.wide) for s in r.slots}
    assert flags == {"batch slot 0 of 4": (False, True, False, False), "batch slot 1 of 4": (False, False, False, False),
                     "batch slot 3 of 4": (False, False, False, False),
                     "batch slot 1 of 4, sent again": (False, False, True, False),
                     "batch slot 9 of 20": (False, False, False, True), "batch slot 17 of 20": (False, False, False, True),
                     "slot 0 of 20, neighbours reordered": (False, False, True, True),
                     "concurrent request 1 of 4": (True, False, False, False),
                     "concurrent request 3 of 4": (True, False, False, False)}  # fmt: skip


def test_a_flip_across_batch_shapes_within_twice_the_baselines_move_is_a_tie() -> None:
    """The H100 float16 gate's false alarm (2026-12-06), in numbers: a correct Triton fp8-block
    target, its probe batched against alone, flipped at a margin of 0.4375 nats (TIE margin
    0.359); its golden moved up to 0.327 in three draws. Across batch shapes (slot 0 against the
    probe alone) 0.4375 <= 2 x 0.327 = 0.654: a tie. Slots 1 and 3 are compared with slot 0 of
    the same batch shape: the same flip there counts."""

    def target(placement: str, shape: bool) -> InvarianceResult:
        s = SlotResult(placement, False, 4, 0.174, margin_at_difference=0.4375, shape_dependent=shape)
        r = InvarianceResult("arith-sum", 0.05, [s], tie_margin=0.359)
        return r.relative_to("golden", loose_draw(0.115), loose_draw(0.115), loose_draw(0.327))

    across = target("batch slot 0 of 4", True)
    assert across.token_failures == 0 and across.verdict().passed
    assert "TIE margin 0.359 nats or 2x golden's worst move (0.654 nats) are ties" in (
        across.verdict().checks[0].note
    )
    assert target("batch slot 1 of 4", False).token_failures == 1
    assert not target("batch slot 1 of 4", False).verdict().passed


def test_a_tie_margin_override_that_ties_every_flip_informs_nothing() -> None:
    """A `tie_margin` of 5 nats counts nearly every flip against the probe alone as a tie: where
    only such placements were measured the token check could not fail, so it is marked not
    informative. Slots 1 and 3 against slot 0 take no TIE margin: with them it still informs."""

    def judged(tie: float, *, with_slots: bool) -> bool:
        slots = [SlotResult("concurrent request 1 of 4", True, None, 0.0, timing_dependent=True)]
        if with_slots:
            slots.append(SlotResult("batch slot 1 of 4", True, None, 0.0))
        r = InvarianceResult("p", 0.05, slots, tie_margin=tie).relative_to("golden", loose_draw(0.1))
        return r.verdict().checks[0].informative

    assert not judged(5.0, with_slots=False) and judged(5.0, with_slots=True)
    assert judged(0.5, with_slots=False)


def test_twice_a_baseline_move_past_one_nat_informs_nothing_against_the_probe_alone() -> None:
    """The bfloat16 gate's golden moved 0.747 nats against the probe alone: 2 x 0.747 = 1.49 ties
    nearly every flip there (a slot-variant kernel flipped at 0.83 in float16), so those placements
    cannot count and the note says so; the strict placements still decide."""

    def check(*, with_slots: bool) -> Check:
        slots = [SlotResult("concurrent request 1 of 4", False, 3, 0.1, margin_at_difference=0.83,
                            timing_dependent=True)]  # fmt: skip
        if with_slots:
            slots.append(SlotResult("batch slot 1 of 4", True, None, 0.0))
        r = InvarianceResult("p", 0.05, slots, tie_margin=0.475).relative_to("golden", loose_draw(0.747))
        assert r.loose_allowance == pytest.approx(1.494) and r.token_failures == 0
        return r.verdict().checks[0]

    alone = check(with_slots=False)
    assert not alone.informative and "none can count" in alone.note
    assert check(with_slots=True).informative
    assert (
        InvarianceResult("p", 0.05, [], tie_margin=0.475)
        .relative_to("golden", loose_draw(0.3))
        .loose_allowance
        == 0.6
    )


def test_the_wide_batch_holds_the_same_prompts_in_every_order() -> None:
    """The wide batch's three orders are one multiset; the probe sits at 0 and last, then at 9 and
    17 (past 8- and 16-row M tiles); a server decoding in waves of 16 sees the same prompts per
    wave in the first and the placed order; the control reverses the fillers, so waves of other
    sizes give the probe other neighbours there."""
    from difftest.invariance import WIDE_BATCH, WIDE_SLOTS, wide_orders

    first, control, placed = wide_orders("P")
    assert len(first) == len(control) == len(placed) == WIDE_BATCH == 20 and WIDE_SLOTS == (9, 17)
    assert sorted(first) == sorted(control) == sorted(placed)
    assert [i for i, p in enumerate(first) if p == "P"] == [0, 19] and control[0] == "P"
    assert [i for i, p in enumerate(placed) if p == "P"] == [9, 17]
    assert sorted(first[:16]) == sorted(placed[:16]) and sorted(first[16:]) == sorted(placed[16:])
    assert sorted(first[:8]) != sorted(control[:8])


def test_each_batch_is_judged_by_its_own_control() -> None:
    """Slots 1 and 3 of 4 and 9 and 17 of 20 all flip at a margin of 0.25 nats, the baseline's
    strict placements moved 0.0. Where the wide control (slot 0 with its neighbours reordered)
    moved 0.2 nats, 2 x 0.2 bridges the wide flips (ties) but not the 4-batch's, whose repeat moved
    0.0: 2 counted flips. Where the wide control flips a token, the wide placements prove nothing
    and the 4-batch's still count."""

    def target(control: SlotResult) -> InvarianceResult:
        slots = [SlotResult(f"batch slot {i} of 4", False, 0, 0.0, margin_at_difference=0.25) for i in (1, 3)]
        slots += [SlotResult(f"batch slot {i} of 20", False, 0, 0.0, margin_at_difference=0.25, wide=True)
                  for i in (9, 17)]  # fmt: skip
        slots.append(SlotResult("batch slot 1 of 4, sent again", True, None, 0.0, repeat=True))
        control.repeat, control.wide = True, True
        r = InvarianceResult("p", 0.05, [*slots, control], tie_margin=0.375)
        r.baseline, r.baseline_draw_worst, r.baseline_draw_strict_worst, r.baseline_draw_flips = (
            "golden",
            [0.1],
            [0.0],
            [0],
        )
        return r

    moved = target(SlotResult("slot 0 of 20, neighbours reordered", True, None, 0.2))
    assert moved.strict_allowance(wide=True) == 0.2 and moved.strict_allowance(wide=False) == 0.0
    assert moved.token_failures == 2 and not moved.verdict().passed
    flipped = target(
        SlotResult("slot 0 of 20, neighbours reordered", False, 0, 0.0, margin_at_difference=0.9)
    )
    tokens = flipped.verdict().checks[0]
    assert flipped.control_flips(wide=True) and not flipped.control_flips(wide=False)
    # the 4-batch's flips count; the wide ones are ties (their batch's control flipped)
    assert tokens.value == 2 and tokens.fails and tokens.informative
    assert "slots 9 and 17 of 20 against slot 0 (same batch shape): flips prove nothing" in tokens.note


def test_a_placement_that_could_not_be_measured_is_named_in_the_note() -> None:
    """A server that takes 4 prompts in one request but refuses 20: the check rests on the rest and
    says what it could not measure, instead of narrowing silently."""
    r = InvarianceResult("p", 0.05, [
        SlotResult("batch slot 1 of 4", True, None, 0.0),
        SlotResult("20-prompt request", False, None, 0.0, error="HTTP 400: too many prompts (max 16)\ntrace", wide=True)])  # fmt: skip
    tokens = r.verdict().checks[0]
    assert tokens.passed and "same prompt at 1 batch placements" in tokens.note
    assert "not measured: 20-prompt request (HTTP 400: too many prompts (max 16))" in tokens.note


def first_token_flip(margin: float) -> tuple[TokensView, TokensView]:
    """Slot 0 chose token 5 over 6 by `margin` at the first token; the placed slot chose 6, its
    top list giving 5 at -1.003 (moved 0.003) and its own 6 at -1.001 (moved margin - 0.001)."""
    base = view([5, 7], [-1.0, -0.5], [{5: -1.0, 6: -1.0 - margin}, {7: -0.5}])
    placed = view([6, 8], [-1.001, -0.6], [{6: -1.001, 5: -1.003}, {8: -0.6}])
    return base, placed


def test_a_strict_flip_at_the_first_token_is_never_tied_by_the_tolerance() -> None:
    """tiny-llama's probe (the CI model) flips its first token at a margin of 0.0046 nats under
    `slot-tile`: within 2 x the 0.05 tolerance, so `compare_views` tied it and the strict rule was
    never asked; it also read "moved 0" (the common prefix is empty). At the same batch shape the
    sequence's own shift is the slot's doing: no tie there; the move at the flip is measured."""
    base, placed = first_token_flip(0.0046)
    loose = compare_views(base, placed, "batch slot 0 of 4", 0.05)
    assert loose.tie_at_difference and loose.margin_at_difference == pytest.approx(0.0046)
    strict = compare_views(base, placed, "batch slot 17 of 20", 0.05, strict=True)
    assert strict.first_difference == 0 and not strict.tie_at_difference
    # 6 moved |-1.0046 - -1.001| = 0.0036, 5 moved 0.003, half the margin 0.0023: 0.0036, not 0
    assert strict.max_logprob_diff == pytest.approx(0.0036)
    # top lists without the other side's token: at least half the margin (greedy flipped the gap)
    thin = view([5], [-1.0], [{5: -1.0, 9: -1.0046}])  # 6 past its top list, 5 past the placed one's
    bare = compare_views(thin, view([6], [-1.001]), "batch slot 17 of 20", 0.05, strict=True)
    assert bare.max_logprob_diff == pytest.approx(0.0023)


def test_a_strict_flip_is_a_tie_only_within_twice_the_baselines_own_move() -> None:
    """Slot 17 of 20 flips the first token at a margin of 0.0046 nats, its wide control (slot 0 with
    its neighbours reordered) moved nothing. Its golden moved 0 in those placements: the flip
    counts and the check fails, the note's "0 nats" now what the code does. A golden that moves
    0.01 there bridges 2 x 0.01 = 0.02: a tie. Built as the old callers did (no `strict`), the
    placement's own-shift tie flag is ignored at the same batch shape all the same."""

    def target(golden_move: float) -> InvarianceResult:
        placed = compare_views(*first_token_flip(0.0046), "batch slot 17 of 20", 0.05)
        placed.wide = True
        control = SlotResult("slot 0 of 20, neighbours reordered", True, None, 0.0, repeat=True, wide=True)
        golden = InvarianceResult("p", 0.05, [SlotResult("batch slot 17 of 20", True, None, golden_move, wide=True),
                                              SlotResult("concurrent request 1 of 4", True, None, 0.0,
                                                         timing_dependent=True)])  # fmt: skip
        return InvarianceResult("p", 0.05, [placed, control]).relative_to("golden", golden, golden)

    exact = target(0.0)
    tokens = exact.verdict().checks[0]
    assert exact.token_failures == 1 and not tokens.passed and tokens.informative
    assert (
        "slots 9 and 17 of 20 against slot 0 (same batch shape): flips within 2x golden's and its"
        in tokens.note
    )
    assert "(0 nats) are ties" in tokens.note
    noisy = target(0.01)
    assert noisy.token_failures == 0 and noisy.verdict().passed
    assert "(0.02 nats) are ties" in noisy.verdict().checks[0].note


def test_a_baseline_draw_whose_batch_requests_failed_allows_nothing() -> None:
    """A replayed baseline answers the probe alone and concurrently but 404 to every batch: its
    draws measured no strict placement, so they set no strict allowance ("moved 0" by measuring
    nothing) and the note says what was not measured; the target's own control still judges.
    Draws that measured nothing at all leave the target judged alone, said in the note too."""

    def replayed() -> InvarianceResult:
        return InvarianceResult("p", 0.05, [
            SlotResult("multi-prompt request", False, None, 0.0, error="HTTP 404: not recorded\ntrace"),
            SlotResult("20-prompt request", False, None, 0.0, error="HTTP 404: not recorded", wide=True),
            SlotResult("concurrent request 1 of 4", True, None, 0.0, timing_dependent=True)])  # fmt: skip

    def target() -> InvarianceResult:
        return InvarianceResult("p", 0.05, [
            SlotResult("batch slot 1 of 4", False, 0, 0.02, margin_at_difference=0.03),
            SlotResult("batch slot 1 of 4, sent again", True, None, 0.0, repeat=True)])  # fmt: skip

    partly = target().relative_to("ref", replayed(), replayed())
    assert partly.baseline == "ref" and partly.baseline_draws == 2
    assert partly.baseline_draw_strict_worst == [] and partly.baseline_strict_worst is None
    tokens = partly.verdict().checks[0]
    assert (
        "not measured on ref: multi-prompt request (HTTP 404: not recorded), 20-prompt request" in tokens.note
    )
    assert (
        "within 2x a repeated request's own move there (0 nats) are ties (ref's own not measured there)"
        in (tokens.note)
    )
    assert tokens.value == 1 and not tokens.passed
    dead = InvarianceResult(
        "p", 0.05, [SlotResult("multi-prompt request", False, None, 0.0, error="HTTP 404")]
    )
    skipped = InvarianceResult("p", 0.05, skipped="the probe prompt alone failed: HTTP 404")
    alone = target().relative_to("ref", dead, skipped)
    assert alone.baseline == "" and alone.baseline_draws == 0
    tokens = alone.verdict().checks[0]
    assert (
        "ref itself not measured (multi-prompt request (HTTP 404), a draw (the probe prompt alone"
        in tokens.note
    )
    assert "ref itself: 0" not in tokens.note and not tokens.passed


def test_a_quantized_target_without_a_baseline_of_its_scheme_is_not_judged_against_the_probe_alone() -> None:
    """T11: a correct fp8-block shim, no golden, moved 0.2131 nats batched against alone while the
    fp32 reference moved 7.5e-6: FAIL on 'placement_logprob_max_diff 0.2131 > 0.05', every slot
    against slot 0 at 0.0. Only a baseline of the target's scheme measures that move; the slots
    against slot 0 stay judged."""
    slots = [
        SlotResult("batch slot 0 of 4", True, None, 0.2131, shape_dependent=True),
        SlotResult(
            "concurrent request 2 of 4", False, 3, 0.35, margin_at_difference=0.9, timing_dependent=True
        ),
        SlotResult("batch slot 1 of 4", True, None, 0.0),
    ]
    judged = InvarianceResult("p", 0.05, list(slots)).relative_to("reference", loose_draw(7.5e-6))
    assert not judged.verdict().passed and judged.token_failures == 1
    # no null measured: the rule names none (it said "the null's TIE margin" with no number)
    assert "against the probe alone: flips within 2x reference's worst move (1.5e-05 nats) are ties" in (
        judged.verdict().checks[0].note
    )
    unjudged = InvarianceResult("p", 0.05, list(slots)).relative_to("reference", loose_draw(7.5e-6))
    unjudged.loose_unjudged = "no baseline of scheme fp8-block"
    v = unjudged.verdict()
    assert v.passed and unjudged.token_failures == 0
    loose = next(c for c in v.checks if c.name == "placement_logprob_max_diff")
    assert (
        not loose.informative
        and loose.value == 0.35
        and "not judged: no baseline of scheme fp8-block" in loose.note
    )
    # a slot that moves against slot 0 still fails
    unjudged.slots.append(SlotResult("batch slot 3 of 4", True, None, 0.3))
    assert not unjudged.verdict().passed
