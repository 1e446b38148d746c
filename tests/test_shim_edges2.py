"""Edge cases of the shim's HTTP edge: sizes checked before the work they bound, seeds honoured in
all their bits, nulls as defaults, and the headers 401 / 405 / 415 owe the client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from server_shim import serving_completion
from server_shim.app import create_app
from server_shim.engine import mix_seed
from server_shim.models import LoadedModel
from server_shim.options import ServeOptions

KEY = "sk-edges-2"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@contextlib.asynccontextmanager
async def shim(engine: Any, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The whole app (debug routes on) in process, with a key."""
    opts = ServeOptions(model="tiny-llama", api_key=KEY, debug=True, max_tokens_cap=100, **kw)
    transport = httpx.ASGITransport(app=create_app(engine, opts))
    async with httpx.AsyncClient(transport=transport, base_url="http://shim", headers=AUTH, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    return err


# ---------------------------------------------------------------- 1. prompt lists sized first


async def test_a_prompt_list_over_the_queue_is_refused_before_tokenizing(engine, monkeypatch) -> None:
    """The bug: 1.2M prompts were all tokenized (29 s, stalling everyone) before the queue check."""
    calls: list[int] = []
    real = serving_completion.prompt_ids
    monkeypatch.setattr(serving_completion, "prompt_ids", lambda p, tok: calls.append(1) or real(p, tok))
    async with shim(engine) as c:
        many = await c.post("/v1/completions", json={**GOOD, "prompt": ["a"] * 1000})
        ids = await c.post("/v1/completions", json={**GOOD, "prompt": [[1, 2]] * 300})
        ok = await c.post("/v1/completions", json={**GOOD, "prompt": ["a", "b"]})
    assert "queues at most" in _error(many, 400, "prompt")["message"]
    _error(ids, 400, "prompt")
    assert ok.status_code == 200 and calls == [1]  # only the good request was tokenized


async def test_a_prompt_list_is_capped_in_total_characters_like_chat(engine) -> None:
    async with shim(engine, max_prompt_chars=100) as c:
        total = await c.post("/v1/completions", json={**GOOD, "prompt": ["x" * 60, "y" * 60]})
        one = await c.post("/v1/completions", json={**GOOD, "prompt": ["x" * 101]})
        chat = await c.post(
            "/v1/chat/completions",
            json={**CHAT, "messages": [{"role": "user", "content": "x" * 60}] * 2},
        )
        fine = await c.post("/v1/completions", json={**GOOD, "prompt": ["x" * 50, "y" * 50]})
    err = _error(total, 400, "prompt")
    assert err["code"] == "prompt_too_long" and "120 characters in all" in err["message"]
    assert _error(one, 400, "prompt")["code"] == "prompt_too_long"
    assert _error(chat, 400, "messages")["code"] == "prompt_too_long"
    assert fine.status_code == 200


# ---------------------------------------------------------------- 2. seeds


def test_seeds_below_2_32_keep_their_stream_and_the_rest_are_mixed() -> None:
    for seed in (0, 1, 12345, 2**32 - 1):
        assert mix_seed(seed) == seed  # recorded baselines
    low32 = {mix_seed(s) & 0xFFFF_FFFF for s in (1, 2**32 + 1, 2**33 + 1, 2**62, 2**63 - 1, -1, -(2**63))}
    assert len(low32) == 7  # torch's CPU generator reads only the low 32 bits


async def test_seed_high_bits_change_the_samples_and_out_of_int64_is_400(engine) -> None:
    """The bug: seeds 1 and 2**32 + 1 drew the same samples; 2**64 and 10**4000 acted as seed 0."""
    req = {**GOOD, "max_tokens": 8, "temperature": 5.0, "ignore_eos": True, "logprobs": 0,
           "return_tokens_as_token_ids": True}  # fmt: skip

    async def tokens(c: httpx.AsyncClient, seed: int, n: int = 1) -> list[list[str]]:
        r = await c.post("/v1/completions", json={**req, "seed": seed, "n": n})
        assert r.status_code == 200, r.text
        return [ch["logprobs"]["tokens"] for ch in r.json()["choices"]]

    async with shim(engine) as c:
        one, one_again, high = await tokens(c, 1), await tokens(c, 1), await tokens(c, 2**32 + 1)
        pair, two = await tokens(c, 1, n=2), await tokens(c, 2)
        assert one == one_again and one != high
        assert pair == one + two  # choice j is seed + j, as before
        assert (await tokens(c, 2**63 - 1)) != (await tokens(c, -1))
        for bad in (2**63, 2**64, 10**4000, -(2**63) - 1):
            _error(await c.post("/v1/completions", json={**GOOD, "seed": bad}), 400, "seed")
            _error(await c.post("/v1/chat/completions", json={**CHAT, "seed": bad}), 400, "seed")


# ---------------------------------------------------------------- 3. /debug/module on an embedding


async def test_an_embedding_replay_is_sized_before_it_runs(engine, tiny_llama: LoadedModel) -> None:
    embed = tiny_llama.model.get_submodule("model.embed_tokens")
    runs: list[int] = []
    handle = embed.register_forward_hook(lambda *_: runs.append(1))
    big = st_save(
        {"input": torch.zeros(1, 4000, dtype=torch.int32)}, metadata={"module": "model.embed_tokens"}
    )
    small = st_save(
        {"input": torch.zeros(1, 4, dtype=torch.int32)}, metadata={"module": "model.embed_tokens"}
    )
    monkey = pytest.MonkeyPatch()
    monkey.setenv("DIFFTEST_DEBUG_MAX_BYTES", "1000000")  # 4000 ids x 128 x 4 = 2 MB
    try:
        async with shim(engine) as c:
            r = await c.post("/debug/module", content=big)
            assert runs == []  # refused before the embedding ran
            ok = await c.post("/debug/module", content=small)
    finally:
        handle.remove()
        monkey.undo()
    assert _error(r, 413, "input")["code"] == "response_too_large"
    assert ok.status_code == 200 and runs == [1]


# ---------------------------------------------------------------- 4. null is the default


NULLS = ["temperature", "top_p", "n", "frequency_penalty", "presence_penalty", "stream", "ignore_eos",
         "top_k", "seed", "stop", "max_tokens", "logprobs", "return_tokens_as_token_ids"]  # fmt: skip


async def test_null_for_an_optional_field_is_its_default(engine) -> None:
    async with shim(engine) as c:
        comp = await c.post("/v1/completions", json={**GOOD, **dict.fromkeys([*NULLS, "echo"])})
        chat = await c.post(
            "/v1/chat/completions", json={**CHAT, **dict.fromkeys([*NULLS, "add_generation_prompt"])}
        )
        tok = await c.post("/tokenize", json={"prompt": "hi", "add_special_tokens": None})
        required = await c.post("/v1/completions", json={**GOOD, "prompt": None})
        unknown = await c.post("/v1/completions", json={**GOOD, "nope": None})
        schema = (await c.get("/openapi.json")).json()["components"]["schemas"]
    assert comp.status_code == 200 and len(comp.json()["choices"]) == 1, comp.text  # n=1, not streamed
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion", chat.text
    assert tok.status_code == 200, tok.text
    _error(required, 400, "prompt")
    _error(unknown, 400, "nope")
    temperature = schema["CompletionRequest"]["properties"]["temperature"]
    assert {"type": "null"} in temperature["anyOf"] and temperature["default"] == 1.0
    assert "null" not in str(schema["CompletionRequest"]["properties"]["prompt"])


# ---------------------------------------------------------------- 5. debug layers [] and echoed names


async def test_empty_layers_is_400_and_echoed_names_are_clipped(engine) -> None:
    async with shim(engine) as c:
        empty = await c.post("/debug/activations", json={"tokens": [1, 2], "layers": []})
        quant = await c.get("/debug/quant/" + "m" * 60_000)
        glob = await c.post("/debug/activations", json={"tokens": [1, 2], "layers": ["q" * 100_000]})
        model = await c.post("/v1/completions", json={**GOOD, "model": "g" * 100_000})
    _error(empty, 400, "layers")
    for r, status, param in ((quant, 404, "module"), (glob, 400, "layers"), (model, 404, "model")):
        msg = _error(r, status, param)["message"]
        assert len(msg) < 500 and "…" in msg, msg[:300]


# ---------------------------------------------------------------- 6. 401 / 405 / 415 headers


async def test_405_lists_allow_and_401_names_bearer(engine) -> None:
    async with shim(engine) as c:
        health = await c.post("/health")
        completions = await c.get("/v1/completions")
        unauth = await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    _error(health, 405, None)
    assert health.headers["allow"] == "GET, HEAD"
    _error(completions, 405, None)
    assert completions.headers["allow"] == "POST"
    _error(unauth, 401, None)
    assert unauth.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/debug/module"])
async def test_a_compressed_body_is_415(engine, route: str) -> None:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with shim(engine) as c:
        r = await c.post(route, content=b"\x1f\x8b\x08\x00garbage", headers=headers)
        plain = await c.post(route, json=GOOD, headers={"Content-Encoding": "identity"})
    err = _error(r, 415, None)
    assert err["message"] == "Content-Encoding gzip is not supported; send the body uncompressed"
    assert plain.status_code != 415
