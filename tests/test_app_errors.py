"""Every caller mistake is a 4xx OpenAI-shaped error naming the parameter, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from server_shim.app import create_app
from server_shim.options import ServeOptions

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2}


@pytest.fixture
async def client(engine):
    opts = ServeOptions(
        model="tiny-llama", api_key=KEY, max_body_bytes=64 * 1024, max_n=4, max_tokens_cap=100
    )
    app = create_app(engine, opts)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shim", headers=AUTH, timeout=60) as c:
        yield c


def _check_error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


async def _still_serves(client: httpx.AsyncClient) -> None:
    # ignore_eos: the random tiny model samples its EOS within 2 tokens now and then ("stop", a flake)
    r = await client.post("/v1/completions", json={**GOOD, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


BAD = [
    ("missing prompt", {"model": "tiny-llama"}, 400, "prompt"),
    ("empty prompt", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("empty prompt list", {**GOOD, "prompt": []}, 400, "prompt"),
    ("empty token list", {**GOOD, "prompt": [[]]}, 400, "prompt"),
    ("missing model", {"prompt": "x"}, 400, "model"),
    ("prompt wrong type", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("prompt floats", {**GOOD, "prompt": [1.5, 2]}, 400, "prompt"),
    ("max_tokens string", {**GOOD, "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens negative", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens 0 without echo", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over cap", {**GOOD, "max_tokens": 101}, 400, "max_tokens"),
    ("temperature bool", {**GOOD, "temperature": True}, 400, "temperature"),
    ("temperature negative", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("logprobs 21", {**GOOD, "logprobs": 21}, 400, "logprobs"),
    ("logprobs negative", {**GOOD, "logprobs": -1}, 400, "logprobs"),
    ("n zero", {**GOOD, "n": 0}, 400, "n"),
    ("n too large", {**GOOD, "n": 5}, 400, "n"),
    ("token id outside vocab", {**GOOD, "prompt": [1, 2, 49152]}, 400, "prompt"),
    ("negative token id", {**GOOD, "prompt": [[1, -3]]}, 400, "prompt"),
    ("empty stop string", {**GOOD, "stop": ["ok", ""]}, 400, "stop"),
    ("stop wrong type", {**GOOD, "stop": 3}, 400, "stop"),
    ("unknown parameter", {**GOOD, "foo": 1}, 400, "foo"),
    ("frequency_penalty set", {**GOOD, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("presence_penalty set", {**GOOD, "presence_penalty": -1.0}, 400, "presence_penalty"),
    ("logit_bias set", {**GOOD, "logit_bias": {"50": 100}}, 400, "logit_bias"),
    ("best_of above n", {**GOOD, "best_of": 3}, 400, "best_of"),
    ("suffix set", {**GOOD, "suffix": "end"}, 400, "suffix"),
    ("stream_options junk", {**GOOD, "stream_options": {"x": 1}}, 400, "stream_options"),
    # vLLM refuses it too: the usage it asks for would never be sent (before: accepted, ignored)
    ("skip_special_tokens true", {**GOOD, "skip_special_tokens": True}, 400, "skip_special_tokens"),
    ("stream_options unstreamed", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("prompt over context", {**GOOD, "prompt": "hello " * 2100}, 400, "prompt"),
    ("unknown model", {**GOOD, "model": "gpt-5"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_completion_is_4xx_then_serves(client, body, status, param):
    r = await client.post("/v1/completions", json=body)
    _check_error(r, status, param)
    await _still_serves(client)


async def test_specific_codes(client):
    r = await client.post("/v1/completions", json={**GOOD, "model": "nope"})
    _check_error(r, 404, "model", "model_not_found")
    r = await client.post("/v1/completions", json={**GOOD, "prompt": [5] * 2047, "max_tokens": 2})
    _check_error(r, 400, "prompt", "context_length_exceeded")
    assert "2048" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "raw", [b'{"model": "tiny-llama", "prompt": ', b"not json", b"[1, 2]", b"\xff\xfe", b""], ids=str
)
async def test_malformed_json(client, raw):
    r = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    _check_error(r, 400, None)
    await _still_serves(client)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
async def test_a_body_declared_as_not_json_is_refused(client, content_type):
    """`curl -d` sends a form Content-Type: the body is refused by what it declares, not read as JSON."""
    raw = b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}'
    r = await client.post("/v1/completions", content=raw, headers={"content-type": content_type})
    _check_error(r, 400, None, "invalid_content_type")
    assert content_type.split(";")[0] in r.json()["error"]["message"]
    await _still_serves(client)


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
)
async def test_json_bodies_are_taken_with_or_without_the_header(client, content_type):
    raw = b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}'
    headers = {} if content_type is None else {"content-type": content_type}
    r = await client.post("/v1/completions", content=raw, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] is not None


async def test_body_too_large(client):
    r = await client.post("/v1/completions", json={**GOOD, "prompt": "x" * 70_000})
    _check_error(r, 413, None, "request_too_large")

    async def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(20):
            yield b" " * 8192

    r = await client.post("/v1/completions", content=chunks())
    _check_error(r, 413, None, "request_too_large")
    await _still_serves(client)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY.upper()}"},
    ],
    ids=["missing", "wrong", "no-bearer", "other-scheme", "key-case"],
)
@pytest.mark.parametrize("route", ["/v1/models", "/v1/completions", "/tokenize", "/detokenize", "/nope"])
async def test_api_key_on_every_route_but_health(client, headers, route):
    async with httpx.AsyncClient(transport=client._transport, base_url="http://shim") as anon:
        method = anon.get if route in ("/v1/models", "/nope") else anon.post
        kwargs = {} if method == anon.get else {"json": GOOD}
        r = await method(route, headers=headers, **kwargs)
    _check_error(r, 401, None, "invalid_api_key")
    await _still_serves(client)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_auth_scheme_is_case_insensitive(client, scheme):
    """RFC 9110: the scheme name is case-insensitive (before: "bearer KEY" got a 401)."""
    async with httpx.AsyncClient(transport=client._transport, base_url="http://shim") as anon:
        r = await anon.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200


async def test_health_is_open_and_reveals_nothing(client):
    async with httpx.AsyncClient(transport=client._transport, base_url="http://shim") as anon:
        r = await anon.get("/health")
        head = await anon.head("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert head.status_code == 200 and head.content == b""  # HEAD was a 405


async def test_openapi_operation_ids_are_unique(client):
    # one route for GET and HEAD on /health gave two operations one id: client generators reject it
    r = await client.get("/openapi.json")
    ids = [
        op["operationId"]
        for path in r.json()["paths"].values()
        for op in path.values()
        if "operationId" in op
    ]
    assert ids and len(ids) == len(set(ids)), ids


async def test_unknown_route_and_method(client):
    _check_error(await client.get("/v2/whatever"), 404, None, "not_found")
    r = await client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


async def test_tokenize_errors(client):
    _check_error(await client.post("/tokenize", json={"prompt": 3}), 400, "prompt")
    _check_error(await client.post("/tokenize", json={"model": "x", "prompt": "a"}), 404, "model")
    _check_error(await client.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    _check_error(await client.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")


async def test_internal_error_is_500_openai_shaped(client, engine, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(engine, "submit", boom)
    r = await client.post("/v1/completions", json=GOOD)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "simulated bug" in caplog.text  # the traceback is in the log, not in the response
    assert "simulated bug" not in r.text
    monkeypatch.undo()
    await _still_serves(client)


async def test_keys_never_reach_the_log(engine, caplog):
    """Wrong, right and malformed keys, and a server error: no key text in any log record."""
    import logging

    caplog.set_level(logging.DEBUG)
    opts = ServeOptions(model="tiny-llama", api_key=KEY)
    app = create_app(engine, opts)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shim") as c:
        for auth in ("Bearer sk-wrong-999", f"Bearer {KEY}", KEY):
            await c.post("/v1/completions", json=GOOD, headers={"Authorization": auth})
            await c.get("/v1/models", headers={"Authorization": auth})
    assert caplog.records  # something was logged (the key is not merely absent because nothing was)
    assert KEY not in caplog.text and "sk-wrong-999" not in caplog.text
