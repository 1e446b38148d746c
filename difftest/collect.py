"""What the differ asks each server: greedy continuations, and teacher-forced echoes.

Two request kinds, both over `/v1/completions`:

- **generate**: the prompt, greedy (`temperature=0`), `logprobs=k`, token ids when the server
  honours `return_tokens_as_token_ids`. Gives the free-running continuation of each side.
- **force**: the baseline's prompt + continuation echoed back with `max_tokens=0`, `logprobs=k`,
  so that both sides score *the same* tokens. Sent as token ids when the target accepts id
  prompts and returns ids (re-tokenising text can shift the alignment at the seam), else as text
  with an alignment check: a continuation that does not re-tokenise to the same tokens is
  reported, never scored at shifted positions.

A failed request never raises out of here: it becomes an `error` string on that prompt, so that
one dead request is counted in the denominators instead of ending the run (the runner decides
when the error rate makes it an infrastructure failure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difftest.client import CompletionClient
from difftest.conformance import Capabilities
from difftest.errors import DifftestError, OutputError, ServerError, UsageError
from difftest.prompts import Prompt, check_completions, needs_chat
from difftest.tokens_view import (
    Position,
    TokensView,
    choice_zero,
    coverage_problem,
    impossible_logprobs,
    parse_choice,
    prompt_tokens,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A connected server and what conformance found it can do."""

    name: str
    client: CompletionClient
    caps: Capabilities
    # the run's `seed`, sent with every request built here (echoes, slot probes): README promises
    # it on every request, and a baseline replays only the bodies it recorded
    seed: int = 0

    def payload(
        self, prompt: Any, *, max_tokens: int, k: int, seed: int, echo: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": seed,
        }
        if self.caps.model:
            body["model"] = self.caps.model
        if k > 0 and self.caps.logprobs_cap > 0:
            body["logprobs"] = min(k, self.caps.logprobs_cap)
        if echo:
            body["echo"] = True
        if self.caps.token_id_strings:
            body["return_tokens_as_token_ids"] = True
        return body

    @property
    def k(self) -> int:
        return self.caps.logprobs_cap


@dataclass(frozen=True)
class Generation:
    """One greedy continuation as served."""

    text: str | None
    view: TokensView  # the generated positions only
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None  # the server's usage.prompt_tokens (difftest.usage_check)
    # the server answered, but the answer is not a possible one (malformed logprobs block, text and
    # logprobs that disagree): a bug in the server, not a request that failed
    broken: bool = False
    # positions cut from the text by a tokenizer (difftest.retokenize: the server sent no tokens, or
    # its own were not that tokenizer's), not the tokens it generated: no TIE/DRIFT/WRONG from them
    retokenized: bool = False

    @property
    def keys(self) -> tuple[int, ...] | tuple[str, ...]:
        """Token ids when the server gave them, else token strings: what the sides are matched on."""
        ids = self.view.token_ids
        return ids if ids is not None else self.view.tokens

    def display_tokens(self) -> list[str]:
        """Token texts for people and for string matching: cut from the text where the offsets
        can be trusted (`TokensView.token_texts`), else the tokens as served ("token_id:N" labels
        included: `retokenize.unreadable` names those, the pair is then compared word by word)."""
        texts = self.view.token_texts()
        return [t if t is not None else tok for t, tok in zip(texts, self.view.tokens, strict=True)]


@dataclass(frozen=True)
class Forced:
    """Teacher-forced logprobs of a continuation, one `Position` per continuation token."""

    positions: tuple[Position, ...] = ()
    error: str | None = None
    # the server failed the request or sent an answer that cannot be its tokens: the prompt is a
    # failed request (counted), not one whose teacher-forced metrics are merely unavailable
    failed: bool = False
    broken: bool = False  # failed by answering what cannot be the tokens it was sent (not a lost request)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def first_choice(resp: Mapping[str, Any], server: str) -> tuple[Mapping[str, Any], TokensView]:
    """The index-0 choice of a completions answer and its view; a ServerError naming `server`
    when the answer has no usable choice (an empty list, a choice without text, a malformed block)."""
    choice = choice_zero(resp, server, "/v1/completions")
    view = parse_choice(choice, server=server)
    if not isinstance(choice.get("text"), str):
        raise ServerError(f"{server}: /v1/completions answered a choice without text")
    return choice, view


def read_completion(resp: Any, server: str) -> tuple[str, TokensView, str | None]:
    """(text, view, finish_reason) of a completions answer: `chat.read_chat_answer`'s counterpart."""
    choice, view = first_choice(resp, server)
    return choice["text"], view, choice.get("finish_reason")


REQUEST_ERRORS = (DifftestError, KeyError, IndexError, TypeError)  # a failed request, an unreadable answer


