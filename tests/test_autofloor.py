"""The in-run A/A floor of a golden: zero for a deterministic server, the real noise otherwise."""

from __future__ import annotations

from fakes import FakeBehaviour, FakeServer

from difftest.autofloor import golden_floor
from difftest.collect import Endpoint, force, generate_all, prompt_token_ids
from difftest.conformance import probe
from difftest.progress import Progress
from difftest.prompts import Prompt

PROMPTS = [
    Prompt(f"p{i}", text) for i, text in enumerate(["the quick brown", "1+2+3=", "def f(x):", "a lazy dog"])
]


async def floor_of(behaviour: FakeBehaviour):  # noqa: ANN201
    server = FakeServer(behaviour)
    async with server.client(name="gold") as client:
        ep = Endpoint("gold", client, await probe(client))
        gens = await generate_all(ep, PROMPTS, max_tokens=8, k=5, seed=0)
        forced = {}
        for p in PROMPTS:
            ids = await prompt_token_ids(ep, p.prompt)
            forced[p.id] = await force(ep, p, gens[p.id], prompt_ids=ids, as_ids=True, k=5)
        with Progress(enabled=False) as progress:
            return await golden_floor(
                ep, PROMPTS, gens, forced, max_tokens=8, k=5, seed=0, concurrency=4, progress=progress
            ), server


async def test_deterministic_golden_has_a_zero_floor_and_was_asked_again() -> None:
    floor, server = await floor_of(FakeBehaviour())
    assert floor.kl_mean == 0.0 and floor.token_mismatch == 0.0 and floor.top1_disagreement == 0.0
    assert floor.n_prompts == len(PROMPTS) and "concurrency 4 vs 1" in floor.how[0]
    # the serial pass really went to the server (no cache): 2 generations + 2 echoes per prompt
    assert server.completions_served >= 4 * len(PROMPTS)


async def test_noisy_golden_has_a_positive_floor() -> None:
    floor, _ = await floor_of(FakeBehaviour(nondeterministic=True))
    assert floor.failed_requests == 0  # the noise is real answers differing, not failures
    assert floor.token_mismatch is not None and floor.token_mismatch > 0
