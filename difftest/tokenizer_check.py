"""Whether two servers can be compared at all: `check_pair(ref, target)`.

It compares the probe texts' tokenizations that `conformance.probe` collected on each side (ids
where both sides expose them, token strings otherwise) and the vocabulary sizes: a mismatch is a
ConformanceError (exit 2) naming the first differing probe; a comparison that cannot be made is a
warning. Where a text has neither on both sides, the sides' `usage.prompt_tokens` of it still
speak: counts whose difference varies from text to text are two tokenizers (exit 2; judging
such a pair by token match gave a FAIL on byte-identical text), a constant difference is a BOS
or similar on one side (a warning), equal counts back the "could not be compared" warning.
conformance.py probes each server; this module only reads what the probes found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from difftest.client import CompletionClient
from difftest.conformance import NA, OK, WARN, Capabilities, first_diff, short
from difftest.errors import ConformanceError


@dataclass(frozen=True)
class PairCheck:
    ref: str
    target: str
    verified_by: str  # "token ids" | "token strings" | "token ids + strings" | "none"
    probes_compared: int
    vocab_sizes: tuple[int | None, int | None]
    teacher_forced: bool  # both sides trust echo: teacher-forced metrics run
    echo_as_ids: bool  # the reference's generated token ids can be echoed into the target as ids
    warnings: tuple[str, ...] = ()
    counts_agree: int = 0  # probe texts compared by usage.prompt_tokens alone, with equal counts

    def table(self) -> list[tuple[str, str, str]]:
        tok = (
            (OK, f"{self.probes_compared} probes identical by {self.verified_by}")
            if self.probes_compared
            else (WARN, f"unverified; usage.prompt_tokens agree on {self.counts_agree} probes")
            if self.counts_agree
            else (WARN, "unverifiable")
        )
        rows = [("same tokenization", *tok)]
        va, vb = self.vocab_sizes
        rows.append(("same vocabulary size", OK if va is not None and vb is not None else NA, f"{va} / {vb}"))
        rows.append(
            (
                "teacher forcing",
                OK if self.teacher_forced else WARN,
                "as ids" if self.echo_as_ids else "as text",
            )
        )
        return rows


async def check_pair(
    ref: tuple[CompletionClient, Capabilities], tgt: tuple[CompletionClient, Capabilities]
) -> PairCheck:
    (rc, ra), (tc, ta) = ref, tgt
    warnings: list[str] = []
    by_text = {t.text: t for t in ta.tokenizations}
    kinds: set[str] = set()
    compared = 0
    counted: list[_Counts] = []
    for i, a in enumerate(ra.tokenizations):
        b = by_text.get(a.text)
        if b is None:
            continue
        if a.ids is not None and b.ids is not None:
            left, right, kind = a.ids, b.ids, "token ids"
        elif a.strings is not None and b.strings is not None:
            left, right, kind = a.strings, b.strings, "token strings"
        else:
            if a.prompt_tokens is not None and b.prompt_tokens is not None:  # never a missing count
                counted.append(_Counts(i, a.text, a.prompt_tokens, b.prompt_tokens))
            continue
        if tuple(left) != tuple(right):
            j = first_diff(left, right)
            lo, hi = max(0, j - 2), j + 3
            raise ConformanceError(
                f"tokenizers differ: probe {i} {short(a.text, 40)!r} first differs at token {j}: "
                f"{rc.name} gives {list(left[lo:hi])} but {tc.name} gives {list(right[lo:hi])} "
                f"({len(left)} vs {len(right)} {kind})"
            )
        compared += 1
        kinds.add(kind)
    if ra.vocab_size is not None and ta.vocab_size is not None and ra.vocab_size != ta.vocab_size:
        raise ConformanceError(
            f"vocabulary sizes differ: {rc.name} has {ra.vocab_size}, {tc.name} has {ta.vocab_size}"
        )
    warnings += _count_notes(rc.name, tc.name, counted)
    if not compared:
        agree = _agreeing(counted)
        vouch = (
            f"; their prompt token counts (usage.prompt_tokens) agree on all {agree} probe texts"
            if agree
            else ": a tokenizer mismatch would show up as garbled diffs"
        )
        warnings.append(
            f"tokenization of {rc.name} and {tc.name} could not be compared (no token ids or echoed tokens "
            f"on both sides){vouch}"
        )
    teacher_forced = ra.teacher_forced and ta.teacher_forced
    # a chat side has no echo to distrust: the part's skip line says so (chat.NO_TEACHER_FORCING),
    # and "echo not trusted" on every chat pair named a fault nobody could fix
    who = [c.name for c, caps in ((rc, ra), (tc, ta)) if not caps.teacher_forced and caps.api != "chat"]
    if who:
        warnings.append(f"teacher-forced metrics disabled: echo not trusted on {', '.join(who)}")
    elif teacher_forced and ra.token_id_strings != ta.token_id_strings:
        teacher_forced = False  # KL over lists keyed one side by id, the other by string: no entry matches
        warnings.append(_keyed_apart(rc.name, tc.name, ra.token_id_strings))
    return PairCheck(
        ref=rc.name,
        target=tc.name,
        verified_by=" + ".join(sorted(kinds)) or "none",
        probes_compared=compared,
        vocab_sizes=(ra.vocab_size, ta.vocab_size),
        teacher_forced=teacher_forced,
        echo_as_ids=echo_as_ids(ra, ta),
        warnings=tuple(warnings),
        counts_agree=0 if compared else _agreeing(counted),
    )


def echo_as_ids(ra: Capabilities, ta: Capabilities) -> bool:
    """Whether the reference's token ids are echoed into the target as ids: only where the target
    takes id prompts and its echo returns ids to check them by. A target that ignores
    `return_tokens_as_token_ids` echoes strings, which never equal the ids sent: every echo read
    as "other ids back", and two identical servers FAILed."""
    return bool(ta.int_prompts) and ra.token_id_strings and ta.token_id_strings


def _keyed_apart(ref: str, tgt: str, ref_ids: bool) -> str:
    """Why a pair whose echoes both work has no teacher-forced metrics: one side's top-k lists are
    keyed by token id, the other's by token string, and the two cannot be matched entry by entry."""
    ids, strings = (ref, tgt) if ref_ids else (tgt, ref)
    return (
        f"teacher-forced metrics disabled: {ids} returns token ids, {strings} only token strings "
        f"(return_tokens_as_token_ids ignored): their top-k lists cannot be matched"
    )


