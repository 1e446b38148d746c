"""Every named 8-bit GEMM config pinned, checked against float64, timed warm and cold: the 8-bit
twin of `bench/wonly_sweep.py`, for the small-M configs the tuner chooses among.

    python bench/mm8_sweep.py --scheme "fp8 block" --m 16 --configs tile:16x64x128:w4:s3:k4 lag:16x64x128:w4:s3:k4
    python bench/mm8_sweep.py --device cpu --configs tile:16x32x128:w4:s1:k2   # the checks, interpreter, 256 x 256

For each M, the scheme's callable of `bench/_gemm_cases.Case` (N = K = 4096 unless given) runs
under each config pinned (`tuning.pinned`), is compared with the float64 product first (a config
over tolerance is a FAIL row and exit status 1), then timed: the median of CUDA-graph replays with
the weights in L2 (`_gemm_cases.time_ms`) and with the L2 flushed before every call
(`tuning.time_cold`, as the tuner times), beside torch bf16 timed both ways. --device cpu: only
the checks, under the Triton interpreter at N = K = 256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gemm_cases as C  # noqa: E402

from server_shim.quant import tuning  # noqa: E402

SCHEMES = ("fp8 tensor", "fp8 row", "fp8 block", "int8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme", choices=SCHEMES, default="fp8 block")
    p.add_argument("--m", type=int, nargs="+", default=[16])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--configs", nargs="+", required=True, help="config names (tuning.Cfg.name)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the checks at N = K = 256 under the Triton interpreter, no timing")  # fmt: skip
    args = p.parse_args(argv)
    try:
        names = [tuning.Cfg.parse(n).name for n in args.configs]
    except ValueError as e:
        print(f"bench/mm8_sweep.py: {e}", file=sys.stderr)
        return 2
    timed = args.device == "cuda"
    if not timed:
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, kernels.py rebuilt in place for it
        args.n = args.k = 256
    elif not torch.cuda.is_available():
        print(
            "bench/mm8_sweep.py needs a CUDA or ROCm GPU (or --device cpu); none is visible.", file=sys.stderr
        )
        return 0
    dev, name, failed = torch.device(args.device), f"triton {args.scheme}", False
    for M in args.m:
        case = C.Case(M, args.n, args.k, dev)
        fns = case.fns()
        fn, ref = fns[name], case.reference(name)
        bf = fns["torch bf16"]
        warm_bf, cold_bf = (C.time_ms(bf) * 1e3, tuning.time_cold(bf) * 1e3) if timed else (1.0, 1.0)
        if timed:
            print(f"{M}x{args.n}x{args.k}: torch bf16 {warm_bf:.2f} us warm, {cold_bf:.2f} us cold")
        rows = []
        for cfg in names:
            with tuning.pinned(cfg):
                err = float((fn().double() - ref).norm() / ref.norm())
                if err >= C.tol(name):
                    failed = True
                    print(f"FAIL {args.scheme} M={M} {cfg}: rel err {err:.1e}")
                    continue
                if not timed:
                    print(f"ok   {args.scheme} M={M:<5} {cfg:<30} rel err {err:.1e}")
                    continue
                rows.append((C.time_ms(fn) * 1e3, tuning.time_cold(fn) * 1e3, cfg, err))
        for warm, cold, cfg, err in sorted(rows):
            print(f"ok   {args.scheme} M={M:<5} {cfg:<30} {warm:7.2f} us ({warm_bf / warm:.2f}x)  cold "
                  f"{cold:7.2f} us ({cold_bf / cold:.2f}x)  rel err {err:.1e}")  # fmt: skip
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
