"""FastAPI app: the OpenAI completions routes over an injected `Engine`, with errors, auth and limits.

The app is built around an engine it is given (never one it creates), so tests drive it in-process
through `httpx.ASGITransport`, which runs no lifespan events.

Error policy: anything the caller got wrong is a 4xx `{"error": {message, type, param, code}}`
naming the parameter; a 500 only for our own bugs, with the traceback in the log. Bodies are parsed
by hand (not by FastAPI's signature binding) so malformed JSON, wrong types and unknown fields all
go through one mapping instead of FastAPI's `{"detail": ...}` 422s.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server_shim.engine import EngineBusy, EngineFailure, RequestHandle, SamplingParams, TokenInfo
from server_shim.errors import InvalidRequestError
from server_shim.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
    completion_id,
    error_body,
)
from server_shim.wire import parse as _parse
from server_shim.wire import read_json as _read_json

if TYPE_CHECKING:
    from server_shim.engine import Engine
    from server_shim.serve import ServeOptions

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def create_app(engine: Engine, opts: ServeOptions) -> FastAPI:
    app = FastAPI(title="server_shim", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(_GuardMiddleware, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    # The worker thread decodes with the engine's tokenizer; tokenizing happens on a small pool of
    # threads with their own copies (a fast tokenizer is not safe to share between threads while one
    # of them encodes), so a 7 MB prompt never stalls the event loop (/health stays instant).
    tokenizer = engine.loaded.tokenizer
    pool = _TokenizerPool(tokenizer)
    model_name = engine.loaded.name

    @app.exception_handler(EngineBusy)
    async def _busy(_: Request, exc: EngineBusy) -> JSONResponse:
        resp = _error(429, str(exc), "rate_limit_error", None, "server_busy")
        resp.headers["Retry-After"] = "1"
        return resp

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", None, code)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise InvalidRequestError(
                f"The model `{name}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
                status_code=404,
                error_type="NotFoundError",
            )

    def check_chars(text: str, param: str = "prompt") -> None:
        if len(text) > opts.max_prompt_chars:
            raise InvalidRequestError(
                f"{param} has {len(text)} characters; this server takes at most {opts.max_prompt_chars} "
                "(--max-prompt-chars)",
                param=param,
                code="prompt_too_long",
            )

    def check_stops(stops: tuple[str, ...]) -> None:
        if len(stops) > opts.max_stop_strings:
            raise InvalidRequestError(
                f"at most {opts.max_stop_strings} stop strings (--max-stop-strings); got {len(stops)}",
                param="stop",
            )
        longest = max((len(x) for x in stops), default=0)
        if longest > opts.max_stop_chars:
            raise InvalidRequestError(
                f"stop strings are at most {opts.max_stop_chars} characters (--max-stop-chars); got {longest}",
                param="stop",
            )

    def check_ids(ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < engine.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", param=param
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(
            data=[ModelCard(id=model_name, root=model_name, max_model_len=engine.context_length)]
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> TokenizeResponse:
        req = _parse(TokenizeRequest, await _read_json(request, opts.max_body_bytes))
        check_model(req.model)
        check_chars(req.prompt)

        def work(tok: Any) -> tuple[list[int], list[str] | None]:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
            return ids, (tok.convert_ids_to_tokens(ids) if req.return_token_strs else None)

        ids, strs = await pool.run(work)
        return TokenizeResponse(
            count=len(ids), max_model_len=engine.context_length, tokens=ids, token_strs=strs
        )

    @app.post("/detokenize")
    async def detokenize(request: Request) -> DetokenizeResponse:
        req = _parse(DetokenizeRequest, await _read_json(request, opts.max_body_bytes))
        check_model(req.model)
        check_ids(req.tokens, "tokens")
        text = await pool.run(lambda tok: tok.decode(req.tokens, clean_up_tokenization_spaces=False))
        return DetokenizeResponse(prompt=text)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await _read_json(request, opts.max_body_bytes))
        check_model(req.model)
        for param, why in req.unsupported_values():
            raise InvalidRequestError(why, param=param, code="unsupported_parameter")
        if req.user is not None:
            logger.debug("ignoring `user` (it changes no result)")
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise InvalidRequestError("max_tokens=0 is only allowed with echo=true", param="max_tokens")
        if max_tokens > opts.max_tokens_cap:
            raise InvalidRequestError(f"max_tokens must be <= {opts.max_tokens_cap}", param="max_tokens")
        if req.n > opts.max_n:
            raise InvalidRequestError(f"n must be <= {opts.max_n}", param="n")
        stops = req.stop_list()
        check_stops(stops)
        texts_in = (
            [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        )
        for text in texts_in:
            check_chars(text)
        prompts = await pool.run(lambda tok: _prompt_ids(req.prompt, tok))
        for ids in prompts:
            check_ids(ids, "prompt")
            if len(ids) + max_tokens > engine.context_length:
                raise InvalidRequestError(
                    f"This model's maximum context length is {engine.context_length} tokens. However, you "
                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the "
                    "completion). Please reduce the prompt or max_tokens.",
                    param="prompt",
                    code="context_length_exceeded",
                )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=req.seed,
            stop=stops,
            logprobs=req.logprobs,
            echo=req.echo,
            ignore_eos=req.ignore_eos,
        )
        handle = engine.submit(prompts, params, req.n)
        fmt = _Formatter(req)
        usage = UsageInfo(prompt_tokens=sum(len(p) for p in prompts))
        if req.stream:
            return StreamingResponse(
                _stream(handle, fmt, req, model_name, usage), media_type="text/event-stream"
            )
        texts: dict[int, list[str]] = {}
        infos: dict[int, list[TokenInfo]] = {}
        reasons: dict[int, str | None] = {}
        async with _cancel_on_disconnect(request, handle) as watch:
            async for ev in handle.events():
                texts.setdefault(ev.index, []).append(ev.text)
                infos.setdefault(ev.index, []).extend(ev.tokens)
                usage.completion_tokens += 0 if ev.prompt else len(ev.tokens)
                reasons[ev.index] = ev.finish_reason
        if watch.gone:  # the client went away: nobody reads this (nginx's "client closed request")
            return Response(status_code=499)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        choices = [
            CompletionChoice(
                finish_reason=reasons[i], index=i, logprobs=fmt.logprobs(i, infos[i]), text="".join(texts[i])
            )
            for i in sorted(texts)
        ]
        return JSONResponse(CompletionResponse(choices=choices, model=model_name, usage=usage).model_dump())

    if opts.debug:
        from server_shim.debug import create_debug_router

        app.include_router(create_debug_router(engine, max_body_bytes=opts.max_body_bytes))
    return app


class _TokenizerPool:
    """Tokenizing off the event loop: a few threads, each with its own tokenizer copy."""

    def __init__(self, tokenizer: Any, workers: int = 2) -> None:
        self._template = tokenizer
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenizer")

    def _call(self, fn: Any) -> Any:
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = copy.deepcopy(self._template)
        return fn(tok)

    async def run(self, fn: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)


class _cancel_on_disconnect:  # noqa: N801 - used as a context manager
    """Non-streaming requests: watch the connection while the engine works and cancel the request's
    sequences when the client goes away (an abandoned request must not keep a batch slot)."""

    def __init__(self, request: Request, handle: RequestHandle) -> None:
        self.request, self.handle = request, handle
        self.task: asyncio.Task | None = None
        self.gone = False

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                logger.info("client went away; cancelling its generation")
                self.gone = True
                self.handle.cancel()
                return

    async def __aenter__(self) -> _cancel_on_disconnect:
        self.task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class _Formatter:
    """OpenAI logprobs blocks; text_offset continues across a choice's stream chunks."""

    def __init__(self, req: CompletionRequest) -> None:
        self.enabled = req.logprobs is not None
        self.as_ids = req.return_tokens_as_token_ids
        self.offsets: dict[int, int] = {}

    def _key(self, token_id: int, piece: str) -> str:
        return f"token_id:{token_id}" if self.as_ids else piece

    def logprobs(
        self, index: int, infos: list[TokenInfo] | tuple[TokenInfo, ...]
    ) -> CompletionLogProbs | None:
        if not self.enabled:
            return None
        out = CompletionLogProbs()
        offset = self.offsets.get(index, 0)
        for info in infos:
            out.text_offset.append(offset)
            offset += len(info.text)
            out.tokens.append(self._key(info.token_id, info.text))
            out.token_logprobs.append(info.logprob)
            if info.logprob is None or info.top is None:
                out.top_logprobs.append(None)
                continue
            # The chosen token first (vLLM includes it even outside the top k); on a key collision
            # (two ids with the same piece, e.g. partial UTF-8 bytes) the first, likeliest entry wins.
            top = {self._key(info.token_id, info.text): info.logprob}
            for tid, piece, lp in info.top:
                top.setdefault(self._key(tid, piece), lp)
            out.top_logprobs.append(top)
        self.offsets[index] = offset
        return out


