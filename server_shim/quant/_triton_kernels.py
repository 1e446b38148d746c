"""The Triton kernel bodies behind kernels.py, as plain functions: this module imports no triton.

kernels._build() binds `tl` here and decorates the HELPERS in this module's namespace (where the
kernel bodies look them up when they compile), then the three kernels, on first use; kernels.py
says why that must wait. PLAIN_HELPERS keeps the undecorated helpers, so a rebuild after
quant/linear.py reloads kernels.py (a compiled build, then CPU tensors) decorates them afresh.
The autotune tables and the config pruner live here too: they describe these kernels' tiles.
The kernel names are unchanged from when they lived in kernels.py: they name the Triton kernels
in traces and in the compile cache.


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

from typing import Any

tl: Any = None  # bound to triton.language by kernels._build(); the kernel bodies resolve it at compile time


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
    """This program's output tile, in `_tile_of`'s grouped order."""
    return _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile number pid -> (row tile, column tile) in grouped order (Triton matmul tutorial): GROUP_M
    row-tiles share B tiles in L2. A persistent kernel walks its tile numbers through this too."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


def _scale_out(acc, as_ptr, bs_ptr, rm, rn, sas0, sbs0, A_MODE: tl.constexpr, B_MODE: tl.constexpr):
    """Tensor (0) / row (1) scales after the K loop; block (2) scales were applied per K tile."""
    out = acc.to(tl.float32)
    if A_MODE == 0:
        out = out * tl.load(as_ptr)
    elif A_MODE == 1:
        out = out * tl.load(as_ptr + rm * sas0)[:, None]
    if B_MODE == 0:
        out = out * tl.load(bs_ptr)
    elif B_MODE == 1:
        out = out * tl.load(bs_ptr + rn * sbs0)[None, :]
    return out


def _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c = _cast_out(acc, c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn, c, mask=mask)


# ----------------------------------------------------------------------------- kernels
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, GROUP_K, sxm, sxk, sqm, sqk, ssm, ssg,
                      FP8_MAX: tl.constexpr, FNUZ: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                      ENCODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      INT8: tl.constexpr = False):  # fmt: skip
    """One program per (BLOCK_M rows, one K group); per-token mode is one group of width K.
    INT8: q = rne(clamp(x / scale, -FP8_MAX, FP8_MAX)) as int8 (FP8_MAX is then 127), torch's
    `round(x / s).clamp(-127, 127)`: the bounds are integers, so clamping first changes nothing."""
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
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        if INT8:  # noqa: SIM108 - a constexpr branch: Triton compiles only the taken side
            # round half to even: adding 1.5 * 2**23 leaves no fraction bits in fp32 (|y| <= 127)
            y = (y + 12582912.0) - 12582912.0
        else:
            y = _round_to_fp8_grid(y, FNUZ)
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
    out = _scale_out(acc, as_ptr, bs_ptr, rm, rn, sas0, sbs0, A_MODE, B_MODE)
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
        else:  # a group past K (the tail tile's masked k): the last one, not past the scales' end
            gk = tl.minimum(offs_k // GROUP, (K - 1) // GROUP)[None, :]
            gs = rn[:, None] * ssn + gk * ssg
            gz = rn[:, None] * szn + gk * szg
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


HELPERS = (
    "_block_scaled",
    "_round_to_fp8_grid",
    "_round_to_bf16_grid",
    "_cast_out",
    "_fp8_bits_to_f16",
    "_fp8_grid_to_bits",
    "_tile_ids",
    "_tile_of",
    "_epilogue",
    "_scale_out",
)
# the undecorated helpers, captured before any _build() rebinds the names above
PLAIN_HELPERS = {name: globals()[name] for name in HELPERS}


# ----------------------------------------------------------------------------- configs
def configs(triton: Any, table: list[tuple[int, ...]], ksteps: bool) -> list[Any]:
    out = []
    for bm, bn, bk, w, s, *ks in table:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        if ksteps:
            meta["KSTEPS"] = ks[0] if ks else 1
        out.append(triton.Config(meta, num_warps=w, num_stages=s))
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); 8-bit operands: BLOCK_K 128 = one fp8 scale group.
# Kept short on purpose: every config is compiled once per kernel variant at the first call.
TABLE_8BIT = [
    (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 3), (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 4),
    # block mode only (KSTEPS=2: two K tiles' dots in flight before their scales are applied)
    (128, 128, 128, 8, 3, 2), (64, 128, 128, 4, 3, 2), (128, 256, 128, 8, 2, 2),
]  # fmt: skip
TABLE_16BIT = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 32, 128, 4, 4),
]


def prune(configs: list[Any], named_args: dict, **kwargs: Any) -> list[Any]:
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
