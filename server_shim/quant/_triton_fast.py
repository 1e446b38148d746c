"""The fast Triton kernel bodies (the default path), as plain functions: this module imports no triton.

kernels._build() binds `tl` here and decorates these bodies and the helpers shared with
_triton_kernels.py (the legacy bodies, still selectable with DIFFTEST_TRITON_KERNELS=legacy).
Every kernel takes its tile sizes as constexprs from quant/tuning.py, which picks one config per
(kernel, M bucket, N, K, variant) by timing a short list once and caching the choice.

What makes them faster than the legacy bodies (numbers: bench/gemm.py on an H200):
- Split-K (`K_PER`, program_id(1)): small-M shapes get enough programs to keep HBM busy. The
  reduction is a second, deterministic pass (`_splitk_reduce_kernel` sums the partials in split
  order), never atomics: the same input gives the same bits on every run.
- Block-scaled fp8 (DeepSeek-V3): one K tile lies inside one 128-group, so its fp32 partial is
  scaled once (`acc += dot * s`); the weight-block scale is a scalar per tile when BLOCK_N divides
  128, and activation scales are written M-contiguous by the quantization kernel (coalesced).
- 4-bit weights: whole [BLOCK_N, BLOCK_K/2] byte tiles are unpacked with shifts and masks; the
  low nibbles (even k) and high nibbles (odd k) feed two dots against the even and odd columns of
  x, so no interleave is needed in the hot loop. For large M, `_wonly_dequant_kernel` expands
  the weight once to x's dtype (`tl.interleave` keeps the stores contiguous) and `_mm16_kernel`
  runs a plain tensor-core GEMM on it.
Numerics are those of the legacy bodies: fp32 accumulation (int32 for int8), fp8 products
promoted to fp32 every BLOCK_K (FAST_ACC off), 4-bit weights dequantized in fp32 and rounded once
to x's dtype; see _triton_kernels.py's docstring for the interpreter workarounds they share.
"""

from __future__ import annotations

from typing import Any

# bound to triton.language by kernels._build(); the shared helpers (_cast_out, _epilogue, _tile_ids,
# _fp8_bits_to_f16) are set on this module by _build() too, decorated once for both modules
tl: Any = None
_cast_out: Any = None
_epilogue: Any = None
_tile_ids: Any = None
_fp8_bits_to_f16: Any = None

SHARED = ("_cast_out", "_epilogue", "_tile_ids", "_fp8_bits_to_f16")


# ----------------------------------------------------------------------------- jit helpers
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


def _b_block_scale(bs_ptr, rn, pid_n, kb, sbs0, sbs1, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The weight-block scales of K group `kb` for this tile's columns: a scalar when GROUP %
    BLOCK_N == 0 (the tile lies in one block; its first column is < N even when it wraps), else
    [1, BLOCK_N]."""
    if GROUP % BLOCK_N == 0:
        sb = tl.load(bs_ptr + ((pid_n * BLOCK_N) // GROUP) * sbs0 + kb * sbs1)
    else:
        sb = tl.load(bs_ptr + (rn // GROUP) * sbs0 + kb * sbs1)[None, :]
    return sb


def _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N):
    """Write one split's partial [BM, BN] to the workspace [SPLIT, M, N] (contiguous)."""
    base = ws_ptr + pid_k.to(tl.int64) * M * N
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def _e8m0_to_f32(e):
    e = e.to(tl.int32)
    bits = tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23))
    return bits.to(tl.float32, bitcast=True)


def _e2m1_to_f32(q):
    """4-bit e2m1 code (bit 3 = sign) -> fp32, by bit assembly, no int-to-float conversion (a
    quarter-rate instruction): magnitude code i >= 2 is (i << 22) + bits(0.5), i.e. exponent
    i >> 1, mantissa i & 1; codes 0 and 1 (0 and the subnormal 0.5) are patched in."""
    idx = q & 7
    bits = (idx << 22) + 0x3F000000
    bits = tl.where(idx < 2, (0 - idx) & 0x3F000000, bits)
    return (bits | ((q & 8) << 28)).to(tl.float32, bitcast=True)


def _nibble_f32(v):
    """An integer 0..15 -> fp32 without a conversion instruction: 2**23 + v, minus 2**23 (exact)."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


def _to_operand(x, DST: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 -> the dot operand dtype, round to nearest even. The hardware cast does that on a GPU;
    the interpreter's cast does not (see _triton_kernels.py), so there the rounding is emulated."""
    if EMULATE_RNE:  # noqa: SIM108 - a statement-level constexpr branch compiles on every triton
        x = _cast_out(x, DST)
    else:
        x = x.to(DST)
    return x