async def _stream(
    handle: RequestHandle, fmt: _Formatter, req: CompletionRequest, model: str, usage: UsageInfo
) -> AsyncIterator[str]:
    events = handle.events()
    cid, created = completion_id(), int(time.time())
    try:
        async for ev in events:
            usage.completion_tokens += 0 if ev.prompt else len(ev.tokens)
            choice = CompletionChoice(
                finish_reason=ev.finish_reason,
                index=ev.index,
                logprobs=fmt.logprobs(ev.index, ev.tokens),
                text=ev.text,
            )
            chunk = CompletionStreamResponse(id=cid, choices=[choice], created=created, model=model)
            yield f"data: {chunk.model_dump_json()}\n\n"
        if req.stream_options is not None and req.stream_options.include_usage:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            chunk = CompletionStreamResponse(id=cid, choices=[], created=created, model=model, usage=usage)
            yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception as exc:  # headers are gone: the error travels as a data event (vLLM does the same)
        logger.exception("streamed completion failed")
        kind = "EngineFailure" if isinstance(exc, EngineFailure) else type(exc).__name__
        yield f"data: {json.dumps(error_body(f'{kind}: {exc}', error_type='server_error'))}\n\n"
    finally:  # also when the client goes away mid-stream: stop decoding for it
        handle.cancel()
        await events.aclose()
    yield "data: [DONE]\n\n"