@dataclass(frozen=True)
class _Counts:
    """One probe text that only usage.prompt_tokens could compare (both sides reported it)."""

    index: int
    text: str
    ref: int
    tgt: int

    @property
    def diff(self) -> int:
        return self.tgt - self.ref

    def __str__(self) -> str:
        return f"probe {self.index} {short(self.text, 40)!r} {self.ref} vs {self.tgt}"


def _agreeing(counted: Sequence[_Counts]) -> int:
    """How many texts the counts vouch for: all of them when every count is equal, else none."""
    return len(counted) if counted and all(c.diff == 0 for c in counted) else 0


def _count_notes(ref: str, tgt: str, counted: Sequence[_Counts]) -> list[str]:
    """What the prompt counts say where ids and strings could not be compared. Two tokenizers
    give counts whose difference varies with the text; a BOS (or any fixed prefix) on one side
    shifts every count alike, and one text cannot tell the two apart: a warning, not an error."""
    diffs = {c.diff for c in counted}
    if len(counted) >= 2 and len(diffs) > 1:
        differing = [c for c in counted if c.diff]
        named = ", ".join(map(str, differing[:3])) + (" ..." if len(differing) > 3 else "")
        raise ConformanceError(
            f"tokenizers differ: usage.prompt_tokens of {named} ({ref} vs {tgt}): over the "
            f"{len(counted)} probe texts no token ids or strings could compare, the counts differ by "
            f"{min(diffs):+d} to {max(diffs):+d}, not by the constant a BOS token adds"
        )
    if diffs == {0} or not diffs:
        return []
    (d,) = diffs
    where, why = (
        ("every probe text", "a BOS token or a fixed prefix added on one side only")
        if len(counted) > 1
        else ("the one probe text compared", "a BOS token on one side, or another tokenizer")
    )
    return [
        f"{tgt} counts {d:+d} prompt token(s) on {where} against {ref} (usage.prompt_tokens; token "
        f"ids or strings could not be compared): {why}; divergences may come from the input, not the model"
    ]
