"""The debug protocol's bodies without torch: a safetensors reader and writer, and the small
float formats' decoders the reader needs.

Every tensor the debug routes exchange is a safetensors body (docs/design.md "The debug
protocol"). difftest never imports torch, and `safetensors.numpy` cannot load fp8 tensors (numpy
has no fp8 dtype: it raises KeyError 'F8_E4M3'). The routes send quantized weights as fp8, so we
read the container ourselves (8-byte little-endian header length, JSON header, raw bytes) and keep
every 8-bit float as its uint8 *codes*: the quant audit must decode the same bits under other
interpretations (e4m3fn read as e4m3fnuz is a real bug class), which a decoded float array would
no longer allow. Writing needs no fp8, so it goes through `safetensors.numpy`.

Every format decodes through a 256-entry (or 16-entry) lookup table built once from the bit
layout, so decoding is one `np.take` and the tables are easy to check against hand values.

    e4m3fn    OCP FP8: 1 sign, 4 exponent (bias 7), 3 mantissa; no inf; 0x7F / 0xFF are NaN; max 448
    e4m3fnuz  AMD FP8: bias 8, no inf, no -0: 0x80 is the only NaN; max 240 (every value of the
              same bits is half its e4m3fn value)
    e2m1      OCP MX FP4: 1 sign, 2 exponent, 1 mantissa: +-{0, .5, 1, 1.5, 2, 3, 4, 6}
    e8m0      OCP MX scale: 2**(e - 127), 255 is NaN
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from difftest.errors import UnreadableBody


def _e4m3_table(bias: int, *, fnuz: bool) -> np.ndarray:
    out = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0x0F, code & 0x07
        # exponent 0 is subnormal: no implicit leading 1
        val = man / 8.0 * 2.0 ** (1 - bias) if exp == 0 else (1.0 + man / 8.0) * 2.0 ** (exp - bias)
        out[code] = sign * val
    if fnuz:
        out[0x80] = np.nan  # fnuz has no negative zero: that code is its only NaN
    else:
        out[0x7F] = out[0xFF] = np.nan  # e4m3fn: S.1111.111 is NaN, there is no inf
    return out


E4M3FN = _e4m3_table(7, fnuz=False)
E4M3FNUZ = _e4m3_table(8, fnuz=True)
E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
E8M0 = np.array([2.0 ** (e - 127) for e in range(255)] + [np.nan], dtype=np.float32)

TABLES = {"e4m3fn": E4M3FN, "e4m3fnuz": E4M3FNUZ, "e2m1": E2M1, "e8m0": E8M0}
# safetensors dtype names of the fp8 formats -> our table names
FP8_DTYPES = {"F8_E4M3": "e4m3fn", "F8_E4M3FN": "e4m3fn", "F8_E4M3FNUZ": "e4m3fnuz"}


def decode(codes: np.ndarray, fmt: str) -> np.ndarray:
    """Integer codes (uint8; e2m1 uses the low nibble) -> float32 values of `fmt`."""
    if fmt not in TABLES:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(TABLES)}")
    table = TABLES[fmt]
    idx = np.asarray(codes).astype(np.int64) & (len(table) - 1)
    return table[idx]


def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 [N, ceil(K/2)] -> [N, K] values 0..15; low nibble is the even k (kernel contract)."""
    p = np.asarray(packed, dtype=np.uint8)
    both = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[0], -1)
    return both[:, :k]


# ---------------------------------------------------------------- safetensors without torch

_NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
    "U64": np.uint64, "BOOL": np.bool_,
}  # fmt: skip


@dataclass(frozen=True)
class SafeTensors:
    """Tensors of a safetensors body. fp8 tensors are uint8 codes; `dtypes` keeps the wire names."""

    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)

    def value(self, name: str) -> np.ndarray:
        """A tensor as numbers: fp8 codes decoded, bf16 widened; float32 or the integer dtype. A
        tensor the body lacks is an UnreadableBody naming it (a server's answer, not our bug)."""
        if name not in self.tensors:
            raise UnreadableBody(
                f"the body has no tensor {name!r} (it has: {', '.join(self.tensors) or 'none'})"
            )
        arr, dt = self.tensors[name], self.dtypes[name]
        if dt in FP8_DTYPES:
            return decode(arr, FP8_DTYPES[dt])
        return arr


def read_safetensors(body: bytes) -> SafeTensors:
    """Parse a safetensors body (no pickle, no torch). BF16 is widened to float32 exactly."""
    try:
        (n,) = struct.unpack("<Q", body[:8])
        header = json.loads(body[8 : 8 + n])
    except (struct.error, ValueError) as exc:
        raise UnreadableBody(f"not a safetensors body: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise UnreadableBody("not a safetensors body: its header is not a JSON object of tensors")
    meta = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    data = memoryview(body)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, info in header.items():
        # every field checked before use: a damaged body is an UnreadableBody naming the tensor,
        # never a KeyError or a reshape error deep in a diff
        dt, shape, lo, hi = _entry(name, info, len(data))
        raw = np.frombuffer(data[lo:hi], dtype=np.uint8)
        if dt in FP8_DTYPES:
            arr = raw.copy()
        elif dt == "BF16":  # the top half of a float32
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt in _NUMPY:
            arr = raw.view(_NUMPY[dt]).copy()
        else:
            raise UnreadableBody(f"tensor {name!r} has dtype {dt}, which difftest cannot read")
        if arr.size != math.prod(shape):
            raise UnreadableBody(
                f"tensor {name!r}: {hi - lo} bytes do not hold a {dt} tensor of shape {list(shape)}"
            )
        tensors[name] = arr.reshape(shape)
        dtypes[name] = dt
    return SafeTensors(tensors, dtypes, meta)


def _entry(name: str, info: object, size: int) -> tuple[str, tuple[int, ...], int, int]:
    """A header entry's dtype, shape and byte range, checked: ints, in order, inside the body."""
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str)
    shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
    ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok or not 0 <= offsets[0] <= offsets[1] <= size:  # type: ignore[index]
        raise UnreadableBody(f"tensor {name!r}: malformed safetensors entry {str(info)[:120]}")
    return info["dtype"], tuple(shape), offsets[0], offsets[1]  # type: ignore[index, arg-type]


def write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """float32 / int arrays -> a safetensors body (through safetensors' own numpy writer)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
