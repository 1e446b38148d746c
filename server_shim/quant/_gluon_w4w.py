"""An int4 weight-only GEMM for decode batches (M <= 16) on Hopper's asynchronous warpgroup MMA,
written in Gluon ("wordsw"): an experiment, in no dispatch path (only `bench/wordsw.py` runs it).

Why it was built: the mma.sync tiles ("wordsb", "wordsg") cannot reach 1.5x bf16 at M = 16 with
the weights in L2: their arithmetic alone, with nothing loaded in the K loop, takes what 1.5x
allows (`bench/wordsb_anatomy.py`). Here one warpgroup owns 64 weight rows: the weights,
dequantized in registers, are the register A operand of `wgmma`, x's rows the B operand in shared
memory. Each program copies its whole K range of x and of the weight words into shared memory by
bulk tensor copies (TMA) when it starts, one barrier per K step, so nothing waits on a global load
inside the K loop.

The register operand's layout fixes which k each thread holds: rows 16w + g and 16w + g + 8 (warp
w, g = lane / 4), and in each 8-wide k chunk the pair 2t, 2t + 1 (t = lane % 4), that is byte t of
every int32 word of its rows. Each thread reads its rows' words from shared memory (the 4 threads
of a quad read the same words: a broadcast) and dequantizes byte t of each: one byte permute puts
its two nibbles in the two 16-bit halves, one lop3 ORs in the magic exponent, one packed fma
subtracts magic + zero: q - z, exact, as in the word tiles (`_fast_w4.planes_ptx`). The step's
dot runs on the exact q - z and the group scale multiplies its fp32 partial (GROUP 128 = one K
step), the sums of "wordsb". K splits reduce themselves (each writes its partial; the last to
arrive on its tile's counter sums them in split order), as `_fast_common._split_finish` does.

Measured (H100, 2026-12-05; every run checked against float64 first, and run twice for equal
bits): 16 x 4096 x 4096 bf16 8.99-9.12 us with 8 K steps a program (4 splits), against 8.21 for
"wordsb" and 8.69 for torch bf16; faster than "wordsb" only off M = 16 (5 x 1000 x 4224: 6.17
against 7.7 us). So it is in no dispatch path.

How it got there (the slower variants stayed selectable in `bench/wordsw.py --indep/--lean` up to
commit 0c6abca, which reproduces them). In sm90 SASS (compiled as tests/test_gluon_w4w.py does),
ptxas counts a register operand dead once its wgmma is issued and gives its registers to whatever
is written next, then waits for the MMAs before that write: with the words loaded from global
memory after the MMAs' issue every step waited for the MMAs and then an L2 round trip (12.1 us);
loading them two steps ahead let the dequantization interleave with the MMAs but did not help
(12.3 us: each thread's 8-byte word loads touched 8 rows, 8 cache lines an instruction). Staging
the words by TMA and reading them from shared memory: 10.0. A step's halves as two MMA chains: 9.8.
Each step's operand read only when its turn comes (86 registers instead of 192, so up to 5
programs a multiprocessor fill one another's waits for their MMAs): 8.99, against 9.71 with the
operand carried. Nsight Compute then: 1.85 active warps a scheduler (shared memory allows 3), an
instruction every 2.9 cycles, the top stall (31%) the step's own zero points and scales from
global memory; loaded a step ahead since (9.12 us, no gain at M = 16; 5 x 1000 x 4224 6.28 ->
6.17). Profiled again (the run flushes the L2): the global loads' scoreboard still the top stall
(1.76 of 5.64 cycles between issues), the MMAs' own 0.05, SMs active 74% of the elapsed cycles:
the next thing to move looked like the zero points and scales. Moved into shared memory at each
program's start (read once, while the bulk copies run) it was slower: H100, 2026-12-06 16:24 UTC,
10.62 / 10.21 us with 8 / 4 K steps a program against 9.10 / 9.36 for this code in the same call
(torch bf16 8.63, "wordsb" 8.14); two warpgroups a program sharing x's copy (128 rows) slower still,
11.11 / 11.69 (`python bench/wordsw.py --rows 64 128 --cold` at commit 973abf1, which reproduces
it). So the global loads' stall was hiding latency the kernel pays anyway. Taken apart (ANATOMY,
`python bench/wordsw.py --anatomy`; H100, 17:03 UTC, 8 K steps a program): whole 9.16 us, only the
first K step copied 8.40, nothing loaded in the K loop 8.12, no K loop 5.28 (4 steps: 9.38 / 8.66 /
8.44 / 7.29; torch bf16 8.59, "wordsb" 8.09). Even with nothing to load the tile is no faster than
torch, so no change to its loads reaches 1.5x. The split sum's partials are read in an unrolled
loop since (all in flight at once; 928 -> 736 SASS): at 16 x 4096 x 4096 no change (9.17 / 9.14 us
with 8 / 4 steps, 17:06 UTC), at 5 x 1000 x 4224 5.42 us with 4 steps (6.12 in the 16:24 call, on
another machine). "No K loop" is not a fixed cost to subtract: with every split of a tile arriving
at its counter at once it grows with the splits (14.5 us with 16).
"""

