"""Bad input on the command line and in configs: one line `difftest: error: ...`, exit 2, never a
traceback or a silently wrong number (each test is a defect a tester reproduced)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from live_fakes import live_fake

from difftest.cli import main
from difftest.config import load_config, load_thresholds
from difftest.errors import ConfigError, UsageError
from difftest.verdict import budget_for

DEAD = "http://127.0.0.1:9"  # nothing listens: every test here must fail before any request


def _one_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("difftest: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(w in err for w in words), err
    return err


def _config(tmp_path: Path, run: str = "", reference: str = f'url = "{DEAD}"', extra: str = "") -> Path:
    """A config over running servers (nothing is launched), with `run` / `extra` lines added."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the quick brown fox"}) + "\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[run]\nprompts = ["p.jsonl"]\n{run}\n[reference]\n{reference}\n'
        f'[[target]]\nname = "t"\nurl = "{DEAD}"\n{extra}'
    )
    return cfg


# ----------------------------------------------------------------------------- 1: logprobs 0


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--ref", DEAD, "--target", DEAD, "--prompt", "The capital of France is"],
        ["compare", "--ref", DEAD, "--target", DEAD, "--prompts", "p.jsonl"],
        ["record", "--ref", DEAD, "--prompts", "p.jsonl"],
    ],
    ids=["quick-look", "compare", "record"],
)
def test_logprobs_0_is_refused_on_the_cli(argv: list[str], capsys) -> None:
    """The bug: empty continuations, 100% token match, exit 0 (a bogus FAIL in full runs)."""
    assert main([*argv, "--logprobs", "0"]) == 2
    _one_error(capsys, "--logprobs must be in 1..20", "read from the logprobs block", "got 0")


def test_logprobs_0_is_refused_in_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'logprobs' must be in 1\.\.20 \(the continuation's tokens"):
        load_config(_config(tmp_path, run="logprobs = 0"))
    assert load_config(_config(tmp_path, run="logprobs = 1")).run.logprobs == 1


# ----------------------------------------------------------------------------- 2: malformed URLs


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["probe", "http://127.0.0.1:99999"], "port '99999' is not a number in 1..65535"),
        (["probe", "http://"], "it names no host"),
        (["probe", "http:///x"], "it names no host"),
        (["compare", "--ref", DEAD, "--target", "http://127.0.0.1:abc", "--prompt", "hi"], "port 'abc'"),
        (["compare", "--ref", "http://[::1", "--target", DEAD, "--prompt", "hi"], "Invalid IPv6 URL"),
        (["layers", "--ref", DEAD, "--target", "http://[::1"], "Invalid IPv6 URL"),
        (["quant", "--target", "http://127.0.0.1:99999"], "port '99999'"),
        (["record", "--ref", "http://127.0.0.1:abc", "--prompts", "p.jsonl"], "port 'abc'"),
    ],
)
def test_malformed_urls_are_usage_errors(argv: list[str], why: str, capsys) -> None:
    """The bug: OverflowError / httpx.InvalidURL tracebacks; `http://` an exit 3 "server down"."""
    assert main(argv) == 2
    _one_error(capsys, "is not a valid http(s) URL: ", why)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1", "http://"])
def test_malformed_url_in_a_config_names_the_key(url: str, tmp_path: Path, capsys) -> None:
    assert main(["run", str(_config(tmp_path, reference=f'url = "{url}"'))]) == 2
    _one_error(capsys, "c.toml:5: [reference] key 'url': ", "is not a valid http(s) URL")


@pytest.mark.parametrize(
    ("argv", "route", "base"),
    [
        (["probe", "http://127.0.0.1:9/v1/completions"], "/completions", "http://127.0.0.1:9/v1"),
        (["compare", "--ref", DEAD, "--target", "http://127.0.0.1:9/v1/chat/completions/", "--prompt", "hi"],
         "/chat/completions", "http://127.0.0.1:9/v1"),
    ],
)  # fmt: skip
def test_a_route_given_as_a_server_url_is_a_usage_error_naming_the_base(argv, route, base, capsys) -> None:  # noqa: ANN001
    """(t21) `--target http://h:p/v1/completions` (what a curl line holds) was exit 3, "up but broken:
    HTTP 404 on /health": difftest joins its routes to the URL."""
    assert main(argv) == 2
    _one_error(
        capsys, f"names the route {route}; give the server's base URL ({base}), difftest adds the routes", ""
    )


# ----------------------------------------------------------------------------- 3: -o uncreatable

