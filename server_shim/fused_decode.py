"""The fused decode path: decode steps attend through one Triton kernel (fused_kernels.py) instead
of HF's mask + GQA expansion + SDPA chain. On by default on a CUDA / ROCm GPU (measured on an H200:
1.7-1.9x the plain graph step, graph tokens == eager tokens; README "GPU engine"); off with
`DIFFTEST_FUSED_DECODE=0` or `serve --no-fused-decode`. On the CPU only where Triton's interpreter
is on and `DIFFTEST_FUSED_DECODE=1` asks for it: the tests.

How it hooks in without touching the model's modules: transformers' attention modules look their
attention function up by `config._attn_implementation` in `ALL_ATTENTION_FUNCTIONS` on every
forward, after `cache.update(...)` has handed them the cache's keys and values. `install` registers
`difftest_decode` (falling back to `sdpa`) and `difftest_decode_eager` (falling back to the
modeling file's own `eager_attention_forward`) and points the model's configs at the one matching
their implementation. The function takes the kernel only inside `decode_context` -- which the
model runner opens around its decode step, with each row's position -- and only for one query
token per row over exactly those rows; everything else (prefill chunks, HF `generate`, the debug
routes' forwards, sliding windows, soft-capping, sinks) runs the original implementation with the
same arguments. The projections, norms, hooks, quantized linears, faults and the rounding twin
are untouched: they live in the modules, not in the attention function.

Two more pieces ride on the same context, each with a switch of its own: LlamaRMSNorm-shaped norm
modules take one kernel (`install_norms`, DIFFTEST_FUSED_NORM=0 keeps HF's), and the modeling
files' rotate-half `apply_rotary_pos_emb` -- a module-level function the attention forward looks
up in its module's globals on every call -- is swapped for a wrapper that applies the rotation to
q and k in one kernel at decode shapes and calls the original with the same arguments otherwise
(`install_rope`, DIFFTEST_FUSED_ROPE=0 keeps HF's).

Rounding: the kernel accumulates in float32 and rounds once, where SDPA rounds its own way; greedy
tokens may therefore differ from the plain path's in a near-tie (bench/engine_gpu_check.py
--fused reports the match rate). Graph and eager steps launch the same kernel, so they agree.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from server_shim import fused_kernels
from server_shim.quant.arch import triton_available
from server_shim.row_attention import attention_configs
from server_shim.switches import env_switch

logger = logging.getLogger(__name__)

__all__ = [
    "ENV", "NAME", "NORM_ENV", "ROPE_ENV", "DecodeContext", "active", "base_implementation", "decode_context",
    "fused_wanted", "install", "install_norms", "install_rope", "norms_wanted", "rope_wanted", "self_check",
    "uninstall",
]  # fmt: skip

ENV = "DIFFTEST_FUSED_DECODE"
NORM_ENV = "DIFFTEST_FUSED_NORM"
ROPE_ENV = "DIFFTEST_FUSED_ROPE"
NAME = "difftest_decode"
# registered name -> the implementation it falls back to (and that it replaces in the config)
NAMES = {NAME: "sdpa", NAME + "_eager": "eager"}
_FOR = {fallback: name for name, fallback in NAMES.items()}
# attention kwargs that change what attention computes: their presence means "not ours"
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "attn_logit_softcapping")


def fused_wanted(device: torch.device, option: bool | None = None) -> bool:
    """On when Triton can run on the device and the option -- when it is None, `DIFFTEST_FUSED_DECODE`,
    whose default is on for a GPU and off for the CPU (the interpreter is for tests) -- asks for it."""
    want = option if option is not None else env_switch(ENV, torch.device(device).type == "cuda")
    if not want:
        return False
    if not triton_available(device):
        logger.warning("fused decode asked for, but Triton cannot run on %s: plain decode", device)
        return False
    return True


# ---------------------------------------------------------------------------------- context


@dataclass
class DecodeContext:
    """One decode step of the runner: `rows` rows (row = cache slot), `kv_len` positions read,
    `pos` [rows] each row's position (a view into the runner's static input: a captured graph
    reads it on every replay); `rope`: the rotary wrapper may take its kernel. `calls` and
    `rope_calls` count attention / rotary kernel launches from Python (a capture counts once)."""

    rows: int
    kv_len: int
    pos: Tensor
    rope: bool = False
    calls: int = 0
    rope_calls: int = 0


_local = threading.local()


def active() -> DecodeContext | None:
    return getattr(_local, "ctx", None)


@contextlib.contextmanager
def decode_context(rows: int, kv_len: int, pos: Tensor, rope: bool = False) -> Iterator[DecodeContext]:
    """Decode steps of this thread inside the block take the kernels (one engine = one thread)."""
    ctx = DecodeContext(rows, kv_len, pos, rope)
    prev, _local.ctx = active(), ctx
    try:
        yield ctx
    finally:
        _local.ctx = prev


# ---------------------------------------------------------------------------------- the function


def _fallback(name: str, module: torch.nn.Module) -> Callable[..., Any]:
    impl = NAMES[name]
    if impl == "eager":  # the model's own eager attention lives in its modeling file
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward to fall back to")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _applies(ctx: DecodeContext | None, query: Tensor, key: Tensor, value: Tensor, kwargs: dict) -> bool:
    if ctx is None or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    b, hq, t, d = query.shape
    return (
        t == 1
        and b == ctx.rows
        and key.shape[0] == b
        and value.shape[:3] == key.shape[:3]
        and key.shape[2] == ctx.kv_len
        and key.shape[3] == d
        and hq % key.shape[1] == 0
        and query.dtype == key.dtype == value.dtype
        and query.device == key.device
        and not kwargs.get("output_attentions")
        and all(kwargs.get(k) is None for k in _UNSUPPORTED)
    )


def _make(name: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    def attention(
        module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        ctx = active()
        if getattr(module, "is_causal", True) and _applies(ctx, query, key, value, kwargs):
            scaling = kwargs.get("scaling")
            scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            ctx.calls += 1  # type: ignore[union-attr]
            return fused_kernels.decode_attention(query, key, value, ctx.pos, scale), None  # type: ignore[union-attr]
        return _fallback(name, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = attention.__qualname__ = name
    return attention


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, impl in NAMES.items():
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, _make(name))
        # masks the model builds itself (HF generate, a 2-D mask) are the fallback's masks
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])


# ---------------------------------------------------------------------------------- install


def install(model: torch.nn.Module) -> bool:
    """Point the model's configs at the fused functions (idempotent); False when none of its
    configs uses sdpa or eager attention (then nothing changes and decode stays plain)."""
    _register()
    changed = False
    for cfg in attention_configs(model):
        impl = cfg._attn_implementation_internal
        if impl in NAMES:
            changed = True
        elif impl in _FOR:
            cfg._attn_implementation_internal = _FOR[impl]  # this config only: sub-configs are visited too
            changed = True
    if not changed:
        logger.warning("fused decode: no sdpa/eager attention in %s: plain decode", type(model).__name__)
    return changed


def uninstall(model: torch.nn.Module) -> None:
    """Undo `install`, `install_norms` and `install_rope` (idempotent; the tests share one loaded
    model). The rotary swap is per modeling file: undoing it for this model undoes it for every
    model of that file in the process (they then rotate plainly; nothing else changes)."""
    for cfg in attention_configs(model):
        impl = cfg._attn_implementation_internal
        if impl in NAMES:
            cfg._attn_implementation_internal = NAMES[impl]
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) is _norm_forward:
            del m.forward
    for mod in _modeling_modules(model):
        fn = vars(mod).get(_ROPE_NAME)
        if getattr(fn, _ROPE_MARK, False):
            setattr(mod, _ROPE_NAME, fn.__wrapped__)


# ---------------------------------------------------------------------------------- RMSNorm


def norms_wanted() -> bool:
    """The norm half of the path (on with it unless DIFFTEST_FUSED_NORM=0: a switch of its own, so
    that a misbehaving norm kernel on a GPU does not take the attention kernel down with it)."""
    return env_switch(NORM_ENV, True)


def _norm_forward(self: torch.nn.Module, hidden_states: Tensor) -> Tensor:
    """A LlamaRMSNorm-shaped module's forward: the kernel in decode steps, the class's own elsewhere."""
    w = self.weight
    if active() is not None and hidden_states.dtype == w.dtype and hidden_states.is_contiguous():
        return fused_kernels.rms_norm(hidden_states, w, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def install_norms(model: torch.nn.Module) -> int:
    """Route every norm module whose forward is LlamaRMSNorm's (the same function by `_code_key`, as
    for rotary: Llama's and the copies in Qwen2, Mistral, DeepSeek ... modeling files; not Gemma's
    1 + weight) through `_norm_forward`, as an instance attribute: module names, hooks and
    `__call__` stay as they were. Returns how many modules now take it."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    want = _code_key(LlamaRMSNorm.forward)
    if want is None:
        return 0
    n = 0
    for m in model.modules():
        if not isinstance(getattr(m, "weight", None), torch.Tensor) or not hasattr(m, "variance_epsilon"):
            continue
        if _code_key(getattr(type(m), "forward", None)) != want:
            continue
        if "forward" not in m.__dict__:
            m.forward = types.MethodType(_norm_forward, m)
        n += 1
    return n


