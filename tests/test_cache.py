"""ResponseCache: round trip, canonical keys, resume after a dead server, offline replay."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fakes import FAKE_URL, FakeServer

from difftest.cache import ResponseCache, cache_key
from difftest.client import CompletionClient
from difftest.errors import CacheMiss, RequestRejected, ServerError

FP = {"name": "ref", "url": "http://a", "models": ["m"]}
REQ = {"model": "m", "prompt": "1+2=", "max_tokens": 4, "temperature": 0}
RESP = {"choices": [{"index": 0, "text": "3"}]}


def prompts(n: int) -> list[dict]:
    return [
        {"model": "fake-model", "prompt": f"prompt {i}:", "max_tokens": 3, "logprobs": 2} for i in range(n)
    ]


def test_round_trip_and_canonical_keys(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        assert cache.get(FP, REQ) is None
        cache.put(FP, REQ, RESP)
        assert cache.get(FP, REQ) == RESP
        # key order and 0 vs 0.0 do not make a new request
        assert cache.get(FP, dict(reversed(list(REQ.items()))) | {"temperature": 0.0}) == RESP
        assert cache.get(FP, REQ | {"max_tokens": 5}) is None
        assert cache.get(FP | {"version": "2"}, REQ) is None
        assert cache.stats() | {"path": ""} == {
            "path": "",
            "entries": 1,
            "servers": [],
            "hits": 2,
            "misses": 3,
            "puts": 1,
        }
    assert cache_key(FP, REQ) != cache_key(FP, REQ | {"seed": 1})


def test_only_successful_responses_are_stored(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(ValueError):
            cache.put(FP, REQ, {"error": {"message": "no"}})
        assert len(cache) == 0


def test_entries_survive_reopening(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        cache.put(FP, REQ, RESP)
        cache.remember_server("ref", FP)
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        assert cache.get(FP, REQ) == RESP
        assert cache.server_fingerprint("ref") == FP
        assert cache.server_fingerprint("other") is None


def test_thread_safe(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.sqlite") as cache:

        def work(i: int) -> bool:
            req = REQ | {"seed": i}
            cache.put(FP, req, {"choices": [{"text": str(i)}]})
            return cache.get(FP, req) == {"choices": [{"text": str(i)}]}

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(200)))
        assert len(cache) == 200


async def test_client_hits_skip_the_network(tmp_path: Path) -> None:
    server = FakeServer()
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        async with server.client(name="ref", cache=cache) as c:
            first = await c.completions(prompts(1)[0])
            again = await c.completions(prompts(1)[0])
            # + 4: the identity canary (difftest.identity), alone and batched, twice each, once
            # per cached client
            assert again == first and server.completions_served == 1 + 4
            await c.completions(prompts(1)[0], use_cache=False)
            assert server.completions_served == 2 + 4
            with pytest.raises(RequestRejected):
                await c.completions({"prompt": "x", "max_tokens": 1, "logprobs": 99})
            assert c.stats().cache_hits == 1
        assert len(cache) == 1  # the rejected request was not stored
        assert cache.server_fingerprint("ref")["models"] == ["fake-model"]


async def test_resume_after_a_dead_server_reuses_finished_answers(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    dying = FakeServer(die_after=6)  # the identity canary's 4 requests, then two prompts
    done = []
    with ResponseCache(path) as cache:
        async with dying.client(name="tgt", cache=cache, max_retries=1) as c:
            for req in prompts(3):
                try:
                    done.append(await c.completions(req))
                except ServerError:
                    break
    assert len(done) == 2
    fresh = FakeServer()  # the restarted server: same build, same answers
    with ResponseCache(path) as cache:
        async with fresh.client(name="tgt", cache=cache) as c:
            resumed = [await c.completions(req) for req in prompts(3)]
    assert resumed[:2] == done
    # only the canary's 4 and the 2 cached requests asked again (same answers: same server), and
    # the unfinished prompt went to the server
    assert fresh.completions_served == 4 + 2 + 1
    assert resumed[2]["choices"][0]["text"] == fresh.tokenizer.decode(fresh.expected_greedy("prompt 2:", 3))


async def test_cache_identity_replaces_a_changing_port(tmp_path: Path) -> None:
    server = FakeServer()
    spec = {"model": "tiny-llama", "quant": "fp8-block"}
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        for port in (8001, 8002):
            c = CompletionClient(f"http://127.0.0.1:{port}", name="tgt", transport=server.transport(),
                                 cache=cache, cache_identity=spec)  # fmt: skip
            await c.completions(prompts(1)[0])
            await c.aclose()
    # one prompt + the identity canary's 4 per client + the second's recheck of the cached prompt
    assert server.completions_served == 1 + 2 * 4 + 1


async def test_offline_replays_and_misses_clearly(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with ResponseCache(path) as cache:
        async with FakeServer().client(name="ref", cache=cache) as c:
            online = await c.completions(prompts(1)[0])
    with ResponseCache(path) as cache:
        async with CompletionClient(FAKE_URL, name="ref", cache=cache, offline=True) as c:
            assert await c.completions(prompts(1)[0]) == online
            with pytest.raises(CacheMiss, match="offline") as info:
                await c.completions(prompts(2)[1])
            assert info.value.exit_code == 2
            with pytest.raises(CacheMiss):
                await c.get_json("/v1/models")
            assert c.requests == 0
        async with CompletionClient(FAKE_URL, name="unknown", cache=cache, offline=True) as c:
            with pytest.raises(CacheMiss, match="no fingerprint"):
                await c.completions(prompts(1)[0])
    with pytest.raises(ValueError):
        CompletionClient(FAKE_URL, name="x", offline=True)


def test_cache_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # the worst case: sqlite alone would create 0666 (world-writable)
    try:
        with ResponseCache(tmp_path / "c.sqlite") as cache:
            cache.put(FP, REQ, RESP)
            files = sorted(tmp_path.glob("c.sqlite*"))
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    finally:
        os.umask(old)
    assert {"c.sqlite", "c.sqlite-wal"} <= set(modes)
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    (tmp_path / "d.sqlite").touch(mode=0o666)  # an existing file loses group/other write
    os.chmod(tmp_path / "d.sqlite", 0o666)
    ResponseCache(tmp_path / "d.sqlite").close()
    assert stat.S_IMODE((tmp_path / "d.sqlite").stat().st_mode) & 0o022 == 0


_WRITER = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from fakes import FakeServer
from difftest.cache import ResponseCache

async def main():
    with ResponseCache(sys.argv[1]) as cache:
        async with FakeServer().client(name="tgt", cache=cache) as client:
            for i in range(int(sys.argv[3])):
                req = {"prompt": f"prompt {i}:", "max_tokens": 3, "logprobs": 2}
                await client.completions(req)
                print(i, flush=True)  # after the commit
    await asyncio.sleep(3600)

asyncio.run(main())
"""


