"""Comparing servers over `/v1/chat/completions` (`[run] endpoint = "chat"`).

What the chat protocol gives and what it does not:

- free-running greedy continuations, with `logprobs: true, top_logprobs: k` where served (vLLM,
  SGLang, OpenAI); tokens as strings, or `"token_id:N"` where `return_tokens_as_token_ids` is
  honoured (vLLM); each token's `bytes`, from which the text offsets are rebuilt;
- no `echo`: a chat server cannot score a given continuation, so teacher-forced metrics (KL,
  top-1 agreement on the same tokens) are unavailable, and the report says so;
- no batching of several prompts in one request: the batch-slot check is skipped.

A prompt is its `messages` (the prompts file's `messages` key), or one user message holding its
`prompt`. `probe_chat` is the chat counterpart of `conformance.probe`: the same Capabilities, with
the rows the chat protocol can fill.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from difftest.client import CompletionClient
from difftest.conformance import (
    DEFAULT_PROBES,
    FAIL,
    GEN_TOKENS,
    GENERATING_FALLBACKS,
    LOGPROBS_TRIES,
    NA,
    OK,
    WARN,
    WARNINGS,
    Capabilities,
    ProbeTokens,
    first_diff,
    probe,
    probe_debug,
    short,
    with_model,
)
from difftest.errors import CacheMiss, ConformanceError, RequestRejected, ServerError, UnreadableBody
from difftest.prompts import Prompt
from difftest.tokens_view import TokensView, choice_zero, parse_content, parse_logprobs

log = logging.getLogger(__name__)

PATH = "/v1/chat/completions"
NO_TEACHER_FORCING = "teacher forcing unavailable over /v1/chat/completions (the chat protocol has no echo)"
NO_BATCH_SLOTS = "batch-slot check skipped: /v1/chat/completions takes one conversation per request"


def messages_of(prompt: Prompt) -> list[dict[str, Any]]:
    messages = getattr(prompt, "messages", ())
    return [dict(m) for m in messages] if messages else [{"role": "user", "content": prompt.prompt}]


def chat_payload(caps: Capabilities, prompt: Prompt, *, max_tokens: int, k: int, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": messages_of(prompt),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": seed,
    }
    if caps.model:
        body["model"] = caps.model
    if k > 0 and caps.logprobs_cap > 0:
        body |= {"logprobs": True, "top_logprobs": min(k, caps.logprobs_cap)}
    if caps.token_id_strings:
        body["return_tokens_as_token_ids"] = True
    return body


async def post_chat(client: CompletionClient, payload: Mapping[str, Any]) -> dict[str, Any]:
    """POST /v1/chat/completions. An answer without a `choices` list (a 200 carrying `{"error"}`)
    is a failed request, retried, as over /v1/completions (one check: the client's), not a broken
    answer. Cached like a completion (`CompletionClient.choices`): a chat run resumes too."""
    return await client.choices(PATH, payload)


def message_text(choice: Mapping[str, Any]) -> tuple[str | None, str]:
    """(content, "") of one chat choice, or (None, why it holds no text answer). Only a string is
    a continuation: a refusal, tool calls or a list of content parts read as "no text" compared
    equal to the other side's tokens and passed (token match 100% on nothing)."""
    message = choice.get("message")
    if not isinstance(message, Mapping):
        return None, f"message is {_kind(message)}, not an object"
    content, finish = message.get("content"), choice.get("finish_reason")
    # first: no tools are sent, and the tokens of a call are not in `content`, whatever it holds
    if message.get("tool_calls") or finish == "tool_calls":
        return None, f"tool calls, not text (finish_reason={finish})"
    if isinstance(content, str):
        return content, ""
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        return None, f"a refusal, not text: {short(refusal, 60)!r}"
    if content is None:
        why = f" (finish_reason={finish})" if finish not in (None, "stop", "length") else ""
        return None, f"content is null{why}"
    return None, f"content is {_kind(content)}, not a string"


def _kind(value: Any) -> str:
    return "null" if value is None else "a list" if isinstance(value, list) else type(value).__name__


def chat_view(choice: Mapping[str, Any], text: str | None) -> TokensView:
    """The generated positions of one chat choice (`logprobs.content`); empty when it has none.
    A block that is not an object is UnreadableBody, as over /v1/completions (parse_logprobs)."""
    block = choice.get("logprobs")
    if isinstance(block, Mapping):
        entries = block.get("content")
        if entries is None:
            return TokensView((), text)
        if not isinstance(entries, list):
            raise UnreadableBody(f"malformed logprobs block: content is {_kind(entries)}, not a list")
        return parse_content(entries, text=text)
    return parse_logprobs(block, text=text)  # None: no logprobs; anything else: refused there


def parse_chat_choice(choice: Mapping[str, Any]) -> tuple[str | None, TokensView]:
    """(content, view of the generated tokens) of one chat `choices[i]`; content None when the
    choice holds no text answer (`message_text` says why). Offsets come from each token's
    `bytes` (chat has no text_offset)."""
    if not isinstance(choice, Mapping):
        raise UnreadableBody(f"malformed chat choice: expected an object, got {type(choice).__name__}")
    content, _ = message_text(choice)
    return content, chat_view(choice, content)


def read_chat_answer(resp: Any, server: str) -> tuple[str, TokensView, str | None]:
    """(text, view, finish_reason) of the index-0 choice of a chat answer (the rule of
    /v1/completions: `tokens_view.choice_zero`); a ServerError naming `server` and why when that
    choice is no text answer or its logprobs block cannot be read."""
    choice = choice_zero(resp, server, PATH)
    try:
        text, view = parse_chat_choice(choice)
    except UnreadableBody as exc:
        raise UnreadableBody(f"{server}: {exc}", server=server, reason=str(exc)) from None
    if text is None:
        why = f"answer without message content: {message_text(choice)[1]}"
        raise ServerError(f"{server}: {PATH} {why}", server=server, reason=why)
    return text, view, choice.get("finish_reason")


def _read(resp: dict | None, server: str) -> tuple[str | None, TokensView, str]:
    """(text, view, why not) of a probe's answer, read as a run reads it; never raises: a probe
    reports what it found, and only the first question decides whether the server can chat."""
    if resp is None:
        return None, TokensView(()), ""
    try:
        text, view, _ = read_chat_answer(resp, server)
    except ServerError as exc:
        return None, TokensView(()), _why(exc)
    return text, view, ""


# ----------------------------------------------------------------------------- probe


async def _chat_logprobs(
    client: CompletionClient, base: dict[str, Any], texts: Sequence[str]
) -> tuple[int, str, str | None]:
    """(top_logprobs cap, its keys, the text that showed them), read from a one-token reply that
    holds a token: an empty reply (a chat model ending at once) shows nothing about logprob
    support, so the next text is asked; a reply with text and no logprobs ignored them. Where every text's reply is empty at the first `k` asked,
    (k, "none", None): support unverified, not "no logprobs". (0, "none", text) where no `k` is
    served."""
    shown: str | None = None
    for k in LOGPROBS_TRIES:
        for text in texts:
            body = base | {"messages": [{"role": "user", "content": text}], "temperature": 0}
            resp, _ = await _ask(client, body | {"max_tokens": 1, "logprobs": True, "top_logprobs": k})
            said, view, _ = _read(resp, client.name)
            if resp is None or said or len(view):  # refused, or a reply: with logprobs or without
                shown = text if said or len(view) else shown
                if len(view) and view.top_k:
                    return min(k, view.top_k), view.top_keys, text
                break
        else:  # every text's reply empty: nothing to read a cap from
            if shown is None:
                return k, "none", None
    return 0, "none", shown or texts[0]


def _why(e: Exception) -> str:
    """The server's own words, without the client's prefix (as conformance reports them)."""
    return short(str(getattr(e, "reason", None) or e))


async def _ask(client: CompletionClient, body: dict[str, Any], retries: int = 0) -> tuple[dict | None, str]:
    try:
        data = await client.post_json(PATH, body, retries=retries)
    except (RequestRejected, ServerError) as e:
        return None, _why(e)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        return None, "answer without choices"
    return data, ""


async def probe_chat(
    client: CompletionClient, *, probe_texts: Sequence[str] = DEFAULT_PROBES
) -> Capabilities:
    """What a server can do over /v1/chat/completions; raises only when it cannot chat at all."""
    checks: list[tuple[str, str, str]] = []
    warnings: list[str] = []
    f: dict[str, Any] = {}
    try:
        models = await client.models()
    except (RequestRejected, ServerError) as e:
        models = []
        checks.append(("models", WARN, _why(e)))
        warnings.append(WARNINGS["no_models"])
    else:
        checks.append(("models", OK if models else WARN, ", ".join(models) or "empty list"))
    model = models[0] if models else None
    base = {"model": model} if model else {}
    msgs = [{"role": "user", "content": probe_texts[0]}]
    req = base | {"messages": msgs, "max_tokens": 16, "temperature": 0}
    first, err = await _ask(client, req, retries=client.max_retries)
    text_a, _, why = _read(first, client.name)
    if text_a is None:
        raise ConformanceError(f"{client.name} ({client.base_url}) cannot serve {PATH}: {err or why}")
    checks.append(("chat completions", OK, f"{len(text_a)} chars for max_tokens=16"))
    second, err = await _ask(client, req)
    text_b, _, why = _read(second, client.name)
    if text_b is None:
        checks.append(("greedy determinism", WARN, err or why))
        warnings.append(WARNINGS["determinism_unknown"])
    else:
        f["deterministic"] = text_a == text_b
        if text_a == text_b:
            checks.append(("greedy determinism", OK, "same request twice -> same text"))
        else:
            checks.append(("greedy determinism", WARN, f"texts differ at char {first_diff(text_a, text_b)}"))
            warnings.append(WARNINGS["nondeterministic"])
    texts = tuple(dict.fromkeys((*probe_texts, *GENERATING_FALLBACKS)))
    cap, keys, said = await _chat_logprobs(client, base, texts)
    f |= {"logprobs_cap": cap, "top_logprobs_keys": keys}
    if said is not None:
        req = base | {"messages": [{"role": "user", "content": said}], "max_tokens": 16, "temperature": 0}
    if cap and said is None:  # accepted, never shown: neither a cap nor "no logprobs"
        checks.append(
            ("top_logprobs cap", WARN, f"top_logprobs={cap} accepted; no probe text generated a token")
        )
        warnings.append(WARNINGS["logprobs_unverified"].format(k=cap))
    elif cap:
        checks.append(("top_logprobs cap", OK if cap >= 20 else WARN, f"max accepted: {cap}"))
        if cap < 20:
            warnings.append(WARNINGS["logprobs_capped"].format(cap=cap))
    else:
        checks.append(("top_logprobs cap", FAIL, "no top_logprobs in any answer (ignored or refused)"))
        warnings.append("no chat logprobs: TIE/DRIFT classification disabled; tokens compared by text")
    f["token_id_strings"] = False
    if cap:
        resp, err = await _ask(
            client,
            req | {"max_tokens": 2, "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True},
        )
        view = _read(resp, client.name)[1]
        if len(view) and view.has_ids:
            f["token_id_strings"] = True
            checks.append(("token ids in responses", OK, "tokens as token_id:N"))
        else:
            checks.append(("token ids in responses", WARN, err or "flag ignored"))
    else:
        checks.append(("token ids in responses", NA, "needs logprobs"))
    checks.append(("echo", NA, "the chat protocol has no echo"))
    warnings.append(f"{NO_TEACHER_FORCING}: teacher-forced metrics disabled")
    tokenizations, failed = [], 0
    for text in probe_texts:
        ids = await _tokenize(client, text)
        failed += ids is None
        tokenizations.append(
            ProbeTokens(text, None if ids is None else tuple(ids), None, "tokenize" if ids else "none")
        )
    f["tokenize"] = failed < len(probe_texts)
    if f["tokenize"]:
        checks.append(("/tokenize", OK, f"{len(probe_texts) - failed} of {len(probe_texts)} probe texts"))
    else:
        checks.append(("/tokenize", WARN, "not served"))
        warnings.append(WARNINGS["no_tokenizations"])
    f["tokenizations"] = tuple(tokenizations)
    fields, _, err = await probe_debug(client)
    f |= fields
    if err is not None:
        checks.append(("debug protocol", WARN, _why(err)))
        warnings.append(WARNINGS["no_debug"])
    else:
        checks.append(("debug protocol", OK, "GET /debug/config 200"))
    return Capabilities(
        name=client.name,
        url=client.base_url,
        model=model,
        models=tuple(models),
        checks=tuple(checks),
        warnings=tuple(warnings),
        api="chat",
        **f,
    )


async def _tokenize(client: CompletionClient, text: str) -> list[int] | None:
    try:
        data = await client.post_json("/tokenize", {"prompt": text}, retries=0)
    except (RequestRejected, ServerError):
        return None
    toks = data.get("tokens") if isinstance(data, dict) else None
    return toks if isinstance(toks, list) and all(isinstance(t, int) for t in toks) else None


async def probe_endpoint(
    client: CompletionClient, model: str | None, endpoint: str, max_tokens: int | None = None
) -> Capabilities:
    """The probe for `endpoint` ("chat": this module's, for chat-only servers), asking for `model`
    where the config names one and no more than the run's `max_tokens`: run, record and noise
    all probe this way."""
    if endpoint == "chat":
        return with_model(await probe_chat(client), model)
    try:
        return await probe(client, model=model, max_tokens=max_tokens)
    except (CacheMiss, ConformanceError) as first:
        # a recorded reference (or an offline cache) from before the probe kept within max_tokens
        # holds the 16-token probe: replayed as recorded, not refused as "cannot serve"
        if max_tokens is None or max_tokens >= GEN_TOKENS or not client.replayed:
            raise
        try:
            return await probe(client, model=model)
        except (CacheMiss, ConformanceError):  # no older recording either: the real reason stands
            raise first from None
