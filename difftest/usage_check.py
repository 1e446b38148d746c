"""Do both sides of a pair read the same prompt? Every OpenAI-style answer says how many tokens
its prompt was (`usage.prompt_tokens`); for the same prompt, two servers of one tokenizer (and,
over chat, one chat template) give the same count. A count that differs means the model saw other
input — another tokenizer, a BOS token added on one side only, another chat template — and every
divergence that follows may come from the input, not the kernels. Never a verdict: a warning in
the comparison, and evidence where the probe could not compare the tokenizers at all.

The same holds at the other end: two servers of one tokenizer that generate the same token ids
return the same text. Text that differs over identical ids is a detokenizer (or a special-token
setting) on one side, which no metric on ids sees: named in the comparison too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from difftest.collect import Generation


@dataclass
class PromptCounts:
    """Per pair, accumulated over the run's chunks: target count - baseline count, per prompt."""

    offsets: Counter[int] = field(default_factory=Counter)
    differing: list[str] = field(default_factory=list)
    text_differs: list[str] = field(default_factory=list)  # same generated ids, other text

    @property
    def compared(self) -> int:
        return sum(self.offsets.values())

    def add(self, base: Mapping[str, Generation], tgt: Mapping[str, Generation]) -> None:
        for pid, b in base.items():
            t = tgt.get(pid)
            if t is None:
                continue
            ids = b.view.token_ids
            if ids is not None and ids == t.view.token_ids and b.text is not None and b.text != t.text:
                self.text_differs.append(pid)
            if b.prompt_tokens is None or t.prompt_tokens is None:
                continue
            d = t.prompt_tokens - b.prompt_tokens
            self.offsets[d] += 1
            if d:
                self.differing.append(pid)

    def notes(self, base: str, target: str, *, unverified: bool) -> list[str]:
        """What to say in the comparison: a mismatch always; agreement where nothing else could
        compare the two tokenizers (`unverified`)."""
        return self._text_notes(base, target) + self._count_notes(base, target, unverified=unverified)

    def _text_notes(self, base: str, target: str) -> list[str]:
        if not self.text_differs:
            return []
        examples = ", ".join(self.text_differs[:3]) + (" ..." if len(self.text_differs) > 3 else "")
        return [
            f"{target} and {base} return other text for the same generated token ids on "
            f"{len(self.text_differs)} prompt(s) ({examples}): a detokenizer or special-token setting "
            "differs on one side; token metrics compare ids and do not see it"
        ]

    def _count_notes(self, base: str, target: str, *, unverified: bool) -> list[str]:
        n = self.compared
        if not n:
            return []
        if not self.differing:
            return (
                [f"prompt token counts (usage.prompt_tokens) of {base} and {target} agree on all {n} prompts"]
                if unverified
                else []
            )
        if len(self.offsets) == 1:
            (d,) = self.offsets
            return [
                f"{target} counts {d:+d} prompt token(s) on every prompt against {base} "
                "(usage.prompt_tokens): a BOS token or a chat template added on one side only; "
                "divergences may come from the input, not the model"
            ]
        examples = ", ".join(self.differing[:3]) + (" ..." if len(self.differing) > 3 else "")
        return [
            f"prompt token counts (usage.prompt_tokens) of {base} and {target} differ on "
            f"{len(self.differing)} of {n} prompts ({examples}): the tokenizers or chat templates "
            "differ; divergences may come from the input, not the model"
        ]
