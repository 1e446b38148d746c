"""Labels of logprob alternatives that are parts of a UTF-8 character (server_shim.detok).

"🦀" is three byte-level tokens in smollm2's tokenizer (tiny-llama shares it): 'ĠðŁ' (space and
two bytes), '¦', 'Ģ'. The first two end inside the character, so their pieces are held back ('').
"""

from __future__ import annotations

import pytest

from server_shim.detok import IncrementalDetokenizer, bytes_label, label_bytes, token_bytes
from server_shim.fast_decode import backend_decoder
from server_shim.serving_completion import LogprobsFormatter

CRAB = "🦀".encode()  # f0 9f a6 80


@pytest.fixture(scope="module")
def tok(tiny_llama):  # noqa: ANN001, ANN201
    return tiny_llama.tokenizer


@pytest.mark.parametrize("fast", [False, True], ids=["hf", "rust"])
def test_a_tokens_own_bytes(tok, fast: bool) -> None:
    t = backend_decoder(tok) if fast else tok
    first, second, third = tok(" 🦀")["input_ids"]
    assert token_bytes(t, first) == b" " + CRAB[:2]
    assert token_bytes(t, second) == CRAB[2:3] and token_bytes(t, third) == CRAB[3:]
    assert token_bytes(t, tok("ok")["input_ids"][0]) == b"ok"


def test_bytes_labels_round_trip() -> None:
    assert bytes_label(b"\xf0\x9f") == "bytes:\\xf0\\x9f"
    assert label_bytes("bytes:\\xf0\\x9f") == [0xF0, 0x9F]
    assert label_bytes(" ok") == [32, 111, 107] and label_bytes("bytes:") == list(b"bytes:")


def test_partial_character_alternatives_are_labelled_by_their_bytes_and_never_collide(tok) -> None:
    """The bug: alternatives that are parts of a character all had the piece '' and collided with
    each other and with a chosen token held back: 2 alternatives asked, none given."""
    ids = tok("I love 🦀 ok")["input_ids"]
    first, second, third = ids[2:5]
    det = IncrementalDetokenizer(tok, ids[:2])
    info = det.push(first, -0.5, [(second, -1.0), (third, -2.0), (first, -0.5)])
    assert info.text == ""  # held back: the character is not complete
    labels = {tid: label for tid, label, _ in info.top}
    assert labels == {second: bytes_label(CRAB[2:3]), third: bytes_label(CRAB[3:]), first: ""}
    top = LogprobsFormatter(True, as_ids=False).logprobs(0, [info]).top_logprobs[0]
    assert top == {"": -0.5, bytes_label(CRAB[2:3]): -1.0, bytes_label(CRAB[3:]): -2.0}
    # the character completes: the last token's piece releases it whole, as before
    assert det.push(second, -0.1, None).text == "" and det.push(third, -0.1, None).text == " 🦀"


def test_two_alternatives_with_one_label_keep_both_entries(tok) -> None:
    """Distinct ids whose labels are equal (the same text): the second keeps its entry by its id."""
    from server_shim.detok import TokenInfo

    info = TokenInfo(5, " a", -0.1, ((7, " b", -1.0), (9, " b", -2.0)))
    top = LogprobsFormatter(True, as_ids=False).logprobs(0, [info]).top_logprobs[0]
    assert top == {" a": -0.1, " b": -1.0, "token_id:9": -2.0}


def test_an_eos_releases_the_bytes_held_back_as_a_finish_by_length_does(tok) -> None:
    """The bug (found by reading): a sequence ending on EOS skipped the flush, so bytes held back
    for an incomplete character vanished from its text; ending by length gave them as U+FFFD."""
    from types import SimpleNamespace

    from server_shim.engine_output import accept

    def seq() -> SimpleNamespace:
        return SimpleNamespace(detok=IncrementalDetokenizer(tok, []), text="", released=0, finished=False,
                               emitted=False, params=SimpleNamespace(stop=()), index=0,
                               handle=SimpleNamespace(_put=lambda event: None))  # fmt: skip

    first = tok(" 🦀")["input_ids"][0]  # a space and two of the crab's four bytes
    by_length = seq()
    accept(by_length, by_length.detok.push(first, None, None), "length")
    by_eos = seq()
    accept(by_eos, by_eos.detok.push(first, None, None), None)
    held = by_eos.detok.flush()
    accept(by_eos, by_eos.detok.push(tok.eos_token_id, None, None), "stop", add_text=False, tail=held)
    assert by_eos.text == by_length.text == " \ufffd" and by_eos.finished
