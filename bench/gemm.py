"""GEMM benchmark (GPU): the Triton kernels of server_shim/quant/kernels.py against torch.

    python bench/gemm.py [--json PATH] [--quick] [--no-check]

Compares, at M in {1, 16, 128, 1024, 4096} x N=K=4096 and at the smollm2-135m shapes, torch bf16
matmul, torch._scaled_mm (fp8 per-tensor and row-wise, where the device has it) and the Triton
kernels (fp8 tensor/row/block, int8, int4-g128, mxfp4); prints TFLOP/s and ratios as markdown.
Before timing, every kernel is checked against a torch reference at real sizes (dequantize, then
fp64 matmul), since a fast wrong kernel is worth nothing. Times are GEMM only (activation
quantization is timed on its own), medians of CUDA-graph replays (do_bench_cudagraph).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.quant import kernels as K  # noqa: E402

FN = torch.float8_e4m3fn
BIG = [(m, 4096, 4096) for m in (4096, 1024, 128, 16, 1)]  # the target shape first
SMOLLM2 = [(m, n, k) for m in (16, 1024) for (k, n) in ((576, 1536), (1536, 576), (576, 576))]


# ----------------------------------------------------------------------------- data + references
def quant_weight_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
    return (w / s).clamp(-448, 448).to(FN), s.float()


def quant_weight_blocks(w: torch.Tensor, blk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    N, Kd = w.shape
    nb, kb = -(-N // blk), -(-Kd // blk)
    wp = torch.nn.functional.pad(w, (0, kb * blk - Kd, 0, nb * blk - N)).view(nb, blk, kb, blk)
    s = wp.abs().amax((1, 3)).clamp(min=1e-12) / 448.0  # [nb, kb]
    q = (wp / s[:, None, :, None]).clamp(-448, 448).to(FN).view(nb * blk, kb * blk)[:N, :Kd]
    return q.contiguous(), s.float().contiguous()


def expand(s: torch.Tensor, rows: int, cols: int, rb: int, cb: int) -> torch.Tensor:
    return s.double().repeat_interleave(rb, 0).repeat_interleave(cb, 1)[:rows, :cols]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def pack(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _fast(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The same call with Hopper's fast (never promoted) fp8 accumulation."""

    def run() -> torch.Tensor:
        K.FP8_FAST_ACCUM = True
        try:
            return fn()
        finally:
            K.FP8_FAST_ACCUM = False

    return run


