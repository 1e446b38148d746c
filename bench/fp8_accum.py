"""Which accumulation does `torch._scaled_mm` do? fp32 outputs against float64, beside Triton fp8 GEMMs
promoting their tensor-core partials to fp32 every PROMOTE of K.

Hopper's fp8 MMAs accumulate in reduced precision; a kernel that never moves the partial into an
fp32 register is fast and ~20x less accurate at K = 4096. The Triton fp8 kernels promote every 128
of K (`kernels.FP8_FAST_ACCUM` off), and issue 14 compares them with `_scaled_mm(use_fast_accum=
False)`: this script shows whether that is like for like -- the vendor's errors, case by case,
beside each promotion interval's (the interval whose errors equal the vendor's is printed).

    python bench/fp8_accum.py                 # GPU (~15 s)
    python bench/fp8_accum.py --device cpu    # the Triton kernel under the interpreter (exact fp32 there)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

NEVER = 0  # PROMOTE value: never promote (Triton's default on sm90)
PROMOTES = ((128, 64), (128, 128), (256, 256), (128, NEVER))  # (BLOCK_K, PROMOTE)


def build_kernel():  # noqa: ANN201 - a triton.jit function
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_mm(a_ptr, b_ptr, c_ptr, N, K, PROMOTE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr):  # fmt: skip
        """c = a @ b.T (fp8 in, fp32 out), promoted every PROMOTE of K (NEVER: not at all)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
            b = tl.load(b_ptr + rn[:, None] * K + (k0 + rk)[None, :])
            if PROMOTE == 0:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=PROMOTE)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)

    return fp8_mm


def errors(c: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |error| / max |ref|, rms error / rms ref)."""
    from _gemm_cases import rel_err  # imports the kernels: after main() set the interpreter up

    c = c.double().cpu()
    return ((c - ref).abs().max() / ref.abs().max()).item(), rel_err(c, ref)


def operands(m: int, n: int, k: int, dist: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn operands: "randn" (sums cancel) or "pos" (all positive: sums grow, so a truncated
    accumulator shows most)."""
    g = torch.Generator().manual_seed(0)
    if dist == "randn":
        a, b = torch.randn(m, k, generator=g) * 2, torch.randn(n, k, generator=g) * 2
    else:
        a, b = torch.rand(m, k, generator=g) * 4, torch.rand(n, k, generator=g) * 4
    return a.to(torch.float8_e4m3fn).to(device), b.to(torch.float8_e4m3fn).to(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        cases, tile = [(32, 32, 512, "randn"), (32, 32, 512, "pos")], 32
    else:
        if not torch.cuda.is_available():
            print(
                "no CUDA / ROCm device: this compares GPU accumulation; use --device cpu for the interpreter"
            )
            return 0
        cases, tile = [(512, 512, 4096, "randn"), (512, 512, 16384, "randn"), (512, 512, 16384, "pos")], 128
    fp8_mm = build_kernel()
    for m, n, k, dist in cases:
        a, b = operands(m, n, k, dist, args.device)
        ref = a.double().cpu() @ b.double().cpu().T
        print(f"{m} x {n} x {k}, {dist}: max / rms error against float64")
        rows: dict[str, tuple[float, float]] = {}
        if args.device == "cuda" and hasattr(torch, "_scaled_mm"):
            one = torch.ones((), device=args.device)
            for fast in (False, True):
                c = torch._scaled_mm(a, b.T, one, one, out_dtype=torch.float32, use_fast_accum=fast)
                rows[f"_scaled_mm use_fast_accum={fast}"] = errors(c, ref)
        for bk, promote in PROMOTES:
            c = torch.empty(m, n, device=args.device, dtype=torch.float32)
            fp8_mm[(m // tile, n // tile)](a, b, c, n, k, PROMOTE=promote, BM=tile, BN=tile, BK=bk,
                                          num_warps=8, num_stages=2)  # fmt: skip
            rows[f"triton promote every {promote}" if promote else "triton never promote"] = errors(c, ref)
        for name, (mx, rms) in rows.items():
            print(f"  {name:<36} {mx:.3e}  {rms:.3e}")
        vendor = rows.get("_scaled_mm use_fast_accum=False")
        if vendor is not None:
            same = [name for name, e in rows.items()  # equal to 3 digits, as printed
                    if name.startswith("triton") and all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(e, vendor, strict=True))]  # fmt: skip
            print(
                f"  -> _scaled_mm(use_fast_accum=False) has the errors of: {', '.join(same) or 'none of them'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
