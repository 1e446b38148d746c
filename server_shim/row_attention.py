"""CPU attention whose numbers for a batch row do not depend on where in the batch it sits.

The shim is the correct server the batch-slot check is calibrated on: the same prompt must get the
same answer in every slot of one batch shape. torch's CPU `scaled_dot_product_attention` breaks
that on some machines. Measured (torch 2.13 CPU, AMD EPYC with AVX-512, 2 threads, 2026-12-07):
identical inputs at batch rows 0 and 3 came out up to 1.2e-7 apart, the rows the second thread
took against those the first took (one thread: 0.0; the math backend: 0.0). Per-token fp8 scales
turn that into 0.06 nats a decode step later, so a correct fp8-block shim answered the probe in
slot 3 otherwise than in slot 0 (tests/test_invariance_shim.py).

What runs instead, for the masks the shim's engine builds (boolean, [B or 1, 1, T, L]): attention
as two batched matmuls around a softmax, in float32, the query heads of a key-value head grouped
(no repeated keys). Each batch row is then its own small GEMMs and its own softmax rows: measured
invariant at 2 threads, within 3e-7 of SDPA; one layer's decode attention 1.5x SDPA's time at 4
rows x 64 positions, the same as SDPA's at 32 x 512, and the engine at 0.92-0.98x its tokens/s (`python
bench/row_attention.py`). Anything else (dropout, soft-capping, a float mask, HF's own causal
path) runs SDPA one batch row at a time: invariant too, 2-3x the attention's time.

Hooked in like fused_decode: transformers looks the attention function up by
`config._attn_implementation` on every forward; `install` registers `difftest_rows` and points
the model's sdpa configs at it. GPUs keep batched SDPA or the fused kernel: every correct target
there moved 0.0 between slots (README "On a GPU"), and batched SDPA alone gave identical rows
identical bits on an H100 (float16, bfloat16, float32; 4-128 rows decoding, 8 rows prefilling 64
tokens; torch 2.11, 2026-12-07). `DIFFTEST_ROW_ATTENTION=0` keeps batched SDPA
on the CPU too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

NAME = "difftest_rows"
FALLBACK = "sdpa"
ENV = "DIFFTEST_ROW_ATTENTION"  # off: batched SDPA on the CPU too (faster, slot-variant where torch's is)


def wanted(device: torch.device) -> bool:
    """On the CPU unless DIFFTEST_ROW_ATTENTION=0."""
    from server_shim.switches import env_switch

    return device.type == "cpu" and env_switch(ENV, True)


def _row(mask: Tensor | None, r: int, rows: int) -> Tensor | None:
    """Row r's mask: masks broadcast over the batch (one row, or none) are every row's."""
    if mask is None or mask.dim() == 0 or mask.shape[0] != rows:
        return mask
    return mask[r : r + 1]


# attention kwargs that change what attention computes: with any of them set, SDPA row by row
_SPECIAL = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias", "output_attentions")


def _engine_mask(mask: Tensor | None, query: Tensor, key: Tensor) -> bool:
    """A boolean [B or 1, 1, T, L] mask: the kind the shim's engine builds (True: attend)."""
    b, t, length = query.shape[0], query.shape[2], key.shape[2]
    return (
        isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 4
        and mask.shape[0] in (1, b) and mask.shape[1] == 1 and tuple(mask.shape[2:]) == (t, length)
    )  # fmt: skip


def matmul_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale, masked) v in float32, a key-value head's query heads grouped:
    [B, H, T, D] x [B, Hk, L, D] (values [B, Hk, L, Dv]) -> HF's [B, T, H, Dv]. A row with
    nothing to attend to gives 0."""
    b, h, t, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    g = h // hk
    q = query.float().reshape(b, hk, g * t, d)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).mul_(scale)
    scores.view(b, hk, g, t, length).masked_fill_(~mask.view(-1, 1, 1, t, length), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(probs, value.float()).view(b, h, t, value.shape[-1])  # MLA: values narrower
    return out.transpose(1, 2).contiguous().to(query.dtype)


def attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS[FALLBACK]
    rows = query.shape[0]
    cpu = query.device.type == "cpu"
    if (  # one path for every batch size, one row included: alone and batched round alike
        cpu
        and _engine_mask(attention_mask, query, key)
        and key.shape[0] == value.shape[0] == rows
        and query.shape[1] % key.shape[1] == 0
        and not kwargs.get("dropout")
        and all(kwargs.get(k) is None or kwargs.get(k) is False for k in _SPECIAL)  # sinks may be tensors
    ):
        scaling = kwargs.get("scaling")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        return matmul_attention(query, key, value, attention_mask, scale), None  # type: ignore[arg-type]
    if rows == 1 or not cpu or key.shape[0] != rows or value.shape[0] != rows:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    outs = [
        sdpa(
            module,
            query[r : r + 1],
            key[r : r + 1],
            value[r : r + 1],
            _row(attention_mask, r, rows),
            **kwargs,
        )[0]
        for r in range(rows)
    ]
    return torch.cat(outs, dim=0), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:  # masks the model builds itself are SDPA's
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[FALLBACK])


def attention_configs(model: torch.nn.Module) -> list[Any]:
    """Every config in the model that names an attention implementation (sub-configs too)."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def install(model: torch.nn.Module) -> int:
    """Point the model's SDPA configs at `attention` (idempotent); how many configs use it."""
    _register()
    used = 0
    for cfg in attention_configs(model):
        if cfg._attn_implementation_internal == FALLBACK:
            cfg._attn_implementation_internal = NAME
        used += cfg._attn_implementation_internal == NAME
    return used


def uninstall(model: torch.nn.Module) -> None:
    """Undo `install` (idempotent): a model the tests share may next serve a fused runner."""
    for cfg in attention_configs(model):
        if cfg._attn_implementation_internal == NAME:
            cfg._attn_implementation_internal = FALLBACK


@contextlib.contextmanager
def suspended(model: torch.nn.Module) -> Iterator[None]:
    """The model as loaded (batched SDPA) inside, as it was after: a baseline such as HF `generate`
    on a model an engine shares must not be timed through the engine's attention."""
    was = any(cfg._attn_implementation_internal == NAME for cfg in attention_configs(model))
    uninstall(model)
    try:
        yield
    finally:
        if was:
            install(model)


def underlying(impl: str | None) -> str | None:
    """The implementation behind `impl`: what its masks are built for."""
    return FALLBACK if impl == NAME else impl
