"""CPU attention one batch row at a time: batch-slot invariant where torch's SDPA is not.

The shim is the correct server the batch-slot check is calibrated on: the same prompt must get the
same answer in every slot of one batch shape. torch's CPU `scaled_dot_product_attention` breaks
that on some machines. Measured (torch 2.13 CPU, AMD EPYC with AVX-512, 2 threads, 2026-12-07):
identical inputs at batch rows 0 and 3 came out up to 1.2e-7 apart, the rows the second thread
took against those the first took (one thread: 0.0; the math backend: 0.0). Per-token fp8 scales
turn that into 0.06 nats a decode step later, so a correct fp8-block shim answered the probe in
slot 3 otherwise than in slot 0 (tests/test_invariance_shim.py). One row per call splits every row
the same way across threads, so a row's numbers no longer depend on where in the batch it sits.

Cost (same machine, one GQA layer's decode attention, 9 / 3 heads of 64): 4 rows over 64 positions
57 µs a call instead of 20, 32 rows over 512 positions 1.24 ms instead of 0.91, against tens of
milliseconds a CPU decode step takes in the linears. The math backend is invariant too, but 30 ms
at 32 x 512.

Hooked in like fused_decode: transformers looks the attention function up by
`config._attn_implementation` on every forward; `install` registers `difftest_rows` (SDPA, one
row at a time) and points the model's sdpa configs at it. GPUs keep batched SDPA (or the fused
kernel): every correct target there moved 0.0 between slots (README "On a GPU").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NAME = "difftest_rows"
FALLBACK = "sdpa"


def _row(mask: Tensor | None, r: int, rows: int) -> Tensor | None:
    """Row r's mask: masks broadcast over the batch (one row, or none) are every row's."""
    if mask is None or mask.dim() == 0 or mask.shape[0] != rows:
        return mask
    return mask[r : r + 1]


def attention(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS[FALLBACK]
    rows = query.shape[0]
    if rows == 1 or query.device.type != "cpu" or key.shape[0] != rows or value.shape[0] != rows:
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
    """Point the model's SDPA configs at the row-at-a-time function (idempotent); how many use it."""
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


def underlying(impl: str | None) -> str | None:
    """The implementation behind `impl`: what its masks are built for."""
    return FALLBACK if impl == NAME else impl
