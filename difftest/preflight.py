"""Fail fast on a running server that is up but broken, before the launcher's health wait.

A `url` server is one that already runs. The launcher still polls its health for up to
`startup_timeout_s` (600 s by default), which is right for a server that is still starting (no
listener yet: connection refused; llama.cpp answers 503 while it loads) and wrong for one that
answers and is broken: a URL that always answers 500, resets every connection or accepts and never
answers made `difftest compare` wait ten minutes before exit 3 (issue 10). `check_running` asks
each such server's `/health` and `/v1/models` a few times over a few seconds and raises
`InfraError` (exit 3) naming the server and its answers when every answer is a broken one.
`check_running` also refuses (exit 2) an `api_key_env` whose variable is not set.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from difftest import aio
from difftest.client import bearer
from difftest.errors import InfraError, UsageError
from server_shim.launch_spec import ServerSpec

log = logging.getLogger(__name__)

ROUTES = ("/health", "/v1/models")
ROUNDS = 3  # a transient blip gets two more chances
ROUND_PAUSE_S = 0.5
MAX_CHECK_TIMEOUT_S = 5.0  # /health answers in milliseconds; 5 s is a hung server, not a slow one
STARTING = 503  # "not ready yet" (llama.cpp while loading): the launcher's wait handles it


@dataclass(frozen=True)
class Answer:
    route: str
    status: int | None  # None: no HTTP answer
    what: str  # "HTTP 500", "connection reset (ReadError)", "no answer within 5s", ...

    @property
    def healthy(self) -> bool:
        return self.status == 200

    @property
    def starting(self) -> bool:
        """Not broken yet: nobody listens (a server still starting) or it says it is loading."""
        return self.status == STARTING or self.what.startswith("connection refused")


def _describe(exc: httpx.HTTPError, timeout_s: float) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connection refused or unreachable (no connect within {timeout_s:g}s)"
    if isinstance(exc, httpx.ConnectError):
        return f"connection refused ({exc})" if exc.args else "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return f"accepted the connection, no answer within {timeout_s:g}s"
    return f"connection broken ({type(exc).__name__}: {exc or 'reset by peer'})"


async def _ask(client: httpx.AsyncClient, url: str, route: str, timeout_s: float) -> Answer:
    try:
        resp = await asyncio.wait_for(client.get(url + route), timeout_s + 1)
    except TimeoutError:
        return Answer(route, None, f"accepted the connection, no answer within {timeout_s:g}s")
    except httpx.HTTPError as exc:
        return Answer(route, None, _describe(exc, timeout_s))
    return Answer(route, resp.status_code, f"HTTP {resp.status_code}")


async def _check_one(spec: ServerSpec, timeout_s: float) -> str | None:
    """None when the server answers 200 somewhere or may still be starting; else why it is broken."""
    url = (spec.url or "").rstrip("/").removesuffix("/v1")
    key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
    headers = {"Authorization": bearer(key)} if key else {}
    timeout = httpx.Timeout(timeout_s)
    answers: list[Answer] = []
    async with httpx.AsyncClient(timeout=timeout, headers=headers, trust_env=False) as client:
        for tries in range(1, ROUNDS + 1):
            answers = await asyncio.gather(*(_ask(client, url, route, timeout_s) for route in ROUTES))
            if any(a.healthy or a.starting for a in answers):
                return None
            if any(a.status is None and "no answer" in a.what for a in answers):
                break  # hung: another try only costs another timeout
            if tries < ROUNDS:
                await asyncio.sleep(ROUND_PAUSE_S * tries)
    said = ", ".join(f"{a.what} on {a.route}" for a in answers)
    return f"server {spec.name!r} at {url} is up but broken: {said} ({tries} tries)"


async def check_running_async(specs: Sequence[ServerSpec], *, request_timeout_s: float) -> None:
    """Raise InfraError (exit 3) if a `url` server answers, but only with failures.

    Servers the launcher starts are left to it (their process exiting is what tells). Runs in
    seconds: at most ROUNDS tries of the routes side by side, a hung server one try of
    min(request_timeout_s, 5 s)."""
    urls = [s for s in specs if s.kind == "url"]
    timeout_s = min(request_timeout_s, MAX_CHECK_TIMEOUT_S)
    found = await asyncio.gather(*(_check_one(s, timeout_s) for s in urls))
    problems = [f for f in found if f is not None]
    if problems:
        raise InfraError("; ".join(problems))


def check_environment(specs: Sequence[ServerSpec]) -> None:
    """An `api_key_env` naming an unset variable is a usage error (exit 2) before anything starts;
    the launcher found it only when it reached that server, after starting the ones before."""
    missing = [f"server {s.name!r}: environment variable {s.api_key_env} (api_key_env / --api-key-env) "
               f"is {'empty' if s.api_key_env in os.environ else 'not set'}"
               for s in specs if s.api_key_env and not os.environ.get(s.api_key_env)]  # fmt: skip
    if missing:
        raise UsageError("; ".join(missing))


def check_running(specs: Sequence[ServerSpec], *, request_timeout_s: float) -> None:
    """Before a run launches anything: `check_environment`, then `check_running_async`."""
    check_environment(specs)
    if any(s.kind == "url" for s in specs):
        aio.run(check_running_async(specs, request_timeout_s=request_timeout_s))
