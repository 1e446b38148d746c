"""The warp-specialized fp8 GEMM for Hopper ("wsp" configs), written in Gluon.

Why it exists: exact fp32 accumulation of fp8 products means that every 128 of K the MMAs'
partial product is waited for and added to the accumulator. In plain Triton every warp of a tile
runs the same instruction stream, so both warpgroups of a tile wait and add at the same moments
and the tensor cores idle meanwhile. Gluon lets warps take roles: one warp only issues the bulk
tensor copies (TMA) into a ring of shared-memory stages, and two consumer warpgroups, each owning
64 rows of the 128-row tile, run their MMAs on their own schedule, so one adds while the other's
MMAs run. A persistent grid (one program per multiprocessor) lets the TMA warp fetch the next
tile while the consumers finish this one.

The tile is 128 x 256 or 128 x 128 (the tuner times both): a consumer walks its 64 rows in
128-column pieces, one fp32 partial live at a time, so a 256-wide tile (the bytes per FLOP of
cuBLAS's tiles) fits its registers, block scales included (`_promote` says how). What it does not do, and why: a consumer cannot add step k-1's partial
under step k's MMAs (ptxas then serializes every MMA, C7514). Measured on an H200 (docs/gemm.md,
`bench/gluon_mm8.py`): 0.90-0.92x `_scaled_mm` with 256 columns, against 0.83-0.87x for 128,
storing from the registers; 1.05-1.07x (H100) since the output goes through shared memory by bulk
tensor copies (`_store`).

The sums are those of `_mm8_tma_kernel` promoting every 128 of K (a fresh partial per K step,
added in fp32 in K order): the outputs are bitwise equal, which bench/gluon_mm8.py checks before
timing. Gluon kernels do not run under the Triton interpreter: where `arch.warp_specialized_fp8`
says no (CPU, ROCm, other NVIDIA generations, a triton without Gluon) a pinned "wsp" config runs
as "tmap", the same sums in plain Triton, and the tuner does not offer it.
"""

from __future__ import annotations

import functools

from server_shim.switches import env_switch

try:  # Gluon ships with triton >= 3.5; absent (or unusable) elsewhere
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the bulk tensor copy global -> shared: `async_load` from triton 3.7, the old name before
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # a partition's warps (named barrier)
    IMPORTED = True
except Exception:  # noqa: BLE001 -- any import failure means "no Gluon path"
    IMPORTED = False


HALF_M = 64  # rows per consumer warpgroup: 2 accumulators + 1 partial at 256 columns, 3 x 64 registers
BLOCK_M = 2 * HALF_M
SUB_N = 128  # columns per MMA group (one or two a tile): a 64 x 128 fp32 partial, 64 registers a thread
BLOCK_K = 128  # one promotion interval: a fresh partial per K step
# registers per thread at launch: 3 warpgroups (2 consumers + the TMA warp's) x 128 threads x 168 fit
# the 64 K register file; setmaxnreg then gives the consumers 240 and the TMA warp's group 24
MAXNREG = 168


