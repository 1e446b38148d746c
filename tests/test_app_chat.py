"""/v1/chat/completions in process: the chat template, greedy = completions on the rendered prompt,
logprobs shaped like vLLM / OpenAI chat, streaming, strict validation, the fallback template."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import torch

from server_shim.app import create_app
from server_shim.engine import Engine
from server_shim.options import ServeOptions
from server_shim.serving_chat import FALLBACK_GENERATION_PROMPT, render_chat

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
GOOD = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}


@pytest.fixture
async def client(engine):
    app = create_app(engine, ServeOptions(model="tiny-llama"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shim", timeout=60
    ) as c:
        yield c


def _template_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


async def test_chat_is_completions_on_the_templated_prompt(client, tiny_llama):
    ids = _template_ids(tiny_llama.tokenizer, MESSAGES)
    assert tiny_llama.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    chat = await client.post("/v1/chat/completions", json=GOOD)
    comp = await client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": ids, "max_tokens": 6, "temperature": 0}
    )
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": comp.json()["choices"][0]["text"]}
    assert choice["finish_reason"] == comp.json()["choices"][0]["finish_reason"]
    assert choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}


async def test_chat_logprobs_shape_and_values(client, tiny_llama):
    r = await client.post("/v1/chat/completions", json={**GOOD, "logprobs": True, "top_logprobs": 3})
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    ids = _template_ids(tiny_llama.tokenizer, MESSAGES)
    r_ids = await client.post(
        "/v1/chat/completions", json={**GOOD, "logprobs": True, "return_tokens_as_token_ids": True}
    )
    gen = [
        int(e["token"].removeprefix("token_id:")) for e in r_ids.json()["choices"][0]["logprobs"]["content"]
    ]
    with torch.no_grad():
        logits = tiny_llama.model(torch.tensor([ids + gen])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(ids) - 1 : -1]
    for pos, entry in enumerate(content):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert abs(entry["logprob"] - lp[pos, gen[pos]].item()) < 1e-4
        assert len(entry["top_logprobs"]) == 3
        vals, _ = torch.topk(lp[pos], 3)
        got = [t["logprob"] for t in entry["top_logprobs"]]
        assert got == sorted(got, reverse=True)
        torch.testing.assert_close(torch.tensor(got), vals, atol=1e-4, rtol=0)
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
    assert "".join(e["token"] for e in content) == choice["message"]["content"]


async def test_chat_stream_joins_to_non_stream(client):
    full = (
        await client.post("/v1/chat/completions", json={**GOOD, "logprobs": True, "top_logprobs": 2})
    ).json()
    r = await client.post(
        "/v1/chat/completions",
        json={
            **GOOD,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body = [c for c in chunks[1:] if c["choices"]]
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in body) == full["choices"][0]["message"]["content"]
    )
    streamed_lp = [e for c in body for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed_lp == full["choices"][0]["logprobs"]["content"]
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI: a null usage on every other chunk
    plain = await client.post("/v1/chat/completions", json={**GOOD, "stream": True})
    plain_chunks = [json.loads(e[6:]) for e in plain.text.split("\n\n") if e.startswith("data: {")]
    # without include_usage no chunk has the key; the other nulls (finish_reason, logprobs) stay
    assert plain_chunks and not any("usage" in c for c in plain_chunks)
    assert (
        plain_chunks[1]["choices"][0]["finish_reason"] is None and "logprobs" in plain_chunks[1]["choices"][0]
    )


async def test_chat_sampling_seed_n_and_content_parts(client):
    body = {**GOOD, "temperature": 1.0, "seed": 7, "n": 2}
    a = (await client.post("/v1/chat/completions", json=body)).json()
    b = (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]
    # text parts are joined by newlines, as vLLM renders them (before: joined with nothing)
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                                      {"type": "text", "text": "of France?"}]}]  # fmt: skip
    joined = [MESSAGES[0], {"role": "user", "content": "What is the capital\nof France?"}]
    p = (await client.post("/v1/chat/completions", json={**GOOD, "messages": parts})).json()
    plain = (await client.post("/v1/chat/completions", json={**GOOD, "messages": joined})).json()
    assert p["choices"][0]["message"] == plain["choices"][0]["message"] and p["usage"] == plain["usage"]


async def test_chat_default_max_tokens_is_the_rest_of_the_context(engine):
    """No max_tokens: generation may run to the context end (OpenAI's default), within the cap."""
    app = create_app(engine, ServeOptions(model="tiny-llama", max_tokens_cap=9))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shim", timeout=60
    ) as c:
        r = await c.post("/v1/chat/completions", json={**GOOD, "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 9


BAD = [
    ("no messages", {**GOOD, "messages": []}, "messages"),
    ("tool role", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("message name", {**GOOD, "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages"),
    ("image part", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ("tools", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool_choice", {**GOOD, "tool_choice": "auto"}, "tool_choice"),
    ("response_format json", {**GOOD, "response_format": {"type": "json_object"}}, "response_format"),
    ("top_logprobs without logprobs", {**GOOD, "top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs 21", {**GOOD, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("logprobs int", {**GOOD, "logprobs": 5}, "logprobs"),
    ("frequency_penalty", {**GOOD, "frequency_penalty": 1.0}, "frequency_penalty"),
    ("both max tokens", {**GOOD, "max_completion_tokens": 3}, "max_completion_tokens"),
    ("max_tokens over cap", {**GOOD, "max_tokens": 5000}, "max_tokens"),
    ("unknown param", {**GOOD, "functions": []}, "functions"),
    ("echo is completions only", {**GOOD, "echo": True}, "echo"),
    ("too many stops", {**GOOD, "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("unknown model", {**GOOD, "model": "gpt-9"}, "model"),
    ("over context", {**GOOD, "messages": [{"role": "user", "content": "hello " * 2100}]}, "messages"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_chat_request_is_4xx_naming_the_parameter(client, body, param):
    r = await client.post("/v1/chat/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param
    assert (await client.post("/v1/chat/completions", json=GOOD)).status_code == 200


async def test_parallel_tool_calls_without_tools_is_accepted(client):
    """OpenAI's SDK sends `parallel_tool_calls: true` by default; without tools it cannot change an
    answer, so it was a needless 400. With tools the request is still refused (naming `tools`)."""
    plain = await client.post("/v1/chat/completions", json=GOOD)
    r = await client.post("/v1/chat/completions", json={**GOOD, "parallel_tool_calls": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain.json()["choices"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = await client.post("/v1/chat/completions", json={**GOOD, "parallel_tool_calls": True, "tools": tools})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_fallback_template_without_a_chat_template(tiny_llama):
    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.chat_template = None
    ids = render_chat(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(ids) == "user: Hi\n" + FALLBACK_GENERATION_PROMPT
    assert (
        render_chat(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=False)
        == tok("user: Hi\n")["input_ids"]
    )


async def test_chat_with_fallback_template_serves(tiny_llama):
    from server_shim.models import LoadedModel

    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.chat_template = None
    loaded = LoadedModel(**{**tiny_llama.__dict__, "tokenizer": tok})
    eng = Engine(loaded)
    try:
        app = create_app(eng, ServeOptions(model="tiny-llama"))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://s", timeout=60
        ) as c:
            r = await c.post("/v1/chat/completions", json=GOOD)
            comp = await c.post(
                "/v1/completions",
                json={"model": "tiny-llama", "prompt": "system: You are terse.\nuser: What is the capital of "
                      "France?\nassistant:", "max_tokens": 6, "temperature": 0},
            )  # fmt: skip
    finally:
        eng.close()
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == comp.json()["choices"][0]["text"]


async def test_official_openai_client_parses_chat_with_logprobs_and_stream(engine):
    openai = pytest.importorskip("openai")
    app = create_app(engine, ServeOptions(model="tiny-llama", api_key="sk-chat"))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shim/v1", timeout=60)
    client = openai.AsyncOpenAI(base_url="http://shim/v1", api_key="sk-chat", http_client=http, max_retries=0)
    async with http:
        out = await client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
        )
        stream = await client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 5 and all(
        len(e.top_logprobs) == 2 for e in choice.logprobs.content
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


@pytest.mark.parametrize(
    ("part", "said"),
    [
        ({"type": "text", "text": "a", "extra": 1}, "unsupported parameter `messages.0.content.0.extra`"),
        ({"type": "text"}, "`messages.0.content.0.text` is required"),
    ],
)
async def test_a_bad_content_part_is_named_not_the_string_branch(client, part, said):
    """The bug: a bad part was reported as "`messages.0.content.str`: Input should be a valid string"
    (the union's first branch), not what is wrong with the part."""
    r = await client.post(
        "/v1/chat/completions", json={**GOOD, "messages": [{"role": "user", "content": [part]}]}
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == said


async def test_chat_stream_opens_each_choice_in_its_own_chunk(client):
    """OpenAI and vLLM send one role chunk per choice; one chunk holding all n roles left a client
    that reads choices[0] without the role of every other choice."""
    r = await client.post(
        "/v1/chat/completions", json={**GOOD, "n": 3, "stream": True, "temperature": 1.0, "seed": 1}
    )
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    opening = [c["choices"] for c in chunks[:3]]
    assert opening == [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}] for i in range(3)]  # fmt: skip
    assert not any(ch["delta"].get("role") for c in chunks[3:] for ch in c["choices"])