_OUT_COMMANDS = [
    ["run", "c.toml"],
    ["compare", "--ref", DEAD, "--target", DEAD, "--prompt", "hi"],
    ["record", "--ref", DEAD],
    ["report", "a"],
    ["diff", "a", "b"],
]


@pytest.mark.parametrize("argv", _OUT_COMMANDS, ids=lambda a: a[0])
def test_an_output_folder_that_cannot_be_made_is_refused(argv: list[str], tmp_path: Path, capsys) -> None:
    """The bug: NotADirectoryError / FileNotFoundError tracebacks (after the requests, for some)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "sub" / "dir"
    assert main([*argv, "-o", str(out)]) == 2
    _one_error(capsys, f"cannot create folder {out}: {afile} is not a folder")
    if Path("/proc/self").is_dir():
        assert main([*argv, "-o", "/proc/difftest-x"]) == 2
        _one_error(capsys, "cannot create folder /proc/difftest-x")


def test_checking_an_output_folder_leaves_nothing_behind(tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "deeper"
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 2
    _one_error(capsys, "no such report")
    assert not (tmp_path / "new").exists()


def test_a_config_output_dir_that_cannot_be_made_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["run", str(_config(tmp_path, run='output_dir = "afile/out"'))]) == 2
    _one_error(capsys, "run.output_dir: cannot create folder", "is not a folder")


# ----------------------------------------------------------------------------- 4: quick look refused


def test_quick_look_with_every_request_refused_is_exit_2(capsys) -> None:
    """The bug: every request refused (max_tokens over the cap, a prompt over the context) and the
    quick look said exit 0, `--json` exit_code 0."""
    with (
        live_fake(FakeBehaviour(max_tokens_cap=64)) as ref,
        live_fake(FakeBehaviour(max_tokens_cap=64)) as tgt,
    ):
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompt", "hello there", "--max-tokens", "5000"]
        assert main([*argv, "--json"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and "every request was refused as invalid" in out.err
        assert "RequestRejected" in out.err and out.err.count("\n") == 1
        assert main([*argv[:-2], "--max-tokens", "4"]) == 0  # the same servers answer a valid request


# ----------------------------------------------------------------------------- 5: rates over 1


@pytest.mark.parametrize(
    "line",
    [
        "top1_min = 1.5",
        "token_match_min = 95",
        "failed_rate_max = 5",
        "accuracy.top1_agreement = 90",
        "[thresholds.fp8-block]\nbroken_rate_max = 2",
    ],
)
def test_rate_thresholds_over_1_are_refused(line: str, tmp_path: Path, capsys) -> None:
    """The bug: `top1_min = 1.5` was judged as a 150% limit (and 95 as 9500%)."""
    assert main(["run", str(_config(tmp_path, extra=f"[thresholds]\n{line}\n"))]) == 2
    _one_error(capsys, "must be in 0..1 (a fraction, not a percent)")
    body = tmp_path / "th.toml"
    body.write_text(line + "\n")
    with pytest.raises(ConfigError, match=r"must be in 0\.\.1 \(a fraction, not a percent\)"):
        load_thresholds(body)


def test_rates_of_1_and_non_rates_over_1_are_kept(tmp_path: Path) -> None:
    body = tmp_path / "th.toml"
    body.write_text("top1_min = 1\nkl_mean_max = 2.5\nbleu_min = 30\nmargin = 3\n")
    assert load_thresholds(body)["default"] == {
        "top1_min": 1.0,
        "kl_mean_max": 2.5,
        "bleu_min": 30.0,
        "margin": 3.0,
    }


def test_verdict_refuses_rate_overrides_over_1() -> None:
    """Overrides that reach the verdict without a config (a report.json's stored thresholds)."""
    with pytest.raises(ConfigError, match=r"token_match_min must be in 0\.\.1"):
        budget_for("fp8-block", {"token_match_min": 95})
    assert budget_for("fp8-block", {"token_match_min": 0.5}).token_match_min == 0.5


# ----------------------------------------------------------------------------- 6: prompt not UTF-8


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--ref", DEAD, "--target", DEAD, "--prompt", "ab\udcffcd"],
        ["layers", "--ref", DEAD, "--target", DEAD, "--prompt", "\udcff\udcfe"],
    ],
    ids=["compare", "layers"],
)
def test_a_prompt_that_is_not_utf8_is_refused(argv: list[str], capsys) -> None:
    """The bug: bytes that are not UTF-8 in argv (surrogates) were a UnicodeEncodeError traceback."""
    assert main(argv) == 2
    _one_error(capsys, "prompt is not valid UTF-8")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_a_stdin_prompt_that_is_not_utf8_is_refused(errors: str, monkeypatch, capsys) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"ab\xffcd"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["compare", "--ref", DEAD, "--target", DEAD, "--prompt", "-"]) == 2
    _one_error(capsys, "--prompt -: prompt is not valid UTF-8")