from __future__ import annotations

import torch

from server_shim.quant import _gluon_mm8

IMPORTED = _gluon_mm8.IMPORTED  # the same Hopper Gluon names as the fp8 "wsp" kernel, or none
if IMPORTED:
    from server_shim.quant._gluon_mm8 import (
        TensorDescriptor,
        _barrier,
        _tma_load,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

ROWS = 64  # weight rows per program: one warpgroup's MMA M
BLOCK_M = 16  # x's rows: the MMA's N; M <= 16 only
BLOCK_K = 128  # one K step: one int4 group
HALF_K = 64  # x's copy box: 64 16-bit values (128 bytes, the widest swizzle)
GROUP = 128


def dequant_ptx(bf16: bool) -> str:
    """$2 a word, $3 the byte permute's selector (byte t of the word and of the word >> 4), $4
    -(magic + z) in both 16-bit halves: $0, $1 the byte's two nibbles, q - z (exact). The magic is
    2**7 (bf16) / 2**10 (fp16): magic + q as a 16-bit float, then minus magic + z."""
    magic, one, pair = (0x4300, 0x3F80, "bf16x2") if bf16 else (0x6400, 0x3C00, "f16x2")
    return (
        "{ .reg .b32 t, p, o; shr.u32 t, $2, 4; prmt.b32 p, $2, t, $3; "
        f"lop3.b32 p, p, 0x000F000F, {magic * 0x10001:#010x}, 0xEA; mov.b32 o, {one * 0x10001:#010x}; "
        f"fma.rn.{pair} p, p, o, $4; mov.b32 {{$0, $1}}, p; }}"
    )


if IMPORTED:
    _ROWS = gl.constexpr(ROWS)
    _BM = gl.constexpr(BLOCK_M)
    _BK = gl.constexpr(BLOCK_K)
    _HK = gl.constexpr(HALF_K)

    @gluon.jit
    def _smem_words(w_bufs, bars, sel, step):
        """K step `step`'s words from shared memory (its copy waited for), two halves of 64 k
        ([64, 8, 4]: each thread's rows' 8 words, for byte t; the 4 threads of a quad read the same
        words, a broadcast)."""
        mbarrier.wait(bars.index(step), 0)
        buf = w_bufs.index(step)
        w2: gl.constexpr = gl.SliceLayout(2, sel.type.layout)
        lo = gl.broadcast(gl.expand_dims(buf.slice(0, 8, dim=1).load(w2), 2), sel)[0]
        hi = gl.broadcast(gl.expand_dims(buf.slice(8, 8, dim=1).load(w2), 2), sel)[0]
        return lo, hi

    @gluon.jit
    def _half_operand(word, nz, sel, BF16: gl.constexpr, DQ: gl.constexpr, a_l: gl.constexpr):
        """Words [64, 8, 4] -> the MMA's register A operand [64, 64] (k = 8 * word + 2 * byte + half),
        q - z exact."""
        if BF16:
            lo, hi = gl.inline_asm_elementwise(
                DQ, "=h,=h,r,r,r", [word, sel, nz], (gl.bfloat16,) * 2, True, 1
            )
        else:
            lo, hi = gl.inline_asm_elementwise(DQ, "=h,=h,r,r,r", [word, sel, nz], (gl.float16,) * 2, True, 1)
        w = gl.reshape(gl.join(lo, hi), [_ROWS, _HK])
        return gl.convert_layout(w, a_l, assert_trivial=True)

    @gluon.jit
    def _operand(r_lo, r_hi, zc, sel, BF16: gl.constexpr, DQ: gl.constexpr, a_l: gl.constexpr):
        """A K step's words (`_smem_words`) and its rows' zero points dequantized: the two halves of its
        register A operand."""
        h = (zc | (0xC300 if BF16 else 0xE400)) & 0xFFFF  # -(magic + z) as a 16-bit float
        nz = gl.broadcast(gl.expand_dims(gl.expand_dims(h | (h << 16), 1), 2), r_lo)[0]
        return (_half_operand(r_lo, nz, sel, BF16, DQ, a_l),
                _half_operand(r_hi, nz, sel, BF16, DQ, a_l))  # fmt: skip

    @gluon.jit
    def _wonly_wordsw_kernel(x_desc, w_desc, c_ptr, ws_ptr, cnt_ptr, s_ptr, z_ptr, bias_ptr, M, N, K, K_PER,
                             scm, scn, ssn, ssg, szn, szg, SPLIT: gl.constexpr, BF16: gl.constexpr,
                             HAS_BIAS: gl.constexpr, STEPS: gl.constexpr, DQ: gl.constexpr,
                             ANATOMY: gl.constexpr = 0):  # fmt: skip
        """c [M, N] = x [M, K] @ dequant(w)^T + bias, M <= 16, int4 (scales fp32, zeros uint8, GROUP
        128): x by its descriptor (16 x 64 boxes), w as int32 words [N, K/8] (k = 8 * word + nibble).
        Program (i, j): weight rows [64 i, +64) over K [j K_PER, +K_PER), at most STEPS K steps.

        ANATOMY (`bench/wordsw.py --anatomy` only; wrong on purpose but 0): 1 only the first K step
        copied, every step reading its buffers (the words xor'd with the step, so the dequantization
        and the MMAs stay in the loop); 3 that, and the zero points and scales of the first step
        kept (nothing loaded in the K loop); 2 no K loop (launch, copies issued, epilogue)."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, _BM, 16])  # fmt: skip
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        # [64 rows, 8 words, 4 bytes]: registers walk the words (two 16-byte loads a row), then
        # row + 8; lanes take the byte (t) and the row (g); warps rows 16 w
        w_l: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [8, 0, 0]],
            lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]],
            block_bases=[],
            shape=[64, 8, 4],
        )
        rows_l: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, w_l))
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        k_lo = pid_k * K_PER
        steps = gl.minimum(gl.cdiv(K - k_lo, _BK), STEPS)

        # x's K range into shared memory: two 16 x 64 boxes a step, one barrier a step (zeros past M, K)
        xs = gl.allocate_shared_memory(DT, [2 * STEPS, _BM, _HK], x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STEPS, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STEPS):
            mbarrier.init(bars.index(j), count=1)
        fence_async_shared()
        w_bufs = gl.allocate_shared_memory(gl.int32, [STEPS, _ROWS, _BK // 8], w_desc.layout)
        for j in range(0, steps if ANATOMY == 0 else 1):
            mbarrier.expect(bars.index(j), 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(x_desc, [0, k_lo + j * _BK], bars.index(j), xs.index(2 * j))
            _tma_load(x_desc, [0, k_lo + j * _BK + _HK], bars.index(j), xs.index(2 * j + 1))
            _tma_load(w_desc, [pid_n * _ROWS, (k_lo + j * _BK) // 8], bars.index(j), w_bufs.index(j))

        rn_w = (pid_n * _ROWS + gl.arange(0, _ROWS, layout=rows_l)) % N
        b_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_l)))
        sel = gl.expand_dims(gl.expand_dims(0x400 + 0x101 * b_w, 0), 1)  # byte t and byte t of word >> 4
        sel = gl.broadcast(sel, gl.full([_ROWS, 8, 4], 0, gl.int32, w_l))[0]
        rs_l: gl.constexpr = gl.SliceLayout(1, mma)
        rn_s = (pid_n * _ROWS + gl.arange(0, _ROWS, layout=rs_l)) % N
        g0 = k_lo // _BK  # GROUP 128: a group a K step

        s_ptrs = s_ptr + rn_s * ssn + g0 * ssg
        z_ptrs = z_ptr + rn_w * szn + g0 * szg
        acc = gl.zeros([_ROWS, _BM], gl.float32, mma)
        zero = gl.zeros([_ROWS, _BM], gl.float32, mma)
        # each step's operand read from shared memory when its turn comes (no operand carried: 86
        # registers, up to 5 programs a multiprocessor to fill one another's waits for their MMAs);
        # its two halves' MMAs as two chains (an N = 16 wgmma's latency, not its work, is the cost);
        # the zero points and scales a step ahead (from global memory: ncu's top stall when each
        # step loaded its own)
        last = gl.minimum(g0 + steps, gl.cdiv(K, _BK)) - 1 - g0
        zc_n = gl.load(z_ptrs).to(gl.int32)
        sc_n = gl.load(s_ptrs)
        for j in range(0, steps if ANATOMY != 2 else 0):
            zc = zc_n
            sc = sc_n
            if ANATOMY != 3:
                nxt = gl.minimum(j + 1, last)
                zc_n = gl.load(z_ptrs + nxt * szg).to(gl.int32)
                sc_n = gl.load(s_ptrs + nxt * ssg)
            b = j if ANATOMY == 0 else 0  # the step's buffers
            r_lo, r_hi = _smem_words(w_bufs, bars, sel, b)
            if ANATOMY != 0:
                r_lo ^= j
                r_hi ^= j
            a_lo, a_hi = _operand(r_lo, r_hi, zc, sel, BF16, DQ, a_l)
            p_lo = warpgroup_mma(a_lo, xs.index(2 * b).permute((1, 0)), zero, use_acc=False, is_async=True)
            p_hi = warpgroup_mma(
                a_hi, xs.index(2 * b + 1).permute((1, 0)), zero, use_acc=False, is_async=True
            )
            p_lo, p_hi = warpgroup_mma_wait(num_outstanding=0, deps=(p_lo, p_hi))
            acc += (p_lo + p_hi) * gl.expand_dims(sc, 1)

        # acc [64 rows of w, 16 rows of x] is c's tile transposed
        offs_n = pid_n * _ROWS + gl.arange(0, _ROWS, layout=rs_l)
        offs_m = gl.arange(0, _BM, layout=gl.SliceLayout(0, mma))
        mask = gl.expand_dims(offs_n < N, 1) & gl.expand_dims(offs_m < M, 0)
        if SPLIT > 1:
            part_ptrs = ws_ptr + gl.expand_dims(offs_m, 0) * N + gl.expand_dims(offs_n, 1)
            acc, summed = split_sum(acc, part_ptrs, mask, cnt_ptr + pid_n, pid_k, M * N, SPLIT)
            if summed:
                _store(acc, c_ptr, bias_ptr, offs_n, offs_m, mask, N, scm, scn, HAS_BIAS)
        else:
            _store(acc, c_ptr, bias_ptr, offs_n, offs_m, mask, N, scm, scn, HAS_BIAS)

    @gluon.jit
    def split_sum(acc, part_ptrs, mask, cnt_ptr, pid_k, stride, SPLIT: gl.constexpr):
        """A K split's end: its partial stored at part_ptrs + pid_k * stride, its arrival counted at
        cnt_ptr; the last split to arrive gets (every partial summed in split order, True) and resets
        the counter -- the same bits whatever order the splits finish in. Others: (acc, False)."""
        gl.store(part_ptrs + pid_k.to(gl.int64) * stride, acc, mask=mask)
        _barrier()  # every thread's partial is written before the arrival is counted
        arrived = gl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        last = arrived == SPLIT - 1
        if last:
            acc = gl.zeros_like(acc)
            for i in gl.static_range(SPLIT):  # unrolled: every partial's load in flight at once
                acc += gl.load(part_ptrs + i * stride, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr, 0)
        return acc, last

    @gluon.jit
    def _store(acc, c_ptr, bias_ptr, offs_n, offs_m, mask, N, scm, scn, HAS_BIAS: gl.constexpr):
        """Bias, cast and the masked store of the transposed tile."""
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(bias_ptr + offs_n % N).to(gl.float32), 1)
        ptrs = c_ptr + gl.expand_dims(offs_m, 0) * scm + gl.expand_dims(offs_n, 1) * scn
        gl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def runs(x: torch.Tensor, words: torch.Tensor | None, zeros: torch.Tensor, fmt: int, group: int) -> bool:
    """Whether "wordsw" can take this GEMM (a Hopper GPU is the caller's to check): int4 with
    GROUP 128 and uint8 zero points, 16-bit x of at most 16 rows and the int32 word view of the
    weights, both addressable by tensor descriptors (unit stride, 16-byte aligned rows and base),
    K a multiple of 128."""
    return (
        IMPORTED
        and words is not None
        and words.stride(1) == 1
        and (words.stride(0) * 4) % 16 == 0
        and words.data_ptr() % 16 == 0
        and fmt == 0
        and group == GROUP
        and zeros.dtype == torch.uint8
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[0] <= BLOCK_M
        and x.stride(1) == 1
        and (x.stride(0) * 2) % 16 == 0
        and x.data_ptr() % 16 == 0
        and x.shape[1] % BLOCK_K == 0
    )


def _layouts(dtype: torch.dtype) -> tuple:
    """The shared-memory layouts of x's boxes ([16, 64] of x's dtype) and the words' ([64, 16] int32)."""
    dt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF_K], dt),
        gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_K // 8], gl.int32),
    )


