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
- M = 1 (`_gemv8_kernel`, `_gemv4_kernel`): no tl.dot, whose 16-row tile wastes 15/16 of its
  work and whose tile shapes leave too few programs; each program reads 4..32 weight rows as wide
  K-contiguous vectors (the next tile prefetched) and multiply-accumulates elementwise on the CUDA
  cores, fp32 (int32 for int8), reducing along K once at the end.
- 4-bit weights: whole [BLOCK_N, BLOCK_K/2] byte tiles are unpacked with shifts and masks; a tile
  spanning several scale groups loads each group's scale once and broadcasts it; the
  low nibbles (even k) and high nibbles (odd k) feed two dots against the even and odd columns of
  x, so no interleave is needed in the hot loop; `_wonly_fused_kernel` (w4a16) interleaves them
  back in registers for one dot against K-contiguous x. For large M, `_wonly_dequant_kernel` expands
  the weight once to x's dtype (`tl.interleave` keeps the stores contiguous) and `_mm16_kernel`
  (or torch.mm, the "deqb" path: cuBLAS is faster than a Triton 16-bit GEMM) runs the GEMM on it.
- 4-bit GEMV is bound by unpacking instructions, not HBM: `_gemv4g_kernel` shapes its tiles as
  whole scale groups (scales broadcast in registers, no reshape), `_gemv4w_kernel` reads int32
  words of 8 nibbles (a shift and a mask per nibble), and mxfp4 codes decode through fp16 bits
  (`_e2m1_to_f32_h`: no fp32 bit assembly, exact). `_gemv4x_kernel` reads x once per K step as
  whole words' 8 k (16-byte loads, prefetched) and splits the nibble planes in registers;
  `_gemv4r_kernel` takes one weight row per program so that the words and x's planes share one
  register layout (no shared memory at all).
- 4-bit at 1 < M <= 256 on int32 words (`_wonly_words_kernel`): the 8 planes of a word are joined
  back into K order so that a thread holds 8 consecutive k, which is the MMA operand's own layout
  (the unpacked tile never passes through shared memory). int4 puts the exact integers q - z in the
  dot and multiplies the step's fp32 partial by the row scale (the tile lies inside one group);
  on an NVIDIA GPU inline PTX builds two of them per byte permute + lop3 + packed fma (`planes_ptx`),
  and mxfp4's scaled values come from byte-permute table lookups (`mx_planes_ptx`): 269 / 396
  SASS instructions per 16x64x128 step against 425 / 711 in plain Triton.
- fp8 "lag" tiles (`_mm8_kernel` LAG): the promoted partial of each K step is added one step late,
  so the adds run beside the next step's MMAs instead of between them.
- "tma" tiles (`_mm8_tma_kernel`, Hopper): the 8-bit operands are read through tensor descriptors,
  so the copy engine fills shared memory and the warps only run MMAs and scaling (6-10% at M >= 1024);
  "tmap" (`_mm8_tmap_kernel`) runs them as a persistent grid whose tiles leave by descriptor store.
