"""The quick look against a side without tokens, and byte tokens that form no character (fixer F14).

1. The quick look (`compare --prompt`) against a target that ignores `logprobs` (transformers
   serve) left that side with no positions: identical answers read 0% and a LENGTH divergence
   at token 0. It now tokenizes such a side as a full run does (its /tokenize, else words).
2. Texts in context glued the U+FFFD of byte tokens that never complete a character (a lone
   lead byte, a cut character) onto the next token: identical ids scored 0.6 and 0.4.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from fakes import FakeBehaviour
from quirk_fakes import live_app, quirk_app
from test_tokens_f5 import VOCAB, _labels, _strings, sp_decode

from difftest.cli import main
from difftest.collect import Endpoint, Generation
from difftest.conformance import Capabilities
from difftest.prompts import Prompt
from difftest.retokenize import Retokenizer, _split
from difftest.scoring import score_prompt

# ----------------------------------------------------------------------------- 2. byte tokens

VOCAB_X = {**VOCAB, 10: "X"}


def hf_decode(pieces: Sequence[str]) -> str:
    """HF's ByteFallback decoder: a run of byte tokens that is no valid UTF-8 gives one U+FFFD per
    byte (Python's `errors="replace"`, as `sp_decode`, one per maximal invalid run)."""
    out, run = [], bytearray()
    for piece in [*pieces, ""]:
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            run.append(int(piece[3:5], 16))
            continue
        if run:
            try:
                out.append(run.decode())
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run = bytearray()
        out.append(piece.replace("\u2581", " "))
    text = "".join(out)
    return text[1:] if pieces and pieces[0].startswith("\u2581") else text


class _Detokenizer:
    name = "ref"

    def __init__(self, decode: Callable[[Sequence[str]], str]) -> None:
        self.decode = decode

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        assert path == "/detokenize"
        return {"prompt": self.decode([VOCAB_X[i] for i in body["tokens"]])}


async def _score(decode: Callable[[Sequence[str]], str], ids: list[int], tgt: Generation) -> Any:
    """Labels with `decode`'s /detokenize against `tgt`'s strings, through `fill` and `for_pair`."""
    caps = Capabilities(name="ref", url="u", model=None, tokenize=True)
    eps = {
        "ref": Endpoint("ref", _Detokenizer(decode), caps),
        "tgt": Endpoint("tgt", object(), Capabilities(name="tgt", url="u", model=None)),
    }
    retok = Retokenizer(eps, {}, [("ref", "tgt")])
    gens = {"ref": {"p": _labels(ids, tgt.text or "")}, "tgt": {"p": tgt}}
    await retok.fill(gens)
    b, t = retok.for_pair(gens, "ref", "tgt")
    assert retok.notes("ref", "tgt") == []  # tokens compared, not words
    d = score_prompt(Prompt("p", "q"), b["p"], t["p"], ref_forced=None, tgt_forced=None, k=None)
    return b["p"].display_tokens(), d


# the string side (llama.cpp-like): each byte at the length of the decode before it
CASES = [
    # a lone lead byte E2, then "X"
    (hf_decode, [1, 2, 5, 10, 8], [" The", " price", "\ufffd", "X", "."], [0, 4, 10, 11, 12]),
    (sp_decode, [1, 2, 5, 10, 8], [" The", " price", "\ufffd", "X", "."], [0, 4, 10, 11, 12]),
    # E2 82, a character cut short, then " is": two U+FFFD (HF) or one for both (Python)
    (hf_decode, [1, 5, 6, 3, 8], [" The", "\ufffd", "\ufffd", " is", "."], [0, 4, 5, 6, 9]),
    (sp_decode, [1, 5, 6, 3, 8], [" The", "\ufffd", "", " is", "."], [0, 4, 5, 5, 8]),
    # the control: E2 82 AC is "€", on its last byte
    (hf_decode, [1, 4, 5, 6, 7, 8], [" The", " 5", "", "", "\u20ac", "."], [0, 4, 6, 6, 6, 7]),
]


@pytest.mark.parametrize(("decode", "ids", "tokens", "offsets"), CASES)
async def test_bytes_that_form_no_character_keep_their_own_replacement_character(
    decode: Callable[[Sequence[str]], str], ids: list[int], tokens: list[str], offsets: list[int]
) -> None:
    """The same ids on both sides: the reference's texts in context are the target's strings,
    token match 1.0. Before: [" The", " price", "", "\ufffdX", "."] (0.6, divergence at 2) and
    [" The", "", "", "\ufffd\ufffd is", "."] (0.4, divergence at 1)."""
    text = "".join(tokens)
    assert decode([VOCAB_X[i] for i in [1, *ids]]).startswith("The" + text)  # the premise
    shown, d = await _score(decode, ids, _strings(tokens, offsets, text))
    assert shown == tokens
    assert d.match_rate == 1.0 and d.first_divergence is None


def test_split_by_hand() -> None:
    """Each token ends where its decode stops agreeing with the group's whole (context "ab")."""
    assert _split(["ab\ufffd", "ab\ufffdX"], 2) == ["\ufffd", "X"]  # a lone lead byte
    assert _split(["ab\ufffd", "ab\ufffd\ufffd", "ab\u20ac"], 2) == ["", "", "\u20ac"]  # "€"
    # a lone lead byte, then "é" over two bytes (HF: one U+FFFD per byte of an invalid run)
    assert _split(["ab\ufffd", "ab\ufffd\ufffd", "ab\ufffd\u00e9"], 2) == ["\ufffd", "", "\u00e9"]


# ----------------------------------------------------------------------------- 1. the quick look


def _quick_look(ref: Any, tgt: Any, capsys: Any, *extra: str) -> tuple[int, str]:
    with live_app(ref) as r, live_app(tgt) as t:
        argv = ["compare", "--ref", r, "--target", t, "--prompt", "the quick brown fox"]
        code = main([*argv, "--max-tokens", "8", *extra])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_quick_look_tokenizes_a_target_without_tokens(capsys: Any) -> None:
    """A target that ignores `logprobs`, same model, same text: tokenized with its own /tokenize
    as a full run does, 8 tokens each, 100%, noted. Before: no target tokens, 0% and a LENGTH
    divergence at token 0. Exit 1 stays: its probe's `logprobs cap` check FAILs."""
    ref, tgt = quirk_app(FakeBehaviour()), quirk_app(FakeBehaviour(), ignore_logprobs=True)
    code, out = _quick_look(ref, tgt, capsys, "--json")
    (view,) = json.loads(out)["prompts"]
    assert view["ref_text"] == view["tgt_text"] and view["tgt_tokens"] == view["ref_tokens"]
    assert len(view["ref_tokens"]) == 8 and code == 1
    assert view["match_rate"] == 1.0 and view["first_divergence"] is None
    assert view["divergence_kind"] is None and view["compared"] == "tokens"
    assert view["notes"] and "tokenized with its own /tokenize" in view["notes"][0]
    _, out = _quick_look(ref, tgt, capsys)
    assert "tokenized with its own /tokenize" in out and "LENGTH" not in out


@pytest.mark.slow
def test_quick_look_compares_words_where_no_server_tokenizes(capsys: Any) -> None:
    """No /tokenize anywhere: both sides split into words, as a full run does, 100%, said."""
    ref = quirk_app(FakeBehaviour(tokenize=False))
    tgt = quirk_app(FakeBehaviour(tokenize=False), ignore_logprobs=True)
    _, out = _quick_look(ref, tgt, capsys, "--json")
    (view,) = json.loads(out)["prompts"]
    assert view["compared"] == "words" and view["match_rate"] == 1.0
    assert view["tgt_tokens"] == view["ref_tokens"] != []
    assert "word by word" in view["notes"][0]
