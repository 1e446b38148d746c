"""Triton kernels of the fused decode path (fused_decode.py): decode attention over the slot cache,
LlamaRMSNorm's forward in one kernel, and rotate-half rotary embedding of q and k in one kernel.

`decode_attention`: one query token per row, attending to positions 0..pos[row] of that row's keys
and values (a row's length comes from its position; no mask tensor is read). GQA without
`repeat_kv`: query head h reads key/value head h // group through the strides. Softmax is online
(running max and sum, one pass over the keys in blocks), every product and sum in float32; the
output is cast once, to the output tensor's dtype. One program per (row, query head): no second
reduction kernel, so a decode layer costs one launch here, not the mask / expand / SDPA chain.

Why the products are elementwise and summed (not `tl.dot`): one query row would waste a 16-row
MMA tile, and float32 sums keep the kernel's rounding independent of the tensor-core path (and
right in the interpreter, whose bf16 `tl.dot` is wrong; see quant/_triton_kernels.py).

Triton is imported lazily, as in quant/kernels.py: `triton.jit` fixes at decoration time whether
a kernel is compiled or interpreted (TRITON_INTERPRET=1), so the body below is a plain function
that `_build()` decorates on first use, once per mode.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from server_shim.quant.arch import triton_interpreting

__all__ = [
    "decode_attention",
    "reference_decode_attention",
    "reference_rotary",
    "rms_norm",
    "rotary",
]

tl: Any = None  # bound to triton.language by _build(); the kernel body resolves it at compile time

_lock = threading.Lock()
_built: dict[bool, SimpleNamespace] = {}


def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr,
    sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, sod, spos,
    kv_len, scale,
    GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    p = tl.load(pos_ptr + row * spos).to(tl.int32)
    length = tl.minimum(p + 1, kv_len)  # positions 0..pos, as the engine's mask (kv_cache.attention_mask)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + row * sqb + head * sqh + dk * sqd, mask=dk < D_QK, other=0.0).to(tl.float32)
    k_base = k_ptr + row * skb + kvh * skh
    v_base = v_ptr + row * svb + kvh * svh
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    m_i = tl.sum(acc, axis=0) - float("inf")  # a float32 scalar: the running max
    l_i = tl.sum(acc, axis=0)  # the running sum of exp(score - max)
    for start in range(0, length, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < length
        k = tl.load(
            k_base + n[:, None] * skn + dk[None, :] * skd,
            mask=valid[:, None] & (dk[None, :] < D_QK),
            other=0.0,
        ).to(tl.float32)
        v = tl.load(  # issued before the scores need k: both loads in flight together
            v_base + n[:, None] * svn + dv[None, :] * svd,
            mask=valid[:, None] & (dv[None, :] < D_V),
            other=0.0,
        ).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: every block holds one valid key
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf)
        w = tl.exp(s - m_new)  # 0 where invalid
        l_i = l_i * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(o_ptr + row * sob + head * soh + dv * sod, out.to(o_ptr.dtype.element_ty), mask=dv < D_V)


def _rmsnorm_kernel(x_ptr, w_ptr, o_ptr, sx, so, N, eps, BLOCK: tl.constexpr):
    """LlamaRMSNorm's forward for one row: float32 x, mean of squares, rsqrt(var + eps), cast back
    to the input dtype, then weight times that (both in the input dtype: a float32 product rounded once)."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(x_ptr + row * sx + c, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    y = (x * tl.rsqrt(var + eps)).to(o_ptr.dtype.element_ty)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * so + c, (w * y.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=m)


def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, sob, soh, sot, sod, spb, sph, spt, spd,
    scb, sct, scd, ssb, sst, ssd,
    T, HQ, HK,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """HF's apply_rotary_pos_emb (unsqueeze_dim=1) for one token (b, t) and BLOCK_H heads of q and
    k together: heads 0..HQ-1 are q's, HQ..HQ+HK-1 k's (masked loads and stores pick the tensor,
    no branch). out = x * cos + rotate_half(x) * sin, i.e. out[:h] = x1*c1 - x2*s1 and
    out[h:] = x2*c2 + x1*s2 with x1, x2 the halves, in float32, cast once."""
    r = tl.program_id(0)
    b = r // T
    t = r % T
    hv = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_HALF)
    cm = c < HALF
    is_q = hv < HQ
    is_k = (hv >= HQ) & (hv < HQ + HK)
    qh = tl.minimum(hv, HQ - 1)
    kh = tl.maximum(hv - HQ, 0)
    mq = is_q[:, None] & cm[None, :]
    mk = is_k[:, None] & cm[None, :]
    c1 = tl.load(cos_ptr + b * scb + t * sct + c * scd, mask=cm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + b * scb + t * sct + (c + HALF) * scd, mask=cm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + b * ssb + t * sst + c * ssd, mask=cm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + b * ssb + t * sst + (c + HALF) * ssd, mask=cm, other=0.0).to(tl.float32)[None, :]
    q_at = q_ptr + b * sqb + t * sqt + qh[:, None] * sqh
    k_at = k_ptr + b * skb + t * skt + kh[:, None] * skh
    # a head is q's or k's: one of each pair of loads is masked off (reads nothing, gives 0)
    x1 = tl.load(q_at + c[None, :] * sqd, mask=mq, other=0.0).to(tl.float32) + tl.load(
        k_at + c[None, :] * skd, mask=mk, other=0.0
    ).to(tl.float32)
    x2 = tl.load(q_at + (c[None, :] + HALF) * sqd, mask=mq, other=0.0).to(tl.float32) + tl.load(
        k_at + (c[None, :] + HALF) * skd, mask=mk, other=0.0
    ).to(tl.float32)
    o1 = (x1 * c1 - x2 * s1).to(qo_ptr.dtype.element_ty)
    o2 = (x2 * c2 + x1 * s2).to(qo_ptr.dtype.element_ty)
    qo_at = qo_ptr + b * sob + t * sot + qh[:, None] * soh
    ko_at = ko_ptr + b * spb + t * spt + kh[:, None] * sph
    tl.store(qo_at + c[None, :] * sod, o1, mask=mq)
    tl.store(qo_at + (c[None, :] + HALF) * sod, o2, mask=mq)
    tl.store(ko_at + c[None, :] * spd, o1, mask=mk)
    tl.store(ko_at + (c[None, :] + HALF) * spd, o2, mask=mk)


