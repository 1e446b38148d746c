"""Faults the differ survives (issue 10): each broken server behaviour ends in a clear per-prompt
error naming the server, or exit 2 / 3 as README "Reliability" documents — never a traceback,
never a PASS built on data the server did not send, NaN always fails."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from fakes import FakeBehaviour, FakeServer
from live_fakes import free_port, live_fake, raw_server
from test_runner import PROMPTS, write_config, write_prompts

from difftest.cli import main
from difftest.collect import Endpoint, generate
from difftest.conformance import probe
from difftest.errors import ServerError
from difftest.prompts import Prompt
from difftest.report import load_run
from difftest.tokens_view import TokensView, coverage_problem, nan_positions, parse_choice, parse_logprobs


def config(tmp: Path, ref: str, targets: list[dict], **run: object) -> Path:
    """test_runner's config with some [run] keys set to other values."""
    path = write_config(tmp, ref, targets)
    lines = path.read_text().splitlines()
    for key, value in run.items():
        lines = [ln for ln in lines if not ln.startswith(f"{key} =")]
        lines.insert(1, f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- pure checks


def _view(tokens: list[str], text: str | None) -> TokensView:
    n = len(tokens)
    return parse_logprobs(
        {"tokens": tokens, "token_logprobs": [-0.5] * n, "top_logprobs": [{t: -0.5} for t in tokens]},
        text=text,
    )


@pytest.mark.parametrize(
    ("tokens", "text", "max_tokens", "finish", "problem"),
    [
        (["a", "b"], "ab", 2, "length", None),
        ([], "", 2, "stop", None),
        ([], "abc", 2, "length", "no logprob tokens for 3 characters of text"),
        (["a"], "ab", 2, "length", 'logprob tokens for max_tokens=2 with finish_reason "length"'),
        (["a", "b", "c"], "abc", 2, "length", 'logprob tokens for max_tokens=2 with finish_reason "length"'),
        (["a"], "ab", 2, "stop", "the 1 logprob tokens cover 1 of the 2 characters of text"),
        (["<0xE6>", "b"], "\u00e6b", 2, "length", None),  # byte pieces prove nothing either way
        (["token_id:5"], "ab", 2, "stop", None),  # ids: only the count can be checked
        (["a"], "ab", None, "length", "cover 1 of the 2 characters"),
    ],
)  # fmt: skip
def test_coverage_problem(
    tokens: list[str], text: str, max_tokens: int | None, finish: str, problem: str | None
) -> None:
    found = coverage_problem(_view(tokens, text), max_tokens=max_tokens, finish_reason=finish)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_token_texts_of_an_empty_view_is_empty_not_a_traceback() -> None:
    """Zero logprob tokens with non-empty text raised ValueError (zip length) and exit 1."""
    assert parse_choice({"text": "Hello", "logprobs": {"tokens": []}}).token_texts() == ()


def test_nan_positions_are_found_in_logprobs_and_alternatives() -> None:
    block = {
        "tokens": ["a", "b", "c"],
        "token_logprobs": [None, math.nan, -1.0],
        "top_logprobs": [None, {"b": -0.1}, {"c": -1.0, "d": math.nan}],
    }
    assert nan_positions(parse_logprobs(block)) == [1, 2]


def test_malformed_block_names_the_server() -> None:
    choice = {"text": "ab", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0]}}
    with pytest.raises(ServerError, match=r"^target-7: malformed logprobs block: token_logprobs has 1"):
        parse_choice(choice, server="target-7")


