"""The 4-bit M <= 16 tile with both MMA operands in place ("wordsq", in Hopper's M <= 16 tuner
list) and its variants, checked against float64 and timed beside torch's 16-bit GEMM, the tuner's
usual choice ("wordsb" / "gemvf"), and "wordsg" (quant/_gluon_w4.py), whose sums it computes.

    python bench/wordsq_w4.py                        # 16 and 1 x 4096 x 4096, int4-g128 and mxfp4
    python bench/wordsq_w4.py --variants quad quad-c2 --dtype fp16
    python bench/wordsq_w4.py --compile              # no GPU: sm90 SASS of each K step

Why: "wordsg"'s K step spends register moves on x (Triton's k_width 8 operand pairs registers of
two 16-byte loads in one `mma.sync` B operand) and, for mxfp4, a scale code per word (a thread's
4 words of a row lie in 4 groups). The sum over k does not care about k's order, so this tile
permutes it, the same way on both operands: a thread's 4 words of a row are 4 consecutive words
(one 16-byte load; mxfp4: one group, one code), and with k_width 4 each MMA's B operand is a
register pair of one x load as loaded. Its K steps cost 23% (int4) and 35% (mxfp4) fewer sm90
SASS instructions than "wordsg"'s (`--compile`, variant "quad").

Measured (H100, 2026-12-06, bf16; docs/gemm.md): correct everywhere (float64, equal bits twice);
at M = 16 no variant beats "wordsb" (int4-g128 9.3-9.5 us against 8.2, mxfp4 9.1-10.2 against
9.1; operands two steps ahead and, at commit e1c847c, words 4 apart no better),
so fewer instructions do not buy M = 16's missing speed: the tile is bound by latency.
With fp16 x it wins mxfp4 (9.2 against 11.2 us), and "quad-pf2" int4-g128 at M = 1 from HBM (10.8
against 11.9 us for "gemvf"): the shim tunes both as "wordsq" (1 and 2 stages). Every
variant is checked against float64 and for equal bits on a second run before it is timed; a FAIL
line and exit status 1 when off. Needs an NVIDIA GPU (sm80+) and a triton with Gluon for the
timing; elsewhere the timing mode says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_shim.quant import _gluon_w4  # noqa: E402

IMPORTED = _gluon_w4.IMPORTED
SCHEMES = {"int4-g128": 0, "mxfp4": 1}
WORDSB = "wordsb:16x16x128:w4:s3:k1"  # the tuner's M = 16 choice on Hopper
GEMVF = "gemvf:1x2x4096:w2:s1:k1"  # its M = 1 choice
# name -> the kernel's switches (`_gluon_w4._wonly_wordsq_kernel`; the shim's "wordsq" runs "quad")
VARIANTS = {
    "quad": dict(UNROLL=2, CHAINS=1),
    "quad-c2": dict(UNROLL=2, CHAINS=2),
    "quad-u1": dict(UNROLL=1, CHAINS=1),
    "quad-pf2": dict(UNROLL=2, CHAINS=1, PF=2),  # the shim's "wordsq" with 2 stages
}

if IMPORTED:
    from server_shim.quant._gluon_w4 import _wonly_wordsq_kernel


def wordsq(x: torch.Tensor, words: torch.Tensor, out: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
           fmt: int, variant: str) -> None:  # fmt: skip
    """out = x @ dequant(words)^T with a variant of the tile (`_gluon_w4.runs` said yes)."""
    _gluon_w4.wonly_wordsq(x, words, out, scales, zeros, None, fmt=fmt, sub=4, **VARIANTS[variant])


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MxNxK") from None
    return m, n, k


def step_cost(ops: dict[str, int], steps: int) -> str:
    """A K loop's opcodes (`sm90_compile.loop_ops`) per K step: all, register moves, 16-byte loads."""
    total = sum(ops.values())
    return (f"{total / steps:6.1f} instr/step, {ops.get('IMAD.MOV.U32', 0) / steps:4.1f} moves, "
            f"{ops.get('LDG.E.128', 0) / steps:4.1f} 16-byte loads")  # fmt: skip


