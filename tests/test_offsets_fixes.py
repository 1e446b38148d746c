"""`text_offset` as servers really count it (tester t10, items 1 and 2).

Token texts were cut from a choice's text at the server's offsets, never checked:
- OpenAI's legacy convention counts them from the prompt's start even without echo, so every cut
  of a continuation was "" on both sides: different answers scored token match 100%, PASS;
- vLLM with token ids advances them by len("token_id:N"), so its first token held the whole text:
  against a server sending token strings, identical answers scored token match 0%, FAIL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBehaviour, FakeServer, rewritten_completions
from fastapi import FastAPI
from quirk_fakes import live_app

from difftest.cli import main
from difftest.collect import Endpoint, Generation
from difftest.conformance import Capabilities
from difftest.prompts import Prompt
from difftest.report import load_run
from difftest.retokenize import Retokenizer, unreadable
from difftest.scoring import score_prompt
from difftest.tokens_view import parse_content, parse_logprobs


def _gen(tokens: Sequence[str], offsets: Sequence[int], text: str) -> Generation:
    block = {"tokens": list(tokens), "token_logprobs": [-0.1] * len(tokens), "text_offset": list(offsets)}
    return Generation(text, parse_logprobs(block, text=text), "length")


def _running(tokens: Sequence[str], start: int = 0) -> list[int]:
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


def _match(ref: Generation, tgt: Generation) -> float | None:
    d = score_prompt(Prompt("p1", "q"), ref, tgt, ref_forced=None, tgt_forced=None, k=None)
    return d.match_rate


# ----------------------------------------------------------------------------- item 1: prompt-start offsets


def test_offsets_counted_from_the_prompt_start_cut_the_continuation() -> None:
    """Prompt "p1 prompt" (9 characters): offsets 9, 11 cut text[9:11] = "" before."""
    view = parse_logprobs({"tokens": [" a", " b"], "text_offset": [9, 11]}, text=" a b")
    assert view.token_texts() == (" a", " b")


def test_different_answers_with_prompt_start_offsets_do_not_match() -> None:
    """ref " a b c d" vs tgt " a z c": positions 0 and 2 agree, 2 of the longer 4 = 0.5
    (every cut was "" before: 3 of 4 = 0.75)."""
    ref_toks, tgt_toks = [" a", " b", " c", " d"], [" a", " z", " c"]
    ref = _gen(ref_toks, _running(ref_toks, start=9), " a b c d")
    tgt = _gen(tgt_toks, _running(tgt_toks, start=9), " a z c")
    assert _match(ref, tgt) == 0.5


@pytest.mark.parametrize(("offsets", "why"), [([0, 3, 2], "going back"), ([0, 2, 9], "past the text's end")])
def test_offsets_that_cannot_be_starts_cut_nothing(offsets: list[int], why: str) -> None:
    view = parse_logprobs({"tokens": ["<0xC3>", "<0xA9>", "x"], "text_offset": offsets}, text="éxy")
    assert view.token_texts() == (None, None, None), why


def test_token_strings_that_spell_the_text_overrule_offsets_that_do_not() -> None:
    """Offsets 0, 1 for " a", " b": the cut gave " " and "a b"; the tokens are the text."""
    gen = _gen([" a", " b"], [0, 1], " a b")
    assert gen.view.token_texts() == (None, None)
    assert gen.display_tokens() == [" a", " b"]


def test_byte_pieces_and_markers_are_still_cut_by_trustworthy_offsets() -> None:
    """Why cut texts exist: two servers name one byte piece differently, the cut reads alike."""
    a = parse_logprobs({"tokens": ["a", "<0xC3>", "<0xA9>"], "text_offset": [0, 1, 1]}, text="aé")
    b = parse_logprobs({"tokens": ["a", "bytes:\\xc3", "bytes:\\xa9"], "text_offset": [5, 6, 6]}, text="aé")
    assert a.token_texts() == b.token_texts() == ("a", "", "é")
    marker = parse_logprobs({"tokens": ["\u2581the", "\u2581cat"], "text_offset": [0, 4]}, text=" the cat")
    assert marker.token_texts() == (" the", " cat")  # "▁the" is as long as " the"


# ----------------------------------------------------------------------------- item 2: vLLM's label offsets

IDS = ["token_id:11", "token_id:22", "token_id:33"]


def test_offsets_that_count_token_id_labels_cut_nothing() -> None:
    """vLLM: 0, 11, 22 (len "token_id:11" = 11). Within a short text the first token held it all
    (" ab c", "", ""); within a long one every cut is misplaced."""
    short = parse_logprobs({"tokens": IDS, "text_offset": _running(IDS)}, text=" ab c")
    assert short.token_texts() == (None, None, None)
    long_text = " aaaaaaaaaaaa" * 3  # 39 characters: 0, 11, 22 all fall inside it
    long = parse_logprobs({"tokens": IDS, "text_offset": _running(IDS)}, text=long_text)
    assert long.token_texts() == (None, None, None)


def test_vllm_ids_against_token_strings_are_compared_word_by_word() -> None:
    """ref ids " a" "b" " c" (label offsets) vs tgt strings: words " ab" " c" on both sides, 2/2
    = 1.0 (0.0 before: " ab c", "", "" against " a", "b", " c"); against " ab d", 1/2 = 0.5."""
    ref = _gen(IDS, _running(IDS), " ab c")
    assert unreadable(ref)
    assert _match(ref, _gen([" a", "b", " c"], [0, 2, 3], " ab c")) == 1.0
    assert _match(ref, _gen([" a", "b", " d"], [0, 2, 3], " ab d")) == 0.5


def test_a_chat_id_without_bytes_leaves_later_offsets_unknown() -> None:
    """Counted as "", every later token's text went to the last one: ("", "", "abc") before."""
    entries = [{"token": t, "logprob": -0.1} for t in IDS]
    assert parse_content(entries, text="abc").token_texts() == (None, None, None)