# ----------------------------------------------------------------------------- per prompt


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("half-logprobs", 'tgt: text and logprobs disagree: 4 logprob tokens for max_tokens=8 with finish_reason "length"'),
        ("no-logprob-tokens", "tgt: text and logprobs disagree: no logprob tokens for"),
        ("short-logprobs", "tgt: malformed logprobs block: token_logprobs has 7 entries for 8 tokens"),
        ("http-500", "tgt: POST /v1/completions failed after 2 attempt(s): HTTP 500: Internal Server Error"),
        ("invalid-json", "tgt: /v1/completions answered a body that is not JSON"),
        ("no-choices", "tgt: /v1/completions answered 200 without a 'choices' list"),
        ("truncated-sse", "tgt: /v1/completions answered a body that is not JSON: b'data: "),
        ("reset", "tgt: POST /v1/completions failed after 2 attempt(s): connection failed (ReadError)"),
    ],
)  # fmt: skip
async def test_one_broken_answer_is_a_per_prompt_error_naming_the_server(fault: str, error: str) -> None:
    server = FakeServer(FakeBehaviour(fault=fault, fault_match="BROKEN"))
    async with server.client(name="tgt", max_retries=1) as client:
        ep = Endpoint("tgt", client, await probe(client))
        good = await generate(ep, Prompt("p0", "the quick"), max_tokens=8, k=5, seed=0)
        bad = await generate(ep, Prompt("p1", "BROKEN the quick"), max_tokens=8, k=5, seed=0)
    assert good.error is None and len(good.view) == 8
    assert bad.error is not None and error in bad.error, bad.error
    assert bad.text is None and len(bad.view) == 0  # nothing of a broken answer is scored
    # an impossible answer is the server's bug; a lost request or unreadable body is not judged
    assert bad.broken == (fault in ("half-logprobs", "no-logprob-tokens", "short-logprobs"))


# ----------------------------------------------------------------------------- whole runs


def _target_run(tmp_path: Path, behaviour: FakeBehaviour, **kw: object) -> tuple[int, str]:
    with live_fake() as ref, live_fake(behaviour) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "tgt", "url": tgt, "scheme": "fp8-block", **kw}])
        code = main(["run", str(cfg)])
    return code, str(tmp_path / "out")


BROKEN_LOGPROBS = [
    FakeBehaviour(fault=fault, fault_echo_only=echo_only)
    for fault in ("half-logprobs", "no-logprob-tokens", "nan-logprobs", "short-logprobs")
    for echo_only in (False, True)
    if not (fault == "no-logprob-tokens" and echo_only)  # an empty echo block is a known quirk: warned
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "behaviour", BROKEN_LOGPROBS, ids=lambda b: b.fault + ("-echo" if b.fault_echo_only else "")
)
def test_a_target_whose_logprobs_are_broken_never_passes(
    tmp_path: Path, behaviour: FakeBehaviour, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's false PASS: half-covering logprobs and `--scheme fp8-block` exited 0 on token
    match alone; zero logprob tokens exited 1 with a traceback. Now: exit 2, one line, named."""
    code, _ = _target_run(tmp_path, behaviour)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("difftest: error: tgt (http://127.0.0.1:")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["half-logprobs", "no-logprob-tokens", "short-logprobs", "http-500"])
def test_broken_answers_mid_run_are_per_prompt_errors_exit_3(
    tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request lost to HTTP 500 is infrastructure (exit 3 past error_rate_limit); a broken answer
    is the target's own bug: FAIL, exit 1 (it was exit 3 too, which a CI may retry as flaky)."""
    code, out = _target_run(tmp_path, FakeBehaviour(fault=fault, fault_match="dog is"))
    err = capsys.readouterr().err
    broken = fault != "http-500"
    assert code == (1 if broken else 3) and "Traceback" not in err
    acc = load_run(out).targets[0].comparison("accuracy")
    assert acc is not None
    errors = {p.prompt_id: p.error for p in acc.prompts if p.error}
    assert list(errors) == [f"p{PROMPTS.index('the lazy dog is')}"]
    assert "tgt" in next(iter(errors.values()))
    assert acc.aggregate["failed_requests"] == 1
    # a broken answer fails the target; a request lost to HTTP 500 leaves it undecided
    assert acc.aggregate["broken_answers"] == float(broken)
    assert load_run(out).targets[0].verdict.label == ("FAIL" if broken else "INCONCLUSIVE")
    # report.json says what the exit code said, and a re-rendered report keeps it (before: the
    # infrastructure problem lived on stderr only, and `report DIR` re-rendered it as a gate PASS)
    stored = json.loads((Path(out) / "report.json").read_text())
    assert stored["exit_code"] == code and bool(stored["infrastructure"]) == (not broken)
    assert stored["targets"][0]["verdict"]["label"] == ("FAIL" if broken else "INCONCLUSIVE")
    assert main(["report", out]) == code
    if broken:
        return
    # one gate everywhere: report.json said INCONCLUSIVE (t22: PASS) where report.md said INFRASTRUCTURE
    assert (
        stored["gate"] == "INFRASTRUCTURE" and "Gate: INFRASTRUCTURE" in (Path(out) / "report.md").read_text()
    )
    junit = (Path(out) / "junit.xml").read_text()  # a CI dashboard must not read an exit-3 run as green
    assert '<testsuite name="infrastructure"' in junit and "<error" in junit


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["half-logprobs", "http-500", "invalid-json"])
def test_a_failed_teacher_forcing_request_is_a_failed_prompt_not_a_quiet_gap(
    tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The echo of one prompt's continuation broken: that prompt used to lose only its KL (a
    warning) and the target PASSed on the other prompts; now it is a failed request: exit 3 when
    lost (HTTP 500, invalid JSON), a FAIL (exit 1) when the target's echo itself was broken."""
    behaviour = FakeBehaviour(fault=fault, fault_echo_only=True, fault_match="dog is")
    code, out = _target_run(tmp_path, behaviour)
    assert code == (1 if fault == "half-logprobs" else 3), capsys.readouterr().err
    acc = load_run(out).targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["failed_requests"] == 1
    (failed,) = [p for p in acc.prompts if p.error]
    assert failed.prompt_id == f"p{PROMPTS.index('the lazy dog is')}" and "target echo: " in failed.error


