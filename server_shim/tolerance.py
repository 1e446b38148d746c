"""The one number behind every exactness limit: the per-module error a correct kernel may have.

Torch-free on purpose: the shim uses it to size its rounding twin (`--rounding-noise auto`) and
the differ (difftest.null) to bound module replay, so both sides agree on one definition.

A correct kernel computes a module's output in another order than its golden and rounds it to the
compute dtype: its relative error is a few units of roundoff `u` (fp16 2^-11, bf16 2^-8). Quantized
kernels add discrete flips: an activation that sits on a rounding tie of the fp8/int8 grid lands
on the other side under a 1e-7 difference, which measured up to ~1e-4 local relative error on
fp32 CPU (tiny-llama, fp8-block, Triton vs torch). Hence max(2u, 2.5e-4).
"""

from __future__ import annotations

UNIT_ROUNDOFF = {
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
QUANT_FLIP_FLOOR = 2.5e-4  # act-quant tie flips, measured ~1e-4 on fp32 CPU (see above)


def unit_roundoff(dtype: str) -> float:
    name = dtype.removeprefix("torch.")
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"unknown compute dtype {dtype!r} (known: {', '.join(UNIT_ROUNDOFF)})")
    return UNIT_ROUNDOFF[name]


def module_tolerance(dtype: str) -> float:
    """Relative error a correct implementation of one module may have, in this compute dtype:
    fp32 2.5e-4, fp16 9.8e-4, bf16 7.8e-3."""
    return max(2.0 * unit_roundoff(dtype), QUANT_FLIP_FLOOR)