def _dequant_pair(byte, s_ptr, z_ptr, rn, ke, k0, ssn, ssg, szn, szg,
                  FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """One [BN, BK/2] byte tile -> (w at even k, w at odd k), fp32. GROUP is even, so a byte's two
    nibbles share a group. `ke` are the even k of the tile, clamped into range by the caller.
    int4: (q - zero) * scale in fp32, the reference's own two roundings, so bit-identical to it."""
    b = byte.to(tl.int32)
    lo = b & 15
    hi = (b >> 4) & 15
    if GROUP % BLOCK_K == 0:  # the whole tile in one group: one scale per row
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * ssn + g * ssg)[:, None]
        if FORMAT == 0:
            z = tl.load(z_ptr + rn * szn + g * szg).to(tl.float32)[:, None]
    else:
        g = (ke // GROUP)[None, :]
        s = tl.load(s_ptr + rn[:, None] * ssn + g * ssg)
        if FORMAT == 0:
            z = tl.load(z_ptr + rn[:, None] * szn + g * szg).to(tl.float32)
    if FORMAT == 0:
        s = s.to(tl.float32)
        we = (_nibble_f32(lo) - z) * s
        wo = (_nibble_f32(hi) - z) * s
    else:
        sc = _e8m0_to_f32(s)
        we = _e2m1_to_f32(lo) * sc
        wo = _e2m1_to_f32(hi) * sc
    return we, wo


# ----------------------------------------------------------------------------- kernels
def _mm8_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, K_PER,
                sam, sak, sbn, sbk, scm, scn, sas0, sas1, sbs0, sbs1,
                A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACC_INT: tl.constexpr, DECODE: tl.constexpr, FAST_ACC: tl.constexpr,
                SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """C = (A * sa) @ (B * sb)^T, fp8 (fp32 acc) or int8 (int32 acc); modes 0 tensor, 1 row, 2 block.

    program_id(1) is the K split: it covers [pid_k * K_PER, +K_PER) (K_PER a multiple of
    BLOCK_K, and of GROUP in block mode); with SPLIT_OUT it writes its unscaled (tensor/row) or
    block-scaled partial to ws for `_splitk_reduce_kernel`, else it finishes the tile itself.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols keep every load in bounds; the stores are masked
    rn = offs_n % N
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * sam + (k_lo + offs_k)[None, :] * sak
    b_ptrs = b_ptr + rn[:, None] * sbn + (k_lo + offs_k)[None, :] * sbk  # [BLOCK_N, BLOCK_K], K contiguous
    if ACC_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # block scales of the first K step; each step then loads the next step's before it uses its
    # own (Triton's pipeliner stages only the dot operands' loads: this hides the scales' latency).
    # a's and b's are carried apart: their [BM, BN] product would double the tile's registers.
    if A_MODE == 2:
        sa = tl.load(as_ptr + rm * sas0 + (k_lo // GROUP) * sas1)[:, None]
    if B_MODE == 2:
        sb = _b_block_scale(bs_ptr, rn, pid_n, k_lo // GROUP, sbs0, sbs1, GROUP, BLOCK_N)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        if DECODE != 0:
            a = _fp8_bits_to_f16(a, DECODE == 2)
            b = _fp8_bits_to_f16(b, DECODE == 2)
        if A_MODE == 2 or B_MODE == 2:
            part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
            kn = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP  # the last step reloads a valid group, unused
            if A_MODE == 2:
                sa_next = tl.load(as_ptr + rm * sas0 + kn * sas1)[:, None]
            if B_MODE == 2:
                sb_next = _b_block_scale(bs_ptr, rn, pid_n, kn, sbs0, sbs1, GROUP, BLOCK_N)
            if A_MODE == 2 and B_MODE == 2:
                acc += part * (sa * sb)
            elif A_MODE == 2:
                acc += part * sa
            else:
                acc += part * sb
            if A_MODE == 2:
                sa = sa_next
            if B_MODE == 2:
                sb = sb_next
        elif ACC_INT:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif FAST_ACC or DECODE != 0:
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    if SPLIT_OUT:
        _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N)
    else:
        out = _scale_out(acc, as_ptr, bs_ptr, rm, rn, sas0, sbs0, A_MODE, B_MODE)
        _epilogue(out, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _splitk_reduce_kernel(ws_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, SPLIT, scm, scn, sas0, sbs0,
                          A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          ACC_INT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Sum the SPLIT partials in split order (deterministic), then the tensor/row scales, bias, cast.

    int8 partials are int32 and sum exactly; mode 2 means "already scaled" (block, weight-only).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    if ACC_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0)
        ptrs += M * N  # pointer arithmetic is 64-bit: no int32 overflow of split * M * N
    out = _scale_out(acc, as_ptr, bs_ptr, offs_m % M, offs_n % N, sas0, sbs0, A_MODE, B_MODE)
    _epilogue(out, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _wonly_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                  sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                  FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                  EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """Weight-only GEMM/GEMV, 4-bit weights (byte k//2, low nibble = even k) unpacked per tile.

    FORMAT 0: int4 asymmetric, w = (q - zero) * scale; FORMAT 1: mxfp4, w = e2m1(q) * 2**(e - 127).
    x's even and odd columns meet the low and high nibbles in two dots of BLOCK_K/2 each. Split-K
    as in `_mm8_kernel` (K_PER a multiple of BLOCK_K and of GROUP when GROUP >= BLOCK_K).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_j = tl.arange(0, BLOCK_K // 2)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_ptrs = x_ptr + rm[:, None] * sxm + (k_lo + 2 * offs_j)[None, :] * sxk
    w_ptrs = w_ptr + rn[:, None] * swn + (k_lo // 2 + offs_j)[None, :] * swk
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ke = k0 + 2 * offs_j
        if EVEN_K:
            xe = tl.load(x_ptrs)
            xo = tl.load(x_ptrs + sxk)
            byte = tl.load(w_ptrs)
            we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, ke, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
        else:
            xe = tl.load(x_ptrs, mask=(ke < K)[None, :], other=0.0)
            xo = tl.load(x_ptrs + sxk, mask=(ke + 1 < K)[None, :], other=0.0)
            byte = tl.load(w_ptrs, mask=(ke < K)[None, :], other=0)
            kc = tl.minimum(ke, K - 1)  # the tail's scale index stays inside the group grid
            we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, kc, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
            we = tl.where((ke < K)[None, :], we, 0.0)
            wo = tl.where((ke + 1 < K)[None, :], wo, 0.0)
        we = _to_operand(we, xe.dtype, EMULATE_RNE)
        wo = _to_operand(wo, xo.dtype, EMULATE_RNE)
        if DOT_IEEE:  # fp32 x; or bf16 x in the interpreter, whose bf16 tl.dot is broken
            acc = tl.dot(xe.to(tl.float32), tl.trans(we.to(tl.float32)), acc, input_precision="ieee")
            acc = tl.dot(xo.to(tl.float32), tl.trans(wo.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xe, tl.trans(we), acc)
            acc = tl.dot(xo, tl.trans(wo), acc)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += (BLOCK_K // 2) * swk
    if SPLIT_OUT:
        _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N)
    else:
        _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _wonly_dequant_kernel(w_ptr, s_ptr, z_ptr, o_ptr, N, K, swn, swk, ssn, ssg, szn, szg, son, sok,
                          FORMAT: tl.constexpr, GROUP: tl.constexpr, EMULATE_RNE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Expand 4-bit weights [N, K/2] to o [N, K] in o's dtype (the large-M path's first pass)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_j = tl.arange(0, BLOCK_K // 2)
    ke = k0 + 2 * offs_j
    rn = offs_n % N
    kc = tl.minimum(ke, K - 1)
    byte = tl.load(w_ptr + rn[:, None] * swn + (kc // 2)[None, :] * swk)
    we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, kc, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
    # [BN, BK], even k first
    w = tl.interleave(_to_operand(we, o_ptr.dtype.element_ty, EMULATE_RNE),
                      _to_operand(wo, o_ptr.dtype.element_ty, EMULATE_RNE))  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(o_ptr + offs_n[:, None] * son + offs_k[None, :] * sok, w, mask=mask)


def _mm16_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, sam, sak, sbn, sbk, scm, scn,
                 HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):  # fmt: skip
    """C = A @ B^T for 16/32-bit A [M, K] and B [N, K] (the dequantized weight), fp32 accumulation."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + rn[:, None] * sbn + offs_k[None, :] * sbk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


HELPERS = ("_scale_out", "_b_block_scale", "_split_store", "_e8m0_to_f32", "_e2m1_to_f32", "_nibble_f32",
           "_to_operand", "_dequant_pair")  # fmt: skip
PLAIN_HELPERS = {name: globals()[name] for name in HELPERS}
KERNELS = ("_mm8_kernel", "_splitk_reduce_kernel", "_wonly_kernel", "_wonly_dequant_kernel", "_mm16_kernel")
