"""Collected responses -> per-prompt `PromptDiff`s -> one aggregated `Comparison`.

The bridge between what `collect` fetched and the pure metric functions: it lines the two
sides up (token ids when both gave ids, token strings otherwise), hands arrays to
`difftest.metrics`, and never decides a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from difftest.collect import Forced, Generation
from difftest.metrics.aggregate import aggregate_prompts, fill_generation, fill_teacher_forced, gc_paused
from difftest.metrics.logprobs import (
    FULL_KL_DEPTH,
    KL_DEPTH_CUT_RATE,
    KL_DEPTH_MIN,
    PositionLogprobs,
    teacher_forced_stats,
)
from difftest.prompts import Prompt
from difftest.results import Comparison, PromptDiff
from difftest.retokenize import labels_against_strings, words
from difftest.tokens_view import impossible_logprobs


def _comparable_keys(ref: Generation, tgt: Generation) -> tuple[Sequence, Sequence, bool]:
    """Ids on both sides, else strings on both sides: never an id compared with a string. Ids
    with no text to show ("token_id:N" labels, `retokenize.unreadable`) against token strings:
    both texts' words, as for a token-less pair (the run's retokenizer does it first and says so;
    the quick look scores pairs itself)."""
    ref_ids, tgt_ids = ref.view.token_ids, tgt.view.token_ids
    if ref_ids is not None and tgt_ids is not None:
        return ref_ids, tgt_ids, True
    if labels_against_strings(ref, tgt):
        return words(ref).view.tokens, words(tgt).view.tokens, False
    return ref.display_tokens(), tgt.display_tokens(), False


def score_prompt(
    prompt: Prompt,
    ref: Generation,
    tgt: Generation,
    *,
    ref_forced: Forced | None,
    tgt_forced: Forced | None,
    tie_margin: float | None = None,
    k: int | None,
) -> PromptDiff:
    diff = PromptDiff(prompt_id=prompt.id, prompt=prompt.prompt, tags=list(prompt.tags))
    errors = [_sided("baseline", ref.error), _sided("target", tgt.error)]
    # a teacher-forcing request the server failed counts like a failed generation: no PASS is built
    # on the prompts that remain (an echo that merely re-tokenises differently is only unmeasured)
    for side, forced in (("baseline echo", ref_forced), ("target echo", tgt_forced)):
        if forced is not None and forced.failed:
            errors.append(_sided(side, forced.error or "failed"))
    # NaN (or another impossible value) in a generation's logprobs feeds no verdict metric (those
    # come from teacher forcing, which may be off or clean): without this the prompt would pass on
    # its tokens. An impossible answer always fails.
    tgt_nan = False
    for side, gen in (("baseline", ref), ("target", tgt)):
        problem = (
            impossible_logprobs(gen.view, where="generated positions", greedy=True)
            if gen.error is None
            else None
        )
        if problem:
            errors.append(_sided(side, problem))
            tgt_nan = tgt_nan or side == "target"
    if any(errors):
        diff.error = "; ".join(e for e in errors if e)
        # the target's own answer was impossible: a target bug (FAIL), not a prompt left unjudged
        diff.broken = tgt.broken or tgt_nan or (tgt_forced is not None and tgt_forced.broken)
        diff.ref_text, diff.ref_tokens = ref.text, ref.display_tokens() if ref.error is None else []
        return diff
    diff.ref_text, diff.tgt_text = ref.text, tgt.text
    diff.ref_tokens, diff.tgt_tokens = ref.display_tokens(), tgt.display_tokens()
    diff.ref_token_ids = list(ref.view.token_ids) if ref.view.token_ids is not None else None
    diff.tgt_token_ids = list(tgt.view.token_ids) if tgt.view.token_ids is not None else None
    ref_keys, tgt_keys, by_id = _comparable_keys(ref, tgt)
    ref_tops = [p.top for p in ref.view.positions] if by_id or ref.view.top_keys == "str" else None
    tgt_tops = [p.top for p in tgt.view.positions] if by_id or tgt.view.top_keys == "str" else None
    fill_generation(
        diff,
        ref_keys,
        tgt_keys,
        ref_top_logprobs=ref_tops if ref_tops and any(ref_tops) else None,
        tgt_top_logprobs=tgt_tops if tgt_tops and any(tgt_tops) else None,
        tie_margin=tie_margin,
    )
    if ref.retokenized or tgt.retokenized:
        _unclassified(diff)
    d = diff.first_divergence
    if d is not None and diff.divergence_kind is None and d >= min(len(ref_keys), len(tgt_keys)):
        diff.divergence_kind = "LENGTH"  # one side stopped (EOS / stop string) where the other went on
    # A failed echo leaves the teacher-forced fields unmeasured (build_comparison warns).
    if ref_forced is not None and tgt_forced is not None and not (ref_forced.error or tgt_forced.error):
        positions = [
            PositionLogprobs(
                token=_key(r),
                ref_logprob=float(r.logprob),  # type: ignore[arg-type]
                tgt_logprob=float(t.logprob),  # type: ignore[arg-type]
                ref_top=ref_top,
                tgt_top=tgt_top,
            )
            for r, t in zip(ref_forced.positions, tgt_forced.positions, strict=True)
            for ref_top, tgt_top in [same_depth(r.top, t.top)]
        ]
        fill_teacher_forced(diff, teacher_forced_stats(positions, k=k))
    return diff


def _unclassified(diff: PromptDiff) -> None:
    """No TIE / DRIFT / WRONG for a pair on one tokenizer after the fact (`retokenize`): the token at
    the divergence is a tokenizer's cut of the text, not one the server picked, and the reference's
    rating of it says nothing about the target's choice. The note says classification is not
    measured; the quick look printed "divergence kind: WRONG" right under it (where the reference
    kept its own alternatives: over chat, or with its own ids canonical). Its alternatives stay."""
    diff.divergence_margin = diff.divergence_gap = None
    diff.divergence_kind = None


def same_depth(
    ref_top: Mapping[int | str, float], tgt_top: Mapping[int | str, float]
) -> tuple[Mapping[int | str, float], Mapping[int | str, float]]:
    """Both sides' alternatives cut to the shorter list's length (each keeps its largest).

    A server that lists fewer alternatives (a logprobs cap: OpenAI's 5, vLLM's --max-logprobs)
    leaves tokens the other side lists unlisted on its side; topk_kl imputes them from the tail
    in even shares, which is KL > 0 between identical distributions (measured: 0.008 nats for one
    server against itself behind a cap of 5, over a budget of 0.01 on some prompts). Cut to one
    depth, identical distributions give identical lists. A side's extra entry (vLLM lists the
    forced token outside its top-k) is lost to the lists only: the token's logprob is passed to
    topk_kl on its own."""
    n = min(len(ref_top), len(tgt_top))
    return _largest(ref_top, n), _largest(tgt_top, n)


def _largest(top: Mapping[int | str, float], n: int) -> Mapping[int | str, float]:
    if len(top) <= n:
        return top
    return dict(sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:n])


SIDES = ("baseline", "target")


@dataclass
class DepthTally:
    """How many alternatives KL compared over a comparison's teacher-forced positions. same_depth
    cuts each pair of lists to the shorter one, so a side whose echo lists fewer than asked makes
    the comparison shallower: a target listing 1 of the 5 asked scored KL 0 (and PASSed) against
    a reference it differs from at full depth, and nothing said so. Counted here, said by
    `depth_notes`, stored in the aggregate (`KL_DEPTH_MIN`, `KL_DEPTH_CUT_RATE`)."""

    asked: int | None  # `[run] logprobs`; None: the deeper list of each position
    positions: int = 0
    cut: int = 0  # positions compared at fewer alternatives than asked
    shallowest: int | None = None
    short: dict[str, int] = field(default_factory=dict)  # side -> positions it listed fewer than asked
    fewest: dict[str, int] = field(default_factory=dict)  # side -> fewest alternatives it listed

    def add(self, ref_top: Mapping[int | str, float], tgt_top: Mapping[int | str, float]) -> None:
        """One compared position. A list longer than asked (vLLM adds the forced token) is no deeper."""
        lengths = dict(zip(SIDES, (len(ref_top), len(tgt_top)), strict=True))
        wanted = self.asked if self.asked else max(lengths.values())
        depth = min(min(lengths.values()), wanted)
        self.positions += 1
        self.cut += depth < wanted
        self.shallowest = depth if self.shallowest is None else min(self.shallowest, depth)
        for side, n in lengths.items():
            if n < wanted:
                self.short[side] = self.short.get(side, 0) + 1
                self.fewest[side] = min(self.fewest.get(side, n), n)

    def merge(self, other: DepthTally) -> None:
        """Another chunk's positions added to these."""
        self.positions += other.positions
        self.cut += other.cut
        if other.shallowest is not None:
            mine = self.shallowest if self.shallowest is not None else other.shallowest
            self.shallowest = min(mine, other.shallowest)
        for side, n in other.short.items():
            self.short[side] = self.short.get(side, 0) + n
            self.fewest[side] = min(self.fewest.get(side, other.fewest[side]), other.fewest[side])

    def aggregate(self) -> dict[str, float]:
        """The aggregate keys (none without a teacher-forced position): what verdict reads back."""
        if not self.positions or self.shallowest is None:
            return {}
        return {KL_DEPTH_MIN: float(self.shallowest), KL_DEPTH_CUT_RATE: self.cut / self.positions}


