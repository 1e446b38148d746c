"""The differ against a server that stops answering mid-run (the client's circuit breaker), a
completions body cut short (retried like a 5xx), and an output that cannot be written (disk full,
a folder where a file goes): one line and exit 2, never a traceback and exit 1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from fakes import make_fake_app
from live_fakes import live_fake
from sample_results import sample_run
from test_differ_faults import config
from test_runner import PROMPTS, write_config

from difftest.cache import ResponseCache
from difftest.cli import main
from difftest.client import STOPPED_AFTER, CompletionClient
from difftest.errors import OutputError, ServerError, UnreadableBody
from difftest.report import jsonio, write_report

OK_BODY = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "hi"}]}
CUT_BODY = b'{"id": "x", "choices": [{"text": "ab'


def _client(handler, **kw) -> CompletionClient:  # noqa: ANN001
    kw = {"timeout_s": 0.2, "max_retries": 1, "backoff_base_s": 0.001, "backoff_max_s": 0.002} | kw
    return CompletionClient("http://srv.invalid", name="tgt", transport=httpx.MockTransport(handler), **kw)


class _Server:
    """A mock server: prompts containing "hang" are never answered, the others get OK_BODY.
    `after` > 0: every request after the first `after` hangs (the server stopped)."""

    def __init__(self, after: int | None = None) -> None:
        self.after = after
        self.seen: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        self.seen.append(prompt)
        if "hang" in prompt or (self.after is not None and len(self.seen) > self.after):
            await asyncio.sleep(60)
        return httpx.Response(200, json=OK_BODY)


# ----------------------------------------------------------------------------- circuit breaker


async def test_a_server_that_stops_answering_fails_later_requests_at_once() -> None:
    """Before: each of the 10 requests waited out its 2 attempts (20 hung attempts, 10 x 2 x
    timeout / concurrency); now the two in flight spend theirs and the rest end without a try."""
    server = _Server(after=2)
    async with _client(server, concurrency=2) as c:
        got = await asyncio.gather(
            *(c.completions({"prompt": f"p{i}"}) for i in range(12)), return_exceptions=True
        )
    assert got[:2] == [OK_BODY, OK_BODY]
    assert all(isinstance(e, ServerError) for e in got[2:])
    hung = len(server.seen) - 2
    # the 2 in flight x 2 attempts, and at most one request per slot that started before it opened
    assert hung <= 2 * 2 + 2, hung
    last = str(got[-1])
    assert last.startswith("tgt: POST /v1/completions not sent: the server stopped answering")
    assert "timed out after 0.2s" in last and last.count("\n") == 0
    assert got[-1].exit_code == 3 and c.failures == 10


async def test_a_success_closes_the_breaker_and_probes_asked_once_never_open_it() -> None:
    server = _Server()
    async with _client(server, concurrency=1) as c:
        for prompt in ("hang", "ok", "hang", "ok"):  # never two lost in a row
            with contextlib.suppress(ServerError):
                await c.completions({"prompt": prompt})
        assert server.seen[-1] == "ok"
        for _ in range(3):  # optional probes, asked once: their silence is no dead server
            with pytest.raises(ServerError, match="timed out"):
                await c.completions({"prompt": "hang"}, retries=0)
        assert await c.completions({"prompt": "ok"}) == OK_BODY
        for _ in range(STOPPED_AFTER):
            with pytest.raises(ServerError, match="failed after 2 attempt"):
                await c.completions({"prompt": "hang"})
        asked = len(server.seen)
        with pytest.raises(ServerError, match="stopped answering"):
            await c.completions({"prompt": "ok"})
        assert len(server.seen) == asked  # refused without touching the network
        sibling = c.sibling(name="tgt@serial", concurrency=1)  # the same server, the same silence
        with pytest.raises(ServerError, match="stopped answering"):
            await sibling.completions({"prompt": "ok"})
        await sibling.aclose()
    assert len(server.seen) == asked


def _hang_after(answered: int, release: threading.Event) -> tuple[object, list[str]]:
    """The fake engine, whose completions hang (until `release`) once `answered` run prompts were
    answered (the probes and the identity canary before them are answered as usual)."""
    app = make_fake_app()
    hung: list[str] = []
    state = {"answered": 0}

    async def wrapper(scope, receive, send):  # noqa: ANN001, ANN202
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        chunks = []
        while True:
            m = await receive()
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        body = b"".join(chunks)
        prompt = json.loads(body).get("prompt")
        if state["answered"] >= answered:
            hung.append(str(prompt))
            while not release.is_set():
                await asyncio.sleep(0.05)
        if any(isinstance(prompt, str) and prompt.startswith(p) for p in PROMPTS):
            state["answered"] += 1
        replayed = False

        async def replay():  # noqa: ANN202
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await app(scope, replay, send)

    return wrapper, hung


@pytest.mark.timeout(60)
def test_a_target_that_stops_mid_run_ends_the_run_after_one_round_of_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/tmp/t2/hang: before, generation and then teacher forcing each waited out every prompt's
    attempts (6 prompts x 2 attempts x 2 phases = 24 hung requests); now the breaker opens after
    the requests in flight have spent theirs and teacher forcing asks the dead target nothing."""
    release = threading.Event()
    app, hung = _hang_after(2, release)
    with live_fake() as ref, live_fake(app=app) as tgt:
        targets = [{"name": "tgt", "url": tgt, "scheme": "none"}]
        cfg = config(tmp_path, ref, targets, request_timeout_s=0.5, batch_slot_check=False, whitebox="off")
        try:
            code = main(["run", str(cfg)])
        finally:
            release.set()  # the server's shutdown waits for its handlers
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Traceback" not in err
    # concurrency 4: the 4 in flight x 2 attempts, and at most one more try per slot
    assert len(hung) <= 4 * 2 + 4, hung
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    errors = [p["error"] for t in report["targets"] for c in t["comparisons"] for p in c["prompts"]]
    assert any("the server stopped answering" in (e or "") for e in errors), errors


