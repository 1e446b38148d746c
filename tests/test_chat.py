"""Comparing servers over /v1/chat/completions: agreeing chat servers pass, a faulty one fails, and
the report says teacher forcing is unavailable (the chat protocol has no echo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from quirk_fakes import live_app, quirk_app

from difftest.chat import NO_BATCH_SLOTS, NO_TEACHER_FORCING, parse_chat_choice
from difftest.cli import main
from difftest.report import load_run

CONVERSATIONS = [
    [{"role": "user", "content": "the quick brown fox"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2+3="}],
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "user", "content": "a fox jumps over"}],
]


def write_prompts(path: Path) -> Path:
    lines = [json.dumps({"id": f"c{i}", "messages": m}) for i, m in enumerate(CONVERSATIONS)]
    lines.append(json.dumps({"id": "plain", "prompt": "the lazy dog is"}))  # one user message
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_chat_choice_rebuilds_offsets_and_ids() -> None:
    choice = {
        "message": {"role": "assistant", "content": "héllo"},
        "logprobs": {
            "content": [
                {"token": "token_id:5", "logprob": -0.1, "bytes": list(b"h"), "top_logprobs": [
                    {"token": "token_id:5", "logprob": -0.1}, {"token": "token_id:9", "logprob": -2.5}]},
                {"token": "token_id:7", "logprob": -0.2, "bytes": list("éllo".encode()), "top_logprobs": []},
            ]
        },
    }  # fmt: skip
    text, view = parse_chat_choice(choice)
    assert text == "héllo" and view.token_ids == (5, 7)
    assert view.positions[0].top == {5: -0.1, 9: -2.5}
    assert view.token_texts() == ("h", "éllo")
    assert parse_chat_choice({"message": {"content": "x"}, "logprobs": None})[1].positions == ()


@pytest.mark.parametrize(("target", "code"), [(FakeBehaviour(), 0), (FakeBehaviour(flip_every=2), 1)])
def test_chat_comparison(tmp_path: Path, target: FakeBehaviour, code: int, capsys) -> None:
    prompts = write_prompts(tmp_path / "chat.jsonl")
    out = tmp_path / "out"
    # chat-only servers: /v1/completions answers 404, so nothing can come from there
    with live_app(quirk_app(completions=False)) as ref, live_app(quirk_app(target, completions=False)) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--endpoint", "chat"]
        assert main([*argv, "--scheme", "none", "--max-tokens", "10", "-o", str(out), "--json"]) == code
    summary = json.loads(capsys.readouterr().out)
    assert summary["targets"][0]["verdict"] == ("PASS" if code == 0 else "FAIL")
    run = load_run(out)
    t = run.targets[0]
    acc = t.comparison("accuracy")
    assert acc is not None and acc.aggregate["n_prompts"] == len(CONVERSATIONS) + 1
    assert acc.aggregate["failed_requests"] == 0
    assert (acc.aggregate["token_match"] == 1.0) == (code == 0)
    assert acc.aggregate.get("kl_mean") is None  # no teacher forcing over chat ...
    skipped = {p.part: p.skipped for p in t.verdict.parts}  # type: ignore[union-attr]
    assert NO_TEACHER_FORCING in json.dumps(run.to_dict())  # ... and the report says why
    assert run.signature["run"]["endpoint"] == "chat" and "accuracy" in skipped
    assert skipped.get("invariance") == NO_BATCH_SLOTS  # a skipped part, not a conformance note
    if code:  # divergences classified from the served top_logprobs
        assert any(p.divergence_kind for p in acc.prompts)


def test_chat_only_server_over_completions_is_a_clear_exit_2(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "plain.jsonl"  # conversations over completions are refused on their own
    prompts.write_text(json.dumps({"id": "plain", "prompt": "the lazy dog is"}) + "\n")
    with live_app(quirk_app(completions=False)) as ref, live_app(quirk_app(completions=False)) as tgt:
        code = main(
            ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "-o", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert code == 2 and "cannot serve /v1/completions" in err and err.count("\n") == 1


def test_chat_baseline_replays(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "chat.jsonl")
    with live_app(quirk_app()) as ref:
        argv = [
            "record",
            "--ref",
            ref,
            "--prompts",
            str(prompts),
            "--endpoint",
            "chat",
            "-o",
            str(tmp_path / "b"),
        ]
        assert main(argv) == 0
    with live_app(quirk_app(FakeBehaviour(flip_every=2))) as tgt:
        assert (
            main(["compare", "--baseline", str(tmp_path / "b"), "--target", tgt, "-o", str(tmp_path / "o")])
            == 1
        )
    assert load_run(tmp_path / "o").signature["run"]["endpoint"] == "chat"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"id": "x", "messages": []}, "non-empty list"),
        ({"id": "x", "messages": [{"role": "robot", "content": "hi"}]}, "role must be one of"),
        ({"id": "x", "messages": [{"role": "user"}]}, "exactly 'role' and 'content'"),
    ],
)
def test_bad_messages_are_one_line_exit_2(tmp_path: Path, line: dict, message: str, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    code = main(
        [
            "compare",
            "--ref",
            "http://127.0.0.1:9",
            "--target",
            "http://127.0.0.1:9",
            "--prompts",
            str(prompts),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
