"""Tokens for servers that send none: a server that ignores `logprobs` (transformers serve) returns
only text, and without tokens its greedy continuation cannot be matched token by token against
the other side's — a naive comparison would call every token a mismatch and fail the target.

So its continuations are tokenized afterwards: with its own `/tokenize` where it serves one, else
with the `/tokenize` of a server it is compared with (the pair check has compared the two
tokenizers where it could; where it could not, the report already says so). Within such a pair
the other side's text is tokenized by the same tokenizer too, so that both sides stand on the same
footing: a server may generate a non-canonical token sequence (" qu" + "ick" where the tokenizer
says " quick"), and matching its ids against canonical ones would count a mismatch where the
texts agree. Where the other side's own ids are already canonical its logprobs are kept. Each
token's text comes from `/detokenize` (cached per id), so reports show text, not ids. The
re-tokenized positions carry no logprobs, so TIE/DRIFT classification stays off for them; token
match, exact match, first divergence and the text metrics run as usual. The report says which
tokenizer was used. Where no server of the pair serves /tokenize, both sides are split into words
(whitespace-led pieces) instead, the same way: "token" match then reads "word match", and the
report says so.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import replace
from typing import Any

from difftest.collect import Endpoint, Generation
from difftest.errors import DifftestError
from difftest.tokens_view import Position, TokensView

log = logging.getLogger(__name__)


def needs_tokens(ep: Endpoint) -> bool:
    return ep.caps.logprobs_cap <= 0


def plan(eps: Mapping[str, Endpoint], pairs: Sequence[tuple[str, str]]) -> dict[str, str | None]:
    """Server without tokens -> the server whose /tokenize tokenizes its text (None: none found)."""
    out: dict[str, str | None] = {}
    for name, ep in eps.items():
        if not needs_tokens(ep):
            continue
        partners = [b if a == name else a for a, b in pairs if name in (a, b)]
        if not partners:
            continue
        if ep.caps.tokenize:
            out[name] = name
            continue
        out[name] = next((p for p in partners if eps[p].caps.tokenize), None)
    return out


_WORD = re.compile(r"\s*\S+|\s+")


def words(gen: Generation) -> Generation:
    """`gen` split into whitespace-led words (no ids, no logprobs): the tokenizer of last resort."""
    if gen.error or gen.text is None:
        return gen
    positions, offset = [], 0
    for w in _WORD.findall(gen.text):
        positions.append(Position(w, None, None, {}, offset))
        offset += len(w)
    return replace(gen, view=TokensView(tuple(positions), gen.text))


def note(name: str, tokenizer: str | None) -> str:
    if tokenizer is None:
        return (
            f"{name} returns no tokens (no logprobs) and no server of the pair serves /tokenize: both "
            "sides are compared word by word (token match reads word match), no TIE/DRIFT classification"
        )
    whose = "its own" if tokenizer == name else f"{tokenizer}'s"
    return (
        f"{name} returns no tokens (no logprobs): its continuations were tokenized with {whose} "
        "/tokenize; token match and first divergence are measured, TIE/DRIFT classification is not"
    )


class Retokenizer:
    def __init__(
        self,
        eps: Mapping[str, Endpoint],
        chosen: Mapping[str, str | None],
        pairs: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.eps = eps
        self.chosen = {k: v for k, v in chosen.items() if v is not None}
        self.wordwise = {k for k, v in chosen.items() if v is None}
        self.pairs = [(a, b) for a, b in pairs if a in self.chosen or b in self.chosen]
        self.word_pairs = [(a, b) for a, b in pairs if a in self.wordwise or b in self.wordwise]
        self._pieces: dict[tuple[str, int], str] = {}
        # (token-less server, partner) -> prompt id -> the partner's generation on the same footing
        self._partner: dict[tuple[str, str], dict[str, Generation]] = {}

    async def _ids(self, ep: Endpoint, text: str) -> list[int] | None:
        body: dict[str, Any] = {"prompt": text, "add_special_tokens": False}
        if ep.caps.model:
            body["model"] = ep.caps.model
        try:
            data = await ep.client.post_json("/tokenize", body)
        except DifftestError as exc:
            log.debug("%s: /tokenize failed: %s", ep.name, exc)
            return None
        ids = data.get("tokens") if isinstance(data, dict) else None
        return ids if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None

    async def _piece(self, ep: Endpoint, tid: int) -> str:
        key = (ep.name, tid)
        if key not in self._pieces:
            from difftest.collect import detokenize

            self._pieces[key] = (await detokenize(ep, tid)) or ""
        return self._pieces[key]

    async def tokens(self, ep: Endpoint, gen: Generation, *, force: bool = False) -> Generation:
        """`gen` with positions from `ep`'s tokenizer: when it has none, or (force) when its own
        ids are not what the tokenizer makes of its text."""
        if gen.error or not gen.text or (len(gen.view) and not force):
            return gen
        ids = await self._ids(ep, gen.text)
        if not ids or (gen.view.token_ids is not None and list(gen.view.token_ids) == ids):
            return gen
        pieces = await asyncio.gather(*(self._piece(ep, i) for i in ids))
        positions, offset = [], 0
        for tid, piece in zip(ids, pieces, strict=True):
            positions.append(Position(f"token_id:{tid}", tid, None, {}, min(offset, len(gen.text))))
            offset += len(piece)
        return replace(gen, view=TokensView(tuple(positions), gen.text))

    async def fill(self, gens: MutableMapping[str, MutableMapping[str, Generation]]) -> None:
        """Replace, in place, every token-less generation of the planned servers; tokenize their
        partners' texts alike (kept per pair, see `for_pair`)."""
        self._partner.clear()
        for name, tok_name in self.chosen.items():
            if name not in gens:
                continue
            ep = self.eps[tok_name]
            items = list(gens[name].items())
            done = await asyncio.gather(*(self.tokens(ep, g) for _, g in items))
            for (pid, _), g in zip(items, done, strict=True):
                gens[name][pid] = g
        for a, b in self.pairs:
            for name, partner in ((a, b), (b, a)):
                if name in self.chosen and partner not in self.chosen and partner in gens:
                    ep = self.eps[self.chosen[name]]
                    items = list(gens[partner].items())
                    done = await asyncio.gather(*(self.tokens(ep, g, force=True) for _, g in items))
                    self._partner[(name, partner)] = {pid: g for (pid, _), g in zip(items, done, strict=True)}

    def for_pair(
        self, gens: Mapping[str, Mapping[str, Generation]], baseline: str, target: str
    ) -> tuple[Mapping[str, Generation], Mapping[str, Generation]]:
        """The two sides' generations of one pair, on the same tokenizer where one side had none."""
        if (baseline, target) in self.word_pairs:
            return (
                {pid: words(g) for pid, g in gens[baseline].items()},
                {pid: words(g) for pid, g in gens[target].items()},
            )
        b = self._partner.get((target, baseline), gens[baseline])
        t = self._partner.get((baseline, target), gens[target])
        return b, t
