"""Tokens/s of the shim's engine against HF `generate` on the same model, batch sizes 1, 8, 32.

Both sides decode greedily exactly `--tokens` new tokens per sequence (EOS ignored) from the same
prompts of mixed lengths (left-padded on both sides). The shim side goes through `Engine.submit`
with all requests queued at once (what a concurrent client does), without HTTP, so the ratio
measures the engine (batching, KV cache, per-token logprob/detokenize work) and not the socket.

    python bench/serve.py [--model smollm2-135m] [--device cpu|cuda] [--tokens 32] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.engine import Engine, SamplingParams  # noqa: E402
from server_shim.models import load_model  # noqa: E402

BASE = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def quicksort(xs):",
    "The three laws of thermodynamics are",
    "In machine learning, a transformer is",
    "My favourite recipe for pancakes needs",
    "Q: Why is the sky blue?\nA:",
    "The history of the Roman empire begins",
]


def prompts(n: int) -> list[str]:
    return [BASE[i % len(BASE)] + (" very" * (i // len(BASE))) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hf(loaded, texts: list[str], tokens: int) -> float:
    tok = loaded.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True).to(loaded.device)
    _sync(loaded.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    _sync(loaded.device)
    dt = time.perf_counter() - t0
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    return len(texts) * tokens / dt


def bench_shim(engine: Engine, texts: list[str], tokens: int, logprobs: int | None) -> float:
    tok = engine.loaded.tokenizer
    ids = [tok(t)["input_ids"] for t in texts]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)

    async def run() -> int:
        handles = [engine.submit([p], params) for p in ids]

        async def drain(h) -> int:
            return sum([len(ev.tokens) async for ev in h.events()])

        return sum(await asyncio.gather(*(drain(h) for h in handles)))

    t0 = time.perf_counter()
    produced = asyncio.run(run())
    dt = time.perf_counter() - t0
    assert produced == len(texts) * tokens
    return produced / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--logprobs", type=int, default=None, help="also ask the shim for top-k logprobs")
    args = ap.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(loaded, max_batch_size=max(int(b) for b in args.batches.split(",")))
    print(
        f"model {loaded.name}  device {loaded.device}  dtype {str(loaded.dtype).removeprefix('torch.')}  "
        f"tokens/seq {args.tokens}  torch threads {torch.get_num_threads()}"
    )
    print(f"{'batch':>5}  {'shim tok/s':>11}  {'HF tok/s':>9}  {'shim/HF':>7}")
    try:
        bench_shim(engine, prompts(2), 4, args.logprobs)  # warm-up (allocator, kernels)
        bench_hf(loaded, prompts(2), 4)
        for b in (int(x) for x in args.batches.split(",")):
            texts = prompts(b)
            shim = bench_shim(engine, texts, args.tokens, args.logprobs)
            hf = bench_hf(loaded, texts, args.tokens)
            print(f"{b:>5}  {shim:>11.1f}  {hf:>9.1f}  {shim / hf:>7.2f}", flush=True)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