def depth_notes(tally: DepthTally | None, baseline: str, target: str) -> list[str]:
    """The comparison's words for a KL compared below the depth asked (none when it was not)."""
    if tally is None or not tally.cut or tally.shallowest is None:
        return []
    names = dict(zip(SIDES, (baseline, target), strict=True))
    asked = f"the {tally.asked} asked" if tally.asked else "the other side's"
    sides = ", ".join(
        f"{names[side]}'s echoes list as few as {tally.fewest[side]} (on {n} position{'' if n == 1 else 's'})"
        for side, n in tally.short.items()
    )
    notes = [
        f"KL compared at fewer alternatives than {asked} on {tally.cut} of {tally.positions} "
        f"teacher-forced positions ({tally.cut / tally.positions:.0%}), down to top-{tally.shallowest}: "
        f"{sides}; both sides are cut to the shorter list"
    ]
    if tally.shallowest < FULL_KL_DEPTH:
        top1 = ", ".join(names[side] for side, n in tally.fewest.items() if n < FULL_KL_DEPTH)
        notes.append(
            f"KL at top-1 only ({top1} lists 1 alternative): it compares {{top-1, rest}} and cannot see "
            "probability moved among the alternatives, so the KL checks are not informative"
        )
    return notes


def _key(position) -> int | str:
    return position.token_id if position.token_id is not None else position.token


