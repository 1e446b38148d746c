"""No request harms another: numeric edge cases, per-sequence failure isolation, hostile JSON on every
JSON route, size caps while streaming a body, tokenizing off the event loop, backpressure (429) and
cancellation of abandoned requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import httpx
import pytest

from server_shim.app import create_app
from server_shim.engine import Engine, stop_overlap
from server_shim.options import ServeOptions

GOOD = {"model": "tiny-llama", "prompt": "Hello there", "max_tokens": 3}


def _client(engine: Engine, **opts) -> httpx.AsyncClient:
    app = create_app(engine, ServeOptions(model="tiny-llama", **opts))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shim", timeout=120)


async def _burst(client: httpx.AsyncClient, bodies: list[dict]) -> list[httpx.Response]:
    """Send all bodies at once so that they share one batch (the engine waits 2 ms for a burst)."""
    return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


# ----------------------------------------------------------------------------- one bad request, 7 good


@pytest.mark.parametrize(
    "odd",
    [{"temperature": 1e-39}, {"temperature": 1.0, "top_p": 1e-46}, {"temperature": 1e-38, "top_p": 1e-46}],
    ids=["temperature-1e-39", "top_p-1e-46", "both"],
)
async def test_underflowing_sampling_params_fail_nobody(engine, odd):
    """float32(1e-39) is denormal and float32(1e-46) is 0: the sampler used to divide by it or keep
    no token, raise, and fail the whole batch (5-6 of 8 innocent requests got 500)."""
    bodies = [{**GOOD, "prompt": f"Request number {i}", "temperature": 0.8, "seed": i} for i in range(7)]
    bodies.insert(3, {**GOOD, **odd, "seed": 1})
    async with _client(engine) as client:
        rs = await _burst(client, bodies)
        greedy = await client.post("/v1/completions", json={**GOOD, "temperature": 0})
    assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs if r.status_code != 200]
    if odd.get("temperature", 1.0) < 1e-5:  # below the sampling epsilon: greedy, as vLLM does
        assert rs[3].json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    else:  # top_p ~ 0 keeps exactly the likeliest token: greedy too
        assert rs[3].json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


async def test_a_failing_sampler_fails_only_its_request(engine, monkeypatch):
    real = Engine._sample

    def sample(logits, params, gen):
        if params.seed == 666:
            raise RuntimeError("simulated sampler bug")
        return real(logits, params, gen)

    monkeypatch.setattr(Engine, "_sample", staticmethod(sample))
    bodies = [{**GOOD, "prompt": f"Request {i}", "temperature": 0.7, "seed": i} for i in range(7)]
    bodies.insert(5, {**GOOD, "temperature": 0.7, "seed": 666})
    async with _client(engine) as client:
        rs = await _burst(client, bodies)
    codes = [r.status_code for r in rs]
    assert codes == [200] * 5 + [500] + [200] * 2, codes
    assert rs[5].json()["error"]["type"] == "server_error"


async def test_a_batch_that_fails_is_retried_request_by_request(engine, monkeypatch):
    """A forward pass that fails on one request's input: the other requests of the batch are re-run
    alone and answer 200; only the culprit gets the 500."""
    poison = 4242
    real = engine._forward

    def forward(ids, *args, **kwargs):
        if (ids == poison).any():
            raise RuntimeError("simulated kernel failure on this input")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", forward)
    bodies = [{**GOOD, "prompt": f"Request {i}"} for i in range(7)]
    bodies.insert(2, {**GOOD, "prompt": [1, 2, poison]})
    async with _client(engine) as client:
        rs = await _burst(client, bodies)
    codes = [r.status_code for r in rs]
    assert codes == [200, 200, 500] + [200] * 5, codes


# ----------------------------------------------------------------------------- hostile JSON

NESTED = (
    b'{"model": "tiny-llama", "prompt": ' + b"[" * 150_000 + b"]" * 150_000 + b"}"
)  # > THREAD_PARSE_BYTES
BIG_INT = b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
HOSTILE = {
    "lone surrogate": b'{"model": "tiny-llama", "prompt": "abc \\ud800 def", "max_tokens": 2}',
    "nested 150000": NESTED,
    "int over 4300 digits": BIG_INT,
    "NaN": b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}',
    "overflowing float": b'{"model": "tiny-llama", "prompt": "hi", "temperature": 1e400}',
}
JSON_ROUTES = ["/v1/completions", "/tokenize", "/detokenize", "/debug/activations"]


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_json_is_400_on_every_json_route(engine, route, name):
    raw = HOSTILE[name]
    if route == "/detokenize":
        raw = raw.replace(b'"prompt"', b'"tokens"')
    async with _client(engine, debug=True) as client:
        r = await client.post(route, content=raw, headers={"content-type": "application/json"})
        ok = await client.post("/v1/completions", json=GOOD)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert ok.status_code == 200


async def test_surrogate_in_stop_string_is_400_naming_stop(engine):
    raw = b'{"model": "tiny-llama", "prompt": "hi", "stop": ["ok", "\\udfff"]}'
    async with _client(engine) as client:
        r = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert r.json()["error"]["code"] == "invalid_unicode"


# ----------------------------------------------------------------------------- size caps


@pytest.mark.parametrize("route", ["/debug/module", "/debug/activations", "/v1/completions"])
async def test_chunked_body_without_length_is_cut_at_the_cap(engine, route):
    """No Content-Length: the cap is enforced while the body streams in (it used to buffer 1.5 GiB)."""
    sent = 0

    async def chunks():
        nonlocal sent
        for _ in range(1000):  # 64 MiB if nobody stops reading
            sent += 1
            yield b"\0" * 65536

    async with _client(engine, debug=True, max_body_bytes=1_000_000) as client:
        r = await client.post(route, content=chunks())
    assert r.status_code == 413
    assert (
        r.json()["error"]["code"] == "request_too_large" and "1000000 bytes" in r.json()["error"]["message"]
    )
    assert sent < 40  # reading stopped at the cap, not at the end of the body


async def test_stop_string_caps(engine):
    async with _client(engine, max_stop_strings=4, max_stop_chars=50) as client:
        many = await client.post("/v1/completions", json={**GOOD, "stop": [f"s{i}" for i in range(5)]})
        long = await client.post("/v1/completions", json={**GOOD, "stop": ["x" * 51]})
        fine = await client.post("/v1/completions", json={**GOOD, "stop": ["x" * 50] * 4})
    assert many.status_code == 400 and "at most 4 stop strings" in many.json()["error"]["message"]
    assert long.status_code == 400 and "at most 50 characters" in long.json()["error"]["message"]
    assert fine.status_code == 200


@pytest.mark.parametrize("route", ["/v1/completions", "/tokenize"])
async def test_prompt_over_the_char_cap_is_400_without_tokenizing(engine, route):
    async with _client(engine, max_prompt_chars=1000) as client:
        r = await client.post(route, json={"model": "tiny-llama", "prompt": "word " * 201})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"


async def test_health_answers_while_a_big_prompt_is_tokenized(engine):
    """Tokenizing ~1 MB runs on the tokenizer threads: /health finishes first. (On the event loop, as
    before, /health could not even start until the tokenizer returned.)"""
    text = " ".join(f"w{i % 997}x{i % 13}" for i in range(130_000))  # ~1 MB, many tokens
    order: list[str] = []
    async with _client(engine, max_body_bytes=4 * 2**20) as client:

        async def big() -> None:
            r = await client.post("/tokenize", json={"prompt": text})
            assert r.status_code == 200 and r.json()["count"] > 100_000
            order.append("tokenize")

        task = asyncio.create_task(big())
        await asyncio.sleep(0.2)  # the body is read and handed to a tokenizer thread
        r = await client.get("/health")
        order.append("health")
        await task
    assert r.status_code == 200
    assert order == ["health", "tokenize"]


def test_stop_overlap_equals_brute_force():
    def brute(text: str, stop: str) -> int:
        return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)

    cases = [
        ("abc", "cde"),
        ("xxab", "abab"),
        ("aaaa", "aaaaa"),
        ("", "ab"),
        ("zz", "a"),
        ("hello w", "o wor"),
    ]
    cases += [("ab" * 20, "ab" * 10 + "c"), ("the end.", ".\n\n"), ("日本", "本語")]
    for text, stop in cases:
        assert stop_overlap(text, stop) == brute(text, stop), (text, stop)


# ----------------------------------------------------------------------------- backpressure


@pytest.fixture
def small_engine(tiny_llama):
    eng = Engine(tiny_llama, max_waiting=3)
    yield eng
    eng.close()


def _raw_completion(body: dict) -> tuple[dict, Callable[[], Awaitable[dict]], asyncio.Event]:
    """A POST /v1/completions as raw ASGI: (scope, receive, gone). `receive` hands over the body,
    then waits until `gone` is set and reports the client's disconnect."""
    content = httpx.Request("POST", "http://x", json=body).content
    messages = [{"type": "http.request", "body": content, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip
    return scope, receive, gone


async def _hold_worker(engine: Engine) -> threading.Event:
    """Occupy the model thread until the returned event is set (queued requests stay queued)."""
    release, started = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(60)

    engine._hold = asyncio.ensure_future(engine.run_exclusive(job))  # kept alive by the engine object
    while not started.is_set():
        await asyncio.sleep(0.01)
    return release


async def test_queue_full_is_429_with_retry_after_and_queued_work_still_finishes(small_engine):
    async with _client(small_engine) as client:
        release = await _hold_worker(small_engine)
        queued = [asyncio.create_task(client.post("/v1/completions", json=GOOD)) for _ in range(3)]
        while small_engine.waiting < 3:
            await asyncio.sleep(0.01)
        over = await client.post("/v1/completions", json=GOOD)
        release.set()
        done = await asyncio.gather(*queued)
        after = await client.post("/v1/completions", json=GOOD)
    assert over.status_code == 429
    assert over.headers["retry-after"] == "1"
    assert (
        over.json()["error"]["code"] == "server_busy" and "--max-waiting" in over.json()["error"]["message"]
    )
    assert [r.status_code for r in done] == [200, 200, 200]
    assert after.status_code == 200


async def test_a_request_larger_than_the_queue_is_400_not_a_429_forever(small_engine):
    """The bug: 4 sequences against --max-waiting 3 got 429 "retry later" on every retry, even on an
    idle server; a client honouring Retry-After looped forever."""
    async with _client(small_engine) as client:
        too_many_n = await client.post("/v1/completions", json={**GOOD, "n": 4})
        too_many_prompts = await client.post("/v1/completions", json={**GOOD, "prompt": ["a", "b"], "n": 2})
        chat = await client.post("/v1/chat/completions", json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "n": 4, "max_tokens": 1})  # fmt: skip
        fits = await client.post("/v1/completions", json={**GOOD, "n": 3})
    for r, param in ((too_many_n, "n"), (too_many_prompts, "prompt"), (chat, "n")):
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "queues at most 3 (--max-waiting)" in r.json()["error"]["message"]
    assert fits.status_code == 200


async def test_client_that_disconnects_cancels_its_generation(small_engine):
    """Raw ASGI: the request is queued behind a busy worker, the client disconnects, and the worker
    never decodes for it once free."""
    app = create_app(small_engine, ServeOptions(model="tiny-llama"))
    scope, receive, gone = _raw_completion({**GOOD, "max_tokens": 200})
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    release = await _hold_worker(small_engine)
    call = asyncio.create_task(app(scope, receive, send))
    while small_engine.waiting < 1:
        await asyncio.sleep(0.01)
    queued = list(small_engine._pending)
    gone.set()
    while not queued[0].handle.cancelled:
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(call, 300)
    await small_engine.run_exclusive(lambda: None)  # the worker has passed the queue
    assert queued[0].out == []  # not a single token decoded for the abandoned request
    assert small_engine.waiting == 0


async def test_seven_megabyte_prompts_are_refused_before_tokenizing_and_health_answers(engine):
    """The issue's case: 7 MB to /tokenize or /v1/completions used to hold the event loop for 17-31 s.
    Now the character cap refuses them without tokenizing, and /health is answered meanwhile."""
    big = "lorem ipsum " * (7 * 2**20 // 12)
    async with _client(engine) as client:
        results = await asyncio.gather(
            client.post("/v1/completions", json={**GOOD, "prompt": big}),
            client.post("/tokenize", json={"prompt": big}),
            client.get("/health"),
        )
    assert [r.status_code for r in results] == [400, 400, 200]
    assert all(r.json()["error"]["code"] == "prompt_too_long" for r in results[:2])


async def test_streaming_client_that_disconnects_cancels_its_generation(small_engine):
    """Streamed: the client reads the first chunk and goes away; decoding stops far short of
    max_tokens (Starlette ends the stream, the serving class's `finally` cancels the sequences)."""
    app = create_app(small_engine, ServeOptions(model="tiny-llama"))
    scope, receive, gone = _raw_completion({**GOOD, "max_tokens": 1000, "ignore_eos": True, "stream": True})
    chunks: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            gone.set()  # the client leaves after the first event

    seqs: list = []
    real_submit = small_engine.submit

    def submit(*args, **kwargs):
        handle = real_submit(*args, **kwargs)
        seqs.extend(s for s in small_engine._pending if s.handle is handle)
        return handle

    small_engine.submit = submit
    try:
        await asyncio.wait_for(app(scope, receive, send), 300)
    finally:
        del small_engine.submit
    await small_engine.run_exclusive(lambda: None)  # the worker has passed its next step
    assert chunks and seqs and seqs[0].handle.cancelled
    assert len(seqs[0].out) < 1000