@pytest.mark.slow
@pytest.mark.parametrize("echo", [True, False], ids=["teacher-forced", "no-echo"])
def test_nan_logprobs_on_one_prompt_never_pass(tmp_path: Path, echo: bool) -> None:
    """NaN in a generation mid-run: with teacher forcing off it used to be dropped (exit 0, PASS).
    Now the prompt is a failed request whatever the pair measures: never a PASS."""
    behaviour = FakeBehaviour(fault="nan-logprobs", fault_match="dog is", echo=echo)
    code, out = _target_run(tmp_path, behaviour)
    (t,) = load_run(out).targets
    assert (
        code == 1 and t.verdict is not None and t.verdict.label == "FAIL"
    )  # NaN: the target's bug, not infra
    acc = t.comparison("accuracy")
    assert acc is not None and acc.aggregate["failed_requests"] == 1
    (failed,) = [p for p in acc.prompts if p.error]
    assert "target: NaN logprobs at generated positions [0, 1, 2" in failed.error


# ----------------------------------------------------------------------------- dead or hung servers


def _compare(ref: str, tgt: str, tmp_path: Path) -> tuple[int, str]:
    prompts = write_prompts(tmp_path)
    argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "-o", str(tmp_path / "c")]
    code = main(argv)
    return code, str(tmp_path / "c")