- Self-reducing split-K (`_split_finish`, the 4-bit tiles' SPLIT_FIN): the split that arrives last
  on its tile's counter sums all partials in split order, so no second kernel is launched.
- One-token activation quantization inside the 8-bit GEMV (`_gemv8_kernel` QUANT_A): int8 per
  token and fp8 per 1 x 128 block, bit for bit the act-quant kernel's, one launch per linear.
Numerics are those of the legacy bodies: fp32 accumulation (int32 for int8), fp8 products
promoted to fp32 every BLOCK_K (FAST_ACC off), 4-bit weights dequantized in fp32 and rounded once
to x's dtype -- except "gemvf" and int4's word tiles, which multiply the exact weight (its scale
applied in fp32 to a sum) as the torch backend does (mxfp4's weights are exact in x's dtype anyway);
see _triton_kernels.py's docstring for the interpreter workarounds they share.
"""

from __future__ import annotations

from typing import Any

# bound to triton.language by kernels._build(); the shared helpers (SHARED below: _cast_out, _epilogue, _scale_out,
# _tile_ids, _tile_of, _fp8_bits_to_f16, _round_to_fp8_grid) are set on this module by _build() too, decorated once
# for both modules
tl: Any = None
_cast_out: Any = None
_epilogue: Any = None
_scale_out: Any = None
_tile_ids: Any = None
_tile_of: Any = None
_fp8_bits_to_f16: Any = None
_round_to_fp8_grid: Any = None

GROUP_BCAST: Any = None  # tl.constexpr, set by _build() (env DIFFTEST_TRITON_GROUP_BCAST, default on)
E2M1_F16: Any = None  # tl.constexpr, set by _build() (env DIFFTEST_TRITON_E2M1_F16, default on)
# tl.constexpr PTX strings of `_int4_planes` / `_mx_planes` (fp16 / bf16), set by _build() from
# `planes_ptx` / `mx_planes_ptx`
PLANES_F16: Any = None
PLANES_BF16: Any = None
MX_PLANES_F16: Any = None
MX_PLANES_BF16: Any = None


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


SHARED = (
    "_cast_out",
    "_epilogue",
    "_scale_out",
    "_tile_ids",
    "_tile_of",
    "_fp8_bits_to_f16",
    "_round_to_fp8_grid",
)


# ----------------------------------------------------------------------------- jit helpers
def _block_scaled(part, sa, sb, A_MODE: tl.constexpr, B_MODE: tl.constexpr):
    """A block-mode K step's fp32 partial times its scales (a's [BM, 1], b's scalar or [1, BN])."""
    if A_MODE == 2 and B_MODE == 2:
        out = part * (sa * sb)
    elif A_MODE == 2:
        out = part * sa
    else:
        out = part * sb
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


def _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, kb, sas0, sas1, sbs0, sbs1, A_MODE: tl.constexpr,
                  B_MODE: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """K group kb's block scales for this tile: a's [BM, 1] and b's (`_b_block_scale`); 1.0 for a
    side that is not block scaled (`_block_scaled` ignores it)."""
    sa = 1.0
    sb = 1.0
    if A_MODE == 2:
        sa = tl.load(as_ptr + rm * sas0 + kb * sas1)[:, None]
    if B_MODE == 2:
        sb = _b_block_scale(bs_ptr, rn, pid_n, kb, sbs0, sbs1, GROUP, BLOCK_N)
    return sa, sb


def _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N):
    """Write one split's partial [BM, BN] to the workspace [SPLIT, M, N] (contiguous)."""
    base = ws_ptr + pid_k.to(tl.int64) * M * N
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def _split_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Split-K without a second kernel: each split writes its partial, counts itself in on its
    tile's counter (cnt_ptr[program_id(0)], release/acquire), and the last to arrive sums all
    SPLIT partials in split order -- the same order whichever split comes last, so the same bits
    on every run -- finishes the tile (bias, cast, store) and zeroes the counter for the next launch."""
    _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N)
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted
    tile = tl.program_id(0)
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT - 1:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for _ in range(0, SPLIT):
            total += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")  # past L1: other SMs wrote it
            ptrs += M * N
        tl.atomic_xchg(cnt_ptr + tile, 0)
        _epilogue(total, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


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


def _per_group(v, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, UNIT: tl.constexpr = 2):
    """[BN, BLOCK_K/GROUP] per-group values -> [BN, BLOCK_K/UNIT], one per byte (UNIT 2: GROUP/2
    bytes each) or per int32 word (UNIT 8: GROUP/8 words each)."""
    v = tl.broadcast_to(v[:, :, None], (v.shape[0], BLOCK_K // GROUP, GROUP // UNIT))
    return tl.reshape(v, (v.shape[0], BLOCK_K // UNIT))


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
    elif GROUP_BCAST and BLOCK_K % GROUP == 0:
        # several whole groups per tile (mxfp4: 32; int4 under wide GEMV tiles): load each row's
        # BLOCK_K/GROUP scales once and broadcast them over their GROUP/2 bytes, instead of one
        # gathered load per element (which made the load units, not HBM, the limit). The last
        # group is clamped as `ke` is.
        gi = tl.minimum(k0 // GROUP + tl.arange(0, BLOCK_K // GROUP), tl.max(ke) // GROUP)
        s = _per_group(tl.load(s_ptr + rn[:, None] * ssn + gi[None, :] * ssg), GROUP, BLOCK_K)
        if FORMAT == 0:
            z = _per_group(tl.load(z_ptr + rn[:, None] * szn + gi[None, :] * szg), GROUP, BLOCK_K)
            z = z.to(tl.float32)
    else:
        g = (ke // GROUP)[None, :]
        s = tl.load(s_ptr + rn[:, None] * ssn + g * ssg)
        if FORMAT == 0:
            z = tl.load(z_ptr + rn[:, None] * szn + g * szg).to(tl.float32)
    if FORMAT == 0:
        # q - z as (2**23 + q) - (2**23 + z): both sides exact integers below 2**24, so the same
        # value as _nibble_f32(q) - z with the 2**23 folded into z (once per row when z is per row)
        s = s.to(tl.float32)
        zb = z + 8388608.0
        we = ((lo | 0x4B000000).to(tl.float32, bitcast=True) - zb) * s
        wo = ((hi | 0x4B000000).to(tl.float32, bitcast=True) - zb) * s
    elif E2M1_F16:  # the value * 2**-14 in fewer instructions; both products exact (powers of two)
        sc = _e8m0_to_f32(s)
        we = (_e2m1_to_f32_h(lo) * 16384.0) * sc
        wo = (_e2m1_to_f32_h(hi) * 16384.0) * sc
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
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                PROMOTE: tl.constexpr = 128, LAG: tl.constexpr = False):  # fmt: skip
    """C = (A * sa) @ (B * sb)^T, fp8 (fp32 acc) or int8 (int32 acc); modes 0 tensor, 1 row, 2 block.

    fp8 products are promoted to the fp32 accumulator every PROMOTE = min(BLOCK_K, 128) of K
    (FAST_ACC off): a 256-deep K tile halves the loop's per-step overhead at the same numerics.
    LAG (fp8, FAST_ACC off; the "lag" configs): each K step's partial product is added to the
    accumulator one step later, so those adds run while the next step's MMAs do -- with the add
    right after its own MMA (Triton's promotion, or block mode's scaled add), the tensor cores
    wait for it every step. Same products, same fp32 sums in the same order.

    program_id(1) is the K split: it covers [pid_k * K_PER, +K_PER) (K_PER a multiple of
    BLOCK_K, and of GROUP in block mode); with SPLIT_OUT it writes its unscaled (tensor/row) or
    block-scaled partial to ws for `_splitk_reduce_kernel`, else it finishes the tile itself.
    """
    pid_n, pid_k, offs_m, offs_n, rm, rn, k_lo, k_hi = _split_tile(M, N, K, K_PER, BLOCK_M, BLOCK_N, GROUP_M)
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
    sa, sb = _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, k_lo // GROUP, sas0, sas1, sbs0, sbs1, A_MODE, B_MODE,
                           GROUP, BLOCK_N)  # fmt: skip
    if LAG:  # the previous step's partial (zero before the first step), already scaled in block mode
        prev = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
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
            sa_next, sb_next = _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, kn, sas0, sas1, sbs0, sbs1, A_MODE,
                                             B_MODE, GROUP, BLOCK_N)  # fmt: skip
            if LAG:
                acc += prev
                prev = _block_scaled(part, sa, sb, A_MODE, B_MODE)
            else:
                acc += _block_scaled(part, sa, sb, A_MODE, B_MODE)
            if A_MODE == 2:
                sa = sa_next
            if B_MODE == 2:
                sb = sb_next
        elif ACC_INT:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif FAST_ACC or DECODE != 0:
            acc = tl.dot(a, tl.trans(b), acc)
        elif LAG:
            part = tl.dot(a, tl.trans(b), max_num_imprecise_acc=PROMOTE)
            acc += prev
            prev = part
        else:
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=PROMOTE)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    if LAG:
        acc += prev
    if SPLIT_OUT:
        _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N)
    else:
        out = _scale_out(acc, as_ptr, bs_ptr, rm, rn, sas0, sbs0, A_MODE, B_MODE)
        _epilogue(out, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _tma_tile(a_desc, b_desc, as_ptr, bs_ptr, pid_m, pid_n, M, N, K, sas0, sas1, sbs0, sbs1,
              A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr, ACC_INT: tl.constexpr,
              FAST_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PROMOTE: tl.constexpr):  # fmt: skip
    """One output tile of the "tma" kernels, scaled, fp32 (before bias and cast), and its rows and columns."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if ACC_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # block scales of the current K step; the next step's are loaded before these are used
    sa, sb = _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, 0, sas0, sas1, sbs0, sbs1, A_MODE, B_MODE, GROUP,
                           BLOCK_N)  # fmt: skip
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k0])
        b = b_desc.load([off_n, k0])
        if A_MODE == 2 or B_MODE == 2:
            part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
            kn = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP
            sa_next, sb_next = _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, kn, sas0, sas1, sbs0, sbs1, A_MODE,
                                             B_MODE, GROUP, BLOCK_N)  # fmt: skip
            acc += _block_scaled(part, sa, sb, A_MODE, B_MODE)
            if A_MODE == 2:
                sa = sa_next
            if B_MODE == 2:
                sb = sb_next
        elif ACC_INT:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif FAST_ACC:
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=PROMOTE)
    return _scale_out(acc, as_ptr, bs_ptr, rm, rn, sas0, sbs0, A_MODE, B_MODE), offs_m, offs_n


