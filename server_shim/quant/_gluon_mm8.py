"""The warp-specialized fp8 GEMM for Hopper ("wsp" configs), written in Gluon.

Why it exists: exact fp32 accumulation of fp8 products means that every 128 of K the MMAs'
partial product is waited for and added to the accumulator. In plain Triton every warp of a tile
runs the same instruction stream, so both warpgroups of a tile wait and add at the same moments
and the tensor cores idle meanwhile. Gluon lets warps take roles: one warp only issues the bulk
tensor copies (TMA) into a ring of shared-memory stages, and two consumer warpgroups, each owning
64 rows of the 128 x 128 tile, run their MMAs on their own schedule, so one adds while the other's
MMAs run. A persistent grid (one program per multiprocessor) lets the TMA warp fetch the next
tile while the consumers finish this one.

What it does not do, and why: a consumer cannot add step k-1's partial under step k's MMAs
(ptxas then serializes every MMA, C7514), and it cannot own 128 rows (accumulator and partial
would take 256 registers per thread). Measured on an H200 (README, `bench/gluon_mm8.py`): within
a few percent of the plain-Triton "tmap" kernel, ahead at 1024 x 4096 x 4096 and 8192^3, behind at
4096^3; the tuner picks per shape.

The sums are those of `_mm8_tma_kernel` promoting every 128 of K (a fresh partial per K step,
added in fp32 in K order): the outputs are bitwise equal, which bench/gluon_mm8.py checks before
timing. Gluon kernels do not run under the Triton interpreter: where `arch.warp_specialized_fp8`
says no (CPU, ROCm, other NVIDIA generations, a triton without Gluon) a pinned "wsp" config runs
as "tmap", the same sums in plain Triton, and the tuner does not offer it.
"""

from __future__ import annotations

import functools

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
    IMPORTED = True
except Exception:  # noqa: BLE001 -- any import failure means "no Gluon path"
    IMPORTED = False


HALF_M = 64  # rows per consumer warpgroup: its accumulator and partial take 2 x 64 registers per thread
BLOCK_M = 2 * HALF_M
BLOCK_N = 128
BLOCK_K = 128  # one promotion interval: a fresh partial per K step
# registers per thread at launch: 3 warpgroups (2 consumers + the TMA warp's) x 128 threads x 168 fill
# the 64 K register file; setmaxnreg then gives the consumers 232 and the TMA warp 40
MAXNREG = 168


