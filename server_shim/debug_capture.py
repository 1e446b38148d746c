"""POST /debug/activations: which points a model has, and capturing their tensors with hooks.

Used by debug.py, which serves the route. Point names are HF module
names, identical on every side because quantization swaps modules in place (debug.py's docstring
lists them); `list_modules` / `list_points` decide them, `capture_activations` runs prefill and
greedy decode steps with forward hooks that keep the requested rows as float32 on the CPU.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save as st_save

from server_shim import debug_protocol as P
from server_shim.errors import DebugRequestError, clip
from server_shim.models import cache_keyword, returned_cache

MAX_DECODE_STEPS = 256
_BLOCK = re.compile(r"^(?:.*\.)?layers\.\d+$")


class ActivationsRequest(BaseModel):
    """POST /debug/activations (one sequence: the differ aligns positions, not batches)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: list[int] | None = None
    prompt: str | None = None
    layers: list[str] | None = None  # fnmatch globs over point names; None = every point
    positions: Literal["all", "last"] | list[int] = "all"
    logits: bool = False
    decode_steps: int = Field(default=0, ge=0, le=MAX_DECODE_STEPS)
    inputs: bool = False


# ---------------------------------------------------------------- module classification


def module_kind(name: str, module: torch.nn.Module) -> str | None:
    """The kind a module is reported and treated as, or None when it is not interesting."""
    if hasattr(module, "debug_info"):
        return str(module.debug_info().get("kind", "linear"))
    if isinstance(module, torch.nn.Linear):
        return "linear"
    cls = type(module).__name__
    if cls.endswith("Experts"):
        return "moe"
    if _BLOCK.match(name):
        return "block"
    last = name.rsplit(".", 1)[-1]
    if _BLOCK.match(name.rsplit(".", 1)[0]) and last in ("self_attn", "attn", "attention"):
        return "attention"
    if _BLOCK.match(name.rsplit(".", 1)[0]) and last == "mlp":
        return "mlp"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if "Norm" in cls:
        return "norm"
    if cls.endswith("Router"):
        return "router"
    return None


def _inside_quantized(name: str, quantized: list[str]) -> bool:
    return any(name.startswith(q + ".") for q in quantized)


def list_modules(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Module]]:
    """name -> (kind, module) in registration order; children of a quantized module are its business."""
    out: dict[str, tuple[str, torch.nn.Module]] = {}
    quantized: list[str] = []
    for name, mod in model.named_modules():
        if not name or _inside_quantized(name, quantized):
            continue
        kind = module_kind(name, mod)
        if kind is None:
            continue
        if hasattr(mod, "debug_info"):
            quantized.append(name)
        out[name] = (kind, mod)
    return out


def list_points(model: torch.nn.Module) -> list[str]:
    """Every activation point, in forward order within a block (registration order), `logits` last."""
    pts = [
        n
        for n, (kind, _) in list_modules(model).items()
        if n != "lm_head"
        and (
            kind in ("block", "attention", "mlp", "linear", "moe")
            or n.endswith(("embed_tokens", "model.norm"))
        )
    ]
    return [*pts, "logits"]


# ---------------------------------------------------------------- capture


class _TooLarge(Exception):
    pass


@dataclass
class _Capture:
    """Forward hooks that keep the selected rows of each point as float32 on the CPU."""

    positions: list[int]  # rows kept of a tensor with one row per token of this forward
    n_tokens: int
    limit: int
    prefix: str = ""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0

    def keep(self, name: str, t: torch.Tensor) -> None:
        # [batch=1, ..., T, features] -> [T, features]; MLA's kv_b_proj sees [1, 1, T, rank].
        rows = t.detach().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.detach().reshape(-1, 1)
        per_token = rows.shape[0] == self.n_tokens
        # the cap is checked on the bytes the kept rows will take (floats kept as float32), before
        # they are copied: indexing first allocated whatever `positions` asked for (549 GB once)
        n_rows = len(self.positions) if per_token else rows.shape[0]
        size = n_rows * rows.shape[-1] * (4 if rows.is_floating_point() else rows.element_size())
        if self.nbytes + size > self.limit:
            raise _TooLarge
        self.nbytes += size
        # Advanced indexing copies, so no two points share storage (safetensors refuses that). A tensor
        # without one row per token (none such in HF decoders today) is kept whole, never mis-sliced.
        rows = rows[self.positions] if per_token else rows.clone()
        rows = rows.to("cpu", torch.float32) if rows.is_floating_point() else rows.to("cpu")
        self.tensors[self.prefix + name] = rows.contiguous()


# Kinds whose inputs are returned with `inputs: true`: the ones /debug/module can replay.
_REPLAYABLE = ("linear", "moe", "mlp", "norm")


def _hooks(
    modules: dict[str, tuple[str, torch.nn.Module]], points: list[str], inputs: bool, cap: _Capture
) -> list[Any]:
    handles = []
    for name in points:
        kind, mod = modules[name]

        def out_hook(_m: Any, _a: Any, out: Any, name: str = name) -> None:
            cap.keep(name, out[0] if isinstance(out, (tuple, list)) else out)

        handles.append(mod.register_forward_hook(out_hook))
        if inputs and kind in _REPLAYABLE:
            params = [p for p in inspect.signature(mod.forward).parameters if p not in ("self",)]

            def in_hook(_m: Any, args: tuple, kwargs: dict, name: str = name, params: list = params) -> None:
                named = dict(zip(params, args, strict=False)) | kwargs  # fewer args than params
                for i, (arg, val) in enumerate(named.items()):
                    if torch.is_tensor(val):
                        cap.keep(f"{name}:{'input' if i == 0 else arg}", val)

            handles.append(mod.register_forward_pre_hook(in_hook, with_kwargs=True))
    return handles


