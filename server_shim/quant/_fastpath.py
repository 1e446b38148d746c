"""Launchers of the fast kernels (_triton_fast.py): config choice, split-K workspace, second pass.

kernels.py validates the inputs and calls `mm8` / `wonly` with tensors that are known good; these
pick a config through quant/tuning.py (timed once per key, see there), allocate the split-K
workspace (a plain torch.empty: inside a CUDA graph capture it comes from the graph's pool) and
launch. Nothing here syncs the host or reads a tensor's values.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from server_shim.quant import _gluon_mm8, _gluon_w4, arch, tuning

# the dequantization pass of the "deq" path: [32 rows, 256 k] per program
_DEQ_BN, _DEQ_BK = 32, 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _family_of(device_key: str) -> str:
    return arch.gemm_family(device_key)


@functools.cache
def _packed_half_ptx_of(device_key: str, dtype: torch.dtype) -> bool:
    """arch.packed_half_ptx once per device and dtype: it reads the device's properties, which an
    eager 4-bit call would otherwise pay on every launch."""
    return arch.packed_half_ptx(device_key, dtype)


@functools.cache
def _warp_specialized_of(device_key: str) -> bool:
    """arch.warp_specialized_fp8 once per device (it reads the device's properties; every fp8 GEMM
    asks): DIFFTEST_TRITON_GLUON is read at a process's first fp8 GEMM on each device."""
    return arch.warp_specialized_fp8(device_key)


@functools.cache
def _gluon_mma_of(device_key: str) -> bool:
    """arch.gluon_mma_w4 once per device (it reads the device's properties)."""
    return arch.gluon_mma_w4(device_key)


def _device_key(device: torch.device) -> str:
    """ "cuda:N" (the current device where the index is unset), else the device type."""
    if device.type != "cuda":
        return device.type
    return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"


def family(k: SimpleNamespace, device: torch.device) -> str:
    if k.interp:
        return "cpu"
    return _family_of(_device_key(device))


def _splits(K: int, bk: int, split: int) -> tuple[int, int]:
    """(K_PER, number of splits): each split a whole number of K tiles, no split left empty."""
    kper = _cdiv(_cdiv(K, max(split, 1)), bk) * bk
    return kper, _cdiv(K, kper)


