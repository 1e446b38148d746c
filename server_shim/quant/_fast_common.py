"""What more than one family of the fast kernels uses: split-K partials and their self-reduction, the
4-bit decoders (nibbles, e2m1, e8m0) and dequantization of a byte tile, the GEMVs' store.

Plain bodies: _triton_fast.bind() makes them kernels.
"""

from __future__ import annotations

from typing import Any

# bound by _triton_fast.bind(): triton.language, the helpers shared with the legacy bodies
# (_triton_kernels.py) and the constexpr switches (see _triton_fast.py)
tl: Any = None
_cast_out: Any = None
_epilogue: Any = None
_scale_out: Any = None
_tile_ids: Any = None
_tile_of: Any = None
_fp8_bits_to_f16: Any = None
_round_to_fp8_grid: Any = None
GROUP_BCAST: Any = None
E2M1_F16: Any = None
PLANES_F16: Any = None
PLANES_BF16: Any = None
MX_PLANES_F16: Any = None
MX_PLANES_BF16: Any = None
F16_PAIR_TO_F32: Any = None


def _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N):
    """Write one split's partial [BM, BN] to the workspace [SPLIT, M, N] (contiguous)."""
    base = ws_ptr + pid_k.to(tl.int64) * M * N
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def _split_sum(ws_ptr, offs_m, offs_n, M, N, SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's SPLIT partials from the workspace [SPLIT, M, N], summed in split order in its type
    (int8's int32 exactly) and read past L1 (other SMs wrote them): the one sum both the
    self-reducing splits (`_split_finish`) and the reduction kernel use, so they give the same bits."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=ws_ptr.dtype.element_ty)
    for _ in range(0, SPLIT):
        total += tl.load(ptrs, mask=mask, other=0, cache_modifier=".cg")
        ptrs += M * N  # pointer arithmetic is 64-bit: no int32 overflow of split * M * N
    return total


def _split_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn,
                  as_ptr, bs_ptr, sas0, sbs0, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  A_MODE: tl.constexpr, B_MODE: tl.constexpr):  # fmt: skip
    """Split-K without a second kernel: each split writes its partial, counts itself in on its
    tile's counter (cnt_ptr[program_id(0)], release/acquire), and the last to arrive sums all
    SPLIT partials in split order -- the same order whichever split comes last, so the same bits
    on every run, and those of the reduction kernel -- finishes the tile (the 8-bit GEMMs' tensor /
    row scales, `_scale_out`: modes 2 mean none, bias, cast, store) and zeroes the counter for the
    next launch. The partials sum in the workspace's type: int8's int32 exactly."""
    _split_store(acc, ws_ptr, pid_k, offs_m, offs_n, M, N)
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted
    tile = tl.program_id(0)
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT - 1:
        total = _split_sum(ws_ptr, offs_m, offs_n, M, N, SPLIT, BLOCK_M, BLOCK_N)
        tl.atomic_xchg(cnt_ptr + tile, 0)
        total = _scale_out(total, as_ptr, bs_ptr, offs_m % M, offs_n % N, sas0, sbs0, A_MODE, B_MODE)
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


def _e2m1_to_f32_h(q):
    """4-bit e2m1 code -> fp32 value * 2**-14 in four integer ops and one conversion: e2m1's 3
    magnitude bits dropped into an fp16's low exponent and top mantissa bits are that value scaled
    by 2**-14 (code 1, e2m1's subnormal 0.5, lands on fp16's subnormal 2**-15), and fp16 -> fp32 is
    exact. The caller multiplies 2**14 back in once per group, with the group's power-of-two scale."""
    h = ((q & 7) << 9) | ((q & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _load_k_tiles(a_ptrs, b_ptrs, k0, offs_k, K, EVEN_K: tl.constexpr):
    """A K step's a [BM, BK] and b [BN, BK] tiles (K along axis 1); past K: 0 (EVEN_K: nothing is)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        kmask = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[None, :], other=0.0)
    return a, b


def _gemv_place(N, K, K_PER, BLOCK_N: tl.constexpr):
    """A GEMV program's place in its grid (BLOCK_N outputs, K split, x row): (x row, split, its
    output columns, those wrapped inside N for loads, the split's K range [k_lo, k_hi))."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    return row, pid_k, offs_n, rn, k_lo, k_hi


HELPERS = ("_gemv_place", "_load_k_tiles", "_split_store", "_split_sum", "_split_finish", "_e8m0_to_f32", "_e2m1_to_f32", "_nibble_f32", "_to_operand", "_per_group", "_dequant_pair", "_split_tile", "_gemv_store", "_e2m1_to_f32_h")  # fmt: skip
KERNELS = ()  # fmt: skip
