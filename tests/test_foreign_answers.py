"""What foreign servers really send, read right: llama.cpp's logprobs shape, NaN written as
`null`, probabilities in the logprob slot, a logprobs cap on one side only, no /v1/models, a 200
carrying an error. Each was a traceback, a misdiagnosis or a silently wrong number before."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fakes import FakeBehaviour, FakeServer
from live_fakes import live_fake
from test_differ_faults import config
from test_runner import PROMPTS

from difftest.cache import canonical_json
from difftest.cli import main
from difftest.collect import first_choice
from difftest.errors import UnreadableBody
from difftest.identity import canary_summary, vouches
from difftest.report import load_run
from difftest.scoring import same_depth
from difftest.tokens_view import coverage_problem, impossible_logprobs, parse_logprobs

# ----------------------------------------------------------------------------- pure checks


def test_llama_cpp_content_shape_is_read_with_ids_offsets_and_id_keyed_alternatives() -> None:
    """llama-server's /v1/completions answer (server-task.cpp, to_json_oaicompat): the chat shape,
    with each token's id; a byte piece's `token` is cut to valid UTF-8, its `bytes` are whole."""
    block = {
        "content": [
            {"id": 7, "token": " Paris", "bytes": list(b" Paris"), "logprob": -0.25,
             "top_logprobs": [{"id": 7, "token": " Paris", "bytes": list(b" Paris"), "logprob": -0.25},
                              {"id": 9, "token": " Lyon", "bytes": list(b" Lyon"), "logprob": -2.0}]},
            {"id": 300, "token": "", "bytes": [0xC3], "logprob": -0.5, "top_logprobs": []},
            {"id": 301, "token": "", "bytes": [0xA9], "logprob": -0.1, "top_logprobs": []},
        ]
    }  # fmt: skip
    view = parse_logprobs(block, text=" Paris\u00e9")
    assert view.token_ids == (7, 300, 301)
    assert view.positions[0].top == {7: -0.25, 9: -2.0}
    assert [p.text_offset for p in view.positions] == [0, 6, 6]  # a lone byte adds no character
    assert coverage_problem(view, max_tokens=3, finish_reason="length") is None


def test_post_sampling_probabilities_are_refused_not_read_as_logprobs() -> None:
    block = {"content": [{"id": 7, "token": "a", "prob": 0.9, "top_probs": []}]}
    with pytest.raises(UnreadableBody, match="post-sampling probabilities, not logprobs"):
        parse_logprobs(block, text="a")


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        ({"tokens": ["a"], "token_logprobs": [-0.1], "top_logprobs": [{"a": -0.1, "b": None}]}, "NaN logprobs"),
        ({"tokens": ["a"], "token_logprobs": [0.9], "top_logprobs": [{"a": 0.9}]}, "logprobs above 0"),
        ({"tokens": ["a"], "token_logprobs": [-0.2], "top_logprobs": [{"a": -0.2, "b": -0.3}]},
         "add up to 1.56 (more than 1)"),  # e^-0.2 + e^-0.3 = 0.819 + 0.741
    ],
)  # fmt: skip
def test_values_that_cannot_be_logprobs_are_named(block: dict, problem: str) -> None:
    assert problem in (impossible_logprobs(parse_logprobs(block, text="a")) or "")


def test_a_greedy_token_of_probability_0_is_impossible_an_echoed_one_is_not() -> None:
    """-Infinity at a generated position was scored (KL inf) instead of failing as a broken answer."""
    view = parse_logprobs(
        {"tokens": ["a"], "token_logprobs": [-math.inf], "top_logprobs": [{"b": -0.1}]}, text="a"
    )
    assert "chosen tokens of probability 0" in (impossible_logprobs(view, greedy=True) or "")
    assert impossible_logprobs(view) is None  # an echoed prompt token may have underflowed to 0


def test_rounding_above_zero_is_not_impossible() -> None:
    """A float32 log-softmax gives the certain token +1e-7; bf16 about 1e-2: both are answers."""
    view = parse_logprobs(
        {"tokens": ["a"], "token_logprobs": [0.01], "top_logprobs": [{"a": 0.01}]}, text="a"
    )
    assert impossible_logprobs(view) is None


def test_a_null_generated_logprob_is_no_answer() -> None:
    view = parse_logprobs({"tokens": ["a", "b"], "token_logprobs": [-0.1, None]}, text="ab")
    assert "null logprobs at generated positions [1]" in (coverage_problem(view) or "")


def test_same_depth_cuts_the_longer_list_to_the_shorter_keeping_its_largest() -> None:
    ref = {"a": -0.1, "b": -2.0, "c": -3.0, "d": -4.0}
    tgt = {"a": -0.1, "b": -2.0}
    assert same_depth(ref, tgt) == ({"a": -0.1, "b": -2.0}, tgt)
    assert same_depth(tgt, ref) == (tgt, {"a": -0.1, "b": -2.0})


@pytest.mark.parametrize("bad", [math.nan, -math.inf, None])
def test_a_canary_with_a_non_finite_logprob_is_json_and_never_vouches(bad: float | None) -> None:
    """NaN / -Infinity in the canary crashed every cached run (canonical JSON refuses NaN): exit 1
    with two tracebacks. Now the value is kept by name and the canary vouches for nothing."""
    answer = {"choices": [{"text": "ab", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, bad], "top_logprobs": [{"a": -0.1}, {"b": bad}]}}]}  # fmt: skip
    summary = canary_summary(answer)
    canonical_json(summary)
    assert not vouches(summary)


def test_first_choice_is_the_one_indexed_0() -> None:
    resp = {"choices": [{"index": 1, "text": "second"}, {"index": 0, "text": "first"}]}
    assert first_choice(resp, "s")[0]["text"] == "first"


# ----------------------------------------------------------------------------- through a run


def _run(
    tmp_path: Path, target: FakeBehaviour, ref: FakeBehaviour | None = None, **run: object
) -> tuple[int, str]:
    with live_fake(ref) as r, live_fake(target) as t:
        cfg = config(tmp_path, r, [{"name": "tgt", "url": t, "scheme": "fp8-block"}], **run)
        code = main(["run", str(cfg)])
    return code, str(tmp_path / "out")


@pytest.mark.slow
def test_a_llama_cpp_target_is_compared_by_id(tmp_path: Path) -> None:
    """Refused by every command before ("text and logprobs disagree: no logprob tokens")."""
    code, out = _run(tmp_path, FakeBehaviour(logprobs_shape="llamacpp", echo=False))
    assert code == 0
    acc = load_run(out).targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["token_match"] == 1.0
    assert acc.prompts[0].tgt_token_ids is not None


@pytest.mark.slow
@pytest.mark.parametrize("route", ["404", "list"])
def test_a_server_without_a_usable_models_list_is_still_judged(tmp_path: Path, route: str) -> None:
    """The probe calls this a gap ("no /v1/models"); every run was refused (exit 2 or 3), each
    cached request asking /v1/models again and waiting out its timeout."""
    code, _ = _run(tmp_path, FakeBehaviour(models_route=route))
    assert code == 0


@pytest.mark.slow
def test_a_logprobs_cap_on_one_side_biases_nothing(tmp_path: Path) -> None:
    """One server behind a cap of 5 against itself uncapped scored KL 0.008 (imputed alternatives).
    The depth said is the one the echoes had (scoring.depth_notes), not the probe's cap."""
    code, out = _run(tmp_path, FakeBehaviour(max_logprobs=5), logprobs=20)
    acc = load_run(out).targets[0].comparison("accuracy")
    assert code == 0 and acc is not None
    assert acc.aggregate["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert acc.aggregate["kl_depth_min"] == 5 and acc.aggregate["kl_depth_cut_rate"] == 1
    (said,) = [w for w in acc.warnings if w.startswith("KL compared at fewer alternatives than the 20 asked")]
    assert "(100%), down to top-5: tgt's echoes list as few as 5 (on " in said


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["null-logprobs", "probability-logprobs"])
@pytest.mark.parametrize("echo_only", [False, True], ids=["generation", "echo"])
def test_impossible_logprobs_stop_the_run_naming_the_server(
    tmp_path: Path, fault: str, echo_only: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """null (NaN through orjson) at generated positions passed (exit 0); probabilities in the
    logprob slots were judged a regression (exit 1). Both are answers no model gives: exit 2."""
    code, _ = _run(tmp_path, FakeBehaviour(fault=fault, fault_echo_only=echo_only))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("difftest: error: tgt (http://127.0.0.1:")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["null-logprobs", "probability-logprobs"])