def _workspace(splits: int, M: int, N: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """The split-K partials [splits, M, N]; without a split the kernel never touches it (out stands in)."""
    return torch.empty(splits, M, N, dtype=dtype, device=out.device) if splits > 1 else out


def _reduce(k: SimpleNamespace, ws: torch.Tensor, out: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
            bias: torch.Tensor | None, sa0: int, sb0: int, am: int, bmode: int) -> None:  # fmt: skip
    """Sum ws's split partials into out (`_splitk_reduce_kernel`; ws's type says int32 or fp32)."""
    splits, M, N = ws.shape
    bm, bn = min(max(tuning._pow2(M), 8), 16), 128  # no 1-row blocks: not every triton lays them out
    k.reduce[(_cdiv(M, bm), _cdiv(N, bn))](
        ws, out, a_scale, b_scale, bias if bias is not None else out, M, N, splits,
        out.stride(0), out.stride(1), sa0, sb0,
        A_MODE=am, B_MODE=bmode, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
    )  # fmt: skip


_COUNTERS: dict[str, torch.Tensor] = {}
_COUNTERS_LOCK = threading.Lock()


def _counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """Zeroed int32 counters for `_split_finish`, one per output tile, kept per device and stream: every launch
    leaves them zero again. None inside a CUDA graph capture when the buffer would have to grow (a
    buffer allocated there lives in the graph's pool): the caller then reduces in a second kernel.
    One buffer per device and stream: the launches that share one run one after another."""
    key = f"{device}|{torch.cuda.current_stream(device).stream_id}" if device.type == "cuda" else str(device)
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(key)
        if buf is None or buf.numel() < tiles:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            buf = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
            _COUNTERS[key] = buf
        return buf


def _lag_ok(acc_int: bool, fast_acc: bool, decode: int) -> bool:
    """Whether "lag" configs mean anything: they change only fp8's promoted accumulation (int8's is
    exact in int32, fast and decoded fp8 accumulate in the MMA), elsewhere they would be "tile" twice."""
    return not (acc_int or fast_acc or decode != 0)


@functools.cache
def _descriptor_type() -> type | None:
    """Triton's host-side tensor descriptor (triton >= 3.4), or None on an older triton."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _descriptor_ok(t: torch.Tensor) -> bool:
    """The copy engine's rules for a 2-D tensor descriptor: rows contiguous, the row stride and the
    base 16-byte aligned."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _tma_ok(a: torch.Tensor, b: torch.Tensor, decode: int) -> bool:
    """Whether the "tma" configs can read a and b through tensor descriptors: native 8-bit operands
    (not decoded fp8 bits) that `_descriptor_ok` accepts, on a triton that has descriptors."""
    return decode == 0 and _descriptor_type() is not None and _descriptor_ok(a) and _descriptor_ok(b)


@functools.cache
def _programs(device_key: str) -> int:
    """The persistent grid of "tmap": one program per multiprocessor (2 under the interpreter, so
    that its tests walk several tiles per program)."""
    if not device_key.startswith("cuda"):
        return 2
    return torch.cuda.get_device_properties(torch.device(device_key)).multi_processor_count


def _launch_mm8_tma(k: SimpleNamespace, cfg: tuning.Cfg, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                    a_scale: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None, M: int, N: int,
                    K: int, sa: tuple[int, int], sb: tuple[int, int], *, am: int, bmode: int, group: int,
                    acc_int: bool, fast_acc: bool) -> None:  # fmt: skip
    desc = _descriptor_type()
    assert desc is not None  # _tma_ok said so
    ad, bd = desc.from_tensor(a, [cfg.bm, cfg.bk]), desc.from_tensor(b, [cfg.bn, cfg.bk])
    meta = dict(
        A_MODE=am, B_MODE=bmode, GROUP=group, HAS_BIAS=bias is not None, ACC_INT=acc_int, FAST_ACC=fast_acc,
        BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=cfg.group_m, PROMOTE=min(cfg.bk, 128),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    bias_arg = bias if bias is not None else out
    if cfg.path == "tmap":  # persistent: one program per multiprocessor, tiles stored by descriptor
        programs = _programs(_device_key(out.device))
        k.mm8_tmap[(programs,)](
            ad, bd, desc.from_tensor(out, [cfg.bm, cfg.bn]), a_scale, b_scale, bias_arg, M, N, K, *sa, *sb,
            PROGRAMS=programs, **meta,
        )  # fmt: skip
        return
    k.mm8_tma[(_cdiv(M, cfg.bm) * _cdiv(N, cfg.bn),)](
        ad, bd, out, a_scale, b_scale, bias_arg, M, N, K, out.stride(0), out.stride(1), *sa, *sb, **meta
    )


def _wsp_ok(a: torch.Tensor, out: torch.Tensor, *, blocked: bool, group: int, acc_int: bool,
            fast_acc: bool) -> bool:  # fmt: skip
    """Whether the Gluon warp-specialized kernel ("wsp", quant/_gluon_mm8.py) runs this GEMM:
    exactly accumulated fp8 e4m3fn on a device `arch.warp_specialized_fp8` accepts, block scales
    in 128-wide groups (its K step and tile width), a 16/32-bit float out. The caller has checked
    the operands' descriptors (`_tma_ok`)."""
    return (
        not (acc_int or fast_acc)
        and a.dtype == torch.float8_e4m3fn
        and (not blocked or group == 128)
        and out.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and _warp_specialized_of(_device_key(a.device))
    )


def _launch_mm8(k: SimpleNamespace, grid: tuple[int, int], cfg: tuning.Cfg, a: torch.Tensor, b: torch.Tensor,
                out: torch.Tensor, ws: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                bias: torch.Tensor | None, M: int, N: int, K: int, kper: int, sa: tuple[int, int],
                sb: tuple[int, int], *, am: int, bmode: int, group: int, acc_int: bool, decode: int,
                fast_acc: bool, counters: torch.Tensor | None = None) -> None:  # fmt: skip
    """`_mm8_kernel` on `grid` (tiles, splits); with counters its splits sum themselves (SPLIT_FIN)."""
    k.mm8[grid](
        a, b, out, ws, a_scale, b_scale, bias if bias is not None else out, M, N, K, kper,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), *sa, *sb,
        counters if counters is not None else ws, grid[1], SPLIT_FIN=counters is not None,
        A_MODE=am, B_MODE=bmode, GROUP=group, HAS_BIAS=bias is not None, ACC_INT=acc_int, DECODE=decode,
        FAST_ACC=fast_acc, SPLIT_OUT=ws is not out, EVEN_K=K % cfg.bk == 0, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn,
        BLOCK_K=cfg.bk, GROUP_M=cfg.group_m, PROMOTE=min(cfg.bk, 128), LAG=cfg.path == "lag" and _lag_ok(acc_int, fast_acc, decode),
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )  # fmt: skip


def tmap_stages(cfg: tuning.Cfg, out_bytes: int) -> int:
    """Stages of a "wsp" config run as plain-Triton "tmap" (pinned where Gluon cannot run), at most
    as many as fit in an sm90 block's shared memory beside Triton's epilogue buffer: "wsp" stores
    from its consumers' registers, "tmap" stages the whole tile (an H100 refused int8's
    128 x 256 x 128 with 4 stages: 263 200 B of 232 448). At least 2, the pipeline's minimum."""
    per_stage = (cfg.bm + cfg.bn) * cfg.bk  # 8-bit operands: a byte an element
    room = _gluon_mm8.SMEM_BYTES - 2048 - cfg.bm * cfg.bn * out_bytes  # 2 KiB: barriers, alignment
    return max(2, min(cfg.stages, room // per_stage))


def mm8(k: SimpleNamespace, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, a_scale: torch.Tensor,
        b_scale: torch.Tensor, bias: torch.Tensor | None, sa: tuple[int, int], sb: tuple[int, int], *,
        am: int, bmode: int, group: int, acc_int: bool, decode: int, fast_acc: bool) -> torch.Tensor:  # fmt: skip
    """out = (a * sa) @ (b * sb)^T through `_mm8_kernel` (a, b: fp8 / int8 / uint8 bits)."""
    (M, K), N = a.shape, b.shape[0]
    fam = family(k, a.device)
    blocked = 2 in (am, bmode)

    def tiles(cfg: tuning.Cfg) -> tuning.Cfg:  # block mode: one K tile inside one scale group
        if cfg.path == "wsp":
            return cfg  # K steps of 128: one per scale group
        return replace(cfg, bk=min(cfg.bk, group)) if blocked else cfg

    lag_ok = _lag_ok(acc_int, fast_acc, decode)
    tma_ok = _tma_ok(a, b, decode)
    tmap_ok = tma_ok and _descriptor_ok(out)  # "tmap" also stores out through a descriptor
    wsp_ok = tma_ok and _wsp_ok(a, out, blocked=blocked, group=group, acc_int=acc_int, fast_acc=fast_acc)

    def cands() -> list[tuning.Cfg]:
        cs = tuning.candidates(fam, "mm8", M, N, K)
        cs = [c for c in cs if (lag_ok or c.path != "lag") and (tma_ok or c.path != "tma")]
        cs = [c for c in cs if (tmap_ok or c.path != "tmap") and (wsp_ok or c.path != "wsp")]
        return list(dict.fromkeys(tiles(c) for c in cs))

    key = (f"{fam}|mm8|{a.dtype}|a{am}b{bmode}g{group}d{decode}f{int(fast_acc)}|"
           f"m{tuning.m_bucket(M)}|n{N}|k{K}")  # fmt: skip

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        cfg = tiles(cfg)
        if cfg.path == "wsp":
            if wsp_ok:
                _gluon_mm8.mm8_wsp(a, b, a_scale, b_scale, out, bias, sa, sb, am=am, bmode=bmode,
                                   programs=_programs(_device_key(out.device)), group_m=cfg.group_m,
                                   stages=cfg.stages, block_n=cfg.bn)  # fmt: skip
                return out
            # pinned or stored where Gluon cannot run: the same sums in plain Triton, in as many
            # stages as its shared memory holds (stages change no sum)
            cfg = replace(cfg, path="tmap", stages=tmap_stages(cfg, out.element_size()))
        if cfg.path == "tmap" and not tmap_ok:  # out's rows cannot take a descriptor store
            cfg = replace(cfg, path="tma")
        if cfg.path in ("tma", "tmap"):
            if tma_ok:  # no split
                _launch_mm8_tma(k, cfg, a, b, out, a_scale, b_scale, bias, M, N, K, sa, sb, am=am, bmode=bmode,
                                group=group, acc_int=acc_int, fast_acc=fast_acc)  # fmt: skip
                return out
            # a pinned (FORCE) or stored "tma" config on unaligned operands: the pointer tile, same sums
            cfg = replace(cfg, path="tile", split=1)
        kper, splits = _splits(K, cfg.bk, cfg.split)
        ws = _workspace(splits, M, N, torch.int32 if acc_int else torch.float32, out)
        grid = (_cdiv(M, cfg.bm) * _cdiv(N, cfg.bn), splits)
        if cfg.path == "gemv":  # one activation row per program (grid z); bm is 1
            k.gemv8[(_cdiv(N, cfg.bn), splits, M)](
                a, b, out, ws, a_scale, b_scale, bias if bias is not None else out, M, N, K, kper,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), *sa, *sb,
                A_MODE=am, B_MODE=bmode, GROUP=group, HAS_BIAS=bias is not None, ACC_INT=acc_int, DECODE=decode,
                SPLIT_OUT=splits > 1, EVEN_K=K % cfg.bk == 0, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )  # fmt: skip
        else:
            # the tile's splits sum themselves on per-tile counters (none inside a graph capture that
            # would grow them: the reduction kernel then)
            counters = _counters(out.device, grid[0]) if splits > 1 else None
            _launch_mm8(k, grid, cfg, a, b, out, ws, a_scale, b_scale, bias, M, N, K, kper, sa, sb, am=am,
                        bmode=bmode, group=group, acc_int=acc_int, decode=decode, fast_acc=fast_acc,
                        counters=counters)  # fmt: skip
            if counters is not None:
                return out
        if splits > 1:
            # block scales were applied per K tile: the reduction applies tensor/row ones only
            _reduce(k, ws, out, a_scale, b_scale, bias, sa[0], sb[0], am, bmode)
        return out

    return run(tuning.TUNER.pick(key, cands, run, tune=not k.interp, rows=M))


def mm8_act(k: SimpleNamespace, x: torch.Tensor, b: torch.Tensor, out: torch.Tensor, a_scale: torch.Tensor,
            b_scale: torch.Tensor, bias: torch.Tensor | None, sb: tuple[int, int], *, am: int, bmode: int, group: int,
            qmax: float, fnuz: bool, acc_int: bool, decode: int, amax_floor: float,
            two_kernels: Callable[[], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """out = (q(x) * sa) @ (b * sb)^T for one-token rows, the activation x quantized inside the GEMV
    (`_gemv8_kernel` QUANT_A): per token (am 1; a_scale [M, 1] fp32 receives the scales) or per
    1 x group block (am 2; a K tile is a group). The tuner also times "quant2" -- `two_kernels`,
    the act-quant kernel and then the GEMM's own tuned choice: where K is long the fused
    quantization (a division per element) costs more than the launch it saves, and it says so."""
    (M, K), N = x.shape, b.shape[0]
    fam = family(k, x.device)
    key = f"{fam}|mm8q|{x.dtype}|{b.dtype}|a{am}b{bmode}g{group}d{decode}|m{tuning.m_bucket(M)}|n{N}|k{K}"

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        if cfg.path != "gemv":  # "quant2", or a pinned (FORCE) tile config: the two kernels
            return two_kernels()
        if am == 2:
            cfg = replace(cfg, bk=group)
        kper, splits = _splits(K, cfg.bk, cfg.split)
        ws = _workspace(splits, M, N, torch.int32 if acc_int else torch.float32, out)
        k.gemv8[(_cdiv(N, cfg.bn), splits, M)](
            x, b, out, ws, a_scale, b_scale, bias if bias is not None else out, M, N, K, kper,
            x.stride(0), x.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            a_scale.stride(0), a_scale.stride(1), *sb,
            A_MODE=am, B_MODE=bmode, GROUP=group, HAS_BIAS=bias is not None, ACC_INT=acc_int, DECODE=decode,
            SPLIT_OUT=splits > 1, EVEN_K=K % cfg.bk == 0, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, QUANT_A=True,
            QMAX=qmax, FNUZ=fnuz, AMAX_FLOOR=amax_floor, num_warps=cfg.warps, num_stages=cfg.stages,
        )  # fmt: skip
        if splits > 1:  # block scales were applied per K tile; a per-token scale is in a_scale
            _reduce(k, ws, out, a_scale, b_scale, bias, a_scale.stride(0), sb[0], am, bmode)
        return out

    def cands() -> list[tuning.Cfg]:
        gemvs = [replace(c, bk=group) if am == 2 else c for c in tuning.gemv_candidates("mm8")]
        return list(dict.fromkeys(gemvs)) + [tuning.QUANT2]

    return run(tuning.TUNER.pick(key, cands, run, tune=not k.interp, rows=M))


def _bf16_pairs(x: torch.Tensor) -> bool:
    """Whether bf16 x can be read as int32 pairs (`_bf16_pair_planes`): unit stride, 4-byte aligned rows."""
    return x.dtype == torch.bfloat16 and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0


def _words(w: torch.Tensor, K: int, group: int) -> torch.Tensor | None:
    """The packed 4-bit weight [N, K/2] as int32 words [N, K/8] for `_gemv4w_kernel`, or None where
    that view does not exist (K % 8, a row not 4-byte aligned, a non-unit byte stride) or the group is
    not a power of two from 8 to 256 (the kernel's group-shaped word tiles)."""
    if K % 8 or not (group & (group - 1) == 0 and 8 <= group <= 256) or w.stride(1) != 1:
        return None
    if w.stride(0) % 4 or w.storage_offset() % 4 or w.shape[1] % 4:
        return None
    try:
        return w.view(torch.int32)
    except RuntimeError:
        return None


# the 4-bit tile paths whose K splits sum themselves (_split_finish)
SELF_REDUCING = ("fusedk", "wordsk", "wordsb", "tilek")
# the 4-bit tile paths on int32 words (`_wonly_words_kernel`), where `words_tile` says they fit
WORD_PATHS = ("words", "wordsk", "wordsb")
# the 4-bit M = 1 GEMVs on int32 words ("gemvg" where the word view does not fit)
WORD_GEMVS = ("gemvw", "gemvx", "gemvr", "gemvf")


def gemv4_kernel(k: SimpleNamespace, path: str) -> Any:
    """The 4-bit GEMV a "gemv" / "gemvg" / word GEMV config launches ("gemvf" is "gemvr" FACTORED)."""
    return {"gemv": k.gemv4, "gemvg": k.gemv4g, "gemvw": k.gemv4w, "gemvx": k.gemv4x, "gemvr": k.gemv4r,
            "gemvf": k.gemv4r}[path]  # fmt: skip


def wonly_tile_kernel(k: SimpleNamespace, path: str) -> Any:
    """The 4-bit tl.dot kernel a "tile" / "tilek" / "fused" / "fusedk" / "words" / "wordsk" / "wordsb"
    config launches."""
    if path in ("fused", "fusedk"):
        return k.wonly_fused
    if path == "wordsb":
        return k.wonly_wordsb
    return k.wonly_words if path in WORD_PATHS else k.wonly_fast


def ptx_planes(k: SimpleNamespace, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the word tiles may dequantize with their inline PTX (`_int4_planes` / `_mx_planes`),
    and gemvf widen mxfp4's fp16 pairs with it (`F16_PAIR_TO_F32`):
    compiled for an NVIDIA GPU that has the packed 16-bit fma of x's dtype (arch.packed_half_ptx
    names it), unless DIFFTEST_TRITON_PTX=0 (k.ptx)."""
    return (
        k.ptx and not k.interp and device.type == "cuda" and _packed_half_ptx_of(_device_key(device), dtype)
    )


def words_tile(cfg: tuning.Cfg, fmt: int, group: int) -> bool:
    """Whether `_wonly_words_kernel` takes cfg's K tile: int4 tiles inside one group, mxfp4 tiles of
    whole groups, and at least 64 wide (8 planes of 8 words)."""
    return cfg.bk >= 64 and (group % cfg.bk == 0 if fmt == 0 else cfg.bk % group == 0)


def _blas_ok(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """torch.mm / addmm can write `out` with the Triton epilogue's numbers: one dtype throughout
    (fp32 accumulation, one rounding at the store; a bias of another dtype would be rounded first)."""
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return (
        out.dtype == x.dtype and out.is_contiguous() and (bias is None or bias.dtype == x.dtype) and not tf32
    )


def wonly(k: SimpleNamespace, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, scales: torch.Tensor,
          zeros: torch.Tensor, bias: torch.Tensor | None, *, fmt: int, group: int,
          dot_ieee: bool) -> torch.Tensor:  # fmt: skip
    """out = x @ dequant(w)^T for packed 4-bit w [N, ceil(K/2)] (group even: a byte's nibbles share it)."""
    (M, K), N = x.shape, w.shape[0]
    fam = family(k, x.device)
    key = f"{fam}|wonly|{x.dtype}|f{fmt}g{group}|m{tuning.m_bucket(M)}|n{N}|k{K}"
    sarg = (scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1))
    emulate = k.interp and x.dtype == torch.bfloat16  # only the interpreter's bf16 cast is wrong

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        bias_arg = bias if bias is not None else out
        wk = w
        if cfg.path in WORD_GEMVS:
            wk = _words(w, K, group)
            if wk is None:
                wk, cfg = w, replace(cfg, path="gemvg")
        if cfg.path in ("wordsg", "wordsq"):  # the Gluon kernels where they run ("wordsg" pinned only)
            wk = _words(w, K, group)
            if (
                not k.interp
                and _gluon_mma_of(_device_key(x.device))
                and _gluon_w4.runs(x, wk, zeros, fmt, group)
            ):
                if cfg.path == "wordsg":
                    _gluon_w4.wonly_wordsg(
                        x, wk, out, scales, zeros, bias, fmt=fmt, block_n=cfg.bn, sub=cfg.warps
                    )
                else:
                    _gluon_w4.wonly_wordsq(
                        x, wk, out, scales, zeros, bias, fmt=fmt, sub=cfg.warps, PF=cfg.stages
                    )
                return out
            cfg = replace(cfg, path="wordsb")  # the same sums in plain Triton
        if cfg.path in WORD_PATHS:
            wk = _words(w, K, group) if words_tile(cfg, fmt, group) else None
            if wk is None:
                wk, cfg = w, replace(cfg, path="fused" if cfg.path == "words" else "fusedk")  # wordsk, wordsb
        if cfg.path == "gemvg" and not (group & (group - 1) == 0 and 2 <= group <= 256):
            cfg = replace(cfg, path="gemv")  # group-shaped tiles need a power-of-two group
        if cfg.path == "gemvg" or cfg.path in WORD_GEMVS:
            rows = {"gemvr": 1, "gemvf": 2 if cfg.bn == 2 else 1}.get(cfg.path, cfg.bn)  # rows per program
            cfg = replace(cfg, bk=max(cfg.bk, group), bn=rows)
        if cfg.path == "deqb" and not _blas_ok(x, out, bias):
            cfg = replace(cfg, path="deq")
        if cfg.path in ("deq", "deqb"):
            # deqb's own tiles are those of the dequantization (its GEMM is torch.mm's)
            dbn, dbk, dw = (cfg.bn, cfg.bk, cfg.warps) if cfg.path == "deqb" else (_DEQ_BN, _DEQ_BK, 4)
            wd = torch.empty(N, K, dtype=x.dtype, device=x.device)  # per call: never a cached weight
            k.deq[(_cdiv(N, dbn), _cdiv(K, dbk))](
                w, scales, zeros, wd, N, K, w.stride(0), w.stride(1), *sarg, wd.stride(0), wd.stride(1),
                FORMAT=fmt, GROUP=group, EMULATE_RNE=emulate, BLOCK_N=dbn, BLOCK_K=dbk, num_warps=dw,
            )  # fmt: skip
            if cfg.path == "deqb":  # the vendor GEMM on the Triton-dequantized weight
                if bias is None:
                    torch.mm(x, wd.t(), out=out)
                else:
                    torch.addmm(bias, x, wd.t(), out=out)
                return out
            k.mm16[(_cdiv(M, cfg.bm) * _cdiv(N, cfg.bn),)](
                x, wd, out, bias_arg, M, N, K, x.stride(0), x.stride(1), wd.stride(0), wd.stride(1),
                out.stride(0), out.stride(1), HAS_BIAS=bias is not None, DOT_IEEE=dot_ieee,
                EVEN_K=K % cfg.bk == 0, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=cfg.group_m,
                num_warps=cfg.warps, num_stages=cfg.stages,
            )  # fmt: skip
            return out
        step = cfg.bk * cfg.k_steps  # splits are whole loop steps
        kper, splits = _splits(K, step, cfg.split)
        ws = _workspace(splits, M, N, torch.float32, out)
        if cfg.path in ("gemv", "gemvg", *WORD_GEMVS):
            kern = gemv4_kernel(k, cfg.path)
            factored = (
                {"FACTORED": True, "X_PAIRS": _bf16_pairs(x), "PTX": ptx_planes(k, x.device, x.dtype)}
                if cfg.path == "gemvf"
                else {}
            )
            kern[(_cdiv(N, cfg.bn), splits, M)](
                x, wk, out, ws, scales, zeros, bias_arg, M, N, K, kper,
                x.stride(0), x.stride(1), wk.stride(0), wk.stride(1), out.stride(0), out.stride(1), *sarg,
                FORMAT=fmt, GROUP=group, HAS_BIAS=bias is not None, EMULATE_RNE=emulate, SPLIT_OUT=splits > 1,
                EVEN_K=K % cfg.bk == 0, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk,
                num_warps=cfg.warps, num_stages=cfg.stages, **factored,
            )  # fmt: skip
            if splits > 1:
                _reduce(k, ws, out, scales, scales, bias, 0, 0, 2, 2)
            return out
        kern = wonly_tile_kernel(k, cfg.path)
        # the word tiles (int4, mxfp4) on an NVIDIA GPU with 16-bit x: their planes in inline PTX
        words_ptx = {"PTX": ptx_planes(k, x.device, x.dtype)} if cfg.path in WORD_PATHS else {}
        if cfg.path == "wordsb":
            words_ptx["SUB"] = cfg.k_steps
        tiles = _cdiv(M, cfg.bm) * _cdiv(N, cfg.bn)
        # the splits reduce themselves on per-tile counters (no second kernel)
        counters = _counters(out.device, tiles) if splits > 1 and cfg.path in SELF_REDUCING else None
        kern[(tiles, splits)](
            x, wk, out, ws, scales, zeros, bias_arg, M, N, K, kper,
            x.stride(0), x.stride(1), wk.stride(0), wk.stride(1), out.stride(0), out.stride(1), *sarg,
            counters if counters is not None else ws, splits,
            FORMAT=fmt, GROUP=group, HAS_BIAS=bias is not None, DOT_IEEE=dot_ieee, EMULATE_RNE=emulate,
            SPLIT_OUT=splits > 1, SPLIT_FIN=counters is not None,
            EVEN_K=K % step == 0, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk, GROUP_M=cfg.group_m,
            num_warps=cfg.warps, num_stages=cfg.stages, **words_ptx,
        )  # fmt: skip
        if splits > 1 and counters is None:
            _reduce(k, ws, out, scales, scales, bias, 0, 0, 2, 2)
        return out

    def cands() -> list[tuning.Cfg]:  # "words" tiles that would run as "fused" are not timed twice
        words_ok = _words(w, K, group) is not None
        fits = lambda c: c.path not in WORD_PATHS or (words_ok and words_tile(c, fmt, group))  # noqa: E731
        return [c for c in tuning.candidates(fam, "wonly", M, N, K) if fits(c)]

    return run(tuning.TUNER.pick(key, cands, run, tune=not k.interp, rows=M))