class _Detok:
    """A client whose /detokenize knows `vocab`; counts the requests."""

    name = "ref"

    def __init__(self, vocab: dict[int, str]) -> None:
        self.vocab, self.asked = vocab, 0

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        assert path == "/detokenize"
        self.asked += 1
        return {"prompt": "".join(self.vocab[i] for i in body["tokens"])}


def _endpoint(name: str, client: Any, tokenize: bool) -> Endpoint:
    return Endpoint(name, client, Capabilities(name=name, url="u", model=None, tokenize=tokenize))


async def _pair(
    vocab: dict[int, str], ref: dict[str, Generation], tgt: dict[str, Generation], tokenize: bool = True
) -> tuple[Retokenizer, Any, Any, _Detok]:
    client = _Detok(vocab)
    eps = {"ref": _endpoint("ref", client, tokenize), "tgt": _endpoint("tgt", object(), False)}
    retok = Retokenizer(eps, {}, [("ref", "tgt")])
    gens: dict[str, dict[str, Generation]] = {"ref": dict(ref), "tgt": dict(tgt)}
    await retok.fill(gens)
    b, t = retok.for_pair(gens, "ref", "tgt")
    return retok, b, t, client


async def test_detokenized_ids_rebuild_the_offsets() -> None:
    """Each id's text joins back to the text: offsets 0, 2, 3 from " a", "b", " c"; token match
    against the strings is 3/3 = 1.0, and the display shows text. Two prompts share two ids: three
    /detokenize requests, one per id."""
    vocab = {11: " a", 22: "b", 33: " c"}
    ref = {"p1": _gen(IDS, _running(IDS), " ab c"), "p2": _gen(IDS[:2], _running(IDS[:2]), " ab")}
    tgt = {"p1": _gen([" a", "b", " c"], [0, 2, 3], " ab c"), "p2": _gen([" a", "b"], [0, 2], " ab")}
    retok, b, t, client = await _pair(vocab, ref, tgt)
    assert [p.text_offset for p in b["p1"].view.positions] == [0, 2, 3]
    assert b["p1"].display_tokens() == [" a", "b", " c"] and b["p1"].view.token_ids == (11, 22, 33)
    assert _match(b["p1"], t["p1"]) == 1.0 and _match(b["p2"], t["p2"]) == 1.0
    assert client.asked == 3 and retok.notes("ref", "tgt") == []


