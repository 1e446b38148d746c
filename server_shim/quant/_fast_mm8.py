"""The fast 8-bit kernels (fp8 tensor / row / block, int8): the pointer tile (`_mm8_kernel`, with its
"lag" variant), the tensor-descriptor tiles ("tma", and "tmap" as a persistent grid), the split-K
second pass, and the GEMV that quantizes its one token itself.

Plain bodies: _triton_fast.bind() makes them kernels.
"""

from __future__ import annotations

# placeholders and plain helpers, each rebound here by bind()
from server_shim.quant._fast_common import (
    _cast_out,
    _epilogue,
    _fp8_bits_to_f16,
    _gemv_place,
    _gemv_store,
    _load_k_tiles,
    _round_to_fp8_grid,
    _scale_out,
    _split_finish,
    _split_store,
    _split_sum,
    _split_tile,
    _tile_ids,
    _tile_of,
    tl,
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


def _block_step(a, b, acc, prev, sa, sb, as_ptr, bs_ptr, rm, rn, pid_n, k0, K, sas0, sas1, sbs0, sbs1,
                A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, LAG: tl.constexpr):  # fmt: skip
    """One block-mode K step -> (acc, prev, sa, sb): its fp32 partial times this step's scales
    added to acc (LAG: kept as prev, and the previous step's added while this step's MMAs run),
    and the next step's scales, loaded before these are used (Triton's pipeliner stages only the
    dot operands' loads: this hides the scales' latency; the last step reloads a valid group)."""
    part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
    kn = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP
    sa_next, sb_next = _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, kn, sas0, sas1, sbs0, sbs1, A_MODE, B_MODE,
                                     GROUP, BLOCK_N)  # fmt: skip
    if LAG:
        acc += prev
        prev = _block_scaled(part, sa, sb, A_MODE, B_MODE)
    else:
        acc += _block_scaled(part, sa, sb, A_MODE, B_MODE)
    if A_MODE == 2:
        sa = sa_next
    if B_MODE == 2:
        sb = sb_next
    return acc, prev, sa, sb


# ----------------------------------------------------------------------------- kernels
def _mm8_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, K_PER,
                sam, sak, sbn, sbk, scm, scn, sas0, sas1, sbs0, sbs1, cnt_ptr, SPLIT,
                A_MODE: tl.constexpr, B_MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACC_INT: tl.constexpr, DECODE: tl.constexpr, FAST_ACC: tl.constexpr,
                SPLIT_OUT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                PROMOTE: tl.constexpr = 128, LAG: tl.constexpr = False,
                SPLIT_FIN: tl.constexpr = False):  # fmt: skip
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
    SPLIT_FIN (with SPLIT_OUT): the SPLIT splits sum themselves instead (`_split_finish`, one int32
    counter per output tile at cnt_ptr): no second kernel, whose launch is most of a small-M split's
    cost in a CUDA graph.
    """
    pid_n, pid_k, offs_m, offs_n, rm, rn, k_lo, k_hi = _split_tile(M, N, K, K_PER, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * sam + (k_lo + offs_k)[None, :] * sak
    b_ptrs = b_ptr + rn[:, None] * sbn + (k_lo + offs_k)[None, :] * sbk  # [BLOCK_N, BLOCK_K], K contiguous
    if ACC_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # block scales of the first K step; each step then loads the next step's (`_block_step`).
    # a's and b's are carried apart: their [BM, BN] product would double the tile's registers.
    sa, sb = _block_scales(as_ptr, bs_ptr, rm, rn, pid_n, k_lo // GROUP, sas0, sas1, sbs0, sbs1, A_MODE, B_MODE,
                           GROUP, BLOCK_N)  # fmt: skip
    if LAG:  # the previous step's partial (zero before the first step), already scaled in block mode
        prev = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a, b = _load_k_tiles(a_ptrs, b_ptrs, k0, offs_k, K, EVEN_K)
        if DECODE != 0:
            a = _fp8_bits_to_f16(a, DECODE == 2)
            b = _fp8_bits_to_f16(b, DECODE == 2)
        if A_MODE == 2 or B_MODE == 2:
            if LAG:
                acc, prev, sa, sb = _block_step(a, b, acc, prev, sa, sb, as_ptr, bs_ptr, rm, rn, pid_n, k0, K, sas0,
                                                sas1, sbs0, sbs1, A_MODE, B_MODE, GROUP, BLOCK_N, BLOCK_K, True)  # fmt: skip
            else:
                acc, _, sa, sb = _block_step(a, b, acc, acc, sa, sb, as_ptr, bs_ptr, rm, rn, pid_n, k0, K, sas0, sas1,
                                             sbs0, sbs1, A_MODE, B_MODE, GROUP, BLOCK_N, BLOCK_K, False)  # fmt: skip
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
    if SPLIT_FIN:
        _split_finish(acc, ws_ptr, cnt_ptr, pid_k, SPLIT, offs_m, offs_n, M, N, c_ptr, bias_ptr, scm, scn, as_ptr,
                      bs_ptr, sas0, sbs0, HAS_BIAS, BLOCK_M, BLOCK_N, A_MODE, B_MODE)  # fmt: skip
    elif SPLIT_OUT:
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
            acc, _, sa, sb = _block_step(a, b, acc, acc, sa, sb, as_ptr, bs_ptr, rm, rn, pid_n, k0, K, sas0, sas1,
                                         sbs0, sbs1, A_MODE, B_MODE, GROUP, BLOCK_N, BLOCK_K, False)  # fmt: skip
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
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Sum the SPLIT partials in split order (deterministic, `_split_sum`), then the tensor/row
    scales, bias, cast.

    int8 partials are int32 (the workspace's type) and sum exactly; mode 2 means "already scaled"
    (block, weight-only).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _split_sum(ws_ptr, offs_m, offs_n, M, N, SPLIT, BLOCK_M, BLOCK_N)
    out = _scale_out(acc, as_ptr, bs_ptr, offs_m % M, offs_n % N, sas0, sbs0, A_MODE, B_MODE)
    _epilogue(out, c_ptr, bias_ptr, offs_m, offs_n, M, N, scm, scn, HAS_BIAS)


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
    row, pid_k, offs_n, rn, k_lo, k_hi = _gemv_place(N, K, K_PER, BLOCK_N)
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
        if (tl.program_id(0) == 0) & (pid_k == 0):  # once per row: its first column tile's first split
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


HELPERS = ("_block_scaled", "_b_block_scale", "_block_scales", "_block_step", "_tma_tile", "_gemv_operand", "_act_scale", "_row_amax", "_act_quantized")  # fmt: skip
KERNELS = ("_mm8_kernel", "_mm8_tma_kernel", "_mm8_tmap_kernel", "_splitk_reduce_kernel", "_gemv8_kernel")  # fmt: skip
