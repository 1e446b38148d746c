"""A Session: the servers one command talks to — connected, probed once, closed.

    with launch_shown(specs, log_dir=...) as running:            # launch (or `url` specs: connect)
        async with Session.of_running(running, options) as s:    # a client each, probed side by side
            s["fp8-block"]                                       # an Endpoint: name, client, caps
            await s["fp8-block"].client.debug_config()           # GET /debug/config: once per server
    # leaving the block closes every client; leaving the `with` stops what was launched

    async with Session.of_urls({"target": url}, api_key=key) as s:   # servers someone else runs
        s.require_debug("target")                                    # ConformanceError (exit 2) if not

Why one place: every command used to connect and probe in its own way — one faked a launched
server, one fabricated capabilities instead of probing, and the target of a run was asked for
`/debug/config` five times. Here a server is probed exactly once per session (the conformance
probe, which also reads `/debug/config`), and its client keeps that config for everyone after.

Launching stays `server_shim.launch.launch_servers` (a synchronous context manager: it owns
subprocesses and must tear them down on any exit; `launch_shown` shows its health wait); a Session
only needs each server's URL, API key and cache identity, so it works the same over launched
servers, `url` specs and bare URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from difftest.cache import ResponseCache
from difftest.chat import probe_endpoint
from difftest.client import CompletionClient
from difftest.collect import Endpoint
from difftest.errors import ConformanceError, InfraError, output_error
from difftest.progress import ServersUp
from server_shim.launch import RunningServer, api_key_of, launch_servers
from server_shim.launch_spec import ServerSpec


@contextlib.contextmanager
def launch_shown(specs: Sequence[ServerSpec], *, log_dir: Path) -> Iterator[dict[str, RunningServer]]:
    """`launch_servers` with its health wait shown (`progress.ServersUp`): every command that starts
    servers goes through here, so none waits minutes in silence while a cold server tunes. The
    log folder is made here first: a file in its place is our output's fault (exit 2), not a
    server's, and the launcher (which never imports the differ) cannot say so."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(log_dir, exc) from None
    with ServersUp() as shown, launch_servers(specs, log_dir=log_dir, on_status=shown) as running:
        yield running


@dataclass(frozen=True)
class ClientOptions:
    """How every client of a session talks to its server."""

    timeout_s: float = 120.0  # each attempt of a request, start to last byte
    connect_timeout_s: float = 10.0  # opening a connection (at most timeout_s)
    max_retries: int = 3
    concurrency: int = 8  # requests in flight per server
    cache: ResponseCache | None = None  # the run's response cache (None: every request is asked)
    # the protocol the command measures over ("chat": probed as chat, generations over
    # /v1/chat/completions): probed as completions, a chat config's noise floor was measured there
    endpoint: str = "completions"
    max_tokens: int | None = None  # the command's: the probe asks no more (None: its own 16)


@dataclass(frozen=True)
class Server:
    """Where one server answers and how to address it."""

    name: str
    url: str
    api_key: str | None = field(default=None, repr=False)
    # replaces the URL in response-cache keys (a launched server gets a new port every run)
    cache_identity: Mapping[str, Any] | None = None
    # an in-process transport (tests, benches): no sockets
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False, compare=False)
    model: str | None = None  # the id to ask for, where the config names one (url_model)

    @classmethod
    def of_spec(cls, spec: ServerSpec, url: str | None = None) -> Server:
        """A server as its spec describes it: at `url` where it was launched, else a `url` spec's own."""
        address = url or spec.url
        if address is None:
            raise ValueError(f"server {spec.name!r} has no URL: launch it first")
        return cls(spec.name, address, api_key_of(spec), cache_identity(spec), model=url_model(spec))


def url_model(spec: ServerSpec) -> str | None:
    """The model a url server's table names: the one requests ask for (it was ignored for the first
    id /v1/models lists). A launched server's `model` is what its command loads, not an id."""
    return spec.model if spec.kind == "url" else None


def cache_identity(spec: ServerSpec) -> dict[str, Any]:
    """What identifies a server's answers across runs: its spec without the (random) port."""
    data = dataclasses.asdict(spec)
    data.pop("port", None)
    data.pop("startup_timeout_s", None)
    if spec.url is None:
        data.pop("url", None)
    return data


