"""Engine numerics through the HTTP app (in process): greedy = HF generate, logprobs = log_softmax of
the model's logits, echo = teacher forcing, batching vs serial, streaming = non-streaming, seeds."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from server_shim.app import create_app
from server_shim.engine import Engine, SamplingParams
from server_shim.options import ServeOptions

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "héllo 日本 wörld",
    "1, 2, 3, 4,",
    "The quick brown fox jumps over",
    "In 1492, Columbus",
    "Q: What is two plus two?\nA:",
]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(tiny_llama)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def exact_engine(tiny_llama):
    eng = Engine(tiny_llama, batch_invariant=True)
    yield eng
    eng.close()


def _client(engine: Engine) -> httpx.AsyncClient:
    app = create_app(engine, ServeOptions(model="tiny-llama"))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shim", timeout=60)


async def _complete(client: httpx.AsyncClient, **body) -> dict:
    r = await client.post("/v1/completions", json={"model": "tiny-llama", **body})
    assert r.status_code == 200, r.text
    return r.json()


def _ids(choice: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [L, V]


async def test_greedy_equals_hf_generate(engine, tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    async with _client(engine) as client:
        for prompt in PROMPTS[:4]:
            out = await _complete(
                client,
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                logprobs=0,
                return_tokens_as_token_ids=True,
            )
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                ref = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
                )
            assert _ids(out["choices"][0]) == ref[0, ids.shape[1] :].tolist()
            assert out["choices"][0]["text"] == tok.decode(ref[0, ids.shape[1] :])
            assert out["usage"] == {
                "completion_tokens": 12,
                "prompt_tokens": ids.shape[1],
                "total_tokens": 12 + ids.shape[1],
            }


async def test_logprobs_equal_log_softmax_of_logits(engine, tiny_llama):
    tok = tiny_llama.tokenizer
    async with _client(engine) as client:
        out = await _complete(
            client,
            prompt=PROMPTS[1],
            max_tokens=8,
            temperature=0,
            logprobs=5,
            return_tokens_as_token_ids=True,
        )
    choice = out["choices"][0]
    prompt_ids = tok(PROMPTS[1])["input_ids"]
    gen = _ids(choice)
    lp = torch.log_softmax(_logits(tiny_llama.model, prompt_ids + gen), dim=-1)[
        len(prompt_ids) - 1 : -1
    ]  # [8, V]
    want = lp.gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1)
    got = torch.tensor(choice["logprobs"]["token_logprobs"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for pos, top in enumerate(choice["logprobs"]["top_logprobs"]):
        vals, idx = torch.topk(lp[pos], 5)
        assert [f"token_id:{i}" for i in idx.tolist()] == [
            k for k in top if k in {f"token_id:{i}" for i in idx.tolist()}
        ]
        for i, v in zip(idx.tolist(), vals.tolist(), strict=True):
            assert abs(top[f"token_id:{i}"] - v) < 1e-4
        assert (
            top[f"token_id:{gen[pos]}"] == choice["logprobs"]["token_logprobs"][pos]
        )  # chosen always present


async def test_echo_logprobs_equal_teacher_forced_logits(engine, tiny_llama):
    tok = tiny_llama.tokenizer
    ids = tok(PROMPTS[3] + " and more text")["input_ids"]
    async with _client(engine) as client:
        out = await _complete(
            client, prompt=ids, max_tokens=0, echo=True, logprobs=3, return_tokens_as_token_ids=True
        )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"] == tok.decode(ids)
    assert _ids(choice) == ids
    lps = choice["logprobs"]["token_logprobs"]
    assert lps[0] is None and choice["logprobs"]["top_logprobs"][0] is None
    lp = torch.log_softmax(_logits(tiny_llama.model, ids), dim=-1)[:-1]
    want = lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(lps[1:]), want, atol=1e-4, rtol=0)
    assert out["usage"]["completion_tokens"] == 0


async def test_token_strings_concatenate_to_text(engine, tiny_llama):
    """Multi-byte characters split over byte-level BPE tokens: pieces must still join to the text and
    text_offset must index into it."""
    async with _client(engine) as client:
        out = await _complete(client, prompt=PROMPTS[3], max_tokens=6, temperature=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert choice["text"].startswith(PROMPTS[3])
    for off, token in zip(lp["text_offset"], lp["tokens"], strict=True):
        assert choice["text"][off : off + len(token)] == token


async def _eight(client: httpx.AsyncClient) -> list[dict]:
    async def one(p: str) -> dict:
        return await _complete(
            client, prompt=p, max_tokens=10, temperature=0, logprobs=2, return_tokens_as_token_ids=True
        )

    return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


@pytest.mark.parametrize("exact", [True, False], ids=["batch-invariant", "batched"])
async def test_concurrent_equal_serial(exact, engine, exact_engine):
    eng = exact_engine if exact else engine
    async with _client(eng) as client:
        serial = [
            await _complete(
                client, prompt=p, max_tokens=10, temperature=0, logprobs=2, return_tokens_as_token_ids=True
            )
            for p in PROMPTS
        ]
        together = await _eight(client)
    worst = 0.0
    for a, b in zip(serial, together, strict=True):
        ca, cb = a["choices"][0], b["choices"][0]
        assert _ids(ca) == _ids(cb)
        if exact:
            assert ca["logprobs"] == cb["logprobs"]  # bit-exact
        diffs = [
            abs(x - y)
            for x, y in zip(ca["logprobs"]["token_logprobs"], cb["logprobs"]["token_logprobs"], strict=True)
        ]
        worst = max(worst, *diffs)
    print(
        f"largest logprob difference, 8 concurrent vs serial ({'batch-invariant' if exact else 'batched'}): {worst:.3g}"
    )
    assert worst < 1e-4


@pytest.mark.parametrize(
    "extra",
    [{}, {"echo": True, "logprobs": 2}, {"stop": ["zzz"]}, {"n": 2, "temperature": 0.9, "seed": 7}],
    ids=["plain", "echo", "stop-never", "n2-seeded"],
)
async def test_stream_joins_to_non_stream(extra, engine):
    body = {"prompt": [PROMPTS[0], PROMPTS[2]], "max_tokens": 9, "temperature": 0, **extra}
    async with _client(engine) as client:
        full = await _complete(client, **body)
        r = await client.post("/v1/completions", json={"model": "tiny-llama", "stream": True, **body})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    tokens: dict[int, list] = {}
    reasons: dict[int, str] = {}
    for ev in events[:-1]:
        for c in json.loads(ev)["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["logprobs"]:
                tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"])
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in full["choices"]}
    if "logprobs" in extra:
        assert tokens == {c["index"]: c["logprobs"]["tokens"] for c in full["choices"]}


async def test_stop_string_truncates(engine):
    async with _client(engine) as client:
        free = await _complete(client, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        text = free["choices"][0]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        out = await _complete(
            client, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "never-there"]
        )
        streamed = await client.post(
            "/v1/completions",
            json={
                "model": "tiny-llama",
                "prompt": PROMPTS[0],
                "max_tokens": 12,
                "temperature": 0,
                "stop": stop,
                "stream": True,
            },
        )
    choice = out["choices"][0]
    assert choice["text"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop"
    chunks = [
        json.loads(e.removeprefix("data: ")) for e in streamed.text.split("\n\n") if e and "[DONE]" not in e
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


async def test_seeded_sampling_is_reproducible(engine, exact_engine):
    body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": 1234}
    async with _client(engine) as client:
        a = await _complete(client, **body)
        b = await _complete(client, **body)
        other = await _complete(client, **{**body, "seed": 4321})
        two = await _complete(client, **{**body, "n": 2})
    async with _client(exact_engine) as client:
        c = await _complete(client, **body)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == c["choices"][0]["text"]
    assert other["choices"][0]["text"] != a["choices"][0]["text"]
    assert two["choices"][0]["text"] == a["choices"][0]["text"]  # choice 0 of n uses the seed itself
    assert two["choices"][1]["text"] != two["choices"][0]["text"]


async def test_tiny_top_p_and_top_k_1_are_greedy(engine):
    async with _client(engine) as client:
        greedy = await _complete(client, prompt=PROMPTS[4], max_tokens=8, temperature=0)
        nucleus = await _complete(client, prompt=PROMPTS[4], max_tokens=8, temperature=1.5, top_p=1e-6)
        topk = await _complete(client, prompt=PROMPTS[4], max_tokens=8, temperature=1.5, top_k=1)
    assert nucleus["choices"][0]["text"] == greedy["choices"][0]["text"] == topk["choices"][0]["text"]


def test_sample_top_p_keeps_the_nucleus():
    """probs 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8); token 2 and 3 never drawn."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = {Engine._sample(logits, SamplingParams(temperature=1.0, top_p=0.75), gen) for _ in range(200)}
    assert draws == {0, 1}


