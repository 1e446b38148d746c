"""One normalised view of an OpenAI legacy `logprobs` block, position by position.

Servers disagree on the details of the same block, and every one of those details has caused a
false diff somewhere:

- tokens are strings, or `"token_id:N"` when `return_tokens_as_token_ids` was honoured (vLLM);
  a server that silently ignores the flag returns plain strings, so ids are parsed, never assumed;
- `top_logprobs` are dicts keyed by token *string* (two tokens that decode to the same text collide
  and one is lost) or by `"token_id:N"`; a few engines send a list of `{"token", "logprob"}`;
- the first echoed position has `null` logprob and `null` top (nothing to condition on);
- `text_offset` is optional;
- llama.cpp's server sends the chat shape on /v1/completions too: `{"content": [{"id", "token",
  "bytes", "logprob", "top_logprobs": [{"id", "token", "bytes", "logprob"}]}]}`, ids included.

A value that cannot be a logprob is kept as what it says, never dropped: a `null` alternative
(NaN through orjson / pydantic v2 serialisation) is NaN, and `impossible_logprobs` names values
above 0 and top lists holding more than all the probability.

`parse_choice(choice)` / `parse_logprobs(block, text=)` turn that into a `TokensView`: a tuple of
`Position`s whose top alternatives are keyed by `int` token id when the server gave ids and by
token string otherwise. Metrics read only this structure.
"""

from __future__ import annotations

import codecs
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difftest.errors import ServerError, UnreadableBody

_TOKEN_ID = re.compile(r"token_id:(-?\d+)")

TopKey = int | str


def parse_token_id(token: str) -> int | None:
    """`"token_id:42"` -> 42; any other string -> None."""
    m = _TOKEN_ID.fullmatch(token)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Position:
    token: str  # as served: the token text, or "token_id:N" when ids were returned
    token_id: int | None
    logprob: float | None  # None: not given (first echoed position, or no logprobs asked)
    top: Mapping[TopKey, float]  # alternatives; int keys when the server gave ids, else strings
    text_offset: int | None


@dataclass(frozen=True)
class TokensView:
    positions: tuple[Position, ...]
    text: str | None = None  # the choice's text (prompt + continuation when echoed)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: slice) -> TokensView:
        if not isinstance(index, slice):
            raise TypeError("TokensView supports slices only; use .positions[i] for one position")
        return TokensView(self.positions[index], self.text)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(p.token for p in self.positions)

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        """Every position's id, or None when any position lacks one (no partial id lists)."""
        ids = tuple(p.token_id for p in self.positions)
        return None if any(i is None for i in ids) else ids  # type: ignore[return-value]

    @property
    def has_ids(self) -> bool:
        return self.token_ids is not None

    @property
    def logprobs(self) -> tuple[float | None, ...]:
        return tuple(p.logprob for p in self.positions)

    @property
    def top_keys(self) -> str:
        """How top alternatives are keyed: "id", "str", "mixed" or "none" (no alternatives)."""
        kinds = {type(k) for p in self.positions for k in p.top}
        if not kinds:
            return "none"
        if kinds == {int}:
            return "id"
        return "str" if kinds == {str} else "mixed"

    @property
    def top_k(self) -> int:
        return max((len(p.top) for p in self.positions), default=0)

    def token_texts(self) -> tuple[str | None, ...]:
        """Each token's text cut from `text` at its offset: what a "token_id:N" token looks like, and
        one spelling for a byte piece two servers name differently ("<0xE2>", "bytes:\\xe2"). None
        each where the offsets cannot be trusted (`trusted_offsets`): a cut at a wrong offset made
        every token "" on both sides of a pair (a false token match of 100%)."""
        offs = trusted_offsets(self)
        if offs is None:
            return tuple(None for _ in self.positions)
        if not offs:
            return ()
        text = self.text or ""
        ends = offs[1:] + [len(text)]
        return tuple(text[a:b] for a, b in zip(offs, ends, strict=True))