def _resolve_tokens(req: ActivationsRequest, loaded: Any, context_length: int) -> list[int]:
    if (req.tokens is None) == (req.prompt is None):
        raise DebugRequestError("give exactly one of 'tokens' or 'prompt'", param="tokens")
    ids = req.tokens if req.tokens is not None else loaded.tokenizer(req.prompt)["input_ids"]
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if not ids:
        raise DebugRequestError(
            "the sequence is empty", param="tokens" if req.tokens is not None else "prompt"
        )
    if bad := [t for t in ids if not 0 <= t < vocab]:
        raise DebugRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
    if len(ids) + req.decode_steps > context_length:
        raise DebugRequestError(
            f"{len(ids)} tokens + {req.decode_steps} decode steps exceed the context length {context_length}",
            param="tokens" if req.tokens is not None else "prompt",
            code="context_length_exceeded",  # as /v1/completions says it
        )
    return list(ids)


def _resolve_positions(spec: str | list[int], n: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    if spec == "last":
        return [n - 1]
    if not spec:
        raise DebugRequestError("'positions' is an empty list", param="positions")
    if bad := [p for p in spec if not -n <= p < n]:
        raise DebugRequestError(f"position {bad[0]} is outside the sequence of {n} tokens", param="positions")
    out = [p % n for p in spec]
    if len(set(out)) < len(out):  # each row once: repeats only multiply the response
        raise DebugRequestError("'positions' names a position twice", param="positions")
    return out


def _select_points(all_points: list[str], globs: list[str] | None) -> list[str]:
    """Module points matched by the globs; `logits` is switched on by `logits: true` or the literal name,
    never by a wildcard (full logits are by far the largest tensor)."""
    modules = [p for p in all_points if p != "logits"]
    if globs is None:
        return modules
    if not globs:  # an empty list selected nothing: a 200 with an empty file, now a 400 like a glob
        raise DebugRequestError(
            "'layers' is an empty list: leave it out for every point, or name 'logits' for the logits alone",
            param="layers",
        )
    chosen: set[str] = set()
    for g in globs:
        if not g:
            raise DebugRequestError("each entry of 'layers' must be a non-empty glob", param="layers")
        hit = {p for p in modules if fnmatch.fnmatchcase(p, g)}
        if not hit and g != "logits":
            raise DebugRequestError(
                f"layers glob {clip(g)!r} matches no point (e.g. 'model.layers.3.*', 'model.layers.*.mlp')",
                param="layers",
            )
        chosen |= hit
    return [p for p in modules if p in chosen]


def capture_activations(
    loaded: Any, req: ActivationsRequest, *, max_bytes: int, context_length: int | None = None
) -> bytes:
    """Run prefill (+ greedy decode steps) with hooks; return the safetensors body.
    `context_length`: the server's (--max-model-len caps it), so this route runs no sequence that
    /v1/completions refuses; None: the model's own."""
    model = loaded.model
    ids = _resolve_tokens(req, loaded, loaded.context_length if context_length is None else context_length)
    positions = _resolve_positions(req.positions, len(ids))
    mods = list_modules(model)
    points = _select_points(list_points(model), req.layers)
    want_logits = req.logits or (req.layers is not None and "logits" in req.layers)
    cap = _Capture(positions=positions, n_tokens=len(ids), limit=max_bytes)
    decoded: list[int] = []
    handles = _hooks(mods, points, req.inputs, cap)
    try:
        with torch.inference_mode():
            x = torch.tensor([ids], device=loaded.device)
            cache_kw = cache_keyword(model)
            out = model(input_ids=x, use_cache=req.decode_steps > 0)
            if want_logits:
                cap.keep("logits", out.logits)
            for step in range(req.decode_steps):
                nxt = int(out.logits[0, -1].float().argmax())
                decoded.append(nxt)
                cap.prefix, cap.positions, cap.n_tokens = f"{P.DECODE_PREFIX}{step}.", [0], 1
                x = torch.tensor([[nxt]], device=loaded.device)
                out = model(input_ids=x, use_cache=True, **{cache_kw: returned_cache(out)})
                if want_logits:
                    cap.keep("logits", out.logits)
    except _TooLarge:
        raise DebugRequestError(
            f"the response would exceed the debug response cap of {max_bytes} bytes "
            f"({max_bytes / 2**20:.0f} MiB); ask for fewer layers, positions or decode steps",
            param="layers",
            code="response_too_large",
            status_code=413,
        ) from None
    finally:
        for h in handles:
            h.remove()
    # Points in the order their hooks fired in prefill: execution order (q_proj .. o_proj, self_attn,
    # gate_proj .. down_proj, mlp, then the block), which is what "first divergent point" walks.
    names = [k for k in cap.tensors if ":" not in k and not k.startswith(P.DECODE_PREFIX)]
    meta = {
        P.META_TOKEN_IDS: json.dumps(ids),
        P.META_POINTS: json.dumps(names),
        P.META_POSITIONS: json.dumps(positions),
        P.META_DECODE_TOKEN_IDS: json.dumps(decoded),
        P.META_DECODE_STEPS: str(req.decode_steps),
        P.META_DTYPE: str(loaded.dtype).removeprefix("torch."),
    }
    if req.inputs:
        meta[P.META_INPUTS] = json.dumps(
            sorted(k for k in cap.tensors if ":" in k and not k.startswith(P.DECODE_PREFIX))
        )
    return st_save(cap.tensors, metadata=meta)
