"""A 4-bit M <= 16 tile whose warps share x ("wordsr"): an experiment in no dispatch path, checked
against float64 and timed beside torch's 16-bit GEMM and the shim's "wordsb" tile.

    python bench/wordsr_w4.py                            # 16 x 4096 x 4096, int4-g128 and mxfp4
    python bench/wordsr_w4.py --warps 2 4 8 --splits 1 2 4 8 --dtype fp16
    python bench/wordsr_w4.py --compile                  # no GPU: sm90 registers, spills, SASS

Why: every 16-column program of "wordsb" / "wordsg" reads all of x, 32 MiB of L2 reads a call at
N = 4096, four times the weight, and staging it is ~2.3 of "wordsb"'s ~7.8 us (docs/gemm.md). Here
a program is G warps, each owning 16 weight rows (a 16G-row program), all walking the same K steps:
each warp loads x's K step straight into the `mma.sync` B operand's registers as "wordsg" does, so
the G warps of a program read the same x addresses at about the same time, and all but the first
are L1 hits (x's L2 reads cut G-fold, with no shared memory and no barrier in the K loop). The
words go straight into the A operand's registers and are dequantized by the word tiles' inline
PTX (q - z exact for int4, the scaled e2m1 value for mxfp4), the int4 row scale multiplies each
step's fp32 partial: the sums of "wordsg". Fewer, taller programs would leave the GPU half idle,
so K is split (`--splits`), the splits summing themselves in split order on per-tile counters (the
last to arrive), as the shim's split tiles do.

Measured (H200, 2026-12-06, bf16; docs/gemm.md): correct and slower, int4-g128 9.53 us at best
(4 warps, 4 splits) against 8.31 for "wordsb" and 8.73 for torch, mxfp4 11.4 against 9.5: the
warps' x loads are L1 hits but still one set of instructions per 16 weight rows. Every setting is
checked against float64 and for equal bits on a second run before it is timed; a FAIL line and exit
status 1 when off. Needs an NVIDIA GPU (sm80+) and a triton with Gluon for the timing; elsewhere
the timing mode says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_shim.quant import _gluon_w4, _gluon_w4w  # noqa: E402

IMPORTED = _gluon_w4.IMPORTED and _gluon_w4w.IMPORTED  # the latter for its split finish
BLOCK_K = 128  # a K step: one int4 group, four mxfp4 groups
BLOCK_M = 16  # x's rows: the MMA's N (two n8 tiles)
SCHEMES = {"int4-g128": 0, "mxfp4": 1}
WORDSB = "wordsb:16x16x128:w4:s3:k1"  # the tuner's M = 16 choice on Hopper

if IMPORTED:
    from server_shim.quant._gluon_w4 import _step_sums, gl, gluon
    from server_shim.quant._gluon_w4w import split_sum

    @gluon.jit
    def _wordsr_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, cnt_ptr, s_ptr, z_ptr, M, N, K, K_PER, sxm, swn, scm, scn,
                       ssn, ssg, szn, szg, FORMAT: gl.constexpr, BF16: gl.constexpr, G: gl.constexpr,
                       SPLIT: gl.constexpr, PLANES: gl.constexpr):  # fmt: skip
        """c [M, N] = x [M, K] @ dequant(w)^T, M <= 16: x as int32 pairs [M, K/2], w as int32 words
        [N, K/8] (k = 8 * word + nibble), int4 (fp32 scales, uint8 zeros, GROUP 128) or mxfp4 (e8m0
        codes in s_ptr, GROUP 32). Program (i, j): weight rows [16 G i, +16 G), warp g rows 16 g of
        them, K [j K_PER, +K_PER), K_PER whole K steps (the host checks K = SPLIT K_PER)."""
        BK: gl.constexpr = 128
        BM: gl.constexpr = 16
        GROUP: gl.constexpr = 128 if FORMAT == 0 else 32
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[G, 1, 1],
                                                      instr_shape=[1, 16, 8])  # fmt: skip
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        # "wordsg"'s operand layouts, the leading axis the warp's row block instead of its K step
        w_l: gl.constexpr = gl.BlockedLayout(
            [1, 1, 1], [1, 8, 4], [G, 1, 1], [2, 1, 0]
        )  # [G, 16 rows, 16 words]
        x_l: gl.constexpr = gl.BlockedLayout(
            [1, 4, 1], [1, 4, 8], [G, 1, 1], [1, 2, 0]
        )  # [G, 64 pairs, 16 rows]
        ROWS: gl.constexpr = 16 * G
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        k_lo = pid_k * K_PER
        steps = K_PER // BK

        ws_l: gl.constexpr = gl.SliceLayout(2, w_l)
        g_w = gl.arange(0, G, layout=gl.SliceLayout(1, ws_l))
        r_w = gl.arange(0, 16, layout=gl.SliceLayout(0, ws_l))
        rn_w = (pid_n * ROWS + gl.expand_dims(g_w, 1) * 16 + gl.expand_dims(r_w, 0)) % N  # [G, 16]
        j_w = gl.expand_dims(gl.expand_dims(gl.arange(0, BK // 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, w_l))),
                                            0), 0)  # fmt: skip
        w_ptrs = w_ptr + gl.expand_dims(rn_w, 2) * swn + j_w + k_lo // 8  # [G, 16, 16]
        if FORMAT == 0:  # a zero point per row and step [G, 16]
            z_ptrs = z_ptr + rn_w * szn + (k_lo // GROUP) * szg
            z_step = szg
        else:  # an e8m0 code per word [G, 16, 16]: four words a group
            z_ptrs = s_ptr + gl.expand_dims(rn_w, 2) * ssn + (j_w // (GROUP // 8) + k_lo // GROUP) * ssg
            z_step = (BK // GROUP) * ssg
        cs_l: gl.constexpr = gl.SliceLayout(2, mma)  # int4's row scales [G, 16], as the partials' rows
        rows_s = (pid_n * ROWS + gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, cs_l)), 1) * 16
                  + gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, cs_l)), 0))  # fmt: skip
        s_ptrs = s_ptr + (rows_s % N) * ssn + (k_lo // GROUP) * ssg

        xs_l: gl.constexpr = gl.SliceLayout(2, x_l)
        k_x = gl.expand_dims(gl.expand_dims(gl.arange(0, BK // 2, layout=gl.SliceLayout(0, xs_l)), 0), 2)
        g_x = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, xs_l)), 1), 2)
        m_x = gl.expand_dims(gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(0, x_l))), 0),
                             0)  # fmt: skip
        # every warp the same addresses (g_x * 0): the first warp's reads fill the L1, the others hit
        x_ptrs = x_ptr + m_x * sxm + k_x + g_x * 0 + k_lo // 2  # [G, 64, 16]
        x_rows = (m_x < M) & (g_x >= 0)

        word = gl.load(w_ptrs)
        x = gl.load(x_ptrs, mask=x_rows, other=0, cache_modifier=".ca")  # kept in the L1 for the other warps
        zc = gl.load(z_ptrs).to(gl.int32)
        sc = gl.load(s_ptrs)
        zero = gl.zeros([G, 16, BM], gl.float32, mma)
        acc = gl.zeros([G, 16, BM], gl.float32, mma)
        for i in range(0, steps):  # step i + 1's operands issued before step i's math
            more = i + 1 < steps
            nxt = gl.minimum(i + 1, steps - 1)  # the scales' last step again past the end: read, unused
            word_n = gl.load(w_ptrs + (i + 1) * (BK // 8), mask=more, other=0)
            x_n = gl.load(x_ptrs + (i + 1) * (BK // 2), mask=x_rows & more, other=0, cache_modifier=".ca")
            zc_n = gl.load(z_ptrs + nxt * z_step).to(gl.int32)
            sc_n = gl.load(s_ptrs + nxt * ssg)
            acc = _step_sums(acc, word, zc, x, sc, zero, PLANES, FORMAT, BF16, a_l, b_l)  # "wordsg"'s step
            word = word_n
            x = x_n
            zc = zc_n
            sc = sc_n

        # acc [G, 16 weight rows, 16 x rows] is c's tile transposed
        n3 = gl.expand_dims(rows_s, 2)  # the rows unwrapped: past N masked
        m3 = gl.expand_dims(
            gl.expand_dims(gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(0, mma))), 0), 0
        )
        mask = (n3 < N) & (m3 < M)
        out_ptrs = c_ptr + m3 * scm + n3 * scn
        if SPLIT > 1:
            acc, summed = split_sum(acc, ws_ptr + m3 * N + n3, mask, cnt_ptr + pid_n, pid_k, M * N, SPLIT)
            if summed:
                gl.store(out_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            gl.store(out_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def wordsr(x: torch.Tensor, words: torch.Tensor, out: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
           fmt: int, warps: int, splits: int, workspace: torch.Tensor, counters: torch.Tensor) -> None:  # fmt: skip
    """out = x @ dequant(words)^T with the tile (the caller checked `fits`)."""
    (m, k), n = x.shape, words.shape[0]
    _wordsr_kernel[(-(-n // (16 * warps)), splits)](
        x.view(torch.int32), words, out, workspace, counters, scales, zeros, m, n, k, k // splits,
        x.stride(0) // 2, words.stride(0), out.stride(0), out.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1) if zeros.dim() > 1 else 0, FORMAT=fmt,
        BF16=x.dtype == torch.bfloat16, G=warps, SPLIT=splits, PLANES=_gluon_w4.planes_source(fmt, x.dtype),
        num_warps=warps,
    )  # fmt: skip


def fits(m: int, n: int, k: int, warps: int, splits: int) -> str | None:
    """Why a setting cannot run this shape (None: it can): at most 16 rows of x, whole K steps per
    split (a last program's rows past N wrap on reading and are masked on storing)."""
    if m > BLOCK_M:
        return f"M = {m} > {BLOCK_M}"
    if k % (splits * BLOCK_K):
        return f"K = {k} is not {splits} splits of whole {BLOCK_K}-wide K steps"
    return None


def _shape(text: str) -> tuple[int, int, int]:
    try:
        m, n, k = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MxNxK") from None
    return m, n, k


def _compile() -> int:
    """sm90 cubins of every format x dtype (no GPU needed): registers, spills, SASS lines."""
    import sm90_compile as S

    if not IMPORTED:
        print("this triton has no Gluon", file=sys.stderr)
        return 0
    ptrs = {"x_ptr": "*i32", "w_ptr": "*i32", "c_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
            "s_ptr": "*fp32", "z_ptr": "*u8"}  # fmt: skip
    for scheme, fmt in SCHEMES.items():
        for dt in (torch.bfloat16, torch.float16):
            p = dict(
                ptrs, c_ptr="*bf16" if dt == torch.bfloat16 else "*fp16", s_ptr="*fp32" if fmt == 0 else "*u8"
            )
            consts = dict(FORMAT=fmt, BF16=dt == torch.bfloat16, G=4, SPLIT=4,
                          PLANES=_gluon_w4.planes_source(fmt, dt))  # fmt: skip
            row = S.compile_one(
                _wordsr_kernel, p, consts, 4, 1, 16, div16={"N", "K", "K_PER", "sxm", "swn", "scm"}
            )
            print(f"{scheme:10s} {str(dt)[6:]:9s} G 4 split 4: {row}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(16, 4096, 4096)])
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    ap.add_argument("--warps", nargs="+", type=int, choices=(1, 2, 4, 8), default=[4])
    ap.add_argument("--splits", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument(
        "--compile", action="store_true", help="no timing: compile for sm90 and print ptxas's view"
    )
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if any(s < 1 for s in args.splits):
        print("--splits: every split count is at least 1", file=sys.stderr)
        return 2
    if args.compile:
        os.environ.pop("TRITON_INTERPRET", None)
        return _compile()
    import _gemm_cases as C

    if C.gluon_gpu_missing("wordsr_w4.py", IMPORTED):
        return 0
    failed = False
    for case in C.w4_cases(args.shapes, args.schemes, args.dtype):
        (m, n, k), scheme = case.mnk, case.qw.scheme
        fmt, dtype, dev = SCHEMES[scheme], case.x.dtype, case.x.device
        x, qw, words, zeros = case.x, case.qw, case.words, case.zeros
        (t_torch, c_torch), (t_b, c_b) = case.baselines(WORDSB)
        print(f"\n{m}x{n}x{k} {scheme} {args.dtype}: torch {t_torch:.2f} us (from HBM {c_torch:.2f}), "
              f"wordsb {t_b:.2f} us (from HBM {c_b:.2f})", flush=True)  # fmt: skip
        for warps in args.warps:
            for splits in args.splits:
                why = fits(m, n, k, warps, splits)
                if why is not None:
                    print(f"skip G {warps} split {splits}: {why}")
                    continue
                out = torch.empty(m, n, device=dev, dtype=dtype)
                ws = torch.empty(splits, m, n, device=dev, dtype=torch.float32)
                cnt = torch.zeros(-(-n // (16 * warps)), device=dev, dtype=torch.int32)

                def run() -> None:
                    wordsr(x, words, out, qw.scales, zeros, fmt=fmt, warps=warps, splits=splits,  # noqa: B023
                           workspace=ws, counters=cnt)  # noqa: B023  # fmt: skip

                timed = case.check_then_time(f"G {warps} split {splits}", run, out)
                failed |= timed is None
                if timed is None:
                    continue
                t, err, t_cold = timed
                print(f"ok   G {warps} split {splits}: {t:6.2f} us ({t_torch / t:.2f}x torch, {t_b / t:.2f}x "
                      f"wordsb), from HBM {t_cold:6.2f} us ({c_torch / t_cold:.2f}x)  rel err {err:.1e}", flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
