"""The 4-bit weight-only GEMMs for decode batches (M <= 16) on NVIDIA GPUs, written in Gluon
("wordsg" and "wordsq" configs).

Why it exists: at M <= 16 a 4-bit GEMM should be bound by reading its weights (a quarter of bf16's
bytes), but the plain-Triton word tile ("wordsb") spent about 2.3 of its 7.8 us staging x's MMA
operand: Triton sends a dot's operands through shared memory (an async copy, a barrier, the
shared-memory reads), and a tile that reads x afresh every K step pays that every step (docs/gemm.md,
`bench/wordsb_anatomy.py`). Gluon names the layouts: here each warp loads x's K step straight
from global memory into the registers of the MMA's B operand (mma.sync, k_width 8: 8 consecutive
k per thread, one 16-byte load each), loads the weight words into the registers of its A
operand, dequantizes them in place with the word tiles' inline PTX (`_fast_w4.planes_ptx`,
`mx_planes_ptx`: q - z exact, or the e2m1 value times its power-of-two scale), and issues the next
step's loads before this step's math. Nothing passes through shared memory but the final sum of
the warps' partials.

The sums are "wordsb"'s: SUB = num_warps consecutive K steps side by side (one per warp), int4's
dot on the exact q - z with the row scale times each step's fp32 partial, the warps' partials
summed once at the end. x travels as int32 pairs (carried from one step to the next as 16-bit
values, LLVM re-packed them every step: 40 more instructions) and is split at its use.

"wordsq" computes the same sums with both operands as loaded (`_wonly_wordsq_kernel`): k's order
permuted alike on both sides, so that with k_width 4 x's registers are the MMA's operand pairs
without moves and a thread's 4 words of a row are one 16-byte load (for mxfp4 one scale group).

Gluon kernels do not run under the Triton interpreter: where `arch.gluon_mma_w4` says no (CPU,
ROCm, a triton without Gluon) a "wordsg" or "wordsq" config runs as "wordsb", the same sums in
plain Triton. No tuner list offers "wordsg": with its weights read from HBM, as in a decode step,
it was slower than "gemvf" and "wordsb"; Hopper's M <= 16 list has "wordsq", which wins mxfp4 with
fp16 x at M = 16 and, two steps ahead, int4-g128 at M = 1 (docs/gemm.md).
"""

from __future__ import annotations

import torch

from server_shim.quant._fast_w4 import mx_planes_ptx, planes_ptx

try:  # Gluon ships with triton >= 3.5; absent (or unusable) elsewhere
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    IMPORTED = True
except Exception:  # noqa: BLE001 -- any import failure means "no Gluon path"
    IMPORTED = False

BLOCK_K = 128  # one K step: one int4 group (GROUP 128), four mxfp4 groups (GROUP 32)
BLOCK_M = 16  # x's rows: the MMA's N (two n8 tiles); M <= 16 only
GROUPS = {0: 128, 1: 32}  # FORMAT -> the group size the kernel's scale indexing assumes

