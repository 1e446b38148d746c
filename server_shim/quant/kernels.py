"""Triton kernels for the quantized GEMMs, one code path for GPUs and the CPU interpreter.

Layouts (CONTRACTS.md): weights [N, K] (nn.Linear), activations [M, K], outputs [M, N]; every
scale is read through strides given by the caller, so a declared layout (or an injected
`scale-transposed` fault) decides what the kernel reads, never an assumption in here.

Why triton is imported lazily: `triton.jit` decides at decoration time whether a kernel is
compiled or interpreted (TRITON_INTERPRET=1). The kernel bodies (_triton_kernels.py) are plain
functions that `_build()` decorates on first use, so importing this module imports no triton and
fixes nothing.
For CPU tensors TRITON_INTERPRET=1 must be set before triton.language is first imported (its own
helpers -- tl.max, tl.zeros -- are decorated then); a late switch gets a clear QuantConfigError
(quant/linear.py's `load_kernels` reloads triton.language to allow it). The choice made at the
first kernel call is then fixed for the process.

Two sets of kernel bodies: _triton_fast.py (the default: split-K GEMV paths for small M, block-scaled
fp8 tiles, 4-bit tile unpacking and dequantize-then-GEMM; launched by _fastpath.py with one config
per shape from quant/tuning.py) and _triton_kernels.py (the legacy bodies under triton.autotune,
selected with DIFFTEST_TRITON_KERNELS=legacy). _triton_kernels.py's docstring lists what the
interpreter gets wrong and how both sets cope.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import torch

from server_shim.errors import QuantConfigError
from server_shim.quant import _fastpath
from server_shim.quant import _triton_fast as _fast
from server_shim.quant import _triton_kernels as _src
from server_shim.quant.arch import triton_interpreting
from server_shim.switches import CHOICES, SwitchError, env_choice, env_switch, refuse_retired

logger = logging.getLogger(__name__)

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
INT8_MAX = 127  # symmetric int8: -127..127, as formats.INT8_MAX
# amax floor: an all-zero row still gets a finite, positive scale; the value of formats._TINY, so
# the triton and torch (golden) backends agree bit for bit there too.
AMAX_FLOOR = 1e-12
_SCALE_MODES = {"tensor": 0, "row": 1, "block": 2}
# Hopper's fp8 tensor cores accumulate in reduced precision; Triton's default there never promotes
# to fp32 (max_num_imprecise_acc 2**30), which cost ~1e-3 relative error at K=4096 against an
# fp32 reference. False (default): promote after every BLOCK_K, like block mode and like
# `_scaled_mm(use_fast_accum=False)`; True: the fast, imprecise accumulation. Tensor/row modes only.
FP8_FAST_ACCUM = False

# "fast" (_triton_fast.py, configs from quant/tuning.py) or "legacy" (_triton_kernels.py, the
# pre-tuning kernels under triton.autotune): None reads env DIFFTEST_TRITON_KERNELS (default fast).
# Both stay built in one process, so bench/gemm.py times them side by side and a fast kernel that
# misbehaves on some GPU can be switched off without a code change.
KERNEL_IMPL: str | None = None
IMPLS = CHOICES["DIFFTEST_TRITON_KERNELS"]

_lock = threading.Lock()
_built: SimpleNamespace | None = None


def impl() -> str:
    """KERNEL_IMPL, else the switch (read as `serve` checked it at start: switches.env_choice)."""
    try:
        name = KERNEL_IMPL or env_choice("DIFFTEST_TRITON_KERNELS")
    except SwitchError as e:
        raise _fail(str(e)) from None
    if name not in IMPLS:
        raise _fail(f"KERNEL_IMPL must be one of {list(IMPLS)}, got {name!r}")
    return name


def _build() -> SimpleNamespace:
    """Decorate the kernel bodies once; autotune only when compiling for a GPU."""
    global _built
    with _lock:
        if _built is not None:
            return _built
        try:  # the factored 4-bit kernels measured slower on an H200 and were removed: say so, never ignore
            refuse_retired("DIFFTEST_TRITON_FACTORED_4BIT")
        except SwitchError as e:
            raise _fail(str(e)) from None
        import triton
        import triton.language as language

        # the bodies resolve `tl` and their helpers through _triton_kernels' globals at compile time
        _src.tl = language
        for name, fn in _src.PLAIN_HELPERS.items():
            setattr(_src, name, triton.jit(fn))
        # the fast bodies share the legacy helpers: the same decorated functions, set in their modules too
        fast = _fast.bind(
            language,
            triton.jit,
            {
                **{name: getattr(_src, name) for name in _fast.SHARED},
                # DIFFTEST_TRITON_GROUP_BCAST=0: the per-element scale gathers of 4-bit tiles spanning
                # several groups instead of the broadcast (should a triton build not lower that reshape)
                "GROUP_BCAST": language.constexpr(env_switch("DIFFTEST_TRITON_GROUP_BCAST", True)),
                # DIFFTEST_TRITON_E2M1_F16=0: mxfp4 codes decoded by fp32 bit assembly (the previous, longer way)
                "E2M1_F16": language.constexpr(env_switch("DIFFTEST_TRITON_E2M1_F16", True)),
                "PLANES_F16": language.constexpr(_fast.planes_ptx(bf16=False)),
                "PLANES_BF16": language.constexpr(_fast.planes_ptx(bf16=True)),
                "MX_PLANES_F16": language.constexpr(_fast.mx_planes_ptx(bf16=False)),
                "MX_PLANES_BF16": language.constexpr(_fast.mx_planes_ptx(bf16=True)),
                # two fp16 in one register widened to fp32 where they lie (gemvf's mxfp4 on NVIDIA)
                "F16_PAIR_TO_F32": language.constexpr(_fast.F16_PAIR_PTX),
            },
        )
        interp = triton_interpreting()
        quant = triton.jit(_src._quant_act_kernel)
        gemm = triton.jit(_src._scaled_gemm_kernel)
        wonly = triton.jit(_src._wonly_gemm_kernel)
        if not interp:
            # short benches: tuning runs once per (M bucket, N, K, modes) and must not stall serving
            bench = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
            prune = {"early_config_prune": _src.prune}
            gemm = triton.autotune(
                _src.configs(triton, _src.TABLE_8BIT, ksteps=True),
                key=["M_BUCKET", "N", "K", "A_MODE", "B_MODE", "GROUP", "DECODE", "ACC_INT", "FAST_ACC"],
                prune_configs_by=prune,
                do_bench=bench,
            )(gemm)
            wonly = triton.autotune(
                _src.configs(triton, _src.TABLE_16BIT, ksteps=False),
                key=["M_BUCKET", "N", "K", "FORMAT", "GROUP"],
                prune_configs_by=prune,
                do_bench=bench,
            )(wonly)
        _built = SimpleNamespace(
            quant=quant, gemm=gemm, wonly=wonly, interp=interp, triton=triton,
            mm8=fast["_mm8_kernel"], mm8_tma=fast["_mm8_tma_kernel"], mm8_tmap=fast["_mm8_tmap_kernel"], reduce=fast["_splitk_reduce_kernel"], wonly_fast=fast["_wonly_kernel"],
            deq=fast["_wonly_dequant_kernel"], mm16=fast["_mm16_kernel"], gemv8=fast["_gemv8_kernel"],
            gemv4=fast["_gemv4_kernel"], wonly_fused=fast["_wonly_fused_kernel"], wonly_words=fast["_wonly_words_kernel"], wonly_wordsb=fast["_wonly_wordsb_kernel"], gemv4g=fast["_gemv4g_kernel"],
            gemv4w=fast["_gemv4w_kernel"], gemv4x=fast["_gemv4x_kernel"], gemv4r=fast["_gemv4r_kernel"],
            # DIFFTEST_TRITON_PTX=0: the word tiles' plain-Triton planes and gemvf's plain fp16 widening
            # on NVIDIA too (should a driver's ptxas reject or mis-assemble the inline PTX)
            ptx=env_switch("DIFFTEST_TRITON_PTX", True),
        )  # fmt: skip
        logger.info("triton kernels built (%s)", "interpreter" if interp else "compiled, autotuned")
        return _built


# ----------------------------------------------------------------------------- wrappers
def _fail(msg: str) -> QuantConfigError:
    return QuantConfigError(msg)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ready(*tensors: torch.Tensor | None) -> SimpleNamespace:
    """Build the kernels and check that every tensor sits on one device triton can run on."""
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device
    if any(t.device != dev for t in ts):
        raise _fail(
            f"triton kernels need all tensors on one device, got {sorted({str(t.device) for t in ts})}"
        )
    if dev.type not in ("cpu", "cuda"):
        raise _fail(f"triton kernels run on cuda/rocm or cpu (interpreter), not {dev.type}")
    if dev.type == "cpu" and not triton_interpreting():
        raise _fail("triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported")
    if dev.type == "cpu":
        from server_shim.quant.linear import triton_language_compiled

        if triton_language_compiled():  # tl.max, tl.zeros ... were decorated compiled
            raise _fail(
                "TRITON_INTERPRET=1 was set after triton.language was imported; set it first "
                "(server_shim.quant.linear.load_kernels reloads triton.language for you)"
            )
    k = _build()
    if dev.type == "cpu" and not k.interp:
        raise _fail(
            "triton kernels were already built for the GPU in this process; CPU needs TRITON_INTERPRET=1 first"
        )
    return k


def _fp8_native(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tl.dot / fp8 casts run natively; otherwise the kernels see uint8 bits and decode them."""
    if device.type == "cpu":
        return True  # interpreter: loads, casts of exact values and dots are exact for both formats
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        if dtype == torch.float8_e4m3fnuz:
            return "gfx94" in arch
        return "gfx95" in arch or "gfx12" in arch
    return dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability(device) >= (8, 9)


