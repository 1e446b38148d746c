"""Triton kernels for the quantized GEMMs, one code path for GPUs and the CPU interpreter.

Layouts (CONTRACTS.md): weights [N, K] (nn.Linear), activations [M, K], outputs [M, N]; every
scale is read through strides given by the caller, so a declared layout (or an injected
`scale-transposed` fault) decides what the kernel reads, never an assumption in here.

Why triton is imported lazily: `triton.jit` decides at decoration time whether a kernel is
compiled or interpreted (TRITON_INTERPRET=1). The kernel bodies below are plain functions that
`_build()` decorates on first use, so importing this module imports no triton and fixes nothing.
For CPU tensors TRITON_INTERPRET=1 must be set before triton.language is first imported (its own
helpers -- tl.max, tl.zeros -- are decorated then); a late switch gets a clear QuantConfigError
(quant/linear.py's `load_kernels` reloads triton.language to allow it). The choice made at the
first kernel call is then fixed for the process.

Interpreter findings (triton 3.9, CPU tensors) and the workarounds, all on the shared path:
- fp8 loads (`float8_e4m3fn` and `float8_e4m3fnuz` pointers), `.to(tl.float32)` and fp8
  `tl.dot` are exact.
- Casting fp32 to fp8 or bf16 rounds wrongly: a mantissa that rounds up does not carry into the
  exponent (31.1 -> 16 instead of 32 in e4m3fn) and ties are not broken to even; without
  `fp_downcast_rounding` bf16 is even truncated. So the kernels round to the target grid first,
  in integer/fp32 arithmetic that is exact everywhere (`_round_to_fp8_grid`,
  `_round_to_bf16_grid`), and then cast a value that is already representable: exact in the
  interpreter and identical to the hardware's round-to-nearest-even on a GPU.
- `tl.dot` on bf16 operands is garbage in the interpreter (it multiplies the raw uint16 bits);
  fp16, fp32, int8 and fp8 dots are right. The weight-only kernels therefore take a bf16
  activation through an fp32 (ieee) dot when interpreting -- exact products, so numerically the
  GPU's bf16 dot -- and the fp8 bit-decoding path decodes to fp16, never bf16.
- fp8 NaN codes load as finite numbers in the interpreter (e4m3fn 0x7f -> 480, fnuz 0x80 -> 0);
  valid quantized data never holds them, the uint8 decoding path maps them to NaN.
- GPUs without native fp8 (before sm_89, ROCm before gfx94x) get the fp8 operands as uint8 bits
  that are decoded in-kernel to fp16 (exact), and activations are encoded to bytes in-kernel;
  `_fp8_native` decides. The interpreter runs either path, so both are tested on CPU.
"""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace
from typing import Any

import torch

from server_shim.errors import QuantConfigError

logger = logging.getLogger(__name__)

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
# amax floor: an all-zero row still gets a finite, positive scale; the value of formats._TINY, so
# the triton and torch (golden) backends agree bit for bit there too.
AMAX_FLOOR = 1e-12
_SCALE_MODES = {"tensor": 0, "row": 1, "block": 2}
# Hopper's fp8 tensor cores accumulate in reduced precision; Triton's default there never promotes
# to fp32 (max_num_imprecise_acc 2**30), which cost ~1e-3 relative error at K=4096 against an
# fp32 reference. False (default): promote after every BLOCK_K, like block mode and like
# `_scaled_mm(use_fast_accum=False)`; True: the fast, imprecise accumulation. Tensor/row modes only.
FP8_FAST_ACCUM = False