# ----------------------------------------------------------------------------- unreadable bodies


async def test_a_truncated_completions_body_is_retried() -> None:
    answers = iter([httpx.Response(200, content=CUT_BODY), httpx.Response(200, json=OK_BODY)])
    async with _client(lambda request: next(answers)) as c:
        assert await c.completions({"prompt": "x"}) == OK_BODY
        assert (c.retries, c.failures) == (1, 0)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (httpx.Response(200, content=CUT_BODY), 'answered a body that is not JSON: b\'{"id": "x"'),
        (httpx.Response(200, json={"error": "CUDA out of memory"}), "without a 'choices' list: CUDA out"),
    ],
    ids=["truncated", "error-200"],
)
async def test_an_unreadable_body_on_every_attempt_names_the_body(answer: httpx.Response, said: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    async with _client(handler, max_retries=2) as c:
        with pytest.raises(UnreadableBody) as info:
            await c.completions({"prompt": "x"})
    assert len(seen) == 3 and c.retries == 2
    assert str(info.value).startswith("tgt: /v1/completions answered ")
    assert str(info.value).endswith(" (failed after 3 attempt(s))")
    assert said in str(info.value) and info.value.exit_code == 3


# ----------------------------------------------------------------------------- output that cannot be written


def test_a_full_disk_while_writing_a_report_file_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    target.write_text("the earlier report\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(jsonio.os, "fsync", full)
    with pytest.raises(OutputError) as info:
        jsonio.atomic_write_text(target, "new")
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert info.value.exit_code == 2
    assert target.read_text() == "the earlier report\n"  # the old file stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left


@pytest.mark.parametrize("blocked", ["report.html", "plots", "out"])
def test_a_folder_or_file_in_the_way_of_the_report_names_it(tmp_path: Path, blocked: str) -> None:
    out = tmp_path / "out"
    if blocked == "out":
        out.write_text("")
    else:
        out.mkdir()
        (out / "report.html").mkdir() if blocked == "report.html" else (out / "plots").write_text("")
    with pytest.raises(OutputError) as info:
        write_report(sample_run(), out)
    said = {
        "report.html": f"cannot write {out / 'report.html'}: a folder stands in its place",
        "plots": f"{out / 'plots'} is a file, not a folder",
        "out": f"cannot write {out / 'report.json'}: {out} is a file, not a folder",
    }[blocked]
    assert said in str(info.value)


def test_difftest_report_into_a_blocked_folder_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "tgt", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 0
    out = tmp_path / "out"
    (out / "report.html").unlink()
    (out / "report.html").mkdir()
    capsys.readouterr()
    assert main(["report", str(out)]) == 2  # before: IsADirectoryError, a traceback and exit 1
    err = capsys.readouterr().err
    assert err == f"difftest: error: cannot write {out / 'report.html'}: a folder stands in its place\n"


def _full_cache(path: Path) -> ResponseCache:
    """A real sqlite "database or disk is full": the file may not grow past its current pages."""
    cache = ResponseCache(path)
    pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
    cache._db.execute(f"PRAGMA max_page_count = {pages}")
    return cache


def test_a_full_disk_under_the_cache_is_an_output_error_naming_the_file(tmp_path: Path) -> None:
    cache = _full_cache(tmp_path / "cache.sqlite")
    big = {"choices": [{"text": "x" * 200_000}]}
    with pytest.raises(OutputError, match=r"cache\.sqlite: database or disk is full"):
        cache.put({"name": "tgt"}, {"prompt": "p"}, big)
    with pytest.raises(OutputError, match="database or disk is full") as info:
        cache.remember_server("tgt", {"name": "tgt", "pad": "y" * 200_000})
    assert info.value.exit_code == 2 and isinstance(info.value.__cause__, sqlite3.OperationalError)
    cache.close()


async def test_a_client_whose_cache_cannot_be_written_asks_nothing_more(tmp_path: Path) -> None:
    """The first write that fails is raised; later cached requests fail at once (the canary and
    the request itself would be asked for answers that cannot be kept)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=OK_BODY | {"pad": "x" * 200_000})

    cache = _full_cache(tmp_path / "cache.sqlite")
    async with _client(handler, cache=cache) as c:
        with pytest.raises(OutputError, match="database or disk is full"):
            await c.completions({"prompt": "a"})
        asked = len(seen)
        with pytest.raises(OutputError, match="database or disk is full"):
            await c.completions({"prompt": "b"})
        assert len(seen) == asked
        assert await c.completions({"prompt": "c"}, use_cache=False)  # probes still ask
    cache.close()


def test_a_run_whose_cache_cannot_be_written_stops_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """collect caught every DifftestError per prompt, so a full disk under cache.sqlite became a
    failed request on every prompt and exit 3 (a server's fault, retried by CI in vain)."""

    def full(self: ResponseCache, *args: object, **kwargs: object) -> None:
        raise OutputError(self.path, "database or disk is full")

    monkeypatch.setattr(ResponseCache, "put", full)
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "tgt", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("cache.sqlite: database or disk is full\n") and "Traceback" not in err


def test_a_file_where_the_logs_folder_goes_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """launch_servers' mkdir raised FileExistsError: a traceback and exit 1."""
    from difftest.session import launch_shown
    from server_shim.launch_spec import ServerSpec

    logs = tmp_path / "logs"
    logs.write_text("not a folder")
    url_server = ServerSpec(name="s", url="http://127.0.0.1:9")
    with (
        pytest.raises(OutputError, match="logs: a file stands where this folder goes") as info,
        launch_shown([url_server], log_dir=logs),
    ):
        pass
    assert info.value.exit_code == 2 and str(logs) in str(info.value)


async def test_a_chat_200_without_choices_is_retried_as_over_completions() -> None:
    """Was: chat's own check ran after the request, so an `{"error"}` under 200 (a server's passing
    trouble) failed the prompt at once instead of being retried."""
    from difftest.chat import post_chat

    answers = iter(
        [httpx.Response(200, json={"error": "CUDA out of memory"}), httpx.Response(200, json=OK_BODY)]
    )
    async with _client(lambda request: next(answers)) as c:
        assert await post_chat(c, {"messages": []}) == OK_BODY
        assert (c.retries, c.failures) == (1, 0)