def trusted_offsets(view: TokensView) -> list[int] | None:
    """The positions' offsets into `view.text`, counted from the first token; None where they
    cannot be each token's start in that text.

    Servers count `text_offset` three ways: from the continuation's start (vLLM), from the
    prompt's start even without echo (OpenAI's legacy convention), and vLLM with token ids
    advances by `len("token_id:N")`, the label, not the token's text. Shifting the first token to
    0 covers the first two (an echo's first token is at 0 already); offsets that go back or past
    the text's end are no cut at all. Two more signs of a wrong count: token strings that spell the
    text (they join to it, or to it plus a listed EOS / stop-string tail) whose offsets are not
    their running lengths, and offsets that advance by each token string's length while those
    lengths do not add up to the text's (the labels or byte names were counted; a "▁the" marker
    is as long as the " the" it stands for, so such strings still cut right)."""
    offs = [p.text_offset for p in view.positions]
    text = view.text
    if not offs:
        return []
    if text is None or any(o is None for o in offs):
        return None
    rel = [o - offs[0] for o in offs]  # type: ignore[operator]
    if any(b < a for a, b in zip(rel, rel[1:], strict=False)) or rel[-1] > len(text):
        return None
    tokens = view.tokens
    running = [0, *itertools.accumulate(len(t) for t in tokens[:-1])]
    plain = all(p.token_id is None for p in view.positions)
    if plain and "".join(tokens).startswith(text):  # token strings that are the text
        return rel if rel == [min(r, len(text)) for r in running] else None
    if len(rel) > 1 and rel == running and sum(map(len, tokens)) != len(text):
        return None  # counted the strings as sent, which are not the text
    return rel


def choice_zero(resp: Any, server: str, path: str) -> Any:
    """The choice whose index is 0 where a server says (choices may come in any order), else the
    first; a ServerError naming `server` when the answer holds no choice. One rule for
    /v1/completions and /v1/chat/completions: they read other choices out of the same answer."""
    choices = resp.get("choices") if isinstance(resp, Mapping) else None
    if not isinstance(choices, list) or not choices:
        raise ServerError(f"{server}: {path} answered without any choice", server=server)
    return next((c for c in choices if isinstance(c, Mapping) and c.get("index") == 0), choices[0])


def parse_choice(choice: Mapping[str, Any], *, server: str | None = None) -> TokensView:
    """The view of one `choices[i]` of a completions response (empty when it has no logprobs).

    `server` names the server in the error of a malformed block: with five servers in a run,
    "malformed logprobs block" alone does not say whose bug it is."""
    try:
        if not isinstance(choice, Mapping):
            raise UnreadableBody(
                f"malformed completion choice: expected an object, got {type(choice).__name__}"
            )
        text = choice.get("text")
        return parse_logprobs(choice.get("logprobs"), text=text if isinstance(text, str) else None)
    except UnreadableBody as exc:
        if server is None:
            raise
        raise UnreadableBody(f"{server}: {exc}", server=server) from None


def parse_logprobs(block: Mapping[str, Any] | None, *, text: str | None = None) -> TokensView:
    if block is None:
        return TokensView((), text)
    if not isinstance(block, Mapping):
        raise UnreadableBody(f"malformed logprobs block: expected an object, got {type(block).__name__}")
    if "tokens" not in block and isinstance(block.get("content"), list):  # llama.cpp's server
        return parse_content(block["content"], text=text)
    tokens = _list(block, "tokens")
    n = len(tokens)
    lps = _list(block, "token_logprobs", n)
    tops = _list(block, "top_logprobs", n)
    offsets = _list(block, "text_offset", n)
    positions = []
    for i, tok in enumerate(tokens):
        if not isinstance(tok, str):
            raise UnreadableBody(
                f"malformed logprobs block: tokens[{i}] is {type(tok).__name__}, not a string"
            )
        off = offsets[i]
        positions.append(
            Position(
                token=tok,
                token_id=parse_token_id(tok),
                logprob=_num(lps[i], f"token_logprobs[{i}]"),
                top=_top(tops[i], i),
                text_offset=int(off) if isinstance(off, int | float) else None,
            )
        )
    return TokensView(tuple(positions), text)


