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
re-tokenized positions carry no logprobs and are marked (`Generation.retokenized`): no TIE/DRIFT/WRONG
label for a divergence at a token a tokenizer cut, which the server may never have picked (scoring);
token match, exact match, first divergence and the text metrics run as usual. The report says which
tokenizer was used. Where no server of the pair serves /tokenize, both sides are split into words
(whitespace-led pieces) instead, the same way: "token" match then reads "word match", and the
report says so.

Token ids whose text cannot be cut from the text (vLLM's `text_offset` counts the label
"token_id:N", not the token's text) get each id's text from the server's `/detokenize` the same
way, and offsets rebuilt from those texts where they join back to the text. A SentencePiece or
byte-fallback id decoded alone is not its text in context (Llama's "▁word" decodes to "word", a
byte of "€" to U+FFFD): where the single-id texts do not join back, each token's text is read in
context instead, from a short window of ids ending at it (`Retokenizer._in_context`). Where
neither joins back, or no /detokenize is served, the ids stay; a prompt where such a side meets
one without ids is compared word by word (a "token_id:N" label never equals a token string), and
the report says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import replace
from typing import Any

from difftest.collect import Endpoint, Generation, detokenize_ids
from difftest.errors import DifftestError
from difftest.tokens_view import Position, TokensView, trusted_offsets

log = logging.getLogger(__name__)


def needs_tokens(ep: Endpoint) -> bool:
    return ep.caps.logprobs_cap <= 0


def replayed(ep: Endpoint) -> bool:
    """Whether `ep` is a recorded baseline answering from its file (difftest.baseline)."""
    return ep.client.from_baseline


def can_tokenize(ep: Endpoint) -> bool:
    """Whether `ep`'s /tokenize can tokenize a text this run has made. A recorded baseline lists
    /tokenize among its recorded capabilities but holds answers for the texts it was asked when
    recording only: every other text is a 404, a continuation left with no tokens (token match 0%,
    a false FAIL). A recording can never hold them: they depend on the target's answers."""
    return ep.caps.tokenize and not replayed(ep)


def plan(eps: Mapping[str, Endpoint], pairs: Sequence[tuple[str, str]]) -> dict[str, str | None]:
    """Server without tokens -> the live server whose /tokenize tokenizes its text (None: none
    found, the pair is compared word by word); its own first, else a partner's (the pair check
    has compared the two tokenizers where it could)."""
    out: dict[str, str | None] = {}
    for name, ep in eps.items():
        if not needs_tokens(ep):
            continue
        partners = [b if a == name else a for a, b in pairs if name in (a, b)]
        if not partners:
            continue
        if can_tokenize(ep):
            out[name] = name
            continue
        out[name] = next((p for p in partners if can_tokenize(eps[p])), None)
    return out


_WORD = re.compile(r"\s*\S+|\s+")

# Ids before a token in its context window: enough to carry a SentencePiece space and the bytes
# of one UTF-8 character (at most 4) into the decode.
CONTEXT_IDS = 4
# Window decodes (/detokenize of several ids) one run may ask for texts in context: about 1.2 per
# generated token (38 measured for 32), so ~107 prompts of 32 tokens, ~52 of 64; past it, the rest
# keep their ids (logged).
WINDOW_CAP = 4096
_PENDING = "\ufffd"  # what a byte token of an unfinished character decodes to


def words(gen: Generation) -> Generation:
    """`gen` split into whitespace-led words (no ids, no logprobs): the tokenizer of last resort."""
    if gen.error or gen.text is None:
        return gen
    positions, offset = [], 0
    for w in _WORD.findall(gen.text):
        positions.append(Position(w, None, None, {}, offset))
        offset += len(w)
    return replace(gen, view=TokensView(tuple(positions), gen.text), retokenized=True)


def unreadable(gen: Generation) -> bool:
    """Whether `gen`'s tokens are "token_id:N" labels with no text of their own: its offsets cannot
    be trusted (`tokens_view.trusted_offsets`). Matched against token strings, every label is a
    mismatch (token match 0% on identical answers)."""
    return gen.error is None and gen.view.has_ids and None in gen.view.token_texts()


def labels_against_strings(ref: Generation, tgt: Generation) -> bool:
    """A pair whose token keys cannot be compared: one side's labels against the other's strings
    (with ids on both sides the ids are compared, text or not)."""
    if ref.error or tgt.error or (ref.view.has_ids and tgt.view.has_ids):
        return False
    return unreadable(ref) or unreadable(tgt)


def note(name: str, tokenizer: str | None) -> str:
    if tokenizer is None:
        return (
            f"{name} returns no tokens (no logprobs) and no live server of the pair serves /tokenize (a "
            "recorded baseline holds no tokenization of texts it was not asked while recording): both "
            "sides are compared word by word (token match reads word match), no TIE/DRIFT classification"
        )
    whose = "its own" if tokenizer == name else f"{tokenizer}'s"
    return (
        f"{name} returns no tokens (no logprobs): its continuations were tokenized with {whose} "
        "/tokenize; token match and first divergence are measured, TIE/DRIFT classification is not"
    )


def partner_note(name: str, tokenizer: str, own: Generation) -> str:
    """Why `name`, which sent tokens of its own, is shown re-tokenized too (`Retokenizer.fill`
    tokenizes a token-less side's partner with the same /tokenize). The quick look showed the
    re-tokenized tokens under a note naming only the token-less side, as if they were the ones
    `name` generated (" contract", "sm", "o" for its " contracts", "mo")."""
    why = (
        "its own tokens carry no ids to match that tokenizer's"
        if own.view.token_ids is None
        else "its own tokens are not what that tokenizer makes of its text"
    )
    served = ", ".join(repr(t) for t in own.display_tokens()[:12]) + (", ..." if len(own.view) > 12 else "")
    return (
        f"{name}'s continuation was tokenized with {tokenizer}'s /tokenize too, so that both sides stand "
        f"on one tokenizer ({why}; it generated {served}): the columns below are that tokenization; "
        f"{name}'s alternatives are its own, where one of its tokens starts at the divergence"
    )


def own_alternatives(own: Generation, shown: Generation, index: int | None) -> dict[str, float]:
    """The alternatives `own` (a generation as served) lists at the token of its own that starts
    where `shown` (its re-tokenization) has position `index`: the server's distribution after the
    same text. Empty where none of its tokens starts there (it cut the text elsewhere), where
    `index` starts inside a character's bytes, or where either side's offsets are unknown. Its
    re-tokenization carries no logprobs: the quick look said "n/a (no logprobs)" although the
    server had sent them."""
    if index is None or index >= len(shown.view):
        return {}
    mine, theirs = trusted_offsets(own.view), trusted_offsets(shown.view)
    if not mine or not theirs or (index and theirs[index - 1] == theirs[index]):
        return {}
    at = theirs[index]
    if at not in mine:
        return {}
    return {str(k): float(v) for k, v in own.view.positions[mine.index(at)].top.items()}


class Retokenizer:
    def __init__(
        self,
        eps: Mapping[str, Endpoint],
        chosen: Mapping[str, str | None],
        pairs: Sequence[tuple[str, str]] = (),
        *,
        window_cap: int = WINDOW_CAP,
    ) -> None:
        self.eps = eps
        self.chosen = {k: v for k, v in chosen.items() if v is not None}
        self.wordwise = {k for k, v in chosen.items() if v is None}
        self.pairs = [(a, b) for a, b in pairs if a in self.chosen or b in self.chosen]
        self.word_pairs = [(a, b) for a, b in pairs if a in self.wordwise or b in self.wordwise]
        self._pieces: dict[tuple[str, int], str | None] = {}
        # (server, ids) -> their text decoded together: texts in context (`_in_context`)
        self._windows: dict[tuple[str, tuple[int, ...]], asyncio.Future[str | None]] = {}
        self._window_budget = window_cap
        self.window_cap = window_cap
        self.capped = False  # the cap stopped a text in context: notes() says so
        # (baseline, target) -> prompts compared word by word: labels against token strings
        self._worded: dict[tuple[str, str], set[str]] = {}
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

    async def _text(self, ep: Endpoint, tid: int) -> str | None:
        """One id's text from `ep`'s /detokenize, asked once per server and id (None: not served)."""
        key = (ep.name, tid)
        if key not in self._pieces:
            from difftest.collect import detokenize

            self._pieces[key] = await detokenize(ep, tid)
        return self._pieces[key]

    async def _decoded(self, ep: Endpoint, window: tuple[int, ...]) -> str | None:
        """`window`'s ids decoded together, asked once per server and window; None: not served,
        or the run's cap on such requests is spent (logged once, noted per pair)."""
        if len(window) < 2:
            return await self._text(ep, window[0]) if window else ""  # asked per id already
        key = (ep.name, window)
        if key not in self._windows:
            if self._window_budget <= 0:
                if not self.capped:
                    log.warning(
                        "%s: %d /detokenize requests for token texts in context asked (the cap): "
                        "later generations whose single-token texts do not join back keep their ids",
                        ep.name, self.window_cap,
                    )  # fmt: skip
                self.capped = True
                return None
            self._window_budget -= 1
            # a task, not its result: prompts decoding the same window at once share one request
            self._windows[key] = asyncio.ensure_future(detokenize_ids(ep, window))
        return await self._windows[key]

    @staticmethod
    def _context(ids: Sequence[int], i: int, anchor: int | None) -> tuple[int, ...]:
        """The ids decoded before position i: the 4 to 7 before it, starts aligned to blocks of
        CONTEXT_IDS so that one token's longer window is the next one's shorter (about one request
        a token). The first token gets `anchor` instead: SentencePiece drops the leading space of
        whichever token starts a decode, so a token needs something before it."""
        if i == 0:
            return (anchor,) if anchor is not None else ()
        start = max(0, (i // CONTEXT_IDS - 1) * CONTEXT_IDS)
        return tuple(ids[start:i])

    async def _in_context(self, ep: Endpoint, ids: Sequence[int]) -> list[str] | None:
        """Each id's text where it stands: decode(context + token) minus decode(context), taken
        only where the shorter decode is a prefix of the longer and ends in no U+FFFD (else the
        token changed what came before it). A token whose text ends in U+FFFD (a byte of an
        unfinished character) is read together with the next ones, up to a UTF-8 character's 4
        bytes, and split by `_split`. None where a decode is missing or does not fit."""
        anchor = next((i for i in ids if (self._pieces.get((ep.name, i)) or "").isalnum()), None)
        windows = {
            w for j in range(len(ids)) for c in [self._context(ids, j, anchor)] for w in (c, (*c, ids[j]))
        }
        await asyncio.gather(*(self._decoded(ep, w) for w in sorted(windows)))  # the common case, at once
        pieces: list[str] = []
        i = 0
        while i < len(ids):
            ctx = self._context(ids, i, anchor)
            short = await self._decoded(ep, ctx)
            if short is None or short.endswith(_PENDING):
                return None
            last = min(i + 4, len(ids)) - 1
            group: list[str] = []
            for j in range(i, last + 1):
                long = await self._decoded(ep, (*ctx, *ids[i : j + 1]))
                if long is None or not long.startswith(short):
                    return None
                group.append(long)
                if not long.endswith(_PENDING) or j == last:
                    break
            pieces += _split(group, len(short))
            i = j + 1
        return pieces

    async def _offsets(self, ep: Endpoint, ids: Sequence[int], text: str) -> list[int] | None:
        """Each id's start in `text` from its /detokenize text: alone where those join back to the
        text (followed by what the text leaves out: an EOS, the rest of a stop string), else in
        context (`_in_context`); None where neither does."""
        pieces: Sequence[str | None] = [self._pieces.get((ep.name, i)) for i in ids]
        if not _joins(pieces, text):
            pieces = await self._in_context(ep, ids) or [None]
            if not _joins(pieces, text):
                return None
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(min(at, len(text)))
            at += len(piece or "")
        return offsets

    async def readable(self, ep: Endpoint, gens: Sequence[Generation]) -> list[Generation]:
        """`gens` (one server's) with offsets rebuilt from each id's /detokenize text where the
        server's own cannot be trusted and those texts join back to the text (`_offsets`); the
        others as they are."""
        todo = [g for g in gens if unreadable(g) and g.text is not None]
        if not todo or not ep.caps.tokenize:
            return list(gens)
        ids = sorted({i for g in todo for i in g.view.token_ids or ()})
        await asyncio.gather(*(self._text(ep, i) for i in ids))  # each id once, not once per prompt
        rebuilt = await asyncio.gather(*(self._rebuilt(ep, g) for g in todo))
        done = {id(g): r for g, r in zip(todo, rebuilt, strict=True)}
        return [done.get(id(g), g) for g in gens]

    async def _rebuilt(self, ep: Endpoint, gen: Generation) -> Generation:
        offsets = await self._offsets(ep, gen.view.token_ids or (), gen.text or "")
        if offsets is None:
            return gen  # ids stay: a pair with a side without ids is compared word by word
        positions = [replace(p, text_offset=o) for p, o in zip(gen.view.positions, offsets, strict=True)]
        return replace(gen, view=TokensView(tuple(positions), gen.text))

    async def tokens(self, ep: Endpoint, gen: Generation, *, force: bool = False) -> Generation:
        """`gen` with positions from `ep`'s tokenizer: when it has none, or (force) when its own
        ids are not what the tokenizer makes of its text. Offsets from the ids' /detokenize texts
        where those join back to the text (`_offsets`), else none: offsets from texts that do not
        join back cut wrong token texts for the report."""
        if gen.error or not gen.text or (len(gen.view) and not force):
            return gen
        ids = await self._ids(ep, gen.text)
        if not ids or (gen.view.token_ids is not None and list(gen.view.token_ids) == ids):
            return gen
        await asyncio.gather(*(self._text(ep, i) for i in set(ids)))
        offsets = await self._offsets(ep, ids, gen.text) or [None] * len(ids)
        positions = [Position(f"token_id:{t}", t, None, {}, o) for t, o in zip(ids, offsets, strict=True)]
        return replace(gen, view=TokensView(tuple(positions), gen.text), retokenized=True)

    async def fill(self, gens: MutableMapping[str, MutableMapping[str, Generation]]) -> None:
        """Replace, in place, every token-less generation of the planned servers; tokenize their
        partners' texts alike (kept per pair, see `for_pair`); give id tokens without text theirs
        (`readable`)."""
        self._partner.clear()
        for name, per in gens.items():
            if name in self.eps:
                items = list(per.items())
                done = await self.readable(self.eps[name], [g for _, g in items])
                per.update((pid, g) for (pid, _), g in zip(items, done, strict=True))
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
        worded = [pid for pid in t if pid in b and labels_against_strings(b[pid], t[pid])]
        if not worded:
            return b, t
        self._worded.setdefault((baseline, target), set()).update(worded)
        b, t = dict(b), dict(t)
        for pid in worded:
            b[pid], t[pid] = words(b[pid]), words(t[pid])
        return b, t

    def planned(self, name: str) -> bool:
        """Whether `name` sends no tokens and is tokenized here (by a /tokenize, or into words)."""
        return name in self.chosen or name in self.wordwise

    def worded(self, baseline: str, target: str, pid: str) -> bool:
        """Whether `for_pair` compared the pair's prompt `pid` word by word."""
        return (baseline, target) in self.word_pairs or pid in self._worded.get((baseline, target), ())

    def notes(self, baseline: str, target: str) -> list[str]:
        """The pair's prompts compared word by word because one side's ids had no text (for_pair)."""
        worded = sorted(self._worded.get((baseline, target), ()))
        if not worded:
            return []
        shown = ", ".join(worded[:5]) + (", ..." if len(worded) > 5 else "")
        capped = (
            f" (the run's cap of {self.window_cap} /detokenize requests for token texts in context "
            "was reached)"
            if self.capped
            else ""
        )
        return [
            f"{baseline} vs {target}: on {len(worded)} prompt(s) ({shown}) one side sent token ids whose "
            f"text_offset does not fit its text and no /detokenize text joins back to it{capped}, the "
            "other token strings: those prompts are compared word by word (token match reads word match there)"
        ]


def _split(group: Sequence[str], start: int) -> list[str]:
    """A group's tokens' texts from its decodes (the i-th: context + the group's first i+1 ids),
    the context's text `start` long. Each token ends where its decode stops agreeing with the
    group's whole: bytes that form a character give it to the last of them (the offsets
    `token_texts` cuts for byte pieces), while a byte whose U+FFFD stays (a lone lead byte, a cut
    character: the next token left the run as it was) keeps its own, as the string side cuts it.
    Gluing those onto the next token scored identical ids as a divergence."""
    whole, cuts, at = group[-1], [], start
    for text in group[:-1]:
        at = max(at, len(os.path.commonprefix([text, whole])))
        cuts.append(at)
    cuts.append(len(whole))
    return [whole[a:b] for a, b in zip([start, *cuts[:-1]], cuts, strict=True)]


def _joins(pieces: Sequence[str | None], text: str) -> bool:
    """Whether token texts spell `text` (followed by what the text leaves out: an EOS, the rest of
    a stop string): only then are the offsets they give each token's start."""
    return all(p is not None for p in pieces) and "".join(pieces).startswith(text)  # type: ignore[arg-type]
