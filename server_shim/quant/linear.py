"""QuantLinear, backend dispatch, the CK-free policy, and `quantize_model` (the in-place swap).

Backends: `torch` (formats.py: dequantize + fp32 matmul, the golden), `triton` (kernels.py; on
CPU through the interpreter, switched on here before kernels.py is imported), `vendor`
(`torch._scaled_mm` / `torch._int_mm` where arch.py measured that they run). `auto` picks torch on
CPU, and on a GPU vendor where it runs the scheme (unless CK-free), else triton. A scheme the
chosen backend cannot run is a QuantConfigError at start, never a silent change of scheme.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType

import torch
from torch import Tensor, nn

from server_shim import catalog
from server_shim.errors import QuantConfigError
from server_shim.quant import arch
from server_shim.quant import formats as F
from server_shim.quant.faults import NO_FAULTS, FaultSet, read_act_scale, read_weight, resolve_faults
from server_shim.switches import env_switch

logger = logging.getLogger(__name__)

SCHEMES = F.SCHEMES
BACKENDS = catalog.BACKENDS
DEFAULT_SKIP = ("lm_head",)
_KERNELS = "server_shim.quant.kernels"
_VENDOR_PATHS = ("fp8-tensor", "fp8-token", "int8")


def ck_free_from_env(ck_free: bool | None) -> bool:
    return ck_free if ck_free is not None else env_switch("DIFFTEST_CK_FREE", False)


def load_kernels(device: torch.device) -> ModuleType:
    """Import kernels.py so that it runs on `device`. On CPU that needs TRITON_INTERPRET=1 *when
    the kernels are decorated* (triton.knobs reads it in @triton.jit), so we set it first and
    reload kernels.py if it was imported compiled."""
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        _reinterpret_triton_language()
    try:
        mod = importlib.import_module(_KERNELS)
    except ImportError as e:
        raise QuantConfigError(f"triton backend unavailable: {e}") from e
    if device.type == "cpu" and _has_compiled_kernels(mod):
        mod = importlib.reload(sys.modules[_KERNELS])
    if not arch.triton_available(device) or (device.type == "cpu" and _has_compiled_kernels(mod)):
        raise QuantConfigError(f"triton backend cannot run on {arch.device_arch(device)}")
    return mod


def triton_language_compiled() -> bool:
    """Whether triton.language is imported with its own helpers decorated compiled, for a GPU, not
    for the interpreter (False where it is not imported at all)."""
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(std, "cdiv", None), JITFunction)


def _reinterpret_triton_language() -> None:
    """triton.language's own helpers (tl.cdiv, tl.sum, tl.max ...) are @jit-decorated when
    triton.language is first imported -- and importing a transformers model imports it, long
    before a backend is chosen. Compiled-mode helpers cannot run inside the interpreter
    ("Cannot call @triton.jit'd outside of the scope of a kernel"), so re-execute those modules
    with the switch on. Reload keeps module identity, so `tl` references stay valid."""
    if triton_language_compiled():
        for name in ("triton.language.standard", "triton.language.random", "triton.language"):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
        logger.info("triton.language was imported before TRITON_INTERPRET=1: reloaded for the interpreter")


def _has_compiled_kernels(mod: ModuleType) -> bool:
    """Whether kernels.py built its kernels compiled (for a GPU) rather than for the interpreter."""
    built = getattr(mod, "_built", None)
    return built is not None and not built.interp


def select_backend(scheme: str, backend: str, device: torch.device, *, ck_free: bool) -> tuple[str, str]:
    """(backend that will run, fallback reason or ""). Raises for a combination that cannot run."""
    if backend not in BACKENDS:
        raise QuantConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", ""
    if backend == "vendor":
        if ck_free:
            raise QuantConfigError("--backend vendor contradicts --ck-free (vendor backends are forbidden)")
        ok, why = arch.vendor_supports(scheme, device)
        if not ok:
            raise QuantConfigError(f"vendor backend cannot run {scheme} on {arch.device_arch(device)}: {why}")
        return "vendor", ""
    if backend == "triton":
        load_kernels(device)
        return "triton", ""
    if device.type == "cpu":  # the interpreter is ~1 s per GEMM: far too slow to serve from
        return "torch", ""
    ok, why = arch.vendor_supports(scheme, device)
    if ok and not ck_free:
        return "vendor", ""
    reason = "ck-free: vendor forbidden" if ok else why
    if arch.triton_available(device):
        load_kernels(device)
        return "triton", reason
    return "torch", f"{reason}; triton unavailable"


# ---------------------------------------------------------------- the GEMM


def _dequantized(qw: F.QuantizedWeight, data: Tensor, scales: Tensor, zeros: Tensor | None,
                 cache: dict[str, Tensor] | None) -> Tensor:  # fmt: skip
    """The torch path's fp32 weight, computed once per module when the module gives a cache.

    Dequantizing on every call was 80% of a decode step (smollm2, fp8-block, CPU: 346 of 434 ms).
    The stored tensors and the module's faults never change after quantize_model, so the cached
    weight is the very tensor every call would recompute: the golden's numbers are unchanged."""
    if cache is None:
        return F.dequantize_parts(qw.scheme, data, scales, zeros, qw.shape)
    key = f"{data.device}"
    if key not in cache:
        cache.clear()  # moved to another device: the old copy is stale
        cache[key] = F.dequantize_parts(qw.scheme, data, scales, zeros, qw.shape)
    return cache[key]