def parse_content(entries: Sequence[Any], *, text: str | None) -> TokensView:
    """The chat logprobs shape (`logprobs.content`, also llama.cpp's /v1/completions): one entry
    per generated token. Offsets are rebuilt from each token's `bytes` (the shape has no
    text_offset); an `id` the server gave is the token's id. Generated positions only, so a
    `null` logprob is never "nothing to condition on": it is NaN."""
    positions: list[Position] = []
    offset: int | None = 0
    # one decoder over the running bytes: a character split over tokens belongs to the token that
    # completes it (each token's bytes decoded alone lost it, shifting later tokens' texts)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or not isinstance(e.get("token"), str):
            raise UnreadableBody(f"malformed logprobs entry {i}: expected an object with a 'token'")
        if "logprob" not in e:
            got = "post-sampling probabilities" if "prob" in e else "no logprob"
            raise UnreadableBody(f"malformed logprobs entry {i}: {got}, not logprobs")
        lp = _num(e["logprob"], f"content[{i}].logprob")
        tops = e.get("top_logprobs")
        positions.append(
            Position(
                token=e["token"],
                token_id=_entry_id(e),
                logprob=math.nan if lp is None else lp,
                top=_top(tops, i, keyed_by_id=True),
                text_offset=offset,
            )
        )
        piece = _piece(e, utf8)
        # a "token_id:N" without bytes adds text of unknown length: the later offsets are unknown
        # too (counted as "", every later token's text went to the last one)
        offset = None if offset is None or piece is None else offset + len(piece)
    return TokensView(tuple(positions), text)


def _entry_id(entry: Mapping[str, Any]) -> int | None:
    tid = entry.get("id")
    if isinstance(tid, int) and not isinstance(tid, bool):
        return tid
    return parse_token_id(entry["token"]) if isinstance(entry.get("token"), str) else None


