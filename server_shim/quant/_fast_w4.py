"""The fast 4-bit tiles (int4-g128, mxfp4 with 16-bit x): byte tiles (`_wonly_kernel`,
`_wonly_fused_kernel`), int32-word tiles whose planes come from inline PTX on NVIDIA
(`_wonly_words_kernel`, `planes_ptx`, `mx_planes_ptx`), and dequantize-then-GEMM for large M
(`_wonly_dequant_kernel`, `_mm16_kernel`).

Plain bodies: _triton_fast.bind() makes them kernels.
"""

from __future__ import annotations

# placeholders and plain helpers, each rebound here by bind()
from server_shim.quant._fast_common import (
    E2M1_F16,
    MX_PLANES_BF16,
    MX_PLANES_F16,
    PLANES_BF16,
    PLANES_F16,
    _dequant_pair,
    _e2m1_to_f32,
    _e2m1_to_f32_h,
    _e8m0_to_f32,
    _epilogue,
    _load_k_tiles,
    _per_group,
    _split_finish,
    _split_store,
    _split_tile,
    _tile_ids,
    _to_operand,
    tl,
)


def mx_planes_ptx(bf16: bool) -> str:
    """`_mx_planes`'s PTX: $8 a word of 8 e2m1 codes, $9 (and fp16's $10) the group scale as one
    (two) power-of-two factors in both 16-bit halves; $0..$7 the codes' values times the factors.
    Two byte permutes look the 3-bit magnitudes of four codes up in 8-byte tables (the high and the
    low bytes of the 16-bit values; fp16's low bytes are all 0), one permute per pair of codes
    assembles their two values, one more brings their sign bits, one lop3 merges them and one
    packed fma per factor scales them (exact but for under- / overflow, where the rounding is that
    of the fp32 product cast to x's dtype)."""
    if bf16:  # 0, 0.5, 1, 1.5 | 2, 3, 4, 6 as bf16: 0x0000 0x3F00 0x3F80 0x3FC0 | 0x4000 0x4040 0x4080 0x40C0
        tables = (
            "mov.b32 h0, 0x3F3F3F00; mov.b32 h1, 0x40404040; mov.b32 l0, 0xC0800000; mov.b32 l1, 0xC0804000;"
        )
        pair, looks, sel, factors = (
            "bf16x2",
            "prmt.b32 la, l0, l1, m; prmt.b32 lb, l0, l1, u;",
            (0x5140, 0x7362),
            1,
        )
    else:  # fp16: 0x0000 0x3800 0x3C00 0x3E00 | 0x4000 0x4200 0x4400 0x4600: the low bytes from a zero
        tables = "mov.b32 h0, 0x3E3C3800; mov.b32 h1, 0x46444240; mov.b32 la, 0; mov.b32 lb, 0;"
        pair, looks, sel, factors = "f16x2", "", (0x5040, 0x7060), 2
    lines = [
        "{ .reg .b32 m, u, h0, h1, l0, l1, ha, hb, la, lb, s4, p, g, z;",
        tables,
        "and.b32 m, $8, 0x77777777; shr.u32 u, m, 16; shl.b32 s4, $8, 4; mov.b32 z, 0x80008000;",
        "prmt.b32 ha, h0, h1, m; prmt.b32 hb, h0, h1, u;" + looks,
    ]
    for b in range(4):  # the word's byte b: codes 2b (sign at bit 3, bit 7 of s4's byte) and 2b + 1 (bit 7)
        lo, hi = ("la", "ha") if b < 2 else ("lb", "hb")
        # each factor by an fma with -0 added: a zero keeps its sign
        scale = " ".join(f"fma.rn.{pair} p, p, ${9 + f}, z;" for f in range(factors))
        lines.append(
            f"prmt.b32 p, {lo}, {hi}, {sel[b % 2]:#06x}; prmt.b32 g, s4, $8, {(b << 4) | ((4 + b) << 12):#06x}; "
            f"lop3.b32 p, g, z, p, 0xEA; {scale} mov.b32 {{${2 * b}, ${2 * b + 1}}}, p;"
        )
    return "\n".join(lines) + "\n}"