async def generate(ep: Endpoint, prompt: Prompt, *, max_tokens: int, k: int, seed: int) -> Generation:
    """One greedy continuation over the endpoint the server was probed for. Both endpoints' answers
    pass the same checks: a request that failed is an error; an answer that is no text or whose
    logprobs cannot be that text's tokens is broken (a server bug, judged as a FAIL)."""
    tokens = prompt.max_tokens if prompt.max_tokens is not None else max_tokens
    if ep.caps.api == "chat":
        from difftest.chat import chat_payload, post_chat, read_chat_answer

        payload = chat_payload(ep.caps, prompt, max_tokens=tokens, k=k, seed=seed)
        asked, read = post_chat(ep.client, payload), read_chat_answer
    else:
        if prompt.messages:  # a conversation is never sent flattened into "role: content" lines
            raise UsageError(needs_chat(prompt))
        payload = ep.payload(prompt.prompt, max_tokens=tokens, k=k, seed=seed)
        asked, read = ep.client.completions(payload), read_completion
    try:
        resp = await asked
    except OutputError:  # our own folder, not the server: the run stops (exit 2)
        raise
    except REQUEST_ERRORS as exc:
        log.debug("%s: generation for %s failed: %s", ep.name, prompt.id, exc)
        return Generation(None, TokensView(()), error=_error_text(exc))
    try:
        text, view, finish = read(resp, ep.name)
    except OutputError:  # our own folder, not the server: the run stops (exit 2)
        raise
    except REQUEST_ERRORS as exc:
        log.debug("%s: generation for %s is malformed: %s", ep.name, prompt.id, exc)
        return Generation(None, TokensView(()), error=_error_text(exc), broken=True)
    if "logprobs" in payload:  # the positions must be the text's tokens, or nothing is judged on them
        problem = coverage_problem(view, max_tokens=tokens, finish_reason=finish)
        if problem is not None:
            return Generation(
                None, TokensView(()), error=f"{ep.name}: text and logprobs disagree: {problem}", broken=True
            )
    return Generation(text, view, finish, prompt_tokens=prompt_tokens(resp))


async def generate_all(
    ep: Endpoint,
    prompts: Sequence[Prompt],
    *,
    max_tokens: int,
    k: int,
    seed: int,
    on_done: Callable[[], None] | None = None,
) -> dict[str, Generation]:
    if ep.caps.api != "chat":  # before any request: refused mid-gather, the others' requests lingered
        check_completions(prompts)

    async def one(p: Prompt) -> tuple[str, Generation]:
        g = await generate(ep, p, max_tokens=max_tokens, k=k, seed=seed)
        if on_done:
            on_done()
        return p.id, g

    return dict(await asyncio.gather(*(one(p) for p in prompts)))


async def prompt_token_ids(ep: Endpoint, text: str) -> list[int] | None:
    """The ids the server itself uses for `text` (BOS included if it adds one), or None."""
    try:
        if ep.caps.tokenize:
            body: dict[str, Any] = {"prompt": text}
            if ep.caps.model:
                body["model"] = ep.caps.model
            data = await ep.client.post_json("/tokenize", body)
            ids = data.get("tokens") if isinstance(data, dict) else None
            if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
                return ids
        if ep.caps.token_id_strings and ep.caps.echo:
            resp = await ep.client.completions(ep.payload(text, max_tokens=0, k=0, seed=ep.seed, echo=True))
            ids = first_choice(resp, ep.name)[1].token_ids
            return list(ids) if ids is not None else None
    except OutputError:  # our own folder, not the server: the run stops (exit 2)
        raise
    except (DifftestError, KeyError, IndexError, TypeError) as exc:
        log.debug("%s: tokenising a prompt failed: %s", ep.name, exc)
    return None


async def force(
    ep: Endpoint,
    prompt: Prompt,
    continuation: Generation,
    *,
    prompt_ids: list[int] | None,
    as_ids: bool,
    k: int,
    own: bool = False,
) -> Forced:
    """Echo prompt + `continuation` into `ep`; return the continuation's positions, aligned.
    `own`: `ep`'s server generated `continuation` itself (impossible_echo's greedy rule)."""
    n = len(continuation.view)
    if n == 0:
        return Forced(())
    cont_ids = continuation.view.token_ids
    if as_ids and prompt_ids is not None and cont_ids is not None:
        body = ep.payload(list(prompt_ids) + list(cont_ids), max_tokens=0, k=k, seed=ep.seed, echo=True)
    else:
        if continuation.text is None:
            return Forced(error="no continuation text to echo")
        body = ep.payload(prompt.prompt + continuation.text, max_tokens=0, k=k, seed=ep.seed, echo=True)
    by_ids = "prompt" in body and isinstance(body["prompt"], list)
    try:
        resp = await ep.client.completions(body)
    except OutputError:  # our own folder, not the server: the run stops (exit 2)
        raise
    except (DifftestError, KeyError, IndexError, TypeError) as exc:
        return Forced(error=_error_text(exc), failed=True)
    try:
        view = first_choice(resp, ep.name)[1]
    except OutputError:  # our own folder, not the server: the run stops (exit 2)
        raise
    except (DifftestError, KeyError, IndexError, TypeError) as exc:
        return Forced(error=_error_text(exc), failed=True, broken=True)
    if len(view) < n:  # as text, a re-tokenisation that merges tokens could do this; as ids, never
        return Forced(
            error=f"{ep.name}: echo returned {len(view)} positions, fewer than the {n} continuation tokens",
            failed=by_ids,
            broken=by_ids,
        )
    tail = view.positions[-n:]
    if not _aligned(tail, _spellings(view)[-n:], continuation.view.positions, _spellings(continuation.view)):
        if by_ids:  # ids in, other tokens out: the server changed what it was told to score
            return Forced(
                error=f"{ep.name}: echoed tokens differ from the token ids sent", failed=True, broken=True
            )
        return Forced(
            error="echoed tokens do not line up with the continuation (re-tokenisation shifted them)"
        )
    if any(p.logprob is None or not p.top for p in tail):
        return Forced(
            error=f"{ep.name}: echo returned no logprobs for the continuation positions",
            failed=True,
            broken=True,
        )
    problem = impossible_echo(tail, own=own)
    if problem is not None:
        return Forced(error=f"{ep.name}: {problem}", failed=True, broken=True)
    return Forced(tuple(tail))


