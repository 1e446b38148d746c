"""Fault injection: real bug classes reproduced inside the real quantized code path.

`--fault NAME[@GLOB]` marks modules; a marked module keeps its stored tensors intact and the bug
lives in how the GEMM *reads* them (`read_weight`, `read_act_scale`) or, for MoE, in the expert
combine (moe.py). Every backend goes through the same reads, so a fault shows up on torch,
triton and vendor alike. Nothing here is visible through `debug_info()`: faults are kept in a
private attribute (`_faults`) that no reporting path reads.

| fault                   | bug class                                   | where                           |
|-------------------------|---------------------------------------------|---------------------------------|
| garbage-gemm            | wrong kernel for the arch                   | weight read with K stride 7     |
| scale-transposed        | row-major scales read as col-major          | scale strides of the other order|
| scale-shuffle-ignored   | shuffle_scale=True silently ignored         | shuffled scales read unshuffled |
| scale-skipped           | scale copy skipped (left at 1)              | scales read as ones             |
| fnuz-unnormalized       | e4m3fn bits read as e4m3fnuz, no x2 scale   | weight bits reinterpreted       |
| transpose-noop          | fallback transpose that does nothing        | [N, K] memory read as [K, N]    |
| routed-scaling-missing  | MoE output without routed_scaling_factor    | moe.py combine                  |
| ue8m0-rounding          | scales rounded up to powers of two          | activation quantization         |
| slot-variant            | scale row of batch slot 0 used for slot > 0 | activation scale read           |
| slot-tile               | slots past the first 16-row M tile read the | activation scale read           |
|                         | first tile's scale rows (tile offset lost)  |                                 |
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from server_shim.catalog import FAULT_SCHEMES, FAULTS, FP8_SCHEMES, MOE_ONLY, SLOT_TILE_ROWS  # noqa: F401 - re-read by callers
from server_shim.errors import QuantConfigError
from server_shim.option_rules import FaultSpec, parse_fault  # noqa: F401 - re-read by callers
from server_shim.quant.formats import QuantizedWeight, unshuffle_scales


@dataclass(frozen=True)
class FaultSet:
    """The bugs switched on in one module; all False is the correct code path."""

    garbage_gemm: bool = False
    scale_transposed: bool = False
    scale_shuffle_ignored: bool = False
    scale_skipped: bool = False
    fnuz_unnormalized: bool = False
    transpose_noop: bool = False
    routed_scaling_missing: bool = False
    ue8m0_rounding: bool = False
    slot_variant: bool = False
    slot_tile: bool = False

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


NO_FAULTS = FaultSet()


def resolve_faults(specs: Sequence[str], *, scheme: str, modules: Mapping[str, str]) -> dict[str, FaultSet]:
    """Map each quantized module name (kind "linear" | "moe") to its FaultSet. Refuses a fault that
    cannot exist in `scheme`, a glob that matches no quantized module, and an MoE-only fault that
    matches no MoE module."""
    out: dict[str, FaultSet] = {}
    for text in specs:
        spec = parse_fault(text)
        if scheme not in FAULT_SCHEMES[spec.name]:
            where = ", ".join(FAULT_SCHEMES[spec.name])
            raise QuantConfigError(
                f"fault {spec.name} does not apply to scheme {scheme}; it applies to: {where}"
            )
        names = [n for n in modules if spec.glob is None or fnmatch.fnmatchcase(n, spec.glob)]
        if not names:
            target = spec.glob or "(all)"
            raise QuantConfigError(f"fault {spec.name}@{target} matches no quantized module")
        if spec.name in MOE_ONLY:
            names = [n for n in names if modules[n] == "moe"]
            if not names:
                raise QuantConfigError(f"fault {spec.name} applies to MoE experts modules; none matched")
        attr = spec.name.replace("-", "_")
        for n in names:
            out[n] = replace(out.get(n, NO_FAULTS), **{attr: True})
    return out


# ---------------------------------------------------------------- the reads


def _coprime_stride(cols: int) -> int:
    return next(p for p in (7, 11, 13, 17, 19, 23, 29, 31) if math.gcd(p, cols) == 1)


def read_weight(qw: QuantizedWeight, fs: FaultSet) -> tuple[Tensor, Tensor, Tensor | None]:
    """(data, logical scales, zeros) as the GEMM reads them. With no fault: the stored data and
    the scales read through their declared layout. Scales may come back as a strided view."""
    data, stored = qw.data, qw.scales
    rows, cols = data.shape
    if fs.transpose_noop:
        # The [N, K] buffer handed to a kernel that expects the transposed copy: element (n, k)
        # read at n + k*N, i.e. the untransposed memory read as if transposed.
        raw = data.view(torch.uint8) if data.element_size() == 1 else data
        data = torch.as_strided(raw, (rows, cols), (1, rows)).contiguous().view(data.dtype)
    if fs.garbage_gemm:
        # Wrong kernel for the arch: it walks K with stride 7 (mod K, shifted per row), so every
        # output is a dot product with the wrong weights -> uncorrelated with the right answer.
        p = _coprime_stride(cols)
        k = torch.arange(cols, device=data.device)
        idx = (p * k[None, :] + torch.arange(rows, device=data.device)[:, None]) % cols
        raw = data.view(torch.uint8) if data.element_size() == 1 else data
        data = raw.gather(1, idx).view(data.dtype)
    if fs.fnuz_unnormalized and qw.fp8_dtype is not None:
        if qw.fp8_dtype == torch.float8_e4m3fnuz:
            # On an fnuz arch the loader reinterpreted the bits but never doubled the scale.
            stored = stored / 2.0
        else:
            # e4m3fn bits read as e4m3fnuz: every value x0.5 (0x80 would be NaN, but the quantizer
            # stores -0 as +0: formats._to_fp8); back to the GEMM dtype.
            data = data.view(torch.uint8).view(torch.float8_e4m3fnuz).float().to(qw.fp8_dtype)
    scales = stored
    if fs.scale_transposed and stored.dim() == 2:
        r, c = stored.shape
        other = (1, r) if qw.layout.order == "row-major" else (c, 1)
        scales = torch.as_strided(stored, (r, c), other)
    if qw.layout.shuffled and not fs.scale_shuffle_ignored:
        scales = unshuffle_scales(scales)
    if fs.scale_skipped:
        one = 127 if scales.dtype == torch.uint8 else 1.0  # e8m0 code 127 is 2**0
        scales = torch.full(scales.shape, one, dtype=scales.dtype, device=scales.device)
    return data, scales, qw.zeros


def slot_sources(rows: Tensor, lead: tuple[int, ...], fs: FaultSet) -> Tensor:
    """For each flat row index of a [*lead] input, the row whose activation scale a slot fault
    reads: the same position in slot 0 (slot-variant) or in slot s mod SLOT_TILE_ROWS (slot-tile).
    The slot is the first dim of `lead` (a 2-D input: each row its own slot). MoE experts use it
    on the token ids of the routed rows, so their faults follow the request's slot too."""
    per = math.prod(lead[1:])  # rows (tokens) per slot
    slot, pos = rows // per, rows % per
    src = slot * 0 if fs.slot_variant else slot % SLOT_TILE_ROWS
    return src * per + pos


def read_act_scale(
    scale: Tensor, lead: tuple[int, ...], fs: FaultSet, sources: Tensor | None = None
) -> Tensor:
    """The activation scale rows the GEMM epilogue reads. With a slot fault row r reads row
    `sources[r]`, by default `slot_sources` over the input's own rows (slot = first dim of the
    input; rows of a 2-D input are slots); MoE experts pass their own map (moe.py)."""
    if not (fs.slot_variant or fs.slot_tile) or scale.shape[0] <= 1:
        return scale
    if sources is None:
        sources = slot_sources(torch.arange(scale.shape[0], device=scale.device), lead or (1,), fs)
    return scale[sources.to(scale.device)].contiguous()