def planes_ptx(bf16: bool) -> str:
    """`_int4_planes`'s PTX: $8 a word of 8 nibbles, $9 -(magic + z) in both 16-bit halves
    (`_int4_zero_pairs`); $0..$7 the nibbles' q - z. The magic is 2**7 (bf16) / 2**10 (fp16)."""
    magic, one, pair = (0x4300, 0x3F80, "bf16x2") if bf16 else (0x6400, 0x3C00, "f16x2")
    body = "\n".join(
        f"prmt.b32 p, $8, t, 0x{0x400 + 0x101 * b:04x}; lop3.b32 p, p, 0x000F000F, {magic * 0x10001:#010x}, 0xEA; "
        f"fma.rn.{pair} p, p, o, $9; mov.b32 {{${2 * b}, ${2 * b + 1}}}, p;"
        for b in range(4)
    )
    return f"{{ .reg .b32 t, p, o; shr.u32 t, $8, 4; mov.b32 o, {one * 0x10001:#010x};\n" + body + "\n}"


def _w16_dot(x, w, acc, DOT_IEEE: tl.constexpr):
    """acc + x [BM, BK] @ w [BN, BK]^T, w already in x's dtype; DOT_IEEE: in fp32 (fp32 x, or bf16 x
    in the interpreter, whose bf16 tl.dot is broken)."""
    if DOT_IEEE:
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


def _wonly_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn,
                  HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, SPLIT_FIN: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """A 4-bit tile's end: its splits reduce themselves (SPLIT_FIN, `_split_finish`), or it leaves its
    partial for the reduction kernel (SPLIT_OUT), or it is the whole sum (bias, cast, store)."""
    if SPLIT_FIN:  # modes 2: no scales after the sum (its scale pointers unread)
        _split_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, ws_ptr,
                      ws_ptr, 0, 0, HAS_BIAS, BLOCK_M, BLOCK_N, 2, 2)  # fmt: skip
    elif SPLIT_OUT:
        _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N)
    else:
        _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _wonly_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                  sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg, cnt_ptr, SPLIT,
                  FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                  EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  SPLIT_FIN: tl.constexpr = False):  # fmt: skip
    """Weight-only GEMM/GEMV, 4-bit weights (byte k//2, low nibble = even k) unpacked per tile.

    FORMAT 0: int4 asymmetric, w = (q - zero) * scale; FORMAT 1: mxfp4, w = e2m1(q) * 2**(e - 127).
    x's even and odd columns meet the low and high nibbles in two dots of BLOCK_K/2 each
    (`_wonly_fused_kernel` is the one-dot form). Split-K as in `_mm8_kernel` (K_PER a multiple of
    BLOCK_K and of GROUP when GROUP >= BLOCK_K).
    """
    pid_n, pid_k, offs_m, offs_n, rm, rn, k_lo, k_hi = _split_tile(M, N, K, K_PER, BLOCK_M, BLOCK_N, GROUP_M)
    offs_j = tl.arange(0, BLOCK_K // 2)
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
    _wonly_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, HAS_BIAS,
                  SPLIT_OUT, SPLIT_FIN, BLOCK_M, BLOCK_N)  # fmt: skip


