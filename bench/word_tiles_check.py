"""The 4-bit word tiles against the exact float64 product, at real sizes: PASS / FAIL.

    python bench/word_tiles_check.py                # GPU: fp16 and bf16 x, the inline-PTX planes
    python bench/word_tiles_check.py --device cpu   # the interpreter's plain-Triton planes, small shapes

"words" / "wordsk" / "wordsb" configs are pinned (`tuning.FORCE`) on square and odd shapes, int4-g128 and
mxfp4, and compared with x @ dequantize(w)^T in float64: int4's tiles multiply the exact weight
(relative error ~1e-7 expected), mxfp4's values are exact in x's dtype. mxfp4 also runs random codes
under scales from 2**-127 to 2**20, where fp16 saturates: the kernel must give the reference's
inf / NaN pattern and its finite values. The tolerance (1e-5) is far below any rounding of the
weight to x's dtype (~1e-3 for bf16), so a plane off by one code or a wrong scale factor fails.
No timing: `bench/wonly_sweep.py` times these configs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gemm_cases import rel_err  # noqa: E402

CONFIGS = (
    "wordsk:16x64x128:w4:s4:k4",
    "words:16x64x64:w4:s3:k1",
    "wordsk:64x64x128:w4:s3:k2",
    "wordsb:16x16x128:w4:s3:k1",
    "wordsb:16x32x64:w2:s3:k2",
    "wordsb:32x16x128:w4:s3:k1",
)
GPU_SHAPES = ((16, 4096, 4096), (5, 300, 1000), (64, 256, 512), (3, 96, 264))
CPU_SHAPES = ((3, 40, 264), (17, 64, 256))
# fp32 accumulation over K = 4096 in the kernel's order (unsplit 64-wide tiles: 64 partial adds) is
# ~1e-6 from float64 (H200, 2026-12-04: up to 9.5e-7, 1.2e-6 under extreme scales); any rounding of the
# weight to x's dtype is ~1e-3 and a wrong plane or scale 1e-2 or more
TOL = 1e-5


def _extremes(
    x: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, g: torch.Generator
) -> tuple[bool, float]:
    """mxfp4 with random codes and e8m0 scales 0..147 (2**-127 .. 2**20): same inf / NaN pattern as
    the reference and its finite outputs' relative error."""
    from server_shim.quant import formats as F
    from server_shim.quant import kernels as K

    n, k = shape
    data = torch.randint(0, 256, (n, k // 2), device=x.device, dtype=torch.uint8, generator=g)
    codes = torch.randint(0, 148, (n, k // 32), device=x.device, dtype=torch.uint8, generator=g)
    qw = F.QuantizedWeight("mxfp4", data, codes, None, (n, k), F.ScaleLayout("row-major", False), None)
    out = K.mxfp4_gemm(x, qw.data, F.logical_scales(qw), out_dtype=torch.float32)
    ref = x.double() @ F.dequantize(qw).to(dtype).double().T  # inf / NaN where the weight in x's dtype is inf
    same = torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = torch.isfinite(ref)
    return same, rel_err(out[fin], ref[fin])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, kernels.py rebuilt in place if needed
    elif not torch.cuda.is_available():
        print(
            "bench/word_tiles_check.py needs a CUDA GPU (or --device cpu); none is visible.", file=sys.stderr
        )
        return 0
    from server_shim.quant import formats as F
    from server_shim.quant import kernels as K
    from server_shim.quant import tuning

    dev = torch.device(args.device)
    shapes = GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES
    bad = 0
    for dtype in (torch.bfloat16, torch.float16):
        for M, N, Kd in shapes:
            for cfg in CONFIGS:
                with tuning.pinned(cfg):
                    g = torch.Generator(device=dev).manual_seed(M + N + Kd)
                    x = torch.randn(M, Kd, device=dev, generator=g).to(dtype)
                    for scheme in ("int4-g128", "mxfp4"):
                        if scheme == "mxfp4" and Kd % 32:
                            continue  # the word view needs whole groups of words
                        qw = F.quantize_weight(torch.randn(N, Kd, device=dev, generator=g) * 0.02, scheme)
                        exact = x.double() @ F.dequantize(qw).double().T
                        if scheme == "int4-g128":
                            out = K.int4_gemm(
                                x, qw.data, F.logical_scales(qw), qw.zeros, out_dtype=torch.float32
                            )
                        else:
                            out = K.mxfp4_gemm(x, qw.data, F.logical_scales(qw), out_dtype=torch.float32)
                        err = rel_err(out, exact)
                        line = f"{scheme:10} {str(dtype):15} {M}x{N}x{Kd} {cfg:28} rel {err:.1e}"
                        if scheme == "mxfp4":
                            same, ext = _extremes(x, (N, Kd), dtype, g)
                            line += f"; scales 2**-127..2**20: inf/NaN pattern {'same' if same else 'DIFFERENT'}, rel {ext:.1e}"
                            err = max(err, ext) if same else float("inf")
                        ok = err < TOL
                        bad += not ok
                        print(f"{'ok  ' if ok else 'FAIL'} {line}", flush=True)
    print("word tiles: all match float64" if not bad else f"word tiles: {bad} FAILED their float64 check")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
