"""What the M = 16 4-bit word tile's time is made of: "wordsb" taken apart, one part at a time.

    python bench/wordsb_anatomy.py                 # GPU: 16 x 4096 x 4096, int4-g128, bf16 x
    python bench/wordsb_anatomy.py --device cpu    # the whole kernel against float64, interpreter

A standalone copy of the shim's "wordsb" tile (`_wonly_wordsb_kernel`: num_warps K steps side by side
as one batched dot, the weights as the MMA's first operand, the exact q - z in the dot and the group
scale on its fp32 partial) with no bias, split or ragged-K machinery, so that one part can be taken
out at a time. Only "whole" computes the product; it is checked against float64 first (a FAIL line
and exit status 1 when it is off). The other variants are wrong on purpose and only timed:

  no dequantization   the words' 16-bit halves moved into the 8 planes instead of dequantized
  x cached            every K step reads the first K tiles of x again (the same staging, from L1/L2)
  x constant          no x loads at all: a constant operand, which the compiler hoists
  x constant, no scale    and no scale multiply either

beside torch bf16 and the floor: the packed weight read once by the same grid in the same tile
walk, nothing else. If "no dequantization" costs what "whole" costs, the dequantization's
instructions are not what bounds the tile; what "x constant" saves is what staging x's MMA
operand through shared memory costs (docs/gemm.md quotes a run).

Then the Gluon tile ("wordsg", where it runs; its ANATOMY switch), checked whole, then timed with x
loaded once, with nothing loaded in the K loop (the words xor'd with the step, so that the
dequantization and the MMAs stay in the loop: the tile's arithmetic alone), and with no K loop (the
launch, the first step's loads and the epilogue): what the mma.sync tile costs before any memory
traffic.
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

tl: Any = None  # triton.language, bound by _build (triton must load after TRITON_INTERPRET is set)

VARIANTS = {"whole": 0, "no dequantization": 1, "x cached": 2, "x constant": 3, "x constant, no scale": 4}
# the Gluon tile's parts (`_gluon_w4._wonly_wordsg_kernel`'s ANATOMY)
GLUON_VARIANTS = {
    "wordsg whole": 0,
    "wordsg x loaded once": 1,
    "wordsg no loads in loop": 2,
    "wordsg no K loop": 3,
}
# the 8 planes from a word's two 16-bit halves, no arithmetic: "no dequantization"'s stand-in on NVIDIA
MOVE_HALVES = "{ mov.b32 {$0, $1}, $8; mov.b32 {$2, $3}, $8; mov.b32 {$4, $5}, $9; mov.b32 {$6, $7}, $9; }"


def _planes(word, z, MODE: tl.constexpr, PTX: tl.constexpr, PLANES: tl.constexpr):
    """The 8 nibble planes of int32 words as q - z in bf16 (MODE 1: the halves moved, no math)."""
    if PTX:
        h = z | 0xC300  # -(2**7 + z) as bf16, in both halves: the shim's `_int4_zero_pairs`
        nz = tl.broadcast_to(h | (h << 16), word.shape)
        p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
            PLANES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, nz], (tl.bfloat16,) * 8, True, 1
        )
    elif MODE == 1:
        lo = (word & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (word >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        p0, p1, p2, p3, p4, p5, p6, p7 = lo, hi, lo, hi, lo, hi, lo, hi
    else:
        zf = z.to(tl.float32)
        p0 = (((word >> 0) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p1 = (((word >> 4) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p2 = (((word >> 8) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p3 = (((word >> 12) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p4 = (((word >> 16) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p5 = (((word >> 20) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p6 = (((word >> 24) & 15).to(tl.float32) - zf).to(tl.bfloat16)
        p7 = (((word >> 28) & 15).to(tl.float32) - zf).to(tl.bfloat16)
    return p0, p1, p2, p3, p4, p5, p6, p7


def _anatomy_kernel(x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, N, K, sxm, swn, ssn, szn,
                    SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP: tl.constexpr, MODE: tl.constexpr, PTX: tl.constexpr, PLANES: tl.constexpr,
                    DOT_IEEE: tl.constexpr):  # fmt: skip
    """wordsb for M = BLOCK_M, N % BLOCK_N == 0, K % (SUB * BLOCK_K) == 0, BLOCK_K <= GROUP; MODE
    picks the part left out (VARIANTS)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, SUB)[:, None, None] * BLOCK_K
    x_ptrs = x_ptr + offs_m[None, :, None] * sxm + ks + tl.arange(0, BLOCK_K)[None, None, :]
    w_ptrs = w_ptr + offs_n[None, :, None] * swn + ks // 8 + tl.arange(0, BLOCK_K // 8)[None, None, :]
    acc = tl.zeros([SUB, BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, SUB * BLOCK_K):
        g = (k0 + tl.arange(0, SUB) * BLOCK_K)[:, None] // GROUP
        s = tl.load(s_ptr + offs_n[None, :] * ssn + g)[:, :, None]
        z = tl.load(z_ptr + offs_n[None, :] * szn + g).to(tl.int32)[:, :, None]
        word = tl.load(w_ptrs)
        x = tl.full([SUB, BLOCK_M, BLOCK_K], 1.0, tl.bfloat16) if MODE >= 3 else tl.load(x_ptrs)
        p0, p1, p2, p3, p4, p5, p6, p7 = _planes(word, z, MODE, PTX, PLANES)
        # the planes back in K order (8 consecutive k per word: the MMA operand's own layout)
        w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
        w = tl.reshape(w, (SUB, BLOCK_N, BLOCK_K))
        xt = tl.permute(x, (0, 2, 1))
        if DOT_IEEE:  # the interpreter's bf16 dot is not exact: fp32 operands there
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w, xt)
        acc += part if MODE == 4 else part * s
        if MODE != 2:
            x_ptrs += SUB * BLOCK_K
        w_ptrs += SUB * BLOCK_K // 8
    out = tl.trans(tl.sum(acc, axis=0))
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(c_ptr.dtype.element_ty))


