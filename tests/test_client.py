"""CompletionClient: retries and backoff, rejections, caps, timeouts, concurrency, key hygiene."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from fakes import FakeBehaviour, FakeServer

from difftest.client import CompletionClient
from difftest.errors import RequestRejected, ServerError, UnreadableBody

OK_BODY = {
    "id": "x",
    "object": "text_completion",
    "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
}
PAYLOAD = {"model": "m", "prompt": "hello", "max_tokens": 2}


def scripted(*responses: httpx.Response | Exception) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering the scripted responses in order (the last one repeats)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        r = responses[min(len(seen), len(responses)) - 1]
        if isinstance(r, Exception):
            raise r
        return r

    return httpx.MockTransport(handler), seen


def client_for(transport: httpx.AsyncBaseTransport, **kw) -> CompletionClient:
    kw.setdefault("backoff_base_s", 0.001)
    kw.setdefault("backoff_max_s", 0.002)
    return CompletionClient("http://srv.invalid", name="srv", transport=transport, **kw)


def err(status: int, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "x", "code": status}}, headers=headers
    )


async def test_429_then_200_is_retried() -> None:
    transport, seen = scripted(err(429, "slow down"), httpx.Response(200, json=OK_BODY))
    async with client_for(transport) as c:
        assert await c.completions(PAYLOAD) == OK_BODY
        assert (len(seen), c.requests, c.retries, c.failures) == (2, 1, 1, 0)
    assert json.loads(seen[0].content) == PAYLOAD
    assert seen[0].url.path == "/v1/completions"


async def test_connect_errors_and_5xx_are_retried() -> None:
    transport, seen = scripted(
        httpx.ConnectError("refused"), err(502, "bad gateway"), httpx.Response(200, json=OK_BODY)
    )
    async with client_for(transport) as c:
        assert await c.completions(PAYLOAD) == OK_BODY
        assert c.retries == 2
    assert len(seen) == 3


async def test_400_is_not_retried_and_carries_the_server_message() -> None:
    transport, seen = scripted(err(400, "logprobs must be <= 20"))
    async with client_for(transport) as c:
        with pytest.raises(RequestRejected) as info:
            await c.completions(PAYLOAD)
        assert (len(seen), c.retries, c.failures) == (1, 0, 1)
    assert info.value.status_code == 400
    assert "logprobs must be <= 20" in str(info.value)
    assert info.value.body["error"]["message"] == "logprobs must be <= 20"


async def test_exhausted_retries_raise_server_error() -> None:
    transport, seen = scripted(err(503, "overloaded"))
    async with client_for(transport, max_retries=2) as c:
        with pytest.raises(ServerError) as info:
            await c.completions(PAYLOAD)
        assert (c.requests, c.retries, c.failures) == (1, 2, 1)
    assert len(seen) == 3
    assert info.value.status_code == 503
    assert info.value.exit_code == 3
    assert "overloaded" in str(info.value) and "3 attempt(s)" in str(info.value)


async def test_backoff_is_exponential_with_jitter_and_honours_retry_after() -> None:
    delays: list[float] = []

    async def record(s: float) -> None:
        delays.append(s)

    transport, _ = scripted(
        err(500, "a"), err(500, "b"), err(500, "c"), err(429, "d", **{"Retry-After": "3"})
    )
    c = client_for(transport, max_retries=3, backoff_base_s=1.0, backoff_max_s=100.0, sleep=record)
    with pytest.raises(ServerError):
        await c.completions(PAYLOAD)
    await c.aclose()
    # attempt n waits base * 2**n scaled by a jitter in [0.5, 1]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    transport, _ = scripted(err(429, "d", **{"Retry-After": "3"}), httpx.Response(200, json=OK_BODY))
    delays.clear()
    async with client_for(transport, backoff_max_s=8.0, sleep=record) as c:
        await c.completions(PAYLOAD)
    assert delays == [3.0]


async def test_total_timeout_is_enforced_and_retried() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)
        return httpx.Response(200, json=OK_BODY)

    async with client_for(httpx.MockTransport(handler), timeout_s=0.05, max_retries=1) as c:
        with pytest.raises(ServerError, match="timed out") as info:
            await c.completions(PAYLOAD)
        assert c.retries == 1
    assert info.value.status_code is None


@pytest.mark.parametrize("declared", [True, False])
async def test_response_size_cap(declared: bool) -> None:
    big = json.dumps(OK_BODY | {"pad": "x" * 5000}).encode()

    async def chunks():
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=big if declared else chunks())

    async with client_for(httpx.MockTransport(handler), max_response_bytes=1000) as c:
        with pytest.raises(ServerError, match="1000-byte cap"):
            await c.completions(PAYLOAD)
        assert c.retries == 0  # deterministic: retrying cannot help
    async with client_for(httpx.MockTransport(handler), max_response_bytes=len(big)) as c:
        assert (await c.completions(PAYLOAD))["pad"] == "x" * 5000


async def test_non_json_or_malformed_body_is_a_server_error() -> None:
    transport, seen = scripted(httpx.Response(200, text="<html>proxy error</html>"))
    async with client_for(transport) as c:
        with pytest.raises(ServerError, match="not JSON"):
            await c.completions(PAYLOAD)
    transport, _ = scripted(httpx.Response(200, json={"object": "text_completion"}))
    async with client_for(transport) as c:
        with pytest.raises(ServerError, match="choices"):
            await c.completions(PAYLOAD)


async def test_api_key_is_sent_as_bearer_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-very-secret-123"
    caplog.set_level(logging.DEBUG)
    transport, seen = scripted(
        err(429, "busy"),
        httpx.Response(200, json=OK_BODY),
        err(401, f"Incorrect API key provided: {key}"),  # servers do echo keys back
    )
    c = client_for(transport, api_key=key)
    await c.completions(PAYLOAD)
    with pytest.raises(RequestRejected) as info:
        await c.completions(PAYLOAD)
    await c.aclose()
    assert seen[0].headers["authorization"] == f"Bearer {key}"
    assert caplog.records, "the retry should have logged something"
    assert key not in caplog.text
    assert key not in str(info.value) and key not in json.dumps(info.value.body)
    assert key not in repr(c)
    server = FakeServer(FakeBehaviour(api_key=key, debug=True))
    async with server.client(api_key=key) as c:
        fp = await c.fingerprint()
    assert fp["models"] == ["fake-model"] and key not in json.dumps(fp)
    assert key not in caplog.text


async def test_wrong_key_is_rejected_by_the_fake() -> None:
    server = FakeServer(api_key="right")
    async with server.client(api_key="wrong") as c:
        with pytest.raises(RequestRejected) as info:
            await c.models()
    assert info.value.status_code == 401


async def test_concurrency_is_bounded() -> None:
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, json=OK_BODY)

    async with client_for(httpx.MockTransport(handler), concurrency=3) as c:
        await asyncio.gather(*(c.completions(PAYLOAD) for _ in range(20)))
        assert c.requests == 20
    assert peak == 3


async def test_fingerprint_models_and_helpers_against_the_fake() -> None:
    server = FakeServer(debug=True)
    async with server.client(name="ref") as c:
        assert await c.models() == ["fake-model"]
        fp = await c.fingerprint()
        assert (await c.post_json("/tokenize", {"prompt": "the"}))["tokens"] == server.tokenizer.encode("the")
        raw = await c.post_bytes("/tokenize", b'{"prompt": "the"}', "application/json")
    assert fp["url"] == "http://fake.invalid" and fp["name"] == "ref" and fp["version"] == "fake-0.1"
    assert fp["debug_config"] == {"model": "fake-model", "dtype": "float32", "device": "cpu"}
    assert len(fp["debug_config_sha256"]) == 64
    assert json.loads(raw)["count"] == len(server.tokenizer.encode("the"))


def test_base_url_is_normalised() -> None:
    assert CompletionClient("http://h:1/v1/", name="a").base_url == "http://h:1"
    assert CompletionClient("http://h:1", name="a").base_url == "http://h:1"


@pytest.mark.parametrize("mode", ["503", "connect"])
async def test_a_server_that_dies_ends_in_server_error(mode: str) -> None:
    server = FakeServer(die_after=2, die_mode=mode)
    async with server.client(max_retries=2) as c:
        for _ in range(2):
            await c.completions(PAYLOAD | {"model": "fake-model"})
        with pytest.raises(ServerError) as info:
            await c.completions(PAYLOAD | {"model": "fake-model"})
        assert (c.requests, c.failures, c.retries) == (3, 1, 2)
    assert info.value.status_code == (503 if mode == "503" else None)


@pytest.mark.parametrize("mode", ["silent", "reset"])
async def test_a_real_socket_that_never_answers_or_resets_is_bounded(mode: str) -> None:
    """Over a real connection (not a mock transport): a server that accepts and never answers costs
    (max_retries + 1) x timeout_s, then a ServerError naming the server; a reset is retried too."""
    from live_fakes import raw_server

    with raw_server(mode) as url:
        async with CompletionClient(
            url, name="tgt", timeout_s=0.3, max_retries=1, backoff_base_s=0.001, backoff_max_s=0.002
        ) as c:
            with pytest.raises(ServerError) as info:
                await c.completions(PAYLOAD)
            assert c.stats().requests == 1 and c.retries == 1 and c.failures == 1
    said = "timed out after 0.3s" if mode == "silent" else "connection failed"
    assert str(info.value).startswith("tgt: POST /v1/completions failed after 2 attempt(s): " + said)


def test_timeouts_are_settable_and_checked() -> None:
    c = CompletionClient("http://h", name="s", timeout_s=2.5, connect_timeout_s=30)
    assert (c.timeout_s, c.connect_timeout_s) == (2.5, 2.5)  # connecting never outlasts the request
    assert c.sibling(name="s2", concurrency=1).connect_timeout_s == 2.5
    with pytest.raises(ValueError, match="timeout_s and connect_timeout_s must be > 0"):
        CompletionClient("http://h", name="s", timeout_s=0)


async def test_an_html_error_page_is_one_line() -> None:
    """The bug: `probe` against python's http.server printed its 501 page over eight lines."""
    page = "<!DOCTYPE HTML>\n<html>\n  <head>\n    <title>Error</title>\n  </head>\n</html>\n"
    transport, _ = scripted(*[httpx.Response(501, text=page)] * 5)
    async with client_for(transport) as c:
        with pytest.raises(ServerError) as info:
            await c.completions(PAYLOAD)
    assert "\n" not in str(info.value) and "<!DOCTYPE HTML> <html> <head> <title>Error</title>" in str(
        info.value
    )


def test_lone_surrogates_from_a_server_become_replacement_characters() -> None:
    """The bug: a server's "\\ud83d" (half an emoji, as JS and Python servers send) reached the
    cache and the report writers, which cannot encode it: five tracebacks, exit 1, no report."""
    from difftest.client import _as_json

    body = b'{"a": "x\\ud83d y", "b": ["\\ud83d\\ude00"], "\\udc00k": 1}'
    assert _as_json(body, "srv", "/p") == {"a": "x\ufffd y", "b": ["\U0001f600"], "\ufffdk": 1}
    json.dumps(_as_json(body, "srv", "/p"), ensure_ascii=False).encode("utf-8")  # encodable now


async def test_a_malformed_debug_config_is_unreadable() -> None:
    """The bug: `modules` as a list, a null module entry or an int dtype were AttributeErrors in
    every reader of the config (layers, quant, run's white box)."""
    for config in ({"modules": []}, {"modules": {"a": None}}, {"dtype": 5, "modules": {}}):
        transport, _ = scripted(httpx.Response(200, json=config))
        async with client_for(transport) as c:
            with pytest.raises(UnreadableBody, match="/debug/config's modules or dtype are malformed"):
                await c.debug_config()
