"""Tokenizers the probe cannot compare by ids or strings are compared by usage.prompt_tokens (t10,
finding 3). A reference with token ids and a target with neither ids nor echo, on another
tokenizer, used to pass the pair check with a "could not be compared" warning, and the run then
FAILed on token match (exit 1) over byte-identical text: now the probe texts' prompt counts,
which differ by amounts that vary with the text, stop the run as a tokenizer mismatch (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FAKE_URL, FakeBehaviour, FakeServer
from quirk_fakes import live_app, quirk_app

from difftest.cli import main
from difftest.client import CompletionClient
from difftest.conformance import DEFAULT_PROBES, Capabilities, ProbeTokens, probe
from difftest.errors import ConformanceError
from difftest.tokenizer_check import PairCheck, check_pair

REF = FakeBehaviour()  # ids, /tokenize, echo: the shim's kind of server
BLIND = {"echo": False, "token_ids": False, "tokenize": False}  # token strings in generations only


class _Spy(httpx.AsyncBaseTransport):
    """A fake's transport that records completions bodies and can drop `usage` from answers."""

    def __init__(self, server: FakeServer, *, usage: bool = True) -> None:
        self.inner, self.usage, self.bodies = server.transport(), usage, []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/completions":
            return await self.inner.handle_async_request(request)
        self.bodies.append(json.loads(await request.aread()))
        resp = await self.inner.handle_async_request(request)
        body = json.loads(await resp.aread())
        if not self.usage and isinstance(body, dict):
            body.pop("usage", None)
        return httpx.Response(resp.status_code, json=body)

    def count_requests(self) -> int:
        """Requests of one token for a probe text: the probe's usage.prompt_tokens questions."""
        return sum(b.get("max_tokens") == 1 and b.get("prompt") in DEFAULT_PROBES for b in self.bodies)


def _client(spy: _Spy, name: str) -> CompletionClient:
    return CompletionClient(FAKE_URL, name=name, transport=spy, backoff_base_s=0.001, backoff_max_s=0.01)


async def _pair(ref: FakeBehaviour, tgt: FakeBehaviour, *, tgt_usage: bool = True) -> tuple[PairCheck, _Spy]:
    rs, ts = _Spy(FakeServer(ref)), _Spy(FakeServer(tgt), usage=tgt_usage)
    async with _client(rs, "ref") as rc, _client(ts, "tgt") as tc:
        return await check_pair((rc, await probe(rc)), (tc, await probe(tc))), ts


async def test_another_tokenizer_without_ids_or_echo_is_a_conformance_error() -> None:
    """The repro's pair: word pieces with ids on the reference, characters as strings on the target."""
    with pytest.raises(ConformanceError) as info:
        await _pair(REF, FakeBehaviour(tokenizer="alt", **BLIND))
    msg = str(info.value)
    assert info.value.exit_code == 2
    # by hand: "The quick brown fox ..." is 3 + 8 word pieces + "." = 12 tokens on the reference,
    # 38 on the target ("The" 3, " qu"+"ick" 2, " brown" 6, " fo"+"x" 2, " jumps" 6, " over" 5,
    # " the" 4, " lazy" 5, " dog" 4, "." 1); "1+2+3=" is "1+" "2+" "3" "=" against 6 characters
    assert msg.startswith("tokenizers differ: usage.prompt_tokens of probe 0 'The quick brown fox")
    assert "' 12 vs 38, probe 1 '1+2+3=' 4 vs 6, probe 2 " in msg and "(ref vs tgt)" in msg


async def test_a_bos_on_one_side_is_a_warning_not_an_error() -> None:
    """Every count one higher on the target: the same tokenizer plus a BOS, not another tokenizer."""
    pc, _ = await _pair(REF, FakeBehaviour(tokenizer="bos", **BLIND))
    assert pc.probes_compared == 0
    assert any(
        w.startswith("tgt counts +1 prompt token(s) on every probe text against ref (usage.prompt_tokens")
        for w in pc.warnings
    ), pc.warnings