# ----------------------------------------------------------------------------- 7: noise hint


def test_noise_hint_names_the_floor_relative_to_the_config(tmp_path: Path, monkeypatch, capsys) -> None:
    """The bug: the hint named the floor relative to the working directory, but a config's paths
    are relative to the config's folder (`cd /tmp && difftest noise explore/c.toml -o explore/nz`)."""
    from difftest.cli.noise import config_relative

    work = tmp_path / "explore"
    work.mkdir()
    monkeypatch.chdir(tmp_path)
    with live_fake() as ref:
        cfg = _config(work, reference=f'url = "{ref}"')
        assert main(["noise", "explore/c.toml", "--no-restart", "-o", "explore/nz2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert 'set run.noise_floor = "nz2/noise-floor.json"' in out
    assert load_config(cfg).run.noise_floor is None  # (the config itself is untouched)
    elsewhere = tmp_path / "other" / "noise-floor.json"
    assert config_relative(elsewhere, cfg) == elsewhere.resolve()  # not below it: absolute


# ----------------------------------------------------------------------------- 8: message braces


def test_auto_golden_error_shows_single_braces() -> None:
    from server_shim.launch_spec import ServerSpec, SpecError, auto_golden

    with pytest.raises(SpecError) as info:
        auto_golden(ServerSpec(name="t", url=DEAD))
    assert "golden = { command = ... } or { url = ... }" in str(info.value) and "{{" not in str(info.value)


# ----------------------------------------------------------------------------- 9: command templates


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("echo {port} 'unterminated", "key 'command' cannot be split into arguments: No closing quotation"),
        ("echo {port} {nope}", "key 'command' has an unknown placeholder {nope}"),
    ],
)
def test_a_bad_command_template_names_the_key(command: str, words: str, tmp_path: Path, capsys) -> None:
    """The bugs: a ValueError traceback from shlex; `{nope}` passed to the engine literally."""
    assert main(["run", str(_config(tmp_path, reference=f'command = "{command}"'))]) == 2
    _one_error(capsys, "c.toml:5: [reference] ", words)


def test_json_and_known_placeholders_in_a_command_are_kept(tmp_path: Path) -> None:
    command = """{python} -m eng --port {port} --host {host} --cfg '{\\"a\\": {\\"b\\": 1}}' --t '{{x}}'"""
    assert load_config(_config(tmp_path, reference=f'command = "{command}"')).reference.command


def test_an_empty_output_folder_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`-o ""` (an unset variable) wrote the report into the working directory."""
    argv = ["compare", "--ref", DEAD, "--target", DEAD, "--prompt", "hi", "-o"]
    assert main([*argv, ""]) == 2
    assert "empty path" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("piped", "asked"),
    [("The capital of France is\n", "The capital of France is"), ("a\r\n", "a"), ("two\nlines\n\n", "two\nlines\n"),
     ("no break", "no break")],
)  # fmt: skip
def test_a_stdin_prompt_loses_one_final_line_break(piped: str, asked: str, monkeypatch) -> None:
    """(t21) `echo TEXT | difftest compare --prompt -` asked for "TEXT\\n": another continuation than
    `--prompt TEXT`. One final line break goes, as the shell's $(...) reads it; the rest stays."""
    from difftest.cli.compare import prompt_texts

    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    assert [p.prompt for p in prompt_texts(["-"])] == [asked]


def test_layers_takes_one_prompt_and_reads_dash_from_stdin(monkeypatch, capsys) -> None:  # noqa: ANN001
    """(t23) a second `--prompt` silently replaced the first, and `--prompt -` captured the text "-"."""
    from difftest.cli.layers import DEFAULT_PROMPT, one_prompt

    assert main(["layers", "--ref", DEAD, "--target", DEAD, "--prompt", "a", "--prompt", "b"]) == 2
    _one_error(capsys, "--prompt: layers captures the activations of one prompt; give it once")
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    assert one_prompt(["-"]) == "from stdin"
    assert one_prompt(None) == DEFAULT_PROMPT and one_prompt("x") == "x" and one_prompt(["y"]) == "y"
    with pytest.raises(UsageError, match="empty prompt text"):
        one_prompt([" "])
