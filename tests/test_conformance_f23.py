"""Conformance fixes (F23, tester t21 items D2, D3, D8):
- D2: a server that ignores `echo` (its answer holds no prompt) was "echo: ok - echo works" where
  it served no logprobs, and `capabilities.echo` true: now the probe's "no echo" FAIL;
- D3: the probe asked max_tokens=16 whatever the run's --max-tokens, so a server capping below
  16 could not be compared at all, and the refusal said it "cannot serve /v1/completions": the
  probe now asks within the run's max_tokens, and a refusal naming max_tokens is the probe's;
- D8: a server that answered every logprobs request (HTTP 200) without a logprobs block was
  "no logprobs request accepted": now "ignored", told apart from "refused"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FAKE_URL, FakeBehaviour, FakeServer, rewritten_completions
from fastapi import FastAPI
from live_fakes import live_fake
from quirk_fakes import quirk_app

from difftest.cli import main
from difftest.client import CompletionClient
from difftest.conformance import WARNINGS, Capabilities, probe
from difftest.errors import ConformanceError
from difftest.session import ClientOptions, Server, Session


async def _probed(app: FastAPI, **kw: Any) -> Capabilities:
    transport = httpx.ASGITransport(app=app)
    async with CompletionClient(FAKE_URL, name="srv", transport=transport, max_retries=0) as c:
        return await probe(c, **kw)


def _row(caps: Capabilities, check: str) -> tuple[str, str]:
    found = [(status, detail) for name, status, detail in caps.table() if name == check]
    assert len(found) == 1, caps.table()
    return found[0]


def _echo_ignoring_app(behaviour: FakeBehaviour) -> FastAPI:
    """The report's `fake.py plain`: `echo` ignored, max_tokens=0 answered with a blank and no
    logprobs block (nothing of the prompt in the answer)."""

    def ignore_echo(req: dict[str, Any], out: dict[str, Any]) -> None:
        if req.get("echo"):
            for c in out["choices"]:
                c.update(text=" ", logprobs=None)

    server = FakeServer(behaviour)
    app = FastAPI()
    rewritten_completions(app, server, ignore_echo)
    app.mount("/", server.app)
    return app


# D2 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logprobs", [0, 20], ids=["no-logprobs", "logprobs"])
async def test_an_echo_without_the_prompt_is_no_echo(logprobs: int) -> None:
    caps = await _probed(_echo_ignoring_app(FakeBehaviour(max_logprobs=logprobs)))
    status, detail = _row(caps, "echo")
    # guards D2: was ("ok", "echo works (logprobs not available)") without logprobs, a "warn" with
    assert status == "fail" and detail.startswith("echo ignored: the answer ' ' does not hold the prompt")
    assert not caps.echo and not caps.teacher_forced
    assert WARNINGS["no_echo"] in caps.warnings
    assert all(t.strings is None for t in caps.tokenizations)  # no "echo" read as the prompt's tokens


async def test_a_real_echo_without_logprobs_still_works() -> None:
    caps = await _probed(quirk_app(FakeBehaviour(max_logprobs=0)))
    assert _row(caps, "echo") == ("ok", "echo works (logprobs not available)") and caps.echo


# D3 ------------------------------------------------------------------------------------------


async def test_probe_asks_within_the_runs_max_tokens() -> None:
    """A server capping max_tokens at 4 serves a run of --max-tokens 4: the probe asks no more than
    that in any request (a request above the cap would be refused and the check below would say so)."""
    caps = await _probed(quirk_app(FakeBehaviour(max_tokens_cap=4)), max_tokens=4)
    assert _row(caps, "completions")[0] == "ok" and "for max_tokens=4" in _row(caps, "completions")[1]
    assert caps.logprobs_cap == 20 and caps.token_id_strings and caps.teacher_forced  # all asked within 4
    assert caps.warnings == (WARNINGS["no_debug"],), caps.warnings  # nothing else degraded


async def test_probe_refused_for_its_own_max_tokens_says_so() -> None:
    with pytest.raises(ConformanceError) as info:
        await _probed(quirk_app(FakeBehaviour(max_tokens_cap=8)))
    said = str(info.value)
    # guards D3: was "srv (...) cannot serve /v1/completions: HTTP 400: max_tokens must be <= 8"
    assert "cannot serve" not in said and "refused the conformance probe's request of 16 tokens" in said
    assert said.endswith("max_tokens must be <= 8 (a run probes with at most its --max-tokens)")
    assert info.value.exit_code == 2


async def test_session_probes_within_its_max_tokens() -> None:
    """`difftest noise` probes through a Session: its ClientOptions carry the run's max_tokens."""
    server = FakeServer(FakeBehaviour(max_tokens_cap=4))
    options = ClientOptions(max_retries=0, max_tokens=4)
    async with Session([Server("ref", FAKE_URL, transport=server.transport())], options) as s:
        assert s["ref"].caps.teacher_forced


