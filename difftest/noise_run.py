"""`difftest noise`: measure how far the reference disagrees with itself (the A/A floor).

Three A/A comparisons against a first pass A of the reference, each a way real runs differ:
- repeated: the same requests again (catches nondeterminism: atomics, racy reductions);
- at concurrency 1: no batching (catches batch-shape effects on accumulation order);
- after a restart: a fresh process (catches init-order / autotune choices).
Each pass echoes pass A's continuations, so teacher-forced metrics compare the same tokens.
Nothing is cached: the point is to ask the server again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difftest.client import CompletionClient
from difftest.collect import Endpoint, Forced, Generation, force_all, generate_all, prompt_token_ids
from difftest.config import RunConfig
from difftest.conformance import probe
from difftest.noise import NoiseFloor, floor_from_comparisons
from difftest.prompts import Prompt, load_prompts
from difftest.results import Comparison
from difftest.scoring import build_comparison
from difftest.verdict import tie_margin_for
from server_shim.launch import RunningServer, api_key_of, launch_servers

log = logging.getLogger(__name__)


@dataclass
class _Pass:
    gens: dict[str, Generation]
    forced: dict[str, Forced]  # pass A's continuations echoed into this pass's server


async def _one_pass(
    srv: RunningServer, cfg: RunConfig, prompts: Sequence[Prompt], concurrency: int, base: _Pass | None
) -> _Pass:
    client = CompletionClient(
        srv.url, name=srv.name, api_key=api_key_of(srv.spec), timeout_s=cfg.run.request_timeout_s,
        max_retries=cfg.run.max_retries, concurrency=concurrency,
    )  # fmt: skip
    async with client:
        ep = Endpoint(srv.name, client, await probe(client))
        k = cfg.run.logprobs
        gens = await generate_all(ep, prompts, max_tokens=cfg.run.max_tokens, k=k, seed=cfg.run.seed)
        source = base.gens if base is not None else gens
        as_ids = bool(ep.caps.int_prompts) and ep.caps.token_id_strings
        forced = await force_all(
            ep, prompts, source, k=k, as_ids=as_ids, prompt_ids=lambda p: prompt_token_ids(ep, p.prompt)
        )
        return _Pass(gens, forced)


def _compare(name: str, a: _Pass, b: _Pass, prompts: Sequence[Prompt], cfg: RunConfig) -> Comparison:
    return build_comparison(
        "noise", cfg.reference.name, name, prompts, a.gens, b.gens,
        ref_forced=a.forced, tgt_forced=b.forced, tie_margin=tie_margin_for(None), k=cfg.run.logprobs, seed=cfg.run.seed,
    )  # fmt: skip


def measure_noise(cfg: RunConfig, *, limit: int | None, restart: bool, log_dir: Path) -> NoiseFloor:
    prompts = load_prompts(cfg.run.prompts, limit=limit if limit is not None else cfg.run.limit)
    spec = cfg.reference
    j = cfg.run.concurrency
    comps: list[Comparison] = []
    how: list[str] = []
    with launch_servers([spec], log_dir=log_dir) as running:
        srv = running[spec.name]
        a = asyncio.run(_one_pass(srv, cfg, prompts, j, None))
        comps.append(_compare("repeat", a, asyncio.run(_one_pass(srv, cfg, prompts, j, a)), prompts, cfg))
        how.append(f"repeat at concurrency {j}")
        if j != 1:
            comps.append(
                _compare("concurrency-1", a, asyncio.run(_one_pass(srv, cfg, prompts, 1, a)), prompts, cfg)
            )
            how.append(f"concurrency 1 vs {j}")
    if restart and spec.url is None:
        with launch_servers([spec], log_dir=log_dir / "restart") as running:
            comps.append(
                _compare(
                    "restart", a, asyncio.run(_one_pass(running[spec.name], cfg, prompts, j, a)), prompts, cfg
                )
            )
            how.append("after a restart")
    return floor_from_comparisons(comps, reference=spec.name, how=how)
