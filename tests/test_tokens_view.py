"""tokens_view: one normalised structure from the logprobs blocks real servers send."""

from __future__ import annotations

import math

import pytest

from difftest.errors import ServerError
from difftest.tokens_view import parse_choice, parse_logprobs, parse_token_id

STRING_BLOCK = {  # vLLM echo, max_tokens=1, logprobs=2, plain strings
    "tokens": ["Hello", ",", " world"],
    "token_logprobs": [None, -1.5, -0.25],
    "top_logprobs": [None, {",": -1.5, "!": -0.7}, {" world": -0.25, " there": -2.0}],
    "text_offset": [0, 5, 6],
}
ID_BLOCK = {  # the same with return_tokens_as_token_ids
    "tokens": ["token_id:9906", "token_id:11", "token_id:1917"],
    "token_logprobs": [None, -1.5, -0.25],
    "top_logprobs": [None, {"token_id:11": -1.5, "token_id:0": -0.7}, {"token_id:1917": -0.25}],
    "text_offset": [0, 5, 6],
}


@pytest.mark.parametrize(
    ("token", "expected"),
    [("token_id:42", 42), ("token_id:0", 0), ("token_id:-1", -1), ("token_id:", None), ("42", None),
     ("token_id:4x", None), (" token_id:4", None)],
)  # fmt: skip
def test_parse_token_id(token: str, expected: int | None) -> None:
    assert parse_token_id(token) == expected


def test_string_keyed_block() -> None:
    v = parse_choice({"text": "Hello, world", "logprobs": STRING_BLOCK})
    assert len(v) == 3
    assert v.tokens == ("Hello", ",", " world")
    assert v.token_ids is None and not v.has_ids
    assert v.logprobs == (None, -1.5, -0.25)
    assert v.positions[0].top == {} and v.positions[1].top == {",": -1.5, "!": -0.7}
    assert v.top_keys == "str" and v.top_k == 2
    assert v.token_texts() == ("Hello", ",", " world")


def test_id_keyed_block() -> None:
    v = parse_logprobs(ID_BLOCK, text="Hello, world")
    assert v.token_ids == (9906, 11, 1917) and v.has_ids
    assert v.positions[1].top == {11: -1.5, 0: -0.7}
    assert v.top_keys == "id"
    assert v.token_texts() == ("Hello", ",", " world")  # what "token_id:N" tokens look like
    tail = v[1:]
    assert tail.token_ids == (11, 1917) and tail.logprobs == (-1.5, -0.25)


def test_partial_ids_give_no_id_list() -> None:
    block = ID_BLOCK | {"tokens": ["token_id:9906", ",", "token_id:1917"]}
    v = parse_logprobs(block)
    assert v.token_ids is None
    assert [p.token_id for p in v.positions] == [9906, None, 1917]
    mixed = parse_logprobs(STRING_BLOCK | {"top_logprobs": [None, {"token_id:3": -1.0, "a": -2.0}, None]})
    assert mixed.top_keys == "mixed"


def test_list_style_top_and_missing_optional_fields() -> None:
    block = {"tokens": ["a", "b"], "token_logprobs": [-0.5, -1.0],
             "top_logprobs": [[{"token": "a", "logprob": -0.5}], [{"token": "token_id:7", "logprob": -1.0}]]}  # fmt: skip
    v = parse_logprobs(block)
    assert v.positions[0].top == {"a": -0.5} and v.positions[1].top == {7: -1.0}
    assert v.token_texts() == (None, None)  # no offsets given
    nan = parse_logprobs({"tokens": ["a"], "token_logprobs": [float("nan")]})
    assert math.isnan(nan.logprobs[0])


def test_a_string_listed_twice_holds_both_probabilities() -> None:
    """Two ids that decode to one string (byte-fallback pieces shown as U+FFFD): 0.2 + 0.1 = 0.3,
    in either order; the later one alone (0.1) dropped a third of the string's mass."""
    two = [{"token": "\ufffd", "logprob": math.log(0.2)}, {"token": "a", "logprob": math.log(0.5)},
           {"token": "\ufffd", "logprob": math.log(0.1)}]  # fmt: skip
    for tops in (two, two[::-1]):
        v = parse_logprobs({"tokens": ["a"], "token_logprobs": [math.log(0.5)], "top_logprobs": [tops]})
        assert v.positions[0].top["\ufffd"] == pytest.approx(math.log(0.3), abs=1e-12)
        assert v.positions[0].top["a"] == pytest.approx(math.log(0.5), abs=1e-12)
    never = [{"token": "b", "logprob": float("-inf")}, {"token": "b", "logprob": math.log(0.25)}]
    v = parse_logprobs({"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [never]})
    assert v.positions[0].top["b"] == pytest.approx(math.log(0.25), abs=1e-12)
    nan = [{"token": "b", "logprob": None}, {"token": "b", "logprob": -1.0}]
    v = parse_logprobs({"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [nan]})
    assert math.isnan(v.positions[0].top["b"])  # a null alternative still fails as NaN


def test_no_logprobs_gives_an_empty_view() -> None:
    v = parse_choice({"text": "abc", "logprobs": None})
    assert len(v) == 0 and v.text == "abc" and v.top_keys == "none" and v.token_ids == ()


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"tokens": ["a", "b"], "token_logprobs": [-1.0]}, "1 entries for 2 tokens"),
        ({"tokens": ["a"], "token_logprobs": ["x"]}, "not a number"),
        ({"tokens": [1]}, "not a string"),
        ({"tokens": "ab"}, "not a list"),
        ({"tokens": ["a"], "top_logprobs": [5]}, "top_logprobs"),
        ([1, 2], "expected an object"),
    ],
)
def test_malformed_blocks_are_server_errors(block: object, match: str) -> None:
    with pytest.raises(ServerError, match=match):
        parse_logprobs(block)  # type: ignore[arg-type]


def test_integer_index_is_refused() -> None:
    with pytest.raises(TypeError):
        parse_logprobs(STRING_BLOCK)[0]  # type: ignore[index]
