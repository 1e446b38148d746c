"""A chat run caches its answers like a completions run, so `--resume` reuses them.

The defect (tester T19): generations over /v1/chat/completions went around the cache, so a chat
run stored nothing, `--resume` asked every prompt again, and its note said "reused 0 cached
answers, asked 0" while every prompt had been asked.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from quirk_fakes import live_app, quirk_app
from test_runner import write_config

from difftest.cache import ResponseCache, route_of, stored_request
from difftest.cli import main
from difftest.client import CompletionClient
from difftest.identity import RECHECK_SAMPLE

CHAT = "/v1/chat/completions"


def _resume_notes(out: Path) -> list[str]:
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    return [w for w in warnings if "(--resume)" in w]


def test_a_chat_run_is_cached_and_its_resume_reuses_every_answer(tmp_path: Path) -> None:
    with live_app(quirk_app()) as ref, live_app(quirk_app()) as tgt:
        cfg = write_config(
            tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}], extra_run='endpoint = "chat"'
        )
        first = main(["run", str(cfg)])
        out = tmp_path / "out"
        with ResponseCache(out / "cache.sqlite") as cache:
            rows = [
                cache.entry(k) for fp in (cache.server_fingerprint("t"),) for k in cache.keys_of(fp or {})
            ]
        assert rows and all(route_of(r[0])[0] == CHAT for r in rows if r), "the chat answers were not cached"
        assert main(["run", str(cfg), "--resume"]) == first
    notes = _resume_notes(out)
    assert len(notes) == 2, notes
    # the canary (alone twice, in a batch twice) and the re-checks are asked and counted apart
    said = [
        re.search(r"reused (\d+) cached answers, asked 0 and (\d+) identity checks \(--resume\)$", n)
        for n in notes
    ]
    assert all(m and int(m[1]) == len(rows) and 4 <= int(m[2]) <= 4 + 2 + RECHECK_SAMPLE for m in said), notes


async def test_a_chat_request_has_a_key_of_its_own(tmp_path: Path) -> None:
    """The same body to two routes is two requests: the path is part of the key."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert stored_request(CHAT, body) != stored_request("/v1/completions", body)
    assert route_of(stored_request(CHAT, body)) == (CHAT, body)
    assert route_of(stored_request("/v1/completions", body)) == ("/v1/completions", body)
    with live_app(quirk_app()) as url, ResponseCache(tmp_path / "c.sqlite") as cache:
        async with CompletionClient(url, name="s", cache=cache) as c:
            chat = await c.choices(CHAT, body)
            again = await c.choices(CHAT, body)
        assert again == chat and c.stats().cache_hits == 1 and c.stats().cache_misses == 1
    db = sqlite3.connect(tmp_path / "c.sqlite")
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone() == (1,)
