"""Every 4-bit GEMM config pinned, checked against float64, timed: where the tuner's choice comes from.

    python bench/wonly_sweep.py [--m 16 32 64] [--n 4096] [--k 4096] [--paths words wordsk fused]
    python bench/wonly_sweep.py --m 16 --configs wordsk:16x64x128:w4:s4:k4 --ncu   # one launch per config
    python bench/wonly_sweep.py --m 1 16 --cold       # every weight read from HBM, not from L2
    python bench/wonly_sweep.py --device cpu          # the checks at small sizes, Triton interpreter

For each M and scheme (int4-g128, mxfp4; bf16 activations, or --dtype fp16) the candidates quant/tuning.py lists for
this GPU's family (or --configs) run pinned through the shim's own dispatch (`tuning.FORCE`), each
compared with the float64 product of the golden dequantization first: a config over tolerance is a
FAIL row and exit status 1. Then medians of CUDA-graph replays, fastest first, beside torch bf16 and
a floor: reading the packed weight once with as many programs as it takes (HBM alone, no math).
`bench/gemm.py` times only the tuner's winner per shape; this shows the whole field, which is what
docs/gemm.md quotes for the 4-bit tiles. --ncu runs each config a few times untimed, for
`ncu -k regex:wonly python bench/wonly_sweep.py --ncu ...`.

--cold: replaying one GEMM keeps its weight in the GPU's L2 (50 MB on an H100 / H200: a bf16
4096 x 4096 weight is 32 MiB), which is not the decode step it stands for, where every layer's
weights are evicted by the other layers' before they come round again. With --cold each timed
callable runs the GEMM once on each of enough copies of the weight (scales and zero points too)
to span four times the L2, in one CUDA graph, and the time per GEMM is the graph's over the copies.
`--cold --cold-timer flush` times each one instead as the tuner does (`tuning.time_cold`: one
weight, the L2 flushed by a read before every call): the two methods side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gemm_cases as C  # noqa: E402

from server_shim.quant import tuning  # noqa: E402

SCHEMES = ("int4-g128", "mxfp4")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[16], help="M values (default 16)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--paths", nargs="+", default=None, choices=sorted(tuning.PATHS),
                   help="only the candidates of these paths (words fused ...)")  # fmt: skip
    p.add_argument(
        "--configs", nargs="+", default=None, help="these config names instead of the tuner's list"
    )
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="the activations' dtype")
    p.add_argument("--ncu", action="store_true", help="no timing: each config a few launches, for a profiler")
    p.add_argument("--cold", action="store_true",
                   help="time with the weights read from HBM: copies spanning 4x the L2, taken in turn")  # fmt: skip
    p.add_argument("--cold-timer", choices=("copies", "flush"), default="copies",
                   help="with --cold: weight copies in turn (default), or the tuner's flushed timing")  # fmt: skip
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: check the configs at 8 x 64 x 256 under the Triton interpreter, no timing")  # fmt: skip
    return p.parse_args(argv)


def _time_us(fn: Callable[[], object]) -> float:
    return C.time_ms(fn) * 1000.0


def copies_for(nbytes: int, l2_bytes: int, span: int = 4) -> int:
    """How many copies of an operand of `nbytes` take more than `span` L2s together (at least 2), so
    that by the time one comes round again the others have pushed it out of the L2."""
    return max(2, span * l2_bytes // max(nbytes, 1) + 1)


def in_turn(fn: Callable[..., object], operands: list[tuple]) -> Callable[[], object]:
    """A callable that runs fn once on each operand tuple, in order: timed as one CUDA graph and
    divided by len(operands), each call's weight comes from HBM (see --cold)."""

    def run() -> object:
        out = None
        for ops in operands:
            out = fn(*ops)
        return out

    return run


def _copies(tensors: tuple[torch.Tensor, ...], cold: bool) -> list[tuple[torch.Tensor, ...]]:
    """`tensors` alone, or with --cold as many copies as take 4x the L2 (the first the originals)."""
    if not cold:
        return [tensors]
    n = copies_for(sum(t.numel() * t.element_size() for t in tensors), tuning.l2_bytes(tensors[0].device))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


tl: Any = None  # triton.language, bound by _floor_us (triton must load after TRITON_INTERPRET is set)


