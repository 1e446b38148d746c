"""`--resume` trusts stored answers only for the same server, and says what it reused.

The defects these tests hold down (tester A, 2026-12-07): a server whose change shows only in
batches (the shim's `slot-variant`) resumed on its old answers, since the identity canary ran
alone at slot 0 and forgave 0.05 nats; a damaged cache.sqlite, an unwritable output folder and two
runs into one folder crashed or raced; and no report said what a resume reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FAKE_URL, FakeServer
from live_fakes import live_fake
from test_runner import write_config

from difftest.cache import ResponseCache
from difftest.cli import main
from difftest.cli import options as cli_options
from difftest.client import CompletionClient
from difftest.errors import UnreadableCache, UsageError
from difftest.identity import (
    CANARY_BATCH,
    CANARY_SLOTS,
    TOLERANCE_FLOOR,
    canary_batch_prompts,
    jitter,
    tolerance_for,
)
from difftest.runner import folder_lock

REQ = {"prompt": "the lazy dog", "max_tokens": 6, "temperature": 0, "logprobs": 2}


class Shifted(httpx.AsyncBaseTransport):
    """A FakeServer whose logprobs move by `alone` nats in requests of one prompt and by `batched`
    nats in batch slots >= `from_slot` of prompt lists (the shim's slot-variant acts from slot 1 on,
    slot-tile from slot 16 on; a subtle one moves logprobs by less than the old 0.05-nat tolerance);
    `refuse_lists` answers a prompt list with HTTP 400."""

    def __init__(
        self,
        server: FakeServer,
        *,
        alone: float = 0.0,
        batched: float = 0.0,
        from_slot: int = 1,
        refuse_lists: bool = False,
    ) -> None:
        self.server, self.inner = server, server.transport()
        self.alone, self.batched, self.from_slot, self.refuse_lists = alone, batched, from_slot, refuse_lists
        self.completions = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/completions":
            return await self.inner.handle_async_request(request)
        self.completions += 1
        body = json.loads(await request.aread())
        listed = isinstance(body.get("prompt"), list)
        if listed and self.refuse_lists:
            error = {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}}
            return httpx.Response(400, json=error)
        response = await self.inner.handle_async_request(request)
        data = json.loads(await response.aread())
        for choice in data.get("choices", []):
            shift = self.alone if not listed else self.batched if choice["index"] >= self.from_slot else 0.0
            block = choice.get("logprobs") or {}
            block["token_logprobs"] = [v if v is None else v + shift for v in block.get("token_logprobs", [])]
            block["top_logprobs"] = [
                t if t is None else {k: v + shift for k, v in t.items()}
                for t in block.get("top_logprobs", [])
            ]
        return httpx.Response(response.status_code, json=data)


async def _ask(path: Path, transport: httpx.AsyncBaseTransport) -> tuple[dict, Any]:
    """One cached request through a fresh client (a resume); the answer and the client."""
    with ResponseCache(path) as cache:
        client = CompletionClient(
            FAKE_URL, name="tgt", cache=cache, transport=transport, backoff_base_s=0.001
        )
        async with client as c:
            return await c.completions(REQ), c


# ---------------------------------------------------------------- defect 1: the canary


def test_the_batched_canary_puts_fillers_where_a_wrong_slot_reads() -> None:
    prompts = canary_batch_prompts()
    canary = prompts[CANARY_SLOTS[0]]
    assert len(prompts) == CANARY_BATCH and [i for i, p in enumerate(prompts) if p == canary] == list(
        CANARY_SLOTS
    )
    for slot in CANARY_SLOTS:  # slot-variant reads slot 0; a missing tile offset reads slot mod 8 / 16
        assert all(prompts[s] != canary for s in (0, slot % 16, slot % 8) if s != slot)
    assert max(CANARY_SLOTS) >= 16  # past the first 16-row M tile


async def test_a_change_seen_only_in_batches_is_re_asked(tmp_path: Path) -> None:
    """The bug: slot-variant moved only batched answers, the canary ran alone; the resume reused
    every stored answer. 0.006 nats at slots >= 1: below the old 0.05-nat tolerance too."""
    for from_slot, where in ((1, "batch slot 1"), (16, "batch slot 18")):  # slot-variant, slot-tile
        path = tmp_path / f"c{from_slot}.sqlite"
        before, _ = await _ask(path, Shifted(FakeServer()))
        clean = Shifted(FakeServer())
        again, c = await _ask(path, clean)
        # the canary's 4, and the cached request asked again (difftest.identity: the recheck)
        assert again == before and clean.completions == 4 + 1 and c.identity_note is None
        faulty = Shifted(FakeServer(), batched=0.006, from_slot=from_slot)
        _, c = await _ask(path, faulty)
        assert faulty.completions == 4 + 1, "the stored answer was reused"
        assert f"canary answered differently at {where} of {CANARY_BATCH}" in (c.identity_note or "")


async def test_a_move_far_below_the_old_tolerance_is_re_asked(tmp_path: Path) -> None:
    """A deterministic server has no jitter: 0.006 nats alone is a change, not noise."""
    path = tmp_path / "c.sqlite"
    await _ask(path, Shifted(FakeServer()))
    moved = Shifted(FakeServer(), alone=0.006)
    _, c = await _ask(path, moved)
    assert moved.completions == 4 + 1
    assert "behaviour (canary prompt answered differently)" in (c.identity_note or "")


class Jittery(Shifted):
    """Every answer's logprobs moved by `base` + `step` x (request number mod 2): a server whose
    identical requests differ by `step` (a batched GPU server's jitter)."""

    def __init__(self, server: FakeServer, *, base: float, step: float) -> None:
        super().__init__(server)
        self.base, self.step = base, step

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.alone = self.batched = self.base + self.step * (self.completions % 2)
        self.from_slot = 0
        return await super().handle_async_request(request)


async def test_the_tolerance_is_calibrated_by_the_jitter_measured(tmp_path: Path) -> None:
    step = 1e-3  # alone asked at requests 0 and 2, batched at 1 and 3: the two batches differ by step
    path = tmp_path / "c.sqlite"
    await _ask(path, Jittery(FakeServer(), base=0.0, step=step))
    within = Jittery(FakeServer(), base=2 * step, step=step)  # 2 x jitter < 4 x jitter: the same
    _, c = await _ask(path, within)
    assert within.completions == 4 + 1 and c.identity_note is None  # + the recheck
    beyond = Jittery(FakeServer(), base=5 * step, step=step)
    await _ask(path, beyond)
    assert beyond.completions == 4 + 1


def test_jitter_and_tolerance() -> None:
    a = {"text": "x", "tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [{"x": -1.0, "y": -2.0}]}
    b = a | {"token_logprobs": [-1.001], "top_logprobs": [{"x": -1.001, "y": -2.003}]}
    assert jitter(a, a) == 0.0 and jitter(a, b) == pytest.approx(0.003)
    assert jitter(a, a | {"tokens": ["z"]}) == 0.05  # other tokens: as noisy as ever forgiven
    assert tolerance_for(0.0) == TOLERANCE_FLOOR and tolerance_for(0.0, None) == TOLERANCE_FLOOR
    assert tolerance_for(1e-3, 2e-3) == pytest.approx(8e-3) and tolerance_for(1.0) == 0.05


async def test_a_server_refusing_prompt_lists_reuses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    await _ask(path, Shifted(FakeServer(), refuse_lists=True))
    again = Shifted(FakeServer(), refuse_lists=True)
    _, c = await _ask(path, again)
    assert again.completions == 2 + 1  # the canary alone, the refused batch, the request itself
    assert "could not be sent in a batch" in (c.identity_note or "")
    assert "cannot vouch for batched answers" in (c.identity_note or "")


async def test_a_cache_from_before_the_batched_canary_is_re_asked_once(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    answer, _ = await _ask(path, Shifted(FakeServer()))
    with ResponseCache(path) as cache:  # what the old code stored: no batched canary, no history
        old = cache.server_fingerprint("tgt")
        assert old is not None
        old.pop("behaviour_batched"), old.pop("canary_jitter")
        cache._db.execute("DELETE FROM responses")
        cache.put(old, REQ, answer)
        cache.remember_server("tgt", old)
        cache._db.execute("DELETE FROM server_history")
    server = Shifted(FakeServer())
    _, c = await _ask(path, server)
    assert server.completions == 4 + 1
    assert "batched behaviour (not recorded by the cached run)" in (c.identity_note or "")


# ---------------------------------------------------------------- defect 4: what a resume says


async def test_a_server_back_in_an_earlier_state_says_so_truthfully(tmp_path: Path) -> None:
    """fault, clean, fault again: the third resume reuses the first one's answers (content-addressed
    keys), and said "its cached answers are not reused"."""
    path = tmp_path / "c.sqlite"
    fault, _ = await _ask(path, Shifted(FakeServer(flip_every=2)))
    await _ask(path, Shifted(FakeServer()))
    third = Shifted(FakeServer(flip_every=2))
    again, c = await _ask(path, third)
    assert again == fault and third.completions == 4 + 1  # + the recheck
    assert "back to the state of an earlier one: that run's answers are reused" in (c.identity_note or "")


def test_the_report_says_what_a_resume_reused(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 0
        assert json.loads((tmp_path / "out" / "report.json").read_text())["warnings"] == []
        assert main(["run", str(cfg), "--resume"]) == 0
    warnings = json.loads((tmp_path / "out" / "report.json").read_text())["warnings"]
    reused = [w for w in warnings if "cached answers" in w]
    # the identity canary's and the re-check's requests are counted apart from the prompts' asks
    assert len(reused) == 2 and all(
        re.search(r"asked 0 and \d+ identity checks \(--resume\)$", w) for w in reused
    ), warnings
    assert "reused" in (tmp_path / "out" / "report.md").read_text()


def test_a_resume_into_an_empty_folder_says_so(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg), "--resume"]) == 0
    warnings = json.loads((tmp_path / "out" / "report.json").read_text())["warnings"]
    assert any("held no cache yet" in w for w in warnings), warnings


# ---------------------------------------------------------------- defect 2: a damaged cache


def _real_cache(path: Path) -> None:
    with ResponseCache(path) as cache:
        for i in range(200):
            cache.put({"s": 1}, {"i": i}, {"choices": [{"text": "x" * 200}]})


def _random(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _truncated(path: Path) -> None:
    _real_cache(path)
    with open(path, "r+b") as f:
        f.truncate(5000)


def _foreign(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE responses (k TEXT, v TEXT)")
        db.commit()


@pytest.mark.parametrize("damage", [_random, _truncated, _foreign])
def test_an_unreadable_cache_is_set_aside(tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "cache.sqlite"
    damage(path)
    kept = path.read_bytes()
    with pytest.raises(UnreadableCache):
        ResponseCache(path, set_aside_unreadable=False)
    with ResponseCache(path) as cache:
        assert cache.set_aside is not None and cache.set_aside.read_bytes() == kept
        assert cache.set_aside.name.startswith("cache.sqlite.corrupt-") and cache.unreadable
        assert len(cache) == 0 and cache.get({"s": 1}, {"i": 0}) is None
        cache.put({"s": 1}, {"i": 0}, {"choices": []})
    with ResponseCache(path) as cache:  # the new one is a cache
        assert cache.set_aside is None and cache.get({"s": 1}, {"i": 0}) == {"choices": []}


def test_an_unreadable_row_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache(path) as cache:
        cache.put({"s": 1}, {"i": 0}, {"choices": []})
        cache.put({"s": 1}, {"i": 1}, {"choices": []})
        cache._db.execute("UPDATE responses SET response = '{' WHERE request = '{\"i\":0}'")
        cache._db.execute("UPDATE responses SET response = '[1]' WHERE request = '{\"i\":1}'")
        assert cache.get({"s": 1}, {"i": 0}) is None and cache.get({"s": 1}, {"i": 1}) is None
        assert cache.stats()["misses"] == 2
        cache.put({"s": 1}, {"i": 0}, {"choices": [1]})  # asked again: overwritten
        assert cache.get({"s": 1}, {"i": 0}) == {"choices": [1]}


def test_a_resume_on_a_damaged_cache_asks_again_and_says_so(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        (tmp_path / "out").mkdir()
        _random(tmp_path / "out" / "cache.sqlite")
        assert main(["run", str(cfg), "--resume"]) == 0
    warnings = json.loads((tmp_path / "out" / "report.json").read_text())["warnings"]
    assert any("was no readable response cache (file is not a database)" in w for w in warnings), warnings
    assert list((tmp_path / "out").glob("cache.sqlite.corrupt-*"))


# ---------------------------------------------------------------- defect 3: an unwritable folder


def test_an_existing_folder_that_cannot_be_written_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    assert cli_options.output_folder_problem(out) is None
    real = cli_options.os.access
    monkeypatch.setattr(cli_options.os, "access", lambda p, mode: Path(p) != out and real(p, mode))
    assert cli_options.output_folder_problem(out) == f"cannot write into folder {out}: permission denied"
    cfg = write_config(tmp_path, "http://127.0.0.1:9", [{"name": "t", "url": "http://127.0.0.1:9"}])
    assert main(["run", str(cfg), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difftest: error: ") and "cannot write into folder" in err and "\n" not in err


def test_a_probe_file_catches_what_access_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli_options.tempfile, "mkstemp", refuse)
    assert cli_options.output_folder_problem(tmp_path) == (
        f"cannot write into folder {tmp_path}: Operation not permitted"
    )


# ---------------------------------------------------------------- defect 5: one run per folder


@contextlib.contextmanager
def _held(out: Path) -> Iterator[None]:
    with folder_lock(out):
        yield


def test_a_second_run_into_a_busy_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with _held(out):
        busy = pytest.raises(UsageError, match=r"is in use by another difftest run \(pid \d+\)")
        with busy, folder_lock(out):
            pass
        with live_fake() as ref, live_fake() as tgt:
            cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
            (out / "cache.sqlite").write_bytes(b"the first run's")
            assert main(["run", str(cfg)]) == 2
        assert (out / "cache.sqlite").read_bytes() == b"the first run's"  # not deleted under it
        assert "in use by another difftest run" in capsys.readouterr().err
    with folder_lock(out):  # released with the run
        pass


def test_an_unchanged_resume_is_still_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 0
        with caplog.at_level(logging.WARNING):
            assert main(["run", str(cfg), "--resume"]) == 0
    assert "changed" not in caplog.text and "not reused" not in caplog.text