def _wonly_fused_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                 sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg, cnt_ptr, SPLIT,
                 FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                 EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SPLIT_FIN: tl.constexpr = False):  # fmt: skip
    """`_wonly_kernel` (same arguments) as w4a16: the two nibble planes are interleaved in registers
    back to [BN, BK] and meet one K-contiguous x tile in one dot per K step (x's loads coalesced
    and pipelined, one dot of depth BLOCK_K instead of two strided half-depth ones).
    SPLIT_FIN (with SPLIT_OUT; "fusedk" configs): the splits reduce themselves (`_split_finish`,
    SPLIT splits, one int32 counter per output tile at cnt_ptr) instead of a second kernel."""
    pid_n, pid_k, offs_m, offs_n, rm, rn, k_lo, k_hi = _split_tile(M, N, K, K_PER, BLOCK_M, BLOCK_N, GROUP_M)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_ptrs = x_ptr + rm[:, None] * sxm + (k_lo + offs_k)[None, :] * sxk
    w_ptrs = w_ptr + rn[:, None] * swn + (k_lo // 2 + offs_j)[None, :] * swk
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ke = k0 + 2 * offs_j
        if EVEN_K:
            x = tl.load(x_ptrs)
            byte = tl.load(w_ptrs)
            we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, ke, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
        else:
            x = tl.load(x_ptrs, mask=((k0 + offs_k) < K)[None, :], other=0.0)
            byte = tl.load(w_ptrs, mask=(ke < K)[None, :], other=0)
            kc = tl.minimum(ke, K - 1)
            we, wo = _dequant_pair(byte, s_ptr, z_ptr, rn, kc, k0, ssn, ssg, szn, szg, FORMAT, GROUP, BLOCK_K)
            we = tl.where((ke < K)[None, :], we, 0.0)
            wo = tl.where((ke + 1 < K)[None, :], wo, 0.0)
        w = tl.interleave(_to_operand(we, x.dtype, EMULATE_RNE), _to_operand(wo, x.dtype, EMULATE_RNE))
        acc = _w16_dot(x, w, acc, DOT_IEEE)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += (BLOCK_K // 2) * swk
    _wonly_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, HAS_BIAS,
                  SPLIT_OUT, SPLIT_FIN, BLOCK_M, BLOCK_N)  # fmt: skip


def _word_plane(word, J: tl.constexpr, s, DT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """mxfp4 code J of every int32 word (k = 8 * word + J) times its group's scale `s` (`_mx_word_scales`),
    in fp32 (exact), rounded once to DT: the word tiles' mxfp4 planes without inline PTX."""
    if E2M1_F16:  # noqa: SIM108 - a statement-level constexpr branch compiles on every triton
        w = (_e2m1_to_f32_h((word >> (4 * J)) & 15) * 16384.0) * s
    else:
        w = _e2m1_to_f32((word >> (4 * J)) & 15) * s
    return _to_operand(w, DT, EMULATE_RNE)


def _mx_word_planes(word, sc, DT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """The 8 mxfp4 planes of int32 words times their per-word scales `sc`, without inline PTX."""
    p0 = _word_plane(word, 0, sc, DT, EMULATE_RNE)
    p1 = _word_plane(word, 1, sc, DT, EMULATE_RNE)
    p2 = _word_plane(word, 2, sc, DT, EMULATE_RNE)
    p3 = _word_plane(word, 3, sc, DT, EMULATE_RNE)
    p4 = _word_plane(word, 4, sc, DT, EMULATE_RNE)
    p5 = _word_plane(word, 5, sc, DT, EMULATE_RNE)
    p6 = _word_plane(word, 6, sc, DT, EMULATE_RNE)
    p7 = _word_plane(word, 7, sc, DT, EMULATE_RNE)
    return p0, p1, p2, p3, p4, p5, p6, p7


def _k_order(p0, p1, p2, p3, p4, p5, p6, p7):
    """A word tile's 8 planes [..., BK/8] joined back into K order: [..., BK/8, 2, 2, 2] indexed
    (j, c, b, a) holds plane 4c + 2b + a, so that reshaped to [..., BK] element k = 8j + 4c + 2b + a."""
    return tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))


def _mx_group_codes(
    s_ptr, rn, k0, K, ssn, ssg, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr
):
    """One K step's mxfp4 e8m0 codes, per row and group ([BN, BK/GROUP]; whole groups per tile)."""
    gi = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    if not EVEN_K:  # the last tile's groups past K (words 0 there, meeting x's zeros) read the last one
        gi = tl.minimum(gi, (K - 1) // GROUP)
    return tl.load(s_ptr + rn[:, None] * ssn + gi[None, :] * ssg)


def _mx_word_scales(
    s_ptr, rn, k0, K, ssn, ssg, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr
):
    """One K step's mxfp4 scales as fp32, per row and int32 word ([BN, BK/8])."""
    codes = _mx_group_codes(s_ptr, rn, k0, K, ssn, ssg, GROUP, BLOCK_K, EVEN_K)
    return _per_group(_e8m0_to_f32(codes), GROUP, BLOCK_K, 8)


def _nibble_bits(word, SHIFT: tl.constexpr):
    """The nibble at bit SHIFT of int32 words as the fp32 2**23 + q."""
    return (((word >> SHIFT) & 15) | 0x4B000000).to(tl.float32, bitcast=True)


def _int4_zero_pairs(z, DT: tl.constexpr):
    """Zero points (uint8) -> `planes_ptx`'s $9: -(2**7 + z) as bf16 / -(2**10 + z) as fp16 in both
    16-bit halves of an int32 (the power's bits or-ed with z: exact for z below 2**7 / 2**10; int4
    zeros are 0..15)."""
    zi = z.to(tl.int32)
    h = zi | (0xC300 if DT == tl.bfloat16 else 0xE400)  # noqa: SIM300 - DT is a constexpr: its == compares dtypes
    return h | (h << 16)


def _int4_planes(word, z, DT: tl.constexpr, PTX: tl.constexpr):
    """The 8 nibble planes of int32 words [BN, BK/8] as the exact integers q - z in DT, z the row's
    zero point [BN, 1]: no scale and no rounding, the scale multiplies the dot's fp32 partial.
    PTX (NVIDIA, fp16 / bf16 DT): two nibbles per instruction. A byte permute puts nibbles 2b and
    2b + 1 in the low bits of the two 16-bit halves (the second from the word shifted by 4), one
    lop3 masks them and ors in the bits of 2**10 (fp16) / 2**7 (bf16), which makes each half
    exactly that power plus q, and one packed fma subtracts the power plus z: 13 instructions per
    word of 8 nibbles. Elsewhere (the interpreter, AMD, fp32 x) the same integers by shift and mask."""
    if PTX:
        nz = tl.broadcast_to(_int4_zero_pairs(z, DT), word.shape)
        if DT == tl.bfloat16:  # noqa: SIM300 - DT is a constexpr: its == compares dtypes
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                PLANES_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, nz], (tl.bfloat16,) * 8, True, 1
            )
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
                PLANES_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, nz], (tl.float16,) * 8, True, 1
            )
    else:  # (2**23 + q) - (2**23 + z) in fp32, exact, then DT (exact: |q - z| < 2**8)
        zb = z.to(tl.float32) + 8388608.0
        p0 = (_nibble_bits(word, 0) - zb).to(DT)
        p1 = (_nibble_bits(word, 4) - zb).to(DT)
        p2 = (_nibble_bits(word, 8) - zb).to(DT)
        p3 = (_nibble_bits(word, 12) - zb).to(DT)
        p4 = (_nibble_bits(word, 16) - zb).to(DT)
        p5 = (_nibble_bits(word, 20) - zb).to(DT)
        p6 = (_nibble_bits(word, 24) - zb).to(DT)
        p7 = (_nibble_bits(word, 28) - zb).to(DT)
    return p0, p1, p2, p3, p4, p5, p6, p7