def _read_words(p, o, n, BLOCK: tl.constexpr):
    """Sum int32 words, a grid-strided BLOCK at a time: the weight read once and nothing else."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        acc += tl.load(p + i + tl.arange(0, BLOCK), mask=i + tl.arange(0, BLOCK) < n, other=0)
    tl.store(o + pid, tl.sum(acc))


def _floor_us(packed: torch.Tensor, cold: bool = False) -> float:
    """Reading the packed weight once (HBM's share of any 4-bit GEMM of it), the best of three grids."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    read = triton.jit(_read_words)
    words = _copies((packed.reshape(-1).view(torch.int32),), cold)
    sink = torch.empty(1024, dtype=torch.int32, device=packed.device)

    def once(p: int) -> Callable[[], object]:
        return in_turn(lambda w: read[(p,)](w, sink, w.numel(), BLOCK=1024), words)

    return min(_time_us(once(p)) for p in (264, 528, 1024)) / len(words)


def sweep(
    M: int,
    N: int,
    Kd: int,
    scheme: str,
    names: list[str],
    dev: torch.device,
    timed: bool,
    dtype: torch.dtype = torch.bfloat16,
    cold: bool = False,
    flush: bool = False,
) -> list[dict]:
    """One row per config: its error against float64 and, when timed, its median µs."""
    from server_shim.quant import formats as F
    from server_shim.quant import kernels as K

    g = torch.Generator(device=dev).manual_seed(M * 7 + N * 3 + Kd)
    x = torch.randn(M, Kd, device=dev, generator=g).to(dtype)
    qw = F.quantize_weight(torch.randn(N, Kd, device=dev, generator=g) * 0.02, scheme)
    ref = x.double() @ F.dequantize(qw).to(dtype).double().T
    if scheme == "int4-g128":
        gemm = lambda d, s, z: K.int4_gemm(x, d, s, z, out_dtype=dtype)  # noqa: E731
        weights = _copies((qw.data, qw.scales, qw.zeros), cold and timed and not flush)
    else:
        gemm = lambda d, s: K.mxfp4_gemm(x, d, s, out_dtype=dtype)  # noqa: E731
        weights = _copies((qw.data, qw.scales), cold and timed and not flush)
    fn = lambda: gemm(*weights[0])  # noqa: E731
    every = in_turn(gemm, weights)  # the copies in turn (one call where not --cold)
    rows = []
    for name in names:
        with tuning.pinned(name):
            err = float((fn().double() - ref).norm() / ref.norm())
            row = {
                "scheme": scheme,
                "M": M,
                "config": name,
                "err": err,
                "ok": err < C.tol(f"triton {scheme}"),
                "us": None,
            }
            if timed and row["ok"] and flush:
                row["us"] = tuning.time_cold(fn) * 1000.0
            elif timed and row["ok"]:
                row["us"] = _time_us(every) / len(weights)
            elif dev.type == "cuda":  # --ncu: a few plain launches for the profiler to catch
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            rows.append(row)
    return rows


def _names(args: argparse.Namespace, family: str, M: int, N: int, Kd: int) -> list[str]:
    if args.configs:
        return [tuning.Cfg.parse(name).name for name in args.configs]  # ValueError: not a config
    cands = tuning.candidates(family, "wonly", M, N, Kd)
    return [c.name for c in cands if args.paths is None or c.path in args.paths]


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.device == "cpu":
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, kernels.py rebuilt in place if needed
        dev, family, shapes = torch.device("cpu"), "hopper", [(8, 64, 256)]
    elif not torch.cuda.is_available():
        print(
            "bench/wonly_sweep.py needs a CUDA or ROCm GPU (or --device cpu); none is visible.",
            file=sys.stderr,
        )
        return 0
    else:
        from server_shim.quant import arch

        dev = torch.device("cuda")
        family, shapes = arch.gemm_family(dev), [(m, args.n, args.k) for m in args.m]
    os.environ.setdefault("DIFFTEST_TRITON_TUNE_CACHE", "0")
    timed = dev.type == "cuda" and not args.ncu
    try:
        names = {shape: _names(args, family, *shape) for shape in shapes}
    except ValueError as e:
        print(f"wonly_sweep: {e}", file=sys.stderr)
        return 2
    fails, dtype = 0, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    flush = args.cold and args.cold_timer == "flush"  # the tuner's timing instead of the copies
    for M, N, Kd in shapes:
        if timed:
            g = torch.Generator(device=dev).manual_seed(0)
            a = torch.randn(M, Kd, device=dev, generator=g).to(dtype)
            b = torch.randn(N, Kd, device=dev, generator=g).to(dtype)
            packed = torch.randint(0, 255, (N, -(-Kd // 8) * 4), device=dev, dtype=torch.uint8, generator=g)
            bs = _copies((b,), args.cold and not flush)
            if flush:
                dense = tuning.time_cold(lambda a=a, b=b: a @ b.T) * 1000.0
                where = ", weights from HBM (flushed L2, the tuner's timing)"
            else:
                dense = _time_us(in_turn(lambda w, a=a: a @ w.T, bs)) / len(bs)
                where = f", weights from HBM ({len(bs)} dense copies)" if args.cold else ""
            print(f"{M}x{N}x{Kd}: torch {args.dtype} {dense:.2f} us, "
                  f"read of the packed weight {_floor_us(packed, args.cold):.2f} us{where}", flush=True)  # fmt: skip
        for scheme in args.schemes:
            rows = sweep(M, N, Kd, scheme, names[(M, N, Kd)], dev, timed, dtype, args.cold, flush)
            rows.sort(key=lambda r: (not r["ok"], r["us"] if r["us"] is not None else 0.0))
            for r in rows:
                us = f"{r['us']:8.2f} us" if r["us"] is not None else "       -   "
                print(f"{'ok  ' if r['ok'] else 'FAIL'} {scheme:10} M={M:<5} {r['config']:34} {us}  "
                      f"rel err {r['err']:.1e}", flush=True)  # fmt: skip
                fails += not r["ok"]
    print("all checks passed" if not fails else f"{fails} configs FAILED their float64 check")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
