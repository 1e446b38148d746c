"""`difftest record`: ask the reference everything a run would ask it, through a recording
transport, and keep the answers as a Baseline (difftest.baseline).

What a run asks the reference, in the runner's order: the conformance probe; the greedy
continuation of every prompt; its own continuation teacher-forced (echoed back), as text and —
where the reference returns token ids — as ids too, since which of the two a run uses depends on
the target; the prompts' token ids for that; the batch-slot check, as many times as a run draws
the reference's own slot variance (runner.SLOT_BASELINE_DRAWS, one after the other as there): the
replay gives the n-th identical request the n-th recorded answer, so each replayed draw is a
recorded draw, not the first one served again; its fingerprint (/version); the /detokenize
text of its own token ids where they come without text. Nothing else is needed later: another
server's text is never tokenized by the replay (`retokenize.plan`), since the recording cannot
know it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from difftest import aio
from difftest.baseline import Baseline, RecordingTransport, prompt_record
from difftest.chat import probe_endpoint
from difftest.client import CompletionClient
from difftest.collect import Endpoint, force_all, generate_all, prompt_token_ids
from difftest.progress import Progress
from difftest.prompts import Prompt
from difftest.signature import versions

log = logging.getLogger(__name__)
CHUNK_PROMPTS = 256


async def record_reference(
    name: str,
    url: str,
    prompts: Sequence[Prompt],
    settings: dict[str, Any],
    *,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_retries: int = 3,
    concurrency: int = 8,
    batch_slot_check: bool = True,
    progress: bool | None = None,
    transport: Any = None,
    model: str | None = None,
) -> Baseline:
    rec = RecordingTransport(transport)
    client = CompletionClient(
        url, name=name, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries,
        concurrency=concurrency, transport=rec, model=model,
    )  # fmt: skip
    try:
        endpoint = settings.get("endpoint", "completions")
        caps = await probe_endpoint(client, model, endpoint, settings["max_tokens"])
        # a run reads the reference's fingerprint (its /version, the scheme it serves): unrecorded,
        # /version was a replay miss in every run with a quantized target
        await client.fingerprint()
        k, max_tokens, seed = settings["logprobs"], settings["max_tokens"], settings["seed"]
        # the run's seed on every request built from the endpoint (echoes, slot probes), as a run
        # sends it: a replay answers only the bodies it recorded
        ep = Endpoint(name, client, caps, seed=seed)
        variants = sorted({False, bool(caps.token_id_strings)}) if caps.teacher_forced else []
        ids: dict[str, list[int] | None] = {}

        async def ids_for(p: Prompt) -> list[int] | None:
            if p.id not in ids:
                ids[p.id] = await prompt_token_ids(ep, p.prompt)
            return ids[p.id]

        failed: list[str] = []
        with Progress(enabled=progress) as bar:
            gen_task = bar.add("generate", total=len(prompts))
            tf_task = bar.add("teacher-forced", total=len(prompts) * len(variants))
            for start in range(0, len(prompts), CHUNK_PROMPTS):
                chunk = prompts[start : start + CHUNK_PROMPTS]
                gens = await generate_all(
                    ep, chunk, max_tokens=max_tokens, k=k, seed=seed, on_done=lambda: bar.advance(gen_task)
                )
                failed += [pid for pid, g in gens.items() if g.error]
                await _record_readable(ep, gens)
                for as_ids in variants:
                    await force_all(
                        ep, chunk, gens, k=k, as_ids=as_ids, prompt_ids=ids_for,
                        on_done=lambda: bar.advance(tf_task), own=True,
                    )  # fmt: skip
        slot_draws = 0
        if batch_slot_check and caps.api != "chat":
            from difftest.invariance import check_batch_slots
            from difftest.runner import SLOT_BASELINE_DRAWS

            for _ in range(SLOT_BASELINE_DRAWS):
                await check_batch_slots(ep, prompts, max_tokens=min(max_tokens, 16), k=k)
            slot_draws = SLOT_BASELINE_DRAWS
    finally:
        await client.aclose()
    if failed:
        log.warning(
            "%s: %d of %d generations failed; they are recorded as failures", name, len(failed), len(prompts)
        )
    return Baseline(
        # failed_prompts: a generation lost without an answer is not in the exchanges, and
        # Baseline.check must tell it from a prompt edited in the file
        reference={
            "name": name,
            "url": url,
            "model": caps.model,
            "failed_generations": len(failed),
            "failed_prompts": failed,
        },
        settings=dict(settings),
        prompts=[prompt_record(p) for p in prompts],
        exchanges=rec.exchanges,
        tokenizer={
            "model": caps.model,
            "vocab_size": caps.vocab_size,
            "token_ids": caps.token_ids,
            "probe_tokenizations": [
                {"text": t.text, "ids": t.ids, "strings": t.strings, "source": t.source}
                for t in caps.tokenizations
            ],
        },
        capabilities={
            "checks": [list(c) for c in caps.checks],
            "warnings": list(caps.warnings),
            "model_first_of_several": caps.model_first_of_several,
        },
        signature={
            "versions": versions(),
            "batch_slot_check": batch_slot_check,
            "batch_slot_draws": slot_draws,
        },
    )


async def _record_readable(ep: Endpoint, gens: Mapping[str, Any]) -> None:
    """Ask what a run asks of the reference's own answers after generating: the /detokenize text
    of ids that come without one (vLLM's "token_id:N" labels, `retokenize.Retokenizer.readable`).
    Unrecorded, the replay answers those 404 and a run keeps labels where the live one had text."""
    from difftest.retokenize import Retokenizer

    await Retokenizer({ep.name: ep}, {}).readable(ep, list(gens.values()))


def record(name: str, url: str, prompts: Sequence[Prompt], settings: dict[str, Any], **kw: Any) -> Baseline:
    return aio.run(record_reference(name, url, prompts, settings, **kw))