def _scale_strides(
    s: torch.Tensor, mode: int, rows: int, groups: int, name: str, strides: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Validate a scale tensor for its mode and return the (row, group) strides the kernel reads with."""
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise _fail(f"{name} must be a float32 tensor, got {getattr(s, 'dtype', type(s))}")
    if mode == 0:
        if s.numel() != 1:
            raise _fail(f"{name}: tensor mode needs 1 scale, got shape {tuple(s.shape)}")
        return 0, 0
    if mode == 1:
        if s.numel() != rows or s.dim() not in (1, 2):
            raise _fail(f"{name}: row mode needs [{rows}, 1] scales, got {tuple(s.shape)}")
        return s.stride(0), 0
    if strides is None:
        if tuple(s.shape) != (rows, groups):
            raise _fail(f"{name}: block mode needs [{rows}, {groups}] scales, got {tuple(s.shape)}")
        strides = (s.stride(0), s.stride(1))
    s0, s1 = int(strides[0]), int(strides[1])
    # an injected layout fault may swap strides; it must read wrong scales, never out of bounds
    avail = s.untyped_storage().nbytes() // s.element_size() - s.storage_offset()
    if s0 < 0 or s1 < 0 or (rows - 1) * s0 + (groups - 1) * s1 >= avail:
        raise _fail(
            f"{name}: strides {(s0, s1)} read past the {avail} stored scales of a {rows}x{groups} grid"
        )
    return s0, s1


def _launch(
    k: SimpleNamespace,
    kern: Any,
    M: int,
    N: int,
    args: tuple,
    meta: dict,
    cpu_bk: int,
    cpu_extra: dict | None = None,
) -> None:
    if k.interp:  # small fixed tiles: the interpreter's cost is per program and per op
        bm, bn = min(max(_next_pow2(M), 16), 64), min(max(_next_pow2(N), 16), 128)
        grid = (_cdiv(M, bm) * _cdiv(N, bn),)
        kern[grid](*args, **meta, **(cpu_extra or {}), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cpu_bk, GROUP_M=8)
    else:
        grid = lambda cfg: (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
        kern[grid](*args, **meta)


def _out(
    M: int, N: int, out_dtype: torch.dtype, bias: torch.Tensor | None, dev: torch.device
) -> torch.Tensor:
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise _fail(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != N or not bias.is_floating_point()):
        raise _fail(f"bias must be a float vector of {N}, got {tuple(bias.shape)} {bias.dtype}")
    return torch.empty(M, N, dtype=out_dtype, device=dev)


def _empty_result(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out.zero_()
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def _check_2d(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in dtypes:
        raise _fail(f"{name} must be a 2-D tensor of {[str(d) for d in dtypes]}, got "
                    f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t))}")  # fmt: skip


def quantize_act_fp8(
    x: torch.Tensor, *, group: int | None, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic fp8 quantization of activations [M, K]: per token (group None) or per 1 x group.

    scale = max(amax, 1e-12) / fp8_max (fp32, correctly rounded), q = rne(clamp(x / scale)):
    returns (q [M, K] in fp8_dtype, scale [M, 1], or [M, ceil(K / group)] with strides (1, M)).
    """
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    if fp8_dtype not in FP8_MAX:
        raise _fail(f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    if group is not None and group <= 0:
        raise _fail(f"group must be positive or None, got {group}")
    k = _ready(x)
    M, K = x.shape
    gk = K if group is None else int(group)
    G = 1 if group is None else _cdiv(K, gk)
    q = torch.empty(M, K, dtype=fp8_dtype, device=x.device)
    # M-contiguous ([G, M] storage seen as [M, G]): the GEMM reads one K group's scales for a
    # tile of rows per K step, a coalesced load this way. One group: a plain [M, 1] (stride 1 both
    # ways, as torch._scaled_mm insists).
    scale = (
        torch.empty(G, M, dtype=torch.float32, device=x.device).t()
        if G > 1
        else x.new_empty(M, 1, dtype=torch.float32)
    )
    if M == 0 or K == 0:
        return q, scale.fill_(AMAX_FLOOR / FP8_MAX[fp8_dtype])
    native = _fp8_native(x.device, fp8_dtype)
    if k.interp:
        bm, bk = min(_next_pow2(M), 64), min(_next_pow2(gk), 4096)
    else:
        bm, bk = (4, min(_next_pow2(gk), 1024)) if group is None else (16, min(_next_pow2(gk), 256))
    qv = q if native else q.view(torch.uint8)
    k.quant[(_cdiv(M, bm), G)](
        x, qv, scale, M, K, gk, x.stride(0), x.stride(1), qv.stride(0), qv.stride(1), scale.stride(0), scale.stride(1),
        FP8_MAX=FP8_MAX[fp8_dtype], FNUZ=fp8_dtype == torch.float8_e4m3fnuz, AMAX_FLOOR=AMAX_FLOOR,
        ENCODE=not native, BLOCK_M=bm, BLOCK_K=bk,
    )  # fmt: skip
    return q, scale


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 quantization of activations [M, K], one kernel (the torch ops it
    replaces were ~9 launches per linear, which made int8 the slowest target end to end):
    scale = max(amax, 1e-12) / 127 (fp32, correctly rounded), q = rne(clamp(x / scale, -127, 127)).
    Returns (q [M, K] int8, scale [M, 1] fp32), bit for bit `formats.quantize_act(x, "int8")`."""
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    k = _ready(x)
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    scale = x.new_empty(M, 1, dtype=torch.float32)
    if M == 0 or K == 0:
        return q, scale.fill_(AMAX_FLOOR / INT8_MAX)
    bm, bk = (min(_next_pow2(M), 64), min(_next_pow2(K), 4096)) if k.interp else (4, min(_next_pow2(K), 1024))
    k.quant[(_cdiv(M, bm), 1)](
        x, q, scale, M, K, K, x.stride(0), x.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        FP8_MAX=float(INT8_MAX), FNUZ=False, AMAX_FLOOR=AMAX_FLOOR, ENCODE=False, BLOCK_M=bm, BLOCK_K=bk,
        INT8=True,
    )  # fmt: skip
    return q, scale


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    a_scale_mode: str,
    b_scale_mode: str,
    b_scale_strides: tuple[int, int] | None = None,
    block: int = 128,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, N] = (a * a_scale) @ (b * b_scale)^T with fp32 accumulation; a [M, K], b [N, K] fp8.

    Block mode: a_scale [M, ceil(K/block)] (1 x block groups), b_scale element (nb, kb) read at
    nb * s0 + kb * s1 with (s0, s1) = b_scale_strides or b_scale.stride().
    """
    _check_2d("a", a, tuple(FP8_MAX))
    _check_2d("b", b, (a.dtype,))
    if a.shape[1] != b.shape[1]:
        raise _fail(f"K mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if a_scale_mode not in _SCALE_MODES or b_scale_mode not in _SCALE_MODES:
        raise _fail(
            f"scale modes must be one of {list(_SCALE_MODES)}, got {a_scale_mode!r}, {b_scale_mode!r}"
        )
    am, bmode = _SCALE_MODES[a_scale_mode], _SCALE_MODES[b_scale_mode]
    if 2 in (am, bmode) and (block < 16 or block & (block - 1)):
        raise _fail(f"block must be a power of two >= 16, got {block}")
    k = _ready(a, a_scale, b, b_scale, bias)
    (M, K), N = a.shape, b.shape[0]
    kg = _cdiv(K, block)
    sa = _scale_strides(a_scale, am, M, kg, "a_scale")
    sb = _scale_strides(b_scale, bmode, _cdiv(N, block) if bmode == 2 else N, kg, "b_scale", b_scale_strides)
    out = _out(M, N, out_dtype, bias, a.device)
    if M == 0 or N == 0 or K == 0:
        return _empty_result(out, bias)
    native = _fp8_native(a.device, a.dtype)
    decode = 0 if native else (2 if a.dtype == torch.float8_e4m3fnuz else 1)
    av, bv = (a, b) if native else (a.view(torch.uint8), b.view(torch.uint8))
    args = (av, bv, out, a_scale, b_scale, bias if bias is not None else out, M, N, K, min(_next_pow2(M), 4096),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), *sa, *sb)  # fmt: skip
    meta = dict(A_MODE=am, B_MODE=bmode, GROUP=block, HAS_BIAS=bias is not None, ACC_INT=False, DECODE=decode,
                FAST_ACC=FP8_FAST_ACCUM)  # fmt: skip
    if impl() == "fast":
        return _fastpath.mm8(k, av, bv, out, a_scale, b_scale, bias, sa, sb, am=am, bmode=bmode, group=block,
                             acc_int=False, decode=decode, fast_acc=FP8_FAST_ACCUM)  # fmt: skip
    # the interpreter runs the two-tile (KSTEPS=2) block loop, so CPU tests cover that path too
    _launch(
        k,
        k.gemm,
        M,
        N,
        args,
        meta,
        cpu_bk=min(block, 128),
        cpu_extra={"KSTEPS": 2 if 2 in (am, bmode) else 1},
    )
    return out


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """w8a8: a int8 [M, K] per-token a_scale [M, 1], b int8 [N, K] per-channel b_scale [N, 1]; int32 acc."""
    _check_2d("a", a, (torch.int8,))
    _check_2d("b", b, (torch.int8,))
    if a.shape[1] != b.shape[1]:
        raise _fail(f"K mismatch: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    k = _ready(a, a_scale, b, b_scale, bias)
    (M, K), N = a.shape, b.shape[0]
    sa = _scale_strides(a_scale, 1, M, 1, "a_scale")
    sb = _scale_strides(b_scale, 1, N, 1, "b_scale")
    out = _out(M, N, out_dtype, bias, a.device)
    if M == 0 or N == 0 or K == 0:
        return _empty_result(out, bias)
    args = (a, b, out, a_scale, b_scale, bias if bias is not None else out, M, N, K, min(_next_pow2(M), 4096),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), *sa, *sb)  # fmt: skip
    if impl() == "fast":
        return _fastpath.mm8(k, a, b, out, a_scale, b_scale, bias, sa, sb, am=1, bmode=1, group=128,
                             acc_int=True, decode=0, fast_acc=False)  # fmt: skip
    meta = dict(
        A_MODE=1, B_MODE=1, GROUP=128, HAS_BIAS=bias is not None, ACC_INT=True, DECODE=0, FAST_ACC=False
    )
    _launch(k, k.gemm, M, N, args, meta, cpu_bk=128, cpu_extra={"KSTEPS": 1})
    return out


def int8_gemm_dynamic(
    x: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """w8a8 from the unquantized activation: x [M, K] quantized per token (`quantize_act_int8`, bit
    for bit), then `int8_gemm`. One token (a batch-1 decode step) with the fast kernels: one kernel,
    the quantization inside the GEMV; otherwise the two kernels."""
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    _check_2d("b", b, (torch.int8,))
    if x.shape[1] != b.shape[1]:
        raise _fail(f"K mismatch: x {tuple(x.shape)} vs b {tuple(b.shape)}")
    (M, K), N = x.shape, b.shape[0]

    def two_kernels() -> torch.Tensor:
        q, s = quantize_act_int8(x)
        return int8_gemm(q, s, b, b_scale, out_dtype=out_dtype, bias=bias)

    if impl() != "fast" or M != 1 or N == 0 or K == 0:
        return two_kernels()
    k = _ready(x, b, b_scale, bias)
    sb = _scale_strides(b_scale, 1, N, 1, "b_scale")
    out = _out(M, N, out_dtype, bias, x.device)
    a_scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    return _fastpath.mm8_act(k, x, b, out, a_scale, b_scale, bias, sb, am=1, bmode=1, group=128,
                             qmax=float(INT8_MAX), fnuz=False, acc_int=True, decode=0, amax_floor=AMAX_FLOOR,
                             two_kernels=two_kernels)  # fmt: skip


def fp8_block_gemm_dynamic(
    x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *, b_scale_strides: tuple[int, int] | None = None,
    block: int = 128, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """DeepSeek-style fp8 from the unquantized activation: x [M, K] quantized per 1 x block group
    (`quantize_act_fp8`, bit for bit, in b's fp8 format), then `fp8_gemm` in block mode. One
    token with the fast kernels: one kernel, the quantization inside the GEMV; else the two."""
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    _check_2d("b", b, tuple(FP8_MAX))
    if x.shape[1] != b.shape[1]:
        raise _fail(f"K mismatch: x {tuple(x.shape)} vs b {tuple(b.shape)}")
    if block < 16 or block & (block - 1):
        raise _fail(f"block must be a power of two >= 16, got {block}")
    (M, K), N = x.shape, b.shape[0]

    def two_kernels() -> torch.Tensor:
        q, s = quantize_act_fp8(x, group=block, fp8_dtype=b.dtype)
        return fp8_gemm(q, s, b, b_scale, a_scale_mode="block", b_scale_mode="block",
                        b_scale_strides=b_scale_strides, block=block, out_dtype=out_dtype, bias=bias)  # fmt: skip

    if impl() != "fast" or M != 1 or N == 0 or K == 0:
        return two_kernels()
    k = _ready(x, b, b_scale, bias)
    sb = _scale_strides(b_scale, 2, _cdiv(N, block), _cdiv(K, block), "b_scale", b_scale_strides)
    out = _out(M, N, out_dtype, bias, x.device)
    native = _fp8_native(x.device, b.dtype)
    decode = 0 if native else (2 if b.dtype == torch.float8_e4m3fnuz else 1)
    # block mode never reads or writes the per-token scale buffer (the group scales stay in the
    # kernel): b_scale stands in for it, no allocation per call on the decode path
    return _fastpath.mm8_act(k, x, b if native else b.view(torch.uint8), out, b_scale, b_scale, bias, sb, am=2,
                             bmode=2, group=block, qmax=FP8_MAX[b.dtype], fnuz=b.dtype == torch.float8_e4m3fnuz,
                             acc_int=False, decode=decode, amax_floor=AMAX_FLOOR,
                             two_kernels=two_kernels)  # fmt: skip


def _wonly(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    fmt: int,
    group: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    _check_2d("x", x, (torch.float32, torch.bfloat16, torch.float16))
    _check_2d("qweight", qweight, (torch.uint8,))
    (M, K), N = x.shape, qweight.shape[0]
    G = _cdiv(K, group)
    if qweight.shape[1] != _cdiv(K, 2):
        raise _fail(
            f"qweight must be [N, ceil(K/2)] = [{N}, {_cdiv(K, 2)}] packed nibbles, got {tuple(qweight.shape)}"
        )
    want = (torch.float32,) if fmt == 0 else (torch.uint8,)
    _check_2d("scales", scales, want)
    if tuple(scales.shape) != (N, G):
        raise _fail(f"scales must be [{N}, {G}] (one per {group} inputs), got {tuple(scales.shape)}")
    if zeros is not None:
        _check_2d("zeros", zeros, (torch.uint8, torch.float32))
        if tuple(zeros.shape) != (N, G):
            raise _fail(f"zeros must be [{N}, {G}], got {tuple(zeros.shape)}")
    k = _ready(x, qweight, scales, zeros, bias)
    out = _out(M, N, out_dtype, bias, x.device)
    if M == 0 or N == 0 or K == 0:
        return _empty_result(out, bias)
    z = zeros if zeros is not None else scales
    args = (x, qweight, out, scales, z, bias if bias is not None else out, M, N, K, min(_next_pow2(M), 4096),
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1),
            scales.stride(0), scales.stride(1), z.stride(0), z.stride(1))  # fmt: skip
    # the interpreter multiplies bf16 operands as raw bits: route bf16 through an exact fp32 dot there
    dot_ieee = x.dtype == torch.float32 or (k.interp and x.dtype == torch.bfloat16)
    if impl() == "fast" and group % 2 == 0:  # odd groups split a byte's nibbles: legacy kernel only
        return _fastpath.wonly(k, x, qweight, out, scales, z, bias, fmt=fmt, group=group, dot_ieee=dot_ieee)
    meta = dict(FORMAT=fmt, GROUP=group, HAS_BIAS=bias is not None, DOT_IEEE=dot_ieee)
    _launch(k, k.wonly, M, N, args, meta, cpu_bk=128)
    return out


def int4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    group: int = 128,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int4: qweight uint8 [N, K//2] (low nibble = even k), w = (q - zero) * scale per group."""
    if group <= 0:
        raise _fail(f"group must be positive, got {group}")
    return _wonly(x, qweight, scales, zeros, fmt=0, group=int(group), out_dtype=out_dtype, bias=bias)


def mxfp4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_e8m0: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only MXFP4: e2m1 nibbles (bit 3 = sign) times 2**(e - 127), one uint8 exponent per 32."""
    return _wonly(x, qweight, scales_e8m0, None, fmt=1, group=32, out_dtype=out_dtype, bias=bias)
