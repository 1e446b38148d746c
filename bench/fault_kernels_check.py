"""Every fault class inside the fast Triton kernels, on the GPU: PASS / FAIL.

    python bench/fault_kernels_check.py                # GPU: bf16 and fp16 x, real tile shapes
    python bench/fault_kernels_check.py --device cpu [--schemes int4-g128]   # the interpreter, small shapes

The CPU tests prove that each fault reproduces in each kernel path under the Triton interpreter,
where the word tiles use plain-Triton planes. On an NVIDIA GPU the word tiles dequantize in inline
PTX instead, the 8-bit tiles read through tensor descriptors, and the GEMVs run compiled. This
script pins the configs each M bucket serves from (`tuning.FORCE`) and runs every non-MoE fault of
every scheme through them. The Triton target must show the torch backend's bug:

- same: its distance to the faulty torch output is within the clean backends' own distance (3x,
  plus a tenth of an ulp of x's dtype), with the same inf / NaN entries, for every fault;
- shown: the bug is 3x farther from the golden output than that. A slot fault cannot show at one
  token, nor slot-tile within the first 16 rows: those rows read "not visible (torch too)"; any
  other fault must show.

routed-scaling-missing needs an MoE: tests/test_whitebox_acceptance.py covers it on the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gemm_cases import rel_err  # noqa: E402

# (M, config) per kernel family: the paths each M bucket's tuner lists draw from
CONFIGS_4BIT = (
    (1, "gemvf:1x1x1024:w2:s1:k1"),
    (16, "wordsk:16x64x128:w4:s4:k4"),
    (16, "words:16x64x64:w4:s3:k1"),
    (16, "wordsb:16x16x128:w4:s3:k1"),
    (16, "wordsb:16x32x128:w2:s3:k2"),
    (16, "wordsg:16x16x128:w4:s1:k1"),  # Gluon on NVIDIA sm80+ (16-bit x), else it runs as "wordsb"
    (1, "wordsg:16x16x128:w4:s1:k1"),  # one token through it
    (16, "wordsq:16x16x128:w4:s1:k1"),  # Gluon, both operands in place (as "wordsg")
    (1, "wordsq:16x16x128:w4:s1:k1"),
    (1, "wordsq:16x16x128:w4:s2:k1"),  # its operands two K steps ahead
    (16, "wordsq:16x16x128:w4:s2:k1"),
    (32, "wordsb:32x32x128:w4:s3:k1"),
    (64, "wordsk:64x64x128:w4:s3:k2"),
    (256, "fused:64x64x128:w4:s3:k1"),
    (256, "deq:128x128x64:w4:s4:k1"),
)
CONFIGS_8BIT = (
    (1, "gemv:1x16x256:w4:s1:k4"),
    (16, "tile:16x64x128:w4:s4:k1"),
    (16, "tile:16x64x256:w4:s3:k4"),
    (256, "tile:64x128x128:w4:s3:k1"),
    (256, "lag:64x128x128:w4:s3:k1"),
    (256, "tma:64x128x128:w4:s4:k1"),
    (256, "tmap:128x128x128:w8:s4:k1"),
    (256, "wsp:128x128x128:w4:s4:k1"),  # Gluon on sm90 (fp8 with exact accumulation), else it runs as "tmap"
    (256, "wsp:128x256x128:w4:s4:k1"),  # its 256-column tile (block scales run it on 128 columns)
)
CPU_CONFIGS_4BIT = ((1, "gemvf:1x1x256:w2:s1:k1"), (3, "wordsk:16x32x128:w2:s4:k2"))
CPU_CONFIGS_8BIT = ((1, "gemv:1x8x128:w4:s1:k2"), (3, "tile:16x32x128:w4:s2:k2"))


def _faults(scheme: str) -> list[str]:
    from server_shim.catalog import FAULT_SCHEMES, MOE_ONLY

    return [f for f, schemes in FAULT_SCHEMES.items() if scheme in schemes and f not in MOE_ONLY]


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative distance of a from b over the finite entries; inf where their inf / NaN patterns
    differ (a skipped scale overflows fp16: both backends must overflow in the same places)."""
    if not (
        torch.equal(torch.isnan(a), torch.isnan(b))
        and torch.equal(a.isinf() * a.sign(), b.isinf() * b.sign())
    ):
        return float("inf")
    fin = torch.isfinite(b)
    return rel_err(a[fin], b[fin]) if bool(fin.any()) else 0.0