def descriptor_type(operand: str, dtype: torch.dtype) -> str:
    """The JIT's signature type of x's ("x") or the words' ("w") descriptor, for compiling without a
    GPU (bench/sm90_compile.py)."""
    x_layout, w_layout = _layouts(dtype)
    if operand == "w":
        return f"tensordesc<i32[{ROWS}, {BLOCK_K // 8}],{w_layout!r}>"
    return f"tensordesc<{'bf16' if dtype == torch.bfloat16 else 'fp16'}[{BLOCK_M}, {HALF_K}],{x_layout!r}>"


def wonly_wordsw(x: torch.Tensor, words: torch.Tensor, out: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bias: torch.Tensor | None, *, steps: int, workspace, counters,  # noqa: ANN001
                 anatomy: int = 0) -> None:  # fmt: skip
    """out = x @ dequant(words)^T + bias with the Gluon kernel (`runs` has said yes): K in splits of
    `steps` K steps; workspace(splits) -> fp32 [splits, M, N], counters(tiles) -> zeroed int32."""
    (M, K), N = x.shape, words.shape[0]
    x_layout, w_layout = _layouts(x.dtype)
    x_desc = TensorDescriptor.from_tensor(x, [BLOCK_M, HALF_K], x_layout)
    w_desc = TensorDescriptor.from_tensor(words, [ROWS, BLOCK_K // 8], w_layout)
    k_per = steps * BLOCK_K
    splits = -(-K // k_per)
    tiles = -(-N // ROWS)
    ws = workspace(splits) if splits > 1 else out
    cnt = counters(tiles) if splits > 1 else out
    _wonly_wordsw_kernel[(tiles, splits)](
        x_desc, w_desc, out, ws, cnt, scales, zeros, bias if bias is not None else out, M, N, K, k_per,
        out.stride(0), out.stride(1), scales.stride(0), scales.stride(1), zeros.stride(0),
        zeros.stride(1), splits, BF16=x.dtype == torch.bfloat16, HAS_BIAS=bias is not None, STEPS=steps,
        DQ=dequant_ptx(x.dtype == torch.bfloat16), ANATOMY=anatomy, num_warps=4,
    )  # fmt: skip