def compiled_steps(fmt: int, dt: torch.dtype, variant: str | None) -> tuple[str, dict[str, int], int]:
    """sm90 compile of "wordsg" (variant None) or a variant: ptxas's line, its K loop's opcodes and
    how many K steps one loop step is."""
    import sm90_compile as S

    ptrs = {"x_ptr": "*i32", "w_ptr": "*i32", "c_ptr": "*bf16" if dt == torch.bfloat16 else "*fp16",
            "s_ptr": "*fp32" if fmt == 0 else "*u8", "z_ptr": "*u8"}  # fmt: skip
    ptrs["bias_ptr"] = ptrs["c_ptr"]
    consts = dict(FORMAT=fmt, BF16=dt == torch.bfloat16, HAS_BIAS=False, BLOCK_N=16, SUB=4,
                  PLANES=_gluon_w4.planes_source(fmt, dt), EVEN_K=True)  # fmt: skip
    fn, steps = _gluon_w4._wonly_wordsg_kernel, 1
    if variant is not None:
        fn, steps = _wonly_wordsq_kernel, VARIANTS[variant]["UNROLL"]
        consts.update(VARIANTS[variant])
    sass: list[str] = []
    line = S.compile_one(fn, ptrs, consts, 4, 1, 16, div16={"N", "K", "sxm", "swn", "scm"}, sass=sass)
    return line, dict(S.loop_ops(sass[0]) if sass else {}), steps


def _compile(variants: list[str]) -> int:
    """Each variant's and "wordsg"'s sm90 compile and K-step SASS, bf16 (no GPU needed)."""
    if not IMPORTED:
        print("this triton has no Gluon", file=sys.stderr)
        return 0
    for scheme, fmt in SCHEMES.items():
        for variant in [None, *variants]:
            line, ops, steps = compiled_steps(fmt, torch.bfloat16, variant)
            cost = step_cost(ops, steps) if ops else "(no SASS)"
            print(f"{scheme:10s} {variant or 'wordsg':9s} {cost}  {line}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(16, 4096, 4096), (1, 4096, 4096)])
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="no timing: sm90 SASS per K step of each variant")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if any(m > _gluon_w4.BLOCK_M for m, _, _ in args.shapes):
        print(f"--shapes: at most {_gluon_w4.BLOCK_M} rows of x", file=sys.stderr)
        return 2
    if args.compile:
        os.environ.pop("TRITON_INTERPRET", None)
        return _compile(args.variants)
    import _gemm_cases as C

    if C.gluon_gpu_missing("wordsq_w4.py", IMPORTED):
        return 0
    failed = False
    for case in C.w4_cases(args.shapes, args.schemes, args.dtype):
        (m, n, k), scheme = case.mnk, case.qw.scheme
        fmt, dtype, dev = SCHEMES[scheme], case.x.dtype, case.x.device
        x, qw, words, zeros = case.x, case.qw, case.words, case.zeros
        tuner = WORDSB if m > 1 else GEMVF
        (t_torch, c_torch), (t_b, c_b) = case.baselines(tuner)
        print(f"\n{m}x{n}x{k} {scheme} {args.dtype}: torch {t_torch:.2f} us (from HBM {c_torch:.2f}), "
              f"{tuner.split(':')[0]} {t_b:.2f} ({c_b:.2f})", flush=True)  # fmt: skip
        out = torch.empty(m, n, device=dev, dtype=dtype)
        runs = {"wordsg": lambda: _gluon_w4.wonly_wordsg(x, words, out, qw.scales, zeros, None, fmt=fmt,  # noqa: B023
                                                          block_n=16, sub=4)}  # fmt: skip
        for v in args.variants:
            runs[v] = lambda v=v: wordsq(x, words, out, qw.scales, zeros, fmt=fmt, variant=v)  # noqa: B023
        for name, run in runs.items():
            timed = case.check_then_time(name, run, out)
            failed |= timed is None
            if timed is None:
                continue
            t, err, t_cold = timed
            print(f"ok   {name:9s} {t:6.2f} us ({t_torch / t:.2f}x torch, {t_b / t:.2f}x the tuner's), "
                  f"from HBM {t_cold:6.2f} us ({c_torch / t_cold:.2f}x, {c_b / t_cold:.2f}x)  rel err {err:.1e}",
                  flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
