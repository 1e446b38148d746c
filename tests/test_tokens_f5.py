"""Token texts of SentencePiece / byte-fallback ids, and the quick look's word fallback (fixer F5).

1. `/detokenize` of one id drops a SentencePiece token's leading space ("▁price" -> "price") and
   gives U+FFFD for a byte token, so vLLM's "token_id:N" ids (label offsets) of a Llama-style
   tokenizer never got their texts back: such generations were compared word by word. Each
   token's text is now read in context (a short window of ids ending at it).
2. The quick look compared words for labels against token strings but showed the tokens, its
   divergence marker at a word's index among tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBehaviour, FakeServer, _error, rewritten_completions
from fastapi import FastAPI, Request
from quirk_fakes import live_app

from difftest.cli import main
from difftest.collect import Endpoint, Generation
from difftest.conformance import Capabilities
from difftest.prompts import Prompt
from difftest.report import load_run
from difftest.retokenize import Retokenizer, words
from difftest.scoring import score_prompt
from difftest.tokens_view import TokensView, parse_logprobs

# A Llama-style vocabulary: "▁" marks a word's leading space, "<0xNN>" a UTF-8 byte.
VOCAB = {
    1: "\u2581The",
    2: "\u2581price",
    3: "\u2581is",
    4: "\u25815",
    5: "<0xE2>",
    6: "<0x82>",
    7: "<0xAC>",
    8: ".",
    9: "!",
}
# " The price is 5€." — "€" is E2 82 AC, three byte tokens
IDS = [1, 2, 3, 4, 5, 6, 7, 8]
TEXT = " The price is 5\u20ac."


def sp_decode(pieces: Sequence[str]) -> str:
    """What a SentencePiece tokenizer's decode gives: bytes joined into characters (U+FFFD for
    an unfinished one), "▁" as a space, the first token's leading space dropped."""
    raw = bytearray()
    for piece in pieces:
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            raw.append(int(piece[3:5], 16))
        else:
            raw += piece.replace("\u2581", " ").encode()
    text = raw.decode("utf-8", "replace")
    return text[1:] if pieces and pieces[0].startswith("\u2581") else text


class _SentencePiece:
    """A client whose /detokenize decodes like SentencePiece; records each request's ids."""

    name = "ref"

    def __init__(self) -> None:
        self.asked: list[tuple[int, ...]] = []

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        if path == "/tokenize":  # knows one text
            return {"tokens": IDS if body["prompt"] == TEXT else []}
        assert path == "/detokenize"
        self.asked.append(tuple(body["tokens"]))
        return {"prompt": sp_decode([VOCAB[i] for i in body["tokens"]])}


def test_the_fake_decodes_like_sentencepiece() -> None:
    """The premise: alone, "▁price" is "price" and a byte U+FFFD; together, " price" and "€"."""
    assert sp_decode([VOCAB[2]]) == "price"
    assert sp_decode([VOCAB[1], VOCAB[2]]) == "The price"
    assert sp_decode([VOCAB[5]]) == "\ufffd"
    assert sp_decode([VOCAB[i] for i in (5, 6, 7)]) == "\u20ac"


