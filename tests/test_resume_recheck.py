"""`--resume` re-asks a few cached requests before the canary may vouch for the rest.

The defect (tester T19): the identity canary (a short prompt, 8 generated tokens) vouched for
every cached answer, 32-token generations and long teacher-forced echoes included. A server
restarted with a shorter context, or rebuilt with a bug that acts only past the canary's reach,
answered the canary as before, and `--resume` judged it on its stale answers: exit 0 where a fresh
run exits 3 or 1. Now the longest cached echo, the longest cached generation and a seeded sample
are asked again and must answer as cached (the canary's rule), or nothing cached is reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FAKE_URL, FakeServer

from difftest.cache import ResponseCache
from difftest.client import CompletionClient
from difftest.errors import RequestRejected
from difftest.identity import (
    CANARY_PROMPT,
    CANARY_TOKENS,
    CachedRequest,
    answer_difference,
    canary_batch_prompts,
    pick_rechecks,
    reach,
)

STORY = "A long story about " + "the quick brown fox and the lazy dog " * 3
LONG = {"prompt": STORY, "max_tokens": 20, "temperature": 0, "logprobs": 2}
SHORT = [{"prompt": f"p{i}", "max_tokens": 3, "temperature": 0, "logprobs": 2} for i in range(8)]
DRIFT_FROM = 60  # past every position the canary reaches in the fake's tokens (checked below)


def echo_request(server: FakeServer) -> dict[str, Any]:
    ids = server.tokenizer.encode(STORY + " and so on, and so forth")
    return {"prompt": ids, "max_tokens": 0, "echo": True, "temperature": 0, "logprobs": 2}


class Drifted(httpx.AsyncBaseTransport):
    """A FakeServer that records every completions body, and (with `shift`) moves the logprobs of
    every position at or past `DRIFT_FROM` by `shift` nats: a rebuilt server whose bug acts only
    from there on (a KV block boundary, a sliding window), as T19's repro B."""

    def __init__(self, server: FakeServer, shift: float = 0.0) -> None:
        self.server, self.inner, self.shift = server, server.transport(), shift
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/completions":
            return await self.inner.handle_async_request(request)
        body = json.loads(await request.aread())
        self.bodies.append(body)
        response = await self.inner.handle_async_request(request)
        data = json.loads(await response.aread())
        prompts = (
            body["prompt"]
            if isinstance(body["prompt"], list) and not _ids(body["prompt"])
            else [body["prompt"]]
        )
        for choice in data.get("choices", []):
            start = 0 if body.get("echo") else len(self.server._ids(prompts[choice["index"]]))
            block = choice.get("logprobs") or {}
            block["token_logprobs"] = [
                v if v is None or start + i < DRIFT_FROM else v + self.shift
                for i, v in enumerate(block.get("token_logprobs", []))
            ]
        return httpx.Response(response.status_code, json=data)

    @property
    def completions(self) -> int:
        return len(self.bodies)


def _ids(prompt: list) -> bool:
    return all(isinstance(t, int) for t in prompt)


async def _resume(path: Path, transport: httpx.AsyncBaseTransport, requests: list[dict]) -> tuple[list, Any]:
    """Each request through a fresh cached client (a run, or a resume): the answers (or the
    exception raised) and the client."""
    out: list[Any] = []
    with ResponseCache(path) as cache:
        async with CompletionClient(FAKE_URL, name="tgt", cache=cache, transport=transport) as c:
            for req in requests:
                try:
                    out.append(await c.completions(req))
                except RequestRejected as exc:
                    out.append(exc)
    return out, c


def test_the_drift_starts_past_the_canarys_reach() -> None:
    tokens = FakeServer().tokenizer.encode
    assert len(tokens(CANARY_PROMPT)) + CANARY_TOKENS < DRIFT_FROM  # the canary alone and its copies
    assert max(len(tokens(p)) for p in canary_batch_prompts()) + CANARY_TOKENS < DRIFT_FROM
    assert len(tokens(STORY)) + LONG["max_tokens"] > DRIFT_FROM  # the cached request reaches it


async def test_a_server_changed_past_the_canarys_reach_is_re_asked(tmp_path: Path) -> None:
    """T19 repro B: old code reused every cached answer (4 requests: the canary's)."""
    path, echo = tmp_path / "c.sqlite", echo_request(FakeServer())
    requests = [LONG, echo, *SHORT]
    cached, _ = await _resume(path, Drifted(FakeServer()), requests)
    rebuilt = Drifted(FakeServer(), shift=0.01)
    resumed, c = await _resume(path, rebuilt, requests)
    fresh, _ = await _resume(tmp_path / "fresh.sqlite", Drifted(FakeServer(), shift=0.01), requests)
    choices = [[a["choices"] for a in answers[:2]] for answers in (cached, resumed, fresh)]
    assert choices[1] != choices[0] and choices[1] == choices[2], "a stale answer was reused"
    assert c.stats().cache_hits == 0 and c.stats().cache_misses == len(requests)
    note = c.identity_note or ""
    assert "server changed since the cached run" in note and "no cached answer is reused" in note
    assert "echo request now answers differently: the logprob at position 60 moved" in note, note


