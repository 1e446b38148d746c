"""The /debug/* routes: white-box access to one model for the layer differ and the quant audit.

    GET  /debug/config            what runs where: dtype, device, arch, decode path, every module's kind (+ quant info)
    POST /debug/activations       per-point tensors of one sequence (prefill and N greedy decode steps)
    POST /debug/module            replay one module on a caller-supplied input (local vs inherited error)
    GET  /debug/quant/{module}    a quantized module's stored weight, scales and declared layout

Bodies are safetensors (never pickle: a pickle from a server is code execution on the client).
Point names are HF module names, identical on every side because quantization swaps modules in place:
`model.layers.{i}` = residual stream after block i, `model.layers.{i}.self_attn` / `.mlp` = sublayer
outputs, every linear (and MoE experts module) by full name = its output, `model.embed_tokens` and
`model.norm`, and `logits`. `lm_head` is not a point: its output is `logits`. With `inputs: true` each
replayable point also returns what went into it (`{name}:input`, plus e.g. `{name}:top_k_index` for
experts), which is exactly the body /debug/module takes.

Capture (the points and the hooks) lives in debug_capture.py; this module keeps replay, the quant
tensors, the config and the HTTP layer. Every model call goes through `engine.run_exclusive`,
between batches, so hooks never see other requests' tensors. Bad input is a DebugRequestError that becomes an OpenAI-shaped 4xx here, so these
routes behave the same whichever app includes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server_shim import debug_protocol as P
from server_shim import openapi
from server_shim.debug_capture import (
    ActivationsRequest,
    capture_activations,
    list_modules,
    list_points,
    module_kind,
)
from server_shim.errors import DebugRequestError, InvalidRequestError, QuantConfigError, ShimError, clip
from server_shim.wire import read_body, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "create_debug_router",
    "response_cap",
    "debug_config",
    "device_arch",
    "parse_safetensors",
    "quant_tensors",
    "replay_module",
]

DEFAULT_MAX_RESPONSE_BYTES = 256 * 2**20
MAX_BYTES_ENV = "DIFFTEST_DEBUG_MAX_BYTES"
DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # ServeOptions.max_body_bytes: one cap for every route
_OCTET = "application/octet-stream"


# ---------------------------------------------------------------- module info


def _module_info(kind: str, mod: torch.nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": kind}
    if hasattr(mod, "debug_info"):
        info.update(mod.debug_info())
    elif kind == "linear":
        info.update(
            scheme="none",
            weight_dtype=str(mod.weight.dtype).removeprefix("torch."),
            weight_shape=list(mod.weight.shape),
        )
    elif kind == "moe":
        info.update(scheme="none", weights={n: list(p.shape) for n, p in mod.named_parameters(recurse=False)})
    if kind == "mlp":
        info["moe"] = any(module_kind("", c) == "moe" for c in mod.children())
    return info


def device_arch(device: torch.device) -> str:
    """QUANT's arch name ("cpu", "sm90", "gfx942"), plus the marketing name of a GPU for humans."""
    from server_shim.quant.arch import device_arch as arch_of

    arch = arch_of(device)
    return f"{arch} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else arch


# ---------------------------------------------------------------- module replay / quant tensors


def parse_safetensors(body: bytes, param: str = "body") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors body; malformed bytes are the caller's 400."""
    try:
        (n,) = struct.unpack("<Q", body[:8])
        header = json.loads(body[8 : 8 + n])
        tensors = st_load(body)
    except Exception as exc:  # struct.error, JSON, safetensors' own SafetensorError: all the caller's fault
        raise DebugRequestError(f"the body is not a valid safetensors file: {exc}", param=param) from None
    meta = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _find(loaded: Any, name: str) -> tuple[str, torch.nn.Module]:
    mods = list_modules(loaded.model)
    if name not in mods:
        raise DebugRequestError(
            f"no module named {clip(name)!r} (GET /debug/config lists them)",
            param="module",
            code="module_not_found",
            status_code=404,
        )
    return mods[name]


def _too_large(max_bytes: int) -> DebugRequestError:
    return DebugRequestError(
        f"the response would exceed the debug response cap of {max_bytes} bytes ({max_bytes / 2**20:.0f} MiB); "
        "send fewer rows",
        param="input", code="response_too_large", status_code=413,
    )  # fmt: skip


def _output_bytes(mod: torch.nn.Module, x: torch.Tensor) -> int:
    """The float32 response a linear (a row of out_features per input row) or an embedding (a row
    of embedding_dim per id) would answer for `x`, known before it runs; 0 for other modules: an
    embedding was sized only after it ran, 2M ids (8 MB) computed 1 GB before the 413."""
    out_features = getattr(mod, "out_features", None)
    if isinstance(out_features, int) and x.dim() > 0:
        return x.numel() // max(x.shape[-1], 1) * out_features * 4
    dim = getattr(mod, "embedding_dim", None)
    if isinstance(dim, int) and not x.is_floating_point():
        return x.numel() * dim * 4
    return 0


