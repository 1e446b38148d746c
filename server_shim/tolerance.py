"""How far a correct implementation of one module may differ from another: the numbers behind
every exactness limit.

Torch-free on purpose: the shim uses it to size its rounding twin (`--rounding-noise auto`) and
the differ (difftest.null) to bound module replay, so both sides share one definition.

A correct kernel computes a module's output in another order than its golden and rounds it to the
compute dtype. Two terms, whichever is larger:

- output rounding: 2u of the compute dtype (u = unit roundoff: fp16 2^-11, bf16 2^-8, fp32 2^-24);
- fp32 accumulation order over K products: sqrt(K) u_fp32 (a random-walk bound; ~2e-6 at K=1536).

In fp16 / bf16 the first dominates (9.8e-4 / 7.8e-3); in fp32 the second (1e-6..4e-6). That is
`module_tolerance`, the twin's per-module amplitude.

Module replay (a module fed the golden's own input) is bounded by 2x that, but never under
REPLAY_FLOOR: on identical input, quantized kernels add discrete flips — an fp8 / int8 activation
on a rounding tie lands on the other side when the scale's last bit differs — measured up to ~1e-4
local relative error on fp32 CPU (tiny-llama, fp8-block, Triton interpreter vs torch).
"""

from __future__ import annotations

import math

UNIT_ROUNDOFF = {
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
REPLAY_FLOOR = 5e-4
DEFAULT_K = 4096  # reduction length assumed where a module does not say its own


def unit_roundoff(dtype: str) -> float:
    name = dtype.removeprefix("torch.")
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"unknown compute dtype {dtype!r} (known: {', '.join(UNIT_ROUNDOFF)})")
    return UNIT_ROUNDOFF[name]


def module_tolerance(dtype: str, k: int = DEFAULT_K) -> float:
    """Relative error of a correct implementation of one module with reduction length `k`:
    max(2u(dtype), sqrt(k) u_fp32). fp16 9.8e-4, bf16 7.8e-3, fp32 at k=4096 3.8e-6."""
    return max(2.0 * unit_roundoff(dtype), math.sqrt(max(k, 1)) * UNIT_ROUNDOFF["float32"])


def replay_bound(dtype: str) -> float:
    """Module replay bound: max(2 x module_tolerance(dtype), REPLAY_FLOOR).
    fp32 5e-4, fp16 1.95e-3, bf16 1.56e-2."""
    return max(2.0 * module_tolerance(dtype), REPLAY_FLOOR)
