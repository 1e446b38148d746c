"""Server identity for --resume: a rebuilt server behind the same URL is never judged on old answers
(difftest.identity), and an unchanged one resumes without a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fakes import FakeBehaviour, FakeServer
from live_fakes import free_port, live_fake
from test_runner import write_config

from difftest.cache import ResponseCache
from difftest.cli import main
from difftest.identity import changed_parts, same_behaviour
from difftest.report import load_run

CANARY = {
    "text": " Paris.",
    "tokens": [" Paris", "."],
    "token_logprobs": [-0.10, -0.50],
    "top_logprobs": [{" Paris": -0.10, " Lyon": -3.0}, {".": -0.5, ",": -1.2}],
}


def _with(**changes: object) -> dict:
    return CANARY | changes


def test_same_behaviour_tolerates_jitter_not_changes() -> None:
    assert same_behaviour(CANARY, _with(token_logprobs=[-0.12, -0.47]))  # 0.02 / 0.03 nats: jitter
    assert not same_behaviour(CANARY, _with(token_logprobs=[-0.10, -0.60]))  # 0.1 nats: a change
    assert not same_behaviour(CANARY, _with(tokens=[" Lyon", "."]))
    assert not same_behaviour(CANARY, _with(text=" Lyon."))
    shifted = [{" Paris": -0.10, " Lyon": -3.2}, {".": -0.5, ",": -1.2}]
    assert not same_behaviour(CANARY, _with(top_logprobs=shifted))
    assert same_behaviour(None, None) and not same_behaviour(CANARY, None)


def test_a_canary_without_logprobs_or_an_answer_never_vouches() -> None:
    """The bug: a server serving no logprobs (transformers serve ignores them) answered the canary
    with the same greedy text after a one-module fault, and --resume reused its old answers; two
    failed canaries ({"error": ...} both) counted as the same behaviour too."""
    no_logprobs = _with(token_logprobs=[], top_logprobs=[])
    assert not same_behaviour(no_logprobs, no_logprobs)
    assert not same_behaviour(_with(token_logprobs=[-0.1, None]), _with(token_logprobs=[-0.1, None]))
    assert not same_behaviour({"error": "503"}, {"error": "connection reset"})
    assert not same_behaviour({"error": "503"}, CANARY) and not same_behaviour(CANARY, {"error": "503"})
    assert same_behaviour(CANARY, dict(CANARY))
    fp = {"models": ["m"], "behaviour": no_logprobs}
    assert changed_parts(fp, dict(fp)) == [
        "behaviour (the canary has no logprobs to compare: same text proves nothing)"
    ]


def test_changed_parts_compares_canonically() -> None:
    # today's bug: a fingerprint read back from JSON (lists) differed from a fresh one (tuples)
    fresh = {"models": ("m",), "identity": {"faults": ("a",)}, "behaviour": CANARY}
    stored = json.loads(json.dumps(fresh))
    assert changed_parts(stored, fresh) == []
    assert changed_parts(stored, fresh | {"version": "2"}) == ["version"]
    assert changed_parts(stored, fresh | {"behaviour": _with(tokens=["x", "."])}) == [
        "behaviour (canary prompt answered differently)"
    ]


async def test_client_re_asks_a_swapped_server(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    req = {"prompt": "the lazy dog", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    with ResponseCache(path) as cache:
        async with FakeServer().client(name="tgt", cache=cache) as c:
            before = await c.completions(req)
    swapped = FakeServer(flip_every=2)  # same URL, name, model id and /version; other numbers
    with ResponseCache(path) as cache:
        async with swapped.client(name="tgt", cache=cache) as c:
            after = await c.completions(req)
    # the canary alone and batched, twice each, then the request itself: nothing reused
    assert swapped.completions_served == 5
    assert after != before


async def test_client_re_asks_a_server_without_logprobs(tmp_path: Path) -> None:
    """No logprobs: the canary's greedy text alone cannot vouch, so even an unchanged server is re-asked."""
    path = tmp_path / "c.sqlite"
    req = {"prompt": "the lazy dog", "max_tokens": 6, "temperature": 0}
    with ResponseCache(path) as cache:
        async with FakeServer(max_logprobs=0).client(name="tgt", cache=cache) as c:
            await c.completions(req)
    again = FakeServer(max_logprobs=0)
    with ResponseCache(path) as cache:
        async with again.client(name="tgt", cache=cache) as c:
            await c.completions(req)
    # the canary, its retry without logprobs, then the request itself (before: a cache hit, 2)
    assert again.completions_served == 3
    assert again.requests[-1] == ("POST", "/v1/completions")


def test_resume_after_int8_to_int4_swap_re_asks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A target served as "int8", restarted as "int4" behind the same URL: `run --resume` must
    report what a fresh run reports, not the stored answers."""
    port = free_port()
    int8, int4 = FakeBehaviour(), FakeBehaviour(flip_every=3)
    with live_fake() as ref:
        with live_fake(int8, port=port) as tgt:
            cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
            assert main(["run", str(cfg)]) == 0
        first = load_run(tmp_path / "out").targets[0].comparison("accuracy")
        with live_fake(int4, port=port):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                resumed_code = main(["run", str(cfg), "--resume"])
            assert "server changed since the cached run" in caplog.text
            resumed = load_run(tmp_path / "out").targets[0].comparison("accuracy")
            assert main(["run", str(cfg)]) == resumed_code
            fresh = load_run(tmp_path / "out").targets[0].comparison("accuracy")
    assert first is not None and resumed is not None and fresh is not None
    assert first.aggregate["token_match"] == 1.0
    assert resumed.aggregate["token_match"] == fresh.aggregate["token_match"] < 1.0


def test_resume_of_an_unchanged_server_is_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 0
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["run", str(cfg), "--resume"]) == 0
    assert "changed" not in caplog.text