async def test_a_shorter_context_is_caught_by_the_longest_cached_request(tmp_path: Path) -> None:
    """T19 repro A: the server restarted with a context cap the canary fits under."""
    path = tmp_path / "c.sqlite"
    cached, _ = await _resume(path, Drifted(FakeServer()), [LONG, *SHORT])
    assert all(isinstance(a, dict) for a in cached)
    capped = FakeServer(max_model_len=DRIFT_FROM)  # the canary and its batch fit, LONG does not
    resumed, c = await _resume(path, Drifted(capped), [LONG, *SHORT])
    assert isinstance(resumed[0], RequestRejected), "the cached answer was reused"
    reach_of_long = len(capped.tokenizer.encode(STORY)) + LONG["max_tokens"]
    assert f"a cached {reach_of_long}-token generation request now answers HTTP 400" in (
        c.identity_note or ""
    )


async def test_an_unchanged_server_reuses_every_cached_answer(tmp_path: Path) -> None:
    """The cost of the recheck: the canary's 4 requests and 5 cached ones asked again, nothing
    else; the longest echo and generation among them."""
    path, echo = tmp_path / "c.sqlite", echo_request(FakeServer())
    requests = [LONG, echo, *SHORT]
    cached, _ = await _resume(path, Drifted(FakeServer()), requests)
    same = Drifted(FakeServer())
    resumed, c = await _resume(path, same, requests)
    assert resumed == cached and c.identity_note is None
    assert c.stats().cache_hits == len(requests) and c.stats().cache_misses == 0
    assert same.completions == 4 + 5
    assert LONG in same.bodies and echo in same.bodies


async def test_the_answers_asked_after_a_change_are_reused_by_the_next_resume(tmp_path: Path) -> None:
    """A deterministic server's canary is the same bytes after the change: the answers asked
    again get keys of their own (else the stale ones were found), and the next resume finds them."""
    path = tmp_path / "c.sqlite"
    await _resume(path, Drifted(FakeServer()), [LONG])
    asked, _ = await _resume(path, Drifted(FakeServer(), shift=0.01), [LONG])
    again = Drifted(FakeServer(), shift=0.01)
    resumed, c = await _resume(path, again, [LONG])
    assert resumed == asked and c.stats().cache_hits == 1 and c.identity_note is None
    assert again.completions == 4 + 1  # the canary, and LONG asked again to check


def test_pick_rechecks_takes_the_longest_echo_and_generation_and_a_seeded_sample() -> None:
    cached = [CachedRequest(f"k{i:02}", reach=i, echo=i % 3 == 0) for i in range(20)]
    picked = pick_rechecks(cached)
    assert picked[:2] == [cached[18], cached[19]] and len(picked) == 5 and len(set(picked)) == 5
    assert pick_rechecks(list(reversed(cached))) == picked  # repeatable: the same cache, the same asks
    assert pick_rechecks(cached[:2]) == [cached[0], cached[1]]
    assert pick_rechecks([]) == []


def test_reach_counts_prompt_tokens_and_max_tokens() -> None:
    usage = {"usage": {"prompt_tokens": 40}}
    assert reach({"prompt": "x" * 400, "max_tokens": 32}, usage) == 72  # the server's count first
    assert reach({"prompt": list(range(50)), "max_tokens": 0, "echo": True}, {}) == 50
    assert reach({"prompt": "x" * 40, "max_tokens": 2}, {}) == 12  # characters / 4
    assert reach({"prompt": ["ab", "x" * 80], "max_tokens": 1}, usage) == 21  # the longest of a list
    assert reach({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, usage) == 45


def _answer(tokens: list[str], logprobs: list[float | None]) -> dict[str, Any]:
    block = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": [None for _ in tokens]}
    return {"choices": [{"index": 0, "text": "".join(tokens), "logprobs": block}]}


@pytest.mark.parametrize(
    ("new", "said"),
    [
        (_answer(["a", "b", "c"], [None, -1.0, -2.0]), None),
        (_answer(["a", "b", "c"], [None, -1.0, -2.00005]), None),  # within the tolerance
        (_answer(["a", "x", "c"], [None, -1.0, -2.0]), "tokens differ at position 1 ('b' cached, 'x' now)"),
        (_answer(["a", "b", "c"], [None, -1.0, -2.5]), "the logprob at position 2 moved"),
        (_answer(["a", "b"], [None, -1.0]), "2 tokens where 3 were cached"),
        ({"choices": []}, "0 choices where 1 were cached"),
    ],
)
def test_answer_difference_says_where(new: dict, said: str | None) -> None:
    old = _answer(["a", "b", "c"], [None, -1.0, -2.0])
    why = answer_difference(old, new, tolerance=1e-4)
    assert why is None if said is None else said in (why or ""), why