def quant_matmul(
    x: Tensor,
    qw: F.QuantizedWeight,
    bias: Tensor | None,
    backend: str,
    fs: FaultSet = NO_FAULTS,
    dequant_cache: dict[str, Tensor] | None = None,
    slot_src: Tensor | None = None,
) -> Tensor:
    """x [..., K] -> [..., N] in x.dtype through `backend`; faults act inside the reads. `slot_src`:
    the row of x whose activation scale each row reads under a slot fault, where x's own shape does
    not say which slot a row is in (MoE experts' routed rows; faults.slot_sources by default)."""
    if backend == "vendor" and qw.scheme not in _VENDOR_PATHS:  # never a silent torch fallback
        raise QuantConfigError(f"vendor backend has no {qw.scheme} path")
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    data, scales, zeros = read_weight(qw, fs)
    if backend == "triton":
        out = _triton(x2, lead, qw, data, scales, zeros, bias, fs, slot_src)
    elif qw.scheme in F.WEIGHT_ONLY_SCHEMES:
        out = x2.float() @ _dequantized(qw, data, scales, zeros, dequant_cache).t()
        out = out if bias is None else out + bias.float()
    else:
        fp8 = qw.fp8_dtype or torch.float8_e4m3fn
        xq, xs = F.quantize_act(x2, qw.scheme, fp8_dtype=fp8, pow2_scales=fs.ue8m0_rounding)
        xs = read_act_scale(xs, lead, fs, slot_src)
        if backend == "vendor":
            out = _vendor(xq, xs, qw, data, scales)
        elif qw.scheme == "int8":
            out = F.int8_matmul_exact(xq, xs, data, scales)
        else:
            w = _dequantized(qw, data, scales, zeros, dequant_cache)
            out = F.dequantize_act(xq, xs, qw.scheme) @ w.t()
        out = out if bias is None else out + bias.float()
    return out.to(x.dtype).reshape(*lead, qw.shape[0])


def _vendor(xq: Tensor, xs: Tensor, qw: F.QuantizedWeight, data: Tensor, scales: Tensor) -> Tensor:
    if qw.scheme == "int8":
        m = xq.shape[0]
        if xq.is_cuda and m <= 16:  # cuBLASLt int8 wants M > 16: zero rows are exact
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - m))
        acc = torch._int_mm(xq, data.contiguous().t())[:m]
        return (acc.double() * xs.double() * scales.double().reshape(1, -1)).float()  # as the golden
    if qw.scheme == "fp8-tensor":
        sa, sb = xs.float().reshape(()), scales.float().reshape(())
    else:
        sa, sb = xs.float().contiguous(), scales.float().reshape(1, -1).contiguous()
    a, b, n = xq, data.contiguous(), data.shape[0]
    if a.is_cuda:  # cuBLASLt fp8 wants K and N multiples of 16; zero padding is exact
        pad_k, pad_n = (-a.shape[1]) % 16, (-n) % 16
        if pad_k or pad_n:
            a = torch.nn.functional.pad(a.view(torch.uint8), (0, pad_k)).view(xq.dtype)
            b = torch.nn.functional.pad(b.view(torch.uint8), (0, pad_k, 0, pad_n)).view(xq.dtype)
    if qw.scheme == "fp8-tensor" or not a.is_cuda:
        return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)[:, :n]
    # Row-wise _scaled_mm on CUDA writes bf16 only: a second rounding (2**-8) that the golden does
    # not have would sit far above accumulation noise. Unit scales, fp32 out, fp32 epilogue instead.
    one = torch.ones((), device=a.device)
    return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)[:, :n] * sa * sb