if IMPORTED:
    _HALF_M_C = gl.constexpr(HALF_M)
    _BLOCK_M_C = gl.constexpr(BLOCK_M)
    _BLOCK_N_C = gl.constexpr(BLOCK_N)
    _BLOCK_K_C = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _tile_coords(tile, M, N, GROUP_M: gl.constexpr):
        """Output tile `tile` -> (row, column) offsets, GROUP_M row tiles per column sweep (the
        order `_tile_of` uses, so neighbours share weight columns in L2)."""
        tiles_m = gl.cdiv(M, _BLOCK_M_C)
        tiles_n = gl.cdiv(N, _BLOCK_N_C)
        in_group = GROUP_M * tiles_n
        first_m = (tile // in_group) * GROUP_M
        group_rows = gl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_rows
        pid_n = (tile % in_group) // group_rows
        return pid_m * _BLOCK_M_C, pid_n * _BLOCK_N_C

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, PROGRAMS: gl.constexpr,
                  GROUP_M: gl.constexpr):  # fmt: skip
        """One warp: for every K step of every tile of this program, wait for a free stage and
        copy a's and b's 128 x 128 tiles into it by TMA (zeros beyond the tensors)."""
        stages: gl.constexpr = a_bufs.type.shape[0]
        tiles = gl.cdiv(M, _BLOCK_M_C) * gl.cdiv(N, _BLOCK_N_C)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        step = 0
        for tile in range(gl.program_id(0), tiles, PROGRAMS):
            off_m, off_n = _tile_coords(tile, M, N, GROUP_M)
            for k0 in range(0, K, _BLOCK_K_C):
                s = step % stages
                mbarrier.wait(empty.index(s), ((step // stages) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                _tma_load(a_desc, [off_m, k0], ready.index(s), a_bufs.index(s))
                _tma_load(b_desc, [off_n, k0], ready.index(s), b_bufs.index(s))
                step += 1

    @gluon.jit
    def _consumer(a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn, sas0, sas1,
                  sbs0, sbs1, HALF: gl.constexpr, PROGRAMS: gl.constexpr, GROUP_M: gl.constexpr,
                  A_MODE: gl.constexpr, B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
        """One warpgroup: rows [HALF * 64, +64) of each tile. Per K step a fresh fp32 partial from
        the MMAs, waited for and added to the accumulator (block mode: times the step's scales, a's
        [64, 1] and b's one scalar per tile, loaded before the MMAs so their latency hides under
        them); then the tensor (0) or row (1) scales, bias, cast and store. The add waits for its
        own MMAs: adding the previous step's partial under this step's MMAs instead makes ptxas
        serialize every MMA (C7514), so the overlap comes from the other consumer."""
        stages: gl.constexpr = a_bufs.type.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, _BLOCK_N_C, 32])  # fmt: skip
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        zero = gl.zeros([_HALF_M_C, _BLOCK_N_C], gl.float32, mma)
        tiles = gl.cdiv(M, _BLOCK_M_C) * gl.cdiv(N, _BLOCK_N_C)
        step = 0
        for tile in range(gl.program_id(0), tiles, PROGRAMS):
            off_m, off_n = _tile_coords(tile, M, N, GROUP_M)
            offs_m = off_m + HALF * _HALF_M_C + gl.arange(0, _HALF_M_C, layout=rows_l)
            offs_n = off_n + gl.arange(0, _BLOCK_N_C, layout=cols_l)
            rm = offs_m % M
            rn = offs_n % N
            acc = gl.zeros([_HALF_M_C, _BLOCK_N_C], gl.float32, mma)
            for k0 in range(0, K, _BLOCK_K_C):
                s = step % stages
                if A_MODE == 2:
                    sa = gl.load(as_ptr + rm * sas0 + (k0 // _BLOCK_K_C) * sas1)
                if B_MODE == 2:
                    sb = gl.load(bs_ptr + (off_n // _BLOCK_N_C) * sbs0 + (k0 // _BLOCK_K_C) * sbs1)
                mbarrier.wait(ready.index(s), (step // stages) & 1)
                a = a_bufs.index(s).slice(HALF * _HALF_M_C, _HALF_M_C, dim=0)
                b = b_bufs.index(s).permute((1, 0))
                part = warpgroup_mma(a, b, zero, use_acc=False, is_async=True)
                part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                mbarrier.arrive(empty.index(s), count=1)
                if A_MODE == 2 and B_MODE == 2:
                    part = part * (sa * sb)[:, None]
                elif A_MODE == 2:
                    part = part * sa[:, None]
                elif B_MODE == 2:
                    part = part * sb
                acc += part
                step += 1
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
            mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            ptrs = c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn
            gl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _mm8_wsp_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn, sas0, sas1, sbs0,
                        sbs1, PROGRAMS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        A_MODE: gl.constexpr, B_MODE: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
        """C = (A * sa) @ (B * sb)^T for fp8 A [M, K], B [N, K], tensor, row or block scales: a
        persistent grid of PROGRAMS programs, each a TMA warp and two consumer warpgroups (module
        docstring). Registers: 3 warpgroups x 128 threads x MAXNREG at launch, then setmaxnreg
        gives the consumers 232 and the TMA warp's group 40 (the same total)."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn, sas0, sas1,
                         sbs0, sbs1, 0, PROGRAMS, GROUP_M, A_MODE, B_MODE, HAS_BIAS)),
            (_consumer, (a_bufs, b_bufs, ready, empty, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, scm, scn, sas0, sas1,
                         sbs0, sbs1, 1, PROGRAMS, GROUP_M, A_MODE, B_MODE, HAS_BIAS)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, PROGRAMS, GROUP_M)),
        ], [4, 1], [232, 40])  # fmt: skip


@functools.cache
def _layouts() -> tuple:
    """The shared-memory layouts of a's and b's stage tiles (128-byte swizzle: TMA's and wgmma's)."""
    a = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
    b = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float8e4nv)
    return a, b


def descriptor_type(operand: str) -> str:
    """The JIT's signature type of a's or b's descriptor, for compiling without a GPU
    (bench/sm90_compile.py)."""
    a, b = _layouts()
    shape, layout = ([BLOCK_M, BLOCK_K], a) if operand == "a" else ([BLOCK_N, BLOCK_K], b)
    return f"tensordesc<fp8e4nv[{shape[0]}, {shape[1]}],{layout!r}>"


def mm8_wsp(a, b, a_scale, b_scale, out, bias, sa: tuple[int, int], sb: tuple[int, int], *, am: int, bmode: int,
            programs: int, group_m: int, stages: int) -> None:  # fmt: skip
    """out = (a * a_scale) @ (b * b_scale)^T + bias with the warp-specialized kernel.

    a [M, K] and b [N, K] fp8 e4m3fn, K-contiguous with 16-byte aligned rows; scale modes (am,
    bmode) 0 tensor (one element), 1 row (element i at i * stride 0), 2 block (1 x 128 groups for
    a, 128 x 128 blocks for b); sa, sb the scales' strides; out [M, N] bf16 / fp16 / fp32."""
    m, k = a.shape
    n = b.shape[0]
    a_layout, b_layout = _layouts()
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K], a_layout)
    b_desc = TensorDescriptor.from_tensor(b, [BLOCK_N, BLOCK_K], b_layout)
    tiles = -(-m // BLOCK_M) * -(-n // BLOCK_N)
    grid = (min(programs, tiles),)  # PROGRAMS stays the device's count: one compile for every shape
    _mm8_wsp_kernel[grid](
        a_desc, b_desc, out, a_scale, b_scale, bias if bias is not None else out, m, n, k,
        out.stride(0), out.stride(1), *sa, *sb, PROGRAMS=programs, GROUP_M=group_m, STAGES=stages,
        A_MODE=am, B_MODE=bmode, HAS_BIAS=bias is not None, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
