"""The warpgroup-MMA int4 tile ("wordsw", server_shim/quant/_gluon_w4w.py), checked and timed.

    python bench/wordsw.py                                   # 16 x 4096 x 4096 and 5 x 1000 x 4224
    python bench/wordsw.py --shapes 16x4096x4096 --steps 4 8 16 --dtype fp16
    python bench/wordsw.py --shapes 16x4096x4096 --anatomy   # also its parts taken out

An experiment in no dispatch path: this script is the one thing that runs it. Every shape and
split is first checked against float64 (a FAIL line and exit status 1 when it is off) and run a
second time for equal bits (its splits sum themselves in split order), then timed beside torch's
16-bit GEMM on the dequantized weight and the shim's "wordsb" tile pinned (medians of CUDA-graph
replays, the weights in L2). With --anatomy each split is timed again with parts taken out (the
kernel's ANATOMY switch: results wrong on purpose, so not checked): only the first K step copied,
then nothing loaded in the K loop, then no K loop at all -- what the tile's arithmetic alone costs.
Needs a Hopper GPU and a triton with Gluon; elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gemm_cases as C  # noqa: E402

from server_shim.quant import _gluon_w4w, arch, tuning  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

WORDSB = "wordsb:16x16x128:w4:s3:k1"  # the tuner's M = 16 choice on Hopper
# the kernel's ANATOMY switch: the parts taken out
ANATOMY = {1: "only the first K step copied", 3: "nothing loaded in the K loop", 2: "no K loop"}


def _shape(text: str) -> tuple[int, int, int]:
    m, n, k = (int(v) for v in text.split("x"))
    return m, n, k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(16, 4096, 4096), (5, 1000, 4224)])
    ap.add_argument("--steps", nargs="+", type=int, default=[4, 8], help="K steps of 128 a program (a split)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--anatomy", action="store_true", help="also time the kernel with parts taken out")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not arch.warp_specialized_fp8(dev):
        print("bench/wordsw.py needs a Hopper GPU and a triton with Gluon; none here.", file=sys.stderr)
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    failed = False
    for m, n, k in args.shapes:
        case = C.w4_case(m, n, k, "int4-g128", dtype, dev)
        x, qw, ref, words = case.x, case.qw, case.ref, case.words
        if not _gluon_w4w.runs(x, words, qw.zeros, 0, 128):
            print(f"{m}x{n}x{k}: not a shape the tile takes (K % 128, M > 16, alignment)")
            continue
        wd = case.dense
        t_torch = C.time_ms(lambda: x @ wd.T) * 1e3  # noqa: B023 - timed here, in this iteration
        with tuning.pinned(WORDSB):
            t_b = C.time_ms(lambda: K.int4_gemm(x, qw.data, qw.scales, qw.zeros, out_dtype=dtype)) * 1e3  # noqa: B023
        print(f"\n{m}x{n}x{k} {args.dtype}: torch {t_torch:.2f} us, wordsb {t_b:.2f} us", flush=True)
        for steps in args.steps:
            out = torch.empty(m, n, device=dev, dtype=dtype)
            splits = -(-k // (steps * _gluon_w4w.BLOCK_K))
            ws = torch.empty(splits, m, n, device=dev, dtype=torch.float32)
            cnt = torch.zeros(-(-n // _gluon_w4w.ROWS), device=dev, dtype=torch.int32)

            def run(anatomy: int = 0) -> None:
                _gluon_w4w.wonly_wordsw(x, words, out, qw.scales, qw.zeros, None, steps=steps,  # noqa: B023
                                        workspace=lambda s: ws, counters=lambda t: cnt, anatomy=anatomy)  # noqa: B023  # fmt: skip

            timed = C.check_then_time(f"wordsw {steps} steps", run, out, ref, C.tol("triton int4-g128"))
            failed |= timed is None
            if timed is None:
                continue
            t, err = timed
            print(f"ok   wordsw {steps:2d} steps ({splits} splits) {t:6.2f} us  {t_torch / t:.2f}x torch  "
                  f"{t_b / t:.2f}x wordsb  rel err {err:.1e}", flush=True)  # fmt: skip
            for anatomy, part in ANATOMY.items() if args.anatomy else ():
                t_part = C.time_ms(lambda a=anatomy: run(a)) * 1e3
                print(f"     {part:<40s} {t_part:6.2f} us  {t_torch / t_part:.2f}x torch", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