def check(
    scheme: str, cfg: str, M: int, N: int, Kd: int, dtype: torch.dtype, dev: torch.device
) -> list[tuple[bool, str]]:
    """One line per fault of the scheme through the pinned config: (ok, text)."""
    from server_shim.catalog import SLOT_FAULTS
    from server_shim.quant import formats as F
    from server_shim.quant import tuning
    from server_shim.quant.faults import NO_FAULTS, FaultSet
    from server_shim.quant.linear import quant_matmul

    g = torch.Generator(device=dev).manual_seed(M * 31 + N + Kd)
    w = (
        torch.randn(N, Kd, device=dev, generator=g)
        * 0.02
        * (1 + 3 * torch.rand(N, 1, device=dev, generator=g))
    )
    x = (
        torch.randn(M, Kd, device=dev, generator=g) * (1 + 5 * torch.rand(M, 1, device=dev, generator=g))
    ).to(dtype)
    lines = []
    # per scale layout (shuffled or not): the weight, its golden output and the clean Triton
    # output's distance to it, computed once (the faults share them; half the interpreter's time)
    clean: dict[bool, tuple] = {}
    with tuning.pinned(cfg):
        for fault in _faults(scheme):
            shuffled = fault == "scale-shuffle-ignored"
            if shuffled not in clean:
                qw = F.quantize_weight(w, scheme, layout=F.ScaleLayout("row-major", shuffled))
                golden = quant_matmul(x, qw, None, "torch")
                clean[shuffled] = qw, golden, distance(quant_matmul(x, qw, None, "triton", NO_FAULTS), golden)
            qw, golden, noise = clean[shuffled]
            fs = FaultSet(**{fault.replace("-", "_"): True})
            faulty_torch = quant_matmul(x, qw, None, "torch", fs)
            same = distance(quant_matmul(x, qw, None, "triton", fs), faulty_torch)
            bug = distance(faulty_torch, golden)
            # the clean backends' own distance, and a tenth of an ulp of x's dtype: where they agree
            # bit for bit, a fault's other scales can still flip an output's last bit
            tol = 3 * noise + 0.1 * torch.finfo(dtype).eps
            close = same <= tol
            visible = bug > 3 * tol
            shown = "shown" if visible else "not visible (torch too)"
            text = (f"{scheme:10} {str(dtype):15} M={M:<4} {cfg:28} {fault:22} to torch's bug {same:.1e} "
                    f"(clean {noise:.1e}), bug {bug:.1e}: {shown}")  # fmt: skip
            lines.append((close and (visible or fault in SLOT_FAULTS), text))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument(
        "--schemes", nargs="+", default=None, help="these schemes only (default: every quantized one)"
    )
    args = ap.parse_args(argv)
    if args.device == "cpu":
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, kernels.py rebuilt in place if needed
    elif not torch.cuda.is_available():
        print("bench/fault_kernels_check.py needs a GPU (or --device cpu); none is visible.", file=sys.stderr)
        return 0
    os.environ.setdefault("DIFFTEST_TRITON_TUNE_CACHE", "0")
    from server_shim.catalog import QUANTIZED
    from server_shim.catalog import WEIGHT_ONLY_SCHEMES as W4

    unknown = set(args.schemes or ()) - set(QUANTIZED)
    if unknown:
        print(
            f"fault_kernels_check: unknown scheme {sorted(unknown)[0]!r} (known: {' '.join(QUANTIZED)})",
            file=sys.stderr,
        )
        return 2
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    N, Kd = (512, 1024) if gpu else (256, 384)  # block scales on a 2 x 3 grid: a transpose shows
    dtypes = (torch.bfloat16, torch.float16) if gpu else (torch.float32,)
    bad = total = 0
    for dtype in dtypes:
        for scheme in args.schemes or QUANTIZED:
            four = scheme in W4
            configs = (
                (CONFIGS_4BIT if four else CONFIGS_8BIT)
                if gpu
                else (CPU_CONFIGS_4BIT if four else CPU_CONFIGS_8BIT)
            )
            for M, cfg in configs:
                for ok, text in check(scheme, cfg, M, N, Kd, dtype, dev):
                    total += 1
                    bad += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {text}", flush=True)
    print(
        f"faults in the fast kernels: {total - bad}/{total} reproduce"
        + ("" if not bad else f", {bad} FAILED")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