class Session:
    """Connected, probed servers by name. Use as `async with`; endpoints exist inside the block."""

    def __init__(self, servers: Iterable[Server], options: ClientOptions | None = None) -> None:
        self.servers = {s.name: s for s in servers}
        self.options = options or ClientOptions()
        self._endpoints: dict[str, Endpoint] = {}

    @classmethod
    def of_running(
        cls, running: Mapping[str, RunningServer], options: ClientOptions | None = None
    ) -> Session:
        """The servers `launch_servers` started (or connected to, for `url` specs)."""
        return cls((Server.of_spec(s.spec, s.url) for s in running.values()), options)

    @classmethod
    def of_urls(
        cls,
        urls: Mapping[str, str],
        *,
        api_key: str | None = None,
        keys: Mapping[str, str | None] | None = None,
        options: ClientOptions | None = None,
    ) -> Session:
        """Servers that someone else runs, by name -> base URL (with or without `/v1`). `keys` gives
        a server its own API key; the others use `api_key`."""
        keys = keys or {}
        return cls((Server(name, url, keys.get(name) or api_key) for name, url in urls.items()), options)

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """A client per server, then every conformance probe side by side (one per server)."""
        o = self.options
        clients = {
            name: CompletionClient(
                s.url,
                name=name,
                api_key=s.api_key,
                timeout_s=o.timeout_s,
                connect_timeout_s=o.connect_timeout_s,
                max_retries=o.max_retries,
                concurrency=o.concurrency,
                transport=s.transport,
                cache=o.cache,
                cache_identity=s.cache_identity if o.cache is not None else None,
                model=s.model,
            )  # fmt: skip
            for name, s in self.servers.items()
        }
        # every probe runs to its end before a failure is raised: no task is left using a closed client
        found = await asyncio.gather(
            *(probe_endpoint(c, c.model, o.endpoint, o.max_tokens) for c in clients.values()),
            return_exceptions=True,
        )
        failed = next((r for r in found if isinstance(r, BaseException)), None)
        if failed is not None:
            await asyncio.gather(*(c.aclose() for c in clients.values()))
            raise failed
        self._endpoints = {n: Endpoint(n, clients[n], cap) for n, cap in zip(clients, found, strict=True)}  # type: ignore[arg-type]

    async def aclose(self) -> None:
        eps, self._endpoints = self._endpoints, {}
        await asyncio.gather(*(ep.client.aclose() for ep in eps.values()))

    @property
    def endpoints(self) -> Mapping[str, Endpoint]:
        return self._endpoints

    def __getitem__(self, name: str) -> Endpoint:
        return self._endpoints[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._endpoints)

    def require_debug(self, *names: str) -> None:
        require_debug(self._endpoints, names)


def require_debug(endpoints: Mapping[str, Endpoint], names: Iterable[str], hint: str = "") -> None:
    """ConformanceError (exit 2) naming every server that does not serve the debug protocol;
    InfraError (exit 3) first where GET /debug/config was not answered (a timeout, a lost
    connection, a 503): that server may well serve it, and `--debug` advice sends the user to the
    wrong fix."""
    missing = [n for n in dict.fromkeys(names) if not endpoints[n].caps.debug]
    said = {n: _debug_detail(endpoints[n]) for n in missing}
    unanswered = [n for n in missing if endpoints[n].caps.debug_unanswered]
    if unanswered:
        why = "; ".join(f"{n} ({endpoints[n].caps.url}): {said[n]}" for n in unanswered)
        raise InfraError(f"GET /debug/config was not answered, so the debug protocol cannot be used: {why}")
    if missing:
        why = "; ".join(f"{n} ({endpoints[n].caps.url}): {said[n]}" for n in missing)
        raise ConformanceError(f"not serving the debug protocol (`--debug` on the shim): {why}{hint}")


def _debug_detail(ep: Endpoint) -> str:
    return next(
        (detail for check, _, detail in ep.caps.checks if check == "debug protocol"), "no /debug/config"
    )