def _mm8_tma_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn, sas0, sas1, sbs0, sbs1,
                    A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACC_INT: tl.constexpr, FAST_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROMOTE: tl.constexpr = 128):  # fmt: skip
    """`_mm8_kernel`'s tile (the "tma" configs) with a and b read through tensor descriptors: on
    Hopper each K step's tiles arrive by bulk tensor copy (TMA) straight into shared memory, with no
    address arithmetic or load instructions in the warps that run the MMAs -- 6-10% more TFLOP/s at
    M >= 1024 on an H200, and the 256-row tile becomes the fastest in every scale mode but block.
    Rows, columns and K beyond the tensors read as zeros (the descriptors' padding), so the loads
    need no masks. Same sums in the same order as `_mm8_kernel`'s tile path; no split-K, no
    decoded fp8 bits, no lag (the launcher falls back to "tile" where descriptors cannot be made)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    out, offs_m, offs_n = _tma_tile(a_desc, b_desc, as_ptr, bs_ptr, pid_m, pid_n, M, N, K, sas0, sas1, sbs0, sbs1,
                                    A_MODE, B_MODE, GROUP, ACC_INT, FAST_ACC, BLOCK_M, BLOCK_N, BLOCK_K,
                                    PROMOTE)  # fmt: skip
    _epilogue(out, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


def _mm8_tmap_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, bias_ptr, M, N, K, sas0, sas1, sbs0, sbs1,
                     PROGRAMS: tl.constexpr, A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACC_INT: tl.constexpr, FAST_ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROMOTE: tl.constexpr = 128):  # fmt: skip
    """`_mm8_tma_kernel` as a persistent grid (the "tmap" configs): PROGRAMS programs (one per
    multiprocessor, a constant per device: one compile) walk the output tiles in `_tile_of`
    order, and each tile leaves through a descriptor store (the copy engine writes it while the
    next tile's loads and MMAs start; the flattened loop lets the pipeliner prefetch across tiles).
    3% more than "tma" at 4096^3 on an H200 for tensor / row scales in a standalone sweep (1023
    against 993 TFLOP/s); the same sums, one rounding at the store."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        out, offs_m, offs_n = _tma_tile(a_desc, b_desc, as_ptr, bs_ptr, pid_m, pid_n, M, N, K, sas0, sas1, sbs0,
                                        sbs1, A_MODE, B_MODE, GROUP, ACC_INT, FAST_ACC, BLOCK_M, BLOCK_N, BLOCK_K,
                                        PROMOTE)  # fmt: skip
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], _cast_out(out, c_desc.dtype))  # clipped at M, N


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


