"""Batch-slot invariance: the same prompt must give the same answer in every slot of a batch.

The bug class: a kernel that reads the wrong scale row (or the wrong KV-cache page) for batch
rows above 0 — results change with where the scheduler happened to put the request, so single
-request smoke tests pass and production traffic does not. We place one probe prompt at slots 1
and 3 of a multi-prompt request (`prompt: [filler, probe, filler, probe]`) and compare them with
the probe at slot 0 of the same prompts reordered (`[probe, filler, filler, probe]`): the same
batch shape at every step, so a correct server answers those placements alike even where its
kernels pick their tiles by the batch's size. Four prompts sit inside any kernel's first M tile, so
a wide batch of `WIDE_BATCH` puts the probe at slots 9 and 17 the same way (a second tile reading
the first tile's scale rows shows only there). Against the probe served alone we compare that
slot 0 (the batch's shape, not its slot, differs) and the probe in concurrent requests (whose
batch neighbours depend on timing).

Two rules, by what a correct server can do. Slots 1 and 3 against slot 0 (same prompts, same
shape: "strict") are answered alike to the last bit by a correct deterministic server, so their
only allowance is the baseline's own move in those placements (measured: every correct target,
float16 and bfloat16, moved 0.0 there) and the target's own between two sends of the batch request
(a control: where that repeat flips a token, the server is not deterministic and these placements
prove nothing); the wide batch's control is its slot 0 with the neighbours reordered. Against the probe alone (another batch shape, or neighbours that
depend on timing) a correct kernel rounds differently, so a flipped token there is a tie when the
top-1/top-2 margin is within the null's TIE margin, twice the baseline's worst move, or the
rounding twin flips the probe too, or within what the sequence's own observed shift (or the
tolerance) can bridge; in the strict placements that shift is the slot's own doing and ties
nothing. A chosen-token logprob that moves past its limit is a failure. A baseline draw whose
requests failed measured nothing: it allows nothing, and the note says what was not measured.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from difftest.collect import Endpoint
from difftest.errors import DifftestError
from difftest.metrics.tokens import top_margin
from difftest.prompts import Prompt
from difftest.results import Check, PartVerdict
from difftest.textsafe import truncate
from difftest.tokens_view import Position, TokensView, parse_choice

# fp32 servers batched vs alone move logprobs by ~1e-5; bf16 ones by up to ~1e-2. A wrong scale
# row moves them by whole nats (measured with the shim's `slot-variant` fault, see tests).
DEFAULT_LOGPROB_TOLERANCE = 0.05
# a tie allowance (nats) over this ties nearly every flip against the probe alone: flips happen near
# ties, and the nulls measured on GPUs gave TIE margins of 0.53 at most (README "On a GPU"). A
# `tie_margin` override can pass it, and so can twice a baseline's worst move (bfloat16 on an H100:
# 2 x 0.75 nats), where a slot-variant kernel flipped at 0.83 (float16)
TIE_MARGIN_GUARD = 1.0

FILLERS = (
    "A completely different request that shares the batch:",
    "def unrelated_function(x):\n    return",
    "Numbers: 17, 42, 99, and",
)
# A second, wide batch puts the probe past a kernel's first M tiles (8 and 16 rows: slots 9 and 17
# of 20), where a tile offset missing from a scale or KV pointer reads the first tile's rows; in
# the 4-prompt batch every slot is in the first tile. The shim's `slot-tile` fault is that bug.
WIDE_BATCH = 20
WIDE_SLOTS = (9, 17)


# a placement with any of these set is not compared at the same batch shape and neighbours
NOT_STRICT = ("timing_dependent", "shape_dependent", "repeat")


@dataclass
class SlotResult:
    placement: str  # "batch slot 1 of 4", "concurrent request 3 of 4"
    same_tokens: bool
    first_difference: int | None
    max_logprob_diff: float
    # within the sequence's own shift or the tolerance (`compare_views`); never in a strict placement
    tie_at_difference: bool = False
    error: str | None = None
    # the compared-with side's top-1/top-2 logprob margin at the flip
    margin_at_difference: float | None = None
    # concurrent requests: the batch neighbours are whatever else the server runs at that moment
    # (timing), so under per-tensor activation scales the probe's quantization grid differs per
    # draw; batch slots: the same neighbours every time
    timing_dependent: bool = False
    # compared across batch shapes (slot 0 of a batch against the probe alone): a correct server
    # whose kernels pick their tiles by the batch's size rounds differently there. Measured on an
    # H100 in float16 (2026-12-06): a correct Triton fp8-block target flipped the probe in slots 1
    # and 3 of 4, compared then with the probe alone, at a margin of 0.4375 nats (TIE margin
    # 0.359), both slots alike and every module's replay in two slots equal to the last bit
    shape_dependent: bool = False
    # a control, not a placement: the batch request sent again, its slot 1 against the first answer's
    # slot 1. A correct deterministic server answers alike; one that does not (atomics, racing
    # reductions) moves this much in the strict placements without any slot dependence
    repeat: bool = False
    # in the wide batch (`WIDE_BATCH` prompts). Its control sends the probe at slot 0 again with the
    # fillers reversed: a server that decodes 20 prompts in waves (a batch limit under 20) gives the
    # probe other neighbours per wave, which moves it under per-tensor activation scales
    wide: bool = False


@dataclass
class InvarianceResult:
    prompt_id: str
    tolerance: float
    slots: list[SlotResult] = field(default_factory=list)
    skipped: str | None = None
    # the same probe on the baseline (golden, else reference): its own slot variance is noise of
    # the serving stack (fp16 GEMMs pick other kernels per batch shape), not the target's bug
    baseline: str = ""
    # one entry per slot check of the baseline (and of its twin): its worst logprob move, and its
    # flips outside the TIE margin; the target is judged against the worst of them
    baseline_draw_worst: list[float] = field(default_factory=list)
    baseline_draw_flips: list[int] = field(default_factory=list)
    # each draw's worst move in the strict placements alone (slots 1 and 3 against slot 0): what the
    # strict rule allows. Measured: a bfloat16 slot-variant control flipped both at the first token
    # at a margin of 0.25 nats, within the TIE margin 0.375 and its golden's worst move 0.75 under
    # the loose placements, where the golden's strict placements moved 0.0 (H100, 2026-12-06)
    baseline_draw_strict_worst: list[float] = field(default_factory=list)
    # what the baseline's draws could not measure (a replayed baseline answering 404 to a batch): no
    # allowance is taken from a failed request, and the note says so
    baseline_lost: str | None = None
    # the golden against its rounding twin on the same probe (difftest.null): what a correct
    # kernel's worth of per-module rounding moves it. A correct kernel whose rounding depends on
    # the batch shape (most GPU GEMMs pick tiles by M) moves between slots by that much.
    twin_logprob_diff: float | None = None
    twin_flips_tokens: bool = False
    # the null's TIE margin (p90 of the twin's top-1/top-2 margins where it diverged): a slot flip
    # at a margin this thin is what a correct kernel's rounding flips, so it proves nothing. One
    # probe says little on its own (the twin may or may not flip *it*); the margin carries the
    # whole prompt set's evidence. Measured: a correct Triton fp8-block target in bfloat16 flipped
    # this probe in 4 placements while its twin happened not to.
    tie_margin: float | None = None
    # why the placements against the probe alone judge nothing (None: they do). A quantized target
    # judged against an unquantized baseline (no golden): its activation quantization turns the
    # fp32 batch-shape noise (~1e-5) into whole code steps, so batched vs alone moves a correct
    # fp8-block kernel by 0.21 nats on smollm2 where the fp32 reference moves 7.5e-6. Only a baseline
    # of its own scheme (a golden) measures what the scheme moves there.
    loose_unjudged: str | None = None

    @staticmethod
    def is_strict(s: SlotResult) -> bool:
        """Compared at the same batch shape and neighbours (slots 1 and 3 against slot 0)."""
        return not any(getattr(s, flag) for flag in NOT_STRICT)

    @property
    def placements(self) -> list[SlotResult]:
        """The measured placements (the repeat control left out)."""
        return [s for s in self.slots if s.error is None and not s.repeat]

    @property
    def repeats(self) -> list[SlotResult]:
        """The measured repeat controls."""
        return [s for s in self.slots if s.error is None and s.repeat]

    @property
    def repeat_worst(self) -> float | None:
        """The target's own move in its controls, either batch (None: not measured)."""
        return _largest(*(s.max_logprob_diff for s in self.repeats))

    @property
    def repeat_flips(self) -> bool:
        """A control (the same request sent twice, the wide batch's reordered neighbours) flipped
        a token outside the sequence's own shift."""
        return any(self.control_flips(wide) for wide in (False, True))

    def controls(self, wide: bool) -> list[SlotResult]:
        """One batch's measured controls (the 4-prompt batch's repeat, or the wide batch's)."""
        return [s for s in self.repeats if s.wide == wide]

    def control_flips(self, wide: bool) -> bool:
        """One batch's control flipped a token: that batch's strict placements prove nothing."""
        return any(not s.same_tokens and not s.tie_at_difference for s in self.controls(wide))

    def strict_allowance(self, wide: bool = False) -> float | None:
        """What a strict flip's margin may be explained by: the baseline's own move in the strict
        placements, or the target's own in that batch's control."""
        own = _largest(*(s.max_logprob_diff for s in self.controls(wide)))
        return _largest(self.baseline_strict_worst, own)

    def is_tie(self, s: SlotResult) -> bool:
        """A flip that proves nothing. In a strict placement any flip where its batch's control
        flips, else only one within twice the baseline's worst move in the strict placements or the
        control's (a correct server's are 0: both logprobs at the flip move, so the gap moves by up
        to twice that); neither the tolerance nor the probe's own shift there, which is the slot's
        doing (measured: tiny-llama's probe flips at 0.005-0.07 nats, within 2 x the tolerance, so
        `slot-tile` passed). In a timing- or shape-dependent placement one within the probe's own
        shift (`compare_views`), the null's TIE margin, twice the baseline's
        worst move under the same placements, or anywhere if the rounding twin flips the probe.
        Measured on an H200 in float16: a correct fp8-tensor target (per-tensor activation scales,
        so its concurrent neighbours change its grid) flipped two concurrent placements at a
        margin of 0.625 nats, over the TIE margin 0.531 but within 2 x its golden's worst move
        0.333, while its golden, three draws, never flipped there."""
        m = s.margin_at_difference
        if self.is_strict(s):
            if self.control_flips(s.wide):  # that batch's answers move without a slot dependence
                return True
            allow = self.strict_allowance(s.wide)
            return m is not None and allow is not None and m <= 2 * allow
        if s.tie_at_difference or self.loose_unjudged:
            return True
        if m is None:
            return False
        return self.twin_flips_tokens or (self.loose_allowance is not None and m <= self.loose_allowance)

    @property
    def baseline_draws(self) -> int:
        return len(self.baseline_draw_worst)

    @property
    def baseline_worst(self) -> float | None:
        return max(self.baseline_draw_worst, default=None)

    @property
    def baseline_strict_worst(self) -> float | None:
        return max(self.baseline_draw_strict_worst, default=None)

    @property
    def loose_allowance(self) -> float | None:
        """The widest margin a flip against the probe alone may have and still be a tie: the null's
        TIE margin or twice the baseline's worst move there."""
        worst = self.baseline_worst
        return _largest(self.tie_margin, 2 * worst if worst is not None else None)

    @property
    def loose_ties_all(self) -> bool:
        """That allowance is past the guard: nearly every flip against the probe alone is a tie."""
        return self.loose_allowance is not None and self.loose_allowance > TIE_MARGIN_GUARD

    @property
    def baseline_token_failures(self) -> int:
        return max(self.baseline_draw_flips, default=0)

    @property
    def _draws(self) -> str:
        return _worst_of(self.baseline_draws)

    @property
    def worst_logprob_diff(self) -> float:
        return _worst(self.placements)

    @property
    def strict_logprob_diff(self) -> float:
        return _worst(self.strict_placements)

    @property
    def strict_placements(self) -> list[SlotResult]:
        """The measured placements compared at the same batch shape (slots against slot 0)."""
        return [s for s in self.placements if self.is_strict(s)]

    @property
    def strict_batches(self) -> list[bool]:
        """The batches (wide or not) with a strict placement measured."""
        return [wide for wide in (False, True) if any(s.wide == wide for s in self.strict_placements)]

    @property
    def loose_logprob_diff(self) -> float:
        return _worst([s for s in self.placements if not self.is_strict(s)])

    @property
    def token_failures(self) -> int:
        return self.flips(self.placements)

    def flips(self, placements: Sequence[SlotResult]) -> int:
        """Measured placements whose tokens differ from what they are compared with, outside a tie by
        this result's rule: the target's and its baseline's flips are counted alike."""
        return sum(1 for s in placements if not s.same_tokens and not self.is_tie(s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "worst_logprob_diff": self.worst_logprob_diff,
            "token_failures": self.token_failures,
            "baseline_draws": self.baseline_draws,
            "baseline_worst": self.baseline_worst,
            "baseline_strict_worst": self.baseline_strict_worst,
            "repeat_worst": self.repeat_worst,
            "repeat_flips": self.repeat_flips,
            "baseline_token_failures": self.baseline_token_failures,
        }

    def verdict(self) -> PartVerdict:
        if self.skipped:
            return PartVerdict("invariance", "", (), skipped=self.skipped)
        measured = self.placements
        if not measured:
            return PartVerdict("invariance", "", (), skipped="no batch placement could be measured")
        strict = self.strict_placements
        loose = [s for s in measured if not self.is_strict(s)]
        checks = [self._token_check(strict, loose)]
        if strict:
            checks.append(self._strict_logprob_check())
        if loose:
            checks.append(self._loose_logprob_check())
        return PartVerdict("invariance", self.baseline, tuple(checks))

    def _token_check(self, strict: list[SlotResult], loose: list[SlotResult]) -> Check:
        """Flips outside a tie (`is_tie`) against the baseline's own; informative only where a
        placement's flip can count and the baseline does not flip them all itself."""
        allowed = self.baseline_token_failures
        note = f"same prompt at {len(strict) + len(loose)} batch placements" + (
            f"; {self.baseline} itself: {allowed}{self._draws}" if self.baseline else ""
        )
        for wide in self.strict_batches:
            note += f"; {_strict_name(wide)} against slot 0 (same batch shape): {self._strict_rule(wide)}"
        if loose:
            note += "; against the probe alone: " + self._loose_rule()
        lost = [s for s in self.slots if s.error is not None]
        if lost:  # a placement that could not be measured narrows the check: say which
            note += "; not measured: " + ", ".join(f"{s.placement} ({_first_line(s.error)})" for s in lost)
        if self.baseline_lost:
            note += f"; {self.baseline_lost}"
        # placements where a flip can count: no strict one where its batch's control flips, no
        # loose one where the twin flips the probe or an allowance past the guard ties nearly
        # every flip
        can_flip = sum(not self.control_flips(s.wide) for s in strict) + (
            0 if self.twin_flips_tokens or self.loose_ties_all or self.loose_unjudged else len(loose)
        )
        if allowed >= can_flip:
            note += (
                f"; {self.baseline} flips every such placement itself: a flip proves nothing"
                if can_flip
                else "; no placement where a flip could count"
            )
        failures = self.token_failures
        return Check("slot_token_mismatches", float(failures), float(allowed), "<=", failures <= allowed,
                     note=note, informative=allowed < can_flip)  # fmt: skip

    def _strict_rule(self, wide: bool) -> str:
        if self.control_flips(wide):
            why = (
                "the probe moved with its neighbours reordered (decoded in waves?)"
                if wide
                else "the same request sent twice flipped a token (not deterministic)"
            )
            return f"flips prove nothing, {why}"
        allow = self.strict_allowance(wide)
        if allow is None:
            return "every flip counts"
        whose = [f"{self.baseline}'s"] if self.baseline_strict_worst is not None else []
        if self.controls(wide):
            whose.append("its reordered neighbours'" if wide else "a repeated request's")
        rule = f"flips within 2x {' and '.join(whose)} own move there ({2 * allow:.3g} nats) are ties"
        if self.baseline and self.baseline_strict_worst is None:
            rule += f" ({self.baseline}'s own not measured there)"
        return rule

    def _loose_rule(self) -> str:
        if self.loose_unjudged:
            return f"flips prove nothing, {self.loose_unjudged}"
        if self.twin_flips_tokens:
            return "flips prove nothing, the rounding twin flips this probe's tokens"
        worst = self.baseline_worst
        allow = []  # only what was measured: no null, no "the null's TIE margin"
        if self.tie_margin is not None:
            allow.append(f"the null's TIE margin {self.tie_margin:.3g} nats")
        if worst is not None:
            allow.append(f"2x {self.baseline}'s worst move ({2 * worst:.3g} nats)")
        if not allow:
            return "every flip counts"
        past = (
            f" (past {TIE_MARGIN_GUARD:g} nat nearly every flip: none can count)"
            if self.loose_ties_all
            else ""
        )
        return f"flips within {' or '.join(allow)} are ties{past}"

    def _strict_logprob_check(self) -> Check:
        """The strict placements against their batch's slot 0: the tolerance, or 3x the baseline's
        own move there or the target's own in a control, whichever is widest."""
        batches = " and ".join(_strict_name(wide) for wide in self.strict_batches)
        limit, note = self.tolerance, f"chosen-token logprob, {batches} against their slot 0"
        if self.baseline_strict_worst is not None and 3 * self.baseline_strict_worst > limit:
            limit, note = (
                3 * self.baseline_strict_worst,
                f"{note}; 3x {self.baseline}'s own move there{_worst_of(len(self.baseline_draw_strict_worst))}",
            )
        if self.repeat_worst is not None and 3 * self.repeat_worst > limit:
            limit, note = (
                3 * self.repeat_worst,
                f"{note}; 3x its own move between two sends of one request or with its neighbours reordered",
            )
        value = self.strict_logprob_diff
        return Check("slot_logprob_max_diff", value, limit, "<=", value <= limit, note=note)

    def _loose_logprob_check(self) -> Check:
        """Batched and concurrent against the probe alone: the tolerance, 3x the baseline's own worst
        move, or 3x the rounding twin's difference, whichever is widest."""
        limit, note = self.tolerance, "chosen-token logprob, batched and concurrent against the probe alone"
        if self.baseline_worst is not None and 3 * self.baseline_worst > limit:
            limit, note = 3 * self.baseline_worst, f"{note}; 3x {self.baseline}'s own move{self._draws}"
        if self.twin_logprob_diff is not None and 3 * self.twin_logprob_diff > limit:
            limit, note = 3 * self.twin_logprob_diff, f"{note}; 3x the twin's difference from {self.baseline}"
        value = self.loose_logprob_diff
        if self.loose_unjudged:
            note = f"{note}; not judged: {self.loose_unjudged}"
        return Check("placement_logprob_max_diff", value, limit, "<=", value <= limit, note=note,
                     informative=self.loose_unjudged is None)  # fmt: skip

    def relative_to(self, name: str, *draws: InvarianceResult) -> InvarianceResult:
        """This target's result judged against the worst of `draws`: baseline server `name`'s own
        slot variance measured more than once (and on its rounding twin, the same scheme). The
        variance is a max over placements whose batch neighbours depend on timing, and under
        per-tensor activation scales the neighbours change the probe's quantization grid: one draw
        of that max is a weak null (measured: a correct fp8-tensor target in bfloat16 moved 0.65
        nats where its golden's one draw moved 0.11). Call it after `with_twin`: the draws' flips
        are counted with the TIE margin, like the target's."""
        measured = [d for d in draws if not d.skipped and d.placements]
        lost = _lost(draws)
        if not measured:  # judged alone, as with no baseline: a failed draw allows nothing
            if lost:
                self.baseline_lost = f"{name} itself not measured ({lost}): no allowance of its own"
            return self
        if lost:
            self.baseline_lost = f"not measured on {name}: {lost}"
        self.baseline = name
        self.baseline_draw_worst = [d.worst_logprob_diff for d in measured]
        # only draws that measured a strict placement: one whose batch requests failed moved "0"
        # there by measuring nothing, which would tie no flip at all and claim a measurement
        self.baseline_draw_strict_worst = [d.strict_logprob_diff for d in measured if d.strict_placements]
        # after the strict worst: `is_tie` reads it
        self.baseline_draw_flips = [self.flips(d.placements) for d in measured]
        return self


def _worst_of(draws: int) -> str:
    """How many of the baseline's draws a limit is the worst of (nothing for one draw)."""
    return f" (worst of {draws} draws)" if draws > 1 else ""


def _lost(draws: Sequence[InvarianceResult]) -> str:
    """The placements (and whole draws) the baseline's draws could not measure, each named once."""
    seen: dict[str, str] = {}
    for d in draws:
        if d.skipped:
            seen.setdefault("a draw", _first_line(d.skipped))
        for s in d.slots:
            if s.error is not None:
                seen.setdefault(s.placement, _first_line(s.error))
    return ", ".join(f"{what} ({why})" for what, why in seen.items())


def _first_line(text: str | None, width: int = 120) -> str:
    lines = (text or "").strip().splitlines()
    return truncate(lines[0], width) if lines else "failed"


def _strict_name(wide: bool) -> str:
    return f"slots {' and '.join(map(str, WIDE_SLOTS))} of {WIDE_BATCH}" if wide else "slots 1 and 3 of 4"


def _worst(placements: Sequence[SlotResult]) -> float:
    """The largest chosen-token logprob move over measured placements (0 for none)."""
    return max((s.max_logprob_diff for s in placements), default=0.0)


def _largest(*values: float | None) -> float | None:
    """The largest of the values that were measured (None: none was)."""
    return max((v for v in values if v is not None), default=None)


def compare_views(
    base: TokensView, placed: TokensView, placement: str, tolerance: float, *, strict: bool = False
) -> SlotResult:
    """`placed` against `base` (the probe alone, or at slot 0): where the tokens first differ, the
    largest chosen-token logprob move before that (at a flip of the first token, the flip's own
    move), and base's top-1/top-2 margin there. `strict`: the same batch shape, where a correct
    server answers alike to the last bit, so neither the tolerance nor the sequence's own shift
    (itself the slot's doing) makes a flip there a tie: `InvarianceResult.is_tie` judges it by the
    baseline's and the control's own move alone."""
    a_keys = base.token_ids or base.tokens
    b_keys = placed.token_ids or placed.tokens
    n = min(len(a_keys), len(b_keys))
    first = next((i for i in range(n) if a_keys[i] != b_keys[i]), None)
    if first is None and len(a_keys) != len(b_keys):
        first = n
    same_prefix = first if first is not None else n
    diffs = [
        abs(a - b)
        for a, b in zip(base.logprobs[:same_prefix], placed.logprobs[:same_prefix], strict=True)
        if a is not None and b is not None
    ]
    shift = max(diffs) if diffs else 0.0
    if any(math.isnan(d) for d in diffs):
        shift = math.inf
    # A flip is a tie when the top-1/top-2 margin there is within what the observed perturbation
    # can bridge: both tokens' logprobs move, so up to twice the largest shift seen on this sequence.
    tie, margin = False, None
    if first is not None and first < len(base.positions) and base.positions[first].top:
        margin = top_margin(base.positions[first].top)
        tie = not strict and margin <= 2 * max(tolerance, shift)
    worst = shift
    if first == 0 and n > 0:  # no common prefix: a flip at the first token must not read as "moved 0"
        worst = max(worst, _flip_move(base.positions[0], placed.positions[0], margin))
    return SlotResult(placement, first is None, first, worst, tie, margin_at_difference=margin)


def _flip_move(a: Position, b: Position, margin: float | None) -> float:
    """How far the chosen logprobs moved at a flip: each side's chosen token looked up in the other
    side's top list, and at least half the margin (greedy: the top-1's fall and the new token's
    rise close a gap of at least the margin together, so one of them moved at least half of it)."""
    moves = [
        abs(x.logprob - y.top[key])
        for x, y in ((a, b), (b, a))
        if x.logprob is not None and (key := x.token_id if x.token_id is not None else x.token) in y.top
    ]
    floor = margin / 2 if margin is not None and math.isfinite(margin) else 0.0
    moves = [math.inf if math.isnan(m) else m for m in moves]
    return max([floor, *moves])


async def twin_difference(
    golden: Endpoint,
    twin: Endpoint,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int = 16,
    k: int = 5,
    tolerance: float = DEFAULT_LOGPROB_TOLERANCE,
) -> SlotResult | None:
    """The probe answered alone by the golden and by its rounding twin, compared like two slots."""
    if not prompts or golden.caps.logprobs_cap <= 0:
        return None
    views = []
    for ep in (golden, twin):
        body = ep.payload(prompts[0].prompt, max_tokens=max_tokens, k=k, seed=ep.seed)
        try:
            answer = await ep.client.completions(body, use_cache=False)
            views.append(parse_choice(answer["choices"][0], server=ep.name))
        except (DifftestError, KeyError, IndexError):
            return None
    return compare_views(views[0], views[1], f"rounding twin of {golden.name}", tolerance)


def with_twin(
    result: InvarianceResult, twin: SlotResult | None, tie_margin: float | None = None
) -> InvarianceResult:
    """Widen the slot limits by what the golden's rounding twin moves the same probe, and judge
    slot flips against the null's TIE margin (`tie_margin`, from the twin's whole prompt set)."""
    result.tie_margin = tie_margin
    if twin is not None and twin.error is None:
        result.twin_logprob_diff = twin.max_logprob_diff
        result.twin_flips_tokens = not twin.same_tokens and not twin.tie_at_difference
    return result


def slot_check_skip(ep: Endpoint, prompts: Sequence[Prompt]) -> str | None:
    """Why the batch-slot check cannot run on `ep`, known before any request (None: it can). The
    runner asks first: a target it cannot check needs no baseline draws on the reference."""
    if not prompts:
        return "no prompt"
    if ep.caps.logprobs_cap <= 0:
        return "the server returns no logprobs"
    return None


async def check_batch_slots(
    ep: Endpoint,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int = 16,
    k: int = 5,
    tolerance: float = DEFAULT_LOGPROB_TOLERANCE,
) -> InvarianceResult:
    skip = slot_check_skip(ep, prompts)
    if skip is not None:
        return InvarianceResult(prompts[0].id if prompts else "", tolerance, skipped=skip)
    probe = prompts[0]
    result = InvarianceResult(probe.id, tolerance)

    def body(prompt: Any) -> dict[str, Any]:
        return ep.payload(prompt, max_tokens=max_tokens, k=k, seed=ep.seed)

    try:
        alone = parse_choice(
            (await ep.client.completions(body(probe.prompt), use_cache=False))["choices"][0], server=ep.name
        )
    except (DifftestError, KeyError, IndexError) as exc:
        result.skipped = f"the probe prompt alone failed: {exc}"
        return result
    # the same four prompts twice, the probe first in one: slots 1 and 3 are compared with slot 0
    # at the same batch shape, slot 0 with the probe alone
    first = [probe.prompt, FILLERS[0], FILLERS[1], probe.prompt]
    batch = [FILLERS[0], probe.prompt, FILLERS[1], probe.prompt]
    try:
        answers = await _batch_answers(ep, (first, batch, batch), body)  # the batch twice: the repeat control
        slot0 = answers[0][0]
        placed = compare_views(alone, slot0, f"batch slot 0 of {len(first)}", tolerance)
        placed.shape_dependent = True
        result.slots.append(placed)
        for slot in (1, 3):
            result.slots.append(
                compare_views(
                    slot0, answers[1][slot], f"batch slot {slot} of {len(batch)}", tolerance, strict=True
                )
            )
        again = compare_views(
            answers[1][1], answers[2][1], f"batch slot 1 of {len(batch)}, sent again", tolerance
        )
        again.repeat = True
        result.slots.append(again)
    except (DifftestError, KeyError, IndexError) as exc:
        result.slots.append(SlotResult("multi-prompt request", False, None, 0.0, error=str(exc)))
    result.slots.extend(await _wide_placements(ep, probe.prompt, body, tolerance))
    concurrent = [FILLERS[2], probe.prompt, FILLERS[0], probe.prompt]
    answers = await asyncio.gather(
        *(ep.client.completions(body(p), use_cache=False) for p in concurrent), return_exceptions=True
    )
    for i in (1, 3):
        ans = answers[i]
        if isinstance(ans, BaseException):
            result.slots.append(
                SlotResult(f"concurrent request {i}", False, None, 0.0, error=str(ans), timing_dependent=True)
            )
            continue
        placed = compare_views(
            alone, parse_choice(ans["choices"][0], server=ep.name), f"concurrent request {i} of 4", tolerance
        )
        placed.timing_dependent = True
        result.slots.append(placed)
    return result


async def _batch_answers(
    ep: Endpoint, orders: Sequence[list[Any]], body: Callable[[Any], dict[str, Any]]
) -> list[list[TokensView]]:
    """Each multi-prompt request's choices in prompt order, the requests one after another."""
    answers = []
    for order in orders:
        resp = await ep.client.completions(body(order), use_cache=False)
        choices = sorted(resp["choices"], key=lambda c: c.get("index", 0))
        answers.append([parse_choice(c, server=ep.name) for c in choices])
    return answers


def wide_orders(probe: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """The wide batch three ways, each the same prompts: the probe at slot 0 (and last), the same
    with the fillers reversed (the control), and the probe at `WIDE_SLOTS`. A server that decodes
    the batch in waves of 16 sees the same prompts per wave in the first and the last."""
    fillers = [FILLERS[i % len(FILLERS)] for i in range(WIDE_BATCH - len(WIDE_SLOTS))]
    first = [probe, *fillers, probe]
    control = [probe, *reversed(fillers), probe]
    rest = iter(fillers)
    placed = [probe if i in WIDE_SLOTS else next(rest) for i in range(WIDE_BATCH)]
    return first, control, placed


async def _wide_placements(
    ep: Endpoint, probe: Any, body: Callable[[Any], dict[str, Any]], tolerance: float
) -> list[SlotResult]:
    """The probe at slots 9 and 17 of the wide batch against its slot 0 (strict), and the control:
    slot 0 again with the neighbours reordered."""
    try:
        answers = await _batch_answers(ep, wide_orders(probe), body)
        slot0 = answers[0][0]
        control = compare_views(
            slot0, answers[1][0], f"slot 0 of {WIDE_BATCH}, neighbours reordered", tolerance
        )
        control.repeat = True
        placed = [
            compare_views(
                slot0, answers[2][slot], f"batch slot {slot} of {WIDE_BATCH}", tolerance, strict=True
            )
            for slot in WIDE_SLOTS
        ]
    except (DifftestError, KeyError, IndexError) as exc:
        return [SlotResult(f"{WIDE_BATCH}-prompt request", False, None, 0.0, error=str(exc), wide=True)]
    for s in (*placed, control):
        s.wide = True
    return [*placed, control]
