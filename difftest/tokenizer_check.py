"""Whether two servers can be compared at all: `check_pair(ref, target)`.

It compares the probe texts' tokenizations that `conformance.probe` collected on each side (ids
where both sides expose them, token strings otherwise) and the vocabulary sizes: a mismatch is a
ConformanceError (exit 2) naming the first differing probe; a comparison that cannot be made is a
warning. conformance.py probes each server; this module only reads what the probes found.
"""

from __future__ import annotations

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

    def table(self) -> list[tuple[str, str, str]]:
        tok = (
            (OK, f"{self.probes_compared} probes identical by {self.verified_by}")
            if self.probes_compared
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
    for i, a in enumerate(ra.tokenizations):
        b = by_text.get(a.text)
        if b is None:
            continue
        if a.ids is not None and b.ids is not None:
            left, right, kind = a.ids, b.ids, "token ids"
        elif a.strings is not None and b.strings is not None:
            left, right, kind = a.strings, b.strings, "token strings"
        else:
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
    if not compared:
        warnings.append(
            f"tokenization of {rc.name} and {tc.name} could not be compared (no token ids or echoed tokens "
            "on both sides): a tokenizer mismatch would show up as garbled diffs"
        )
    teacher_forced = ra.teacher_forced and ta.teacher_forced
    # a chat side has no echo to distrust: the part's skip line says so (chat.NO_TEACHER_FORCING),
    # and "echo not trusted" on every chat pair named a fault nobody could fix
    who = [c.name for c, caps in ((rc, ra), (tc, ta)) if not caps.teacher_forced and caps.api != "chat"]
    if who:
        warnings.append(f"teacher-forced metrics disabled: echo not trusted on {', '.join(who)}")
    return PairCheck(
        ref=rc.name,
        target=tc.name,
        verified_by=" + ".join(sorted(kinds)) or "none",
        probes_compared=compared,
        vocab_sizes=(ra.vocab_size, ta.vocab_size),
        teacher_forced=teacher_forced,
        echo_as_ids=bool(ta.int_prompts) and ra.token_id_strings,
        warnings=tuple(warnings),
    )
