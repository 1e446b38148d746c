"""Quantize / dequantize reference for every scheme, in torch with fp32 math.

This module is the *golden*: `reference_linear` dequantizes exactly as each scale's declared
layout says and multiplies in fp32. Every other backend (Triton, `torch._scaled_mm`) is judged
against it, so it favours obviousness over speed.

Storage conventions (shared with kernels.py, see CONTRACTS.md):
    weights are [N, K] (nn.Linear layout), activations [M, K], outputs [M, N];
    fp8-tensor   data fp8 [N, K], scale fp32 [1, 1]
    fp8-token    data fp8 [N, K], scale fp32 [N, 1]                  (act: [M, 1])
    fp8-block    data fp8 [N, K], scale fp32 [ceil(N/128), ceil(K/128)]  (act: [M, ceil(K/128)])
    int8         data int8 [N, K], scale fp32 [N, 1]                 (act: int8, [M, 1])
    int4-g128    data uint8 [N, ceil(K/2)] (low nibble = even k), scale fp32 and zero uint8
                 [N, ceil(K/128)], w = (q - zero) * scale           (weight-only)
    mxfp4        data uint8 [N, ceil(K/2)] e2m1 codes, scale uint8 e8m0 [N, ceil(K/32)] (weight-only)
Scales are stored physically as their `ScaleLayout` declares (col-major = `s.t().contiguous().t()`,
shuffled = rows permuted by `shuffle_scales`); `logical_scales` undoes the declaration.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from server_shim.catalog import FP8_SCHEMES, SCHEMES, WEIGHT_ONLY_SCHEMES  # noqa: F401 - the one catalog
from server_shim.errors import QuantConfigError

E4M3FN_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max: 1.75 * 2**8
E4M3FNUZ_MAX = 240.0  # torch.finfo(torch.float8_e4m3fnuz).max: bias 8, no inf, 0x80 is the only NaN
INT8_MAX = 127.0  # symmetric: -128 unused so that q and -q are both representable
INT4_MAX = 15.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX v1.0, FP4 E2M1 magnitudes
E2M1_EMAX = 2  # floor(log2(6)): the MX scale is 2**(floor(log2(amax)) - emax)
E8M0_BIAS = 127
E8M0_NAN = 255
FP8_BLOCK = 128  # DeepSeek-V3: 1x128 activation groups, 128x128 weight blocks
INT4_GROUP = 128
MX_GROUP = 32
SHUFFLE_TILE = 4  # shuffled scales: 4x4 transposition of row indices in tiles of 16 rows
_TINY = 1e-12  # amax floor: an all-zero row must not divide by zero


def fp8_max(dtype: torch.dtype) -> float:
    if dtype == torch.float8_e4m3fnuz:
        return E4M3FNUZ_MAX
    if dtype == torch.float8_e4m3fn:
        return E4M3FN_MAX
    raise QuantConfigError(f"not an fp8 dtype: {dtype}")


@dataclass(frozen=True)
class ScaleLayout:
    """The declared physical layout of a scale tensor; every consumer reads it from here."""

    order: str = "row-major"  # "row-major" | "col-major"
    shuffled: bool = False

    def __post_init__(self) -> None:
        if self.order not in ("row-major", "col-major"):
            raise QuantConfigError(f"scale order must be row-major or col-major, got {self.order!r}")

    def to_dict(self) -> dict[str, object]:
        return {"order": self.order, "shuffled": self.shuffled}


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [N, K] weight: data, scales stored as `layout` declares, optional zero points."""

    scheme: str
    data: Tensor
    scales: Tensor
    zeros: Tensor | None
    shape: tuple[int, int]  # logical [N, K] of the original weight
    layout: ScaleLayout
    fp8_dtype: torch.dtype | None = None


# ---------------------------------------------------------------- small codecs


def e8m0_decode(code: Tensor) -> Tensor:
    """uint8 e8m0 -> fp32 2**(e - 127); 255 is NaN (OCP MX v1.0, section 5.4)."""
    e = code.to(torch.int32)
    out = torch.exp2((e - E8M0_BIAS).to(torch.float32))
    return torch.where(e == E8M0_NAN, torch.full_like(out, float("nan")), out)


