"""An MoE experts module recomputed in numpy, for the quantization audit's hypothesis test
(audit.py): on fixed routing each expert is two GEMMs around an activation, so a sample of
experts gets probe rows routed to each alone and every reading of the stored weights (declared,
transposed, unit scales, ...) is run as the shim's experts run it -- activation quantization and
the compute dtype's rounding included -- to see which one the target's output matches. Pure:
the HTTP side stays in audit.py."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from difftest.whitebox.safetensors import SafeTensors, decode

# what the recomputation needs of the schemes (audit.py's scheme facts: imported back from there
# would make a cycle, so audit.py takes them from here)
BLOCK = 128
FP8_QMAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
INT8_QMAX = 127.0
WEIGHT_ONLY = ("int4-g128", "mxfp4")  # schemes that leave activations in the compute dtype
EXPERT_SAMPLE = 8  # experts whose GEMMs the hypothesis test recomputes (numpy, float64: cost per expert)
EXPERT_ROWS = 4  # probe rows routed to each sampled expert


def declared_factor(value: Any) -> float | None:
    """A factor /debug/config declares for an MoE (`routed_scaling_factor`, `combine_scale`): a
    finite real number, else None (absent, a bool, a string, NaN). One reading for the audit, the
    layer diff's hint and `difftest quant`'s note."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def never_applied(ratio: float, factor: float) -> str:
    """The hint for an experts output off by 1/routed_scaling_factor, worded once for the audit
    (which recomputes it) and the layer diff (which measures it)."""
    return f"output x{ratio:.3g} = 1/routed_scaling_factor {factor:g}: the factor looks never applied"


def sample_experts(num: int, most: int = EXPERT_SAMPLE) -> list[int]:
    """The experts the hypothesis test recomputes: all of them up to `most`, else `most` evenly
    spaced ids, first and last included (each costs a float64 dequantization per hypothesis)."""
    if num <= most:
        return list(range(num))
    return sorted({round(i * (num - 1) / (most - 1)) for i in range(most)})