def _triton(x2, lead, qw, data, scales, zeros, bias, fs, slot_src=None) -> Tensor:  # noqa: ANN001
    k = load_kernels(x2.device)
    out_dtype = x2.dtype
    if qw.scheme == "int4-g128":
        return k.int4_gemm(
            x2, data.contiguous(), scales, zeros, group=F.INT4_GROUP, out_dtype=out_dtype, bias=bias
        )
    if qw.scheme == "mxfp4":
        return k.mxfp4_gemm(x2, data.contiguous(), scales, out_dtype=out_dtype, bias=bias)
    if qw.scheme == "int8":
        if x2.shape[0] == 1 and not fs.ue8m0_rounding:
            # one token: quantized inside the GEMV (a slot-variant scale read has no other slot to read)
            return k.int8_gemm_dynamic(
                x2, data.contiguous(), scales.contiguous(), out_dtype=out_dtype, bias=bias
            )
        if fs.ue8m0_rounding:  # the act-quant kernel rounds no scale to a power of two
            xq, xs = F.quantize_act(x2, "int8", pow2_scales=True)
        else:
            xq, xs = k.quantize_act_int8(x2)
        xs = read_act_scale(xs, lead, fs, slot_src)
        return k.int8_gemm(xq, xs, data.contiguous(), scales.contiguous(), out_dtype=out_dtype, bias=bias)
    fp8 = qw.fp8_dtype or torch.float8_e4m3fn
    mode = {"fp8-tensor": "tensor", "fp8-token": "row", "fp8-block": "block"}[qw.scheme]
    if mode == "block" and x2.shape[0] == 1 and not fs.ue8m0_rounding:  # one token: quantized in the GEMV
        return k.fp8_block_gemm_dynamic(
            x2, data.contiguous(), scales, b_scale_strides=tuple(scales.stride()), block=F.FP8_BLOCK,
            out_dtype=out_dtype, bias=bias,
        )  # fmt: skip
    if fs.ue8m0_rounding or mode == "tensor":  # the act-quant kernel does groups and tokens only
        xq, xs = F.quantize_act(x2, qw.scheme, fp8_dtype=fp8, pow2_scales=fs.ue8m0_rounding)
    else:
        xq, xs = k.quantize_act_fp8(x2, group=F.FP8_BLOCK if mode == "block" else None, fp8_dtype=fp8)
    xs = read_act_scale(xs, lead, fs, slot_src)
    b_scale = scales if mode == "block" else scales.contiguous()
    return k.fp8_gemm(
        xq, xs, data.contiguous(), b_scale, a_scale_mode=mode, b_scale_mode=mode,
        b_scale_strides=tuple(scales.stride()) if mode == "block" else None,
        block=F.FP8_BLOCK, out_dtype=out_dtype, bias=bias,
    )  # fmt: skip


# ---------------------------------------------------------------- modules


def quantize_for_device(
    w: Tensor, scheme: str, device: torch.device, layout: F.ScaleLayout
) -> F.QuantizedWeight:
    """Quantize as a checkpoint would be (e4m3fn), then normalise for an fnuz arch (MI300)."""
    qw = F.quantize_weight(w, scheme, fp8_dtype=torch.float8_e4m3fn, layout=layout)
    if qw.fp8_dtype is not None and arch.fp8_dtype_for(device) == torch.float8_e4m3fnuz:
        data, s = F.normalize_e4m3fn_to_e4m3fnuz(qw.data, F.logical_scales(qw))
        qw = F.QuantizedWeight(qw.scheme, data, F.store_scales(s, layout), None, qw.shape, layout, data.dtype)
    return qw


class _QuantBase(nn.Module):
    """Shared bookkeeping: chosen backend, fallback reason, hidden faults, backend re-checks."""

    kind = "linear"

    def _init_common(self, scheme: str, backend: str, reason: str, faults: FaultSet, ck_free: bool) -> None:
        self.scheme, self.backend, self.fallback_reason, self.ck_free = scheme, backend, reason, ck_free
        self._faults = faults  # never reported: the differ must find faults from the numbers

    def _resolve(self, backend: str, device: torch.device) -> str:
        return (
            self.backend
            if backend == "auto"
            else select_backend(self.scheme, backend, device, ck_free=self.ck_free)[0]
        )


