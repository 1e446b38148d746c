"""Async OpenAI-completions client for one server: bounded, retried, capped, optionally cached.

Why each guard exists:
- a semaphore bounds in-flight requests (a differ that floods a server measures its queue, and a
  batch-variant server then answers differently than it would under normal load);
- retries with exponential backoff and jitter cover connect errors, timeouts, 429, 5xx and a
  completions body that is not JSON or has no `choices` (a truncated body is transport trouble),
  and are bounded so a dead server ends the run with exit 3 instead of hanging; 4xx are never
  retried (the request itself is wrong) and surface the server's own OpenAI error message;
- a circuit breaker per server (`_Breaker`): once `STOPPED_AFTER` requests in a row are lost to
  timeouts or connection errors after their retries, the server has stopped answering and every
  later request fails at once, naming those failures (each used to wait out its own timeouts);
- the response body is read in chunks and cut at `max_response_bytes` (a runaway `n`/`logprobs`
  or a hostile server must not take the differ's memory);
- the API key goes out as a Bearer header only: it is never logged, never part of the fingerprint,
  and scrubbed from any server message we re-raise (servers like to echo bad keys back).

With a `ResponseCache`, completions and chat completions are looked up by (server fingerprint,
path, request) first; with `offline=True` nothing touches the network and a miss raises
`CacheMiss`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from difftest.cache import COMPLETIONS_PATH, ResponseCache, route_of, stored_request
from difftest.errors import (
    CacheMiss,
    OutputError,
    RequestRejected,
    ResponseTooLarge,
    ServerError,
    UnreadableBody,
    UsageError,
)
from difftest.identity import (
    CANARY_BATCH,
    CANARY_SLOTS,
    REBUILT,
    CachedRequest,
    answer_difference,
    batch_summaries,
    canary_batch_request,
    canary_request,
    canary_summary,
    changed_parts,
    jitter,
    pick_rechecks,
    reach,
    tolerance_for,
    vouches,
)
from difftest.textsafe import LONE_SURROGATE
from server_shim import debug_protocol as P
from server_shim.bearer import bearer as shim_bearer
from server_shim.bearer import key_problem
from server_shim.launch import normalise_url

log = logging.getLogger(__name__)

MiB = 2**20
# 408/429/5xx are the server saying "not now"; anything else in 4xx is the request's fault.
_RETRY_STATUS = frozenset({408, 429})
_FINGERPRINT_CONFIG_KEYS = (
    "model",
    "dtype",
    "device",
    "arch",
    "quant",
    "scheme",
    "backend",
    "batch_invariant",
    "rounding_noise",  # a rounding twin (server_shim.twin) is another server than its golden
)


# Requests lost in a row (timeouts, connection errors, after their retries) that mean a server has
# stopped answering. Two, not one: a single pathological prompt (far slower than the timeout) must
# not end the run. No more: the requests in flight when a server stops time out together, so with
# concurrency >= 2 the breaker opens after one round, about (max_retries + 1) x timeout_s (two
# rounds at concurrency 1).
STOPPED_AFTER = 2


def bearer(api_key: str) -> bytes:
    """The Authorization header's value (`server_shim.bearer`: UTF-8 bytes; httpx sends a str
    header as ASCII only, so a key beyond it was a UnicodeEncodeError traceback). A key no header
    can carry is a UsageError saying why, never showing the key."""
    problem = key_problem(api_key)
    if problem:
        raise UsageError(problem)
    return shim_bearer(api_key)


class _Breaker:
    """Whether a server has stopped answering: the requests lost to silence in a row.

    Without it a dead target cost prompts x attempts x timeout_s, once for generation and again
    for teacher forcing (~48 min at the defaults for 100 prompts). Shared by a client's siblings:
    they ask the same server. A success (of a request already in flight) closes it again."""

    def __init__(self) -> None:
        self.lost: list[str] = []  # what the requests lost in a row said, the latest last

    @property
    def open(self) -> bool:
        return len(self.lost) >= STOPPED_AFTER

    def success(self) -> None:
        self.lost.clear()

    def failure(self, what: str) -> None:
        self.lost = [*self.lost, what][-STOPPED_AFTER:]

    def refusal(self, name: str, method: str, path: str) -> ServerError:
        said = "; ".join(dict.fromkeys(self.lost))  # the same words once
        return ServerError(
            f"{name}: {method} {path} not sent: the server stopped answering ({len(self.lost)} "
            f"requests in a row failed after their retries: {said})",
            server=name,
            reason=f"the server stopped answering ({said})",
        )


@dataclass(frozen=True)
class _Miss:
    """One attempt that failed in a way another attempt may not."""

    reason: str  # the server's words or what happened, without the "name: POST /path" prefix
    status: int | None = None
    retry_after: str | None = None
    silent: bool = False  # a timeout or a connection error: the server said nothing at all
    unreadable: str | None = None  # a 2xx body that `read` could not use: its UnreadableBody's words


REPLAY_URL = "http://baseline.invalid"  # a recorded baseline's client: its replay transport opens no socket


@dataclass(frozen=True)
class ClientStats:
    requests: int  # logical requests asked (cache hits excluded; ones the breaker refused included)
    failures: int  # of those, how many ended in an exception (after retries)
    retries: int  # extra attempts made
    cache_hits: int
    cache_misses: int = 0  # cacheable completions that were asked (not found in the cache)
    identity_checks: int = 0  # requests asked to vouch for cached answers (canary, re-checks)


class CompletionClient:
    def __init__(
        self,
        base_url: str,
        *,
        name: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        concurrency: int = 8,
        max_response_bytes: int = 64 * MiB,  # per answer: /debug activations come in chunks under it
        transport: httpx.AsyncBaseTransport | None = None,
        cache: ResponseCache | None = None,
        offline: bool = False,
        cache_identity: Mapping[str, Any] | None = None,
        model: str | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`cache_identity` replaces the URL in the cache key: pass the launch spec (without its port)
        for servers started on a fresh port each run, so `--resume` finds their answers again.

        `timeout_s` bounds each attempt of a request, start to last byte (a server that accepts
        and never answers costs (max_retries + 1) x timeout_s, then a ServerError; after
        `STOPPED_AFTER` such requests every later one fails at once);
        `connect_timeout_s` (at most `timeout_s`) bounds opening the connection alone.
        `model`: the id the run asks for where the config names one (a url server serving several);
        the identity canary asks for it too, else for the first id /v1/models lists."""
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be >= 1 and max_retries >= 0")
        if not (timeout_s > 0 and connect_timeout_s > 0):
            raise ValueError("timeout_s and connect_timeout_s must be > 0")
        if offline and cache is None:
            raise ValueError("offline=True needs a cache")
        self.name = name
        self.base_url = normalise_url(base_url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.max_response_bytes = max_response_bytes
        self.cache = cache
        self.offline = offline
        self.cache_identity = dict(cache_identity) if cache_identity is not None else None
        self.model = model
        self._api_key = api_key
        self._transport = transport
        self._backoff = (backoff_base_s, backoff_max_s)
        self._sleep = sleep
        self._sem = asyncio.Semaphore(concurrency)
        self._breaker = _Breaker()
        # a cache write that failed (disk full): the report beside the cache would fail the same
        # way, so later cached requests fail at once rather than ask for answers nobody can keep
        self._cache_error: OutputError | None = None
        self._fp: dict | None = None
        self._cache_fp: dict | None = None
        self._fp_lock = asyncio.Lock()
        self._debug_config: dict[str, Any] | None = None
        self._debug_lock = asyncio.Lock()
        self._requests = self._failures = self._retries = self._hits = self._misses = self._checks = 0
        # what the identity check found, for the run's report (None: nothing to say)
        self.identity_note: str | None = None
        headers: dict[str, str | bytes] = {"User-Agent": "difftest"}
        if api_key:
            headers["Authorization"] = bearer(api_key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=self.connect_timeout_s),
            transport=transport,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            follow_redirects=False,
        )

    def sibling(self, *, name: str, concurrency: int) -> CompletionClient:
        """Another client of the same server (URL, key, transport, timeouts) with its own
        concurrency and no cache: for asking the server again, e.g. serially for an A/A floor."""
        other = CompletionClient(
            self.base_url, name=name, api_key=self._api_key, timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s, max_retries=self.max_retries, concurrency=concurrency,
            max_response_bytes=self.max_response_bytes, transport=self._transport,
            backoff_base_s=self._backoff[0], backoff_max_s=self._backoff[1], sleep=self._sleep, model=self.model,
        )  # fmt: skip
        other._debug_config = self._debug_config  # the same server: the same config
        other._breaker = self._breaker  # and the same silence
        return other

    @property
    def from_baseline(self) -> bool:
        """Whether this client is a recorded baseline's, answering from its file (REPLAY_URL)."""
        return self.base_url.rstrip("/") == REPLAY_URL

    @property
    def replayed(self) -> bool:
        """Whether this client answers from a recording (a baseline's replay, an offline cache)."""
        return self.offline or self.from_baseline

    def __repr__(self) -> str:  # never the key
        return f"CompletionClient(name={self.name!r}, base_url={self.base_url!r}, offline={self.offline})"

    async def __aenter__(self) -> CompletionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ counters
    @property
    def requests(self) -> int:
        return self._requests

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def retries(self) -> int:
        return self._retries

    def stats(self) -> ClientStats:
        return ClientStats(
            self._requests, self._failures, self._retries, self._hits, self._misses, self._checks
        )

    # ------------------------------------------------------------------ endpoints
    async def completions(
        self, payload: Mapping[str, Any], *, use_cache: bool = True, retries: int | None = None
    ) -> dict:
        """POST /v1/completions. `use_cache=False` for probes that must hit the server twice."""
        return await self.choices(COMPLETIONS_PATH, payload, use_cache=use_cache, retries=retries)

    async def choices(
        self, path: str, payload: Mapping[str, Any], *, use_cache: bool = True, retries: int | None = None
    ) -> dict:
        """POST to a completions-shaped route (completions, chat completions), looked up in the
        cache first and stored there (keyed with the path: `cache.stored_request`). A chat run's
        answers were never cached: its resume asked everything again and said "asked 0"."""
        if not isinstance(payload, Mapping):
            raise TypeError("payload must be a JSON object")
        cached = self.cache is not None and use_cache
        request = stored_request(path, payload)
        if cached:
            if self._cache_error is not None:  # a full disk stays full: no request, no canary again
                raise OutputError(self._cache_error.path, self._cache_error.why)
            try:
                fp = await self._cache_fingerprint()
            except OutputError as exc:
                self._cache_error = exc
                raise
            hit = self.cache.get(fp, request)  # type: ignore[union-attr]
            if hit is not None:
                self._hits += 1
                return hit
            if self.offline:
                raise CacheMiss(f"{self.name}: offline and no cached response for this {path} request")
            self._misses += 1
        data = await self.post_choices(path, payload, retries=retries)
        if cached:
            try:
                self.cache.put(fp, request, data)  # type: ignore[union-attr]
            except OutputError as exc:
                self._cache_error = exc
                raise
        return data

    async def post_choices(
        self, path: str, payload: Mapping[str, Any], *, retries: int | None = None
    ) -> dict:
        """POST to a completions-shaped route (completions, chat completions), uncached: a 200 body
        without a `choices` list is UnreadableBody, retried (a body cut short or an `{"error": ...}`
        under 200 is the server's passing trouble, like a 5xx)."""

        def read(body: bytes) -> dict:
            return read_choices(body, self.name, path, self._scrub)

        return await self._request("POST", path, json_body=dict(payload), retries=retries, read=read)

    async def get_json(self, path: str, *, retries: int | None = None) -> Any:
        return _as_json(await self._request("GET", path, retries=retries), self.name, path)

    async def debug_config(self, *, retries: int | None = None) -> dict[str, Any]:
        """GET /debug/config, asked once per server connection (docs/design.md "The debug
        protocol"): a server's modules, schemes and backends do not change while it runs, and a
        restarted server gets a new client. A failure is raised, not remembered."""
        async with self._debug_lock:
            if self._debug_config is None:
                data = await self.get_json(P.CONFIG, retries=retries)
                if not isinstance(data, dict):
                    raise UnreadableBody(
                        f"{self.name}: /debug/config answered {type(data).__name__}, not an object"
                    )
                modules = data.get("modules", {})
                bad_dtype = "dtype" in data and not isinstance(data["dtype"], str | type(None))
                if (
                    bad_dtype
                    or not isinstance(modules, dict)
                    or not all(isinstance(m, dict) for m in modules.values())
                ):
                    # every reader takes these as given: a list or a null there was an AttributeError
                    raise UnreadableBody(f"{self.name}: /debug/config's modules or dtype are malformed")
                self._debug_config = data
        return self._debug_config

    async def get_bytes(self, path: str, *, retries: int | None = None) -> bytes:
        """For GET /debug/quant/{module}: a safetensors body."""
        return await self._request("GET", path, retries=retries)

    async def post_json(self, path: str, body: Mapping[str, Any], *, retries: int | None = None) -> Any:
        return _as_json(
            await self._request("POST", path, json_body=dict(body), retries=retries), self.name, path
        )

    async def post_bytes(
        self,
        path: str,
        body: bytes | Mapping[str, Any],
        content_type: str = "application/octet-stream",
        *,
        retries: int | None = None,
    ) -> bytes:
        """For /debug routes: safetensors or JSON in, raw bytes (safetensors) out."""
        if isinstance(body, Mapping):
            return await self._request("POST", path, json_body=dict(body), retries=retries)
        return await self._request("POST", path, content=body, content_type=content_type, retries=retries)

    async def models(self) -> list[str]:
        data = await self.get_json("/v1/models")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise UnreadableBody(f"{self.name}: /v1/models answered without a 'data' list")
        return [str(e["id"]) for e in entries if isinstance(e, dict) and "id" in e]

    async def fingerprint(self, *, refresh: bool = False) -> dict:
        """What identifies this server build: url, model ids, and version / debug config when exposed.

        Optional endpoints are asked once, without retries; their absence is normal."""
        if self._fp is not None and not refresh:
            return dict(self._fp)
        if self.offline:
            stored = self.cache.server_fingerprint(self.name) if self.cache else None
            if stored is None:
                raise CacheMiss(f"{self.name}: offline and the cache holds no fingerprint for this server")
            self._fp = stored
            return dict(stored)
        try:
            models = await self.models()
        except (RequestRejected, ServerError) as e:
            # conformance names the gap ("no /v1/models"); the fingerprint goes on without ids, and
            # is kept: asking again on every cached request would wait out the timeout each time
            log.debug("%s: /v1/models not available (%s)", self.name, e)
            models = []
        fp: dict[str, Any] = {"name": self.name, "url": self.base_url, "models": models}
        for path in ("/version", P.CONFIG):
            try:
                data = await (
                    self.debug_config(retries=0) if path == P.CONFIG else self.get_json(path, retries=0)
                )
            except (RequestRejected, ServerError) as e:
                log.debug("%s: %s not available (%s)", self.name, path, e)
                continue
            if not isinstance(data, dict):
                continue
            if path == "/version":
                fp["version"] = data.get("version", data)
            else:
                fp["debug_config"] = {k: data[k] for k in _FINGERPRINT_CONFIG_KEYS if k in data}
                # the per-module table (schemes, backends, layouts) changes with any flag: hash it
                fp["debug_config_sha256"] = hashlib.sha256(
                    json.dumps(data, sort_keys=True, default=str).encode()
                ).hexdigest()
        self._fp = fp
        return dict(fp)

    async def _cache_fingerprint(self) -> dict:
        async with self._fp_lock:
            if self._cache_fp is None:
                fp = await self.fingerprint()
                if self.cache_identity is not None and not self.offline:
                    fp = {k: v for k, v in fp.items() if k != "url"} | {"identity": self.cache_identity}
                if not self.offline and self.cache is not None:
                    fp = await self._with_behaviour(fp)
                    self.cache.remember_server(self.name, fp)
                self._cache_fp = fp
        return self._cache_fp

    async def _with_behaviour(self, fp: dict) -> dict:
        """Add the canary's behaviour to `fp`; when a stored fingerprint of this server is the same
        server (same configuration, every canary within the measured tolerance) return that one
        exactly, so cache keys match. A changed server gets new keys: its old answers are never
        reused (difftest.identity). So does a server whose canary cannot vouch for it (failed, no
        logprobs, or no batched answer: a run's answers come from batched requests).

        The canary is asked alone and in a batch, twice each, one after the other (asked side by
        side they would share a batch): 4 requests, ~1 s on tiny-llama on a CPU."""
        request = canary_request(self.model or (fp["models"][0] if fp.get("models") else None))
        behaviour, why = await self._ask_canary(request)
        if not vouches(behaviour):
            return self._unvouched(fp, behaviour, f"the identity canary {why}")
        batched, batch_jitter = await self._ask_batched(request)
        if "answers" not in batched:
            return self._unvouched(
                fp | {"behaviour": behaviour},
                batched,
                f"the identity canary could not be sent in a batch ({batched.get('refused')}), so it "
                "cannot vouch for batched answers",
            )
        again, _ = await self._ask_canary(request)
        noise = max(jitter(behaviour, again), batch_jitter)
        fp = fp | {"behaviour": behaviour, "behaviour_batched": batched, "canary_jitter": noise}
        stored = self.cache.server_fingerprints(self.name) if self.cache is not None else []
        stale: str | None = None  # what a re-asked cached request said, where the canary matched
        for n, old in enumerate(stored):
            tolerance = tolerance_for(noise, old.get("canary_jitter"))
            if changed_parts(old, fp, tolerance):
                continue
            differs = await self._recheck(old, tolerance)
            if differs:
                stale = stale or differs
                continue
            if n:
                self.identity_note = (
                    "server changed since the last cached run, back to the state of an earlier "
                    "one: that run's answers are reused"
                )
                log.warning("%s: %s", self.name, self.identity_note)
            return old
        if stale:  # the canary alone would have matched: new keys, or the stale answers are found
            fp = fp | {REBUILT: secrets.token_hex(8)}
        if stored:
            changed = (
                [stale]
                if stale
                else changed_parts(stored[0], fp, tolerance_for(noise, stored[0].get("canary_jitter")))
            )
            self.identity_note = (
                f"server changed since the cached run ({', '.join(changed)}): no cached answer is "
                "reused, everything asked again"
            )
            log.warning("%s: %s", self.name, self.identity_note)
        return fp

    async def _recheck(self, old: dict, tolerance: float) -> str | None:
        """Ask a few of the requests cached under `old` again (`pick_rechecks`: the longest echo
        and generation, a seeded sample) and compare each answer with the cached one under the
        canary's rule; what first differs, in words, or None. The canary reaches 23 positions of
        one prompt; a server restarted with a shorter context, or rebuilt with a bug from position
        28 on, answered it as before while every longer cached answer was stale."""
        assert self.cache is not None
        for picked in pick_rechecks(self._cached_requests(old)):
            entry = self.cache.entry(picked.key)
            if entry is None:
                continue
            request, cached = entry
            path, body = route_of(request)
            what = f"a cached {picked.reach}-token {'echo' if picked.echo else 'generation'} request"
            self._checks += 1
            try:
                fresh = await self.post_choices(path, body)
            except RequestRejected as exc:
                return f"{what} now answers HTTP {exc.status_code}"
            except ServerError as exc:
                return f"{what} now fails ({exc.reason})"
            why = answer_difference(cached, fresh, tolerance)
            if why:
                return f"{what} now answers differently: {why}"
        return None

    def _cached_requests(self, fingerprint: dict) -> list[CachedRequest]:
        """Every request cached under `fingerprint`, ranked by reach (read one row at a time)."""
        assert self.cache is not None
        out = []
        for key in self.cache.keys_of(fingerprint):
            entry = self.cache.entry(key)
            if entry is not None:
                _, body = route_of(entry[0])
                out.append(CachedRequest(key, reach(body, entry[1]), bool(body.get("echo"))))
        return out

    def _unvouched(self, fp: dict, part: dict, why: str) -> dict:
        """`fp` with keys of this client's own, so that an answer stored by an earlier run (same
        text, same error) can never match."""
        self.identity_note = f"{why}; cached answers are not reused"
        log.warning("%s: %s", self.name, self.identity_note)
        key = "behaviour" if "behaviour" not in fp else "behaviour_batched"
        return fp | {key: part | {"unvouched": secrets.token_hex(8)}}

    async def _ask_canary(self, request: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The canary alone: its summary, and what went wrong if it cannot vouch."""
        try:
            try:
                self._checks += 1
                answer = await self.completions(request, use_cache=False)
            except RequestRejected:  # a server without logprobs still has greedy tokens to compare
                self._checks += 1
                answer = await self.completions(
                    {k: v for k, v in request.items() if k != "logprobs"}, use_cache=False
                )
            summary = canary_summary(answer)
            given = [v for v in summary["token_logprobs"] if v is not None]
            return summary, (
                "came back with logprobs that are no finite numbers (NaN, an infinity, a null)"
                if given
                else "came back without logprobs"
            )
        except (RequestRejected, ServerError) as e:
            return {"error": str(e)}, f"request failed ({e})"

    async def _ask_batched(self, request: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The canary's copies in a batch, asked twice: ({"answers": ...} or {"refused": why}, the
        largest move between the two asks)."""
        asks = []
        for _ in range(2):
            self._checks += 1
            try:
                answer = await self.completions(canary_batch_request(request), use_cache=False)
            except (RequestRejected, ServerError) as e:
                return {"refused": str(e)}, 0.0
            found = batch_summaries(answer)
            if isinstance(found, str):
                return {"refused": found}, 0.0
            if not all(vouches(s) for s in found):
                return {"refused": "a copy of the canary came back without logprobs"}, 0.0
            asks.append(found)
        moves = [jitter(a, b) for a, b in zip(asks[0], asks[1], strict=True)]
        placed = {"batch": CANARY_BATCH, "slots": list(CANARY_SLOTS), "answers": asks[0]}
        return placed, max(moves, default=0.0)

    # ------------------------------------------------------------------ transport
    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
        retries: int | None = None,
        read: Callable[[bytes], Any] | None = None,
    ) -> Any:
        """The body of a 2xx answer, or `read(body)` when given: an UnreadableBody from `read` is
        retried like a 5xx, and raised (naming the body) once the retries are spent.

        Only requests asked with the client's full retry budget count towards the breaker: an
        optional probe asked once (`retries=0`: /version, echo support) may time out on a server
        that answers everything else."""
        if self.offline:
            raise CacheMiss(f"{self.name}: offline; {method} {path} is not answered from the cache")
        budget = self.max_retries if retries is None else retries
        self._requests += 1
        # the slot is held through the backoff: a server that said "not now" gets no other request
        # in its place, and the requests in flight when a server stops spend their retries before
        # the queue's first attempts (released between attempts, every queued prompt waited out one
        # timeout before any request had failed: the breaker opened only after all of them)
        async with self._sem:
            attempt = 0
            while True:
                try:
                    if self._breaker.open:  # checked at each attempt: queued requests end at once
                        raise self._breaker.refusal(self.name, method, path)
                    value, miss = await self._attempt(method, path, json_body, content, content_type, read)
                except (RequestRejected, ServerError):
                    self._failures += 1
                    raise
                if miss is None:
                    return value
                if attempt >= budget:
                    self._failures += 1
                    if miss.silent and budget >= self.max_retries:
                        self._breaker.failure(f"{method} {path}: {miss.reason}")
                    tries = f"failed after {attempt + 1} attempt(s)"
                    if miss.unreadable is not None:  # its words as before, which name the body
                        raise UnreadableBody(
                            f"{miss.unreadable} ({tries})", server=self.name, reason=miss.reason
                        )
                    raise ServerError(
                        f"{self.name}: {method} {path} {tries}: {miss.reason}",
                        server=self.name,
                        status_code=miss.status,
                        reason=miss.reason,
                    )
                delay = self._delay(attempt, miss.retry_after)
                attempt += 1
                self._retries += 1
                log.warning(
                    "%s: %s %s %s; retry %d/%d in %.2fs",
                    *(self.name, method, path, miss.reason, attempt, budget, delay),
                )
                await self._sleep(delay)

    async def _attempt(
        self,
        method: str,
        path: str,
        json_body: dict | None,
        content: bytes | None,
        content_type: str | None,
        read: Callable[[bytes], Any] | None,
    ) -> tuple[Any, _Miss | None]:
        """One try: (the answer, None), or (None, what went wrong) when another try may do better.
        A 4xx is raised (RequestRejected): the request itself is wrong, asking again cannot help."""
        try:
            # a total deadline too: httpx's timeouts are per read, and a server that trickles bytes
            # (or an in-process transport) never trips them
            status, body, headers = await asyncio.wait_for(
                self._exchange(method, path, json_body, content, content_type), self.timeout_s
            )
        except (TimeoutError, httpx.RequestError) as e:  # connect, read, protocol, decoding
            timed_out = isinstance(e, httpx.TimeoutException | asyncio.TimeoutError)
            what = f"timed out after {self.timeout_s:g}s" if timed_out else "connection failed"
            return None, _Miss(f"{what} ({type(e).__name__})", silent=True)
        if 200 <= status < 300:
            self._breaker.success()
            try:
                return (body if read is None else read(body)), None
            except UnreadableBody as e:
                return None, _Miss(e.reason, unreadable=str(e))
        message = self._scrub(_error_message(body)) + self._auth_hint(status)
        if status not in _RETRY_STATUS and status < 500:
            raise RequestRejected(
                f"{self.name}: {method} {path} rejected with HTTP {status}: {message}",
                server=self.name,
                status_code=status,
                reason=f"HTTP {status}: {message}",
                body=_error_body(body, self._scrub),
            )
        return None, _Miss(f"HTTP {status}: {message}", status, headers.get("retry-after"))

    async def _exchange(
        self, method: str, path: str, json_body: dict | None, content: bytes | None, content_type: str | None
    ) -> tuple[int, bytes, httpx.Headers]:
        headers = {"Content-Type": content_type} if content_type else None
        cap = self.max_response_bytes
        async with self._http.stream(method, path, json=json_body, content=content, headers=headers) as resp:
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise ResponseTooLarge(
                    f"{self.name}: {method} {path} response of {declared} bytes exceeds the {cap}-byte cap",
                    server=self.name, cap=cap,
                )  # fmt: skip
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > cap:
                    raise ResponseTooLarge(
                        f"{self.name}: {method} {path} response exceeds the {cap}-byte cap",
                        server=self.name,
                        cap=cap,
                    )
            log.debug("%s: %s %s -> %d (%d bytes)", self.name, method, path, resp.status_code, len(buf))
            return resp.status_code, bytes(buf), resp.headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        base, cap = self._backoff
        if retry_after:
            try:
                return min(cap, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP-date: fall back to our own schedule
        # "full jitter" on an exponential schedule: desynchronises concurrent retries (AWS backoff note)
        return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)

    def _auth_hint(self, status: int) -> str:
        """What to do about a 401 / 403: whether a key was sent at all is what the user needs to
        know (the key itself never shows)."""
        if status not in (401, 403):
            return ""
        if self._api_key:
            return " (an API key was sent and refused)"
        return (
            " (no API key was sent: name the variable that holds it with --api-key-env VAR or a "
            "server's api_key_env, or set OPENAI_API_KEY)"
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # "\ud83d": half an emoji, as JS / Python servers send


def _as_json(body: bytes, name: str, path: str) -> Any:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        reason = f"answered a body that is not JSON: {body[:80]!r}"
        raise UnreadableBody(f"{name}: {path} {reason}", server=name, reason=reason) from e
    # a lone surrogate cannot be encoded as UTF-8: it crashed the cache and the report writers, so it
    # becomes U+FFFD here, as a UTF-8 decoder makes of half a character (the scan is skipped when
    # the body has no surrogate escape at all)
    return _no_lone_surrogates(data) if _SURROGATE_ESCAPE.search(body) else data


def _no_lone_surrogates(obj: Any) -> Any:
    if isinstance(obj, str):
        return LONE_SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_lone_surrogates(v) for v in obj]
    return obj


def read_choices(body: bytes, server: str, path: str, scrub: Callable[[str], str] = str) -> dict:
    """A completions-shaped 200 body as JSON with a `choices` list, else UnreadableBody naming what
    it said instead (`scrub`: the API key out of the server's words)."""
    data = _as_json(body, server, path)
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        said = f": {scrub(_error_message(body))}" if isinstance(data, dict) and "error" in data else ""
        reason = f"answered 200 without a 'choices' list{said}"
        raise UnreadableBody(f"{server}: {path} {reason}", server=server, reason=reason)
    return data


def _error_message(body: bytes) -> str:
    """A server's error in one line (errors are one line: an HTML page's newlines ran over eight)."""
    return " ".join(_error_text(body).split()) or "(empty body)"


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in data:  # FastAPI's default error shape
            return str(data["detail"])
        if "message" in data:
            return str(data["message"])
    return json.dumps(data)[:300]


def _error_body(body: bytes, scrub: Callable[[str], str]) -> dict:
    try:
        data = json.loads(scrub(body.decode("utf-8", "replace")))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
