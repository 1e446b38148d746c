"""FastAPI app: the OpenAI completions routes over an injected `Engine`, with errors, auth and limits.

The app is built around an engine it is given (never one it creates), so tests drive it in-process
through `httpx.ASGITransport`, which runs no lifespan events.

Error policy: anything the caller got wrong is a 4xx `{"error": {message, type, param, code}}`
naming the parameter; a 500 only for our own bugs, with the traceback in the log. Bodies are parsed
by hand (not by FastAPI's signature binding) so malformed JSON, wrong types and unknown fields all
go through one mapping instead of FastAPI's `{"detail": ...}` 422s.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server_shim.engine import EngineFailure, RequestHandle, SamplingParams, TokenInfo
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

if TYPE_CHECKING:
    from server_shim.engine import Engine
    from server_shim.serve import ServeOptions

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def create_app(engine: Engine, opts: ServeOptions) -> FastAPI:
    app = FastAPI(title="server_shim", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(_GuardMiddleware, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    # The worker thread decodes with the engine's tokenizer; the event loop gets its own copy
    # (a fast tokenizer is not safe to share between threads while one of them encodes).
    tokenizer = copy.deepcopy(engine.loaded.tokenizer)
    model_name = engine.loaded.name

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
        ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=engine.context_length, tokens=ids, token_strs=strs
        )

    @app.post("/detokenize")
    async def detokenize(request: Request) -> DetokenizeResponse:
        req = _parse(DetokenizeRequest, await _read_json(request, opts.max_body_bytes))
        check_model(req.model)
        check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(req.tokens, clean_up_tokenization_spaces=False))

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
        prompts = _prompt_ids(req.prompt, tokenizer)
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
            stop=req.stop_list(),
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
        async for ev in handle.events():
            texts.setdefault(ev.index, []).append(ev.text)
            infos.setdefault(ev.index, []).extend(ev.tokens)
            usage.completion_tokens += 0 if ev.prompt else len(ev.tokens)
            reasons[ev.index] = ev.finish_reason
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

        app.include_router(create_debug_router(engine))
    return app


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


async def _read_json(request: Request, limit: int) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequestError(
                f"request body exceeds {limit} bytes", code="request_too_large", status_code=413
            )
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}", code="invalid_json") from exc


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            msg = f"unsupported parameter `{param}`"
        elif err["type"] == "missing":
            msg = f"`{param}` is required"
        elif param == "prompt" and len(exc.errors()) > 1:
            msg = (
                "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
            )
        else:
            msg = f"`{'.'.join(loc)}`: {err['msg']}"
        raise InvalidRequestError(msg, param=param) from None


def _error(status: int, message: str, error_type: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(
        error_body(message, error_type=error_type, param=param, code=code), status_code=status
    )


class _GuardMiddleware:
    """Pure ASGI: bearer auth on every route (health too), a body-size cap on Content-Length, and a
    last-resort 500 in the OpenAI shape (with the traceback logged) for our own bugs."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None:
            auth = headers.get("authorization", "")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
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