async def test_equal_counts_back_the_could_not_be_compared_warning() -> None:
    pc, _ = await _pair(REF, FakeBehaviour(**BLIND))
    n = len(DEFAULT_PROBES)
    (note,) = [w for w in pc.warnings if "could not be compared" in w]
    assert f"their prompt token counts (usage.prompt_tokens) agree on all {n} probe texts" in note
    assert pc.counts_agree == n and pc.table()[0] == (
        "same tokenization",
        "warn",
        f"unverified; usage.prompt_tokens agree on {n} probes",
    )


async def test_a_server_without_usage_is_never_compared_by_counts() -> None:
    """Another tokenizer, but no counts to tell: the old warning, no error, and no count requests."""
    pc, spy = await _pair(REF, FakeBehaviour(tokenizer="alt", **BLIND), tgt_usage=False)
    assert any("could not be compared" in w and "garbled diffs" in w for w in pc.warnings)
    assert not any("usage.prompt_tokens" in w for w in pc.warnings)
    assert spy.count_requests() == 0  # its first generation showed it sends no usage


async def test_counts_cost_requests_only_where_echo_gave_none() -> None:
    """Echo answers carry the counts; a server without echo is asked one token per probe text,
    the first text's count coming from the probe's first generation."""
    pc, spy = await _pair(REF, FakeBehaviour(**BLIND))
    assert spy.count_requests() == len(DEFAULT_PROBES) - 1
    rs = _Spy(FakeServer(REF))
    async with _client(rs, "ref") as rc:
        caps = await probe(rc)
    assert rs.count_requests() == 0
    assert [t.prompt_tokens for t in caps.tokenizations] == [12, 4, 33, 39, 12, 23]


def _caps(name: str, counts: list[int | None], ids: bool = False) -> Capabilities:
    texts = ("a b", "c d e")
    toks = tuple(
        ProbeTokens(t, (1,) if ids else None, None, "tokenize" if ids else "none", n)
        for t, n in zip(texts, counts, strict=True)
    )
    return Capabilities(name=name, url="u", model="m", tokenizations=toks)


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


async def _check(ref: Capabilities, tgt: Capabilities) -> PairCheck:
    return await check_pair((_Named("ref"), ref), (_Named("tgt"), tgt))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ref", "tgt"),
    [
        ([3, 7], [5, None]),  # one count missing: one text left, which cannot tell BOS from tokenizer
        ([3, None], [5, 12]),
        ([None, None], [5, 12]),
    ],
)
async def test_a_missing_count_is_never_compared(ref: list[Any], tgt: list[Any]) -> None:
    pc = await _check(_caps("ref", ref), _caps("tgt", tgt))
    assert pc.counts_agree == 0


async def test_varying_count_differences_raise_and_name_both_counts() -> None:
    with pytest.raises(
        ConformanceError, match=r"probe 0 'a b' 3 vs 5, probe 1 'c d e' 7 vs 12 \(ref vs tgt\)"
    ):
        await _check(_caps("ref", [3, 7]), _caps("tgt", [5, 12]))


async def test_texts_compared_by_ids_do_not_reach_the_counts() -> None:
    """A shim pair: ids on both sides decide; counts that would differ are not read."""
    pc = await _check(_caps("ref", [3, 7], ids=True), _caps("tgt", [5, 12], ids=True))
    assert pc.verified_by == "token ids" and pc.probes_compared == 2
    assert not any("usage.prompt_tokens" in w for w in pc.warnings)


def test_the_repro_pair_exits_2_not_a_fail_verdict(tmp_path: Path) -> None:
    """End to end over HTTP: the run stops before judging (exit 2), never FAIL (exit 1)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(["1+2=", "the fox"]))
    )
    with live_app(quirk_app(REF)) as ref, live_app(quirk_app(FakeBehaviour(tokenizer="alt", **BLIND))) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--scheme", "none"]
        assert main([*argv, "--max-tokens", "6", "-o", str(tmp_path / "o")]) == 2