def e8m0_encode(scale: Tensor) -> Tensor:
    """fp32 power-of-two scale -> uint8 e8m0 code (floor of log2, clamped to the finite range)."""
    e = torch.floor(torch.log2(scale.float().clamp_min(2.0**-127))) + E8M0_BIAS
    return e.clamp(0, 254).to(torch.uint8)


def round_scale_pow2_up(scale: Tensor) -> Tensor:
    """UE8M0 scale: round up to the next power of two (what DeepGEMM's ue8m0 path does)."""
    return torch.exp2(torch.ceil(torch.log2(scale.clamp_min(_TINY))))


@functools.cache
def _e2m1_grid(device: torch.device) -> Tensor:
    """The grid on `device`, built once: a host-to-device copy per call would synchronise, which a
    CUDA-graph capture of the decode step forbids."""
    return torch.tensor(E2M1_GRID, dtype=torch.float32, device=device)


def e2m1_decode(codes: Tensor) -> Tensor:
    grid = _e2m1_grid(codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def e2m1_encode(v: Tensor) -> Tensor:
    """fp32 -> 4-bit codes, round to nearest, ties to even code, saturating at +-6."""
    grid = _e2m1_grid(v.device)
    mids = (grid[1:] + grid[:-1]) / 2
    a = v.abs().clamp(max=E2M1_GRID[-1])
    idx = torch.bucketize(a, mids)  # a == mids[i] -> i (the lower neighbour)
    tie = (idx < len(mids)) & (a == mids[idx.clamp(max=len(mids) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)
    sign = ((v < 0) & (idx > 0)).to(torch.int64) << 3
    return (idx | sign).to(torch.uint8)


def pack_nibbles(q: Tensor) -> Tensor:
    """[N, K] values 0..15 -> uint8 [N, ceil(K/2)], low nibble = even k (kernel contract)."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: Tensor, k: int) -> Tensor:
    lo, hi = p & 0x0F, p >> 4
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)[:, :k]


def normalize_e4m3fn_to_e4m3fnuz(weight: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Reinterpret e4m3fn bits as e4m3fnuz (exponent bias 8 instead of 7: every value halves), so
    the scale doubles. 0x80 is -0 in e4m3fn but NaN in fnuz: it becomes +0 (as vLLM does)."""
    bits = weight.view(torch.uint8).clone()
    bits[bits == 0x80] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


# ---------------------------------------------------------------- scale layouts


def shuffle_perm(rows: int, device: torch.device | str = "cpu") -> Tensor:
    """Permutation p with shuffled[i] = logical[p[i]]: full tiles of 16 rows have their row index
    transposed as a 4x4 grid (i = 4a + b <- 4b + a); the tail (< 16 rows) is reversed.
    Both parts are involutions, but unshuffle uses the inverse permutation anyway."""
    t = SHUFFLE_TILE * SHUFFLE_TILE
    full = rows - rows % t
    i = torch.arange(full)
    base, r = i - i % t, i % t
    head = base + (r % SHUFFLE_TILE) * SHUFFLE_TILE + r // SHUFFLE_TILE
    tail = torch.arange(rows - 1, full - 1, -1)
    return torch.cat([head, tail]).to(device)


def shuffle_scales(s: Tensor) -> Tensor:
    return s.index_select(0, shuffle_perm(s.shape[0], s.device))


def unshuffle_scales(s: Tensor) -> Tensor:
    return s.index_select(0, torch.argsort(shuffle_perm(s.shape[0], s.device)))


def store_scales(logical: Tensor, layout: ScaleLayout) -> Tensor:
    """Logical [R, C] scales -> the physical tensor the layout declares."""
    s = shuffle_scales(logical) if layout.shuffled else logical.contiguous()
    return s.t().contiguous().t() if layout.order == "col-major" else s


def logical_scales(qw: QuantizedWeight) -> Tensor:
    """Undo the declared layout. col-major needs nothing: strides already say it."""
    return unshuffle_scales(qw.scales) if qw.layout.shuffled else qw.scales


# ---------------------------------------------------------------- weights


def _pad_to(t: Tensor, rows: int, cols: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _group_amax(w: Tensor, gr: int, gc: int) -> Tensor:
    """amax over [gr x gc] tiles of [R, C], partial tiles at the edges -> [ceil(R/gr), ceil(C/gc)]."""
    r, c = w.shape
    rp, cp = math.ceil(r / gr) * gr, math.ceil(c / gc) * gc
    a = _pad_to(w.abs(), rp, cp).reshape(rp // gr, gr, cp // gc, gc)
    return a.amax(dim=(1, 3))


def _expand(s: Tensor, gr: int, gc: int, r: int, c: int) -> Tensor:
    return s.repeat_interleave(gr, 0)[:r].repeat_interleave(gc, 1)[:, :c]


def _to_fp8(v: Tensor, dtype: torch.dtype) -> Tensor:
    m = fp8_max(dtype)
    q = v.clamp(-m, m).to(dtype)
    bits = q.view(torch.uint8)
    # -0 (0x80) is canonicalised to +0: it is NaN once reinterpreted as fnuz, and a stored -0 would
    # turn the fnuz-unnormalized bug class into an all-NaN model instead of its x0.5 signature.
    return torch.where(bits == 0x80, torch.zeros_like(bits), bits).view(dtype)


def quantize_weight(
    w: Tensor, scheme: str, *, fp8_dtype: torch.dtype = torch.float8_e4m3fn, layout: ScaleLayout | None = None
) -> QuantizedWeight:
    """Quantize an [N, K] weight (any float dtype) with fp32 math."""
    layout = layout or ScaleLayout()
    w = w.detach().float()
    n, k = w.shape
    zeros = None
    if scheme in FP8_SCHEMES:
        m = fp8_max(fp8_dtype)
        if scheme == "fp8-tensor":
            s = (w.abs().amax().clamp_min(_TINY) / m).reshape(1, 1)
            se = s
        elif scheme == "fp8-token":
            s = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / m
            se = s
        else:
            s = _group_amax(w, FP8_BLOCK, FP8_BLOCK).clamp_min(_TINY) / m
            se = _expand(s, FP8_BLOCK, FP8_BLOCK, n, k)
        data = _to_fp8(w / se, fp8_dtype)
    elif scheme == "int8":
        s = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / INT8_MAX
        data = torch.round(w / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif scheme == "int4-g128":
        # Asymmetric with 0 inside the range (GPTQ convention), so that zero weights stay exact.
        g = math.ceil(k / INT4_GROUP)
        kp = g * INT4_GROUP
        wp = _pad_to(w, n, kp).reshape(n, g, INT4_GROUP)
        lo = torch.minimum(wp.amin(-1), torch.zeros(()))
        hi = torch.maximum(wp.amax(-1), torch.zeros(()))
        s = ((hi - lo) / INT4_MAX).clamp_min(_TINY)
        z = torch.round(-lo / s).clamp(0, INT4_MAX)
        q = (torch.round(wp / s[..., None]) + z[..., None]).clamp(0, INT4_MAX)
        data = pack_nibbles(q.reshape(n, kp)[:, :k])
        zeros = z.to(torch.uint8)
    elif scheme == "mxfp4":
        amax = _group_amax(w, 1, MX_GROUP)
        e = torch.floor(torch.log2(amax.clamp_min(2.0**-127))) - E2M1_EMAX
        s = e8m0_encode(torch.exp2(e))
        codes = e2m1_encode(w / _expand(e8m0_decode(s), 1, MX_GROUP, n, k))
        data = pack_nibbles(codes)
    else:
        raise QuantConfigError(f"unknown scheme {scheme!r}; valid: {', '.join(SCHEMES[1:])}")
    fp8 = fp8_dtype if scheme in FP8_SCHEMES else None
    return QuantizedWeight(scheme, data, store_scales(s, layout), zeros, (n, k), layout, fp8)


def dequantize_parts(
    scheme: str, data: Tensor, scales: Tensor, zeros: Tensor | None, shape: tuple[int, int]
) -> Tensor:
    """Dequantize from *logical* scales (any strides) -> fp32 [N, K]."""
    n, k = shape
    if scheme in FP8_SCHEMES or scheme == "int8":
        d = data.float()
        if scheme == "fp8-block":
            return d * _expand(scales.float(), FP8_BLOCK, FP8_BLOCK, n, k)
        return d * scales.float()
    if scheme == "int4-g128":
        q = unpack_nibbles(data, k).float()
        return (q - _expand(zeros.float(), 1, INT4_GROUP, n, k)) * _expand(
            scales.float(), 1, INT4_GROUP, n, k
        )
    if scheme == "mxfp4":
        v = e2m1_decode(unpack_nibbles(data, k))
        return v * _expand(e8m0_decode(scales), 1, MX_GROUP, n, k)
    raise QuantConfigError(f"unknown scheme {scheme!r}")


def dequantize(qw: QuantizedWeight) -> Tensor:
    """fp32 [N, K], reading the scales as their layout declares."""
    return dequantize_parts(qw.scheme, qw.data, logical_scales(qw), qw.zeros, qw.shape)


# ---------------------------------------------------------------- activations


def quantize_act(
    x: Tensor, scheme: str, *, fp8_dtype: torch.dtype = torch.float8_e4m3fn, pow2_scales: bool = False
) -> tuple[Tensor, Tensor]:
    """Dynamic activation quantization of [M, K] -> (q, scale fp32). fp8-tensor: scale [1, 1];
    fp8-token / int8: [M, 1]; fp8-block: [M, ceil(K/128)]. `pow2_scales` rounds every scale up to a
    power of two before quantizing (UE8M0 scales)."""
    xf = x.float()
    m, k = xf.shape
    # A tensor, not a Python float: on CUDA `t / 448.0` becomes `t * (1/448)`, which rounds
    # differently from the kernels' correctly rounded division (measured: 67% of per-token scales
    # differed at K=4096 on an H100), and the golden must match a correct kernel bit for bit.
    # torch.full, not torch.tensor: a fill kernel, no host-to-device copy (capturable in a CUDA graph).
    qmax = torch.full(
        (), INT8_MAX if scheme == "int8" else fp8_max(fp8_dtype), dtype=torch.float32, device=xf.device
    )
    if scheme == "fp8-tensor":
        s = (xf.abs().amax().clamp_min(_TINY) / qmax).reshape(1, 1)
    elif scheme in ("fp8-token", "int8"):
        s = xf.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / qmax
    elif scheme == "fp8-block":
        s = _group_amax(xf, 1, FP8_BLOCK).clamp_min(_TINY) / qmax
    else:
        raise QuantConfigError(f"scheme {scheme!r} does not quantize activations")
    if pow2_scales:
        s = round_scale_pow2_up(s)
    se = _expand(s, 1, FP8_BLOCK, m, k) if scheme == "fp8-block" else s
    if scheme == "int8":
        return torch.round(xf / se).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s
    return _to_fp8(xf / se, fp8_dtype), s


def dequantize_act(q: Tensor, s: Tensor, scheme: str) -> Tensor:
    if scheme == "fp8-block":
        return q.float() * _expand(s.float(), 1, FP8_BLOCK, q.shape[0], q.shape[1])
    return q.float() * s.float()


def int8_matmul_exact(xq: Tensor, xs: Tensor, wq: Tensor, ws: Tensor) -> Tensor:
    """w8a8 as the integer GEMM computes it: the int32 dot products exactly (fp64 holds them),
    then both scales. An fp32 matmul of the dequantized operands rounds every partial sum, and
    under per-token int8 activations that 1e-7 noise flips later rounding decisions: on
    smollm2 it cost 7.5% top-1 between two otherwise identical models."""
    acc = xq.double() @ wq.double().t()  # [M, N], |acc| <= 127 * 127 * K: exact below 2**53
    return (acc * xs.double() * ws.double().reshape(1, -1)).float()


def reference_linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """The golden: quantize activations per scheme, dequantize both, fp32 matmul. x: [..., K]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if qw.scheme in WEIGHT_ONLY_SCHEMES:
        out = x2.float() @ dequantize(qw).t()
    elif qw.scheme == "int8":
        q, s = quantize_act(x2, "int8")
        out = int8_matmul_exact(q, s, qw.data, logical_scales(qw))
    else:
        q, s = quantize_act(x2, qw.scheme, fp8_dtype=qw.fp8_dtype or torch.float8_e4m3fn)
        out = dequantize_act(q, s, qw.scheme) @ dequantize(qw).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, qw.shape[0])