async def test_ids_whose_texts_do_not_join_back_stay_and_the_pair_is_worded() -> None:
    """A SentencePiece /detokenize of one id drops its leading space ("a", not " a"): the ids
    stay, the prompt is compared word by word (1.0 on these identical texts) and said so."""
    vocab = {11: "a", 22: "b", 33: "c"}
    ref = {"p1": _gen(IDS, _running(IDS), " ab c")}
    tgt = {"p1": _gen([" a", "b", " c"], [0, 2, 3], " ab c")}
    for tokenize in (True, False):  # no /detokenize at all: the same
        retok, b, t, _ = await _pair(vocab, ref, tgt, tokenize=tokenize)
        assert b["p1"].view.tokens == (" ab", " c") and t["p1"].view.tokens == (" ab", " c")
        assert _match(b["p1"], t["p1"]) == 1.0
        (note,) = retok.notes("ref", "tgt")
        assert "on 1 prompt(s) (p1)" in note and "word by word" in note


# ----------------------------------------------------------------------------- through a run

PROMPTS = ["the quick brown fox", "1+2+3=", "def add(a, b):", "a fox jumps over"]


def _offsets_app(behaviour: FakeBehaviour, how: str) -> FastAPI:
    """The well-behaved fake with its generation's text_offset counted `how`: "prompt" (from the
    prompt's start, OpenAI's legacy convention) or "label" (by each token as sent, vLLM)."""
    server = FakeServer(behaviour)
    app = FastAPI()

    def counted(req: dict[str, Any], out: dict[str, Any]) -> None:
        block = out["choices"][0]["logprobs"]
        prompt = req.get("prompt")
        if block and "text_offset" in block and not req.get("echo") and isinstance(prompt, str):
            start = len(prompt) if how == "prompt" else 0
            block["text_offset"] = (
                _running(block["tokens"], start)
                if how == "label"
                else [o + start for o in block["text_offset"]]
            )

    rewritten_completions(app, server, counted)
    app.mount("/", server.app)
    return app


def _compare(tmp_path: Path, ref: FastAPI, tgt: FastAPI, name: str) -> tuple[int, Any]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS))
    )
    out = tmp_path / name
    with live_app(ref) as r, live_app(tgt) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompts", str(prompts), "--scheme", "none"]
        code = main([*argv, "--max-tokens", "8", "-o", str(out), "--json"])
    acc = load_run(out).targets[0].comparison("accuracy")
    assert acc is not None
    return code, acc


@pytest.mark.slow
def test_prompt_start_offsets_score_what_plain_offsets_score(tmp_path: Path, capsys: Any) -> None:
    """A wrong target (the runner-up every 2nd position), token strings on both sides: with
    prompt-start offsets it matched 100% and PASSed; now it scores as with plain offsets."""
    plain = FakeBehaviour(token_ids=False)
    wrong = FakeBehaviour(token_ids=False, flip_every=2)
    _, clean = _compare(tmp_path, _offsets_app(plain, "none"), _offsets_app(wrong, "none"), "clean")
    code, acc = _compare(tmp_path, _offsets_app(plain, "prompt"), _offsets_app(wrong, "prompt"), "legacy")
    capsys.readouterr()
    assert clean.aggregate["token_match"] < 0.6
    assert acc.aggregate["token_match"] == clean.aggregate["token_match"] and code == 1


@pytest.mark.slow
@pytest.mark.parametrize("tokenize", [True, False], ids=["detokenize", "no-detokenize"])
def test_vllm_label_offsets_against_token_strings_pass(tmp_path: Path, tokenize: bool, capsys: Any) -> None:
    """The same model, ids with vLLM's offsets on the reference, strings on the target: 0% and
    FAIL before; now 100% (detokenized ids), or word match 100% with a note (no /detokenize)."""
    ref = _offsets_app(FakeBehaviour(tokenize=tokenize), "label")
    # no echo on the target: teacher forcing by ids fails against a server that ignores
    # return_tokens_as_token_ids (its echo's strings never equal "token_id:N"), another defect
    tgt = _offsets_app(FakeBehaviour(token_ids=False, echo=False), "none")
    code, acc = _compare(tmp_path, ref, tgt, "vllm")
    capsys.readouterr()
    assert code == 0 and acc.aggregate["token_match"] == 1.0
    worded = [w for w in acc.warnings if "compared word by word" in w]
    assert bool(worded) != tokenize, acc.warnings
    if tokenize:
        assert all(not t.startswith("token_id:") for p in acc.prompts for t in p.ref_tokens)