def _split_tile(M, N, K, K_PER, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile and K range (program_id(1) is the split): its column-tile index and
    split, its rows and columns, those wrapped into range (every load stays in bounds; the stores
    are masked), and [k_lo, k_hi)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * K_PER
    return pid_n, pid_k, offs_m, offs_n, offs_m % M, offs_n % N, k_lo, tl.minimum(k_lo + K_PER, K)


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
    if SPLIT_FIN:
        _split_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, HAS_BIAS,
                      BLOCK_M, BLOCK_N)  # fmt: skip
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
    capped at 2**15)."""
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
    x_ptrs = x_ptr + rm[:, None] * sxm + (k_lo + offs_k)[None, :] * sxk
    w_ptrs = w_ptr + rn[:, None] * swn + (k_lo // 8 + offs_j)[None, :] * swk
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if FORMAT == 0:  # the tile inside one group: the exact q - z in the dots, the row scale after them
            s = tl.load(s_ptr + rn * ssn + (k0 // GROUP) * ssg).to(tl.float32)
            z = tl.load(z_ptr + rn * szn + (k0 // GROUP) * szg)[:, None]
        else:  # mxfp4: the scales enter the planes (unused here)
            s = 1.0
            z = 0
        part = _words_part(x_ptrs, w_ptrs, k0, offs_j, offs_k, rn, s_ptr, z, K, ssn, ssg, FORMAT, GROUP, DOT_IEEE,
                           EMULATE_RNE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PTX)  # fmt: skip
        acc += part * s[None, :] if FORMAT == 0 else part
        x_ptrs += BLOCK_K * sxk
        w_ptrs += (BLOCK_K // 8) * swk
    _wonly_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, HAS_BIAS,
                  SPLIT_OUT, SPLIT_FIN, BLOCK_M, BLOCK_N)  # fmt: skip


def _words_part(x_ptrs, w_ptrs, k0, offs_j, offs_k, rn, s_ptr, z, K, ssn, ssg,
                FORMAT: tl.constexpr, GROUP: tl.constexpr, DOT_IEEE: tl.constexpr, EMULATE_RNE: tl.constexpr,
                EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PTX: tl.constexpr):  # fmt: skip
    """One K step of `_wonly_words_kernel`: x's [BM, BK] tile times the step's dequantized words, from a
    zero accumulator (int4's row scale multiplies it after; splitting a step into two or four such
    parts, independent MMA chains, measured 7-30% slower on an H200)."""
    DT: tl.constexpr = x_ptrs.dtype.element_ty
    if EVEN_K:
        x = tl.load(x_ptrs)
        word = tl.load(w_ptrs)
    else:  # past K: x is 0, so the words there (0, dequantized to -z * s) add nothing
        x = tl.load(x_ptrs, mask=((k0 + offs_k) < K)[None, :], other=0.0)
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
        p0 = _word_plane(word, 0, sc, DT, EMULATE_RNE)
        p1 = _word_plane(word, 1, sc, DT, EMULATE_RNE)
        p2 = _word_plane(word, 2, sc, DT, EMULATE_RNE)
        p3 = _word_plane(word, 3, sc, DT, EMULATE_RNE)
        p4 = _word_plane(word, 4, sc, DT, EMULATE_RNE)
        p5 = _word_plane(word, 5, sc, DT, EMULATE_RNE)
        p6 = _word_plane(word, 6, sc, DT, EMULATE_RNE)
        p7 = _word_plane(word, 7, sc, DT, EMULATE_RNE)
    # [BN, BK/8, 2, 2, 2] indexed (j, c, b, a) holds plane 4c + 2b + a: k = 8j + 4c + 2b + a
    w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    w = tl.reshape(w, (BLOCK_N, BLOCK_K))
    return _w16_dot(x, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_IEEE)


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


def _gemv_operand(v, ACC_INT: tl.constexpr, DECODE: tl.constexpr):
    """An 8-bit tile (fp8, int8 or fp8 bits) -> the GEMV's multiply type: int32 (exact int8 products
    and sums) or fp32 (exact fp8 products)."""
    if ACC_INT:
        r = v.to(tl.int32)
    elif DECODE != 0:
        r = _fp8_bits_to_f16(v, DECODE == 2).to(tl.float32)
    else:
        r = v.to(tl.float32)
    return r


def _gemv_store(acc, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, SPLIT_OUT: tl.constexpr,
                HAS_BIAS: tl.constexpr):  # fmt: skip
    """One output row segment [BLOCK_N] (already scaled): the split-K workspace, or bias + cast + store."""
    nmask = offs_n < N
    if SPLIT_OUT:
        tl.store(ws_ptr + (pid_k.to(tl.int64) * M + row) * N + offs_n, acc, mask=nmask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(c_ptr + row * scm + offs_n * scn, _cast_out(acc, c_ptr.dtype.element_ty), mask=nmask)


def _act_scale(amax, QMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr):
    """`_quant_act_kernel`'s scale from a group's amax: max(amax, floor) / QMAX, correctly rounded."""
    m = tl.maximum(amax, AMAX_FLOOR)
    return tl.sum(tl.math.div_rn(tl.zeros([1], dtype=tl.float32) + m, tl.full([1], QMAX, tl.float32)), axis=0)


def _row_amax(a_row, K, sak, BLOCK_K: tl.constexpr):
    """max |x| over one activation row (a max: its order of evaluation cannot change it)."""
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(a_row + (k0 + offs) * sak, mask=k0 + offs < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    return tl.max(amax, axis=0)


def _act_quantized(x, scale, QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr):
    """x -> `_quant_act_kernel`'s q = rne(clamp(x / scale)): int32 for int8, the e4m3 grid value
    (fp32, exact) for fp8 -- what the GEMV would have read back from the stored q."""
    y = tl.math.div_rn(x.to(tl.float32), tl.zeros(x.shape, dtype=tl.float32) + scale)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if INT8:  # noqa: SIM108 - a constexpr branch: Triton compiles only the taken side
        r = ((y + 12582912.0) - 12582912.0).to(tl.int32)
    else:
        r = _round_to_fp8_grid(y, FNUZ)
    return r


def _gemv8_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, K_PER,
                  sam, sak, sbn, sbk, scm, scn, sas0, sas1, sbs0, sbs1,
                  A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ACC_INT: tl.constexpr, DECODE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT_A: tl.constexpr = False,
                  QMAX: tl.constexpr = 127.0, FNUZ: tl.constexpr = False,
                  AMAX_FLOOR: tl.constexpr = 0.0):  # fmt: skip
    """The M = 1 form of `_mm8_kernel` (same arguments, same split-K contract): no tl.dot.

    A 16-row MMA tile wastes 15/16 of its work on one token and, with the tile shapes a dot wants,
    leaves too few programs to keep HBM busy. Grid (N / BLOCK_N, splits, M): each program owns
    BLOCK_N (4..32) weight rows of one activation row, reads them once as wide K-contiguous
    vectors, prefetching the next K tile into registers before it works on this one (Triton's
    pipeliner stages only dot operands), and multiplies-accumulates elementwise on the CUDA cores
    into a [BLOCK_N, BLOCK_K] accumulator (fp32: fp8 products are exact; int32 for int8) that is
    reduced once at the end -- no cross-warp reduction inside the loop. Block scales multiply each
    K tile's products (BLOCK_K divides GROUP), as `_mm8_kernel` scales each tile's partial.

    QUANT_A: a is the unquantized activation row, quantized here as `_quant_act_kernel` does it,
    bit for bit (scale = max(amax, floor) / QMAX correctly rounded, q = rne(clamp(x / scale))):
    one kernel per linear instead of two, which at batch 1 is most of the gain (a decode step is
    bound by its kernel count). A_MODE 1 (int8 per token): every program reads the whole row for
    the amax (K values, from L2) and writes the scale to as_ptr for the split-K reduction; A_MODE 2
    (fp8, 1 x GROUP blocks, BLOCK_K == GROUP): each K tile is one group, its own amax.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    offs_k = tl.arange(0, BLOCK_K)
    b_rows = b_ptr + rn[:, None] * sbn
    a_row = a_ptr + row * sam
    if ACC_INT:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    a_scale = 1.0
    if QUANT_A and A_MODE == 1:
        a_scale = _act_scale(_row_amax(a_row, K, sak, BLOCK_K), QMAX, AMAX_FLOOR)
        if (pid_n == 0) & (pid_k == 0):
            tl.store(as_ptr + row * sas0, a_scale)
    kk = k_lo + offs_k
    if EVEN_K:  # noqa: SIM108 - a statement-level constexpr branch compiles on every triton
        b = tl.load(b_rows + kk[None, :] * sbk)
    else:
        b = tl.load(b_rows + kk[None, :] * sbk, mask=(kk < K)[None, :], other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        # the next tile's bytes (clamped into range; the last prefetch is loaded and unused)
        if EVEN_K:
            kn = tl.minimum(k0 + BLOCK_K, K - BLOCK_K) + offs_k
            b_next = tl.load(b_rows + kn[None, :] * sbk)
            a = tl.load(a_row + kk * sak)
        else:
            kn = k0 + BLOCK_K + offs_k
            b_next = tl.load(b_rows + kn[None, :] * sbk, mask=(kn < K)[None, :], other=0.0)
            a = tl.load(a_row + kk * sak, mask=kk < K, other=0.0)
        if QUANT_A and A_MODE == 2:  # this tile is one scale group
            a_scale = _act_scale(tl.max(tl.abs(a.to(tl.float32)), axis=0), QMAX, AMAX_FLOOR)
            av = _act_quantized(a, a_scale, QMAX, ACC_INT, FNUZ) * a_scale
        elif QUANT_A:
            av = _act_quantized(a, a_scale, QMAX, ACC_INT, FNUZ)
        else:
            av = _gemv_operand(a, ACC_INT, DECODE)
        if A_MODE == 2 and not QUANT_A:
            av = av * tl.load(as_ptr + row * sas0 + (k0 // GROUP) * sas1)
        prod = _gemv_operand(b, ACC_INT, DECODE) * av[None, :]
        if B_MODE == 2:
            prod = prod * tl.load(bs_ptr + (rn // GROUP) * sbs0 + (k0 // GROUP) * sbs1)[:, None]
        acc += prod
        b = b_next
    out = tl.sum(acc, axis=1)
    if not SPLIT_OUT:  # tensor / row scales (block ones were applied per K tile)
        out = out.to(tl.float32)
        if QUANT_A and A_MODE == 1:
            out = out * a_scale
        elif A_MODE == 0:
            out = out * tl.load(as_ptr)
        elif A_MODE == 1:
            out = out * tl.load(as_ptr + row * sas0)
        if B_MODE == 0:
            out = out * tl.load(bs_ptr)
        elif B_MODE == 1:
            out = out * tl.load(bs_ptr + rn * sbs0)
    _gemv_store(out, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, SPLIT_OUT, HAS_BIAS)


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
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_j = tl.arange(0, BLOCK_K // 2)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
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


def _e2m1_to_f32_h(q):
    """4-bit e2m1 code -> fp32 value * 2**-14 in four integer ops and one conversion: e2m1's 3
    magnitude bits dropped into an fp16's low exponent and top mantissa bits are that value scaled
    by 2**-14 (code 1, e2m1's subnormal 0.5, lands on fp16's subnormal 2**-15), and fp16 -> fp32 is
    exact. The caller multiplies 2**14 back in once per group, with the group's power-of-two scale."""
    h = ((q & 7) << 9) | ((q & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


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
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    jb = offs_g[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]  # [groups, GROUP/2] byte index
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
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
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    jw = offs_g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]  # [groups, GROUP/8] words
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
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
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if FORMAT == 1 and E2M1_F16:
        out = out * 16384.0
    _gemv_store(out, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, SPLIT_OUT, HAS_BIAS)


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


def _gemv4h_e2m1(word, P: tl.constexpr):
    """Nibbles P and P + 4 of every word -> their e2m1 values * 2**-14 (fp32): both halves' codes
    land in two fp16 at once (`_e2m1_to_f32_h`'s bits: magnitude to bits 9..11, sign to 15)."""
    if P < 3:  # noqa: SIM108
        mag = word << (9 - 4 * P)
    else:
        mag = word >> 3  # bits 12..14 -> 9..11 (an arithmetic shift: only bits 29..31 see the sign)
    v = (mag & 0x0E000E00) | ((word << (12 - 4 * P)) & -0x7FFF8000)  # 0x80008000: the halves' sign bits
    fl = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    fh = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return fl, fh


def _gemv4h_word(word, x0, x1, x2, x3, x4, x5, x6, x7, zf, FORMAT: tl.constexpr):
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
        a, b = _gemv4h_e2m1(word, 0)
        t = a * x0
        t += b * x4
        a, b = _gemv4h_e2m1(word, 1)
        t += a * x1
        t += b * x5
        a, b = _gemv4h_e2m1(word, 2)
        t += a * x2
        t += b * x6
        a, b = _gemv4h_e2m1(word, 3)
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
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // GROUP
    W: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    offs_g = tl.arange(0, G)
    jw = offs_g[:, None] * W + tl.arange(0, W)[None, :]  # [groups, GROUP/8] words
    kx = 8 * jw[:, :, None] + tl.arange(0, 8)[None, None, :]  # [groups, GROUP/8, 8]: the k of each nibble
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
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
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if FORMAT == 1 and E2M1_F16:
        out = out * 16384.0
    _gemv_store(out, c_ptr, ws_ptr, bias_ptr, row, pid_k, offs_n, M, N, scm, scn, SPLIT_OUT, HAS_BIAS)


def _gemv4r_kernel(x_ptr, w_ptr, c_ptr, ws_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                   sxm, sxk, swn, swk, scm, scn, ssn, ssg, szn, szg,
                   FORMAT: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EMULATE_RNE: tl.constexpr, SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FACTORED: tl.constexpr = False,
                   X_PAIRS: tl.constexpr = False):  # fmt: skip
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
            acc += s3 * _gemv4h_word(word, x0, x1, x2, x3, x4, x5, x6, x7, z.to(tl.float32), FORMAT)
            if BLOCK_N == 2:
                # the second row's words, scales and zeros (its x loads are the first's: dropped)
                word1, _, s1, z1 = _gemv4r_loads(w_ptr + n1 * swn, x_row, s_ptr, z_ptr, n1, k0, jw, kx, og, K, swk,
                                                 sxk, ssn, ssg, szn, szg, FORMAT, GROUP, EVEN_K, X_PAIRS)  # fmt: skip
                acc1 += _gemv4r_scale(s1, FORMAT) * _gemv4h_word(word1, x0, x1, x2, x3, x4, x5, x6, x7,
                                                                 z1.to(tl.float32), FORMAT)  # fmt: skip
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


HELPERS = ("_act_scale", "_row_amax", "_act_quantized", "_tma_tile", "_block_scales", "_block_scaled", "_split_finish", "_b_block_scale", "_split_store", "_e8m0_to_f32", "_e2m1_to_f32", "_nibble_f32",
           "_to_operand", "_per_group", "_dequant_pair", "_gemv_operand", "_gemv_store", "_e2m1_to_f32_h",
           "_gemv4w_words", "_gemv4w_x", "_gemv4w_next",
           "_gemv4x_planes", "_gemv4x_term", "_gemv4h_nib", "_gemv4h_e2m1", "_gemv4h_word", "_bf16_pairs", "_bf16_pair_planes", "_gemv4r_loads", "_gemv4r_scale", "_word_plane", "_mx_group_codes", "_mx_word_scales", "_nibble_bits", "_words_part", "_int4_zero_pairs", "_int4_planes", "_mx_scale_pairs", "_mx_planes", "_w16_dot", "_wonly_finish", "_split_tile")  # fmt: skip
PLAIN_HELPERS = {name: globals()[name] for name in HELPERS}
KERNELS = (
    "_mm8_kernel",
    "_mm8_tma_kernel",
    "_mm8_tmap_kernel",
    "_splitk_reduce_kernel",
    "_wonly_kernel",
    "_wonly_dequant_kernel",
    "_mm16_kernel",
    "_gemv8_kernel",
    "_gemv4_kernel",
    "_wonly_fused_kernel",
    "_wonly_words_kernel",
    "_gemv4g_kernel",
    "_gemv4w_kernel",
    "_gemv4x_kernel",
    "_gemv4r_kernel",
)