tl: Any = None  # bound to triton.language by _build(); the kernel bodies resolve it at compile time
_lock = threading.Lock()
_built: SimpleNamespace | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    """GPU with triton, or CPU with the interpreter switched on (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


# ----------------------------------------------------------------------------- jit helpers
def _round_to_fp8_grid(x, FNUZ: tl.constexpr):
    """Round fp32 |x| <= fp8 max to the nearest e4m3 value, ties to even, result still fp32."""
    if FNUZ:
        min_normal = 0.0078125  # 2**-7: e4m3fnuz has exponent bias 8
        quantum = 0.0009765625  # subnormal spacing 2**-10
    else:
        min_normal = 0.015625  # 2**-6
        quantum = 0.001953125  # 2**-9
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # keep 3 mantissa bits: add half an ulp (minus one when the kept lsb is even) and cut;
    # the integer add carries into the exponent, which the interpreter's cast forgets.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    v = a / quantum  # exact: power of two
    t = v.to(tl.int32)
    frac = v - t.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((t & 1) == 1))
    sub = (t + up.to(tl.int32)).to(tl.float32) * quantum
    r = tl.where(a < min_normal, sub, normal)
    r = tl.where(x < 0, -r, r)
    return tl.where(r == 0, 0.0, r)  # never -0: it is the NaN code 0x80 in fnuz


def _round_to_bf16_grid(x):
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)  # NaN passes through


def _cast_out(x, DST: tl.constexpr):
    if DST == tl.bfloat16:  # noqa: SIM300
        x = _round_to_bf16_grid(x)
    return x.to(DST)


def _fp8_bits_to_f16(bits, FNUZ: tl.constexpr):
    """Decode e4m3fn / e4m3fnuz bytes (uint8) to fp16, exactly (e4m3 fits in fp16), NaN codes to NaN.

    fp16, not bf16: the interpreter's tl.dot multiplies bf16 as raw uint16 bits (garbage).
    """
    b = bits.to(tl.int32)
    sign = b >> 7
    e = (b >> 3) & 15
    m = b & 7
    if FNUZ:
        bias = 8
        sub_unit = 0.0009765625
        nan = b == 128
    else:
        bias = 7
        sub_unit = 0.001953125
        nan = (b & 127) == 127
    normal = ((sign << 31) | ((e - bias + 127) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * sub_unit
    sub = tl.where(sign == 1, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    v = tl.where(nan, tl.full(v.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True), v)
    return v.to(tl.float16)


def _fp8_grid_to_bits(r, FNUZ: tl.constexpr):
    """Encode an fp32 value already on the e4m3 grid (see `_round_to_fp8_grid`) as its fp8 byte."""
    if FNUZ:
        bias = 8
        quantum = 0.0009765625
    else:
        bias = 7
        quantum = 0.001953125
    a = tl.abs(r)
    fb = a.to(tl.int32, bitcast=True)
    normal = ((((fb >> 23) - 127 + bias) << 3) | ((fb >> 20) & 7)).to(tl.int32)
    sub = (a / quantum).to(tl.int32)
    code = tl.where(a < 8 * quantum, sub, normal)
    return tl.where(r < 0, code | 128, code).to(tl.uint8)


def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order (Triton matmul tutorial): GROUP_M row-tiles share B tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


def _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c = _cast_out(acc, c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn, c, mask=mask)


# ----------------------------------------------------------------------------- kernels
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, GROUP_K, sxm, sxk, sqm, sqk, ssm, ssg,
                      FP8_MAX: tl.constexpr, FNUZ: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                      ENCODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """One program per (BLOCK_M rows, one K group); per-token mode is one group of width K."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    k_start = g * GROUP_K
    k_end = tl.minimum(k_start + GROUP_K, K)
    mm = offs_m < M
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mm[:, None] & (offs_k < k_end)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    amax = tl.maximum(amax, AMAX_FLOOR)
    # div_rn: correctly rounded on every backend, so scales match torch's `amax / fp8_max` bit for bit
    scale = tl.math.div_rn(amax, tl.full([BLOCK_M], FP8_MAX, tl.float32))
    tl.store(s_ptr + offs_m * ssm + g * ssg, scale, mask=mm)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mm[:, None] & (offs_k < k_end)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=mask, other=0.0)
        y = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_K]))
        y = _round_to_fp8_grid(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), FNUZ)
        if ENCODE:  # no native fp8 on this GPU: q is a uint8 view, store the bytes
            y = _fp8_grid_to_bits(y, FNUZ)
        tl.store(
            q_ptr + offs_m[:, None] * sqm + offs_k[None, :] * sqk, y.to(q_ptr.dtype.element_ty), mask=mask
        )