def _floor_kernel(w_ptr, o_ptr, swn, KW, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """The weight words alone, by the same grid in the same [SUB, BLOCK_N, BLOCK_J] tile walk."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = w_ptr + offs_n[None, :, None] * swn + tl.arange(0, SUB)[:, None, None] * BLOCK_J
    p += tl.arange(0, BLOCK_J)[None, None, :]
    acc = tl.zeros([SUB, BLOCK_N, BLOCK_J], dtype=tl.int32)
    for _ in range(0, KW, SUB * BLOCK_J):
        acc ^= tl.load(p)
        p += SUB * BLOCK_J
    tl.store(o_ptr + tl.program_id(0), tl.xor_sum(tl.reshape(acc, [SUB * BLOCK_N * BLOCK_J]), axis=0))


def _build() -> tuple[Any, Any]:
    global tl, _planes
    import triton
    import triton.language

    tl = triton.language
    _planes = triton.jit(_planes)  # the kernel's helper, resolved by name when it compiles
    return triton.jit(_anatomy_kernel), triton.jit(_floor_kernel)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--tile", default="16x128", help="BLOCK_N x BLOCK_K (default 16x128)")
    p.add_argument("--warps", type=int, default=4, help="num_warps = K steps side by side (default 4)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the whole kernel against float64 at 16 x 64 x 1024, interpreter, no timing")  # fmt: skip
    return p.parse_args(argv)


def _problem(N: int, Kd: int, dev: torch.device) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """x [16, K] bf16, an int4-g128 weight and the float64 product of its golden dequantization."""
    from server_shim.quant import formats as F

    g = torch.Generator(device=dev).manual_seed(N + Kd)
    x = torch.randn(16, Kd, device=dev, generator=g).to(torch.bfloat16)
    qw = F.quantize_weight(torch.randn(N, Kd, device=dev, generator=g) * 0.02, "int4-g128")
    return x, qw, x.double() @ F.dequantize(qw).double().T


def run(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    bn, bk = (int(v) for v in args.tile.split("x"))
    sub = args.warps
    N, Kd = (64, 1024) if dev.type == "cpu" else (args.n, args.k)
    if N % bn or Kd % (sub * bk) or 128 % bk or bk % 16 or bn % 16:
        print(f"wordsb_anatomy: tile {bn}x{bk} with {sub} steps does not divide {N} x {Kd}", file=sys.stderr)
        return 2
    anatomy, floor = _build()
    x, qw, ref = _problem(N, Kd, dev)
    words = qw.data.view(torch.int32)  # nibble p of word j is k = 8j + p
    gpu = dev.type == "cuda"
    # bf16 out as a model runs it; fp32 under the interpreter, whose cast to bf16 truncates
    out = torch.empty(16, N, device=dev, dtype=torch.bfloat16 if gpu else torch.float32)
    from server_shim.quant._fast_w4 import planes_ptx

    def launch(mode: int) -> Callable[[], object]:
        return lambda: anatomy[(N // bn,)](
            x, words, out, qw.scales, qw.zeros, N, Kd, x.stride(0), words.stride(0), qw.scales.stride(0),
            qw.zeros.stride(0), SUB=sub, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP=128, MODE=mode,
            PTX=gpu, PLANES=(MOVE_HALVES if mode == 1 else planes_ptx(True)) if gpu else "",
            DOT_IEEE=not gpu, num_warps=sub, num_stages=args.stages,
        )  # fmt: skip

    launch(0)()
    err = C.rel_err(out, ref)
    ok = err < C.tol("triton int4-g128")
    print(f"{'ok  ' if ok else 'FAIL'} whole wordsb {bn}x{bk} w{sub} s{args.stages} at 16x{N}x{Kd}: "
          f"rel err {err:.1e} against float64")  # fmt: skip
    if not ok:
        return 1
    launch(1)()  # runs, and is wrong: the check above is one that a broken tile fails
    print(f"no dequantization (not a product): rel err {C.rel_err(out, ref):.1e}")
    if not gpu:
        return 0
    b = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16)
    t_bf16 = C.time_ms(lambda: x @ b.T) * 1e3
    print(f"torch bf16                {t_bf16:6.2f} us")
    sink = torch.empty(N // bn, device=dev, dtype=torch.int32)
    t = C.time_ms(lambda: floor[(N // bn,)](words, sink, words.stride(0), Kd // 8, SUB=sub, BLOCK_N=bn,
                                            BLOCK_J=bk // 8, num_warps=sub, num_stages=args.stages)) * 1e3  # fmt: skip
    print(f"floor (weight words only) {t:6.2f} us")
    _time_rows(VARIANTS, launch, t_bf16)
    return _gluon_rows(x, words, qw, ref, dev, t_bf16)


def _time_rows(
    variants: dict[str, int], launch: Callable[[int], Callable[[], object]], t_bf16: float
) -> None:
    """One timed line a variant, against torch bf16."""
    for name, mode in variants.items():
        t = C.time_ms(launch(mode)) * 1e3
        print(f"{name:25} {t:6.2f} us  {t_bf16 / t:.2f}x bf16", flush=True)


def _gluon_rows(x: torch.Tensor, words: torch.Tensor, qw: Any, ref: torch.Tensor, dev: torch.device,
                t_bf16: float) -> int:  # fmt: skip
    """The same parts of the Gluon tile ("wordsg" 16 x 16, 4 warps: x straight into the MMA's
    registers, nothing through shared memory), where it runs; 0 or 1 as `run`."""
    from server_shim.quant import _gluon_w4, arch

    if not (arch.gluon_mma_w4(dev) and _gluon_w4.runs(x, words, qw.zeros, 0, 128)):
        print("wordsg: Gluon does not run here")
        return 0
    out = torch.empty(x.shape[0], words.shape[0], device=dev, dtype=x.dtype)

    def launch(anatomy: int) -> Callable[[], object]:
        return lambda: _gluon_w4.wonly_wordsg(
            x, words, out, qw.scales, qw.zeros, None, fmt=0, block_n=16, sub=4, anatomy=anatomy
        )

    launch(0)()
    err = C.rel_err(out, ref)
    ok = err < C.tol("triton int4-g128")
    print(f"{'ok  ' if ok else 'FAIL'} whole wordsg 16x128 w4: rel err {err:.1e} against float64")
    if not ok:
        return 1
    _time_rows(GLUON_VARIANTS, launch, t_bf16)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.device == "cpu":
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, triton.language rebuilt for it
    elif not torch.cuda.is_available() or torch.version.hip:
        # its planes are inline PTX (the shim's own on NVIDIA); AMD runs the plain-Triton planes
        print(
            "bench/wordsb_anatomy.py needs an NVIDIA GPU (or --device cpu); none is visible.", file=sys.stderr
        )
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
