"""An x-stationary int4 tile for M = 16 ("xstat"): the last direction docs/gemm.md had left untried.

    python bench/xstat_w4.py                 # GPU: 16 x 4096 x 4096, int4-g128, bf16 x
    python bench/xstat_w4.py --device cpu    # against float64 under the Triton interpreter

"wordsb" walks K for a fixed 16-column tile, so every program stages all of x through shared
memory, a K step at a time (32 MiB of x at N = 4096, four times the weight; ~2.3 of its ~7.8 us,
`bench/wordsb_anatomy.py`). Here the loops are swapped: a program owns one K chunk (a 128-deep K
step per warp, SUB warps side by side as in "wordsb") and loads its x slice once, meant to stay in
the MMA's operand registers (it does not: below); it then walks TILES column tiles of the weight,
each a batched dot against the same x, its SUB partials summed across the warps, the tile's fp32
partial written to a workspace.
The K chunks of a column range reduce themselves: the last to arrive on its counter sums all of
them in chunk order (the same bits on every run). Only timed here, beside "wordsb" and torch bf16;
checked against float64 first (a FAIL line and exit status 1 when it is off).

What ptxas makes of it, before any GPU time (`--compile`; loop counts from the SASS of triton 3.9,
2026-12-06): a loop iteration (4 warps, each a 128-deep K step of one 16-column tile: the work of
one "wordsb" iteration) is ~290 instructions against "wordsb"'s 246, with 10 barriers against 2:
summing the warps' partials crosses the warps through shared memory for every tile. And x does
not stay in registers: Triton keeps the loop-invariant dot operand in shared memory and reads it
back every tile (8 16-byte reads a thread), so the staging it was to save is only halved (no
copy in, the reads remain).

Timed (H100, 2026-12-06 03:40 UTC, torch 2.11 / triton 3.6, 16 x 4096 x 4096 int4-g128, bf16 x;
every setting checked against float64 twice first, rel err 1.7e-3): 14.1-17.8 us (0.49-0.61x
bf16; 4 tiles a program the fastest, 14.12 / 14.18 us with 3 / 2 stages) against 7.71 us for
"wordsb"'s anatomy copy and 8.67 for torch bf16 in the same run. So x-stationary in Triton is
about twice as slow as the tile it was to beat, and stays an experiment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gemm_cases as C  # noqa: E402
import wordsb_anatomy as A  # noqa: E402

tl: Any = None  # triton.language, bound by _build (triton must load after TRITON_INTERPRET is set)


def _xstat_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, cnt_ptr, s_ptr, z_ptr, N, sxm, swn, ssn, szn, KSPLIT,
                  SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  TILES: tl.constexpr, GROUP: tl.constexpr, PTX: tl.constexpr, PLANES: tl.constexpr,
                  DOT_IEEE: tl.constexpr):  # fmt: skip
    """c [BLOCK_M, N] = x @ dequant(w)^T for M = BLOCK_M, N % (TILES * BLOCK_N) == 0, K = KSPLIT *
    SUB * BLOCK_K, BLOCK_K <= GROUP. Program (i, j): columns [i TILES BLOCK_N, +TILES BLOCK_N),
    K chunk j; ws [KSPLIT, BLOCK_M, N] fp32, cnt one zeroed int32 per column range."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    k_lo = pid_k * SUB * BLOCK_K
    ks = k_lo + tl.arange(0, SUB)[:, None, None] * BLOCK_K  # each warp's K step [SUB, 1, 1]
    x = tl.load(x_ptr + offs_m[None, :, None] * sxm + ks + tl.arange(0, BLOCK_K)[None, None, :])
    xt = tl.permute(x, (0, 2, 1))  # [SUB, BK, BM]: loaded once, the B operand of every tile's dot
    g = (k_lo + tl.arange(0, SUB) * BLOCK_K)[:, None] // GROUP  # [SUB, 1]
    offs_j = ks // 8 + tl.arange(0, BLOCK_K // 8)[None, None, :]
    n_lo = pid_n * TILES * BLOCK_N
    part_base = ws_ptr + pid_k.to(tl.int64) * BLOCK_M * N
    for t in range(TILES):
        offs_n = n_lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
        word = tl.load(w_ptr + offs_n[None, :, None] * swn + offs_j)
        s = tl.load(s_ptr + offs_n[None, :] * ssn + g)[:, :, None]
        z = tl.load(z_ptr + offs_n[None, :] * szn + g).to(tl.int32)[:, :, None]
        p0, p1, p2, p3, p4, p5, p6, p7 = A._planes(word, z, 0, PTX, PLANES)
        w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
        w = tl.reshape(w, (SUB, BLOCK_N, BLOCK_K))
        if DOT_IEEE:  # the interpreter's bf16 dot is not exact: fp32 operands there
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w, xt)
        tile = tl.sum(part * s, axis=0)  # [BN, BM]: the warps' K steps summed
        tl.store(part_base + offs_m[None, :] * N + offs_n[:, None], tile)
    tl.debug_barrier()  # every thread's partials are written before the arrival is counted
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == KSPLIT - 1:  # the last chunk sums them all, in chunk order
        cols = n_lo + tl.arange(0, TILES * BLOCK_N)
        total = tl.zeros([BLOCK_M, TILES * BLOCK_N], dtype=tl.float32)
        for i in range(0, KSPLIT):
            total += tl.load(
                ws_ptr + i * BLOCK_M * N + offs_m[:, None] * N + cols[None, :], cache_modifier=".cg"
            )
        tl.atomic_xchg(cnt_ptr + pid_n, 0)
        tl.store(c_ptr + offs_m[:, None] * N + cols[None, :], total.to(c_ptr.dtype.element_ty))


