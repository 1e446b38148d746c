"""Host cost of detokenizing one decode step: pieces of every row's token and its top-k alternatives.

    python bench/detok.py [--rows 32] [--k 5] [--steps 64] [--busy 1] [--out detok.json]

On a GPU the fused decode step of smollm2-135m takes ~2.4 ms at batch 32; the engine turns each
row's token (and, with logprobs=k, its k alternatives) into text pieces on the host
(server_shim/detok.py), so this cost bounds the tokens/s that a server with logprobs can reach.
Three decoders, timed in the same run and reported as ratios against the HF tokenizer:
`hf` (transformers' batch_decode), `rayon` (the Rust tokenizer's decode_batch, which fans the
few sequences of one row out over a thread pool) and `serial` (the Rust decode once per sequence,
what fast_decode.BackendDecoder does). `--busy N` keeps N other processes spinning on the cores,
as the engine thread and the event loop do in a server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.detok import IncrementalDetokenizer  # noqa: E402
from server_shim.fast_decode import BackendDecoder  # noqa: E402
from server_shim.models import smollm2_tokenizer  # noqa: E402


class RayonDecoder(BackendDecoder):
    """The decoder before: one decode_batch (rayon) per row and step."""

    def batch_decode(self, seqs: list[list[int]], skip_special_tokens: bool = False, **_: Any) -> list[str]:
        return self._backend.decode_batch(seqs, skip_special_tokens=skip_special_tokens)


def spin(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def step_ms(decoder: Any, ids: list[int], rows: int, k: int, steps: int, seed: int) -> float:
    """Milliseconds per step of `rows` detokenizers each pushing one token (+ k alternatives)."""
    rng = random.Random(seed)
    dets = [IncrementalDetokenizer(decoder, ids[10 * r : 10 * r + 20]) for r in range(rows)]
    t0 = time.perf_counter()
    for s in range(steps):
        for r, det in enumerate(dets):
            alts = [(rng.randrange(49152), -1.0) for _ in range(k)] if k else None
            det.push(ids[200 + 37 * r + s], -0.5 if k else None, alts)
    return 1000 * (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds; the median is reported")
    ap.add_argument("--busy", type=int, default=0, help="other processes spinning on the cores meanwhile")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    hf = smollm2_tokenizer()
    decoders = {
        "hf": hf,
        "rayon": RayonDecoder(hf.backend_tokenizer),
        "serial": BackendDecoder(hf.backend_tokenizer),
    }
    ids = hf(Path(__file__).read_text() * 4)["input_ids"]
    assert len(ids) > 200 + 37 * args.rows + args.steps, "text too short for these rows and steps"
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    times: dict[str, dict[int, list[float]]] = {name: {0: [], args.k: []} for name in decoders}
    try:
        for rep in range(args.repeats):  # alternate so that drift of a shared box hits every decoder
            for name, dec in decoders.items():
                for k in (0, args.k):
                    times[name][k].append(step_ms(dec, ids, args.rows, k, args.steps, seed=rep))
    finally:
        stop.set()
        for p in spinners:
            p.join()
    med = {name: {k: statistics.median(v) for k, v in by_k.items()} for name, by_k in times.items()}
    print(f"host ms per decode step, {args.rows} rows, median of {args.repeats}, {args.busy} busy processes")
    print(f"{'decoder':>8}  {'no logprobs':>11}  {f'logprobs={args.k}':>11}  {'vs hf':>6}")
    for name, m in med.items():
        print(f"{name:>8}  {m[0]:>11.2f}  {m[args.k]:>11.2f}  {med['hf'][args.k] / m[args.k]:>5.1f}x")
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "ms_per_step": med}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
