"""The tuner's cold timing (`tuning.time_cold`) against the method it replaced, on one bf16 GEMM.

    python bench/cold_timing.py [--m 16] [--n 4096] [--k 4096] [--rounds 2]

Times torch bf16 M x N x K with the L2 flushed before every call three ways: the old loop (eager
calls, each after a written flush), a graph replay per call after a read flush (`tuning.graphed`),
and every call in one graph with the events recorded as graph nodes (`tuning._cold_in_one_graph`,
what `time_cold` uses where torch can). docs/gemm.md's "Decode with the weights read from HBM" quotes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.quant import tuning  # noqa: E402

REPS = tuning.COLD_REPS


def _loop_us(call: Callable[[], object], flush: Callable[[], object]) -> float:
    return tuning.flushed_median_ms(call, flush, REPS) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cold_timing: needs a CUDA or ROCm GPU; nothing to measure here")
        return 0
    dev = torch.device("cuda")
    a = torch.randn(args.m, args.k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(args.n, args.k, device=dev, dtype=torch.bfloat16)

    def fn() -> torch.Tensor:
        return a @ b.T

    buf = torch.ones(tuning.flush_bytes(tuning.l2_bytes(dev)) // 4, dtype=torch.int32, device=dev)
    sink = torch.empty((), dtype=torch.int64, device=dev)
    replay = tuning.graphed(fn)
    if replay is None:
        print("cold_timing: the GEMM could not be captured in a CUDA graph", file=sys.stderr)
        return 1
    for r in range(args.rounds):
        one = tuning._cold_in_one_graph(fn, buf, sink, REPS) * 1e3
        per_call = _loop_us(replay, lambda: tuning.read_flush(buf, sink))
        old = _loop_us(fn, buf.zero_)
        print(f"round {r}: bf16 {args.m}x{args.n}x{args.k} from HBM: one graph {one:.2f} us, a replay per "
              f"call {per_call:.2f} us, eager after a written flush {old:.2f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