def _piece(entry: Mapping[str, Any], utf8: codecs.IncrementalDecoder) -> str | None:
    """The text a content entry adds: its bytes where given (a token string may be cut at a
    partial UTF-8 character), fed to `utf8`, which holds the earlier tokens' unfinished
    character; else its token string; None for a "token_id:N" label (its text is unknown)."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in raw
    ):
        return utf8.decode(bytes(raw))
    tok = entry.get("token")
    return tok if isinstance(tok, str) and parse_token_id(tok) is None else None


def coverage_problem(
    view: TokensView, *, max_tokens: int | None = None, finish_reason: str | None = None
) -> str | None:
    """Why the logprob positions of a *generation* (no echo) cannot be the tokens of its text;
    None when nothing shows they disagree.

    A server whose logprobs cover part of its text gets judged on the part it chose to show:
    token match on half a continuation, teacher forcing quietly switched off, a false PASS
    (issue 10). Three signs, each certain for greedy decoding without stop strings:
    - text but no positions at all;
    - `finish_reason == "length"` means exactly `max_tokens` tokens were generated, so that is how
      many positions there must be;
    - token strings (not ids) that join to a strict prefix of the text (the rest has no logprobs).
    Token strings that do not join to the text at all (byte pieces, "▁" markers) prove nothing:
    conformance's echo alignment check deals with those.
    A `null` logprob at a generated position is no answer either (only an echo's first position
    has nothing to condition on): orjson and pydantic v2 write NaN as `null`.
    """
    text = view.text
    n = len(view)
    if n == 0:
        return f"no logprob tokens for {len(text)} characters of text" if text else None
    if finish_reason == "length" and max_tokens is not None and n != max_tokens:
        more = "more" if n > max_tokens else "fewer"
        return (
            f'{n} logprob tokens for max_tokens={max_tokens} with finish_reason "length" '
            f"({more} tokens than asked for)"
        )
    nulls = [i for i, p in enumerate(view.positions) if p.logprob is None]
    if nulls:
        return f"null logprobs at generated positions {nulls[:8]} (NaN written as null?)"
    if text is not None and not view.has_ids:
        joined = "".join(view.tokens)
        if len(joined) < len(text) and text.startswith(joined):
            return f"the {n} logprob tokens cover {len(joined)} of the {len(text)} characters of text"
    return None


LOGPROB_SLACK = 0.05
"""Nats above 0 a logprob, or a top list's log total, may show before it is impossible: float32
log-softmax rounds by ~1e-6, a log-softmax taken in bfloat16 by up to ~1e-2."""


def nan_positions(view: TokensView) -> list[int]:
    """Positions whose logprob or any top alternative is NaN (a broken kernel, never noise)."""
    return [
        i
        for i, p in enumerate(view.positions)
        if (p.logprob is not None and math.isnan(p.logprob)) or any(math.isnan(v) for v in p.top.values())
    ]


def impossible_logprobs(view: TokensView, *, where: str = "positions", greedy: bool = False) -> str | None:
    """Why some position's numbers cannot be log-probabilities, or None: NaN, a logprob above 0,
    top alternatives whose probabilities add up to more than 1 (probabilities sent in the
    logprob slot, a lost sign), a chosen token whose logprob contradicts its own top entry; with
    `greedy` (a temperature-0 generation), a chosen token of probability 0. Never noise: judged as
    a broken answer, never scored as a KL. (A greedy token below its own top-1 is not impossible:
    `greedy_not_top1`.)"""
    nan = nan_positions(view)
    if nan:
        return f"NaN logprobs at {where} {nan[:8]} (NaN always fails)"
    above = [
        i
        for i, p in enumerate(view.positions)
        if (p.logprob is not None and p.logprob > LOGPROB_SLACK)
        or any(v > LOGPROB_SLACK for v in p.top.values())
    ]
    if above:
        return f"logprobs above 0 at {where} {above[:8]} (probabilities sent as logprobs, or a lost sign?)"
    never = [i for i, p in enumerate(view.positions) if greedy and p.logprob == -math.inf]
    if never:  # the argmax of a distribution has probability >= 1 / vocabulary, never 0
        return f"chosen tokens of probability 0 (-inf logprob) at {where} {never[:8]}: greedy decoding never picks one"
    for i, p in enumerate(view.positions):
        total = sum(math.exp(v) for v in p.top.values())
        if total > math.exp(LOGPROB_SLACK):
            return f"top logprobs at {where} [{i}] whose probabilities add up to {total:.3g} (more than 1)"
    return _self_contradiction(view, where)


def _comparable(key: TopKey) -> bool:
    """Whether a top entry stands for one token: a string key holding U+FFFD may be several byte
    pieces summed (or one of them dropped by a dict-keyed server), so it proves nothing."""
    return not (isinstance(key, str) and "\ufffd" in key)


def _own_entry(p: Position) -> float | None:
    """The chosen token's logprob as its own top list gives it, where the list is keyed by token
    id (None: not listed, or keyed by text). A text key may stand for two tokens that decode
    alike ("▁" and "<0x20>"), the lower one's value overwriting the other's in a server's dict,
    so a correct server would read as contradicting itself."""
    return p.top.get(p.token_id) if p.token_id is not None else None


def _self_contradiction(view: TokensView, where: str) -> str | None:
    """A chosen token whose logprob differs from its own entry in the top list: the server computed
    one number twice, on two paths (processed against raw logits, another precision, a shifted
    row). lm-eval scores with the chosen token's value and the KL reads the list, so each would
    judge a different model; neither can be trusted."""
    bad = []
    for i, p in enumerate(view.positions):
        own = _own_entry(p)
        if own is not None and p.logprob is not None and abs(p.logprob - own) > LOGPROB_SLACK:
            bad.append((i, p.logprob, own))
    if not bad:
        return None
    i, lp, own = bad[0]
    return (
        f"chosen-token logprobs that differ from their own top_logprobs entry at {where} "
        f"{[b[0] for b in bad][:8]} ([{i}]: {lp:.4g} against {own:.4g}): one number computed two ways"
    )


def greedy_not_top1(view: TokensView, where: str = "positions") -> str | None:
    """Temperature-0 tokens below the top of their own top list, or None. Not impossible: a server
    that applies a penalty (vLLM takes repetition_penalty from the model's generation_config
    unless the request sets it) picks after it and reports the raw logprobs, deterministically
    and alike on both sides of a pair; but a server that samples does the same, and judged on its
    tokens it reads as a kernel regression. So the probe names it (a warning), never refuses it."""
    bad = []
    for i, p in enumerate(view.positions):
        tops = [v for k, v in p.top.items() if _comparable(k)]
        if p.logprob is not None and tops and p.logprob < max(tops) - LOGPROB_SLACK:
            bad.append((i, p.logprob, max(tops)))
    if not bad:
        return None
    i, lp, best = bad[0]
    return (
        f"temperature-0 tokens that are not the top-1 of their own top_logprobs at {where} "
        f"{[b[0] for b in bad][:8]} ([{i}]: {lp:.4g} against top-1 {best:.4g})"
    )


def _list(block: Mapping[str, Any], key: str, n: int | None = None) -> Sequence[Any]:
    value = block.get(key)
    if value is None:
        return [] if n is None else [None] * n
    if not isinstance(value, list):
        raise UnreadableBody(f"malformed logprobs block: {key} is {type(value).__name__}, not a list")
    if n is not None and len(value) != n:
        raise UnreadableBody(f"malformed logprobs block: {key} has {len(value)} entries for {n} tokens")
    return value


def _num(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnreadableBody(f"malformed logprobs block: {where} is {value!r}, not a number")
    return float(value) if not math.isnan(value) else math.nan


def _top(value: Any, i: int, *, keyed_by_id: bool = False) -> Mapping[TopKey, float]:
    """One position's alternatives. A `null` value is NaN (a listed alternative always has a
    logprob). `keyed_by_id`: list entries carrying an integer `id` (llama.cpp) are keyed by it."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):  # [{"token": ..., "logprob": ...}] (llama.cpp, chat)
        try:
            items = [(_entry_id(e) if keyed_by_id else None, e["token"], e["logprob"]) for e in value]
        except (TypeError, KeyError, AttributeError) as e:
            raise UnreadableBody(
                f"malformed logprobs block: top_logprobs[{i}] entries lack token/logprob"
            ) from e
        items = [(tid if tid is not None else tok, lp) for tid, tok, lp in items]
    else:
        raise UnreadableBody(f"malformed logprobs block: top_logprobs[{i}] is {type(value).__name__}")
    out: dict[TopKey, float] = {}
    for key, lp in items:
        tid = parse_token_id(key) if isinstance(key, str) else key if isinstance(key, int) else None
        num = _num(lp, f"top_logprobs[{i}][{key!r}]")
        value = math.nan if num is None else num
        slot = tid if tid is not None else str(key)
        # A list may name one string twice (two ids that decode alike, e.g. byte-fallback pieces
        # as "\ufffd"): the string's probability is their sum. Keeping the later one dropped the
        # other's mass, and which one came later can differ between two servers.
        out[slot] = _log_add(out[slot], value) if slot in out else value
    return out


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow; NaN stays NaN (it always fails later)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def prompt_tokens(resp: Any) -> int | None:
    """`usage.prompt_tokens` of a completions / chat answer, where the server sent it
    (difftest.usage_check compares them between the two sides of a pair)."""
    usage = resp.get("usage") if isinstance(resp, dict) else None
    n = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None