if IMPORTED:
    _HALF_M_C = gl.constexpr(HALF_M)
    _BLOCK_M_C = gl.constexpr(BLOCK_M)
    _SUB_N_C = gl.constexpr(SUB_N)
    _BLOCK_K_C = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _tile_coords(tile, M, N, BN: gl.constexpr, GROUP_M: gl.constexpr):
        """Output tile `tile` -> (row, column) offsets, GROUP_M row tiles per column sweep (the
        order `_tile_of` uses, so neighbours share weight columns in L2)."""
        tiles_m = gl.cdiv(M, _BLOCK_M_C)
        tiles_n = gl.cdiv(N, BN)
        in_group = GROUP_M * tiles_n
        first_m = (tile // in_group) * GROUP_M
        group_rows = gl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_rows
        pid_n = (tile % in_group) // group_rows
        return pid_m * _BLOCK_M_C, pid_n * BN

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, PROGRAMS: gl.constexpr,
                  GROUP_M: gl.constexpr):  # fmt: skip
        """One warp: for every K step of every tile of this program, wait for a free stage and
        copy a's 128 x 128 and b's BN x 128 tiles into it by TMA (zeros beyond the tensors)."""
        stages: gl.constexpr = a_bufs.type.shape[0]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        tiles = gl.cdiv(M, _BLOCK_M_C) * gl.cdiv(N, BN)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        step = 0
        for tile in range(gl.program_id(0), tiles, PROGRAMS):
            off_m, off_n = _tile_coords(tile, M, N, BN, GROUP_M)
            for k0 in range(0, K, _BLOCK_K_C):
                s = step % stages
                mbarrier.wait(empty.index(s), ((step // stages) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [off_m, k0], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [off_n, k0], ready.index(s), b_bufs.index(s))
                step += 1

    @gluon.jit
    def _partial(a, b_bufs, s, j: gl.constexpr, zero):
        """K step's fp32 partial of columns [j * 128, +128): the MMAs issued and waited for."""
        b = b_bufs.index(s).slice(j * _SUB_N_C, _SUB_N_C, dim=0).permute((1, 0))
        part = warpgroup_mma(a, b, zero, use_acc=False, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(part,))

    @gluon.jit
    def _promote(acc, part, sa, sb, A_MODE: gl.constexpr, B_MODE: gl.constexpr, ONE_PIECE: gl.constexpr):
        """acc + a K step's partial, block modes times the step's scales (a's per row, b's one per
        128 columns). Both block-scaled: in a 128-wide tile the product of the scales is formed per
        row (two registers a thread) and the add is one FFMA a element, as in tensor mode (119
        against 181 sm90 instructions per K step; bench/sm90_compile.py). In a 256-wide tile those
        products of both pieces, two more registers, tip the consumer over its 240 and ptxas spills
        ~700 B inside the K loop, so there b's scalar goes first, then a's rows (FMUL + FFMA, no
        spill). One or two roundings of the scales' product either way: block mode is checked
        against float64, not bit for bit against "tmap"."""
        if A_MODE == 2 and B_MODE == 2:
            if ONE_PIECE:
                acc = gl.fma(part, (sa * sb)[:, None], acc)
            else:
                acc += (part * sb) * sa[:, None]
        elif A_MODE == 2:
            acc += part * sa[:, None]
        elif B_MODE == 2:
            acc += part * sb
        else:
            acc += part
        return acc

    @gluon.jit
    def _b_block_scale(bs_ptr, off_n, j: gl.constexpr, kb, N, sbs0, sbs1):
        """b's block scale for columns [off_n + j * 128, +128) and K group kb; the block index is
        clamped to the last one (a tile's second half can lie past N: no read past the scales)."""
        nb = gl.minimum(off_n // _SUB_N_C + j, (N - 1) // _SUB_N_C)
        return gl.load(bs_ptr + nb * sbs0 + kb * sbs1)

    @gluon.jit
    def _step_scales(as_ptr, bs_ptr, rm, off_n, kb, N, sas0, sas1, sbs0, sbs1, A_MODE: gl.constexpr,
                     B_MODE: gl.constexpr, SUB: gl.constexpr):  # fmt: skip
        """K group kb's block scales: a's for this consumer's rows, b's for each 128-column piece
        (1.0 where a mode is not block: tensor and row scales wait for the epilogue)."""
        sa = 1.0
        sb0 = 1.0
        sb1 = 1.0
        if A_MODE == 2:
            sa = gl.load(as_ptr + rm * sas0 + kb * sas1)
        if B_MODE == 2:
            sb0 = _b_block_scale(bs_ptr, off_n, 0, kb, N, sbs0, sbs1)
            if SUB == 2:
                sb1 = _b_block_scale(bs_ptr, off_n, 1, kb, N, sbs0, sbs1)
        return sa, sb0, sb1

    @gluon.jit
    def _k_step(a_bufs, b_bufs, ready, empty, acc0, acc1, step, k0, K, sa, sb0, sb1, as_ptr, bs_ptr, rm, off_n, N,
                sas0, sas1, sbs0, sbs1, zero, HALF: gl.constexpr, A_MODE: gl.constexpr, B_MODE: gl.constexpr,
                SUB: gl.constexpr):  # fmt: skip
        """One K step of a consumer (`_consumer`) with this step's scales sa, sb0, sb1; returns the
        accumulators and the next step's scales, loaded before this step's MMAs. Loaded in the same
        step they are used, a's (M-contiguous: a new line each step) cost an L2 round trip, which
        ptxas waits for before issuing the MMAs (it forms sa * sb first); the caller keeps two
        steps' scales in registers of their own (no copies, whose waits would land mid-step)."""
        stages: gl.constexpr = a_bufs.type.shape[0]
        s = step % stages
        if SUB == 1:
            nxt = gl.minimum(k0 // _BLOCK_K_C + 1, gl.cdiv(K, _BLOCK_K_C) - 1)
            sa_n, sb0_n, sb1_n = _step_scales(as_ptr, bs_ptr, rm, off_n, nxt, N, sas0, sas1, sbs0, sbs1, A_MODE,
                                              B_MODE, SUB)  # fmt: skip
        else:  # 256 columns: a second set of scales spills (2.8 KB); this step's, loaded now
            sa, sb0, sb1 = _step_scales(as_ptr, bs_ptr, rm, off_n, k0 // _BLOCK_K_C, N, sas0, sas1, sbs0, sbs1, A_MODE,
                                        B_MODE, SUB)  # fmt: skip
            sa_n, sb0_n, sb1_n = sa, sb0, sb1
        mbarrier.wait(ready.index(s), (step // stages) & 1)
        a = a_bufs.index(s).slice(HALF * _HALF_M_C, _HALF_M_C, dim=0)
        part = _partial(a, b_bufs, s, 0, zero)
        if SUB == 1:
            mbarrier.arrive(empty.index(s), count=1)
        acc0 = _promote(acc0, part, sa, sb0, A_MODE, B_MODE, SUB == 1)
        if SUB == 2:
            part = _partial(a, b_bufs, s, 1, zero)
            mbarrier.arrive(empty.index(s), count=1)
            acc1 = _promote(acc1, part, sa, sb1, A_MODE, B_MODE, False)
        return acc0, acc1, sa_n, sb0_n, sb1_n

    @gluon.jit
    def _store(acc, c_ptr, c_desc, c_buf, as_ptr, bs_ptr, bias_ptr, row0, offs_m, rm, off_n, M, N, scm, scn, sas0, sbs0,
               A_MODE: gl.constexpr, B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, CBUF: gl.constexpr):  # fmt: skip
        """The tensor (0) or row (1) scales, bias and cast of one 64 x 128 piece, then its store:
        with c_desc (CBUF > 0) through shared memory by one bulk tensor copy, else masked from the
        registers. The copy takes the epilogue's addresses and bounds masks off the consumer (682 ->
        587 sm90 instructions a tile outside the K loop, whose 32 steps at 4096^3 take 6208; both
        consumers store at once, and the tensor cores idle meanwhile) and does not wait: the buffer's previous copy (CBUF pieces ago, a
        whole tile's K loop for CBUF = SUB) is waited for just before the buffer is written."""
        cols_l: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
        offs_n = off_n + gl.arange(0, _SUB_N_C, layout=cols_l)
        rn = offs_n % N
        if A_MODE == 0:
            acc = acc * gl.load(as_ptr)
        elif A_MODE == 1:
            acc = acc * gl.load(as_ptr + rm * sas0)[:, None]
        if B_MODE == 0:
            acc = acc * gl.load(bs_ptr)
        elif B_MODE == 1:
            acc = acc * gl.load(bs_ptr + rn * sbs0)[None, :]
        if HAS_BIAS:
            acc += gl.load(bias_ptr + rn).to(gl.float32)[None, :]
        if CBUF > 0:
            tma.store_wait(CBUF - 1)  # this buffer's last copy has read it (copies complete in order)
            _barrier()  # ... for every thread of the warpgroup, not only the one that issued it
            c_buf.store(acc.to(c_desc.dtype))
            fence_async_shared()
            _barrier()
            _tma_store(c_desc, [row0, off_n], c_buf)
        else:
            mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            gl.store(
                c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn,
                acc.to(c_ptr.dtype.element_ty),
                mask=mask,
            )

    @gluon.jit
    def _consumer(a_bufs, b_bufs, ready, empty, c_ptr, c_desc, c_bufs, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn,
                  sas0, sas1, sbs0, sbs1, HALF: gl.constexpr, PROGRAMS: gl.constexpr, GROUP_M: gl.constexpr,
                  A_MODE: gl.constexpr, B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr, CBUF: gl.constexpr):  # fmt: skip
        """One warpgroup: rows [HALF * 64, +64) of each tile, in 128-column pieces (one or two). Per
        K step and piece a fresh fp32 partial from the MMAs, waited for and added to the piece's
        accumulator (block mode: times the step's scales, loaded a step ahead, `_k_step`); then
        `_store`. Each add waits for its own MMAs: reading a
        partial while other MMAs of this warpgroup run makes ptxas serialize every MMA (C7514), so
        the overlap comes from the other consumer. Two pieces: a 64 x 256 accumulator with one
        64 x 128 partial fits the registers, a 64 x 256 partial would not."""
        SUB: gl.constexpr = b_bufs.type.shape[1] // _SUB_N_C
        BN: gl.constexpr = SUB * _SUB_N_C
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, _SUB_N_C, 32])  # fmt: skip
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        zero = gl.zeros([_HALF_M_C, _SUB_N_C], gl.float32, mma)
        tiles = gl.cdiv(M, _BLOCK_M_C) * gl.cdiv(N, BN)
        step = 0
        for tile in range(gl.program_id(0), tiles, PROGRAMS):
            off_m, off_n = _tile_coords(tile, M, N, BN, GROUP_M)
            offs_m = off_m + HALF * _HALF_M_C + gl.arange(0, _HALF_M_C, layout=rows_l)
            rm = offs_m % M
            acc0 = gl.zeros([_HALF_M_C, _SUB_N_C], gl.float32, mma)
            acc1 = gl.zeros([_HALF_M_C, _SUB_N_C], gl.float32, mma)
            sa, sb0, sb1 = _step_scales(
                as_ptr, bs_ptr, rm, off_n, 0, N, sas0, sas1, sbs0, sbs1, A_MODE, B_MODE, SUB
            )
            if SUB == 1 and (A_MODE == 2 or B_MODE == 2):  # two steps an iteration, each step's scales in
                # registers of their own
                for k0 in range(0, K - _BLOCK_K_C, 2 * _BLOCK_K_C):
                    acc0, acc1, sa2, sb02, sb12 = _k_step(
                        a_bufs, b_bufs, ready, empty, acc0, acc1, step, k0, K, sa, sb0, sb1, as_ptr, bs_ptr, rm,
                        off_n, N, sas0, sas1, sbs0, sbs1, zero, HALF, A_MODE, B_MODE, SUB)  # fmt: skip
                    acc0, acc1, sa, sb0, sb1 = _k_step(
                        a_bufs, b_bufs, ready, empty, acc0, acc1, step + 1, k0 + _BLOCK_K_C, K, sa2, sb02, sb12,
                        as_ptr, bs_ptr, rm, off_n, N, sas0, sas1, sbs0, sbs1, zero, HALF, A_MODE, B_MODE, SUB)  # fmt: skip
                    step += 2
                if gl.cdiv(K, _BLOCK_K_C) % 2 == 1:  # an odd step count: the last step alone
                    acc0, acc1, sa, sb0, sb1 = _k_step(
                        a_bufs, b_bufs, ready, empty, acc0, acc1, step, K - K % (2 * _BLOCK_K_C), K, sa, sb0, sb1,
                        as_ptr, bs_ptr, rm, off_n, N, sas0, sas1, sbs0, sbs1, zero, HALF, A_MODE, B_MODE, SUB)  # fmt: skip
                    step += 1
            else:
                for k0 in range(0, K, _BLOCK_K_C):
                    acc0, acc1, sa, sb0, sb1 = _k_step(
                        a_bufs, b_bufs, ready, empty, acc0, acc1, step, k0, K, sa, sb0, sb1, as_ptr, bs_ptr, rm,
                        off_n, N, sas0, sas1, sbs0, sbs1, zero, HALF, A_MODE, B_MODE, SUB)  # fmt: skip
                    step += 1
            row0 = off_m + HALF * _HALF_M_C
            c_buf0 = c_bufs.index(HALF * CBUF) if CBUF > 0 else c_bufs
            _store(acc0, c_ptr, c_desc, c_buf0, as_ptr, bs_ptr, bias_ptr, row0, offs_m, rm, off_n, M, N, scm, scn,
                   sas0, sbs0, A_MODE, B_MODE, HAS_BIAS, CBUF)  # fmt: skip
            if SUB == 2:
                c_buf1 = c_bufs.index(HALF * CBUF + CBUF - 1) if CBUF > 0 else c_bufs
                _store(acc1, c_ptr, c_desc, c_buf1, as_ptr, bs_ptr, bias_ptr, row0, offs_m, rm, off_n + _SUB_N_C,
                       M, N, scm, scn, sas0, sbs0, A_MODE, B_MODE, HAS_BIAS, CBUF)  # fmt: skip
        if CBUF > 0:
            tma.store_wait(0)  # the last copies read shared memory that ends with the program

    @gluon.jit
    def _mm8_wsp_kernel(a_desc, b_desc, c_desc, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn, sas0, sas1,
                        sbs0, sbs1, PROGRAMS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        A_MODE: gl.constexpr, B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr,
                        CBUF: gl.constexpr = 0):  # fmt: skip
        """C = (A * sa) @ (B * sb)^T for fp8 A [M, K], B [N, K], tensor, row or block scales: a
        persistent grid of PROGRAMS programs, each a TMA warp and two consumer warpgroups (module
        docstring). Registers: 3 warpgroups x 128 threads x MAXNREG at launch, then setmaxnreg
        gives the consumers 240 and the TMA warp's group 24 (the same total). CBUF > 0: c_desc is
        the output's descriptor (64 x 128 blocks) and each consumer owns CBUF output buffers."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
        if CBUF > 0:
            c_bufs = gl.allocate_shared_memory(
                c_desc.dtype, [2 * CBUF] + c_desc.block_type.shape, c_desc.layout
            )
        else:
            c_bufs = a_bufs  # not used: the stores go from the registers
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, c_ptr, c_desc, c_bufs, as_ptr, bs_ptr, bias_ptr, M, N, K, scm,
                         scn, sas0, sas1, sbs0, sbs1, 0, PROGRAMS, GROUP_M, A_MODE, B_MODE, HAS_BIAS, CBUF)),
            (_consumer, (a_bufs, b_bufs, ready, empty, c_ptr, c_desc, c_bufs, as_ptr, bs_ptr, bias_ptr, M, N, K, scm,
                         scn, sas0, sas1, sbs0, sbs1, 1, PROGRAMS, GROUP_M, A_MODE, B_MODE, HAS_BIAS, CBUF)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, PROGRAMS, GROUP_M)),
        ], [4, 1], [240, 24])  # fmt: skip


# the bulk-copy store's default (DIFFTEST_TRITON_BULK_STORE=0 turns it off): on since an H100 checked
# every tensor-scale variant bit for bit against "tmap" and block scales against float64, and timed
# it 1.14-1.23x the register store (bench/gluon_mm8.py --stores bulk regs, 2026-12-05; README)
BULK_STORE = True
SMEM_BYTES = 232448  # an sm90 block's opt-in shared memory (227 KiB); the kernel runs on sm90 only
_GL_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@functools.cache
def _layouts(block_n: int) -> tuple:
    """The shared-memory layouts of a's and b's stage tiles (128-byte swizzle: TMA's and wgmma's)."""
    a = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
    b = gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.float8e4nv)
    return a, b


@functools.cache
def _out_layout(dtype_name: str):  # noqa: ANN202 - a Gluon layout
    """The shared-memory layout of one consumer's 64 x 128 output piece."""
    return gl.NVMMASharedLayout.get_default_for([HALF_M, SUB_N], getattr(gl, _GL_DTYPES[dtype_name]))


def out_buffers(am: int, bmode: int, stages: int, block_n: int, out_bytes: int) -> int:
    """Output pieces a consumer stages in shared memory for the bulk-copy store: one per 128 columns
    of the tile where they fit beside the operand stages, else one (the second piece then waits for
    the first's copy), else 0 (stores from the registers). bf16 128 x 256 with 4 stages: 192 KiB of
    stages + 2 x 16 KiB fit in 227 KiB, 2 x 32 KiB do not. Not for block scales on 256 columns:
    that consumer is at its 240 registers already (`_promote`), and the store's shared-memory
    addresses make ptxas spill 256 B in the K loop (bench/sm90_compile.py)."""
    if am == 2 and bmode == 2 and block_n > SUB_N:
        return 0
    stage = (BLOCK_M + block_n) * BLOCK_K  # fp8: a byte an element
    piece = 2 * HALF_M * SUB_N * out_bytes  # both consumers'
    spare = SMEM_BYTES - 1024 - stages * stage  # barriers and alignment
    for cbuf in (block_n // SUB_N, 1):
        if cbuf * piece <= spare:
            return cbuf
    return 0


def launch_buffers(
    am: int, bmode: int, stages: int, block_n: int, out_bytes: int, bulk_store: bool | None
) -> int:
    """The CBUF a launch compiles with: `out_buffers` where the bulk store is on (bulk_store, or
    where None DIFFTEST_TRITON_BULK_STORE, unset BULK_STORE), else 0. mm8_wsp and
    bench/sm90_compile.py both take it from here, so the compile check covers what launches."""
    if bulk_store is None:
        bulk_store = env_switch("DIFFTEST_TRITON_BULK_STORE", BULK_STORE)
    return out_buffers(am, bmode, stages, block_n, out_bytes) if bulk_store else 0


def _bulk_storable(out) -> bool:  # noqa: ANN001 - a torch tensor
    """A bulk tensor copy can write `out`: row-major, 16-byte aligned base and rows."""
    size = out.element_size()
    return (
        str(out.dtype).removeprefix("torch.") in _GL_DTYPES
        and out.stride(1) == 1
        and (out.stride(0) * size) % 16 == 0
        and out.data_ptr() % 16 == 0
    )


def descriptor_type(operand: str, block_n: int) -> str:
    """The JIT's signature type of a's, b's or the bf16 output's ("c") descriptor, for compiling
    without a GPU (bench/sm90_compile.py)."""
    if operand == "c":
        return f"tensordesc<bf16[{HALF_M}, {SUB_N}],{_out_layout('bfloat16')!r}>"
    a, b = _layouts(block_n)
    shape, layout = ([BLOCK_M, BLOCK_K], a) if operand == "a" else ([block_n, BLOCK_K], b)
    return f"tensordesc<fp8e4nv[{shape[0]}, {shape[1]}],{layout!r}>"


def mm8_wsp(a, b, a_scale, b_scale, out, bias, sa: tuple[int, int], sb: tuple[int, int], *, am: int, bmode: int,
            programs: int, group_m: int, stages: int, block_n: int, bulk_store: bool | None = None) -> None:  # fmt: skip
    """out = (a * a_scale) @ (b * b_scale)^T + bias with the warp-specialized kernel.

    a [M, K] and b [N, K] fp8 e4m3fn, K-contiguous with 16-byte aligned rows; scale modes (am,
    bmode) 0 tensor (one element), 1 row (element i at i * stride 0), 2 block (1 x 128 groups for
    a, 128 x 128 blocks for b); sa, sb the scales' strides; out [M, N] bf16 / fp16 / fp32.
    bulk_store: write out by bulk tensor copies where it can (`launch_buffers`, `_bulk_storable`),
    False from the registers (bench/gluon_mm8.py times both); None: DIFFTEST_TRITON_BULK_STORE,
    unset BULK_STORE."""
    m, k = a.shape
    n = b.shape[0]
    a_layout, b_layout = _layouts(block_n)
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K], a_layout)
    b_desc = TensorDescriptor.from_tensor(b, [block_n, BLOCK_K], b_layout)
    cbuf = (
        launch_buffers(am, bmode, stages, block_n, out.element_size(), bulk_store)
        if _bulk_storable(out)
        else 0
    )
    c_desc = None
    if cbuf:
        c_desc = TensorDescriptor.from_tensor(
            out, [HALF_M, SUB_N], _out_layout(str(out.dtype).removeprefix("torch."))
        )
    tiles = -(-m // BLOCK_M) * -(-n // block_n)
    grid = (min(programs, tiles),)  # PROGRAMS stays the device's count: one compile for every shape
    _mm8_wsp_kernel[grid](
        a_desc, b_desc, c_desc, out, a_scale, b_scale, bias if bias is not None else out, m, n, k,
        out.stride(0), out.stride(1), *sa, *sb, PROGRAMS=programs, GROUP_M=group_m, STAGES=stages,
        A_MODE=am, B_MODE=bmode, HAS_BIAS=bias is not None, CBUF=cbuf, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