class QuantLinear(_QuantBase):
    """Drop-in for nn.Linear holding a QuantizedWeight as buffers (they follow .to(device))."""

    def __init__(self, qw: F.QuantizedWeight, bias: Tensor | None, *, backend: str, fallback_reason: str = "",
                 faults: FaultSet = NO_FAULTS, ck_free: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.register_buffer("qdata", qw.data)
        self.register_buffer("qscales", qw.scales)
        self.register_buffer("qzeros", qw.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.layout, self.fp8_dtype = qw.layout, qw.fp8_dtype
        self._dequant_cache: dict[str, Tensor] = {}  # torch backend: fp32 weight, made on first use
        self._init_common(qw.scheme, backend, fallback_reason, faults, ck_free)

    @property
    def qweight(self) -> F.QuantizedWeight:
        shape = (self.out_features, self.in_features)
        return F.QuantizedWeight(
            self.scheme, self.qdata, self.qscales, self.qzeros, shape, self.layout, self.fp8_dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        return quant_matmul(x, self.qweight, self.bias, self.backend, self._faults, self._dequant_cache)

    def forward_with_backend(self, x: Tensor, backend: str) -> Tensor:
        return quant_matmul(
            x, self.qweight, self.bias, self._resolve(backend, x.device), self._faults, self._dequant_cache
        )

    def debug_info(self) -> dict:
        return {
            "kind": "linear", "scheme": self.scheme, "backend": self.backend,
            "fallback_reason": self.fallback_reason, "weight_dtype": str(self.qdata.dtype).removeprefix("torch."),
            "weight_shape": list(self.qdata.shape), "scale_shape": list(self.qscales.shape),
            "scale_stride": list(self.qscales.stride()), "scale_layout": self.layout.to_dict(),
            "in_features": self.in_features, "out_features": self.out_features,
        }  # fmt: skip

    def stored_tensors(self) -> dict[str, Tensor]:
        out = {"weight": self.qdata, "weight_scale": self.qscales}
        if self.qzeros is not None:
            out["weight_zero"] = self.qzeros
        return out

    def stored_metadata(self) -> dict[str, str]:
        return _metadata(self.scheme, self.layout, self.qscales, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, backend={self.backend}"


def _metadata(scheme: str, layout: F.ScaleLayout, scales: Tensor, shape: tuple[int, ...]) -> dict[str, str]:
    group = {"fp8-block": "128x128", "int4-g128": "1x128", "mxfp4": "1x32"}.get(scheme, "per-channel")
    if scheme == "fp8-tensor":
        group = "per-tensor"
    return {
        "scheme": scheme, "scale_order": layout.order, "scale_shuffled": str(layout.shuffled).lower(),
        "scale_stride": ",".join(map(str, scales.stride())), "logical_shape": ",".join(map(str, shape)),
        "scale_group": group, "scale_encoding": "e8m0" if scheme == "mxfp4" else "fp32",
        "shuffle": "4x4 row transpose per 16-row tile, tail reversed" if layout.shuffled else "none",
    }  # fmt: skip


@dataclass(frozen=True)
class QuantSummary:
    scheme: str
    backend_requested: str
    ck_free: bool
    arch: str
    modules: dict[str, str] = field(default_factory=dict)  # name -> backend that runs it
    fallbacks: dict[str, str] = field(default_factory=dict)  # name -> reason
    skipped: tuple[str, ...] = ()


# A scale fault reads the stored grid another way; where that way reads the same values a
# "faulty" target computes what a correct one does, and a negative control built on it passes,
# silently. (fault, FaultSet field, where it reads the same scales)
_SCALE_READ_FAULTS = (
    ("scale-transposed", "scale_transposed", "a grid of one row or one column, or equal scales where "
     "the swapped strides land; transposing it reads the same scales"),
    ("scale-shuffle-ignored", "scale_shuffle_ignored", "the shuffle leaves the scales in place (a grid "
     "of one row, or equal rows where it swaps them); reading them unshuffled reads the same scales"),
)  # fmt: skip


def _weights_of(mod: nn.Module) -> list[F.QuantizedWeight]:
    """The quantized weights a module's GEMMs read: one for a linear, two per expert for MoE."""
    if isinstance(mod, QuantLinear):
        return [mod.qweight]
    return [mod.expert_weight(tag, e) for tag in ("gate_up", "down") for e in range(mod.num_experts)]


def _refuse_noop_scale_faults(model: nn.Module, fault_map: dict[str, FaultSet]) -> None:
    """Refuse a scale fault when no module it matches reads other scales than a correct one
    (tiny-llama's fp8-block down_proj: a [1, 2] grid; its attention projections: [1, 1]). Judged on
    the values `read_weight` gives with and without the fault, not on shapes: a shape rule missed
    equal scales. A glob that also matches a module where the fault acts is accepted."""
    for fault, flag, why in _SCALE_READ_FAULTS:
        names = [n for n, fs in fault_map.items() if getattr(fs, flag)]
        if not names or any(_moves_scales(model.get_submodule(n), fault_map[n], flag) for n in names):
            continue
        shown = ", ".join(
            f"{n} {list(_weights_of(model.get_submodule(n))[0].scales.shape)}" for n in names[:3]
        )
        raise QuantConfigError(
            f"fault {fault} would change nothing: in every module it matches {why} ({shown})"
        )


def _moves_scales(mod: nn.Module, fs: FaultSet, flag: str) -> bool:
    """Whether some weight of `mod` reads other scales with the fault than without it."""
    clean = replace(fs, **{flag: False})
    return any(not torch.equal(read_weight(qw, fs)[1], read_weight(qw, clean)[1]) for qw in _weights_of(mod))


def _refuse_unmatched_skips(skip: Sequence[str], candidates: Sequence[str]) -> None:
    """A --quant-skip glob that matches no quantizable module skips nothing: a typo, or a layer
    prefix (`model.layers.0` names the layer, not its linears), would quantize the very modules the
    user meant to keep, silently. Refused as a --fault glob matching nothing is."""
    for glob in skip:
        if not any(fnmatch.fnmatchcase(n, glob) for n in candidates):
            under = any(fnmatch.fnmatchcase(n, f"{glob}.*") for n in candidates)
            hint = f" (globs match whole names: {glob}.* skips the modules under it)" if under else ""
            raise QuantConfigError(f"--quant-skip {glob} matches no linear or MoE experts module{hint}")


def quantize_model(model: nn.Module, *, scheme: str, backend: str = "auto", skip: Sequence[str] = (),
                   faults: Sequence[str] = (), ck_free: bool | None = None) -> QuantSummary:  # fmt: skip
    """Swap every nn.Linear (not lm_head, not tied to an embedding, not matching `skip`) and every
    fused MoE experts module for a quantized one, in place, keeping module names."""
    from server_shim.quant.moe import QuantMoEExperts, is_fused_experts

    ck = ck_free_from_env(ck_free)
    if scheme not in SCHEMES:
        raise QuantConfigError(f"unknown scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if backend not in BACKENDS:
        raise QuantConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if scheme == "none":
        if faults:
            raise QuantConfigError("faults need a quantized model: --quant none has no quantized module")
        return QuantSummary(scheme, backend, ck, arch.device_arch(device))
    chosen, reason = select_backend(scheme, backend, device, ck_free=ck)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets: dict[str, str] = {}
    skipped: list[str] = []
    candidates: list[str] = []
    for name, mod in model.named_modules():
        kind = "linear" if isinstance(mod, nn.Linear) else "moe" if is_fused_experts(mod) else None
        if kind is None:
            continue
        candidates.append(name)
        if (any(fnmatch.fnmatchcase(name, g) for g in (*DEFAULT_SKIP, *skip)) or
                (kind == "linear" and id(mod.weight) in tied)):  # fmt: skip
            skipped.append(name)
            continue
        targets[name] = kind
    _refuse_unmatched_skips(skip, candidates)
    fault_map = resolve_faults(faults, scheme=scheme, modules=targets)
    shuffled = any(f.partition("@")[0] == "scale-shuffle-ignored" for f in faults)
    layout = F.ScaleLayout("row-major", shuffled)  # a model-wide policy: faults do not show in it
    for name, kind in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        fs = fault_map.get(name, NO_FAULTS)
        if kind == "linear":
            qw = quantize_for_device(old.weight, scheme, device, layout)
            new = QuantLinear(qw, old.bias, backend=chosen, fallback_reason=reason, faults=fs, ck_free=ck)
        else:
            new = QuantMoEExperts.from_experts(old, parent, scheme=scheme, backend=chosen, fallback_reason=reason,
                                               faults=fs, ck_free=ck, layout=layout, device=device)  # fmt: skip
        setattr(parent, child, new)
        logger.debug("quant %s -> %s/%s%s", name, scheme, chosen, f" (fallback: {reason})" if reason else "")
    _refuse_noop_scale_faults(model, fault_map)
    if reason:
        logger.warning(
            "quant %s: backend %s for %d modules (fallback: %s)", scheme, chosen, len(targets), reason
        )
    else:
        logger.info("quant %s: backend %s for %d modules", scheme, chosen, len(targets))
    logger.debug("quant skipped: %s", skipped)
    return QuantSummary(scheme, backend, ck, arch.device_arch(device), {n: chosen for n in targets},
                        {n: reason for n in targets if reason}, tuple(skipped))  # fmt: skip
