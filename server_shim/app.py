"""The FastAPI app: the OpenAI routes (routes.py) over serving classes (serving*.py) around an
injected `Engine`, the guard middleware, OpenAI-shaped errors, the OpenAPI schema, and /debug/*
when asked for.

The app is built around an engine it is given (never one it creates), so tests drive it in-process
through `httpx.ASGITransport`, which runs no lifespan events.

Error policy: anything the caller got wrong is a 4xx `{"error": {message, type, param, code}}`
naming the parameter; a 429 with Retry-After when the engine's queue is full; a 500 only for our
own bugs, with the traceback in the log.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server_shim import openapi
from server_shim.engine import EngineBusy
from server_shim.errors import InvalidRequestError
from server_shim.middleware import GuardMiddleware
from server_shim.protocol import error_body
from server_shim.routes import create_router
from server_shim.serving import ServingTokenization, TokenizerPool
from server_shim.serving_chat import ServingChat
from server_shim.serving_completion import ServingCompletion

if TYPE_CHECKING:
    from server_shim.engine import Engine

RETRY_AFTER_S = 1


def create_app(engine: Engine, opts: Any) -> FastAPI:
    """`opts` is a ServeOptions (server_shim.options)."""
    app = FastAPI(
        title="server_shim", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    app.state.engine = engine
    app.add_middleware(GuardMiddleware, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    app.add_exception_handler(InvalidRequestError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(EngineBusy, _busy)
    pool = TokenizerPool(engine.loaded.tokenizer)
    routers = [
        create_router(
            ServingCompletion(engine, opts, pool),
            ServingChat(engine, opts, pool),
            ServingTokenization(engine, opts, pool),
            opts.max_body_bytes,
        )
    ]
    if opts.debug:
        from server_shim.debug import create_debug_router

        routers.append(
            create_debug_router(
                engine, max_body_bytes=opts.max_body_bytes, max_prompt_chars=opts.max_prompt_chars
            )
        )
    for router in routers:
        app.include_router(router)
    openapi.install(app)
    # FastAPI 0.165 keeps an included router as one `_IncludedRouter` entry in app.routes: its
    # routes are read from the routers themselves, the app's own (/openapi.json, ...) from app.routes
    app.state.methods = [
        (route.path_regex, frozenset(route.methods))
        for route in [*app.routes, *(r for router in routers for r in router.routes)]
        if isinstance(getattr(route, "path_regex", None), re.Pattern) and getattr(route, "methods", None)
    ]
    return app


def _error(status: int, message: str, error_type: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(
        error_body(message, error_type=error_type, param=param, code=code), status_code=status
    )


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequestError)
    return _error(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else None
    resp = _error(exc.status_code, str(exc.detail), "invalid_request_error", None, code)
    resp.headers.update(exc.headers or {})
    if exc.status_code == 405 and (allowed := _allowed(request)):
        resp.headers["Allow"] = ", ".join(allowed)
    return resp


def _allowed(request: Request) -> list[str]:
    """Every method some route serves on this path (RFC 9110 15.5.6: a 405 lists them in Allow).
    Starlette's own header names only the first route's: GET on /health, whose HEAD is a route of
    its own. The (path regex, methods) pairs are taken from the routers at app creation."""
    path = request.scope.get("path", "")
    pairs: list[tuple[re.Pattern, frozenset[str]]] = getattr(request.app.state, "methods", [])
    return sorted({m for regex, methods in pairs if regex.match(path) for m in methods})


async def _busy(_: Request, exc: Exception) -> JSONResponse:
    resp = _error(429, str(exc), "rate_limit_error", None, "server_busy")
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp
