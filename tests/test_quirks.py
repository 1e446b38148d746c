"""Each conformance quirk of a real server degrades the comparison to what the server supports and
says so (probe table, report.json); none ends a still-possible comparison with a wrong diagnosis,
and none hides a real fault. One fake per quirk (tests/quirk_fakes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from quirk_fakes import live_app, quirk_app

from difftest.cli import main
from difftest.report import load_run

PROMPTS = ["1+2+3=", "the quick brown fox", "def add(a, b):", "the lazy dog is", "a fox jumps over"]

# quirk -> (quirk_app arguments, probe row that must say so, its status, words in the report)
QUIRKS = {
    "logprobs_ignored": (
        {"ignore_logprobs": True},
        "logprobs cap",
        "fail",
        "returns no tokens (no logprobs): its continuations were tokenized with its own /tokenize",
    ),
    "echo_zero_500": ({"echo_zero_500": True}, "echo", "fail", "no echo: teacher-forced metrics disabled"),
    "max_tokens_zero_unlimited": (
        {"zero_unlimited": True, "behaviour": FakeBehaviour(tokenize=False)},
        "echo",
        "warn",
        "max_tokens=0 is treated as no limit",
    ),
    "zero_unlimited_strings_only": (
        {"zero_unlimited": True, "behaviour": FakeBehaviour(tokenize=False, token_ids=False)},
        "echo",
        "warn",
        "max_tokens=0 is treated as no limit",
    ),
    "transformers_serve_like": (  # all of transformers serve's gaps at once, no /tokenize either
        {"ignore_logprobs": True, "echo_zero_500": True, "behaviour": FakeBehaviour(tokenize=False)},
        "logprobs cap",
        "fail",
        "tokenized with reference's /tokenize",
    ),
}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quirks") / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return path


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_quirky_server_of_the_same_model_passes_and_says_why(
    quirk: str, prompts: Path, tmp_path: Path, capsys
) -> None:
    kwargs, row, status, words = QUIRKS[quirk]
    with live_app(quirk_app()) as ref, live_app(quirk_app(**kwargs)) as tgt:
        assert main(["probe", tgt, "--json"]) in (0, 1)
        table = json.loads(capsys.readouterr().out)
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--scheme", "fp8-block"]
        code = main([*argv, "--max-tokens", "10", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert table["exit_code"] == (1 if status == "fail" else 0)
    checks = {c["check"]: c for c in table["checks"]}
    assert checks[row]["status"] == status
    run = load_run(tmp_path / "o")
    acc = run.targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["token_match"] == 1.0 and acc.aggregate["failed_requests"] == 0
    assert words in json.dumps(run.to_dict())


@pytest.mark.parametrize(
    "quirk", ["logprobs_ignored", "transformers_serve_like", "max_tokens_zero_unlimited"]
)
def test_quirks_do_not_hide_a_fault(quirk: str, prompts: Path, tmp_path: Path) -> None:
    kwargs = dict(QUIRKS[quirk][0])
    kwargs["behaviour"] = kwargs.get("behaviour", FakeBehaviour()).replace(flip_every=2)
    with live_app(quirk_app()) as ref, live_app(quirk_app(**kwargs)) as tgt:  # the tight "none" budget
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--scheme", "none"]
        assert main([*argv, "--max-tokens", "10", "-o", str(tmp_path / "o")]) == 1
    acc = load_run(tmp_path / "o").targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["token_match"] < 0.7


def test_chat_server_ignoring_logprobs_is_tokenized_by_its_partner(prompts: Path, tmp_path: Path) -> None:
    app = quirk_app(FakeBehaviour(tokenize=False), completions=False, ignore_logprobs=True)
    with live_app(quirk_app(completions=False)) as ref, live_app(app) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--endpoint", "chat"]
        assert main([*argv, "--scheme", "fp8-block", "-o", str(tmp_path / "o")]) == 0
    run = load_run(tmp_path / "o")
    assert run.targets[0].comparison("accuracy").aggregate["token_match"] == 1.0  # type: ignore[union-attr]
    assert "tokenized with reference's /tokenize" in json.dumps(run.to_dict())


@pytest.mark.parametrize(("flip", "code"), [(0, 0), (2, 1)])
def test_no_tokenizer_anywhere_compares_word_by_word(
    flip: int, code: int, prompts: Path, tmp_path: Path
) -> None:
    ref_app = quirk_app(FakeBehaviour(tokenize=False))
    tgt_app = quirk_app(
        FakeBehaviour(tokenize=False, flip_every=flip), ignore_logprobs=True, echo_zero_500=True
    )
    with live_app(ref_app) as ref, live_app(tgt_app) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--scheme", "none"]
        assert main([*argv, "--max-tokens", "10", "-o", str(tmp_path / "o")]) == code
    run = load_run(tmp_path / "o")
    acc = run.targets[0].comparison("accuracy")
    assert acc is not None and (acc.aggregate["token_match"] == 1.0) == (code == 0)
    assert "compared word by word" in json.dumps(run.to_dict())


def test_another_chat_template_is_named(prompts: Path, tmp_path: Path) -> None:
    """Same model, but the target's chat template adds a preamble: the model sees other input, and
    the report says so (usage.prompt_tokens differ by a constant) beside the failing verdict."""
    tgt_app = quirk_app(completions=False, chat_prefix="system: you are a helpful assistant\n")
    with live_app(quirk_app(completions=False)) as ref, live_app(tgt_app) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--endpoint", "chat"]
        main([*argv, "--scheme", "none", "--max-tokens", "10", "-o", str(tmp_path / "o")])
    text = json.dumps(load_run(tmp_path / "o").to_dict())
    assert "prompt token(s) on every prompt against reference (usage.prompt_tokens)" in text


def test_prompt_counts_vouch_for_an_unverifiable_tokenizer(prompts: Path, tmp_path: Path) -> None:
    kwargs = QUIRKS["transformers_serve_like"][0]
    with live_app(quirk_app()) as ref, live_app(quirk_app(**kwargs)) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--scheme", "none"]
        assert main([*argv, "--max-tokens", "6", "-o", str(tmp_path / "o")]) == 0
    text = json.dumps(load_run(tmp_path / "o").to_dict())
    assert "could not be compared" in text  # the probe had nothing to compare the tokenizers by ...
    assert (
        f"prompt token counts (usage.prompt_tokens) of reference and target agree on all {len(PROMPTS)}"
        in text
    )