def _block_scaled(part, as_ptr, bs_ptr, rm, rn, kstart, K, sas0, sas1, sbs0, sbs1,
                  A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    """One K tile's partial product times its 1 x GROUP (a) and GROUP x GROUP (b) block scales.

    A tile that starts past K (the second of two in the last step) reads no scale: its index
    would lie outside the scale grid. The masks are vectors: the interpreter rejects scalar ones.
    """
    kb = kstart // GROUP
    if A_MODE == 2:
        ok = (rm * 0 + kstart) < K
        part = part * tl.load(as_ptr + rm * sas0 + kb * sas1, mask=ok, other=0.0)[:, None]
    if B_MODE == 2:
        ok = (rn * 0 + kstart) < K
        part = part * tl.load(bs_ptr + (rn // GROUP) * sbs0 + kb * sbs1, mask=ok, other=0.0)[None, :]
    return part


def _scaled_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                        sam, sak, sbn, sbk, scm, scn, sas0, sas1, sbs0, sbs1,
                        A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACC_INT: tl.constexpr, DECODE: tl.constexpr,
                        FAST_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, KSTEPS: tl.constexpr):  # fmt: skip
    """C = (A * sa) @ (B * sb)^T for fp8 (fp32 acc) and int8 (int32 acc); modes 0 tensor, 1 row, 2 block.

    Block mode needs GROUP % BLOCK_K == 0 (the wrapper and the config pruner guarantee it), so
    each K tile lies in one scale group and is scaled before it joins the fp32 accumulator;
    KSTEPS=2 issues two tiles' dots before scaling either, so the tensor cores overlap the scaling.
    DECODE: 0 native fp8/int8 operands; 1 / 2: uint8 bits of e4m3fn / e4m3fnuz, decoded to fp16.
    FAST_ACC: let Hopper accumulate fp8 products in its reduced-precision accumulator over the
    whole K (2**30); otherwise promote to fp32 after every BLOCK_K, as block mode does anyway.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols keep every load in bounds; the store is masked
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + rn[:, None] * sbn + offs_k[None, :] * sbk  # [BLOCK_N, BLOCK_K], K contiguous
    if ACC_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * KSTEPS):
        kmask = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        if DECODE != 0:
            a = _fp8_bits_to_f16(a, DECODE == 2)
            b = _fp8_bits_to_f16(b, DECODE == 2)
        if A_MODE == 2 or B_MODE == 2:
            part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
            if KSTEPS == 2:
                k1 = k0 + BLOCK_K
                kmask1 = (k1 + offs_k) < K
                a1 = tl.load(a_ptrs + BLOCK_K * sak, mask=kmask1[None, :], other=0.0)
                b1 = tl.load(b_ptrs + BLOCK_K * sbk, mask=kmask1[None, :], other=0.0)
                if DECODE != 0:
                    a1 = _fp8_bits_to_f16(a1, DECODE == 2)
                    b1 = _fp8_bits_to_f16(b1, DECODE == 2)
                part1 = tl.dot(a1, tl.trans(b1), out_dtype=tl.float32)
            part = _block_scaled(part, as_ptr, bs_ptr, rm, rn, k0, K, sas0, sas1, sbs0, sbs1,
                                 A_MODE, B_MODE, GROUP)  # fmt: skip
            if KSTEPS == 2:
                part += _block_scaled(part1, as_ptr, bs_ptr, rm, rn, k1, K, sas0, sas1, sbs0, sbs1,
                                      A_MODE, B_MODE, GROUP)  # fmt: skip
            acc += part
        elif ACC_INT:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif FAST_ACC or DECODE != 0:
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * KSTEPS * sak
        b_ptrs += BLOCK_K * KSTEPS * sbk
    out = acc.to(tl.float32)
    if A_MODE == 0:
        out = out * tl.load(as_ptr)
    elif A_MODE == 1:
        out = out * tl.load(as_ptr + rm * sas0)[:, None]
    if B_MODE == 0:
        out = out * tl.load(bs_ptr)
    elif B_MODE == 1:
        out = out * tl.load(bs_ptr + rn * sbs0)[None, :]
    _epilogue(out, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _wonly_gemm_kernel(x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, M_BUCKET,
                       sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                       FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DOT_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """Weight-only GEMM: nibbles of w (byte k//2, low nibble = even k) dequantized per tile.

    FORMAT 0: int4 asymmetric, w = (q - zero) * scale; FORMAT 1: mxfp4, w = e2m1(q) * 2**(e - 127).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + rm[:, None] * sxm + offs_k[None, :] * sxk, mask=kmask[None, :], other=0.0)
        byte = tl.load(w_ptr + rn[:, None] * swn + (offs_k // 2)[None, :] * swk, mask=kmask[None, :], other=0)
        q = (byte.to(tl.int32) >> ((offs_k & 1) * 4)[None, :]) & 15
        if GROUP % BLOCK_K == 0:  # one scale per row for the whole tile
            gs = (rn * ssn + (k0 // GROUP) * ssg)[:, None]
            gz = (rn * szn + (k0 // GROUP) * szg)[:, None]
        else:
            gs = rn[:, None] * ssn + (offs_k // GROUP)[None, :] * ssg
            gz = rn[:, None] * szn + (offs_k // GROUP)[None, :] * szg
        if FORMAT == 0:
            w = (q.to(tl.float32) - tl.load(z_ptr + gz).to(tl.float32)) * tl.load(s_ptr + gs)
        else:
            e = tl.load(s_ptr + gs).to(tl.int32)
            scale = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
            idx = q & 7
            ex = idx >> 1
            mant = idx & 1
            mag = ((ex + 126) << 23 | (mant << 22)).to(tl.float32, bitcast=True)  # (1 + m/2) * 2**(ex-1)
            mag = tl.where(ex == 0, mant.to(tl.float32) * 0.5, mag)
            w = tl.where(q >= 8, -mag, mag) * scale.to(tl.float32, bitcast=True)
        w = tl.where(kmask[None, :], w, 0.0)
        if DOT_IEEE:  # fp32 x; or bf16 x in the interpreter, whose bf16 tl.dot is broken:
            # bf16 x bf16 products are exact in fp32, so this equals the GPU's bf16 dot
            wq = _cast_out(w, x.dtype).to(tl.float32)
            acc = tl.dot(x.to(tl.float32), tl.trans(wq), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(_cast_out(w, x.dtype)), acc)
    _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


_HELPERS = (
    "_block_scaled",
    "_round_to_fp8_grid",
    "_round_to_bf16_grid",
    "_cast_out",
    "_fp8_bits_to_f16",
    "_fp8_grid_to_bits",
    "_tile_ids",
    "_epilogue",
)


# ----------------------------------------------------------------------------- configs
def _configs(triton: Any, table: list[tuple[int, ...]], ksteps: bool) -> list[Any]:
    out = []
    for bm, bn, bk, w, s, *ks in table:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        if ksteps:
            meta["KSTEPS"] = ks[0] if ks else 1
        out.append(triton.Config(meta, num_warps=w, num_stages=s))
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); 8-bit operands: BLOCK_K 128 = one fp8 scale group.
# Kept short on purpose: every config is compiled once per kernel variant at the first call.
_TABLE_8BIT = [
    (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 3), (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 4),
    # block mode only (KSTEPS=2: two K tiles' dots in flight before their scales are applied)
    (128, 128, 128, 8, 3, 2), (64, 128, 128, 4, 3, 2), (128, 256, 128, 8, 2, 2),
]  # fmt: skip
_TABLE_16BIT = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 32, 128, 4, 4),
]


def _prune(configs: list[Any], named_args: dict, **kwargs: Any) -> list[Any]:
    """Keep tiles that fit M (no 128-row tiles for M=1, no 16-row ones for M>=1024), and in
    block mode only K tiles that lie inside one scale group."""
    args = {**named_args, **kwargs}
    mb = args["M_BUCKET"]
    block = args.get("A_MODE") == 2 or args.get("B_MODE") == 2

    def fits(c: Any) -> bool:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if c.kwargs.get("KSTEPS", 1) == 2 and not block:
            return False
        return bm <= max(16, mb) and not (mb >= 1024 and bm < 64) and not (block and args["GROUP"] % bk != 0)

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]))]


def _build() -> SimpleNamespace:
    """Decorate the kernel bodies once; autotune only when compiling for a GPU."""
    global _built, tl
    with _lock:
        if _built is not None:
            return _built
        import triton
        import triton.language as language

        tl = language
        g = globals()
        for name in _HELPERS:
            g[name] = triton.jit(g[name])
        interp = _interpreting()
        quant = triton.jit(_quant_act_kernel)
        gemm = triton.jit(_scaled_gemm_kernel)
        wonly = triton.jit(_wonly_gemm_kernel)
        if not interp:
            # short benches: tuning runs once per (M bucket, N, K, modes) and must not stall serving
            bench = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
            prune = {"early_config_prune": _prune}
            gemm = triton.autotune(
                _configs(triton, _TABLE_8BIT, ksteps=True),
                key=["M_BUCKET", "N", "K", "A_MODE", "B_MODE", "GROUP", "DECODE", "ACC_INT", "FAST_ACC"],
                prune_configs_by=prune,
                do_bench=bench,
            )(gemm)
            wonly = triton.autotune(
                _configs(triton, _TABLE_16BIT, ksteps=False),
                key=["M_BUCKET", "N", "K", "FORMAT", "GROUP"],
                prune_configs_by=prune,
                do_bench=bench,
            )(wonly)
        _built = SimpleNamespace(quant=quant, gemm=gemm, wonly=wonly, interp=interp, triton=triton)
        logger.info("triton kernels built (%s)", "interpreter" if interp else "compiled, autotuned")
        return _built


# ----------------------------------------------------------------------------- wrappers
def _fail(msg: str) -> QuantConfigError:
    return QuantConfigError(msg)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ready(*tensors: torch.Tensor | None) -> SimpleNamespace:
    """Build the kernels and check that every tensor sits on one device triton can run on."""
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device
    if any(t.device != dev for t in ts):
        raise _fail(
            f"triton kernels need all tensors on one device, got {sorted({str(t.device) for t in ts})}"
        )
    if dev.type not in ("cpu", "cuda"):
        raise _fail(f"triton kernels run on cuda/rocm or cpu (interpreter), not {dev.type}")
    if dev.type == "cpu" and not _interpreting():
        raise _fail("triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported")
    if dev.type == "cpu":
        import triton.language.standard as std
        from triton.runtime.jit import JITFunction

        if isinstance(std.cdiv, JITFunction):  # tl.max, tl.zeros ... were decorated compiled
            raise _fail(
                "TRITON_INTERPRET=1 was set after triton.language was imported; set it first "
                "(server_shim.quant.linear.load_kernels reloads triton.language for you)"
            )
    k = _build()
    if dev.type == "cpu" and not k.interp:
        raise _fail(
            "triton kernels were already built for the GPU in this process; CPU needs TRITON_INTERPRET=1 first"
        )
    return k


def _fp8_native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tl.dot / fp8 casts run natively; otherwise the kernels see uint8 bits and decode them."""
    if device.type == "cpu":
        return True  # interpreter: loads, casts of exact values and dots are exact for both formats
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        if dtype == torch.float8_e4m3fnuz:
            return "gfx94" in arch
        return "gfx95" in arch or "gfx12" in arch
    return dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability(device) >= (8, 9)


def _scale_strides(
    s: torch.Tensor, mode: int, rows: int, groups: int, name: str, strides: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Validate a scale tensor for its mode and return the (row, group) strides the kernel reads with."""
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise _fail(f"{name} must be a float32 tensor, got {getattr(s, 'dtype', type(s))}")
    if mode == 0:
        if s.numel() != 1:
            raise _fail(f"{name}: tensor mode needs 1 scale, got shape {tuple(s.shape)}")
        return 0, 0
    if mode == 1:
        if s.numel() != rows or s.dim() not in (1, 2):
            raise _fail(f"{name}: row mode needs [{rows}, 1] scales, got {tuple(s.shape)}")
        return s.stride(0), 0
    if strides is None:
        if tuple(s.shape) != (rows, groups):
            raise _fail(f"{name}: block mode needs [{rows}, {groups}] scales, got {tuple(s.shape)}")
        strides = (s.stride(0), s.stride(1))
    s0, s1 = int(strides[0]), int(strides[1])
    # an injected layout fault may swap strides; it must read wrong scales, never out of bounds
    avail = s.untyped_storage().nbytes() // s.element_size() - s.storage_offset()
    if s0 < 0 or s1 < 0 or (rows - 1) * s0 + (groups - 1) * s1 >= avail:
        raise _fail(
            f"{name}: strides {(s0, s1)} read past the {avail} stored scales of a {rows}x{groups} grid"
        )
    return s0, s1


def _launch(
    k: SimpleNamespace,
    kern: Any,
    M: int,
    N: int,
    args: tuple,
    meta: dict,
    cpu_bk: int,
    cpu_extra: dict | None = None,
) -> None:
    if k.interp:  # small fixed tiles: the interpreter's cost is per program and per op
        bm, bn = min(max(_next_pow2(M), 16), 64), min(max(_next_pow2(N), 16), 128)
        grid = (_cdiv(M, bm) * _cdiv(N, bn),)
        kern[grid](*args, **meta, **(cpu_extra or {}), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cpu_bk, GROUP_M=8)
    else:
        grid = lambda cfg: (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
        kern[grid](*args, **meta)


def _out(
    M: int, N: int, out_dtype: torch.dtype, bias: torch.Tensor | None, dev: torch.device
) -> torch.Tensor:
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise _fail(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != N or not bias.is_floating_point()):
        raise _fail(f"bias must be a float vector of {N}, got {tuple(bias.shape)} {bias.dtype}")
    return torch.empty(M, N, dtype=out_dtype, device=dev)


def _empty_result(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out.zero_()
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def _check_2d(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in dtypes:
        raise _fail(f"{name} must be a 2-D tensor of {[str(d) for d in dtypes]}, got "
                    f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t))}")  # fmt: skip


def quantize_act_fp8(
    x: torch.Tensor, *, group: int | None, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 quantization of activations [M, K]: per token (group None) or per 1 x group.

    scale = max(amax, 1e-12) / fp8_max (fp32, correctly rounded), q = rne(clamp(x / scale)):
    returns (q [M, K] in fp8_dtype, scale [M, 1] or [M, ceil(K / group)] row-major).
    """
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    if fp8_dtype not in FP8_MAX:
        raise _fail(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    if group is not None and group <= 0:
        raise _fail(f"group must be positive or None, got {group}")
    k = _ready(x)
    M, K = x.shape
    gk = K if group is None else int(group)
    G = 1 if group is None else _cdiv(K, gk)
    q = torch.empty(M, K, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(M, G, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, scale.fill_(AMAX_FLOOR / FP8_MAX[fp8_dtype])
    native = _fp8_native(x.device, fp8_dtype)
    if k.interp:
        bm, bk = min(_next_pow2(M), 64), min(_next_pow2(gk), 4096)
    else:
        bm, bk = (4, min(_next_pow2(gk), 1024)) if group is None else (16, min(_next_pow2(gk), 256))
    qv = q if native else q.view(torch.uint8)
    k.quant[(_cdiv(M, bm), G)](
        x, qv, scale, M, K, gk, x.stride(0), x.stride(1), qv.stride(0), qv.stride(1), scale.stride(0), scale.stride(1),
        FP8_MAX=FP8_MAX[fp8_dtype], FNUZ=fp8_dtype == torch.float8_e4m3fnuz, AMAX_FLOOR=AMAX_FLOOR,
        ENCODE=not native, BLOCK_M=bm, BLOCK_K=bk,
    )  # fmt: skip
    return q, scale


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    a_scale_mode: str,
    b_scale_mode: str,
    b_scale_strides: tuple[int, int] | None = None,
    block: int = 128,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, N] = (a * a_scale) @ (b * b_scale)^T with fp32 accumulation; a [M, K], b [N, K] fp8.

    Block mode: a_scale [M, ceil(K/block)] (1 x block groups), b_scale element (nb, kb) read at
    nb * s0 + kb * s1 with (s0, s1) = b_scale_strides or b_scale.stride().
    """
    _check_2d("a", a, tuple(FP8_MAX))
    _check_2d("b", b, (a.dtype,))
    if a.shape[1] != b.shape[1]:
        raise _fail(f"K mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if a_scale_mode not in _SCALE_MODES or b_scale_mode not in _SCALE_MODES:
        raise _fail(
            f"scale modes must be one of {list(_SCALE_MODES)}, got {a_scale_mode!r}, {b_scale_mode!r}"
        )
    am, bmode = _SCALE_MODES[a_scale_mode], _SCALE_MODES[b_scale_mode]
    if 2 in (am, bmode) and (block < 16 or block & (block - 1)):
        raise _fail(f"block must be a power of two >= 16, got {block}")
    k = _ready(a, a_scale, b, b_scale, bias)
    (M, K), N = a.shape, b.shape[0]
    kg = _cdiv(K, block)
    sa = _scale_strides(a_scale, am, M, kg, "a_scale")
    sb = _scale_strides(b_scale, bmode, _cdiv(N, block) if bmode == 2 else N, kg, "b_scale", b_scale_strides)
    out = _out(M, N, out_dtype, bias, a.device)
    if M == 0 or N == 0 or K == 0:
        return _empty_result(out, bias)
    native = _fp8_native(a.device, a.dtype)
    decode = 0 if native else (2 if a.dtype == torch.float8_e4m3fnuz else 1)
    av, bv = (a, b) if native else (a.view(torch.uint8), b.view(torch.uint8))
    args = (av, bv, out, a_scale, b_scale, bias if bias is not None else out, M, N, K, min(_next_pow2(M), 4096),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), *sa, *sb)  # fmt: skip
    meta = dict(A_MODE=am, B_MODE=bmode, GROUP=block, HAS_BIAS=bias is not None, ACC_INT=False, DECODE=decode,
                FAST_ACC=FP8_FAST_ACCUM)  # fmt: skip
    # the interpreter runs the two-tile (KSTEPS=2) block loop, so CPU tests cover that path too
    _launch(
        k,
        k.gemm,
        M,
        N,
        args,
        meta,
        cpu_bk=min(block, 128),
        cpu_extra={"KSTEPS": 2 if 2 in (am, bmode) else 1},
    )
    return out


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """w8a8: a int8 [M, K] per-token a_scale [M, 1], b int8 [N, K] per-channel b_scale [N, 1]; int32 acc."""
    _check_2d("a", a, (torch.int8,))
    _check_2d("b", b, (torch.int8,))
    if a.shape[1] != b.shape[1]:
        raise _fail(f"K mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    k = _ready(a, a_scale, b, b_scale, bias)
    (M, K), N = a.shape, b.shape[0]
    sa = _scale_strides(a_scale, 1, M, 1, "a_scale")
    sb = _scale_strides(b_scale, 1, N, 1, "b_scale")
    out = _out(M, N, out_dtype, bias, a.device)
    if M == 0 or N == 0 or K == 0:
        return _empty_result(out, bias)
    args = (a, b, out, a_scale, b_scale, bias if bias is not None else out, M, N, K, min(_next_pow2(M), 4096),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), *sa, *sb)  # fmt: skip
    meta = dict(
        A_MODE=1, B_MODE=1, GROUP=128, HAS_BIAS=bias is not None, ACC_INT=True, DECODE=0, FAST_ACC=False
    )
    _launch(k, k.gemm, M, N, args, meta, cpu_bk=128, cpu_extra={"KSTEPS": 1})
    return out


def _wonly(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    fmt: int,
    group: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    _check_2d("qweight", qweight, (torch.uint8,))
    (M, K), N = x.shape, qweight.shape[0]
    G = _cdiv(K, group)
    if qweight.shape[1] != _cdiv(K, 2):
        raise _fail(
            f"qweight must be [N, ceil(K/2)] = [{N}, {_cdiv(K, 2)}] packed nibbles, got {tuple(qweight.shape)}"
        )
    want = (torch.float32,) if fmt == 0 else (torch.uint8,)
    _check_2d("scales", scales, want)
    if tuple(scales.shape) != (N, G):
        raise _fail(f"scales must be [{N}, {G}] (one per {group} inputs), got {tuple(scales.shape)}")
    if zeros is not None:
        _check_2d("zeros", zeros, (torch.uint8, torch.float32))
        if tuple(zeros.shape) != (N, G):
            raise _fail(f"zeros must be [{N}, {G}], got {tuple(zeros.shape)}")
    k = _ready(x, qweight, scales, zeros, bias)
    out = _out(M, N, out_dtype, bias, x.device)
    if M == 0 or N == 0 or K == 0:
        return _empty_result(out, bias)
    z = zeros if zeros is not None else scales
    args = (x, qweight, out, scales, z, bias if bias is not None else out, M, N, K, min(_next_pow2(M), 4096),
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1),
            scales.stride(0), scales.stride(1), z.stride(0), z.stride(1))  # fmt: skip
    # the interpreter multiplies bf16 operands as raw bits: route bf16 through an exact fp32 dot there
    dot_ieee = x.dtype == torch.float32 or (k.interp and x.dtype == torch.bfloat16)
    meta = dict(FORMAT=fmt, GROUP=group, HAS_BIAS=bias is not None, DOT_IEEE=dot_ieee)
    _launch(k, k.wonly, M, N, args, meta, cpu_bk=128)
    return out


def int4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    group: int = 128,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int4: qweight uint8 [N, K//2] (low nibble = even k), w = (q - zero) * scale per group."""
    if group <= 0:
        raise _fail(f"group must be positive, got {group}")
    return _wonly(x, qweight, scales, zeros, fmt=0, group=int(group), out_dtype=out_dtype, bias=bias)


def mxfp4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_e8m0: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only MXFP4: e2m1 nibbles (bit 3 = sign) times 2**(e - 127), one uint8 exponent per 32."""
    return _wonly(x, qweight, scales_e8m0, None, fmt=1, group=32, out_dtype=out_dtype, bias=bias)
