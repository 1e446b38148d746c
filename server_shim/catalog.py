"""The shim's catalogs: quantization schemes, kernel backends, injectable faults and the schemes in
which each fault can exist. The one source for both sides of the torch boundary: server_shim.quant
imports these names, and the launcher / difftest.config validate a config against them without
importing torch (docs/design.md, "Boundaries").
"""

from __future__ import annotations

SCHEMES = ("none", "fp8-tensor", "fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4")
QUANTIZED = SCHEMES[1:]
FP8_SCHEMES = ("fp8-tensor", "fp8-token", "fp8-block")
WEIGHT_ONLY_SCHEMES = ("int4-g128", "mxfp4")
BACKENDS = ("auto", "torch", "triton", "vendor")

FAULTS = (
    "garbage-gemm",
    "scale-transposed",
    "scale-shuffle-ignored",
    "scale-skipped",
    "fnuz-unnormalized",
    "transpose-noop",
    "routed-scaling-missing",
    "ue8m0-rounding",
    "slot-variant",
    "slot-tile",
)
# Schemes where each bug class can exist at all: a per-tensor scale has no layout to transpose,
# a weight-only scheme has no activation scale to round or to read from the wrong slot. A config
# asking for e.g. scale-transposed on fp8-token is refused with its line, not by a dying server.
FAULT_SCHEMES: dict[str, tuple[str, ...]] = {
    "garbage-gemm": QUANTIZED,
    "scale-transposed": ("fp8-block", "int4-g128", "mxfp4"),
    "scale-shuffle-ignored": ("fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4"),
    "scale-skipped": QUANTIZED,
    "fnuz-unnormalized": FP8_SCHEMES,
    "transpose-noop": QUANTIZED,
    "routed-scaling-missing": QUANTIZED,
    "ue8m0-rounding": ("fp8-tensor", "fp8-token", "fp8-block", "int8"),
    "slot-variant": ("fp8-token", "fp8-block", "int8"),
    "slot-tile": ("fp8-token", "fp8-block", "int8"),
}
# faults that only a batch can show (at one token there is no other slot to read)
SLOT_FAULTS = ("slot-variant", "slot-tile")
# slot-tile: the rows of an M tile this tall read the first tile's scale rows (a tile offset missing
# from the scale pointer), so only batch slots past it are wrong
SLOT_TILE_ROWS = 16
MOE_ONLY = ("routed-scaling-missing",)
