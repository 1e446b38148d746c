"""The batch-slot check against the shim's real serving path (in process, smollm2-135m on the CPU):
a correct quantized server answers the probe in slots 1 and 3 exactly as in slot 0 of the same
batch shape, and the slot-variant fault (slot 0's activation scales read for every slot) fails, as
does the slot-tile fault (a second M tile reading the first tile's scales) in the wide batch."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from test_layers import build

from difftest.client import CompletionClient
from difftest.collect import Endpoint
from difftest.conformance import probe
from difftest.invariance import InvarianceResult, check_batch_slots
from difftest.prompts import Prompt
from server_shim.app import create_app
from server_shim.engine import Engine
from server_shim.options import ServeOptions

pytestmark = pytest.mark.slow  # loads smollm2-135m three times (~40 s)
PROBE = [Prompt("p0", "The capital of France is Paris. The capital of Germany is")]


@contextlib.asynccontextmanager
async def served(faults: tuple[str, ...], model: str = "smollm2-135m") -> AsyncIterator[Endpoint]:
    engine = Engine(build(model, "fp8-block", faults=faults))
    client = CompletionClient("http://shim", name="shim", max_retries=0, timeout_s=600,
                              transport=httpx.ASGITransport(app=create_app(engine, ServeOptions(model=model))))  # fmt: skip
    try:
        yield Endpoint("shim", client, await probe(client))
    finally:
        await client.aclose()
        engine.close()


async def check(faults: tuple[str, ...] = ()) -> InvarianceResult:
    async with served(faults) as ep:
        return await check_batch_slots(ep, PROBE, max_tokens=8, k=3)


async def test_a_correct_server_answers_every_slot_of_one_batch_shape_alike() -> None:
    r = await check()
    by = {s.placement: s for s in r.slots}
    assert list(by) == ["batch slot 0 of 4", "batch slot 1 of 4", "batch slot 3 of 4", "batch slot 1 of 4, sent again",
                        "batch slot 9 of 20", "batch slot 17 of 20", "slot 0 of 20, neighbours reordered",
                        "concurrent request 1 of 4", "concurrent request 3 of 4"]  # fmt: skip
    again = by["batch slot 1 of 4, sent again"]  # the repeat control: a deterministic server
    assert again.repeat and again.same_tokens and again.max_logprob_diff == 0.0
    assert by["batch slot 0 of 4"].shape_dependent and not by["batch slot 1 of 4"].shape_dependent
    for slot in (
        "batch slot 1 of 4",
        "batch slot 3 of 4",
        "batch slot 9 of 20",
        "batch slot 17 of 20",
        "slot 0 of 20, neighbours reordered",
    ):  # against slot 0: the same batch shape
        assert by[slot].same_tokens and by[slot].max_logprob_diff == 0.0, by[slot]
    # against the probe alone the batch's shape moves it: per-token fp8 activations land on
    # another grid point when a row's fp32 sum rounds otherwise at another M (measured 0.11 nats)
    assert by["batch slot 0 of 4"].max_logprob_diff > 1e-3
    assert r.token_failures == 0


async def test_the_slot_variant_fault_fails_against_slot_0() -> None:
    r = await check(("slot-variant",))
    by = {s.placement: s for s in r.slots}
    # slot 0 reads its own scales: the fault cannot show there; slots 1 and 3 read the filler's
    # and flip the first token, at a margin (measured 2.9 nats) no rounding bridges
    assert by["batch slot 0 of 4"].same_tokens
    for slot in ("batch slot 1 of 4", "batch slot 3 of 4"):
        assert by[slot].first_difference == 0 and by[slot].margin_at_difference > 1.0, by[slot]
    assert r.token_failures >= 2 and not r.verdict().passed
    assert r.repeat_worst == 0.0 and not r.repeat_flips  # deterministic: the flips are the slot's


async def test_the_slot_tile_fault_shows_only_past_the_first_tile() -> None:
    """slot-tile: slots past the first 16 rows read the first tile's scale rows. Every slot of the
    4-prompt batch and slot 9 of 20 are in the first tile and answer as slot 0; slot 17 reads
    slot 1's scales (a filler's) and moves, so only the wide batch catches it."""
    r = await check(("slot-tile",))
    by = {s.placement: s for s in r.slots}
    for slot in ("batch slot 1 of 4", "batch slot 3 of 4", "batch slot 9 of 20"):
        assert by[slot].same_tokens and by[slot].max_logprob_diff == 0.0, by[slot]
    assert not by["batch slot 17 of 20"].same_tokens, by["batch slot 17 of 20"]
    assert r.token_failures >= 1 and not r.verdict().passed
    assert r.repeat_worst == 0.0 and not r.repeat_flips
