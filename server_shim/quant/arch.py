"""Everything arch-specific in one place: which arch a device is, and the policy derived from it.

Policy elsewhere asks here instead of testing `torch.version.hip` or compute capabilities itself,
so that a wrong-arch decision (the bug class behind `garbage-gemm`) has one place to live.
Vendor support is *measured* (a tiny `torch._scaled_mm` / `torch._int_mm` probe per device and
scheme, cached), not assumed: on this CPU build tensor-wise and row-wise FP8 scaling run and
block-wise does not.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from server_shim.quant.formats import FP8_SCHEMES
from server_shim.switches import env_switch


def device_arch(device: torch.device | str) -> str:
    """ "cpu", "sm90" (CUDA capability), or "gfx942" / "gfx950" (ROCm gcnArchName)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    if getattr(torch.version, "hip", None):
        return str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
    return f"sm{props.major}{props.minor}"


def fp8_dtype_for(device: torch.device | str) -> torch.dtype:
    """MI300 (gfx942) computes in e4m3fnuz; everything else (sm89+, gfx950, CPU) in e4m3fn."""
    return torch.float8_e4m3fnuz if device_arch(device) == "gfx942" else torch.float8_e4m3fn


def gemm_family(device: torch.device | str) -> str:
    """The tile-table family of quant/tuning.py for this device, derived from `device_arch`:
    "hopper" (sm90+: wgmma, 228 KiB shared memory), "cdna" (gfx9xx: MFMA, stream pipeliner with
    num_stages 2), "ampere" (other CUDA GPUs: mma.sync, smaller shared memory), "cpu" (interpreter)."""
    return _family(device_arch(device))


def packed_half_ptx(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether inline PTX with packed 16-bit fmas of `dtype` runs here (the 4-bit word tiles'
    dequantization): an NVIDIA GPU, sm53+ for fp16x2, sm80+ for bf16x2; never ROCm or the interpreter."""
    return _packed_half_ptx(device_arch(device), dtype)


@functools.cache
def _packed_half_ptx(name: str, dtype: torch.dtype) -> bool:
    if not (name.startswith("sm") and name[2:].isdigit()):
        return False
    return int(name[2:]) >= {torch.float16: 53, torch.bfloat16: 80}.get(dtype, 10**6)


@functools.cache
def _family(name: str) -> str:
    if name.startswith("gfx"):
        return "cdna"
    if name.startswith("sm") and name[2:].isdigit():
        return "hopper" if int(name[2:]) >= 90 else "ampere"
    return "cpu" if name == "cpu" else "ampere"


def warp_specialized_fp8(device: torch.device | str) -> bool:
    """Whether the Gluon warp-specialized fp8 GEMM (quant/_gluon_mm8.py: wgmma, setmaxnreg, bulk
    tensor copies) runs here: sm90 exactly (Hopper; Blackwell's MMAs are another instruction set),
    never ROCm or the interpreter, and only where this triton ships Gluon. DIFFTEST_TRITON_GLUON=0
    turns it off (a fallback, should a triton build mis-lower it): "tmap" runs instead."""
    if not env_switch("DIFFTEST_TRITON_GLUON", True):
        return False
    return _sm90_gluon(device_arch(device)) and not triton_interpreting()


@functools.cache
def _sm90_gluon(name: str) -> bool:
    if name != "sm90":
        return False
    from server_shim.quant import _gluon_mm8

    return _gluon_mm8.IMPORTED


def gluon_mma_w4(device: torch.device | str) -> bool:
    """Whether the Gluon 4-bit GEMM for M <= 16 (quant/_gluon_w4.py: mma.sync with both operands in
    registers, the word tiles' inline PTX) runs here: an NVIDIA GPU from sm80 (bf16 mma.sync and
    packed bf16 fmas), never ROCm or the interpreter, and only where this triton ships Gluon.
    DIFFTEST_TRITON_GLUON=0 turns it off, as it does "wsp": "wordsb" runs instead."""
    if not env_switch("DIFFTEST_TRITON_GLUON", True) or triton_interpreting():
        return False
    return _gluon_mma(device_arch(device))


@functools.cache
def _gluon_mma(name: str) -> bool:
    if not (name.startswith("sm") and name[2:].isdigit() and int(name[2:]) >= 80):
        return False
    from server_shim.quant import _gluon_w4

    return _gluon_w4.IMPORTED


def triton_available(device: torch.device | str) -> bool:
    """Triton can run here: a GPU with triton installed, or CPU with the interpreter switched on
    (TRITON_INTERPRET=1 is read when a kernel is decorated, so it must be set before import)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return torch.device(device).type == "cpu" and triton_interpreting()


def triton_interpreting() -> bool:
    """TRITON_INTERPRET is on: kernels run in Triton's interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def vendor_supports(scheme: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether the vendor backend (torch._scaled_mm / torch._int_mm) runs `scheme` on `device`,
    measured with a tiny probe; the reason says what was tried."""
    device = torch.device(device)
    key = f"{device.type}:{device.index}" if device.type == "cuda" else device.type
    return _probe(scheme, key)


@functools.cache
def _probe(scheme: str, device_key: str) -> tuple[bool, str]:
    device = torch.device(device_key if device_key != "cuda:None" else "cuda")
    if scheme in ("int4-g128", "mxfp4"):
        return False, f"no vendor kernel for {scheme} in torch {torch.__version__}"
    if scheme == "fp8-block":
        # Block-wise _scaled_mm (sm90+, recent torch) wants its own scale layouts; a probe with
        # K = 128 cannot tell it from row-wise scaling, so the shim does not claim it.
        return False, "torch._scaled_mm 1x128/128x128 block scaling is not wired up in the shim"
    if scheme == "int8":
        try:
            a = torch.ones(32, 32, dtype=torch.int8, device=device)
            torch._int_mm(a, a.t())
        except (RuntimeError, NotImplementedError) as e:
            return False, f"torch._int_mm failed on {device_arch(device)}: {str(e).splitlines()[0]}"
        return True, "torch._int_mm"
    if scheme in FP8_SCHEMES:
        err = _try_scaled_mm(device, "tensor" if scheme == "fp8-tensor" else "row")
        return (False, err) if err else (True, "torch._scaled_mm")
    return False, f"unknown scheme {scheme!r}"


def _try_scaled_mm(device: torch.device, mode: str) -> str | None:
    """None when a 32x32x32 `_scaled_mm` with this scale mode runs, else the reason."""
    dt = fp8_dtype_for(device)
    if device.type == "cuda" and device_arch(device) in ("sm80", "sm86", "sm87", "sm75", "sm70"):
        return f"no fp8 tensor cores on {device_arch(device)}"
    a = torch.ones(32, 32, device=device).to(dt)
    b = torch.ones(32, 32, device=device).to(dt)
    if mode == "tensor" or device.type == "cuda":  # CUDA row-wise runs as tensor-wise + fp32 epilogue
        sa = sb = torch.ones((), device=device)
    elif mode == "row":
        sa, sb = torch.ones(32, 1, device=device), torch.ones(1, 32, device=device)
    else:
        sa, sb = torch.ones(32, 1, device=device), torch.ones(1, 32, device=device)
    try:
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"torch._scaled_mm {mode}-wise failed on {device_arch(device)}: {str(e).splitlines()[0]}"
    expect = a.shape[1]
    if not torch.allclose(out.float(), torch.full_like(out.float(), float(expect))):
        return f"torch._scaled_mm {mode}-wise gave wrong numbers on {device_arch(device)}"
    return None
