"""Do both sides of a pair read the same prompt? Every OpenAI-style answer says how many tokens
its prompt was (`usage.prompt_tokens`); for the same prompt, two servers of one tokenizer (and,
over chat, one chat template) give the same count. A count that differs means the model saw other
input — another tokenizer, a BOS token added on one side only, another chat template — and every
divergence that follows may come from the input, not the kernels. Never a verdict: a warning in
the comparison, and evidence where the probe could not compare the tokenizers at all.
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

    @property
    def compared(self) -> int:
        return sum(self.offsets.values())

    def add(self, base: Mapping[str, Generation], tgt: Mapping[str, Generation]) -> None:
        for pid, b in base.items():
            t = tgt.get(pid)
            if t is None or b.prompt_tokens is None or t.prompt_tokens is None:
                continue
            d = t.prompt_tokens - b.prompt_tokens
            self.offsets[d] += 1
            if d:
                self.differing.append(pid)

    def notes(self, base: str, target: str, *, unverified: bool) -> list[str]:
        """What to say in the comparison: a mismatch always; agreement where nothing else could
        compare the two tokenizers (`unverified`)."""
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