def expert_probe(
    num_experts: int, hidden: int, rows: int = EXPERT_ROWS
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(sampled expert ids, input [S*rows, H], top_k_index [S*rows, 1]): `rows` rows routed to each
    sampled expert alone. The values are eighths of at most 6 significant bits: exact in fp32,
    fp16 and bf16, so the numpy recomputation starts from the very input the server computes on."""
    ids = sample_experts(num_experts)
    rng = np.random.default_rng(0)
    x = (np.round(rng.standard_normal((len(ids) * rows, hidden)) * 8) / 8).astype(np.float32)
    return ids, x, np.repeat(np.asarray(ids, np.int64), rows)[:, None]


def expert_tensors(st: SafeTensors, gemm: str, e: int) -> SafeTensors:
    """Expert `e`'s `gemm` ("gate_up" / "down") out of /debug/quant's stacked [E, ...] tensors,
    named as a linear's (weight, weight_scale, weight_zero), so `hypotheses` reads it as one."""
    pre = f"{gemm}_proj."
    names = [k for k in st.tensors if k.startswith(pre)]
    if pre + "weight" not in names:
        raise KeyError(f"/debug/quant has no {pre}weight (it has: {', '.join(st.tensors) or 'none'})")
    return SafeTensors(
        {k[len(pre) :]: st.tensors[k][e] for k in names},
        {k[len(pre) :]: st.dtypes[k] for k in names},
        dict(st.metadata),
    )


def round_to(a: np.ndarray, dtype: str | None) -> np.ndarray:
    """`a` rounded to the server's compute dtype (None: float32), back in float64: every tensor the
    server hands from one op to the next is stored in it, and a bf16 server's 0.4% steps would
    otherwise count against the declared reading."""
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":  # round to nearest even on the top 16 bits of the float32
        b = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.astype(np.uint32).view(np.float32).astype(np.float64)
    return a.astype(np.float32).astype(np.float64)


def _fp8_round(v: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values already within +-qmax to the nearest `fmt` value, ties to the even code (as
    torch's cast to fp8)."""
    grid = decode(np.arange(128, dtype=np.uint8), fmt).astype(np.float64)  # non-negative codes
    grid = grid[np.isfinite(grid)]
    a = np.abs(v.astype(np.float64))
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return np.sign(v) * grid[pick]


def quantized_act(x: np.ndarray, scheme: str, fmt: str, pow2: bool = False) -> np.ndarray:
    """A GEMM's input [M, K] after the dynamic activation quantization of `scheme`, dequantized
    (float64), computed in float32 as formats.quantize_act does (`fmt`: the fp8 flavour; `pow2`:
    scales rounded up to powers of two). Weight-only schemes: x itself."""
    if scheme in WEIGHT_ONLY:
        return x
    xf = x.astype(np.float32)
    m, k = xf.shape
    qmax = np.float32(INT8_QMAX if scheme == "int8" else FP8_QMAX[fmt])
    a = np.abs(xf)
    if scheme == "fp8-tensor":
        amax = a.max(initial=0.0).reshape(1, 1)
    elif scheme in ("fp8-token", "int8"):
        amax = a.max(axis=1, keepdims=True, initial=0.0)
    else:  # fp8-block: 1 x 128 groups
        g = math.ceil(k / BLOCK)
        amax = np.pad(a, ((0, 0), (0, g * BLOCK - k))).reshape(m, g, BLOCK).max(axis=-1)
    s = (np.maximum(amax, np.float32(1e-12)) / qmax).astype(np.float32)
    if pow2:
        s = np.exp2(np.ceil(np.log2(s))).astype(np.float32)
    se = np.repeat(s, BLOCK, axis=1)[:, :k] if scheme == "fp8-block" else s
    v = xf / se
    q = (
        np.clip(np.round(v), -INT8_QMAX, INT8_QMAX)
        if scheme == "int8"
        else _fp8_round(np.clip(v, -qmax, qmax), fmt)
    )
    return q.astype(np.float64) * se.astype(np.float64)


ACTIVATIONS = {
    "silu": lambda v: v / (1.0 + np.exp(-v)),
    "relu": lambda v: np.maximum(v, 0.0),
}  # the activations between an expert's GEMMs the recomputation knows (debug_info "activation")


def expert_forward(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray, *, scheme: str, fmt: str,
                   act: str, dtype: str | None, pow2: bool = False, scale: float = 1.0) -> np.ndarray:  # fmt: skip
    """One expert on its rows x [M, H] as the shim's experts compute it, from dequantized weights
    gate_up [2I, H] (gate rows first) and down [H, I]: each GEMM on its quantized input, every
    intermediate in the compute dtype, the combine's `scale` last (routing weight 1)."""
    with np.errstate(over="ignore", invalid="ignore"):  # unit scales: 1e9-sized values, exp overflows to 0
        gu = round_to(quantized_act(x, scheme, fmt, pow2) @ gate_up.T, dtype)
        gate, up = np.split(gu, 2, axis=-1)
        h = round_to(round_to(ACTIVATIONS[act](gate), dtype) * up, dtype)
        y = round_to(quantized_act(h, scheme, fmt, pow2) @ down.T, dtype)
        return round_to(y * scale, dtype)


Reading = tuple[np.ndarray, np.ndarray, bool, float]  # gate_up weight, down weight, pow2 act scales, combine


def expert_readings(gate_up: Mapping[str, np.ndarray], down: Mapping[str, np.ndarray], scheme: str,
                    scale: float) -> dict[str, Reading]:  # fmt: skip
    """Every reading of one expert by name. A weight hypothesis reads both GEMMs that way (one
    kernel runs both), and where both GEMMs have it, also each alone ("h@gate_up", "h@down");
    plus power-of-two activation scales, and the combine without its declared `scale`."""
    dg, dd = gate_up["declared"], down["declared"]
    out: dict[str, Reading] = {"declared": (dg, dd, False, scale)}
    for h in dict.fromkeys([*gate_up, *down]):
        if h in ("declared", "act-scales-pow2"):  # the identity probe's factor: recomputed below instead
            continue
        out[h] = (gate_up.get(h, dg), down.get(h, dd), False, scale)
        if h in gate_up and h in down:
            out[f"{h}@gate_up"] = (gate_up[h], dd, False, scale)
            out[f"{h}@down"] = (dg, down[h], False, scale)
    if scheme not in WEIGHT_ONLY:
        out["act-scales-pow2"] = (dg, dd, True, scale)
    if scale != 1.0:
        out["routed-scaling-missing"] = (dg, dd, False, 1.0)
    return out
