"""The guard in front of every route (pure ASGI, so it also covers 404s and streamed responses):
bearer auth on every route but /health, the body-size cap on Content-Length, and a last-resort 500
in the OpenAI shape (the traceback goes to the log, never to the client) for our own bugs. Keys
are never logged: only the comparison's outcome is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from fastapi.responses import JSONResponse

from server_shim.bearer import key_problem
from server_shim.errors import ShimError
from server_shim.protocol import error_body

logger = logging.getLogger(__name__)

# Open without a key: a load balancer's liveness probe. It answers {"status": "ok"} and nothing else.
OPEN_PATHS = frozenset({"/health"})


def check_api_key(key: str) -> None:
    """Refuse a key no Authorization header can carry (`bearer.key_problem`)."""
    problem = key_problem(key)
    if problem:
        raise ShimError(f"{problem}; use printable characters")


def _same_key(got: bytes, want: bytes) -> bool:
    """Constant time in the key and in how much of it matches: compare fixed-length digests (a
    plain compare_digest still leaks the expected key's length)."""
    return hmac.compare_digest(hashlib.sha256(got).digest(), hashlib.sha256(want).digest())


class GuardMiddleware:
    """Pure ASGI: bearer auth on every route but /health, a body-size cap on Content-Length, and a
    last-resort 500 in the OpenAI shape (with the traceback logged) for our own bugs."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        if api_key is not None:
            check_api_key(api_key)
        self.api_key = api_key
        # UTF-8, as curl and browsers send a header typed in text; compared with the header's raw
        # bytes. Latin-1 with "replace" made a CJK key "????????", which then let "????????" in
        self._want = api_key.encode() if api_key is not None else b""
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = {k.lower(): v for k, v in scope.get("headers", [])}
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}
        if self.api_key is not None and scope.get("path") not in OPEN_PATHS:
            # the scheme is case-insensitive (RFC 9110 11.1: "bearer" is "Bearer"); the key is not
            scheme, _, key = raw.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not _same_key(key, self._want):
                body = error_body(
                    "missing or wrong API key", error_type="invalid_request_error", code="invalid_api_key"
                )
                # RFC 9110 11.6.1: a 401 names the scheme it wants
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send
                )
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