def _two_prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(["1+2+3=", "the quick"])
        )
    )
    return prompts


def _against_baseline(base: Path, target: str, out: Path) -> list[str]:
    return ["compare", "--baseline", str(base), "--target", target, "--scheme", "fp8-block", "-o", str(out)]


def test_compare_against_a_capped_server_with_a_smaller_max_tokens(tmp_path: Path, capsys) -> None:
    """The report's repro: a target capping max_tokens at 8 compared with --max-tokens 4 (quick
    look and a recorded reference capped alike: the recording's probe replays as the run's asks)."""
    prompts = _two_prompts(tmp_path)
    capped = FakeBehaviour(max_tokens_cap=8)
    with live_fake() as ref, live_fake(capped) as tgt, live_fake(FakeBehaviour(max_tokens_cap=4)) as small:
        # guards D3: each was exit 2, "target (...) cannot serve /v1/completions: HTTP 400: ..."
        assert main(["compare", "--ref", ref, "--target", tgt, "--prompt", "Hello", "--max-tokens", "4"]) == 0
        base = tmp_path / "b"
        record = ["record", "--ref", small, "--prompts", str(prompts), "--max-tokens", "4", "-o", str(base)]
        assert main(record) == 0, capsys.readouterr().err
        assert main(_against_baseline(base, tgt, tmp_path / "o")) == 0, capsys.readouterr().err


# D8 ------------------------------------------------------------------------------------------


async def test_logprobs_ignored_is_not_refused() -> None:
    caps = await _probed(quirk_app(ignore_logprobs=True))
    # guards D8: was ("fail", "no logprobs request accepted") for a server that accepted them all
    assert _row(caps, "logprobs cap") == (
        "fail",
        "logprobs ignored: every request answered without a logprobs block",
    )
    assert caps.logprobs_cap == 0 and WARNINGS["no_logprobs"] in caps.warnings


async def test_logprobs_refused_quotes_the_server() -> None:
    caps = await _probed(quirk_app(FakeBehaviour(max_logprobs=0)))
    status, detail = _row(caps, "logprobs cap")
    assert status == "fail" and detail.startswith(
        "every logprobs request refused: HTTP 400: logprobs must be"
    )


def test_a_baseline_recorded_with_the_16_token_probe_still_replays(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Baselines recorded before the probe kept within max_tokens hold its 16-token request: a run
    with max_tokens 4 asks a 4-token probe that is not in them (an offline miss, exit 2). The
    replay falls back to the recording's own probe."""
    import difftest.recording as recording

    prompts = _two_prompts(tmp_path)
    real = recording.probe_endpoint

    async def old_probe(client, model, endpoint, max_tokens=None):  # noqa: ANN001, ANN202
        return await real(client, model, endpoint)  # the recording's probe as it was: 16 tokens

    monkeypatch.setattr(recording, "probe_endpoint", old_probe)
    with live_fake() as ref, live_fake() as tgt:
        base = tmp_path / "b"
        assert (
            main(["record", "--ref", ref, "--prompts", str(prompts), "--max-tokens", "4", "-o", str(base)])
            == 0
        )
        assert main(_against_baseline(base, tgt, tmp_path / "o")) == 0, capsys.readouterr().err


async def test_a_replayed_probe_keeps_its_own_reason_when_the_old_probe_is_not_recorded_either(
    monkeypatch,
) -> None:
    """The fallback to the 16-token probe is for recordings made before the probe kept within
    max_tokens; where that request is not recorded either, the first probe's reason is the one said
    (not the fallback's "not recorded")."""
    from types import SimpleNamespace

    import difftest.chat as chat
    from difftest.errors import CacheMiss, ConformanceError

    calls = []

    async def probe(client, *, model=None, max_tokens=None):  # noqa: ANN001, ANN202
        calls.append(max_tokens)
        if max_tokens is not None:
            raise ConformanceError("reference: text and logprobs disagree")
        raise CacheMiss("reference: offline; not answered from the cache")

    monkeypatch.setattr(chat, "probe", probe)
    client = SimpleNamespace(replayed=True)
    with pytest.raises(ConformanceError, match="text and logprobs disagree"):
        await chat.probe_endpoint(client, None, "completions", 4)  # type: ignore[arg-type]
    assert calls == [4, None]
