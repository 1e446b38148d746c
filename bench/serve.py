"""Tokens/s of the shim's engine (CUDA graphs and eager) against HF `generate`, same model, same run.

Every side decodes greedily exactly `--tokens` new tokens per sequence (EOS ignored) from the same
prompts of mixed lengths. The engine goes through `Engine.submit` with all requests queued at once
(what concurrent clients do), without HTTP, so the figures measure the engine (continuous
batching, static KV cache, graphs, logprobs on the device, detokenizing) and not the socket.
`ms/step` is wall time over decode steps: at batch 1 it is the time per token. On the CPU there
are no graphs and the graph column stays empty. Each engine row is measured after one untimed
run of the same shape (captures, autotuning and allocator warm-up are not in the figure).

    python bench/serve.py [--model smollm2-135m] [--device cpu|cuda] [--dtype auto] [--tokens 32]
                          [--batches 1,8,32] [--logprobs K] [--modes graph,eager] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim import row_attention  # noqa: E402
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
    return [BASE[i % len(BASE)] + (" very" * (i // len(BASE) % 16)) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hf(loaded, texts: list[str], tokens: int) -> float:  # noqa: ANN001 - LoadedModel
    """HF generate, left-padded batch, greedy, exactly `tokens` new tokens: tokens/s."""
    tok = loaded.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True).to(loaded.device)
    _sync(loaded.device)
    t0 = time.perf_counter()
    # the engines share the model: HF runs it as loaded, not through the engine's CPU row attention
    with torch.inference_mode(), row_attention.suspended(loaded.model):
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


def run_engine(engine: Engine, ids: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Submit every prompt at once; the generated token ids of each, in order."""

    async def run() -> list[list[int]]:
        handles = [engine.submit([p], params) for p in ids]

        async def drain(h) -> list[int]:  # noqa: ANN001
            out: list[int] = []
            async for ev in h.events():
                if not ev.prompt:
                    out.extend(t.token_id for t in ev.tokens)
            return out

        return list(await asyncio.gather(*(drain(h) for h in handles)))

    return asyncio.run(run())


def bench_engine(engine: Engine, texts: list[str], tokens: int, logprobs: int | None) -> dict:
    """One warm-up run, then a timed one: tokens/s and ms per decode step."""
    tok = engine.loaded.tokenizer
    ids = [tok(t)["input_ids"] for t in texts]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    run_engine(engine, ids, params)
    steps0 = engine.stats.decode_steps
    t0 = time.perf_counter()
    out = run_engine(engine, ids, params)
    dt = time.perf_counter() - t0
    produced = sum(len(o) for o in out)
    assert produced == len(texts) * tokens, (produced, len(texts) * tokens)
    steps = engine.stats.decode_steps - steps0
    return {"tok_s": produced / dt, "ms_step": 1000 * dt / max(steps, 1), "steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--logprobs", type=int, default=None, help="also ask the engine for top-k logprobs")
    ap.add_argument("--modes", default="graph,eager", help="engine modes to measure (graph needs CUDA)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m and (m != "graph" or loaded.device.type == "cuda")]
    engines = {m: Engine(loaded, max_batch_size=max(batches), cuda_graphs=(m == "graph")) for m in modes}
    print(
        f"model {loaded.name}  device {loaded.device}  dtype {str(loaded.dtype).removeprefix('torch.')}  "
        f"tokens/seq {args.tokens}  logprobs {args.logprobs}  torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'batch':>5}  {'graph tok/s':>11}  {'ms/step':>7}  {'eager tok/s':>11}  {'ms/step':>7}  {'HF tok/s':>9}  {'best/HF':>7}"
    )
    rows = []
    try:
        if not args.no_hf:
            bench_hf(loaded, prompts(2), 4)  # warm-up (allocator, kernels)
        for b in batches:
            texts = prompts(b)
            row: dict = {"batch": b}
            for m, eng in engines.items():
                row[m] = bench_engine(eng, texts, args.tokens, args.logprobs)
            row["hf_tok_s"] = None if args.no_hf else bench_hf(loaded, texts, args.tokens)
            rows.append(row)
            g, e = row.get("graph"), row.get("eager")
            best = max(x["tok_s"] for x in (g, e) if x)
            ratio = f"{best / row['hf_tok_s']:>7.2f}" if row["hf_tok_s"] else f"{'-':>7}"
            print(
                f"{b:>5}  {_f(g, 'tok_s', 11, 1)}  {_f(g, 'ms_step', 7, 2)}  {_f(e, 'tok_s', 11, 1)}  "
                f"{_f(e, 'ms_step', 7, 2)}  {row['hf_tok_s'] or 0:>9.1f}  {ratio}",
                flush=True,
            )
        graphs = engines.get("graph")
        info = None
        if graphs is not None and graphs.runner.graphs is not None:
            gr = graphs.runner.graphs
            info = {"enabled": gr.enabled, "error": gr.error, "captured": gr.captures, "replays": gr.replays}
            print(f"graphs: {info}")
    finally:
        for eng in engines.values():
            eng.close()
    if args.json:
        meta = {"model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype), "tokens": args.tokens,
                "logprobs": args.logprobs, "graphs": info}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


def _f(d: dict | None, key: str, width: int, digits: int) -> str:
    return f"{d[key]:>{width}.{digits}f}" if d else f"{'-':>{width}}"


if __name__ == "__main__":
    sys.exit(main())
