"""The warp-specialized Gluon fp8 GEMM ("wsp") against cuBLAS and the plain-Triton "tmap" kernel.

    python bench/gluon_mm8.py [--shapes 4096x4096x4096 1024x4096x4096] [--stages 4 5 6] [--group-m 8 16]
                              [--stores bulk regs]

Needs an sm90 GPU with Gluon (`arch.warp_specialized_fp8`; elsewhere it says so and exits 0). Per shape and scale mode (tensor,
row, block) every variant is first checked -- against float64 (relative error), and for tensor /
row scales bit for bit against "tmap" pinned to the same promotion (every 128 of K) -- then timed
(median of CUDA-graph replays) beside torch bf16, `_scaled_mm` (exact accumulation) and "tmap".
Prints TFLOP/s and the issue-14 ratios: fp8 tensor / row against `_scaled_mm`, block against bf16.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gemm_cases import Case, rel_err  # noqa: E402

from server_shim.quant import _fastpath, _gluon_mm8, arch, tuning  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

TMAP = {  # the plain-Triton kernels the tuner chose before "wsp" (docs/gemm.md)
    "tensor": tuning.Cfg("tmap", 256, 128, 128, 8, 3, 1, 4),
    "row": tuning.Cfg("tmap", 256, 128, 128, 8, 3, 1, 4),
    "block": tuning.Cfg("tma", 64, 128, 128, 4, 3, 1, 16),
}


def operands(c: Case, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if mode == "tensor":
        return c.a_ten, c.sa_ten, c.b_ten, c.sb_ten
    if mode == "row":
        return c.a_tok, c.sa_tok, c.b_row, c.sb_row
    return c.a_grp, c.sa_grp, c.b_blk, c.sb_blk


def pinned(cfg: tuning.Cfg, a, sa, b, sb, mode: str):  # noqa: ANN001, ANN201 - a timed callable
    def run() -> torch.Tensor:
        with tuning.pinned(cfg):
            return K.fp8_gemm(a, sa, b, sb, a_scale_mode=mode, b_scale_mode=mode, out_dtype=torch.bfloat16)

    return run


class _Launches:
    """Counts launches of the Gluon kernel: a "wsp" run that fell back to "tmap" would equal it
    trivially, so every check also asserts that the Gluon kernel ran. `bulk` picks the output's
    store (bulk tensor copies or from the registers) for the launches that follow."""

    def __init__(self) -> None:
        self.n = 0
        self.bulk = True
        self._launch = _gluon_mm8.mm8_wsp
        _gluon_mm8.mm8_wsp = self

    def __call__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.n += 1
        self._launch(*args, **kwargs, bulk_store=self.bulk)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096x4096", "1024x4096x4096", "8192x8192x8192"])
    ap.add_argument("--stages", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--group-m", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--block-n", type=int, nargs="+", default=[128, 256], choices=[128, 256])
    ap.add_argument(
        "--stores",
        nargs="+",
        default=["bulk", "regs"],
        choices=["bulk", "regs"],
        help="the output's store: bulk tensor copies through shared memory, or from the registers",
    )
    ap.add_argument(
        "--modes", nargs="+", default=["tensor", "row", "block"], choices=["tensor", "row", "block"]
    )
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() and arch.warp_specialized_fp8("cuda")):
        print("gluon_mm8: needs an sm90 GPU and a triton with Gluon; nothing to measure here")
        return 0
    import triton.testing

    dev = torch.device("cuda")
    launches = _Launches()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"programs {_fastpath._programs('cuda:0')}")  # fmt: skip
    fails = 0
    for shape in args.shapes:
        M, N, Kd = (int(v) for v in shape.split("x"))
        c = Case(M, N, Kd, dev)
        f = c.fns()

        def tflops(ms: float, M: int = M, N: int = N, Kd: int = Kd) -> float:
            return 2 * M * N * Kd / ms / 1e9

        def bench(fn) -> float:  # noqa: ANN001
            return float(triton.testing.do_bench_cudagraph(fn, rep=200))

        t = {name: bench(f[name]) for name in ("torch bf16", "_scaled_mm tensor", "_scaled_mm row")}
        print(f"\n{M}x{N}x{Kd}: bf16 {tflops(t['torch bf16']):.0f}, _scaled_mm tensor "
              f"{tflops(t['_scaled_mm tensor']):.0f} / row {tflops(t['_scaled_mm row']):.0f} TFLOP/s")  # fmt: skip
        for mode in args.modes:
            a, sa, b, sb = operands(c, mode)
            ref = c.reference(f"fp8 {mode}")
            base = pinned(TMAP[mode], a, sa, b, sb, mode)
            base_out = base().clone()
            t_base = bench(base)
            rows = [(f"{TMAP[mode].name} (Triton)", t_base, rel_err(base_out, ref), "")]
            for bn, stages, gm, store in itertools.product(
                args.block_n, args.stages, args.group_m, args.stores
            ):
                if (bn == 256 and stages > 4) or (bn == 128 and stages > 6):
                    continue  # shared memory holds 4 stages of a 256-column tile, 6 of 128
                cfg = tuning.Cfg("wsp", 128, bn, 128, 4, stages, 1, gm)
                run = pinned(cfg, a, sa, b, sb, mode)
                launches.bulk = store == "bulk"
                if launches.bulk and not _gluon_mm8.out_buffers(
                    2 if mode == "block" else 0, 2 if mode == "block" else 0, stages, bn, 2
                ):
                    continue  # this config stores from the registers either way
                before = launches.n
                out = run().clone()
                if launches.n != before + 1:
                    print(f"  {cfg.name}: the Gluon kernel did not run (fell back)", file=sys.stderr)
                    fails += 1
                    continue
                err = rel_err(out, ref)
                same = (
                    "" if mode == "block" else ("bitwise = tmap" if torch.equal(out, base_out) else "DIFFERS")
                )
                if err > 1e-2 or same == "DIFFERS":
                    fails += 1
                rows.append((f"{cfg.name} {store}", bench(run), err, same))
            goal = t["_scaled_mm " + mode] if mode != "block" else t["torch bf16"]
            against = "_scaled_mm" if mode != "block" else "bf16"
            for name, ms, err, same in rows:
                print(f"  fp8 {mode:6} {name:34} {tflops(ms):6.0f} TFLOP/s  {goal / ms:5.3f}x {against}  "
                      f"err {err:.2e} {same}")  # fmt: skip
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