def replay_module(loaded: Any, body: bytes, *, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> bytes:
    """A module run on the posted input. The response cap holds here too (README: debug responses
    are capped): a linear's or an embedding's output is sized before it runs -- 1400 rows through
    lm_head answered 263 MiB from a 0.7 MB request -- and any output before it is serialized."""
    tensors, meta = parse_safetensors(body)
    if P.META_MODULE not in meta:
        raise DebugRequestError(f"the safetensors metadata needs a {P.META_MODULE!r} entry", param="module")
    kind, mod = _find(loaded, meta[P.META_MODULE])
    if P.INPUT not in tensors:
        raise DebugRequestError(f"the body needs a tensor named {P.INPUT!r}", param="input")
    if kind in ("block", "attention"):
        raise DebugRequestError(
            f"{meta['module']!r} is a {kind}; it needs rotary embeddings and a mask, so replay its linears instead",
            param="module",
        )

    def to_model(t: torch.Tensor) -> torch.Tensor:
        return t.to(loaded.device, loaded.dtype) if t.is_floating_point() else t.to(loaded.device)

    x = to_model(tensors.pop(P.INPUT))
    if _output_bytes(mod, x) > max_bytes:
        raise _too_large(max_bytes)
    backend = meta.get(P.META_BACKEND)
    if backend is not None and not hasattr(mod, "forward_with_backend"):
        raise DebugRequestError(
            f"module {meta['module']!r} ({kind}) is not quantized: it has no backends to choose from",
            param="backend",
            code="not_quantized",
        )
    try:
        with torch.inference_mode():
            kwargs = {k: to_model(v) for k, v in tensors.items()}
            # metadata "backend": run the same stored weights through another backend (the audit's
            # backend table) — the module's own faults still apply, as they would in production
            out = mod.forward_with_backend(x, backend, **kwargs) if backend is not None else mod(x, **kwargs)
    except QuantConfigError as exc:  # a backend this device cannot run: the caller's choice
        raise DebugRequestError(str(exc), param="backend", code="backend_unavailable") from None
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DebugRequestError(
            f"module {meta['module']!r} rejected the input: {msg}", param="input"
        ) from None
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.numel() * 4 > max_bytes:
        raise _too_large(max_bytes)
    return st_save(
        {P.OUTPUT: out.detach().to("cpu", torch.float32).contiguous()},
        metadata={P.META_MODULE: meta[P.META_MODULE], P.META_DTYPE: str(loaded.dtype).removeprefix("torch.")},
    )


def quant_tensors(loaded: Any, name: str) -> bytes:
    kind, mod = _find(loaded, name)
    if not hasattr(mod, "stored_tensors"):
        raise DebugRequestError(
            f"module {name!r} ({kind}) is not quantized: it stores no quantized tensors",
            param="module",
            code="not_quantized",
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in mod.stored_tensors().items()}
    return st_save(tensors, metadata={str(k): str(v) for k, v in mod.stored_metadata().items()})


def debug_config(engine: Any) -> dict[str, Any]:
    """`decode` says how the engine's decode steps run: the paths round differently, so a server
    restarted on another one is another build, and `--resume` (identity.py) sees it."""
    loaded = engine.loaded
    return {
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "arch": device_arch(loaded.device),
        "num_layers": loaded.num_layers,
        "context_length": engine.context_length,  # the served one: --max-model-len caps the model's
        "quant": getattr(loaded, "quant", "none"),  # the scheme (faults are never revealed)
        "rounding_noise": getattr(loaded, "rounding_noise", 0.0),  # > 0: a rounding twin
        "decode": {"cuda_graphs": engine.runner.graphs is not None, "fused": engine.runner.fused},
        "points": list_points(loaded.model),
        "modules": {n: _module_info(k, m) for n, (k, m) in list_modules(loaded.model).items()},
    }


# ---------------------------------------------------------------- HTTP


def _error(exc: InvalidRequestError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status_code)


MAX_DEBUG_JOBS = 16  # debug jobs queued or running at once: twice what a run sends one server (-j 8)


class _DebugSlots:
    """A bound on debug jobs in flight: they run on the model thread ahead of generation and their
    answers are held until read, so unbounded they stalled generation for every client and grew
    memory without limit (4 slow readers of 256 MiB answers: +1.5 GB). Past the bound: a 429."""

    def __init__(self, limit: int = MAX_DEBUG_JOBS) -> None:
        self.limit, self.busy = limit, 0

    async def run(self, engine: Any, fn: Callable[[], bytes], request: Request | None = None) -> Response:
        """fn's answer, or a 429 past the bound. With `request`: a client that hangs up while its job
        waits takes the job with it (still queued, it never runs; running, its answer is dropped) and
        frees its slot, so an interrupted `difftest layers -j 8` leaves no forwards behind it."""
        if self.busy >= self.limit:
            exc = DebugRequestError(
                f"{self.busy} debug requests are in flight (at most {self.limit}); retry later",
                param=None, code="server_busy", status_code=429,
            )  # fmt: skip
            response = _error(exc)
            response.headers["Retry-After"] = "1"
            return response
        self.busy += 1
        try:
            return await _unless_gone(_octet(engine, fn), request)
        finally:
            self.busy -= 1


DISCONNECT_POLL_S = 0.25  # how often a waiting debug request looks for its client's hang-up
CLIENT_GONE = 499  # nginx's "client closed request": the status no client reads, in the access log


async def _unless_gone(work: Coroutine[Any, Any, Response], request: Request | None) -> Response:
    """`work`'s response, or, once `request`'s client has disconnected, `work` cancelled."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                logger.info("debug request %s: the client disconnected; its job is dropped", request.url.path)
                return Response(status_code=CLIENT_GONE)
    finally:
        if not task.done():  # this handler was cancelled itself: the job goes with it
            task.cancel()


async def _octet(engine: Any, fn: Callable[[], bytes]) -> Response:
    """Run `fn` on the model thread: its safetensors body, or its DebugRequestError as a 4xx."""
    try:
        body = await engine.run_exclusive(fn)
    except DebugRequestError as exc:
        return _error(exc)
    return Response(body, media_type=_OCTET)


def _parse_activations(data: Any) -> ActivationsRequest:
    """The parsed body (`read_json`: 400 for a non-JSON Content-Type, malformed, too deep,
    surrogates, huge ints) as a request."""
    if not isinstance(data, dict):
        raise DebugRequestError("the body must be a JSON object", param=None)
    try:
        return ActivationsRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"]  # union branches add tags like "literal['all','last']": keep field + indices
        param = ".".join([str(loc[0]), *(str(p) for p in loc[1:] if isinstance(p, int))]) if loc else None
        raise DebugRequestError(f"{param}: {first['msg']}", param=param) from None


def response_cap() -> int:
    """The debug routes' response cap in bytes: env DIFFTEST_DEBUG_MAX_BYTES, else 256 MiB. Anything
    but a positive integer stops `serve` before the model loads (a ShimError, one line), where
    int() would have raised a traceback at app creation."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_RESPONSE_BYTES
    value = int(raw) if raw.isdigit() else 0
    if value < 1:
        raise ShimError(f"{MAX_BYTES_ENV}={raw!r} is not a positive number of bytes; unset it for 256 MiB")
    return value


def create_debug_router(
    engine: Any,
    *,
    max_response_bytes: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_chars: int | None = None,
) -> APIRouter:
    """The debug routes over `engine.loaded`; the response cap defaults to env DIFFTEST_DEBUG_MAX_BYTES
    or 256 MiB. Bodies are read through wire.read_body, so a chunked upload without Content-Length
    is cut off at `max_body_bytes` with a 413 naming the cap, not buffered whole."""
    cap = max_response_bytes or response_cap()
    slots = _DebugSlots()
    router = APIRouter()

    @router.get(P.CONFIG, responses=openapi.ERRORS)
    async def config() -> Response:
        return JSONResponse(await engine.run_exclusive(lambda: debug_config(engine)))

    @router.post(
        P.ACTIVATIONS, responses=openapi.octet(), openapi_extra=openapi.json_body(ActivationsRequest)
    )
    async def activations(request: Request) -> Response:
        try:
            req = _parse_activations(await read_json(request, max_body_bytes))
            if max_prompt_chars is not None and req.prompt is not None and len(req.prompt) > max_prompt_chars:
                # refused before the model thread tokenizes it (8M characters there held generation 9 s)
                raise DebugRequestError(
                    f"prompt has {len(req.prompt)} characters; this server takes at most {max_prompt_chars} "
                    "(--max-prompt-chars)",
                    param="prompt",
                )
        except InvalidRequestError as exc:
            return _error(exc)
        return await slots.run(
            engine,
            lambda: capture_activations(
                engine.loaded, req, max_bytes=cap, context_length=engine.context_length
            ),
            request,
        )

    @router.post(P.MODULE, responses=openapi.octet(), openapi_extra=openapi.binary_body())
    async def module(request: Request) -> Response:
        try:
            raw = await read_body(request, max_body_bytes)
        except InvalidRequestError as exc:
            return _error(exc)
        return await slots.run(engine, lambda: replay_module(engine.loaded, raw, max_bytes=cap), request)

    @router.get(P.QUANT + "{name:path}", responses=openapi.octet())
    async def quant(name: str, request: Request) -> Response:
        return await slots.run(engine, lambda: quant_tensors(engine.loaded, name), request)

    return router
