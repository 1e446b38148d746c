"""Conformance against fakes that behave like real engines: every quirk reported, none crashes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import QUIRKS, FakeBehaviour, FakeServer

from difftest.conformance import DEFAULT_PROBES, Capabilities, ProbeTokens, probe
from difftest.errors import ConformanceError, InfraError
from difftest.tokenizer_check import check_pair
from difftest.tokens_view import parse_choice


async def probed(behaviour: FakeBehaviour, name: str = "srv", **client_kw) -> Capabilities:
    async with FakeServer(behaviour).client(name=name, **client_kw) as c:
        return await probe(c)


def row(caps: Capabilities, check: str) -> tuple[str, str]:
    found = [(status, detail) for name, status, detail in caps.table() if name == check]
    assert len(found) == 1, f"{check} missing from {caps.table()}"
    return found[0]


# quirk -> (check row, its status, a warning fragment or None, teacher-forced trusted)
EXPECTED = {
    "good": ("echo = generation logprobs", "ok", None, True),
    "no_echo": ("echo", "fail", "no echo: teacher-forced metrics disabled", False),
    "echo_no_prompt_logprobs": ("echo", "warn", "echo returns no prompt logprobs", False),
    "string_keyed_no_ids": ("token ids in responses", "warn", "no token ids", True),
    "logprobs_cap_5": ("logprobs cap", "warn", "logprobs capped at 5", True),
    "no_logprobs": ("logprobs cap", "fail", "no logprobs: teacher-forced metrics", False),
    "echo_logprobs_500": ("echo", "warn", "echo with logprobs fails (HTTP 500", False),
    "misaligned_echo": (
        "echo = generation logprobs",
        "fail",
        "echoed logprobs differ from generation",
        False,
    ),
    "nondeterministic": ("greedy determinism", "warn", "greedy decoding is not deterministic", True),
    "no_int_prompts": ("token-id prompts", "warn", "prompts as token-id lists rejected", True),
    "debug": ("debug protocol", "ok", None, True),
}


@pytest.mark.parametrize("quirk", sorted(EXPECTED))
async def test_each_quirk_is_reported_with_its_warning(quirk: str) -> None:
    check, status, warning, trusted = EXPECTED[quirk]
    caps = await probed(QUIRKS[quirk])
    assert row(caps, check)[0] == status
    assert caps.teacher_forced is trusted
    if warning:
        assert any(warning in w for w in caps.warnings), caps.warnings
    assert row(caps, "completions")[0] == "ok"
    assert all(s in ("ok", "warn", "fail", "n/a") and isinstance(d, str) for _, s, d in caps.table())
    json.dumps(caps.to_dict())  # goes into report.json as is


async def test_good_server_capabilities() -> None:
    caps = await probed(FakeBehaviour(debug=True))
    assert caps.warnings == ()
    assert (caps.model, caps.models, caps.deterministic, caps.logprobs_cap) == (
        "fake-model",
        ("fake-model",),
        True,
        20,
    )
    assert caps.token_ids == "return_tokens_as_token_ids" and caps.top_logprobs_keys == "id"
    assert caps.echo and caps.echo_logprobs and caps.echo_aligned and caps.echo_consistent
    assert caps.echo_max_abs_diff == 0.0 and caps.int_prompts and caps.tokenize and caps.debug
    assert caps.vocab_size == FakeServer().tokenizer.vocab_size
    assert [t.text for t in caps.tokenizations] == list(DEFAULT_PROBES)
    assert caps.tokenizations[1].ids == tuple(FakeServer().tokenizer.encode("1+2+3="))


async def test_string_keyed_server_still_verifies_echo_through_text() -> None:
    caps = await probed(QUIRKS["string_keyed_no_ids"])
    assert caps.top_logprobs_keys == "str" and caps.token_ids == "none" and caps.int_prompts is None
    assert caps.echo_consistent and "via text" in row(caps, "echo = generation logprobs")[1]
    assert all(t.ids is None and t.strings for t in caps.tokenizations)


async def test_bos_is_allowed_in_echo_alignment() -> None:
    caps = await probed(FakeBehaviour(tokenizer="bos"))
    assert row(caps, "echo aligned")[0] == "ok" and caps.teacher_forced
    assert caps.tokenizations[0].ids[0] == 3  # BOS


async def test_tokenizer_hint_fills_ids_when_the_server_has_none() -> None:
    tok = FakeServer().tokenizer
    async with FakeServer(QUIRKS["string_keyed_no_ids"]).client() as c:
        caps = await probe(c, probe_texts=("1+2+3=",), tokenizer_hint=tok.encode)
    assert caps.tokenizations == (
        ProbeTokens("1+2+3=", tuple(tok.encode("1+2+3=")), caps.tokenizations[0].strings, "hint"),
    )


async def test_refused_completions_are_a_conformance_error() -> None:
    with pytest.raises(ConformanceError, match="cannot serve /v1/completions.*HTTP 401") as info:
        await probed(FakeBehaviour(api_key="k"), max_retries=1)
    assert info.value.exit_code == 2


async def test_a_server_failing_every_request_is_infrastructure_exit_3() -> None:
    """5xx on everything is the server's fault, not a mismatch between servers: exit 3, named."""
    with pytest.raises(
        InfraError, match=r"srv \(http://fake.invalid\) fails /v1/completions: HTTP 503"
    ) as info:
        await probed(FakeBehaviour(die_after=0), max_retries=1)
    assert info.value.exit_code == 3


