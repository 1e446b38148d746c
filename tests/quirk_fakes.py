"""Fake servers with the quirks of real engines, for the differ's degrade tests (issue 12), and a
chat route: each one is the well-behaved fake of tests/fakes.py behind a thin layer that changes
one thing, the way a real server differs.

    chat               /v1/chat/completions (a plain "role: content" template, logprobs like vLLM)
    completions=False  chat only: /v1/completions answers 404
    ignore_logprobs    `logprobs` and `return_tokens_as_token_ids` silently ignored (transformers serve)
    echo_zero_500      echo with max_tokens=0 answers 500 (transformers serve)
    zero_unlimited     max_tokens=0 means "no limit": echo continues after the prompt (some engines)
    chat_prefix        text the chat template puts before every conversation (another template)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fakes import FakeBehaviour, FakeServer, _error, _Reject
from fastapi import FastAPI, Request
from live_fakes import live_fake

ZERO_UNLIMITED_TOKENS = 12


def chat_template(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _chat_entry(server: FakeServer, token: str, logprob: float | None, top: dict | None) -> dict[str, Any]:
    def piece(tok: str) -> bytes:
        if tok.startswith("token_id:"):
            return server.tokenizer.decode([int(tok.split(":")[1])]).encode()
        return tok.encode()

    entry: dict[str, Any] = {"token": token, "logprob": logprob, "bytes": list(piece(token))}
    entry["top_logprobs"] = [
        {"token": t, "logprob": v, "bytes": list(piece(t))} for t, v in (top or {}).items()
    ]
    return entry


def chat_response(
    server: FakeServer, body: dict[str, Any], *, ignore_logprobs: bool = False, prefix: str = ""
) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Reject(400, "messages must be a non-empty list", "messages")
    req: dict[str, Any] = {
        "prompt": prefix + chat_template(messages),
        "max_tokens": body.get("max_tokens", 16),
    }
    for key in ("model", "seed", "temperature"):
        if key in body:
            req[key] = body[key]
    wants = bool(body.get("logprobs")) and not ignore_logprobs
    if wants:
        req["logprobs"] = int(body.get("top_logprobs") or 0)
        req["return_tokens_as_token_ids"] = bool(body.get("return_tokens_as_token_ids"))
    server.completions_served += 1
    out = server.completions(req)
    choice = out["choices"][0]
    block = choice["logprobs"]
    logprobs = None
    if wants and block is not None:
        logprobs = {
            "content": [
                _chat_entry(server, t, lp, top)
                for t, lp, top in zip(
                    block["tokens"], block["token_logprobs"], block["top_logprobs"], strict=True
                )
            ]
        }
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": out["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": logprobs,
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": out["usage"],
    }


def quirk_app(
    behaviour: FakeBehaviour | None = None,
    *,
    chat: bool = True,
    completions: bool = True,
    ignore_logprobs: bool = False,
    echo_zero_500: bool = False,
    zero_unlimited: bool = False,
    chat_prefix: str = "",
    chat_empty_for: tuple[str, ...] = (),
) -> FastAPI:
    server = FakeServer(behaviour)
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions_route(request: Request) -> Any:
        if not completions:
            return _error(404, "Not Found")
        req = await request.json()
        if ignore_logprobs:
            req.pop("logprobs", None)
            req.pop("return_tokens_as_token_ids", None)
        if echo_zero_500 and req.get("echo") and req.get("max_tokens") == 0:
            return _error(500, "Internal Server Error")
        if zero_unlimited and req.get("max_tokens") == 0:
            req["max_tokens"] = ZERO_UNLIMITED_TOKENS
        server.completions_served += 1
        try:
            return server.completions(req)
        except _Reject as e:
            return _error(e.status, e.message, param=e.param)

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request) -> Any:
        if not chat:
            return _error(404, "Not Found")
        body = await request.json()
        try:
            resp = chat_response(server, body, ignore_logprobs=ignore_logprobs, prefix=chat_prefix)
        except _Reject as e:
            return _error(e.status, e.message, param=e.param)
        if body["messages"][-1].get("content") in chat_empty_for:  # a model that ends at once
            choice = resp["choices"][0]
            choice["message"]["content"], choice["finish_reason"] = "", "stop"
            choice["logprobs"] = {"content": []} if choice["logprobs"] else None
        return resp

    app.mount("/", server.app)  # everything else: the well-behaved fake
    app.state.fake = server
    return app


@contextlib.contextmanager
def live_app(app: FastAPI) -> Iterator[str]:
    """Any ASGI app on a free loopback port, in a thread; stopped on exit."""
    with live_fake(app=app) as url:
        yield url
