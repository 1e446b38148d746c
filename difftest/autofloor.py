"""The in-run A/A floor: each golden measured against itself when no noise-floor file is given.

Exactness limits come from the golden against itself at other batch widths / concurrency, times
a margin (docs/design.md "Two references"). Without a floor file the built-in minimums were calibrated on fp32 CPU
servers, where batching moves nothing; on a batched fp16 GPU server a correct fp8-block Triton
target matched its torch golden on only 51% of greedy tokens (H100, smollm2, 10 prompts) while
every module matched locally to 1e-7 — the golden itself answers differently when batched. So
`run` re-asks each golden serially (concurrency 1, no cache) and compares that with the batched
pass it already made: the same server, two batch shapes. On CPU fp32 this measures ~0 and the
minimums stand; on a GPU it measures the real batch noise. It costs one serial pass per golden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from difftest.collect import Endpoint, Forced, Generation, force_all, generate_all, prompt_token_ids
from difftest.noise import NoiseFloor, floor_from_comparisons
from difftest.progress import Progress
from difftest.prompts import Prompt
from difftest.scoring import build_comparison
from difftest.verdict import tie_margin_for


async def golden_floor(
    ep: Endpoint,
    prompts: Sequence[Prompt],
    batched: Mapping[str, Generation],
    batched_forced: Mapping[str, Forced] | None,
    *,
    max_tokens: int,
    k: int,
    seed: int,
    concurrency: int,
    progress: Progress,
) -> NoiseFloor:
    """`ep` asked again one request at a time, against its batched answers `batched`."""
    async with ep.client.sibling(name=f"{ep.name}@serial", concurrency=1) as serial_client:
        serial = dataclasses.replace(ep, client=serial_client)
        task = progress.add(f"A/A {ep.name}", total=2 * len(prompts))
        gens = await generate_all(
            serial, prompts, max_tokens=max_tokens, k=k, seed=seed, on_done=lambda: progress.advance(task)
        )
        forced: dict[str, Forced] | None = None
        if batched_forced is not None:
            as_ids = bool(ep.caps.int_prompts) and ep.caps.token_id_strings
            forced = await force_all(
                serial, prompts, batched, k=k, as_ids=as_ids,
                prompt_ids=lambda p: prompt_token_ids(serial, p.prompt), on_done=lambda: progress.advance(task),
                own=True,  # the same server's own greedy answers, asked in a batch
            )  # fmt: skip
    comp = build_comparison(
        "noise", ep.name, f"{ep.name}@serial", prompts, batched, gens,
        ref_forced=batched_forced, tgt_forced=forced, tie_margin=tie_margin_for(None), k=k, seed=seed,
    )  # fmt: skip
    return floor_from_comparisons(
        [comp], reference=ep.name, how=(f"in-run: concurrency {concurrency} vs 1, same server",)
    )