async def test_a_key_makes_the_protected_server_work() -> None:
    caps = await probed(FakeBehaviour(api_key="k"), api_key="k")
    assert caps.teacher_forced


@pytest.mark.parametrize("die_after", [2, 4, 7, 12])
async def test_a_server_dying_mid_probe_degrades_without_crashing(die_after: int) -> None:
    caps = await probed(FakeBehaviour(die_after=die_after), max_retries=0)
    assert row(caps, "completions")[0] == "ok"
    assert any("HTTP 503" in detail for _, _, detail in caps.table())
    assert caps.warnings != ("no debug protocol: white-box checks (layers, quant audit) disabled",)
    if die_after < 10:  # died before echo was verified
        assert not caps.teacher_forced


async def test_slow_server_past_the_timeout_is_infrastructure() -> None:
    with pytest.raises(InfraError, match="timed out after 0.02s"):
        await probed(FakeBehaviour(delay_s=0.5), timeout_s=0.02, max_retries=0)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("half-logprobs", r'text and logprobs disagree: 4 logprob tokens for max_tokens=8 with finish_reason "length"'),
        ("no-logprob-tokens", r"text and logprobs disagree: no logprob tokens for \d+ characters of text"),
        ("short-logprobs", r"malformed logprobs block: token_logprobs has 7 entries for 8 tokens"),
        ("nan-logprobs", r"NaN logprobs at positions .*NaN always fails\) in its generation"),
    ],
)  # fmt: skip
async def test_logprobs_that_are_not_the_text_stop_the_run_naming_the_server(
    fault: str, message: str
) -> None:
    """Issue 10: half-covering logprobs used to switch teacher forcing off quietly (a token-match-only
    PASS), zero logprob tokens with text crashed (exit 1), NaN disabled echo checks silently."""
    with pytest.raises(ConformanceError, match=r"^tgt \(http://fake.invalid\): " + message) as info:
        await probed(FakeBehaviour(fault=fault), name="tgt")
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("half-logprobs", "echoed text and logprobs disagree: the 6 logprob tokens cover 19 of the 44 characters"),
        ("nan-logprobs", r"NaN logprobs at positions \[1, 2.* in its echo"),
        ("short-logprobs", "malformed logprobs block: token_logprobs has 11 entries for 12 tokens"),
    ],
)  # fmt: skip
async def test_echo_whose_logprobs_are_not_the_text_stops_the_run(fault: str, message: str) -> None:
    """Generation fine, echo broken: teacher forcing used to be switched off quietly ("misaligned")."""
    with pytest.raises(ConformanceError, match=r"^tgt \(http://fake.invalid\): " + message):
        await probed(FakeBehaviour(fault=fault, fault_echo_only=True), name="tgt")


@pytest.mark.parametrize("fault", ["http-500", "invalid-json", "no-choices", "truncated-sse", "reset"])
async def test_broken_answers_to_every_request_are_infrastructure(fault: str) -> None:
    with pytest.raises(InfraError, match=r"^tgt \(http://fake.invalid\) fails /v1/completions: ") as info:
        await probed(FakeBehaviour(fault=fault), name="tgt", max_retries=1)
    assert info.value.exit_code == 3


# ----------------------------------------------------------------------------- pairs


async def pair(a: FakeBehaviour, b: FakeBehaviour):
    async with FakeServer(a).client(name="ref") as rc, FakeServer(b).client(name="tgt") as tc:
        return await check_pair((rc, await probe(rc)), (tc, await probe(tc)))