def test_impossible_logprobs_mid_run_fail_the_prompt(tmp_path: Path, fault: str) -> None:
    code, out = _run(tmp_path, FakeBehaviour(fault=fault, fault_match="dog is"))
    (t,) = load_run(out).targets
    acc = t.comparison("accuracy")
    assert code == 1 and t.verdict is not None and t.verdict.label == "FAIL"  # the target's bug, not infra
    assert acc is not None and acc.aggregate["broken_answers"] == 1.0
    (failed,) = [p for p in acc.prompts if p.error]
    assert failed.prompt_id == f"p{PROMPTS.index('the lazy dog is')}"


async def test_a_200_carrying_an_error_says_the_servers_message() -> None:
    client = FakeServer(FakeBehaviour(fault="error-200")).client("tgt", max_retries=0)
    async with client:
        with pytest.raises(UnreadableBody, match="without a 'choices' list: CUDA out of memory"):
            await client.completions({"prompt": "a", "max_tokens": 1})


@pytest.mark.slow
def test_text_that_contradicts_identical_ids_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same ids, garbled text: scored exact with no word before (token metrics compare ids)."""
    code, out = _run(tmp_path, FakeBehaviour(fault="garbled-text", fault_match="dog is"))
    acc = load_run(out).targets[0].comparison("accuracy")
    assert code == 0 and acc is not None
    (note,) = [w for w in acc.warnings if "other text for the same generated token ids" in w]
    assert f"on 1 prompt(s) (p{PROMPTS.index('the lazy dog is')})" in note
    assert "other text for the same generated token ids" in " ".join(capsys.readouterr().out.split())


async def test_a_nan_canary_is_named_as_such() -> None:
    """It was reported as "came back without logprobs", which sends a user looking for a cap."""
    from difftest.cache import ResponseCache

    client = FakeServer(FakeBehaviour(fault="nan-logprobs")).client(
        "tgt", max_retries=0, cache=ResponseCache(":memory:")
    )
    async with client:
        await client.completions({"prompt": "a", "max_tokens": 1})
    assert client.identity_note is not None and "no finite numbers" in client.identity_note