def _labels(ids: Sequence[int], text: str) -> Generation:
    """vLLM with token ids: "token_id:N" labels, text_offset advanced by each label's length."""
    tokens = [f"token_id:{i}" for i in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    block = {"tokens": tokens, "token_logprobs": [-0.1] * len(ids), "text_offset": offsets}
    return Generation(text, parse_logprobs(block, text=text), "length")


def _strings(tokens: Sequence[str], offsets: Sequence[int], text: str) -> Generation:
    block = {"tokens": list(tokens), "token_logprobs": [-0.1] * len(tokens), "text_offset": list(offsets)}
    return Generation(text, parse_logprobs(block, text=text), "length")


# the same tokens as strings (llama.cpp-like names): byte pieces all start at the character
TGT_TOKENS = [" The", " price", " is", " 5", "<0xE2>", "<0x82>", "<0xAC>", "!"]
TGT_OFFSETS = [0, 4, 10, 13, 15, 15, 15, 16]
TGT_TEXT = " The price is 5\u20ac!"


async def _pair(
    ref: Generation, tgt: Generation, window_cap: int = 4096
) -> tuple[Retokenizer, Generation, Generation, _SentencePiece]:
    client = _SentencePiece()
    caps = Capabilities(name="ref", url="u", model=None, tokenize=True)
    tgt_caps = Capabilities(name="tgt", url="u", model=None)
    eps = {"ref": Endpoint("ref", client, caps), "tgt": Endpoint("tgt", object(), tgt_caps)}
    cap = {"window_cap": window_cap} if window_cap != 4096 else {}  # the old code had no cap
    retok = Retokenizer(eps, {}, [("ref", "tgt")], **cap)
    gens: dict[str, dict[str, Generation]] = {"ref": {"p1": ref}, "tgt": {"p1": tgt}}
    await retok.fill(gens)
    b, t = retok.for_pair(gens, "ref", "tgt")
    return retok, b["p1"], t["p1"], client


async def test_sentencepiece_ids_get_their_texts_in_context() -> None:
    """Offsets 0, 4, 10, 13, 15, 15, 15, 16: the spaces kept, the "€" on its last byte ("", "",
    "€", as `token_texts` cuts byte pieces). Against the target (same tokens, "!" for "."):
    tokens 7 of 8 = 0.875, first divergence at token 7. Before: ids kept, words " The" " price"
    " is" " 5€." against " 5€!": 3 of 4 = 0.75, divergence at word 3, and a word-by-word note."""
    retok, b, t, _ = await _pair(_labels(IDS, TEXT), _strings(TGT_TOKENS, TGT_OFFSETS, TGT_TEXT))
    assert [p.text_offset for p in b.view.positions] == [0, 4, 10, 13, 15, 15, 15, 16]
    assert b.display_tokens() == [" The", " price", " is", " 5", "", "", "\u20ac", "."]
    assert retok.notes("ref", "tgt") == []
    d = score_prompt(Prompt("p1", "q"), b, t, ref_forced=None, tgt_forced=None, k=None)
    assert d.match_rate == 0.875 and d.first_divergence == 7


async def test_single_id_texts_that_join_back_ask_no_windows() -> None:
    """Ids whose texts alone spell the text (" The" + "." ...) need no text in context: one
    /detokenize request per id, none of several ids."""
    retok, b, _, client = await _pair(_labels([8, 9], ".!"), _strings([".", "!"], [0, 1], ".!"))
    assert b.display_tokens() == [".", "!"]
    assert sorted(client.asked) == [(8,), (9,)]


async def test_a_byte_token_starting_the_generation_and_the_request_count() -> None:
    """ "€ is 5." starts with bytes (no leading space to lose): texts "", "", "€", " is", " 5",
    "."; windows are asked once each, about one a token (here 9 for 6 tokens + 6 single ids)."""
    ids = [5, 6, 7, 3, 4, 8]
    retok, b, _, client = await _pair(_labels(ids, "\u20ac is 5."), _strings(["x"], [0], "x"))
    assert b.display_tokens() == ["", "", "\u20ac", " is", " 5", "."]
    windows = [w for w in client.asked if len(w) > 1]
    assert len(windows) == len(set(windows)) <= 10


async def test_the_window_cap_keeps_the_ids_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A cap of 2 window decodes stops the texts in context: the ids stay, the prompt is compared
    word by word (as before the fix), the log and the pair's note name the cap."""
    with caplog.at_level(logging.WARNING, logger="difftest.retokenize"):
        retok, b, t, client = await _pair(
            _labels(IDS, TEXT), _strings(TGT_TOKENS, TGT_OFFSETS, TGT_TEXT), window_cap=2
        )
    assert b.view.tokens == words(b).view.tokens and b.view.tokens[-1] == " 5\u20ac."
    assert len([w for w in client.asked if len(w) > 1]) <= 2
    (note,) = retok.notes("ref", "tgt")
    assert "cap of 2 /detokenize requests" in note and "word by word" in note
    assert "(the cap)" in caplog.text


async def test_texts_that_do_not_join_back_even_in_context_keep_the_ids() -> None:
    """The text is not what the ids decode to (another tokenizer's text): nothing is rebuilt,
    the ids stay and the prompt is compared word by word (noted)."""
    retok, b, _, _ = await _pair(_labels(IDS, " Another text."), _strings(["x"], [0], "x"))
    assert b.view.tokens == (" Another", " text.") and len(retok.notes("ref", "tgt")) == 1


async def test_a_tokenless_side_tokenized_by_sentencepiece_gets_texts_in_context() -> None:
    """A server without tokens tokenized by a SentencePiece /tokenize: its positions' texts are
    read in context. Before, offsets from the single-id texts ("The", "price", U+FFFD ...) cut
    " Th", "e pri", ... from the text for the report."""
    client = _SentencePiece()
    caps = Capabilities(name="ref", url="u", model=None, tokenize=True, logprobs_cap=5)
    eps = {
        "ref": Endpoint("ref", client, caps),
        "tgt": Endpoint("tgt", object(), Capabilities(name="tgt", url="u", model=None)),
    }
    retok = Retokenizer(eps, {"tgt": "ref"}, [("ref", "tgt")])
    gens = {
        "ref": {"p1": _labels(IDS, TEXT)},
        "tgt": {"p1": Generation(TEXT, TokensView((), TEXT), "length")},
    }
    await retok.fill(gens)
    _, t = retok.for_pair(gens, "ref", "tgt")
    assert t["p1"].view.token_ids == tuple(IDS)
    assert t["p1"].display_tokens() == [" The", " price", " is", " 5", "", "", "\u20ac", "."]


# ----------------------------------------------------------------------------- through the CLI

PROMPTS = ["the quick brown fox", "1+2+3=", "def add(a, b):", "a fox jumps over"]


def _app(behaviour: FakeBehaviour, *, labels: bool = False, sentencepiece: bool = False) -> FastAPI:
    """The well-behaved fake with vLLM's label offsets (`labels`) and a SentencePiece-like
    /detokenize (`sentencepiece`: a decode drops its first token's leading space)."""
    server = FakeServer(behaviour)
    app = FastAPI()

    def label_offsets(req: dict[str, Any], out: dict[str, Any]) -> None:
        block = out["choices"][0]["logprobs"]
        if labels and block and "text_offset" in block and not req.get("echo"):
            at, block["text_offset"] = 0, []
            for t in block["tokens"]:
                block["text_offset"].append(at)
                at += len(t)

    rewritten_completions(app, server, label_offsets)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Any:
        if not behaviour.tokenize:
            return _error(404, "Not Found")
        ids = (await request.json()).get("tokens", [])
        text = server.tokenizer.decode(ids)
        first = server.tokenizer.strings[ids[0]] if ids else ""
        return {"prompt": text[1:] if sentencepiece and first.startswith(" ") else text}

    app.mount("/", server.app)
    return app


@pytest.mark.slow
def test_a_run_against_sentencepiece_ids_compares_tokens(tmp_path: Path, capsys: Any) -> None:
    """The same model: ids with label offsets and a SentencePiece /detokenize on the reference,
    strings on the target. Before: every prompt compared word by word (noted); now token
    texts, token match 100%, no note."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS))
    )
    ref = _app(FakeBehaviour(), labels=True, sentencepiece=True)
    tgt = _app(FakeBehaviour(token_ids=False, echo=False))
    with live_app(ref) as r, live_app(tgt) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompts", str(prompts), "--scheme", "none"]
        code = main([*argv, "--max-tokens", "8", "-o", str(tmp_path / "run"), "--json"])
    capsys.readouterr()
    acc = load_run(tmp_path / "run").targets[0].comparison("accuracy")
    assert acc is not None and code == 0 and acc.aggregate["token_match"] == 1.0
    assert not [w for w in acc.warnings if "word by word" in w], acc.warnings
    assert all(not tok.startswith("token_id:") for p in acc.prompts for tok in p.ref_tokens)
    assert any(tok.startswith(" ") for p in acc.prompts for tok in p.ref_tokens)  # spaces kept


def _quick_look(ref: FastAPI, tgt: FastAPI, *extra: str) -> None:
    with live_app(ref) as r, live_app(tgt) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompt", "1+2+3="]
        main([*argv, "--max-tokens", "16", *extra])


def _words(text: str) -> list[str]:
    return list(words(Generation(text, TokensView((), text), "length")).view.tokens)


@pytest.mark.slow
def test_quick_look_shows_the_words_it_compared(capsys: Any) -> None:
    """Labels without /detokenize on the reference, a target that differs from its 12th token
    on ("1+2+3=" is 4 ids: the runner-up after a context of 15) in strings: the look compares
    words, "%d.q_V[P" " brown=Z<..." against "%d.q_V[P" " brown=Z...": they differ at word 1.
    It showed the tokens ("token_id:N" labels) with the marker at token 1; now it shows the
    words, the marker at word 1, and one line saying so."""
    ref = _app(FakeBehaviour(tokenize=False), labels=True)
    tgt = _app(FakeBehaviour(token_ids=False, echo=False, flip_every=15))
    _quick_look(ref, tgt, "--json")
    (view,) = json.loads(capsys.readouterr().out)["prompts"]
    ref_words, tgt_words = _words(view["ref_text"]), _words(view["tgt_text"])
    assert view["ref_tokens"] == ref_words and view["tgt_tokens"] == tgt_words
    assert ref_words[0] == tgt_words[0] == "%d.q_V[P" and ref_words[1] != tgt_words[1]
    assert view["first_divergence"] == 1
    assert view["ref_alternatives"] == {} and view["tgt_alternatives"] == {}  # per token, not per word
    assert view["compared"] == "words"
    _quick_look(ref, tgt)
    out = capsys.readouterr().out
    assert "compared word by word: reference sent token ids" in out and "token_id:" not in out


@pytest.mark.slow
def test_quick_look_gives_sentencepiece_ids_their_texts(capsys: Any) -> None:
    """With a SentencePiece /detokenize the reference's ids get their texts (as in a full run):
    the look compares tokens, identical answers 100%."""
    ref = _app(FakeBehaviour(), labels=True, sentencepiece=True)
    tgt = _app(FakeBehaviour(token_ids=False, echo=False))
    _quick_look(ref, tgt, "--json")
    (view,) = json.loads(capsys.readouterr().out)["prompts"]
    assert view["ref_tokens"] == view["tgt_tokens"] and len(view["ref_tokens"]) == 16
    assert view["compared"] == "tokens" and view["match_rate"] == 1.0