if IMPORTED:
    _BK = gl.constexpr(BLOCK_K)
    _BM = gl.constexpr(BLOCK_M)

    @gluon.jit
    def _pair_halves(x, BF16: gl.constexpr):
        """int32 pairs -> their low and high 16-bit values (x's dtype)."""
        if BF16:
            lo, hi = gl.inline_asm_elementwise(
                "mov.b32 {$0, $1}, $2;", "=h,=h,r", [x], (gl.bfloat16,) * 2, True, 1
            )
        else:
            lo, hi = gl.inline_asm_elementwise(
                "mov.b32 {$0, $1}, $2;", "=h,=h,r", [x], (gl.float16,) * 2, True, 1
            )
        return lo, hi

    @gluon.jit
    def _split_pairs(x, BF16: gl.constexpr):
        """int32 pairs [SUB, BK/2, BM] -> their two 16-bit values [SUB, BK, BM] in k order."""
        lo, hi = _pair_halves(x, BF16)
        return gl.reshape(gl.permute(gl.join(lo, hi), (0, 1, 3, 2)), [x.shape[0], 2 * x.shape[1], x.shape[2]])

    @gluon.jit
    def _mx_factors(e, BF16: gl.constexpr):
        """e8m0 codes -> 2**(e - 127) as `mx_planes_ptx` takes it (`_fast_w4._mx_scale_pairs`)."""
        if BF16:
            f1 = gl.where(e == 0, 0x40, gl.where(e == 255, 0x7FC0, e << 7))
            f2 = gl.full(e.shape, 0x3F80, gl.int32, e.type.layout)
        else:
            xe = e - 127
            a = gl.minimum(gl.maximum(xe, -14), 15)
            b = gl.minimum(xe - a, 15)
            f1 = (a + 15) << 10
            f2 = gl.where(b < -24, 0, gl.where(b < -14, 1 << (b + 24), (b + 15) << 10))
        return f1 | (f1 << 16), f2 | (f2 << 16)

    @gluon.jit
    def _plane_values(word, zc, PLANES: gl.constexpr, FORMAT: gl.constexpr, BF16: gl.constexpr):
        """The 8 nibble planes of the words (int4: q - z, zc the zero points; mxfp4: the scaled
        values, zc the e8m0 codes; both broadcast to the words' shape), by the word tiles' inline PTX."""
        if FORMAT == 0:
            if BF16:  # noqa: SIM108 -- -(2**7 + z) / -(2**10 + z) (`_fast_w4._int4_zero_pairs`); a constexpr branch
                h = zc | 0xC300
            else:
                h = zc | 0xE400
            nz = gl.broadcast(h | (h << 16), word)[0]
            if BF16:
                p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
                    PLANES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, nz], (gl.bfloat16,) * 8, True, 1
                )
            else:
                p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
                    PLANES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, nz], (gl.float16,) * 8, True, 1
                )
        else:
            f1, f2 = _mx_factors(zc, BF16)
            f1 = gl.broadcast(f1, word)[0]
            f2 = gl.broadcast(f2, word)[0]
            if BF16:
                p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
                    PLANES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, f1], (gl.bfloat16,) * 8, True, 1
                )
            else:
                p0, p1, p2, p3, p4, p5, p6, p7 = gl.inline_asm_elementwise(
                    PLANES, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [word, f1, f2], (gl.float16,) * 8, True, 1
                )
        return p0, p1, p2, p3, p4, p5, p6, p7

    @gluon.jit
    def _planes(word, zc, PLANES: gl.constexpr, FORMAT: gl.constexpr, BF16: gl.constexpr):
        """`_plane_values` joined in k order [SUB, BN, 8 * words]: k = 8 * word + plane
        (`_fast_w4._k_order`); int4's zero points per row [SUB, BN], mxfp4's codes per word."""
        if FORMAT == 0:
            zc = gl.expand_dims(zc, 2)
        p0, p1, p2, p3, p4, p5, p6, p7 = _plane_values(word, zc, PLANES, FORMAT, BF16)
        w = gl.join(gl.join(gl.join(p0, p4), gl.join(p2, p6)), gl.join(gl.join(p1, p5), gl.join(p3, p7)))
        return gl.reshape(w, [word.shape[0], word.shape[1], 8 * word.shape[2]])

    @gluon.jit
    def _step_sums(acc, word, zc, x, sc, zero, PLANES: gl.constexpr, FORMAT: gl.constexpr, BF16: gl.constexpr,
                   a_l: gl.constexpr, b_l: gl.constexpr):  # fmt: skip
        """acc plus one K step's product: the words dequantized into the MMA's A operand, x's int32
        pairs split into its B operand (both conversions checked to move nothing), int4's dot on the
        exact q - z times its row scale (the fp32 partial), mxfp4's on the scaled values."""
        w = gl.convert_layout(_planes(word, zc, PLANES, FORMAT, BF16), a_l, assert_trivial=True)
        xb = gl.convert_layout(_split_pairs(x, BF16), b_l, assert_trivial=True)
        part = mma_v2(w, xb, zero)
        if FORMAT == 0:
            part = part * gl.expand_dims(sc, 2)
        return acc + part

    @gluon.jit
    def _store_sums(acc, c_ptr, bias_ptr, rows, M, N, scm, scn, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr,
                    mma: gl.constexpr):  # fmt: skip
        """A word kernel's end: its warps' partials [SUB, BN, BM] (c's tile transposed, weight rows
        from `rows`) summed, plus bias, stored in c's dtype (rows past N and M masked)."""
        out = gl.sum(acc, axis=0)  # [BN, BM]: c transposed
        o_l: gl.constexpr = gl.SliceLayout(0, mma)
        offs_n = rows + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_l))
        offs_m = gl.arange(0, _BM, layout=gl.SliceLayout(0, o_l))
        if HAS_BIAS:
            out += gl.expand_dims(gl.load(bias_ptr + offs_n % N).to(gl.float32), 1)
        mask = gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_m < M, 0)
        ptrs = c_ptr + gl.expand_dims(offs_m, 0) * scm + gl.expand_dims(offs_n, 1) * scn
        gl.store(ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _wonly_wordsg_kernel(x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, sxm, swn, scm, scn, ssn, ssg,
                             szn, szg, FORMAT: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                             BLOCK_N: gl.constexpr, SUB: gl.constexpr, PLANES: gl.constexpr, EVEN_K: gl.constexpr,
                             ANATOMY: gl.constexpr = 0):  # fmt: skip
        """c [M, N] = x [M, K] @ dequant(w)^T + bias for M <= 16: x as int32 pairs [M, K/2], w as int32
        words [N, K/8] (k = 8 * word + nibble), int4 (scales fp32, zeros uint8, GROUP 128) or mxfp4
        (e8m0 codes in s_ptr, GROUP 32). A program: BLOCK_N weight rows, SUB warps, warp i taking K steps
        i, i + SUB, ...; the weights are the MMA's A operand (the product is c transposed).
        ANATOMY (bench/wordsb_anatomy.py only; wrong on purpose but 0): 1 x loaded once, 2 nothing
        loaded in the K loop (the words xor'd with the step, so the math stays in it), 3 no K loop."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[SUB, 1, 1],
                                                      instr_shape=[1, 16, 8])  # fmt: skip
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        # the words [SUB, BN, BK/8]: thread t holds rows t/4 (+8) and words t%4 + 4c, which expanded
        # to 8 k each are exactly a_l's elements (the convert below is checked to move nothing)
        w_l: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 8, 4], [SUB, 1, 1], [2, 1, 0])
        # x's int32 pairs [SUB, BK/2, BM]: 4 consecutive pairs (8 k) per thread, b_l's elements
        x_l: gl.constexpr = gl.BlockedLayout([1, 4, 1], [1, 4, 8], [SUB, 1, 1], [1, 2, 0])
        GROUP: gl.constexpr = 128 if FORMAT == 0 else 32
        STEP: gl.constexpr = SUB * _BK
        ws_l: gl.constexpr = gl.SliceLayout(2, w_l)
        pid = gl.program_id(0)
        sub_w = gl.arange(0, SUB, layout=gl.SliceLayout(1, ws_l))
        rn_w = (pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ws_l))) % N
        j_w = gl.arange(0, _BK // 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, w_l)))
        kw = gl.expand_dims(gl.expand_dims(sub_w, 1), 2) * (_BK // 8) + gl.expand_dims(
            gl.expand_dims(j_w, 0), 0
        )
        w_ptrs = w_ptr + gl.expand_dims(gl.expand_dims(rn_w, 0), 2) * swn + kw
        # int4: a zero point per row and step [SUB, BN]; mxfp4: an e8m0 code per word [SUB, BN, BK/8]
        if FORMAT == 0:
            zg = gl.expand_dims(sub_w, 1)
            z_ptrs = z_ptr + gl.expand_dims(rn_w, 0) * szn
        else:
            zg = kw // (GROUP // 8)
            z_ptrs = s_ptr + gl.expand_dims(gl.expand_dims(rn_w, 0), 2) * ssn
        cs_l: gl.constexpr = gl.SliceLayout(2, mma)  # the int4 row scales [SUB, BN], as the partials' rows
        sg = gl.expand_dims(gl.arange(0, SUB, layout=gl.SliceLayout(1, cs_l)), 1)
        s_ptrs = s_ptr + gl.expand_dims((pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, cs_l))) % N,
                                        0) * ssn  # fmt: skip
        xs_l: gl.constexpr = gl.SliceLayout(2, x_l)
        sub_x = gl.arange(0, SUB, layout=gl.SliceLayout(1, xs_l))
        k_x = gl.expand_dims(sub_x, 1) * (_BK // 2) + gl.expand_dims(
            gl.arange(0, _BK // 2, layout=gl.SliceLayout(0, xs_l)), 0
        )
        m_x = gl.arange(0, _BM, layout=gl.SliceLayout(0, gl.SliceLayout(0, x_l)))
        x_ptrs = x_ptr + gl.expand_dims(gl.expand_dims(m_x, 0), 0) * sxm + gl.expand_dims(k_x, 2)
        x_rows = gl.expand_dims(gl.expand_dims(m_x < M, 0), 0)
        k_x = gl.expand_dims(k_x, 2)
        last_g = (K - 1) // GROUP
        # step 0's operands; in the loop, step i + 1's are issued before step i's math. Past K (the
        # last step's tail) x and the words read 0, the scales their last group: they add nothing
        word = gl.load(w_ptrs, mask=kw < K // 8, other=0)
        x = gl.load(x_ptrs, mask=x_rows & (k_x < K // 2), other=0)
        zc = gl.load(z_ptrs + gl.minimum(zg, last_g) * (szg if FORMAT == 0 else ssg)).to(gl.int32)
        sc = gl.load(s_ptrs + gl.minimum(sg, last_g) * ssg)
        zero = gl.zeros([SUB, BLOCK_N, _BM], gl.float32, mma)
        acc = gl.zeros([SUB, BLOCK_N, _BM], gl.float32, mma)
        for k0 in range(0, K if ANATOMY != 3 else 0, STEP):
            kn = k0 + STEP  # the next step: past K on the last (masked, clamped: nothing read past the ends)
            if ANATOMY == 1 or ANATOMY == 2:
                word_n = gl.load(w_ptrs + kn // 8, mask=kn < K, other=0) if ANATOMY == 1 else word ^ kn
                x_n = x
            elif EVEN_K:  # K a multiple of STEP: only the last step's prefetch lies past K, all of it
                more = kn < K
                word_n = gl.load(w_ptrs + kn // 8, mask=more, other=0)
                x_n = gl.load(x_ptrs + kn // 2, mask=x_rows & more, other=0)
            else:
                word_n = gl.load(w_ptrs + kn // 8, mask=kw + kn // 8 < K // 8, other=0)
                x_n = gl.load(x_ptrs + kn // 2, mask=x_rows & (k_x + kn // 2 < K // 2), other=0)
            if ANATOMY == 2:
                zc_n = zc
                sc_n = sc
            else:
                zc_n = gl.load(
                    z_ptrs + gl.minimum(zg + kn // GROUP, last_g) * (szg if FORMAT == 0 else ssg)
                ).to(gl.int32)
                sc_n = gl.load(s_ptrs + gl.minimum(sg + kn // GROUP, last_g) * ssg)
            acc = _step_sums(acc, word, zc, x, sc, zero, PLANES, FORMAT, BF16, a_l, b_l)
            word = word_n
            x = x_n
            zc = zc_n
            sc = sc_n
        _store_sums(acc, c_ptr, bias_ptr, pid * BLOCK_N, M, N, scm, scn, HAS_BIAS, BLOCK_N, mma)

    @gluon.jit
    def _iota4(n: gl.constexpr, DIM: gl.constexpr, L: gl.constexpr):
        """arange(n) along dim DIM of a 4-d tensor of layout L, size 1 on the others."""
        if DIM == 0:
            r = gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 1), 2), 3)
        elif DIM == 1:
            r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 2), 3)
        elif DIM == 2:
            r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(3, L))))
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 0), 3)
        else:
            r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L))))
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 0), 0)
        return r

    @gluon.jit
    def _iota5(n: gl.constexpr, DIM: gl.constexpr, L: gl.constexpr):
        """arange(n) along dim DIM of a 5-d tensor of layout L, size 1 on the others."""
        if DIM == 0:
            r = gl.arange(
                0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L))))
            )
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 1), 2), 3), 4)
        elif DIM == 1:
            r = gl.arange(
                0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L))))
            )
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 2), 3), 4)
        elif DIM == 2:
            r = gl.arange(
                0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(3, gl.SliceLayout(4, L))))
            )
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 0), 3), 4)
        elif DIM == 3:
            r = gl.arange(
                0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(4, L))))
            )
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 0), 0), 4)
        else:
            r = gl.arange(
                0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L))))
            )
            r = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 0), 0), 0), 0)
        return r

    @gluon.jit
    def _quad_step(acc, word, zc, x, sc, zero, PLANES: gl.constexpr, FORMAT: gl.constexpr, BF16: gl.constexpr,
                   a_l: gl.constexpr, b_l: gl.constexpr, CHAINS: gl.constexpr):  # fmt: skip
        """`_step_sums` for "wordsq"'s operands: the words [SUB, BN, 4 (t), 4 (d)] (memory word 4t + d
        of the step), x's pairs [SUB, 4 (t), 4 (d), 4 (e), BM] (memory pair 4 (4t + d) + e), int4's
        zero points [SUB, BN] or mxfp4's codes [SUB, BN, 4 (t)]. The dot's k order is a permutation
        of memory's, the same on both sides: memory k 8 (4t + d) + 4i + 2e2 + h is the dot's
        32d + 16e2 + 4t + 2i + h. With k_width 4 an mma.sync takes a thread's k pairs (i = 0) of two
        16-k chunks (e2 = 0, 1): for x adjacent pairs of one 16-byte load (a register pair as
        loaded), for the words one PTX plane pair each. The step is two 64-k halves (d's high bit):
        one MMA chain (CHAINS 1, the order of a 128-k dot) or two summed after."""
        zc = gl.expand_dims(zc, 2) if FORMAT == 0 else zc
        p0, p1, p2, p3, p4, p5, p6, p7 = _plane_values(word, gl.expand_dims(zc, 3), PLANES, FORMAT, BF16)
        # a join's new dim comes last, the innermost join's first: [..., i, e2, h] holds plane 4i + 2e2 + h
        w = gl.join(gl.join(gl.join(p0, p4), gl.join(p2, p6)), gl.join(gl.join(p1, p5), gl.join(p3, p7)))
        S: gl.constexpr = word.shape[0]
        BN: gl.constexpr = word.shape[1]
        w = gl.reshape(w, [S, BN, 4, 2, 2, 2, 2, 2])  # (s, n, t, d1, d0, i, e2, h)
        w0, w1 = gl.split(gl.reshape(gl.permute(w, (0, 1, 4, 6, 2, 5, 7, 3)), [S, BN, 64, 2]))
        lo, hi = _pair_halves(x, BF16)
        xb = gl.reshape(gl.join(lo, hi), [S, 4, 2, 2, 2, 2, x.shape[4], 2])  # (s, t, d1, d0, i, e2, m, h)
        x0, x1 = gl.split(gl.reshape(gl.permute(xb, (0, 3, 5, 1, 4, 7, 6, 2)), [S, 64, x.shape[4], 2]))
        part = mma_v2(gl.convert_layout(w0, a_l, assert_trivial=True), gl.convert_layout(x0, b_l, assert_trivial=True),
                      zero)  # fmt: skip
        w1 = gl.convert_layout(w1, a_l, assert_trivial=True)
        x1 = gl.convert_layout(x1, b_l, assert_trivial=True)
        if CHAINS == 1:  # noqa: SIM108 -- a constexpr branch
            part = mma_v2(w1, x1, part)
        else:
            part = part + mma_v2(w1, x1, zero)
        if FORMAT == 0:
            part = part * gl.expand_dims(sc, 2)
        return acc + part

    @gluon.jit
    def _quad_loads(kn, word, x, zc, sc, w_ptrs, x_ptrs, z_ptrs, s_ptrs, kw, k_x, zg, sg, K, last_g, szg, ssg,
                    FORMAT: gl.constexpr, GROUP: gl.constexpr, STEP: gl.constexpr, EVEN_K: gl.constexpr,
                    ANATOMY: gl.constexpr):  # fmt: skip
        """ "wordsq"'s operands of the K step at kn (word, x, zero points or codes, int4's row scales).
        EVEN_K: past K it rereads the last step (unmasked loads; the caller never sums it); else past
        K the words and x read 0. ANATOMY 1 / 2 (the bench's): x / everything but the words (xor'd
        with kn) kept from the step before."""
        if ANATOMY == 1 or ANATOMY == 2:
            word_n = gl.load(w_ptrs + kn // 8, mask=kn < K, other=0) if ANATOMY == 1 else word ^ kn
            x_n = x
        elif EVEN_K:
            kc = gl.multiple_of(gl.minimum(kn, K - STEP), STEP)  # EVEN_K: K a multiple of STEP
            word_n = gl.load(w_ptrs + kc // 8)
            x_n = gl.load(x_ptrs + kc // 2)
        else:
            word_n = gl.load(w_ptrs + kn // 8, mask=kw + kn // 8 < K // 8, other=0)
            x_n = gl.load(x_ptrs + kn // 2, mask=k_x + kn // 2 < K // 2, other=0)
        if ANATOMY == 2:
            zc_n = zc
            sc_n = sc
        else:
            zc_n = gl.load(z_ptrs + gl.minimum(zg + kn // GROUP, last_g) * (szg if FORMAT == 0 else ssg))
            zc_n = zc_n.to(gl.int32)
            sc_n = gl.load(s_ptrs + gl.minimum(sg + kn // GROUP, last_g) * ssg)
        return word_n, x_n, zc_n, sc_n

    @gluon.jit
    def _wonly_wordsq_kernel(x_ptr, w_ptr, c_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, sxm, swn, scm, scn, ssn, ssg,
                             szn, szg, FORMAT: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                             BLOCK_N: gl.constexpr, SUB: gl.constexpr, PLANES: gl.constexpr, EVEN_K: gl.constexpr,
                             ANATOMY: gl.constexpr = 0, UNROLL: gl.constexpr = 2,
                             CHAINS: gl.constexpr = 1, PF: gl.constexpr = 1):  # fmt: skip
        """`_wonly_wordsg_kernel` (same arguments and sums, BLOCK_N 16) with its operands in place: the
        dot's k order permuted (`_quad_step`) so that a thread's 4 words of a row are one 16-byte load
        (for mxfp4 one group: one scale code per row and step) and its x registers are the MMA's B
        operand pairs as loaded (k_width 4), where "wordsg"'s k_width 8 pairs registers of two loads
        (a register move each). UNROLL 2: two K steps a loop step, each one's operands loaded before
        the other's math (the values a loop step carries are those its second load wrote, in the
        registers its first step read: no copies); EVEN_K then means K a multiple of 2 STEP, else a
        step past K reads zeros and adds nothing. CHAINS 2: each step's two 64-k halves as two MMA
        chains. PF 2: each step's operands loaded two steps ahead (the shim's "wordsq" configs with 2
        stages; bench/wordsq_w4.py times every variant)."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[SUB, 1, 1],
                                                      instr_shape=[1, 16, 8])  # fmt: skip
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
        # the words [SUB, BN, 4 (t), 4 (d)], memory word 4t + d of the step: lane (g, t) rows g, g + 8
        w_l: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 8, 4, 1], [SUB, 1, 1, 1], [3, 2, 1, 0])
        # x's pairs [SUB, 4 (t), 4 (d), 4 (e), BM], memory pair 4 (4t + d) + e: lane (g, t) rows g, g + 8
        x_l: gl.constexpr = gl.BlockedLayout(
            [1, 1, 1, 4, 1], [1, 4, 1, 1, 8], [SUB, 1, 1, 1, 1], [3, 1, 4, 2, 0]
        )
        GROUP: gl.constexpr = 128 if FORMAT == 0 else 32
        STEP: gl.constexpr = SUB * _BK
        rows = gl.program_id(0) * BLOCK_N
        kw = _iota4(SUB, 0, w_l) * (_BK // 8) + 4 * _iota4(4, 2, w_l) + _iota4(4, 3, w_l)  # [SUB, 1, 4, 4]
        w_ptrs = w_ptr + ((rows + _iota4(BLOCK_N, 1, w_l)) % N) * swn + kw
        z3_l: gl.constexpr = gl.SliceLayout(3, w_l)
        z2_l: gl.constexpr = gl.SliceLayout(2, z3_l)
        zs = gl.expand_dims(gl.arange(0, SUB, layout=gl.SliceLayout(1, z2_l)), 1)  # [SUB, 1]
        rz = gl.expand_dims((rows + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, z2_l))) % N, 0)  # [1, BN]
        if FORMAT == 0:  # a zero point per row and step [SUB, BN]
            zg = zs
            z_ptrs = z_ptr + rz * szn
        else:  # an e8m0 code per row and group [SUB, BN, 4]: group 4 s + t of the thread's words
            zt = gl.expand_dims(
                gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, z3_l))), 0), 0
            )
            zg = gl.expand_dims(zs, 2) * 4 + zt
            z_ptrs = s_ptr + gl.expand_dims(rz, 2) * ssn
        cs_l: gl.constexpr = gl.SliceLayout(2, mma)  # the int4 row scales [SUB, BN], as the partials' rows
        sg = gl.expand_dims(gl.arange(0, SUB, layout=gl.SliceLayout(1, cs_l)), 1)
        s_ptrs = (
            s_ptr
            + gl.expand_dims((rows + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, cs_l))) % N, 0) * ssn
        )
        k_x = (
            _iota5(SUB, 0, x_l) * (_BK // 2)
            + 16 * _iota5(4, 1, x_l)
            + 4 * _iota5(4, 2, x_l)
            + _iota5(4, 3, x_l)
        )
        # x's rows past M read row M - 1 (their sums are not stored), so no load needs a mask for them;
        # with EVEN_K none needs one at all: the prefetch past the last step rereads the last step
        x_ptrs = x_ptr + gl.minimum(_iota5(_BM, 4, x_l), M - 1) * sxm + k_x
        last_g = (K - 1) // GROUP
        if EVEN_K:
            word = gl.load(w_ptrs)
            x = gl.load(x_ptrs)
        else:
            word = gl.load(w_ptrs, mask=kw < K // 8, other=0)
            x = gl.load(x_ptrs, mask=k_x < K // 2, other=0)
        zc = gl.load(z_ptrs + gl.minimum(zg, last_g) * (szg if FORMAT == 0 else ssg)).to(gl.int32)
        sc = gl.load(s_ptrs + gl.minimum(sg, last_g) * ssg)
        zero = gl.zeros([SUB, BLOCK_N, _BM], gl.float32, mma)
        acc = gl.zeros([SUB, BLOCK_N, _BM], gl.float32, mma)
        gl.static_assert(PF == 1 or UNROLL == 2, "operands two steps ahead need two steps a loop step")
        if PF == 2:  # step 1's operands before the loop too, carried like step 0's
            word1, x1, zc1, sc1 = _quad_loads(STEP, word, x, zc, sc, w_ptrs, x_ptrs, z_ptrs, s_ptrs, kw, k_x, zg, sg, K,
                                              last_g, szg, ssg, FORMAT, GROUP, STEP, EVEN_K, ANATOMY)  # fmt: skip
        for k0 in range(0, K if ANATOMY != 3 else 0, UNROLL * STEP):
            if PF == 1:
                word1, x1, zc1, sc1 = _quad_loads(k0 + STEP, word, x, zc, sc, w_ptrs, x_ptrs, z_ptrs, s_ptrs, kw, k_x,
                                                  zg, sg, K, last_g, szg, ssg, FORMAT, GROUP, STEP, EVEN_K, ANATOMY)  # fmt: skip
            else:
                word2, x2, zc2, sc2 = _quad_loads(k0 + 2 * STEP, word1, x1, zc1, sc1, w_ptrs, x_ptrs, z_ptrs, s_ptrs,
                                                  kw, k_x, zg, sg, K, last_g, szg, ssg, FORMAT, GROUP, STEP, EVEN_K,
                                                  ANATOMY)  # fmt: skip
            acc = _quad_step(acc, word, zc, x, sc, zero, PLANES, FORMAT, BF16, a_l, b_l, CHAINS)
            if UNROLL == 2:
                word, x, zc, sc = _quad_loads(k0 + (PF + 1) * STEP, word1, x1, zc1, sc1, w_ptrs, x_ptrs, z_ptrs, s_ptrs,
                                              kw, k_x, zg, sg, K, last_g, szg, ssg, FORMAT, GROUP, STEP, EVEN_K,
                                              ANATOMY)  # fmt: skip
                acc = _quad_step(acc, word1, zc1, x1, sc1, zero, PLANES, FORMAT, BF16, a_l, b_l, CHAINS)
                if PF == 2:  # the next loop step's first operands are step k0 + 2's, its second these
                    word1, x1, zc1, sc1, word, x, zc, sc = word, x, zc, sc, word2, x2, zc2, sc2
            else:
                word, x, zc, sc = word1, x1, zc1, sc1
        _store_sums(acc, c_ptr, bias_ptr, rows, M, N, scm, scn, HAS_BIAS, BLOCK_N, mma)


def runs(x: torch.Tensor, words: torch.Tensor | None, zeros: torch.Tensor, fmt: int, group: int) -> bool:
    """Whether `wordsg` takes this GEMM: the caller has the device's say (`arch.gluon_mma_w4`); here
    the operands: 16-bit x with rows of whole int32 pairs, at most 16 rows, the int32 word view of
    the weights, int4's zero points as uint8 (their bits enter the PTX), and the group the kernel's
    scale indexing assumes."""
    return (
        IMPORTED
        and words is not None
        and (fmt == 1 or zeros.dtype == torch.uint8)
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[0] <= BLOCK_M
        and x.stride(1) == 1
        and x.shape[1] % 2 == 0
        and x.stride(0) % 2 == 0
        and x.data_ptr() % 4 == 0
        and GROUPS.get(fmt) == group
    )


def planes_source(fmt: int, dtype: torch.dtype) -> str:
    """The inline PTX the kernel's planes take (a constexpr: one compile per format and dtype)."""
    bf16 = dtype == torch.bfloat16
    return planes_ptx(bf16) if fmt == 0 else mx_planes_ptx(bf16)


def wonly_wordsg(x: torch.Tensor, words: torch.Tensor, out: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bias: torch.Tensor | None, *, fmt: int, block_n: int,
                 sub: int, anatomy: int = 0) -> None:  # fmt: skip
    """out = x @ dequant(words)^T + bias with the "wordsg" kernel (`runs` has said yes)."""
    _launch(_wonly_wordsg_kernel, x, words, out, scales, zeros, bias, fmt=fmt, block_n=block_n, sub=sub,
            steps=1, ANATOMY=anatomy)  # fmt: skip


def wonly_wordsq(x: torch.Tensor, words: torch.Tensor, out: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bias: torch.Tensor | None, *, fmt: int, sub: int,
                 **switches: int) -> None:  # fmt: skip
    """out = x @ dequant(words)^T + bias with the "wordsq" kernel (`runs` has said yes), 16 weight
    rows a program; switches: the kernel's experiment switches (bench/wordsq_w4.py), the shim's
    dispatch runs their defaults."""
    _launch(_wonly_wordsq_kernel, x, words, out, scales, zeros, bias, fmt=fmt, block_n=16, sub=sub,
            steps=switches.get("UNROLL", 2), **switches)  # fmt: skip


def _launch(kernel: object, x: torch.Tensor, words: torch.Tensor, out: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor, bias: torch.Tensor | None, *, fmt: int, block_n: int, sub: int, steps: int,
            **consts: int) -> None:  # fmt: skip
    """One launch of a word kernel of this module (same arguments); steps: K steps a loop step, for
    EVEN_K (K a whole number of loop steps: no load needs a mask)."""
    (M, K), N = x.shape, words.shape[0]
    xi = x.view(torch.int32)  # [M, K/2] pairs (`runs`: rows of whole pairs, 4-byte aligned)
    kernel[(-(-N // block_n),)](  # type: ignore[index]
        xi, words, out, scales, zeros, bias if bias is not None else out, M, N, K, x.stride(0) // 2,
        words.stride(0), out.stride(0), out.stride(1), scales.stride(0), scales.stride(1), zeros.stride(0),
        zeros.stride(1), FORMAT=fmt, BF16=x.dtype == torch.bfloat16, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, SUB=sub, PLANES=planes_source(fmt, x.dtype), EVEN_K=K % (steps * sub * BLOCK_K) == 0,
        num_warps=sub, **consts,
    )  # fmt: skip