async def test_run_exclusive_runs_between_batches(engine):
    import threading

    assert await engine.run_exclusive(lambda: threading.current_thread().name) == "model-worker"
    with pytest.raises(ZeroDivisionError):
        await engine.run_exclusive(lambda: 1 / 0)
    async with _client(engine) as client:  # still serving
        assert (await _complete(client, prompt="hi", max_tokens=2))["choices"][0]["finish_reason"] == "length"


async def test_an_exclusive_job_cancelled_while_queued_never_runs(engine: Engine) -> None:
    """A debug client that hangs up takes its queued job with it: the model thread skips it (while
    the thread is busy, a cancelled `run_exclusive` leaves the queue) and runs the next one."""
    import threading

    release, started, ran = threading.Event(), threading.Event(), []

    def blocker() -> str:
        started.set()
        release.wait(30)
        return "first"

    first = asyncio.create_task(engine.run_exclusive(blocker))
    while not started.is_set():  # the model thread is inside the first job
        await asyncio.sleep(0.01)
    second = asyncio.create_task(engine.run_exclusive(lambda: ran.append("second")))
    await asyncio.sleep(0.05)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    release.set()
    assert await first == "first"
    assert await engine.run_exclusive(lambda: ran.append("third") or "third") == "third"
    assert ran == ["third"]  # the cancelled job never ran
