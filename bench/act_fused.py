"""One-token 8-bit GEMMs with the activation quantized inside the GEMV against the two kernels.

    python bench/act_fused.py [--dtype float16] [--out act_fused.json]     # GPU, ~20 s

int8 (per token) and fp8-block (1 x 128) at M = 1 on smollm2-135m's four decode GEMM shapes and on
4096 x 4096: the one-token entry points (`kernels.int8_gemm_dynamic` / `fp8_block_gemm_dynamic`,
whose tuner picks a fused GEMV or "quant2", the two kernels) against the act-quant kernel followed
by the tuned GEMM, first checked (int8 bit for bit: int32 sums; fp8 within fp32 summation order
and one fp16 rounding, as the two tuners may pick different splits; a mismatch is a FAIL row and
exit status 1), then timed as medians of CUDA-graph replays. A batch-1 decode step is bound by its
kernel count (quant_e2e.py --profile): this shows what one launch fewer per linear is worth.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gemm_cases as C  # noqa: E402

from server_shim.quant import kernels as K  # noqa: E402
from server_shim.quant import tuning  # noqa: E402

# (N, K): smollm2-135m's q / o, k / v, gate / up, down, then a 4096-wide layer
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096))
FN = torch.float8_e4m3fn


def _calls(kind: str, x: torch.Tensor, n: int, dev: torch.device) -> tuple[Callable, Callable]:
    """(fused, two kernels) for one problem, weights quantized once."""
    g = torch.Generator(device=dev).manual_seed(n * 31 + x.shape[1])
    w = torch.randn(n, x.shape[1], device=dev, generator=g) * 0.05
    if kind == "int8":
        s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
        b = torch.round(w / s).clamp(-127, 127).to(torch.int8)

        def two() -> torch.Tensor:
            q, sa = K.quantize_act_int8(x)
            return K.int8_gemm(q, sa, b, s, out_dtype=x.dtype)

        return (lambda: K.int8_gemm_dynamic(x, b, s, out_dtype=x.dtype)), two
    b, s = C.quant_weight_blocks(w)

    def two_fp8() -> torch.Tensor:
        q, sa = K.quantize_act_fp8(x, group=128, fp8_dtype=FN)
        return K.fp8_gemm(q, sa, b, s, a_scale_mode="block", b_scale_mode="block", out_dtype=x.dtype)

    return (lambda: K.fp8_block_gemm_dynamic(x, b, s, out_dtype=x.dtype)), two_fp8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("act_fused.py needs a GPU (the fused kernel's CPU checks are tests/test_kernels_fast.py)")
        return 0
    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    rows, failed = [], 0
    print(f"M = 1, {args.dtype} activations: fused GEMV vs act-quant kernel + GEMM (us, CUDA-graph medians)")
    print(f"{'scheme':10} {'N x K':>12} {'one-token':>9} {'two':>8} {'two/one':>8}  check  tuner's choice")
    for kind in ("int8", "fp8-block"):
        for n, k in SHAPES:
            x = torch.randn(1, k, device=dev, dtype=dtype)
            fused, two = _calls(kind, x, n, dev)
            got, want = fused().double(), two().double()
            err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
            ok = torch.equal(got, want) if kind == "int8" else err < 4e-3
            failed += not ok
            wdt = "|torch.int8|" if kind == "int8" else "|torch.float8"  # the row's own scheme's key
            chose = [
                v for key, v in tuning.TUNER.used.items() if "|mm8q|" in key and wdt in key and key.endswith(f"|n{n}|k{k}")
            ]  # fmt: skip
            t_f, t_t = C.time_ms(fused) * 1e3, C.time_ms(two) * 1e3
            rows.append(
                dict(scheme=kind, n=n, k=k, one_token_us=t_f, two_us=t_t, rel_err=err, ok=ok, chose=chose)
            )
            print(f"{kind:10} {f'{n}x{k}':>12} {t_f:9.2f} {t_t:8.2f} {t_t / t_f:7.2f}x  {'ok' if ok else 'FAIL':5}  "
                  f"{' '.join(chose)}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(dict(dtype=args.dtype, rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