def _mx_scale_pairs(e, DT: tl.constexpr):
    """e8m0 codes -> the group scale 2**(e - 127) as `mx_planes_ptx` takes it: 16-bit powers of two
    in both halves of an int32, as two factors whose product is the scale. bf16 holds every one in
    the first (e 0 as its subnormal, 255 as NaN; the second is 1.0, which its PTX does not read);
    fp16 needs both: 2**a with a clamped into fp16's normal range, and the rest (0 below 2**-24,
    capped at 2**15). `_gluon_w4._mx_factors` is its Gluon twin (a Gluon kernel cannot call it)."""
    if DT == tl.bfloat16:  # noqa: SIM300 - DT is a constexpr: its == compares dtypes
        f1 = tl.where(e == 0, 0x40, tl.where(e == 255, 0x7FC0, e << 7))
        f2 = tl.full(e.shape, 0x3F80, tl.int32)
    else:
        x = e - 127
        a = tl.minimum(tl.maximum(x, -14), 15)
        b = tl.minimum(x - a, 15)
        f1 = (a + 15) << 10
        f2 = tl.where(b < -24, 0, tl.where(b < -14, 1 << (b + 24), (b + 15) << 10))
    return f1 | (f1 << 16), f2 | (f2 << 16)


def _mx_planes(word, f1, f2, DT: tl.constexpr):
    """The 8 e2m1 planes of int32 words [BN, BK/8] times their group's scale (`_mx_scale_pairs`, per
    word), in DT, by `mx_planes_ptx` (NVIDIA, fp16 / bf16 DT)."""
    if DT == tl.bfloat16:  # noqa: SIM300 - DT is a constexpr: its == compares dtypes
        p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
            MX_PLANES_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, f1], (tl.bfloat16,) * 8, True, 1
        )
    else:
        p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
            MX_PLANES_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [word, f1, f2], (tl.float16,) * 8, True, 1
        )
    return p0, p1, p2, p3, p4, p5, p6, p7


