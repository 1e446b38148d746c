"""Quantized GEMMs for the shim: formats (the torch golden), kernels (Triton), linear/moe (the
in-place swap and backend dispatch), faults (bug classes reproduced in the real code path).

Importing this package imports no triton: kernels.py is loaded only when the triton backend is
chosen, after the interpreter switch is set (see linear.load_kernels).
"""

from __future__ import annotations

from server_shim.quant.faults import FAULTS
from server_shim.quant.formats import (
    QuantizedWeight,
    ScaleLayout,
    dequantize,
    quantize_weight,
    reference_linear,
)
from server_shim.quant.linear import BACKENDS, SCHEMES, QuantLinear, QuantSummary, quantize_model

__all__ = [
    "BACKENDS",
    "FAULTS",
    "SCHEMES",
    "QuantLinear",
    "QuantSummary",
    "QuantizedWeight",
    "ScaleLayout",
    "dequantize",
    "quantize_model",
    "quantize_weight",
    "reference_linear",
]
