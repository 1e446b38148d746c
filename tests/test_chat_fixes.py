"""Chat answers judged as completions answers are: one that holds no text (null content, a refusal,
tool calls, content parts, a message that is a string) or whose logprobs cannot be its text's tokens
is a broken answer naming why, never a PASS on nothing; the index-0 choice is read; a chat pair
is not warned about an echo it cannot have; a conversation is never flattened into a completions
prompt; a character split over tokens belongs to the token that completes it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeServer
from quirk_fakes import chat_response, live_app, quirk_app

from difftest.cli import main
from difftest.client import read_choices
from difftest.collect import Endpoint, generate, generate_all
from difftest.conformance import Capabilities
from difftest.errors import UsageError
from difftest.prompts import Prompt, load_prompts
from difftest.tokenizer_check import check_pair
from difftest.tokens_view import parse_content

Mutate = Callable[[dict[str, Any], dict[str, Any]], None]


class _ChatStub:
    """A chat server (the fakes' greedy model) whose answers `mutate` changes in place."""

    name = "tgt"

    def __init__(self, mutate: Mutate) -> None:
        self.server, self.mutate, self.asked = FakeServer(), mutate, 0

    async def post_choices(self, path: str, body: dict[str, Any], *, retries: int | None = None) -> Any:
        """The mutated answer through the client's own reading of a 200 body."""
        assert path == "/v1/chat/completions"
        self.asked += 1
        resp = chat_response(self.server, dict(body))
        self.mutate(resp, body)
        return read_choices(json.dumps(resp).encode(), self.name, path)

    choices = post_choices  # chat generations go through the client's cached `choices`

    async def completions(self, payload: dict[str, Any], **_: Any) -> Any:
        self.asked += 1
        raise AssertionError("no completions request expected")


def _endpoint(mutate: Mutate, api: str = "chat") -> Endpoint:
    caps = Capabilities(name="tgt", url="http://127.0.0.1:1", model=None, logprobs_cap=5, api=api)
    return Endpoint("tgt", _ChatStub(mutate), caps)  # type: ignore[arg-type]


async def _generate(mutate: Mutate, prompt: Prompt | None = None) -> Any:
    ep = _endpoint(mutate)
    return await generate(ep, prompt or Prompt("p", "the quick"), max_tokens=6, k=5, seed=0)


def _choice(resp: dict[str, Any]) -> dict[str, Any]:
    return resp["choices"][0]


def _set(path: str, value: Any) -> Mutate:
    def mutate(resp: dict[str, Any], _: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        obj = _choice(resp)
        for p in parents:
            obj = obj[p]
        obj[key] = value(obj[key]) if callable(value) else value

    return mutate


def _tool_calls(resp: dict[str, Any], _: dict[str, Any]) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msg = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    _choice(resp).update(message=msg, finish_reason="tool_calls", logprobs=None)


def _refusal(resp: dict[str, Any], _: dict[str, Any]) -> None:
    _choice(resp)["message"].update(content=None, refusal="I can't help")


NO_TEXT = [
    ("null content", _set("message.content", None), "answer without message content: content is null"),
    ("refusal", _refusal, "answer without message content: a refusal, not text: \"I can't help\""),
    ("message a string", _set("message", "hello"), "message is str, not an object"),
    ("content parts", _set("message.content", lambda c: [{"type": "text", "text": c}]),
     "content is a list, not a string"),
    ("tool calls", _tool_calls, "tool calls, not text (finish_reason=tool_calls)"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "why"), [c[1:] for c in NO_TEXT], ids=[c[0] for c in NO_TEXT])
async def test_a_chat_answer_without_text_is_broken_naming_why(mutate: Mutate, why: str) -> None:
    """The bug: content became None and passed as "no tokens" on both sides (token match 100%),
    tool calls as a kernel FAIL (token match 0%)."""
    gen = await _generate(mutate)
    assert gen.broken and gen.text is None and len(gen.view) == 0
    assert gen.error is not None and "tgt: /v1/chat/completions" in gen.error and why in gen.error, gen.error


def _half(resp: dict[str, Any], _: dict[str, Any]) -> None:
    entries = _choice(resp)["logprobs"]["content"]
    _choice(resp)["logprobs"]["content"] = entries[: len(entries) // 2]


def _extra(resp: dict[str, Any], _: dict[str, Any]) -> None:
    entries = _choice(resp)["logprobs"]["content"]
    entries.append(copy.deepcopy(entries[-1]))


def _ignore_max_tokens(resp: dict[str, Any], body: dict[str, Any]) -> None:
    resp.update(chat_response(FakeServer(), {**body, "max_tokens": 30}))


def _list_block(resp: dict[str, Any], _: dict[str, Any]) -> None:
    _choice(resp)["logprobs"] = _choice(resp)["logprobs"]["content"]


BAD_LOGPROBS = [
    ("half", _half, 'text and logprobs disagree: 3 logprob tokens for max_tokens=6 with finish_reason "length"'),
    ("dropped", _set("logprobs", None), "text and logprobs disagree: no logprob tokens for"),
    ("a list", _list_block, "UnreadableBody: tgt: malformed logprobs block: expected an object, got list"),
    ("one extra", _extra, '7 logprob tokens for max_tokens=6 with finish_reason "length" (more tokens'),
    ("max_tokens ignored", _ignore_max_tokens, "30 logprob tokens for max_tokens=6"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "why"), [c[1:] for c in BAD_LOGPROBS], ids=[c[0] for c in BAD_LOGPROBS])
async def test_chat_logprobs_that_cannot_be_the_text_are_broken_as_over_completions(
    mutate: Mutate, why: str
) -> None:
    """The completions path's coverage check (collect.generate) now runs on chat answers too;
    before, half the tokens scored 50%, none read as "no logprobs" and passed."""
    good = await _generate(lambda r, b: None)
    assert good.error is None and len(good.view) == 6 and good.finish_reason == "length"
    gen = await _generate(mutate)
    assert gen.broken and gen.error is not None and why in gen.error, gen.error


async def test_the_index_0_chat_choice_is_read_wherever_it_stands() -> None:
    def reversed_choices(resp: dict[str, Any], _: dict[str, Any]) -> None:
        other = {"index": 1, "message": {"role": "assistant", "content": "garbage"}, "finish_reason": "stop"}
        resp["choices"].insert(0, other)

    good, gen = await _generate(lambda r, b: None), await _generate(reversed_choices)
    assert gen.error is None and gen.text == good.text != "garbage" and gen.keys == good.keys


async def test_a_200_without_choices_is_a_failed_request_as_over_completions() -> None:
    gen = await _generate(lambda r, b: r.pop("choices"))
    assert gen.error is not None and "answered 200 without a 'choices' list" in gen.error and not gen.broken


# ----------------------------------------------------------------------------- split characters


def test_a_split_character_belongs_to_the_token_that_completes_it() -> None:
    """Each token's bytes decoded alone dropped the split "日" and shifted every later text:
    ('', '', '日', '本x') before."""
    entries = [
        {"token": "", "bytes": [230, 151], "logprob": -0.1},
        {"token": "", "bytes": [165], "logprob": -0.1},
        {"token": "本", "bytes": list("本".encode()), "logprob": -0.1},
        {"token": "x", "bytes": [120], "logprob": -0.1},
    ]
    view = parse_content(entries, text="日本x")
    assert view.token_texts() == ("", "日", "本", "x")
    assert [p.text_offset for p in view.positions] == [0, 0, 1, 2]


# ----------------------------------------------------------------------------- pair warnings


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


async def test_a_chat_pair_is_not_warned_about_echo() -> None:
    """Every chat pair read "echo not trusted on ref, target": no chat server has an echo."""
    ref = Capabilities(name="ref", url="u", model=None, api="chat")
    tgt = Capabilities(name="tgt", url="u", model=None, api="chat")
    pc = await check_pair((_Named("ref"), ref), (_Named("tgt"), tgt))  # type: ignore[arg-type]
    assert not pc.teacher_forced and not any("echo not trusted" in w for w in pc.warnings), pc.warnings
    plain = Capabilities(name="tgt", url="u", model=None)  # over completions the warning stays
    pc = await check_pair((_Named("ref"), plain), (_Named("tgt"), plain))  # type: ignore[arg-type]
    assert any("echo not trusted on ref, tgt" in w for w in pc.warnings)


# ----------------------------------------------------------------------------- conversations


def _conversation_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.jsonl"
    lines = [
        {"id": "plain", "prompt": "the quick"},
        {"id": "conv", "messages": [{"role": "user", "content": "hi"}]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_a_conversation_is_refused_over_completions(tmp_path: Path) -> None:
    path = _conversation_file(tmp_path)
    message = f"{path}:2: prompt 'conv' has messages: they need endpoint = \"chat\" (--endpoint chat)"
    with pytest.raises(UsageError) as exc:
        load_prompts(path, endpoint="completions")
    assert str(exc.value) == message
    assert len(load_prompts(path, endpoint="chat")) == len(load_prompts(path)) == 2


async def test_generations_over_completions_refuse_a_conversation_before_any_request(tmp_path: Path) -> None:
    """Before: sent as "user: hi", a prompt no chat server would see, compared as if it were one."""
    prompts = load_prompts(_conversation_file(tmp_path))
    ep = _endpoint(lambda r, b: None, api="completions")
    with pytest.raises(UsageError, match='has messages: they need endpoint = "chat"'):
        await generate_all(ep, prompts, max_tokens=6, k=5, seed=0)
    with pytest.raises(UsageError, match='has messages: they need endpoint = "chat"'):
        await generate(ep, prompts[1], max_tokens=6, k=5, seed=0)
    assert ep.client.asked == 0  # type: ignore[attr-defined]


def test_compare_over_completions_with_a_conversation_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    path = _conversation_file(tmp_path)
    with live_app(quirk_app()) as ref, live_app(quirk_app()) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(path), "--scheme", "none"]
        code = main([*argv, "--max-tokens", "4", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().endswith("prompt 'conv' has messages: they need endpoint = \"chat\" (--endpoint chat)")


# ----------------------------------------------------------------------------- probe


def test_probe_over_chat(capsys) -> None:
    """`probe --endpoint chat` runs the probe a chat run runs (before: an unknown flag, exit 2)."""
    with live_app(quirk_app(completions=False)) as url:
        code = main(["probe", url, "--endpoint", "chat", "--json"])
    out = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c["status"] for c in out["checks"]}
    assert code == 0 and out["endpoint"] == "chat"
    assert checks["chat completions"] == "ok" and checks["echo"] == "n/a"


def test_an_empty_chat_reply_to_the_first_probe_text_is_no_missing_logprobs(capsys) -> None:
    """The bug: the chat probe read logprob support from one reply to its first text, and a model
    that ends at once there (an empty reply, ordinary after a finished sentence) was "no chat
    logprobs": TIE/DRIFT off for a server that serves them. The next text that generates is asked;
    where none does, support is unverified (a warning), never "no logprobs"."""
    from difftest.conformance import DEFAULT_PROBES, GENERATING_FALLBACKS

    with live_app(quirk_app(completions=False, chat_empty_for=DEFAULT_PROBES[:1])) as url:
        assert main(["probe", url, "--endpoint", "chat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["capabilities"]["logprobs_cap"] == 20, out
    every = (*DEFAULT_PROBES, *GENERATING_FALLBACKS)
    with live_app(quirk_app(completions=False, chat_empty_for=every)) as url:
        main(["probe", url, "--endpoint", "chat", "--json"])
    out = json.loads(capsys.readouterr().out)
    cap = {c["check"]: c for c in out["checks"]}["top_logprobs cap"]
    assert (
        out["capabilities"]["logprobs_cap"] == 20
        and cap["status"] == "warn"
        and "no probe text generated" in cap["detail"]
    ), out
