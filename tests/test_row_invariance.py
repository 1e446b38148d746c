"""A row's numbers do not depend on how many rows share the engine's batch (the shim is the correct
server the batch-slot check is calibrated on). MKL's default threading computed float32 GEMMs of
5-7 and 9-11 rows with the last rows on another kernel tail (identical prompts in slots 4-5 of a
6-prompt request came out 2.9e-6 apart, prefill and decode); server_shim pins MKL's strict mode."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from server_shim.engine import Engine, SamplingParams


async def _choices(engine: Engine, ids: list[int], k: int) -> list[list[tuple[int, float | None]]]:
    handle = engine.submit([ids] * k, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
    out: list[list[tuple[int, float | None]]] = [[] for _ in range(k)]
    async for ev in handle.events():
        out[ev.index].extend((t.token_id, t.logprob) for t in ev.tokens)
    return out


@pytest.mark.parametrize("k", [5, 6, 7, 9, 10, 11, 12])
def test_identical_prompts_get_identical_numbers_in_every_slot(tiny_llama, k: int) -> None:
    ids = tiny_llama.tokenizer("The quick brown fox")["input_ids"]
    engine = Engine(tiny_llama)
    try:
        choices = asyncio.run(_choices(engine, ids, k))
    finally:
        engine.close()
    assert all(c == choices[0] for c in choices), [i for i, c in enumerate(choices) if c != choices[0]]


def test_importing_the_shim_pins_mkl_strict_mode() -> None:
    """In a fresh process (MKL reads the variable at its first call): importing server_shim before
    the first matmul makes every row count give identical rows; a user's own setting is kept."""
    code = (
        "import os, torch, server_shim\n"
        "w, x = torch.randn(64, 256), torch.randn(1, 256)\n"
        "ys = [x.expand(m, 256).contiguous() @ w.t() for m in range(1, 24)]\n"
        "bad = [len(y) for y in ys if (y - y[0]).abs().max() > 0]\n"
        "print(os.environ['MKL_CBWR'], bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    run = lambda e: subprocess.run(
        [sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True
    )  # noqa: E731
    assert run(env).stdout.split() == ["AUTO,STRICT", "[]"]
    assert run(env | {"MKL_CBWR": "COMPATIBLE"}).stdout.startswith("COMPATIBLE")