def _build() -> tuple[Any, Any]:
    """This kernel and "wordsb"'s anatomy copy (whose build also makes its `_planes` the JIT helper
    this kernel calls through the module)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    anatomy, _ = A._build()
    return triton.jit(_xstat_kernel), anatomy


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 8], help="column tiles a program walks")
    p.add_argument("--warps", type=int, default=4, help="num_warps = K steps side by side (default 4)")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: 16 x 64 x 1024 against float64, interpreter, no timing")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="no GPU needed: compile each tiles / stages setting for sm90 and print ptxas's registers and "
                        "the SASS counts (bench/sm90_compile.py's), beside \"wordsb\"'s anatomy copy")  # fmt: skip
    return p.parse_args(argv)


def compile_sm90(args: argparse.Namespace) -> int:
    """ptxas's view of every setting, without a GPU: what the tile costs in instructions before any
    timing (the anatomy copy of "wordsb" beside it, the same compile)."""
    import sm90_compile as S

    from server_shim.quant._fast_w4 import planes_ptx

    kernel, anatomy = _build()
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "c_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
            "s_ptr": "*fp32", "z_ptr": "*u8"}  # fmt: skip
    common = dict(SUB=args.warps, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP=128, PTX=True,
                  PLANES=planes_ptx(True), DOT_IEEE=False)  # fmt: skip
    div16 = {"N", "K", "sxm", "swn", "ssn", "szn"}
    for stages in args.stages:
        line = S.compile_one(anatomy, ptrs, dict(common, MODE=0), args.warps, stages, 16, div16=div16)
        print(f"wordsb (anatomy copy) s{stages}: {line}")
        for tiles in args.tiles:
            line = S.compile_one(kernel, ptrs, dict(common, TILES=tiles), args.warps, stages, 16, div16=div16)
            print(f"xstat tiles {tiles} s{stages}: {line}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sub, bn, bk = args.warps, 16, 128
    N, Kd = (64, 1024) if not gpu else (args.n, args.k)
    bad = [t for t in args.tiles if N % (t * bn)]
    if bad or Kd % (sub * bk):
        print(f"xstat_w4: {bad or args.tiles} tiles of {bn} x {sub} steps of {bk} do not divide {N} x {Kd}",
              file=sys.stderr)  # fmt: skip
        return 2
    kernel, anatomy = _build()
    x, qw, ref = A._problem(N, Kd, dev)
    words = qw.data.view(torch.int32)
    out = torch.empty(16, N, device=dev, dtype=torch.bfloat16 if gpu else torch.float32)
    ksplit = Kd // (sub * bk)
    ws = torch.empty(ksplit, 16, N, device=dev, dtype=torch.float32)
    from server_shim.quant._fast_w4 import planes_ptx

    def launch(tiles: int, stages: int) -> Callable[[], object]:
        cnt = torch.zeros(N // (tiles * bn), device=dev, dtype=torch.int32)
        return lambda: kernel[(N // (tiles * bn), ksplit)](
            x, words, out, ws, cnt, qw.scales, qw.zeros, N, x.stride(0), words.stride(0),
            qw.scales.stride(0), qw.zeros.stride(0), ksplit, SUB=sub, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
            TILES=tiles, GROUP=128, PTX=gpu, PLANES=planes_ptx(True) if gpu else "", DOT_IEEE=not gpu,
            num_warps=sub, num_stages=stages,
        )  # fmt: skip

    runs = [(t, s) for t in args.tiles for s in (args.stages if gpu else args.stages[:1])]
    for tiles, stages in runs:
        fn = launch(tiles, stages)
        for _ in range(2):  # twice: the counters must have reset themselves
            out.zero_()
            fn()
            err = C.rel_err(out, ref)
            if not err < C.tol("triton int4-g128"):
                print(f"FAIL xstat tiles {tiles} s{stages} at 16x{N}x{Kd}: rel err {err:.1e} against float64")
                return 1
        print(
            f"ok   xstat tiles {tiles} s{stages} at 16x{N}x{Kd}: rel err {err:.1e} against float64",
            flush=True,
        )
    if not gpu:
        return 0
    b = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16)
    t_bf16 = C.time_ms(lambda: x @ b.T) * 1e3
    print(f"torch bf16                {t_bf16:6.2f} us")
    whole = lambda: anatomy[(N // bn,)](
        x, words, out, qw.scales, qw.zeros, N, Kd, x.stride(0), words.stride(0), qw.scales.stride(0),
        qw.zeros.stride(0), SUB=sub, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP=128, MODE=0, PTX=True,
        PLANES=planes_ptx(True), DOT_IEEE=False, num_warps=sub, num_stages=3,
    )  # fmt: skip
    t = C.time_ms(whole) * 1e3
    print(f"wordsb (anatomy copy)     {t:6.2f} us  {t_bf16 / t:.2f}x bf16")
    for tiles, stages in runs:
        t = C.time_ms(launch(tiles, stages)) * 1e3
        print(f"xstat tiles {tiles} s{stages}         {t:6.2f} us  {t_bf16 / t:.2f}x bf16", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.compile:
        return compile_sm90(args)
    if args.device == "cpu":
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, triton.language rebuilt for it
    elif not torch.cuda.is_available() or torch.version.hip:
        print("bench/xstat_w4.py needs an NVIDIA GPU (or --device cpu); none is visible.", file=sys.stderr)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