class _Counting(httpx.AsyncBaseTransport):
    """A fresh fake that notes the prompts of the writer's requests it is asked."""

    def __init__(self, asked: list[str]) -> None:
        self.asked, self._inner = asked, FakeServer().transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/completions":
            prompt = json.loads(await request.aread()).get("prompt")
            if isinstance(prompt, str) and prompt.startswith("prompt "):
                self.asked.append(prompt)
        return await self._inner.handle_async_request(request)


async def test_sigkill_mid_write_leaves_a_cache_that_resume_uses(tmp_path: Path) -> None:
    """A process killed while it writes answers: the cache opens, passes sqlite's integrity check,
    holds every answer the process reported as written, and a resume asks only for the rest."""
    # the writer would go on for minutes: however slow this machine, the kill lands mid-run
    path, total = tmp_path / "c.sqlite", 1_000_000
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(Path(__file__).parent), str(total)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        reported = [int(child.stdout.readline()) for _ in range(120)]  # type: ignore[union-attr]
        child.send_signal(signal.SIGKILL)  # mid-run: it keeps writing until the signal lands
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    with ResponseCache(path) as cache:
        kept = len(cache)
        assert kept >= reported[-1] + 1 and kept < total  # nothing reported lost; killed before the end
        resumed = kept + 30  # a resume of the first `resumed` requests: only the last 30 are missing
        asked: list[str] = []
        async with CompletionClient(FAKE_URL, name="tgt", cache=cache, transport=_Counting(asked)) as client:
            for i in range(resumed):
                await client.completions({"prompt": f"prompt {i}:", "max_tokens": 3, "logprobs": 2})
        # re-asked: only what was missing, after the identity canary and its recheck of 4 cached
        # requests (the longest and a sample of 3)
        assert len(asked) == 4 + 30
        assert set(asked[:4]) <= {f"prompt {i}:" for i in range(kept)}
        assert set(asked[4:]) == {f"prompt {i}:" for i in range(kept, resumed)}
        assert len(cache) == resumed