def impossible_echo(tail: Sequence[Position], *, own: bool = False) -> str | None:
    """Why the teacher-forced positions cannot be log-probabilities (NaN, above 0, a top list over
    all the probability, ...), or None. The probe checks one echo; a kernel that breaks on some
    prompts only sent such values straight into the KL: a reference's NaN failed the target with
    "mean KL NaN", a target's probabilities were scored as a KL regression. Such an echo is a
    broken answer of its side: never scored (score_prompt decides whose fault it is).

    `own`: the echoing server generated this continuation itself, greedily, so each token was
    its argmax once and a probability of 0 (-inf) for it is impossible too (the greedy rule)."""
    return impossible_logprobs(TokensView(tuple(tail)), where="echoed continuation positions", greedy=own)


async def force_all(
    ep: Endpoint,
    prompts: Sequence[Prompt],
    continuations: Mapping[str, Generation],
    *,
    k: int,
    as_ids: bool,
    prompt_ids: Callable[[Prompt], Awaitable[list[int] | None]],
    on_done: Callable[[], None] | None = None,
    own: bool = False,
) -> dict[str, Forced]:
    """Every prompt's baseline continuation echoed into `ep`: prompt id -> Forced.

    `prompt_ids` gives the prompt's ids on the baseline's tokenizer (asked only when `as_ids`);
    a prompt whose baseline generation failed is a Forced error, counted, never dropped. `own`:
    the continuations are `ep`'s server's own greedy ones (a reference echoing what it said)."""

    async def one(p: Prompt) -> Forced:
        cont = continuations[p.id]
        if cont.error:
            out = Forced(error=f"no baseline continuation ({cont.error})")
        else:
            ids = await prompt_ids(p) if as_ids else None
            out = await force(ep, p, cont, prompt_ids=ids, as_ids=as_ids, k=k, own=own)
        if on_done:
            on_done()
        return out

    forced = await asyncio.gather(*(one(p) for p in prompts))
    return {p.id: f for p, f in zip(prompts, forced, strict=True)}


def _aligned(
    echoed: Sequence[Position],
    echoed_spelled: Sequence[str],
    generated: Sequence[Position],
    generated_spelled: Sequence[str],
) -> bool:
    """Whether the echo's last positions are the continuation's tokens: by id where both sides
    give ids, else by spelling (`_spellings`). A "token_id:N" label compared with a token string
    never matched: a server that ignores `return_tokens_as_token_ids` failed every echo."""
    pairs = zip(echoed, echoed_spelled, generated, generated_spelled, strict=True)
    for e, e_text, g, g_text in pairs:
        if e.token_id is not None and g.token_id is not None:
            if e.token_id != g.token_id:
                return False
        elif e_text != g_text:
            return False
    return True


def _spellings(view: TokensView) -> list[str]:
    """Each token as a string to compare across sides: as served where the server sent a string,
    the text cut at its offsets where it sent a "token_id:N" label (the label where the offsets
    cannot be trusted). Cut from the whole view: a slice's offsets no longer start its text."""
    texts = view.token_texts()
    return [
        t if p.token_id is not None and t is not None else p.token
        for p, t in zip(view.positions, texts, strict=True)
    ]


async def detokenize(ep: Endpoint, token_id: int) -> str | None:
    """One token id -> its text, via /detokenize (vLLM's shape); None where not served."""
    return await detokenize_ids(ep, [token_id])


async def detokenize_ids(ep: Endpoint, token_ids: Sequence[int]) -> str | None:
    """Several ids -> their text decoded together: a SentencePiece or byte-fallback token's text
    depends on the tokens before it (a leading space, a character split over byte tokens)."""
    if not ep.caps.tokenize:
        return None
    body: dict[str, Any] = {"tokens": list(token_ids)}
    if ep.caps.model:
        body["model"] = ep.caps.model
    try:
        data = await ep.client.post_json("/detokenize", body)
    except DifftestError:
        return None
    text = data.get("prompt") if isinstance(data, dict) else None
    return text if isinstance(text, str) else None