def _build() -> SimpleNamespace:
    """Decorate the kernel for this process's mode (compiled, or interpreted on CPU tensors)."""
    global tl
    interp = triton_interpreting()
    with _lock:
        if interp in _built:
            return _built[interp]
        if interp:  # triton.language's helpers must be the interpreter's (quant/linear.py says why)
            from server_shim.quant.linear import _reinterpret_triton_language

            _reinterpret_triton_language()
        import triton
        import triton.language as language

        tl = language
        _built[interp] = SimpleNamespace(
            attn=triton.jit(_decode_attn_kernel),
            rmsnorm=triton.jit(_rmsnorm_kernel),
            rotary=triton.jit(_rotary_kernel),
            interp=interp,
        )
        return _built[interp]


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float) -> Tensor:
    """q [B, Hq, 1, Dqk]; k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv] (any strides: the cache's views);
    pos [B] integer (any stride): row b attends positions 0..min(pos[b], S - 1). Returns
    [B, 1, Hq, Dv] in q's dtype, the layout HF attention functions return."""
    b, hq, t, dqk = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
    if t != 1 or k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != dqk or hq % hkv:
        raise ValueError(f"decode_attention: shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if pos.shape[0] < b:
        raise ValueError(f"decode_attention: {pos.shape[0]} positions for {b} rows")
    out = torch.empty((b, 1, hq, dv), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    kern = _build()
    bdk, bdv = _pow2(max(dqk, 16)), _pow2(max(dv, 16))
    block_n = max(16, min(64, 4096 // max(bdk, bdv)))  # a [BLOCK_N, D] tile of <= 4096 floats
    kern.attn[(b, hq)](
        q, k, v, out, pos,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), out.stride(0), out.stride(2), out.stride(3),
        pos.stride(0), s, float(scale),
        GROUP=hq // hkv, D_QK=dqk, D_V=dv, BLOCK_DK=bdk, BLOCK_DV=bdv, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm(x) for a contiguous x [..., H] and a weight [H] of x's dtype, in one kernel."""
    h = x.shape[-1]
    if weight.shape != (h,) or weight.dtype != x.dtype or not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError(
            f"rms_norm: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
        )
    rows = x.numel() // h if h else 0
    out = torch.empty_like(x)
    if rows == 0:
        return out
    block = _pow2(max(h, 16))
    _build().rmsnorm[(rows,)](
        x, weight, out, h, h, h, float(eps), BLOCK=block, num_warps=max(1, min(8, block // 256))
    )
    return out


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's `apply_rotary_pos_emb(q, k, cos, sin)` (rotate-half, unsqueeze_dim=1) in one launch:
    q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B or 1, T, D], all of one dtype, D even, any
    strides. Returns new (q, k) with q's and k's strides (HF's sum can come out in another layout:
    the same values; what reads them -- the cache update, the attention kernel -- takes any strides)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    dtypes = {q.dtype, k.dtype, cos.dtype, sin.dtype}
    if (
        k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d) or d % 2 or len(dtypes) != 1
        or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[0] not in (1, b) or tuple(cos.shape[1:]) != (t, d)
    ):  # fmt: skip
        raise ValueError(
            f"rotary: q {tuple(q.shape)} k {tuple(k.shape)} cos {tuple(cos.shape)} sin {tuple(sin.shape)}"
            f" dtypes {sorted(map(str, dtypes))}"
        )
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)  # a batch of 1: stride 0
    half = d // 2
    bhalf = _pow2(half)
    block_h = min(_pow2(hq + hk), max(1, 2048 // bhalf))  # a [BLOCK_H, HALF] tile of <= 2048 floats
    grid = (b * t, -(-(hq + hk) // block_h))
    _build().rotary[grid](
        q, k, qo, ko, cos, sin,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *cos.stride(), *sin.stride(),
        t, hq, hk, HALF=half, BLOCK_H=block_h, BLOCK_HALF=bhalf, num_warps=4 if block_h * bhalf >= 1024 else 1,
        enable_fp_fusion=False,  # no FMA: float32 models get HF's roundings bit for bit
    )  # fmt: skip
    return qo, ko


def reference_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """What `rotary` computes, in torch: HF's formula in float32, rounded once."""

    def rot(x: Tensor) -> Tensor:
        x, c, s = x.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1)
        h = x.shape[-1] // 2
        return (x * c + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s).to(q.dtype)

    return rot(q), rot(k)


def reference_decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float) -> Tensor:
    """What `decode_attention` computes, in torch: SDPA with the engine's boolean mask, float32."""
    b, hq = q.shape[:2]
    rep = hq // k.shape[1]
    kk = k.float().repeat_interleave(rep, dim=1)
    vv = v.float().repeat_interleave(rep, dim=1)
    seen = torch.arange(k.shape[2], device=q.device).view(1, -1) <= pos[:b].view(-1, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), kk, vv, attn_mask=seen.view(b, 1, 1, -1), scale=scale
    )
    return out.transpose(1, 2).to(q.dtype)