def _wonly_words_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                        sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg, cnt_ptr, SPLIT,
                        FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                        EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        SPLIT_FIN: tl.constexpr = False, PTX: tl.constexpr = False):  # fmt: skip
    """`_wonly_fused_kernel` (same arguments; w as int32 words [N, K/8], K % 8 == 0) reading whole
    words: the 8 nibble planes are dequantized where they lie (`_words_part`) and joined back into
    K order, 8 consecutive k per thread, which is how the MMA's operand holds them. int4 tiles lie
    inside one group (GROUP % BLOCK_K == 0): their dots run on the exact q - z and each step's
    partial is multiplied by the row scale; mxfp4 tiles span whole groups. PTX: the planes by
    `_int4_planes` / `_mx_planes`'s inline PTX (an NVIDIA GPU, 16-bit x)."""
    pid_n, pid_k, offs_m, offs_n, rm, rn, k_lo, k_hi = _split_tile(M, N, K, K_PER, BLOCK_M, BLOCK_N, GROUP_M)
    offs_j = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # x's rows unwrapped and masked (rm's wrap hides that they are affine: one copy address each,
    # 3-7% slower on an H200)
    x_ptrs = x_ptr + offs_m[:, None] * sxm + (k_lo + offs_k)[None, :] * sxk
    x_rows = (offs_m < M)[:, None]
    # K_PER is whole K tiles of >= 64: the words' offset is a multiple of 8 (16-byte copies; unsaid,
    # Triton proves only k_lo's 16 and copies 8 bytes at a time)
    w_ptrs = w_ptr + rn[:, None] * swn + (tl.multiple_of(k_lo // 8, 8) + offs_j)[None, :] * swk
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FORMAT == 0:  # the tile inside one group: the exact q - z in the dots, the row scale after them
            s = tl.load(s_ptr + rn * ssn + (k0 // GROUP) * ssg).to(tl.float32)
            z = tl.load(z_ptr + rn * szn + (k0 // GROUP) * szg)[:, None]
        else:  # mxfp4: the scales enter the planes (unused here)
            s = 1.0
            z = 0
        part = _words_part(x_ptrs, x_rows, w_ptrs, k0, offs_j, offs_k, rn, s_ptr, z, K, ssn, ssg, FORMAT, GROUP,
                           DOT_IEEE, EMULATE_RNE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PTX)  # fmt: skip
        acc += part * s[None, :] if FORMAT == 0 else part
        x_ptrs += BLOCK_K * sxk
        w_ptrs += (BLOCK_K // 8) * swk
    _wonly_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, HAS_BIAS,
                  SPLIT_OUT, SPLIT_FIN, BLOCK_M, BLOCK_N)  # fmt: skip


def _words_part(x_ptrs, x_rows, w_ptrs, k0, offs_j, offs_k, rn, s_ptr, z, K, ssn, ssg,
                FORMAT: tl.constexpr, GROUP: tl.constexpr, DOT_IEEE: tl.constexpr, EMULATE_RNE: tl.constexpr,
                EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PTX: tl.constexpr):  # fmt: skip
    """One K step of `_wonly_words_kernel`: x's [BM, BK] tile times the step's dequantized words, from a
    zero accumulator (int4's row scale multiplies it after; splitting a step into two or four such
    parts, independent MMA chains, measured 7-30% slower on an H200). x_rows [BM, 1]: the rows below M."""
    DT: tl.constexpr = x_ptrs.dtype.element_ty
    if EVEN_K:
        x = tl.load(x_ptrs, mask=x_rows, other=0.0)
        word = tl.load(w_ptrs)
    else:  # past K: x is 0, so the words there (0, dequantized to -z * s) add nothing
        x = tl.load(x_ptrs, mask=x_rows & ((k0 + offs_k) < K)[None, :], other=0.0)
        word = tl.load(w_ptrs, mask=((k0 + 8 * offs_j) < K)[None, :], other=0)
    if FORMAT == 0:  # int4: z the rows' zero points [BN, 1]; the caller scales the part
        p0, p1, p2, p3, p4, p5, p6, p7 = _int4_planes(word, z, DT, PTX)
    elif PTX:  # mxfp4 on NVIDIA: the scaled values straight from the codes, two per instruction
        codes = _mx_group_codes(s_ptr, rn, k0, K, ssn, ssg, GROUP, BLOCK_K, EVEN_K)
        f1, f2 = _mx_scale_pairs(codes.to(tl.int32), DT)
        f1 = _per_group(f1, GROUP, BLOCK_K, 8)
        p0, p1, p2, p3, p4, p5, p6, p7 = _mx_planes(word, f1, _per_group(f2, GROUP, BLOCK_K, 8), DT)
    else:
        sc = _mx_word_scales(s_ptr, rn, k0, K, ssn, ssg, GROUP, BLOCK_K, EVEN_K)
        p0, p1, p2, p3, p4, p5, p6, p7 = _mx_word_planes(word, sc, DT, EMULATE_RNE)
    w = tl.reshape(_k_order(p0, p1, p2, p3, p4, p5, p6, p7), (BLOCK_N, BLOCK_K))
    return _w16_dot(x, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_IEEE)


def _per_group3(v, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """[SUB, BN, BLOCK_K/GROUP] per-group values -> [SUB, BN, BLOCK_K/8], one per int32 word."""
    v = tl.broadcast_to(v[:, :, :, None], (v.shape[0], v.shape[1], BLOCK_K // GROUP, GROUP // 8))
    return tl.reshape(v, (v.shape[0], v.shape[1], BLOCK_K // 8))


def _wonly_wordsb_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                         sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg, cnt_ptr, SPLIT,
                         FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IEEE: tl.constexpr,
                         EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         SPLIT_FIN: tl.constexpr = False, PTX: tl.constexpr = False, SUB: tl.constexpr = 4):  # fmt: skip
    """`_wonly_words_kernel` (same arguments and tiles) with SUB consecutive K steps side by side, as
    one batched dot whose SUB partials are summed once at the end, the weights as the MMA's first
    operand ([SUB, BN, BK] x [SUB, BK, BM], the product transposed: int4 239 instead of 257 sm90
    instructions per K step, x's operand then needing fewer register moves; 3% faster on an H200).
    Triton gives a 3-d dot's batch dimension to the warps: with SUB = num_warps each warp
    dequantizes and multiplies a K step of its own, where the 2-d tile spreads one step's columns
    over all warps (an H200 at 16 x 4096 x 4096: int4-g128 8.3 against 10.3 us, mxfp4 9.3-9.5 against
    11.2: about the same SASS per word, but 16-wide tiles, too narrow to spread over 4 warps in 2-d,
    give enough programs without splitting K: no partials to write and sum).
    The scales and zero points are loaded [SUB, BN] and expanded: loaded as [SUB, BN, 1] directly,
    the 32-wide tile's weights went through shared memory (21 against 9.6 us). EVEN_K: K_PER and K
    are multiples of SUB * BLOCK_K (else the steps past K read zeros: x 0 there adds nothing)."""
    pid_n, pid_k, offs_m, offs_n, rm, rn, k_lo, k_hi = _split_tile(M, N, K, K_PER, BLOCK_M, BLOCK_N, GROUP_M)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    ks = tl.arange(0, SUB)[:, None, None] * BLOCK_K  # each sub-step's offset [SUB, 1, 1]
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]
    offs_j = tl.arange(0, BLOCK_K // 8)[None, None, :]
    x_ptrs = x_ptr + offs_m[None, :, None] * sxm + (k_lo + ks + offs_k) * sxk  # unwrapped, as words'
    x_rows = (offs_m < M)[None, :, None]
    kw_lo = tl.multiple_of(k_lo // 8, 8)  # as words'
    w_ptrs = w_ptr + rn[None, :, None] * swn + (kw_lo + ks // 8 + offs_j) * swk
    acc = tl.zeros([SUB, BLOCK_N, BLOCK_M], dtype=tl.float32)  # transposed: the weights are the MMA's A
    for k0 in range(k_lo, k_hi, SUB * BLOCK_K):
        kk = k0 + ks
        if EVEN_K:
            x = tl.load(x_ptrs, mask=x_rows, other=0.0)
            word = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=x_rows & ((kk + offs_k) < K), other=0.0)
            word = tl.load(w_ptrs, mask=(kk + 8 * offs_j) < K, other=0)
        if FORMAT == 0:  # each sub-step inside one group: the exact q - z in the dot, the row scale after it
            g = tl.minimum(k0 + tl.arange(0, SUB) * BLOCK_K, K - 1)[:, None] // GROUP  # [SUB, 1]
            s = tl.load(s_ptr + rn[None, :] * ssn + g * ssg).to(tl.float32)[:, :, None]
            z = tl.load(z_ptr + rn[None, :] * szn + g * szg)[:, :, None]
            p0, p1, p2, p3, p4, p5, p6, p7 = _int4_planes(word, z, DT, PTX)
        else:  # mxfp4: whole groups per sub-step, the scales inside the planes
            gi = tl.minimum(kk // GROUP + tl.arange(0, BLOCK_K // GROUP)[None, None, :], (K - 1) // GROUP)
            codes = tl.load(s_ptr + rn[None, :, None] * ssn + gi * ssg).to(tl.int32)
            if PTX:
                f1, f2 = _mx_scale_pairs(codes, DT)
                p0, p1, p2, p3, p4, p5, p6, p7 = _mx_planes(word, _per_group3(f1, GROUP, BLOCK_K),
                                                            _per_group3(f2, GROUP, BLOCK_K), DT)  # fmt: skip
            else:
                sc = _per_group3(_e8m0_to_f32(codes), GROUP, BLOCK_K)
                p0, p1, p2, p3, p4, p5, p6, p7 = _mx_word_planes(word, sc, DT, EMULATE_RNE)
        w = tl.reshape(_k_order(p0, p1, p2, p3, p4, p5, p6, p7), (SUB, BLOCK_N, BLOCK_K))
        xt = tl.permute(x, (0, 2, 1))
        if DOT_IEEE:
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w, xt)
        acc += part * s if FORMAT == 0 else part
        x_ptrs += SUB * BLOCK_K * sxk
        w_ptrs += (SUB * BLOCK_K // 8) * swk
    _wonly_finish(tl.trans(tl.sum(acc, axis=0)), ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm,
                  scn, HAS_BIAS, SPLIT_OUT, SPLIT_FIN, BLOCK_M, BLOCK_N)  # fmt: skip


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
        a, b = _load_k_tiles(a_ptrs, b_ptrs, k0, offs_k, K, EVEN_K)
        if DOT_IEEE:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    _epilogue(acc, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


HELPERS = ("_w16_dot", "_wonly_finish", "_word_plane", "_mx_group_codes", "_mx_word_scales", "_nibble_bits", "_int4_zero_pairs", "_int4_planes", "_mx_scale_pairs", "_mx_planes", "_words_part", "_per_group3", "_mx_word_planes", "_k_order")  # fmt: skip
KERNELS = ("_wonly_kernel", "_wonly_fused_kernel", "_wonly_words_kernel", "_wonly_wordsb_kernel", "_wonly_dequant_kernel", "_mm16_kernel")  # fmt: skip
