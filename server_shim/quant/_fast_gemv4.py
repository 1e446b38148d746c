"""The fast 4-bit GEMVs (M = 1): group tiles (`_gemv4g_kernel`), word tiles (`_gemv4w_kernel`,
`_gemv4x_kernel`), and one weight row per program with the products factored (`_gemv4r_kernel`:
"gemvr" / "gemvf").

Plain bodies: _triton_fast.bind() makes them kernels.
"""

from __future__ import annotations

# placeholders and plain helpers, each rebound here by bind()
from server_shim.quant._fast_common import (
    E2M1_F16,
    F16_PAIR_TO_F32,
    _dequant_pair,
    _e2m1_to_f32,
    _e2m1_to_f32_h,
    _e8m0_to_f32,
    _gemv_place,
    _gemv_store,
    _to_operand,
    tl,
)


def _gemv4_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                  sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                  FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The M = 1 form of `_wonly_kernel` (same arguments, same split-K contract): no tl.dot.

    Grid and loop as `_gemv8_kernel`: each program reads its BLOCK_N packed weight rows once
    ([BLOCK_N, BLOCK_K/2] bytes per step, K contiguous, the next step's bytes prefetched),
    dequantizes them as `_dequant_pair` does (rounded once to x's dtype, as the reference), and
    accumulates their products with the activation row's even and odd columns elementwise.
    """
    row, pid_k, offs_n, rn, k_lo, k_hi = _gemv_place(N, K, K_PER, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)
    w_rows = w_ptr + rn[:, None] * swn
    x_row = x_ptr + row * sxm
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    ke = k_lo + 2 * offs_j
    # byte offsets as (scalar // 2) + arange: provably contiguous, so the loads are vectorized
    if EVEN_K:  # noqa: SIM108
        byte = tl.load(w_rows + (k_lo // 2 + offs_j)[None, :] * swk)
    else:
        byte = tl.load(w_rows + (k_lo // 2 + offs_j)[None, :] * swk, mask=(ke < K)[None, :], other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ke = k0 + 2 * offs_j
        if EVEN_K:
            kn = tl.minimum(k0 + BLOCK_K, K - BLOCK_K)
            byte_next = tl.load(w_rows + (kn // 2 + offs_j)[None, :] * swk)
            xe = tl.load(x_row + ke * sxk).to(tl.float32)
            xo = tl.load(x_row + (ke + 1) * sxk).to(tl.float32)
            we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, ke, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
        else:
            kn = k0 + BLOCK_K + 2 * offs_j
            byte_next = tl.load(w_rows + ((k0 + BLOCK_K) // 2 + offs_j)[None, :] * swk, mask=(kn < K)[None, :],
                                other=0)  # fmt: skip
            xe = tl.load(x_row + ke * sxk, mask=ke < K, other=0.0).to(tl.float32)
            xo = tl.load(x_row + (ke + 1) * sxk, mask=ke + 1 < K, other=0.0).to(tl.float32)
            kc = tl.minimum(ke, K - 1)
            we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, kc, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
            we = tl.where((ke < K)[None, :], we, 0.0)
            wo = tl.where((ke + 1 < K)[None, :], wo, 0.0)
        we = _to_operand(we, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
        wo = _to_operand(wo, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
        acc += we * xe[None, :] + wo * xo[None, :]
        byte = byte_next
    _gemv_store(tl.sum(acc, axis=1), c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, SPLIT_OUT,
                HAS_BIAS)  # fmt: skip


def _gemv4g_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                   sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """`_gemv4_kernel` (same arguments and split-K contract) on group-shaped tiles: cheaper unpacking.

    The K tile is BLOCK_K / GROUP whole scale groups (BLOCK_K % GROUP == 0, GROUP a power of two):
    bytes are loaded as [BLOCK_N, groups, GROUP/2], so each row's scale (and zero) is a
    [BLOCK_N, groups, 1] value that broadcasts along the last axis in registers -- no per-byte
    gather and no reshape of a broadcast (which costs a trip through shared memory).
    int4: the weight is dequantized and rounded to x's dtype per element as `_dequant_pair` does
    (the reference's numerics), accumulated elementwise, reduced once at the end.
    mxfp4: a weight is e2m1(q) * 2**e exactly in any 16-bit dtype, so no rounding step: the cheap
    decode (`_e2m1_to_f32_h`, the value times 2**-14), a multiply by the group's 2**(e - 127) and
    an FMA per element; the 2**14 is multiplied back once per output (exact: a power of two; a
    per-step sum over each group instead costs shuffles, a group spanning several threads).
    Both accumulate elementwise and reduce once at the end.
    """
    row, pid_k, offs_n, rn, k_lo, k_hi = _gemv_place(N, K, K_PER, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    jb = offs_g[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]  # [groups, GROUP/2] byte index
    w_rows = w_ptr + rn[:, None, None] * swn
    x_row = x_ptr + row * sxm
    s_rows = s_ptr + rn[:, None] * ssn
    z_rows = z_ptr + rn[:, None] * szn
    acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP, GROUP // 2], dtype=tl.float32)
    ke = (k_lo + 2 * jb)[None, :, :]
    if EVEN_K:  # noqa: SIM108
        byte = tl.load(w_rows + (k_lo // 2 + jb)[None, :, :] * swk)
    else:
        byte = tl.load(w_rows + (k_lo // 2 + jb)[None, :, :] * swk, mask=ke < K, other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ke = (k0 + 2 * jb)[None, :, :]
        gi = k0 // GROUP + offs_g
        if EVEN_K:
            kn = tl.minimum(k0 + BLOCK_K, K - BLOCK_K)
            byte_next = tl.load(w_rows + (kn // 2 + jb)[None, :, :] * swk)
            xe = tl.load(x_row + ke * sxk).to(tl.float32)
            xo = tl.load(x_row + (ke + 1) * sxk).to(tl.float32)
        else:
            kn = k0 + BLOCK_K + 2 * jb[None, :, :]
            byte_next = tl.load(w_rows + ((k0 + BLOCK_K) // 2 + jb)[None, :, :] * swk, mask=kn < K, other=0)
            xe = tl.load(x_row + ke * sxk, mask=ke < K, other=0.0).to(tl.float32)
            xo = tl.load(x_row + (ke + 1) * sxk, mask=ke + 1 < K, other=0.0).to(tl.float32)
            gi = tl.minimum(gi, (K - 1) // GROUP)  # a group past K: a valid one, its x are 0
        b = byte.to(tl.int32)
        lo = b & 15
        hi = (b >> 4) & 15
        s = tl.load(s_rows + gi[None, :] * ssg)
        if FORMAT == 0:
            s3 = s.to(tl.float32)[:, :, None]
            zb = (tl.load(z_rows + gi[None, :] * szg).to(tl.float32) + 8388608.0)[:, :, None]
            we = ((lo | 0x4B000000).to(tl.float32, bitcast=True) - zb) * s3
            wo = ((hi | 0x4B000000).to(tl.float32, bitcast=True) - zb) * s3
            if not EVEN_K:
                we = tl.where(ke < K, we, 0.0)
                wo = tl.where(ke + 1 < K, wo, 0.0)
            we = _to_operand(we, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
            wo = _to_operand(wo, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
            acc = acc + we * xe + wo * xo  # two FMAs, not a multiply, an FMA and an add
        else:
            sc = _e8m0_to_f32(s)[:, :, None]
            if E2M1_F16:
                acc += (_e2m1_to_f32_h(lo) * xe + _e2m1_to_f32_h(hi) * xo) * sc
            else:
                acc += (_e2m1_to_f32(lo) * xe + _e2m1_to_f32(hi) * xo) * sc
        byte = byte_next
    _gemv4_store(
        acc, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, FORMAT, SPLIT_OUT, HAS_BIAS
    )


def _gemv4_store(acc, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, FORMAT: tl.constexpr,
                 SPLIT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """A group-shaped tile's [BLOCK_N, groups, words] sums reduced to its outputs and stored
    (mxfp4 decoded through fp16 bits: times the 2**14 those leave out, once per output)."""
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if FORMAT == 1 and E2M1_F16:
        out = out * 16384.0
    _gemv_store(out, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, SPLIT_OUT, HAS_BIAS)


def _gemv4w_words(w_rows, k0, jw, K, swk, EVEN_K: tl.constexpr):
    """The int32 words of K step k0 ([BLOCK_N, groups, GROUP/8]); past K: 0 (EVEN_K: never)."""
    if EVEN_K:
        return tl.load(w_rows + (k0 // 8 + jw)[None, :, :] * swk)
    return tl.load(w_rows + (k0 // 8 + jw)[None, :, :] * swk, mask=(k0 + 8 * jw)[None, :, :] < K, other=0)


def _gemv4w_x(x_row, k, inside, sxk, EVEN_K: tl.constexpr):
    """x at k as float32, 0 where not `inside` (EVEN_K: every k is)."""
    if EVEN_K:
        return tl.load(x_row + k * sxk).to(tl.float32)
    return tl.load(x_row + k * sxk, mask=inside, other=0.0).to(tl.float32)


def _gemv4w_next(w_rows, k0, jw, offs_g, K, swk, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):  # fmt: skip
    """The next K step's words, loaded a step ahead (EVEN_K: the last step reloads its own), and
    this step's group indices (clamped inside K where K is ragged)."""
    gi = k0 // GROUP + offs_g
    if EVEN_K:
        word_next = _gemv4w_words(w_rows, tl.minimum(k0 + BLOCK_K, K - BLOCK_K), jw, K, swk, EVEN_K)
    else:
        word_next = _gemv4w_words(w_rows, k0 + BLOCK_K, jw, K, swk, EVEN_K)
        gi = tl.minimum(gi, (K - 1) // GROUP)
    return word_next, gi


def _gemv4w_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                   sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """`_gemv4g_kernel` on 32-bit words: w_ptr is the packed weight viewed as int32 [N, K/8] (K % 8
    == 0; strides in words), so nibble j of word i is k = 8i + j (little-endian bytes, low nibble
    first). Each nibble is one shift and one mask of a word already in a register -- no per-byte
    extraction -- and meets its own x plane (x at k = 8i + j). Same numerics as `_gemv4g_kernel`."""
    row, pid_k, offs_n, rn, k_lo, k_hi = _gemv_place(N, K, K_PER, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    jw = offs_g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]  # [groups, GROUP/8] words
    w_rows = w_ptr + rn[:, None, None] * swn
    x_row = x_ptr + row * sxm
    s_rows = s_ptr + rn[:, None] * ssn
    z_rows = z_ptr + rn[:, None] * szn
    acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP, GROUP // 8], dtype=tl.float32)
    word = _gemv4w_words(w_rows, k_lo, jw, K, swk, EVEN_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kw = (k0 + 8 * jw)[None, :, :]
        word_next, gi = _gemv4w_next(w_rows, k0, jw, offs_g, K, swk, GROUP, BLOCK_K, EVEN_K)
        s = tl.load(s_rows + gi[None, :] * ssg)
        if FORMAT == 0:
            s3 = s.to(tl.float32)[:, :, None]
            zb = (tl.load(z_rows + gi[None, :] * szg).to(tl.float32) + 8388608.0)[:, :, None]
        else:
            s3 = _e8m0_to_f32(s)[:, :, None]
        for j in tl.static_range(8):
            xj = _gemv4w_x(x_row, kw + j, kw < K, sxk, EVEN_K)
            q = (word >> (4 * j)) & 15
            if FORMAT == 0:
                wv = ((q | 0x4B000000).to(tl.float32, bitcast=True) - zb) * s3
                if not EVEN_K:
                    wv = tl.where(kw < K, wv, 0.0)
                acc += _to_operand(wv, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32) * xj
            elif E2M1_F16:
                acc += (_e2m1_to_f32_h(q) * xj) * s3
            else:
                acc += (_e2m1_to_f32(q) * xj) * s3
        word = word_next
    _gemv4_store(
        acc, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, FORMAT, SPLIT_OUT, HAS_BIAS
    )


def _gemv4x_planes(xv, D0: tl.constexpr, D1: tl.constexpr):
    """x [D0, D1, 8] (8 consecutive k per word) -> its 8 planes [D0, D1], plane j at k = 8 * word + j,
    by a tree of tl.split (register moves inside a thread, no shared memory)."""
    a, b = tl.split(tl.reshape(xv, (D0, D1, 4, 2)))  # x[2m], x[2m + 1]
    a0, a1 = tl.split(tl.reshape(a, (D0, D1, 2, 2)))  # x[4p], x[4p + 2]
    b0, b1 = tl.split(tl.reshape(b, (D0, D1, 2, 2)))  # x[4p + 1], x[4p + 3]
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


def _gemv4x_term(word, xj, J: tl.constexpr, s3, zb, FORMAT: tl.constexpr, DT: tl.constexpr,
                 EMULATE_RNE: tl.constexpr):  # fmt: skip
    """Nibble J of every word times its x plane (broadcastable to the words): `_gemv4w_kernel`'s
    per-plane product."""
    q = (word >> (4 * J)) & 15
    if FORMAT == 0:
        wv = ((q | 0x4B000000).to(tl.float32, bitcast=True) - zb) * s3
        t = _to_operand(wv, DT, EMULATE_RNE).to(tl.float32) * xj
    elif E2M1_F16:
        t = (_e2m1_to_f32_h(q) * xj) * s3
    else:
        t = (_e2m1_to_f32(q) * xj) * s3
    return t


def _bf16_pairs(x_row, k0, jw, K, EVEN_K: tl.constexpr):
    """bf16 x (unit stride, 4-byte aligned) at the words `jw` read as int32 pairs [GROUP/8, groups, 4]."""
    xp = x_row.to(tl.pointer_type(tl.int32)) + k0 // 2
    j = 4 * jw[:, :, None] + tl.arange(0, 4)[None, None, :]  # pair index
    if EVEN_K:  # noqa: SIM108
        pr = tl.load(xp + j)
    else:
        pr = tl.load(xp + j, mask=k0 + 2 * j < K, other=0)  # K % 8 == 0 (words): whole pairs
    return pr


def _bf16_pair_planes(pr):
    """The 8 x planes [GROUP/8, groups] as fp32 from `_bf16_pairs`: a pair's low bf16 is its fp32
    shifted up 16 bits, its high one the pair with the low half cleared -- one op per value, where
    16-bit loads cost a byte permute and a shift."""
    a, b = tl.split(tl.reshape(pr, (pr.shape[0], pr.shape[1], 2, 2)))  # pairs 0, 2 | 1, 3
    p0, p2 = tl.split(a)
    p1, p3 = tl.split(b)
    hi: tl.constexpr = -65536  # 0xFFFF0000
    return ((p0 << 16).to(tl.float32, bitcast=True), (p0 & hi).to(tl.float32, bitcast=True),
            (p1 << 16).to(tl.float32, bitcast=True), (p1 & hi).to(tl.float32, bitcast=True),
            (p2 << 16).to(tl.float32, bitcast=True), (p2 & hi).to(tl.float32, bitcast=True),
            (p3 << 16).to(tl.float32, bitcast=True), (p3 & hi).to(tl.float32, bitcast=True))  # fmt: skip


def _gemv4r_loads(w_row, x_row, s_ptr, z_ptr, n, k0, jw, kx, og, K, swk, sxk, ssn, ssg, szn, szg,
                  FORMAT: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                  X_PAIRS: tl.constexpr):  # fmt: skip
    """One K step's loads of `_gemv4r_kernel`: (words, x -- bf16 pairs or fp32 -- scales, zeros;
    mxfp4 has no zeros: its scales again). Masked past K (EVEN_K: nothing is)."""
    gi = k0 // GROUP + og
    if EVEN_K:
        word = tl.load(w_row + (k0 // 8 + jw) * swk)
    else:
        word = tl.load(w_row + (k0 // 8 + jw) * swk, mask=k0 + 8 * jw < K, other=0)
        gi = tl.minimum(gi, (K - 1) // GROUP)  # a group past K: a valid one, its x are 0
    if X_PAIRS:  # noqa: SIM108
        xs = _bf16_pairs(x_row, k0, jw, K, EVEN_K)
    else:
        xs = _gemv4w_x(x_row, k0 + kx, k0 + kx < K, sxk, EVEN_K)
    s = tl.load(s_ptr + n * ssn + gi * ssg)[None, :]
    z = s
    if FORMAT == 0:
        z = tl.load(z_ptr + n * szn + gi * szg)[None, :]
    return word, xs, s, z


def _gemv4r_scale(s, FORMAT: tl.constexpr):
    """A group's stored scale as the fp32 multiplier: int4's as it is, mxfp4's e8m0 decoded."""
    if FORMAT == 0:  # noqa: SIM108
        r = s.to(tl.float32)
    else:
        r = _e8m0_to_f32(s)
    return r


def _gemv4h_nib(h, P: tl.constexpr, zf):
    """Nibble P of a 16-bit half or-ed with fp32's 2**23 exponent (h) -> q - z exactly, in two
    ops: the and leaves 2**23 + q * 16**P; times 16**-P (exact) minus 2**(23 - 4P) + z (exact
    for P <= 3: at most 24 significant bits) is q - z, one rounding of an exact value."""
    m: tl.constexpr = 0x4B000000 | (15 << (4 * P))
    return (h & m).to(tl.float32, bitcast=True) * (0.0625**P) - (zf + 2.0 ** (23 - 4 * P))


def _gemv4h_e2m1(word, P: tl.constexpr, PTX: tl.constexpr):
    """Nibbles P and P + 4 of every word -> their e2m1 values * 2**-14 (fp32): both halves' codes
    land in two fp16 at once (`_e2m1_to_f32_h`'s bits: magnitude to bits 9..11, sign to 15). PTX
    (NVIDIA): each half widened where it lies (`F16_PAIR_TO_F32`), where the plain casts first
    move the halves apart (a byte permute and a shift per pair)."""
    if P < 3:  # noqa: SIM108
        mag = word << (9 - 4 * P)
    else:
        mag = word >> 3  # bits 12..14 -> 9..11 (an arithmetic shift: only bits 29..31 see the sign)
    v = (mag & 0x0E000E00) | ((word << (12 - 4 * P)) & -0x7FFF8000)  # 0x80008000: the halves' sign bits
    if PTX:
        fl, fh = tl.inline_asm_elementwise(F16_PAIR_TO_F32, "=r,=r,r", [v], (tl.float32, tl.float32), True, 1)
    else:
        fl = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        fh = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return fl, fh


def _gemv4h_word(word, x0, x1, x2, x3, x4, x5, x6, x7, zf, FORMAT: tl.constexpr, PTX: tl.constexpr):
    """The word's 8 nibbles times their x (fp32), unscaled (int4: the sum of (q - z) x; mxfp4: of
    e2m1(q) * 2**-14 x), its two 16-bit halves worked side by side: a nibble costs one and and
    one fma (int4), or half an integer op pair and a conversion (mxfp4), before its product."""
    if FORMAT == 0:
        lo = (word & 0xFFFF) | 0x4B000000
        hi = ((word >> 16) & 0xFFFF) | 0x4B000000
        t = _gemv4h_nib(lo, 0, zf) * x0
        t += _gemv4h_nib(hi, 0, zf) * x4
        t += _gemv4h_nib(lo, 1, zf) * x1
        t += _gemv4h_nib(hi, 1, zf) * x5
        t += _gemv4h_nib(lo, 2, zf) * x2
        t += _gemv4h_nib(hi, 2, zf) * x6
        t += _gemv4h_nib(lo, 3, zf) * x3
        t += _gemv4h_nib(hi, 3, zf) * x7
    else:
        a, b = _gemv4h_e2m1(word, 0, PTX)
        t = a * x0
        t += b * x4
        a, b = _gemv4h_e2m1(word, 1, PTX)
        t += a * x1
        t += b * x5
        a, b = _gemv4h_e2m1(word, 2, PTX)
        t += a * x2
        t += b * x6
        a, b = _gemv4h_e2m1(word, 3, PTX)
        t += a * x3
        t += b * x7
    return t


def _gemv4x_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                   sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """`_gemv4w_kernel` (same arguments, int32 words, same numerics) with x read once per K step as
    [groups, GROUP/8, 8] -- 8 consecutive k per word, 16-byte loads, prefetched a step ahead like
    the words -- and split into its 8 nibble planes in registers, where `_gemv4w_kernel` gathers
    each plane with stride-8 loads inside the loop, one L2 round trip per plane on the critical path."""
    row, pid_k, offs_n, rn, k_lo, k_hi = _gemv_place(N, K, K_PER, BLOCK_N)
    G: tl.constexpr = BLOCK_K // GROUP
    W: tl.constexpr = GROUP // 8
    offs_g = tl.arange(0, G)
    jw = offs_g[:, None] * W + tl.arange(0, W)[None, :]  # [groups, GROUP/8] words
    kx = 8 * jw[:, :, None] + tl.arange(0, 8)[None, None, :]  # [groups, GROUP/8, 8]: the k of each nibble
    w_rows = w_ptr + rn[:, None, None] * swn
    x_row = x_ptr + row * sxm
    s_rows = s_ptr + rn[:, None] * ssn
    z_rows = z_ptr + rn[:, None] * szn
    DT: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
    word = _gemv4w_words(w_rows, k_lo, jw, K, swk, EVEN_K)
    xv = _gemv4w_x(x_row, k_lo + kx, k_lo + kx < K, sxk, EVEN_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        word_next, gi = _gemv4w_next(w_rows, k0, jw, offs_g, K, swk, GROUP, BLOCK_K, EVEN_K)
        kn = tl.minimum(k0 + BLOCK_K, K - BLOCK_K) if EVEN_K else k0 + BLOCK_K
        x_next = _gemv4w_x(x_row, kn + kx, kn + kx < K, sxk, EVEN_K)
        s = tl.load(s_rows + gi[None, :] * ssg)
        zb = s  # unused by mxfp4
        if FORMAT == 0:
            s3 = s.to(tl.float32)[:, :, None]
            zb = (tl.load(z_rows + gi[None, :] * szg).to(tl.float32) + 8388608.0)[:, :, None]
        else:
            s3 = _e8m0_to_f32(s)[:, :, None]
        x0, x1, x2, x3, x4, x5, x6, x7 = _gemv4x_planes(xv, G, W)
        acc += _gemv4x_term(word, x0[None, :, :], 0, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x1[None, :, :], 1, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x2[None, :, :], 2, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x3[None, :, :], 3, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x4[None, :, :], 4, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x5[None, :, :], 5, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x6[None, :, :], 6, s3, zb, FORMAT, DT, EMULATE_RNE)
        acc += _gemv4x_term(word, x7[None, :, :], 7, s3, zb, FORMAT, DT, EMULATE_RNE)
        word = word_next
        xv = x_next
    _gemv4_store(
        acc, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, FORMAT, SPLIT_OUT, HAS_BIAS
    )


def _gemv4r_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                   sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FACTORED: tl.constexpr = False,
                   X_PAIRS: tl.constexpr = False, PTX: tl.constexpr = False):  # fmt: skip
    """`_gemv4x_kernel` (same arguments, int32 words, same numerics) for one weight row per program
    (BLOCK_N is 1, or 2 for gemvf below; grid (N / BLOCK_N, splits, M)): no row axis to broadcast x over, so its nibble planes and
    the words can share one register layout -- no trip through shared memory at all. The words are
    indexed [GROUP/8, groups] in an odd-stride order inside each group ((w * 5) % (GROUP/8), a
    permutation) so that Triton gives each thread one word, as each thread holds one word's 8 x;
    a warp's loads still cover whole 64-byte runs. A row's K tile is loaded at once (many small
    programs keep HBM busy: every load is issued before the first use).

    FACTORED ("gemvf"): the GEMV is bound by instruction issue, not HBM, so the nibbles take the
    shortest exact route: each word's 8 products with the *exact* dequantized weight (int4: q - z;
    mxfp4: e2m1(q)) summed in fp32 (`_gemv4h_word`), the group's scale multiplied once per word,
    no rounding of the weight to x's dtype -- the torch backend's numbers (its fp32 weight), which
    the rounded kernels differ from by up to half an ulp of x's dtype per weight. X_PAIRS: bf16 x
    read as int32 pairs (`_bf16_pair_planes`). sm90 SASS per 64 nibbles of a 2-warp tile: int4
    383 against 658 unfactored, mxfp4 408 against 642. BLOCK_N 2: a second weight row shares the
    x planes (its own words, scales and zeros; an odd N's last program stores one row)."""
    tl.static_assert(BLOCK_N == 1 or (BLOCK_N == 2 and FACTORED), "two rows per program: gemvf only")
    n = tl.program_id(0) * BLOCK_N
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // GROUP
    W: tl.constexpr = GROUP // 8
    ow = ((tl.arange(0, W) * 5) % W)[:, None]
    og = tl.arange(0, G)
    jw = og[None, :] * W + ow  # [GROUP/8, groups]: word index inside the K tile
    kx = 8 * jw[:, :, None] + tl.arange(0, 8)[None, None, :]  # [GROUP/8, groups, 8]: k of each nibble
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    w_row = w_ptr + n * swn
    x_row = x_ptr + row * sxm
    DT: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros([W, G], dtype=tl.float32)
    acc1 = tl.zeros([W, G], dtype=tl.float32)  # BLOCK_N 2: the second row's (sharing the x planes)
    n1 = tl.minimum(n + 1, N - 1)  # an odd N's last program: its second row is the first, not stored
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # (loading the next step's words and x before this step's math measured slower on an H200:
        # int4 7.0 against 6.6 us at 4096^2, the loop-carried copies costing more than they hide)
        word, xs, s, z = _gemv4r_loads(w_row, x_row, s_ptr, z_ptr, n, k0, jw, kx, og, K, swk, sxk, ssn, ssg, szn,
                                       szg, FORMAT, GROUP, EVEN_K, X_PAIRS)  # fmt: skip
        s3 = _gemv4r_scale(s, FORMAT)
        zb = z.to(tl.float32) + 8388608.0  # int4's zero points (mxfp4: unused)
        if X_PAIRS:
            x0, x1, x2, x3, x4, x5, x6, x7 = _bf16_pair_planes(xs)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = _gemv4x_planes(xs, W, G)
        if FACTORED:  # the x planes are fp32 already (16-bit x is widened where it is loaded)
            acc += s3 * _gemv4h_word(word, x0, x1, x2, x3, x4, x5, x6, x7, z.to(tl.float32), FORMAT, PTX)
            if BLOCK_N == 2:
                # the second row's words, scales and zeros (its x loads are the first's: dropped)
                word1, _, s1, z1 = _gemv4r_loads(w_ptr + n1 * swn, x_row, s_ptr, z_ptr, n1, k0, jw, kx, og, K, swk,
                                                 sxk, ssn, ssg, szn, szg, FORMAT, GROUP, EVEN_K, X_PAIRS)  # fmt: skip
                acc1 += _gemv4r_scale(s1, FORMAT) * _gemv4h_word(word1, x0, x1, x2, x3, x4, x5, x6, x7,
                                                                 z1.to(tl.float32), FORMAT, PTX)  # fmt: skip
        else:
            acc += _gemv4x_term(word, x0, 0, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x1, 1, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x2, 2, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x3, 3, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x4, 4, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x5, 5, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x6, 6, s3, zb, FORMAT, DT, EMULATE_RNE)
            acc += _gemv4x_term(word, x7, 7, s3, zb, FORMAT, DT, EMULATE_RNE)
    out = tl.sum(tl.sum(acc, axis=1), axis=0)
    out1 = tl.sum(tl.sum(acc1, axis=1), axis=0)
    if FORMAT == 1 and (E2M1_F16 or FACTORED):
        out = out * 16384.0
        out1 = out1 * 16384.0
    # one output element per row: a 1-wide row segment for the shared store helper (masked past N)
    offs_n = n + tl.arange(0, 1)
    _gemv_store(tl.zeros([1], dtype=tl.float32) + out, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn,
                SPLIT_OUT, HAS_BIAS)  # fmt: skip
    if BLOCK_N == 2:
        _gemv_store(tl.zeros([1], dtype=tl.float32) + out1, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n + 1, M, N,
                    scm, scn, SPLIT_OUT, HAS_BIAS)  # fmt: skip


# `_gemv4h_e2m1`'s PTX, bound as F16_PAIR_TO_F32: $2's two fp16 halves widened to fp32 ($0 the low,
# $1 the high) where they lie, which ptxas turns into two HADD2.F32 reading .H0 / .H1
F16_PAIR_PTX = "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }"

HELPERS = ("_gemv4_store", "_gemv4w_words", "_gemv4w_x", "_gemv4w_next", "_gemv4x_planes", "_gemv4x_term", "_bf16_pairs", "_bf16_pair_planes", "_gemv4r_loads", "_gemv4r_scale", "_gemv4h_nib", "_gemv4h_e2m1", "_gemv4h_word")  # fmt: skip
KERNELS = ("_gemv4_kernel", "_gemv4g_kernel", "_gemv4w_kernel", "_gemv4x_kernel", "_gemv4r_kernel")  # fmt: skip