async def test_same_tokenizer_pair_is_verified_by_ids() -> None:
    pc = await pair(FakeBehaviour(), FakeBehaviour(perturb_noise=1.0))
    assert pc.verified_by == "token ids" and pc.probes_compared == len(DEFAULT_PROBES)
    assert pc.teacher_forced and pc.echo_as_ids and pc.warnings == ()
    assert pc.table()[0][1] == "ok"


async def test_string_only_pair_is_verified_by_strings() -> None:
    q = QUIRKS["string_keyed_no_ids"]
    pc = await pair(q, q)
    assert pc.verified_by == "token strings" and not pc.echo_as_ids


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        (FakeBehaviour(tokenizer="alt"), "probe 0 'The quick brown fox"),
        (FakeBehaviour(tokenizer="bos"), "first differs at token 0"),
        (FakeBehaviour(tokenizer="alt", token_ids=False, tokenize=False), "token strings"),
    ],
)
async def test_different_tokenizers_stop_the_run(target: FakeBehaviour, fragment: str) -> None:
    ref = FakeBehaviour(token_ids=False, tokenize=False) if not target.tokenize else FakeBehaviour()
    with pytest.raises(ConformanceError, match="tokenizers differ") as info:
        await pair(ref, target)
    assert fragment in str(info.value) and "ref gives" in str(info.value) and "tgt gives" in str(info.value)


async def test_unverifiable_tokenization_is_a_warning() -> None:
    blind = FakeBehaviour(echo=False, token_ids=False, tokenize=False)
    pc = await pair(FakeBehaviour(), blind)
    assert pc.probes_compared == 0 and pc.verified_by == "none"
    assert any("could not be compared" in w for w in pc.warnings)
    assert any("teacher-forced metrics disabled: echo not trusted on tgt" in w for w in pc.warnings)


async def test_vocab_size_mismatch_stops_the_run() -> None:
    toks = (ProbeTokens("a", (1,), None, "tokenize"),)
    a = Capabilities(name="ref", url="u", model="m", vocab_size=100, tokenizations=toks)
    b = Capabilities(name="tgt", url="v", model="m", vocab_size=101, tokenizations=toks)
    async with FakeServer().client(name="ref") as rc, FakeServer().client(name="tgt") as tc:
        with pytest.raises(ConformanceError, match="vocabulary sizes differ: ref has 100, tgt has 101"):
            await check_pair((rc, a), (tc, b))


# ----------------------------------------------------------------------------- the fake itself


async def test_fake_serves_what_it_says() -> None:
    server = FakeServer()
    prompt = "The quick brown fox"
    async with server.client() as c:
        r = await c.completions({"prompt": prompt, "max_tokens": 5, "logprobs": 3, "echo": True,
                                 "return_tokens_as_token_ids": True})  # fmt: skip
    view = parse_choice(r["choices"][0])
    ids = server.tokenizer.encode(prompt)
    gen = server.expected_greedy(prompt, 5)
    assert view.token_ids == tuple(ids + gen)
    assert r["choices"][0]["text"] == prompt + server.tokenizer.decode(gen)
    expected = server.expected_logprobs(ids + gen)
    assert view.logprobs[0] is None
    assert np.allclose(view.logprobs[1:], expected[1:], atol=1e-12)
    for pos in view.positions[len(ids) :]:  # greedy picks the top-1 of its own distribution
        assert max(pos.top, key=pos.top.get) == pos.token_id


async def test_fake_perturbations_make_a_deterministically_wrong_target() -> None:
    ref, noisy, flipped = FakeServer(), FakeServer(perturb_noise=2.0), FakeServer(flip_every=3)
    prompts = [f"prompt {i}" for i in range(10)]
    base = [ref.expected_greedy(p, 12) for p in prompts]
    assert [noisy.expected_greedy(p, 12) for p in prompts] != base
    assert [noisy.expected_greedy(p, 12) for p in prompts] == [noisy.expected_greedy(p, 12) for p in prompts]
    for p, b in zip(prompts, base, strict=True):
        f = flipped.expected_greedy(p, 12)
        n = len(flipped.tokenizer.encode(p))
        j = next(j for j in range(12) if (n + j) % 3 == 0)  # the first context of a length divisible by 3
        assert f[:j] == b[:j] and f[j] != b[j]  # the runner-up there