# ---------------------------------------------------------------------------------- rotary

_ROPE_NAME = "apply_rotary_pos_emb"
_ROPE_MARK = "_difftest_fused_rope"  # set on the wrapper; its __wrapped__ is the original


def rope_wanted() -> bool:
    """The rotary half of the path (on with it unless DIFFTEST_FUSED_ROPE=0: its own switch, as the norm's)."""
    return env_switch(ROPE_ENV, True)


def _plain_function(fn: Any) -> Any:
    """The Python function behind fn: unwrapped from decorators that name what they wrap, and from
    the module that `kernels` (0.19+, installed with transformers' serving extra) makes of a
    function decorated with `use_kernel_forward_from_hub`: transformers 5.25's modeling files hold
    such an `nn.Module` under `apply_rotary_pos_emb`, whose forward calls the original, kept in its
    closure as `func`."""
    fn = inspect.unwrap(fn) if callable(fn) else fn
    if isinstance(fn, torch.nn.Module) and hasattr(type(fn), "kernel_layer_name"):
        try:
            inner = inspect.getclosurevars(type(fn).forward).nonlocals.get("func")
        except TypeError:  # a forward that is no plain function
            inner = None
        if callable(inner):
            fn = inspect.unwrap(inner)
    return fn


def _code_key(fn: Any) -> tuple | None:
    """What makes two functions the same function: bytecode, constants (less the docstring),
    names, variables, defaults -- of the function under any decorator that says what it wraps
    (ours; transformers' hub-kernel one where the `kernels` package is installed). None: no code."""
    fn = _plain_function(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    consts = code.co_consts
    if consts and fn.__doc__ is not None and consts[0] == fn.__doc__:
        consts = consts[1:]
    return code.co_code, consts, code.co_names, code.co_varnames, code.co_argcount, fn.__defaults__


def _llama_rope_keys() -> tuple[tuple | None, tuple | None]:
    from transformers.models.llama import modeling_llama

    return _code_key(modeling_llama.apply_rotary_pos_emb), _code_key(modeling_llama.rotate_half)


def _modeling_modules(model: torch.nn.Module) -> list[types.ModuleType]:
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


def _rope_applies(ctx: DecodeContext, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, args: tuple, kwargs: dict) -> bool:  # fmt: skip
    """A decode step's call with HF's [B, heads, 1, D] layout and cos / sin [B or 1, 1, D]."""
    if len(args) > 1 or set(kwargs) - {"unsqueeze_dim"}:
        return False
    unsqueeze = args[0] if args else kwargs.get("unsqueeze_dim", 1)
    if unsqueeze != 1 or not all(isinstance(x, Tensor) for x in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    b, _, t, d = q.shape
    return (
        t == 1
        and b == ctx.rows
        and (k.shape[0], k.shape[2], k.shape[3]) == (b, t, d)
        and d % 2 == 0
        and cos.shape[0] in (1, b)
        and tuple(cos.shape[1:]) == (t, d)
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.device == k.device == cos.device == sin.device
    )


def _make_rope(original: Callable[..., Any]) -> Callable[..., Any]:
    # updated=(): a hub-kernel module's attributes (its parameters, hooks) stay off the wrapper
    @functools.wraps(original, updated=())
    def apply_rotary_pos_emb(
        q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        ctx = active()
        if ctx is not None and ctx.rope and _rope_applies(ctx, q, k, cos, sin, args, kwargs):
            ctx.rope_calls += 1
            return fused_kernels.rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _ROPE_MARK, True)
    return apply_rotary_pos_emb


def install_rope(model: torch.nn.Module) -> int:
    """Swap `apply_rotary_pos_emb` in the modeling files of the model's modules for the wrapper
    (idempotent), where it is Llama's rotate-half function (the same bytecode, and the file's
    `rotate_half` Llama's too: Qwen2, Mistral, Gemma, DeepSeek-V3 ... copy it). Files with their own
    rotary (interleaved, partial inside the function, a float32 upcast) keep it; so does every other
    function of a file (DeepSeek-V3's MLA with rope_interleave calls `apply_rotary_pos_emb_interleave`,
    never the swapped one). Returns how many files now have the wrapper."""
    rope_key, half_key = _llama_rope_keys()
    if rope_key is None or half_key is None:  # Llama's is no plain function here: nothing to compare with
        logger.warning("fused rotary: transformers' Llama rotary is not a plain function: HF's rotary kept")
        return 0
    n = 0
    for mod in _modeling_modules(model):
        fn = vars(mod).get(_ROPE_NAME)
        if getattr(fn, _ROPE_MARK, False):
            n += 1
            continue
        if fn is None or _code_key(fn) != rope_key or _code_key(vars(mod).get("rotate_half")) != half_key:
            continue
        setattr(mod, _ROPE_NAME, _make_rope(fn))
        n += 1
    return n


def base_implementation(config: Any) -> str | None:
    """The implementation a config had before `install` (what its masks and fallbacks are)."""
    impl = getattr(config, "_attn_implementation", None)
    return NAMES.get(impl, impl) if isinstance(impl, str) else impl


def self_check(device: torch.device, dtype: torch.dtype, norms: bool = True, rope: bool = True) -> str | None:
    """Run the kernels once at small ragged GQA shapes against torch; None when they agree, else why
    not (a compile error on this GPU, a wrong number). The runner decodes plainly on a failure."""
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, s, d = 3, 6, 2, 80, 64
    q = torch.randn((b, hq, 1, d), generator=gen).to(device=device, dtype=dtype)
    k = torch.randn((b + 1, hkv, s + 1, d), generator=gen).to(device=device, dtype=dtype)[:b, :, :s]
    v = torch.randn((b + 1, hkv, s + 1, d), generator=gen).to(device=device, dtype=dtype)[:b, :, :s]
    pos = torch.tensor([[0, 0, 0], [40, 0, 0], [79, 0, 0]], device=device)[:, 0]
    x = torch.randn((2, 3, 576), generator=gen).to(device=device, dtype=dtype)
    w = (1 + torch.randn((576,), generator=gen) / 4).to(device=device, dtype=dtype)
    # rotary as the attention forward hands it over: q and k transposed views of [B, 1, heads, D]
    rq = torch.randn((b, 1, hq, d), generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    rk = torch.randn((b, 1, hkv, d), generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    angle = torch.rand((b, 1, d // 2), generator=gen) * 6.3
    cos = torch.cat((angle.cos(), angle.cos()), dim=-1).to(device=device, dtype=dtype)
    sin = torch.cat((angle.sin(), angle.sin()), dim=-1).to(device=device, dtype=dtype)
    try:
        got = fused_kernels.decode_attention(q, k, v, pos, d**-0.5).float()
        want = fused_kernels.reference_decode_attention(q, k, v, pos, d**-0.5).float()
        xf = x.float()
        norm_want = (w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)).float()
        norm_got = fused_kernels.rms_norm(x, w, 1e-5).float() if norms else norm_want
        rope_want = torch.cat(fused_kernels.reference_rotary(rq, rk, cos, sin), dim=1).float()
        rope_got = torch.cat(fused_kernels.rotary(rq, rk, cos, sin), dim=1).float() if rope else rope_want
    except Exception as exc:  # noqa: BLE001 - any failure: reported, decode stays plain
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    # both sides round float32 results once to the model dtype: at most one ulp apart (2**-8
    # relative in bf16) where their float32 sums, in different orders, straddle a rounding boundary
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    checks = (
        ("decode attention", got, want),
        ("RMSNorm", norm_got, norm_want),
        ("rotary", rope_got, rope_want),
    )
    for what, a, b in checks:
        err = ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()
        if not err <= tol:  # also catches NaN
            return f"{what} kernel differs from torch by {err:.3g} relative (tolerance {tol:g})"
    return None
