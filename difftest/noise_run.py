"""`difftest noise`: measure how far the reference disagrees with itself (the A/A floor).

Three A/A comparisons against a first pass A of the reference, each a way real runs differ:
- repeated: the same requests again (catches nondeterminism: atomics, racy reductions);
- at concurrency 1: no batching (catches batch-shape effects on accumulation order);
- after a restart: a fresh process (catches init-order / autotune choices).
Each pass echoes pass A's continuations, so teacher-forced metrics compare the same tokens.
Nothing is cached: the point is to ask the server again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difftest import aio
from difftest.collect import Endpoint, Forced, Generation, force_all, generate_all, prompt_token_ids
from difftest.config import RunConfig
from difftest.errors import DifftestError
from difftest.noise import NoiseFloor, floor_from_comparisons, measurement_settings, reference_identity
from difftest.prompts import Prompt, load_prompts
from difftest.results import Comparison
from difftest.scoring import build_comparison
from difftest.session import ClientOptions, Session, launch_shown
from difftest.verdict import tie_margin_for

log = logging.getLogger(__name__)


@dataclass
class _Pass:
    gens: dict[str, Generation]
    forced: dict[str, Forced] | None  # pass A's continuations echoed into this pass's server (None: chat)


async def _one_pass(ep: Endpoint, cfg: RunConfig, prompts: Sequence[Prompt], base: _Pass | None) -> _Pass:
    k = cfg.run.logprobs
    ep = dataclasses.replace(ep, seed=cfg.run.seed)  # its echoes too: the floor is measured as runs ask
    gens = await generate_all(ep, prompts, max_tokens=cfg.run.max_tokens, k=k, seed=cfg.run.seed)
    if ep.caps.api == "chat":  # no echo over chat (chat.NO_TEACHER_FORCING): KL stays unmeasured
        return _Pass(gens, None)
    source = base.gens if base is not None else gens
    as_ids = bool(ep.caps.int_prompts) and ep.caps.token_id_strings
    forced = await force_all(  # `source`: this server's own greedy answers (or its batched pass's)
        ep, prompts, source, k=k, as_ids=as_ids, prompt_ids=lambda p: prompt_token_ids(ep, p.prompt), own=True
    )
    return _Pass(gens, forced)


async def _serial_pass(ep: Endpoint, cfg: RunConfig, prompts: Sequence[Prompt], base: _Pass) -> _Pass:
    """The same server asked one request at a time (a sibling client: probed once, not again)."""
    async with ep.client.sibling(name=f"{ep.name}@serial", concurrency=1) as client:
        return await _one_pass(dataclasses.replace(ep, client=client), cfg, prompts, base)


def _compare(name: str, a: _Pass, b: _Pass, prompts: Sequence[Prompt], cfg: RunConfig) -> Comparison:
    return build_comparison(
        "noise", cfg.reference.name, name, prompts, a.gens, b.gens,
        ref_forced=a.forced, tgt_forced=b.forced, tie_margin=tie_margin_for(None), k=cfg.run.logprobs, seed=cfg.run.seed,
    )  # fmt: skip


async def _identity(ep: Endpoint, cfg: RunConfig) -> dict[str, str]:
    """The measured server's identity for the floor file (a run warns when its reference's differs)."""
    try:
        fp = await ep.client.fingerprint()
    except DifftestError as exc:  # optional endpoints: the file then records less
        log.debug("%s: no fingerprint (%s)", ep.name, exc)
        fp = None
    return reference_identity(cfg.reference, ep.caps.model, fp)


async def _first_server(
    session: Session, cfg: RunConfig, prompts: Sequence[Prompt]
) -> tuple[_Pass, list[Comparison], list[str], dict[str, str]]:
    """Pass A, then its repeat and (at another concurrency) a serial pass, on one probed server."""
    j = cfg.run.concurrency
    async with session:
        ep = session[cfg.reference.name]
        identity = await _identity(ep, cfg)
        a = await _one_pass(ep, cfg, prompts, None)
        comps = [_compare("repeat", a, await _one_pass(ep, cfg, prompts, a), prompts, cfg)]
        how = [f"repeat at concurrency {j}"]
        if j != 1:
            comps.append(_compare("concurrency-1", a, await _serial_pass(ep, cfg, prompts, a), prompts, cfg))
            how.append(f"concurrency 1 vs {j}")
    return a, comps, how, identity


async def _restarted(session: Session, cfg: RunConfig, prompts: Sequence[Prompt], a: _Pass) -> Comparison:
    async with session:
        return _compare(
            "restart", a, await _one_pass(session[cfg.reference.name], cfg, prompts, a), prompts, cfg
        )


def measure_noise(cfg: RunConfig, *, limit: int | None, restart: bool, log_dir: Path) -> NoiseFloor:
    prompts = load_prompts(
        cfg.run.prompts, limit=limit if limit is not None else cfg.run.limit, endpoint=cfg.run.endpoint
    )
    spec = cfg.reference
    # nothing is cached: the point is to ask the server again
    options = ClientOptions(
        timeout_s=cfg.run.request_timeout_s, max_retries=cfg.run.max_retries, concurrency=cfg.run.concurrency,
        endpoint=cfg.run.endpoint, max_tokens=cfg.run.max_tokens,
    )  # fmt: skip
    with launch_shown([spec], log_dir=log_dir) as running:
        a, comps, how, identity = aio.run(_first_server(Session.of_running(running, options), cfg, prompts))
    if restart and spec.url is None:  # a fresh process: a new session, probed again
        with launch_shown([spec], log_dir=log_dir / "restart") as running:
            comps.append(aio.run(_restarted(Session.of_running(running, options), cfg, prompts, a)))
            how.append("after a restart")
    floor = floor_from_comparisons(comps, reference=spec.name, how=how)
    settings = measurement_settings(
        max_tokens=cfg.run.max_tokens, logprobs=cfg.run.logprobs, endpoint=cfg.run.endpoint, prompts=prompts
    )
    return dataclasses.replace(floor, identity=identity, settings=settings)
