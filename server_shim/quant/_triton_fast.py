"""The fast Triton kernel bodies (the default path), as plain functions in four modules that import no triton:

    _fast_common.py   split-K partials, 4-bit decoders, the GEMVs' store (used by more than one family)
    _fast_mm8.py      8-bit tiles (pointer, "lag", "tma", "tmap"), split-K second pass, 8-bit GEMV
    _fast_w4.py       4-bit tiles (bytes, int32 words with inline-PTX planes, dequantize-then-GEMM)
    _fast_gemv4.py    4-bit GEMVs (M = 1)

kernels._build() calls `bind` (below): it sets `tl`, the constexpr switches and the helpers shared
with _triton_kernels.py (the legacy bodies, still selectable with DIFFTEST_TRITON_KERNELS=legacy) in
every one of them, and replaces each helper by one jitted function wherever a module names it
(a jitted body resolves its callees through its own module's globals at compile time).
Every kernel takes its tile sizes as constexprs from quant/tuning.py, which picks one config per
(kernel, M bucket, N, K, variant) by timing a short list once and caching the choice.

What makes them faster than the legacy bodies (numbers: bench/gemm.py on an H200):
- Split-K (`K_PER`, program_id(1)): small-M shapes get enough programs to keep HBM busy. The
  reduction is a second, deterministic pass (`_splitk_reduce_kernel` sums the partials in split
  order), never atomics: the same input gives the same bits on every run.
- Block-scaled fp8 (DeepSeek-V3): one K tile lies inside one 128-group, so its fp32 partial is
  scaled once (`acc += dot * s`); the weight-block scale is a scalar per tile when BLOCK_N divides
  128, and activation scales are written M-contiguous by the quantization kernel (coalesced).
- M = 1 (`_gemv8_kernel`, `_gemv4_kernel`): no tl.dot, whose 16-row tile wastes 15/16 of its
  work and whose tile shapes leave too few programs; each program reads 4..32 weight rows as wide
  K-contiguous vectors (the next tile prefetched) and multiply-accumulates elementwise on the CUDA
  cores, fp32 (int32 for int8), reducing along K once at the end.
- 4-bit weights: whole [BLOCK_N, BLOCK_K/2] byte tiles are unpacked with shifts and masks; a tile
  spanning several scale groups loads each group's scale once and broadcasts it; the
  low nibbles (even k) and high nibbles (odd k) feed two dots against the even and odd columns of
  x, so no interleave is needed in the hot loop; `_wonly_fused_kernel` (w4a16) interleaves them
  back in registers for one dot against K-contiguous x. For large M, `_wonly_dequant_kernel` expands
  the weight once to x's dtype (`tl.interleave` keeps the stores contiguous) and `_mm16_kernel`
  (or torch.mm, the "deqb" path: cuBLAS is faster than a Triton 16-bit GEMM) runs the GEMM on it.
- 4-bit GEMV is bound by unpacking instructions, not HBM: `_gemv4g_kernel` shapes its tiles as
  whole scale groups (scales broadcast in registers, no reshape), `_gemv4w_kernel` reads int32
  words of 8 nibbles (a shift and a mask per nibble), and mxfp4 codes decode through fp16 bits
  (`_e2m1_to_f32_h`: no fp32 bit assembly, exact). `_gemv4x_kernel` reads x once per K step as
  whole words' 8 k (16-byte loads, prefetched) and splits the nibble planes in registers;
  `_gemv4r_kernel` takes one weight row per program so that the words and x's planes share one
  register layout (no shared memory at all).
- 4-bit at 1 < M <= 256 on int32 words (`_wonly_words_kernel`): the 8 planes of a word are joined
  back into K order so that a thread holds 8 consecutive k, which is the MMA operand's own layout
  (the unpacked tile never passes through shared memory). int4 puts the exact integers q - z in the
  dot and multiplies the step's fp32 partial by the row scale (the tile lies inside one group);
  on an NVIDIA GPU inline PTX builds two of them per byte permute + lop3 + packed fma (`planes_ptx`),
  and mxfp4's scaled values come from byte-permute table lookups (`mx_planes_ptx`): 269 / 396
  SASS instructions per 16x64x128 step against 425 / 711 in plain Triton.
- fp8 "lag" tiles (`_mm8_kernel` LAG): the promoted partial of each K step is added one step late,
  so the adds run beside the next step's MMAs instead of between them.
- "tma" tiles (`_mm8_tma_kernel`, Hopper): the 8-bit operands are read through tensor descriptors,
  so the copy engine fills shared memory and the warps only run MMAs and scaling (6-10% at M >= 1024);
  "tmap" (`_mm8_tmap_kernel`) runs them as a persistent grid whose tiles leave by descriptor store.
- Self-reducing split-K (`_split_finish`, the 4-bit tiles' SPLIT_FIN): the split that arrives last
  on its tile's counter sums all partials in split order, so no second kernel is launched.
- One-token activation quantization inside the 8-bit GEMV (`_gemv8_kernel` QUANT_A): int8 per
  token and fp8 per 1 x 128 block, bit for bit the act-quant kernel's, one launch per linear.
Numerics are those of the legacy bodies: fp32 accumulation (int32 for int8), fp8 products
promoted to fp32 every BLOCK_K (FAST_ACC off), 4-bit weights dequantized in fp32 and rounded once
to x's dtype -- except "gemvf" and int4's word tiles, which multiply the exact weight (its scale
applied in fp32 to a sum) as the torch backend does (mxfp4's weights are exact in x's dtype anyway);
see _triton_kernels.py's docstring for the interpreter workarounds they share.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from server_shim.quant import _fast_common, _fast_gemv4, _fast_mm8, _fast_w4
from server_shim.quant._fast_gemv4 import F16_PAIR_PTX
from server_shim.quant._fast_w4 import mx_planes_ptx, planes_ptx

__all__ = ["F16_PAIR_PTX", "KERNELS", "MODULES", "SHARED", "bind", "mx_planes_ptx", "planes_ptx"]

MODULES: tuple[ModuleType, ...] = (_fast_common, _fast_mm8, _fast_w4, _fast_gemv4)
# the legacy module's helpers that the fast bodies call too: decorated once, set in every module here
SHARED = (
    "_cast_out",
    "_epilogue",
    "_scale_out",
    "_tile_ids",
    "_tile_of",
    "_fp8_bits_to_f16",
    "_round_to_fp8_grid",
)
KERNELS: dict[str, ModuleType] = {name: mod for mod in MODULES for name in mod.KERNELS}
# the plain bodies, taken before any bind (which replaces the helpers in place): a second build
# (tests rebuild with other switches) decorates these again, never a jitted function
_PLAIN_HELPERS = {name: getattr(mod, name) for mod in MODULES for name in mod.HELPERS}
_PLAIN_KERNELS = {name: getattr(mod, name) for name, mod in KERNELS.items()}


def bind(language: Any, jit: Callable[[Any], Any], values: dict[str, Any]) -> dict[str, Any]:
    """Set `tl` (= language) and `values` (the shared helpers, already jitted, and the constexpr
    switches) in every module that names them, replace each plain helper by its jitted self the
    same way (one decoration per helper), and return the jitted kernels by name."""
    helpers = {name: jit(fn) for name, fn in _PLAIN_HELPERS.items()}
    for mod in MODULES:
        for name, value in {"tl": language, **values, **helpers}.items():
            if hasattr(mod, name):
                setattr(mod, name, value)
    return {name: jit(fn) for name, fn in _PLAIN_KERNELS.items()}