def _prompt_ids(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """The four prompt shapes of the API, as lists of token ids; empty prompts are refused (nothing
    predicts the first token, so there is no distribution to sample)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    out = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        out.append(ids)
    return out


def _error(status: int, message: str, error_type: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(
        error_body(message, error_type=error_type, param=param, code=code), status_code=status
    )


# Open without a key: a load balancer's liveness probe. It answers {"status": "ok"} and nothing else.
OPEN_PATHS = frozenset({"/health"})


def _same_key(got: bytes, want: bytes) -> bool:
    """Constant time in the key and in how much of it matches: compare fixed-length digests (a
    plain compare_digest still leaks the expected key's length)."""
    return hmac.compare_digest(hashlib.sha256(got).digest(), hashlib.sha256(want).digest())


class _GuardMiddleware:
    """Pure ASGI: bearer auth on every route but /health, a body-size cap on Content-Length, and a
    last-resort 500 in the OpenAI shape (with the traceback logged) for our own bugs."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self._want = f"Bearer {api_key}".encode() if api_key is not None else b""
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get("authorization", "").encode("latin-1")
            if not _same_key(auth, self._want):
                body = error_body(
                    "missing or wrong API key", error_type="invalid_request_error", code="invalid_api_key"
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            body = error_body(
                f"request body exceeds {self.max_body_bytes} bytes",
                error_type="invalid_request_error",
                code="request_too_large",
            )
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                body = error_body("internal server error (see the server log)", error_type="server_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)