class Case:
    """All operands of one (M, N, K), quantized once; `fns` are the timed callables."""

    def __init__(self, M: int, N: int, Kd: int, dev: torch.device) -> None:
        g = torch.Generator(device=dev).manual_seed(M * 7 + N * 3 + Kd)
        self.M, self.N, self.K = M, N, Kd
        self.x = torch.randn(M, Kd, device=dev, generator=g).to(torch.bfloat16)
        w = torch.randn(N, Kd, device=dev, generator=g) * 0.05
        self.w_bf16 = w.to(torch.bfloat16)
        self.a_tok, self.sa_tok = K.quantize_act_fp8(self.x, group=None, fp8_dtype=FN)
        self.a_grp, self.sa_grp = K.quantize_act_fp8(self.x, group=128, fp8_dtype=FN)
        self.sa_ten = (self.x.float().abs().amax().clamp(min=1e-12) / 448.0).reshape(1)
        self.a_ten = (self.x.float() / self.sa_ten).clamp(-448, 448).to(FN)
        self.b_row, self.sb_row = quant_weight_rows(w)
        self.sb_ten = (w.abs().amax() / 448.0).reshape(1).float()
        self.b_ten = (w / self.sb_ten).to(FN)
        self.b_blk, self.sb_blk = quant_weight_blocks(w)
        xi = self.x.float()
        self.sa_i8 = xi.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
        self.a_i8 = (xi / self.sa_i8).round().clamp(-127, 127).to(torch.int8)
        self.sb_i8 = w.abs().amax(1, keepdim=True) / 127.0
        self.b_i8 = (w / self.sb_i8).round().clamp(-127, 127).to(torch.int8)
        G = -(-Kd // 128)
        self.q4 = torch.randint(0, 16, (N, Kd), device=dev, dtype=torch.uint8, generator=g)
        self.s4 = torch.rand(N, G, device=dev, generator=g) * 0.01 + 1e-3
        self.z4 = torch.randint(0, 16, (N, G), device=dev, dtype=torch.uint8, generator=g)
        self.qm = torch.randint(0, 16, (N, Kd), device=dev, dtype=torch.uint8, generator=g)
        self.em = torch.randint(118, 124, (N, -(-Kd // 32)), device=dev, dtype=torch.uint8, generator=g)
        self.p4, self.pm = pack(self.q4), pack(self.qm)

    def fns(self) -> dict[str, Callable[[], torch.Tensor]]:
        bf = torch.bfloat16
        f: dict[str, Callable[[], torch.Tensor]] = {"torch bf16": lambda: self.x @ self.w_bf16.T}
        if hasattr(torch, "_scaled_mm"):
            bt, br = self.b_ten.T, self.b_row.T  # column-major [K, N], as cuBLASLt wants
            st, sbt = self.sa_ten.reshape(()), self.sb_ten.reshape(())
            f["_scaled_mm tensor"] = lambda: torch._scaled_mm(self.a_ten, bt, st, sbt, out_dtype=bf)
            f["_scaled_mm row"] = lambda: torch._scaled_mm(
                self.a_tok, br, self.sa_tok, self.sb_row.T, out_dtype=bf
            )
        f["triton fp8 tensor"] = lambda: K.fp8_gemm(
            self.a_ten, self.sa_ten, self.b_ten, self.sb_ten, a_scale_mode="tensor", b_scale_mode="tensor",
            out_dtype=bf)  # fmt: skip
        f["triton fp8 row"] = lambda: K.fp8_gemm(
            self.a_tok,
            self.sa_tok,
            self.b_row,
            self.sb_row,
            a_scale_mode="row",
            b_scale_mode="row",
            out_dtype=bf,
        )
        f["triton fp8 block"] = lambda: K.fp8_gemm(
            self.a_grp, self.sa_grp, self.b_blk, self.sb_blk, a_scale_mode="block", b_scale_mode="block",
            out_dtype=bf)  # fmt: skip
        f["triton fp8 tensor fastacc"] = _fast(f["triton fp8 tensor"])
        f["triton fp8 row fastacc"] = _fast(f["triton fp8 row"])
        if hasattr(torch, "_scaled_mm"):
            f["_scaled_mm tensor fastacc"] = lambda: torch._scaled_mm(
                self.a_ten, bt, st, sbt, out_dtype=bf, use_fast_accum=True
            )
        f["triton int8"] = lambda: K.int8_gemm(self.a_i8, self.sa_i8, self.b_i8, self.sb_i8, out_dtype=bf)
        f["triton int4-g128"] = lambda: K.int4_gemm(self.x, self.p4, self.s4, self.z4, out_dtype=bf)
        f["triton mxfp4"] = lambda: K.mxfp4_gemm(self.x, self.pm, self.em, out_dtype=bf)
        return f

    def references(self) -> dict[str, torch.Tensor]:
        M, N, Kd = self.M, self.N, self.K
        w4 = (self.q4.double() - expand(self.z4, N, Kd, 1, 128)) * expand(self.s4, N, Kd, 1, 128)
        grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64, device=self.x.device)
        wm = grid[(self.qm & 7).long()] * torch.where(self.qm >= 8, -1.0, 1.0).double()
        wm = wm * expand(torch.exp2(self.em.double() - 127), N, Kd, 1, 32)
        xd = self.x.double()
        return {
            "torch bf16": xd @ self.w_bf16.double().T,
            "_scaled_mm tensor": (self.a_ten.double() * self.sa_ten.double())
            @ (self.b_ten.double() * self.sb_ten).T,
            "_scaled_mm row": (self.a_tok.double() * self.sa_tok) @ (self.b_row.double() * self.sb_row).T,
            "triton fp8 tensor": (self.a_ten.double() * self.sa_ten.double())
            @ (self.b_ten.double() * self.sb_ten).T,
            "triton fp8 row": (self.a_tok.double() * self.sa_tok) @ (self.b_row.double() * self.sb_row).T,
            "triton fp8 tensor fastacc": (self.a_ten.double() * self.sa_ten.double())
            @ (self.b_ten.double() * self.sb_ten).T,
            "triton fp8 row fastacc": (self.a_tok.double() * self.sa_tok)
            @ (self.b_row.double() * self.sb_row).T,
            "_scaled_mm tensor fastacc": (self.a_ten.double() * self.sa_ten.double())
            @ (self.b_ten.double() * self.sb_ten).T,
            "triton fp8 block": (self.a_grp.double() * expand(self.sa_grp, M, Kd, 1, 128))
            @ (self.b_blk.double() * expand(self.sb_blk, N, Kd, 128, 128)).T,
            "triton int8": (self.a_i8.double() @ self.b_i8.double().T)
            * self.sa_i8.double()
            * self.sb_i8.double().T,
            # weight-only kernels feed bf16 operands to the tensor cores
            "triton int4-g128": xd @ w4.to(torch.bfloat16).double().T,
            "triton mxfp4": xd @ wm.to(torch.bfloat16).double().T,
        }


# ----------------------------------------------------------------------------- checks
def check(dev: torch.device, big: int = 4096) -> list[str]:
    """Correctness at real sizes before any timing; returns failures (empty = all passed).

    `big` is the N = K of the large cases (4096 on a GPU; small for a CPU dry run of this script).
    """
    fails: list[str] = []

    def expect(name: str, err: float, tol: float) -> None:
        status = "ok" if err <= tol else "FAIL"
        print(f"check {name:<46} rel err {err:.2e} (tol {tol:.0e}) {status}", flush=True)
        if err > tol:
            fails.append(name)

    for M, N, Kd in ((128, big, big), (3, 130, 200), (1, 576, 1536) if big == 4096 else (1, 64, 96)):
        c = Case(M, N, Kd, dev)
        refs, fns = c.references(), c.fns()
        for name, fn in fns.items():
            try:
                expect(f"{name} {M}x{N}x{Kd}", rel_err(fn(), refs[name]), 8e-3)  # bf16 output rounding
            except Exception as e:  # one broken kernel must not hide the others
                print(f"check {name} {M}x{N}x{Kd}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                if not name.startswith("_scaled_mm"):  # cuBLASLt has shape limits (multiples of 16)
                    fails.append(name)
    # activation quantization: bit-exact against torch with correctly rounded divisions. (On CUDA,
    # torch's `tensor / python_float` multiplies by the fp32 reciprocal instead: reported, not failed.)
    x = torch.randn(64, big, device=dev) * 3
    for grp in (None, 128):
        q, s = K.quantize_act_fp8(x, group=grp, fp8_dtype=FN)
        gk = big if grp is None else grp
        xs = x.view(64, -1, gk)
        amax = xs.abs().amax(-1).clamp(min=1e-12)
        for how, sr in (
            ("amax / tensor(448)", amax / torch.full_like(amax, 448.0)),
            ("amax / 448.0", amax / 448.0),
        ):
            qr = (xs / sr[..., None]).clamp(-448, 448).to(FN).view(64, big)
            qr = torch.where(qr.view(torch.uint8) == 0x80, 0, qr.view(torch.uint8))  # no -0 (fnuz NaN code)
            diff = (s != sr).float().mean().item() + (q.view(torch.uint8) != qr).float().mean().item()
            if how.endswith("tensor(448)"):
                expect(f"quantize_act_fp8 group={grp} bit-exact ({how})", diff, 0.0)
            else:
                print(f"info  quantize_act_fp8 group={grp} vs torch {how}: mismatch fraction {diff:.2e}")
    # swapped block-scale strides read the transposed grid; fp32 out; bias
    M = 256 if big == 4096 else 16
    c = Case(M, big, big, dev)
    sb, sa = c.sb_blk, expand(c.sa_grp, M, big, 1, 128)
    bias = torch.randn(big, device=dev)
    out = K.fp8_gemm(c.a_grp, c.sa_grp, c.b_blk, sb, a_scale_mode="block", b_scale_mode="block",
                     b_scale_strides=(sb.stride(1), sb.stride(0)), out_dtype=torch.float32, bias=bias)  # fmt: skip
    ref = (c.a_grp.double() * sa) @ (c.b_blk.double() * expand(sb.T, big, big, 128, 128)).T + bias.double()
    # fp8 tensor cores accumulate ~14 mantissa bits inside a 128-wide K tile (DeepSeek-V3 report, 3.3.2)
    expect("fp8 block, swapped strides = s.T, bias, fp32", rel_err(out, ref), 5e-4)
    refr = (c.a_tok.double() * c.sa_tok) @ (c.b_row.double() * c.sb_row).T
    for fast in (False, True):
        K.FP8_FAST_ACCUM = fast
        out = K.fp8_gemm(c.a_tok, c.sa_tok, c.b_row, c.sb_row, a_scale_mode="row", b_scale_mode="row",
                         out_dtype=torch.float32)  # fmt: skip
        K.FP8_FAST_ACCUM = False
        if fast:
            print(f"info  fp8 row fp32-out with FP8_FAST_ACCUM=True: rel err {rel_err(out, refr):.2e}")
        else:
            expect("fp8 row, fp32 out (promoted accumulation)", rel_err(out, refr), 5e-4)
    if hasattr(torch, "_scaled_mm") and dev.type == "cuda":
        sm = torch._scaled_mm(c.a_tok, c.b_row.T, c.sa_tok, c.sb_row.T, out_dtype=torch.float32)
        print(f"info  _scaled_mm row fp32-out rel err {rel_err(sm, refr):.2e}")
    # e4m3fnuz (the uint8-decoding path on NVIDIA): e4m3fn bits read as fnuz are half the value
    # (docs/design.md "Fault injection": `fnuz-unnormalized`); doubled scales normalize them. fn's -0 is fnuz's NaN code.
    a8, b8 = c.a_grp.view(torch.uint8).clone(), c.b_blk.view(torch.uint8).clone()
    a8[a8 == 0x80], b8[b8 == 0x80] = 0, 0
    fz = torch.float8_e4m3fnuz
    out = K.fp8_gemm(a8.view(fz), c.sa_grp * 2, b8.view(fz), sb * 2, a_scale_mode="block", b_scale_mode="block",
                     out_dtype=torch.float32)  # fmt: skip
    ref = (c.a_grp.double() * sa) @ (c.b_blk.double() * expand(sb, big, big, 128, 128)).T
    expect("fp8 block e4m3fnuz (normalized)", rel_err(out, ref), 1e-4)
    return fails


# ----------------------------------------------------------------------------- timing
def _time(fn: Callable[[], object]) -> float:
    """Median ms of GPU time, replayed from a CUDA graph: the Python cost of a launch (validation,
    autotuner dispatch, triton's argument binding: tens of us) is not the kernel's, and at small
    shapes it would swamp it -- plain do_bench measured 10-30x slower small-M Triton runs here."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, quantiles=[0.5])
    except Exception:  # a callable that cannot be captured
        return triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5])


def bench(shapes: list[tuple[int, int, int]], dev: torch.device) -> list[dict]:

    rows = []
    for M, N, Kd in shapes:
        c = Case(M, N, Kd, dev)
        row: dict = {"M": M, "N": N, "K": Kd, "ms": {}, "tflops": {}, "config": {}}
        for name, fn in c.fns().items():
            try:
                fn()  # autotunes on first call for this shape
                torch.cuda.synchronize()
                ms = _time(fn)
            except Exception as e:  # record and go on: _scaled_mm has shape limits
                print(f"  {name} {M}x{N}x{Kd}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row["ms"][name] = ms
            row["tflops"][name] = 2 * M * N * Kd / ms / 1e9
        for name, grp in (("quant per-token", None), ("quant 1x128", 128)):
            row["ms"][name] = _time(lambda grp=grp, x=c.x: K.quantize_act_fp8(x, group=grp, fp8_dtype=FN))
        built = K._build()
        row["config"] = {
            n: str(getattr(kern, "best_config", ""))
            for n, kern in (("gemm", built.gemm), ("wonly", built.wonly))
        }
        print(f"{M}x{N}x{Kd}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["tflops"].items()), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    names = [n for n in rows[0]["tflops"]] if rows else []
    for r in rows:
        names += [n for n in r["tflops"] if n not in names]
    lines = ["TFLOP/s (GEMM only, median)", "", "| M | N | K | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]  # fmt: skip
    for r in rows:
        cells = [f"{r['tflops'][n]:.1f}" if n in r["tflops"] else "n/a" for n in names]
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")

    def ratio(r: dict, a: str, b: str) -> str:
        return f"{r['ms'][b] / r['ms'][a]:.2f}x" if a in r["ms"] and b in r["ms"] else "n/a"

    lines += ["", "Speed ratios (>1 = first is faster); act-quant times in us", "",
              "| M | N | K | fp8-tensor / _scaled_mm | fp8-row / _scaled_mm row | fastacc: fp8-tensor / _scaled_mm | "
              "fp8-block / bf16 | fp8-tensor / bf16 | int8 / bf16 | int4 / bf16 | mxfp4 / bf16 | quant tok | quant 1x128 |",
              "|---" * 13 + "|"]  # fmt: skip
    for r in rows:
        cells = [
            ratio(r, "triton fp8 tensor", "_scaled_mm tensor"),
            ratio(r, "triton fp8 row", "_scaled_mm row"),
            ratio(r, "triton fp8 tensor fastacc", "_scaled_mm tensor fastacc"),
            ratio(r, "triton fp8 block", "torch bf16"),
            ratio(r, "triton fp8 tensor", "torch bf16"),
            ratio(r, "triton int8", "torch bf16"),
            ratio(r, "triton int4-g128", "torch bf16"),
            ratio(r, "triton mxfp4", "torch bf16"),
            f"{r['ms']['quant per-token'] * 1e3:.1f}",
            f"{r['ms']['quant 1x128'] * 1e3:.1f}",
        ]
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also save every number as JSON")
    p.add_argument("--quick", action="store_true", help="only 3 shapes")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: dry-run the correctness checks at small sizes under the Triton interpreter")  # fmt: skip
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first built
        fails = check(torch.device("cpu"), big=256)
        print(f"correctness FAILED: {fails}" if fails else "all checks passed (no timing on CPU)")
        return 1 if fails else 0
    if not torch.cuda.is_available():
        print(
            "bench/gemm.py needs a CUDA or ROCm GPU; none is visible (CPU-only torch or no device).",
            file=sys.stderr,
        )
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    import triton

    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    fails = [] if args.no_check else check(dev)
    shapes = [(4096, 4096, 4096), (16, 4096, 4096), (1024, 576, 576)] if args.quick else BIG + SMOLLM2
    rows = bench(shapes, dev)
    table = markdown(rows)
    print(f"\n## GEMM benchmark on {name}\n\n{table}\n")
    if fails:
        print(f"correctness FAILED: {fails}")
    if args.json:
        meta = {
            "timing": "median of triton.testing.do_bench_cudagraph",
            "device": name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "check_failures": fails,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
