"""Benchmark: POST /debug/activations (every point) against the plain forward pass it wraps.

    python bench/activations.py [--model smollm2-135m] [--tokens 256] [--repeats 5] [--device auto]

In process (httpx ASGITransport over the real Engine), so the numbers are the route's own cost:
hooks, the float32 copies, safetensors serialisation and the HTTP body, without socket noise.
Prints one table: median wall time per variant, its ratio to the plain forward, and bytes returned.
The issue's target is a ratio under 2x for all points at 256 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import httpx
import torch
from fastapi import FastAPI

from server_shim.debug import create_debug_router
from server_shim.engine import Engine
from server_shim.models import load_model


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _bench(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (args.tokens,), generator=gen).tolist()
    ids = torch.tensor([tokens], device=loaded.device)

    def plain() -> None:
        with torch.inference_mode():
            loaded.model(input_ids=ids)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)

    plain()  # warm-up
    rows = [("plain forward (no HTTP)", _median_s(plain, args.repeats), 0)]
    engine = Engine(loaded)
    app = FastAPI()
    app.include_router(create_debug_router(engine, max_response_bytes=2**31))
    variants = {
        "all points, all positions": {},
        "all points + logits": {"logits": True},
        "all points + inputs": {"inputs": True},
        "all points, last position": {"positions": "last"},
        "residuals only (model.layers.N)": {"layers": ["model.layers.[0-9]", "model.layers.[0-9][0-9]"]},
    }
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=600) as c:
            for label, extra in variants.items():
                body = {"tokens": tokens, **extra}
                r = await c.post("/debug/activations", json=body)  # warm-up, and the size
                r.raise_for_status()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    r = await c.post("/debug/activations", json=body)
                    times.append(time.perf_counter() - t0)
                rows.append((label, statistics.median(times), len(r.content)))
    finally:
        engine.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    rows = asyncio.run(_bench(args))
    base = rows[0][1]
    print(f"/debug/activations vs plain forward: {args.model}, {args.tokens} tokens, "
          f"device {args.device}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'variant':<34} {'time ms':>9} {'ratio':>7} {'MiB':>9}")
    for label, t, nbytes in rows:
        print(f"{label:<34} {t * 1e3:>9.1f} {t / base:>6.2f}x {nbytes / 2**20:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