def score_prompts(
    prompts: Sequence[Prompt],
    ref_gen: Mapping[str, Generation],
    tgt_gen: Mapping[str, Generation],
    *,
    ref_forced: Mapping[str, Forced] | None,
    tgt_forced: Mapping[str, Forced] | None,
    tie_margin: float | None = None,
    k: int | None,
) -> tuple[list[PromptDiff], list[str]]:
    """Per-prompt results of one chunk, and the prompts whose teacher forcing failed (why)."""
    with gc_paused():  # see gc_paused: millions of small acyclic objects while the responses are live
        diffs = [
            score_prompt(
                p,
                ref_gen[p.id],
                tgt_gen[p.id],
                ref_forced=ref_forced.get(p.id) if ref_forced is not None else None,
                tgt_forced=tgt_forced.get(p.id) if tgt_forced is not None else None,
                tie_margin=tie_margin,
                k=k,
            )
            for p in prompts
        ]
    unforced: list[str] = []
    if ref_forced is not None and tgt_forced is not None:
        unforced = [
            f"{p.id}: {(ref_forced[p.id].error or tgt_forced[p.id].error)}"
            for p in prompts
            if p.id in ref_forced
            and p.id in tgt_forced
            and (ref_forced[p.id].error or tgt_forced[p.id].error)
        ]
    return diffs, unforced


def compared_depths(
    diffs: Sequence[PromptDiff],
    ref_forced: Mapping[str, Forced] | None,
    tgt_forced: Mapping[str, Forced] | None,
    *,
    k: int | None,
) -> DepthTally:
    """The depths KL compared on the prompts score_prompt scored teacher-forced (a failed prompt,
    a failed echo: none)."""
    tally = DepthTally(k)
    if ref_forced is None or tgt_forced is None:
        return tally
    for d in diffs:
        r, t = ref_forced.get(d.prompt_id), tgt_forced.get(d.prompt_id)
        if d.error is not None or r is None or t is None or r.error or t.error:
            continue
        for rp, tp in zip(r.positions, t.positions, strict=True):
            tally.add(rp.top, tp.top)
    return tally


def finish_comparison(
    kind: str,
    baseline: str,
    target: str,
    diffs: list[PromptDiff],
    *,
    unforced: Sequence[str] = (),
    seed: int = 0,
    warnings: Sequence[str] = (),
    depths: DepthTally | None = None,
) -> Comparison:
    """Aggregate every chunk's per-prompt results into one Comparison; `depths`: the KL's
    (`compared_depths` of every chunk, merged), said and stored where shallower than asked."""
    notes = list(warnings)
    if unforced:
        notes.append(
            f"teacher-forced metrics missing for {len(unforced)} prompt(s): " + "; ".join(unforced[:3])
        )
    notes.extend(depth_notes(depths, baseline, target))
    agg, ci = aggregate_prompts(diffs, seed=seed)
    if depths is not None:
        agg.update(depths.aggregate())
    return Comparison(
        kind=kind, baseline=baseline, target=target, prompts=diffs, aggregate=agg, ci=ci, warnings=notes
    )


def build_comparison(
    kind: str,
    baseline: str,
    target: str,
    prompts: Sequence[Prompt],
    ref_gen: Mapping[str, Generation],
    tgt_gen: Mapping[str, Generation],
    *,
    ref_forced: Mapping[str, Forced] | None,
    tgt_forced: Mapping[str, Forced] | None,
    tie_margin: float | None = None,
    k: int | None,
    seed: int = 0,
    warnings: Sequence[str] = (),
) -> Comparison:
    """Score and aggregate in one go (all responses in memory): A/A floors, benchmarks."""
    diffs, unforced = score_prompts(
        prompts, ref_gen, tgt_gen, ref_forced=ref_forced, tgt_forced=tgt_forced, tie_margin=tie_margin, k=k
    )
    depths = compared_depths(diffs, ref_forced, tgt_forced, k=k)
    return finish_comparison(
        kind, baseline, target, diffs, unforced=unforced, seed=seed, warnings=warnings, depths=depths
    )


def _sided(side: str, error: str | None) -> str | None:
    """`error` under the side it happened on, once: a server named "target" (compare's default)
    already says so ("target: target: text and logprobs disagree" was printed)."""
    if not error:
        return None
    return error if error.startswith(f"{side}: ") else f"{side}: {error}"
