"""Conformance fixes (F18, tester t20 items 2 and 3):
- a server that generates nothing for the probe's first text was declared "no logprobs", and
  teacher forcing was dropped for the whole run: a target failing on KL PASSed;
- a `null` echoed logprob past the first position (NaN as orjson / pydantic v2 write it) was
  "echo misaligned", teacher forcing off, the target judged on token match alone: now exit 2,
  as a literal NaN is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FAKE_URL, FakeBehaviour, FakeServer, rewritten_completions
from fastapi import FastAPI
from quirk_fakes import live_app

from difftest import conformance
from difftest.cli import main
from difftest.client import CompletionClient
from difftest.conformance import DEFAULT_PROBES, WARNINGS, Capabilities, probe
from difftest.errors import ConformanceError
from difftest.report import load_run
from difftest.tokens_view import parse_logprobs

Rewrite = Callable[[dict[str, Any], dict[str, Any]], None]


def _app(rewrite: Rewrite) -> FastAPI:
    """The well-behaved fake with its /v1/completions answers passed through `rewrite`."""
    server = FakeServer(FakeBehaviour(debug=True))
    app = FastAPI()
    rewritten_completions(app, server, rewrite)
    app.mount("/", server.app)
    return app


async def _probed(rewrite: Rewrite) -> Capabilities:
    transport = httpx.ASGITransport(app=_app(rewrite))
    async with CompletionClient(FAKE_URL, name="tgt", transport=transport, backoff_base_s=0.001) as c:
        return await probe(c)


def _row(caps: Capabilities, check: str) -> tuple[str, str]:
    found = [(status, detail) for name, status, detail in caps.table() if name == check]
    assert len(found) == 1, caps.table()
    return found[0]


def _ends_at_once(req: dict[str, Any], out: dict[str, Any]) -> None:
    """An EOS as the first token, in a generation's answer (finish "stop", an empty logprobs block)."""
    for c in out["choices"]:
        if not req.get("echo") and c.get("logprobs"):
            c.update(text="", finish_reason="stop")
            c["logprobs"] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _ends_after_first_probe(req: dict[str, Any], out: dict[str, Any]) -> None:
    """An instruct model ending its turn after the first probe text's finished sentence only."""
    if req.get("prompt") == DEFAULT_PROBES[0]:
        _ends_at_once(req, out)


# ----------------------------------------------------------------------------- 2: empty generation


async def test_an_empty_generation_of_the_first_probe_text_is_not_no_logprobs() -> None:
    """Before: logprobs cap 0, "no logprobs", teacher forcing off for the whole run."""
    caps = await _probed(_ends_after_first_probe)
    assert caps.logprobs_cap == 20 and _row(caps, "logprobs cap")[0] == "ok"
    assert _row(caps, "token ids in responses")[0] == "ok" and caps.token_id_strings
    assert caps.echo_consistent and caps.teacher_forced
    assert caps.warnings == (), caps.warnings


async def test_a_server_generating_nothing_anywhere_has_logprob_support_unverified() -> None:
    """No text generates a token: neither "no logprobs" nor a cap can be read from that. Logprobs
    are still asked for (the run's answers show them); the echo is unverifiable, and says why."""
    caps = await _probed(_ends_at_once)
    assert caps.logprobs_cap == 20
    status, detail = _row(caps, "logprobs cap")
    assert status == "warn" and "no probe text generated a token" in detail
    assert WARNINGS["logprobs_unverified"].format(k=20) in caps.warnings
    assert WARNINGS["no_logprobs"] not in caps.warnings
    assert _row(caps, "token ids in responses") == ("warn", "unverified: no token generated")
    assert _row(caps, "echo = generation logprobs")[0] == "warn"
    assert any("echoed logprobs unverified (nothing generated to compare)" in w for w in caps.warnings)
    assert not caps.teacher_forced


# ----------------------------------------------------------------------------- 3: null in the echo


def _null_echo_at(position: int) -> Rewrite:
    def rewrite(req: dict[str, Any], out: dict[str, Any]) -> None:
        block = out["choices"][0].get("logprobs")
        if req.get("echo") and block:
            block["token_logprobs"][position] = None

    return rewrite


@pytest.mark.parametrize(("position", "shown"), [(2, r"\[2\]"), (-1, r"\[\d+\]")])
async def test_a_null_echoed_logprob_past_the_first_is_nan_exit_2(position: int, shown: str) -> None:
    """Before: "echoed tokens do not line up with the prompt", teacher forcing off, PASS on token match."""
    message = rf"^tgt \(http://fake.invalid\): null logprobs at positions {shown} \(NaN written as null\?\) "
    with pytest.raises(
        ConformanceError, match=message + "in its echo: nothing it serves can be judged$"
    ) as e:
        await _probed(_null_echo_at(position))
    assert e.value.exit_code == 2


def test_null_positions_of_an_echo() -> None:
    def view(lps: list[float | None]) -> Any:
        return parse_logprobs({"tokens": [f"t{i}" for i in range(len(lps))], "token_logprobs": lps})

    assert conformance._echo_null_positions(view([None, -1.0, None, -2.0, None])) == [2, 4]
    assert (
        conformance._echo_null_positions(view([None, -1.0, -2.0])) == []
    )  # the first has nothing to condition on
    assert (
        conformance._echo_null_positions(view([None, None, None])) == []
    )  # no echo logprobs: a gap, not NaN


# ----------------------------------------------------------------------------- the run


def _shift_echo_alternatives(req: dict[str, Any], out: dict[str, Any]) -> None:
    """A wrong model on the teacher-forced path: every alternative but the top-1 0.3 nats lower."""
    block = out["choices"][0].get("logprobs")
    if not (req.get("echo") and block):
        return
    for i, top in enumerate(block["top_logprobs"]):
        if top:
            best = max(top.values())
            for key in top:
                top[key] -= 0.3 if top[key] != best else 0.0
            if block["tokens"][i] in top:
                block["token_logprobs"][i] = top[block["tokens"][i]]


@pytest.mark.slow
def test_a_kl_regression_fails_although_the_first_probe_text_generates_nothing(
    tmp_path: Path, capsys: Any
) -> None:
    """The same wrong target FAILs on KL whether or not it ends at once after the probe's
    sentence. Before, that empty answer made it "no logprobs": KL n/a, PASS, exit 0."""
    prompts = tmp_path / "p.jsonl"
    texts = ["The capital of France", "1, 2, 3,", "Once upon a time", "def f(x):", "Hello there, my", "A B C"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))

    def target(req: dict[str, Any], out: dict[str, Any]) -> None:
        _ends_after_first_probe(req, out)
        _shift_echo_alternatives(req, out)

    with live_app(_app(lambda req, out: None)) as r, live_app(_app(target)) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompts", str(prompts), "--scheme", "none"]
        code = main([*argv, "--max-tokens", "8", "-o", str(tmp_path / "run"), "--json"])
    capsys.readouterr()
    acc = load_run(tmp_path / "run").targets[0].comparison("accuracy")
    assert acc is not None and code == 1
    assert (acc.aggregate.get("kl_mean") or 0.0) > 0.01  # teacher forcing on: the KL is measured