@pytest.mark.timeout(60)  # the old code waited the 600 s health timeout
@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ("500", "HTTP 500 on /health, HTTP 500 on /v1/models (3 tries)"),
        ("reset", "connection broken (ReadError"),
        ("silent", "accepted the connection, no answer within 5s on /health"),
    ],
)
def test_compare_against_a_broken_url_is_exit_3_in_seconds(
    tmp_path: Path, broken: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(live_fake())
        if broken == "500":
            tgt = stack.enter_context(live_fake(FakeBehaviour(die_after=0, die_mode="500")))
        else:
            tgt = stack.enter_context(raw_server(broken))
        code, _ = _compare(ref, tgt, tmp_path)
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"server 'target' at {tgt} is up but broken: " in err and said in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_server_still_starting_is_left_to_the_launcher_wait() -> None:
    """Connection refused or 503 ("loading") is a server that may still come up: not broken."""
    from difftest.preflight import check_running
    from server_shim.launch import ServerSpec

    with live_fake(FakeBehaviour(die_after=0, die_mode="503")) as loading:
        specs = [
            ServerSpec(name="a", url=loading),
            ServerSpec(name="b", url=f"http://127.0.0.1:{free_port()}"),
        ]
        check_running(specs, request_timeout_s=1)  # no InfraError


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("behaviour", "said"),
    [
        (FakeBehaviour(fault="http-500"), "tgt (http://127.0.0.1:{port}) fails /v1/completions: HTTP 500"),
        (FakeBehaviour(delay_s=2.0), "tgt (http://127.0.0.1:{port}) fails /v1/completions: timed out after 0.5s"),
        (FakeBehaviour(fault="invalid-json"), "answered a body that is not JSON"),
        (FakeBehaviour(fault="no-choices"), "answered 200 without a 'choices' list"),
    ],
)  # fmt: skip
def test_healthy_server_failing_every_completion_is_exit_3_named(
    tmp_path: Path, behaviour: FakeBehaviour, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Health says yes, every completion fails (or never comes within request_timeout_s)."""
    with live_fake() as ref, live_fake(behaviour) as tgt:
        cfg = config(tmp_path, ref, [{"name": "tgt", "url": tgt, "scheme": "none"}], request_timeout_s=0.5)
        code = main(["run", str(cfg)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert said.format(port=tgt.rsplit(":", 1)[1]) in err and "Traceback" not in err


@pytest.mark.timeout(60)  # before: 4 x the 120 s request timeout on the first request
def test_side_by_side_compare_against_a_hung_url_is_exit_3_in_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with live_fake() as ref, raw_server("silent") as tgt:
        assert main(["compare", "--ref", ref, "--target", tgt, "--prompt", "the quick brown fox"]) == 3
    err = capsys.readouterr().err
    assert "server 'target' at " in err and "accepted the connection, no answer within 5s" in err


def test_an_unset_key_variable_is_exit_2_before_anything_launches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from difftest import runner

    monkeypatch.delenv("DIFFTEST_UNSET_KEY", raising=False)
    started: list[object] = []
    monkeypatch.setattr(runner, "launch_shown", lambda *a, **k: started.append(a))
    cfg = write_config(tmp_path, "http://127.0.0.1:9", [
        {"name": "tgt", "command": "engine --port {port}", "api_key_env": "DIFFTEST_UNSET_KEY"}])  # fmt: skip
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (
        "server 'tgt': environment variable DIFFTEST_UNSET_KEY (api_key_env / --api-key-env) is not set"
        in err
    )
    assert started == []
    monkeypatch.setenv("DIFFTEST_UNSET_KEY", "")  # set but empty: said so, not "not set"
    assert main(["run", str(cfg)]) == 2
    assert "DIFFTEST_UNSET_KEY (api_key_env / --api-key-env) is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_only_in_the_teacher_forced_echo_fails_the_verdict(tmp_path: Path) -> None:
    """A NaN only where the echo is scored (prefill kernel): the target's broken answer, never
    scored as a KL, and an impossible answer always fails (exit 1)."""
    behaviour = FakeBehaviour(fault="nan-logprobs", fault_match="dog is", fault_echo_only=True)
    code, out = _target_run(tmp_path, behaviour)
    (t,) = load_run(out).targets
    assert code == 1 and t.verdict is not None and not t.verdict.passed
    assert any("NaN" in c.note for part in t.verdict.parts for c in part.checks if not c.passed)
    acc = t.comparison("accuracy")
    assert acc is not None and acc.aggregate["broken_answers"] == 1
