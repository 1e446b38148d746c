"""HTTP surface in process: models, health, tokenize round trip, choice order, usage, token-id strings."""

from __future__ import annotations

import json

import httpx
import pytest

from server_shim.app import create_app
from server_shim.options import ServeOptions


@pytest.fixture
async def client(engine):
    app = create_app(engine, ServeOptions(model="tiny-llama"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shim", timeout=60
    ) as c:
        yield c


async def test_health_and_models(client):
    assert (await client.get("/health")).status_code == 200
    r = await client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-llama"]
    assert body["data"][0]["max_model_len"] == 2048


async def test_tokenize_detokenize_round_trip(client, tiny_llama):
    text = "Hello wörld, 日本!"
    r = await client.post(
        "/tokenize", json={"model": "tiny-llama", "prompt": text, "return_token_strs": True}
    )
    body = r.json()
    assert body["tokens"] == tiny_llama.tokenizer(text)["input_ids"]
    assert body["count"] == len(body["tokens"]) and len(body["token_strs"]) == body["count"]
    assert body["max_model_len"] == 2048
    r = await client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": text}


async def test_choices_order_prompts_times_n(client):
    r = await client.post(
        "/v1/completions",
        json={"model": "tiny-llama", "prompt": ["a b c", "x y"], "n": 3, "max_tokens": 2, "temperature": 0},
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] == texts[2] and texts[3] == texts[4] == texts[5]  # greedy: n copies agree
    assert body["usage"]["completion_tokens"] == 12
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")


async def test_token_id_prompts_and_token_id_strings(client, tiny_llama):
    ids = tiny_llama.tokenizer("The capital of France is")["input_ids"]
    text_req = {"model": "tiny-llama", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    a = (await client.post("/v1/completions", json={**text_req, "prompt": "The capital of France is"})).json()
    b = (
        await client.post(
            "/v1/completions", json={**text_req, "prompt": [ids], "return_tokens_as_token_ids": True}
        )
    ).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    toks = b["choices"][0]["logprobs"]["tokens"]
    assert all(t.startswith("token_id:") for t in toks)
    assert [tiny_llama.tokenizer.decode([int(t[9:])]) for t in toks] == a["choices"][0]["logprobs"]["tokens"]
    for top in b["choices"][0]["logprobs"]["top_logprobs"]:
        assert all(k.startswith("token_id:") for k in top)


async def test_default_max_tokens_is_16_and_echo_without_logprobs(client):
    r = await client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "Hi there", "temperature": 0}
    )
    assert r.json()["usage"]["completion_tokens"] == 16
    r = await client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "Hi there", "echo": True, "max_tokens": 0}
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == "Hi there" and choice["logprobs"] is None


async def test_stream_usage_chunk(client):
    r = await client.post(
        "/v1/completions",
        json={
            "model": "tiny-llama",
            "prompt": "Hi",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert sum(1 for c in chunks if c["choices"]) == 3  # one chunk per token
    assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI: a null usage on every other chunk


async def test_stream_without_include_usage_has_no_usage_key(client):
    """OpenAI's chunks carry `usage` only when stream_options.include_usage asks for it; the other
    null fields (finish_reason before the last token, logprobs when not asked) stay in."""
    r = await client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 3, "stream": True}
    )
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert len(chunks) == 3 and not any("usage" in c for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["finish_reason"] is None and first["logprobs"] is None
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_debug_router_only_with_debug(client, engine):
    assert (await client.get("/debug/config")).status_code == 404


async def test_alternatives_that_are_parts_of_a_character_keep_keys_of_their_own(client):
    """Over HTTP: every position has its k alternatives besides the chosen token, which is found by
    its token; no alternative is keyed ''; chat's bytes are each label's own (tests/test_detok.py
    has the labels of partial characters, token by token)."""
    from server_shim.detok import label_bytes

    body = {"model": "tiny-llama", "prompt": "I love 🦀 ok", "max_tokens": 0, "echo": True, "logprobs": 3}
    lp = (await client.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == "I love 🦀 ok"  # pieces still concatenate to the text
    for token, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:], strict=True):
        assert token in top and len(top) >= 3, top  # the chosen token, and no alternative lost
        assert "" not in {k for k in top if k != token}
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "日本語 🦀"}], "max_tokens": 24,
            "temperature": 1.0, "seed": 11, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    content = (await client.post("/v1/chat/completions", json=chat)).json()["choices"][0]["logprobs"][
        "content"
    ]
    for entry in content:
        for alt in entry["top_logprobs"]:
            assert alt["bytes"] == label_bytes(alt["token"]) and (
                alt["bytes"] or alt["token"] == entry["token"]
            )
