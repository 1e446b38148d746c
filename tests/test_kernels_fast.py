"""The fast kernels' paths in the interpreter: every tile / split-K / GEMV / dequantize-then-GEMM
path pinned through `tuning.FORCE`, against float64 references; the deterministic split-K
reduction; the legacy switch; the tuner's choice, rejection and caches; faults inside the paths.

On a GPU the tuner picks among these paths per shape; here each is forced in turn so that all of
them run under TRITON_INTERPRET=1 at tiny shapes.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import (see tests/test_kernels.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from server_shim.errors import QuantConfigError  # noqa: E402
from server_shim.quant import formats as F  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402
from server_shim.quant import tuning  # noqa: E402
from server_shim.quant.faults import FaultSet  # noqa: E402
from server_shim.quant.linear import quant_matmul  # noqa: E402

pytest.importorskip("triton")

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)

# the paths: one fused tile program per output tile; split-K (two / three K ranges, then the
# reduction pass) with a GEMV-shaped tile; dequantize-then-GEMM (weight-only only)
TILE = tuning.Cfg("tile", 16, 64, 128, 4, 1)
SPLIT = tuning.Cfg("tile", 16, 32, 64, 4, 1, 3)
GEMV = tuning.Cfg("tile", 16, 16, 128, 4, 1, 2)
DEQ = tuning.Cfg("deq", 16, 64, 64, 4, 1)
# the dot-free M = 1 kernels (a row per program; split-K, or narrow K tiles) and the w4a16 one
DOTLESS = tuning.Cfg("gemv", 1, 64, 128, 4, 1, 2)
DOTLESS4 = tuning.Cfg("gemv", 1, 32, 64, 4, 1)
FUSED = tuning.Cfg("fused", 16, 32, 64, 4, 1, 2)
# the same on whole int32 words (nibble planes dequantized in place); its self-reducing splits
WORDS = tuning.Cfg("words", 16, 32, 64, 4, 1, 2)
WORDSK = tuning.Cfg("wordsk", 16, 32, 64, 4, 1, 3)
WORDS32 = tuning.Cfg("wordsk", 32, 32, 128, 4, 1, 2)  # the mid-M tile: 32 rows, a whole int4 group per step
# a K step per warp as one batched dot: 2 steps side by side, split in two; 4 steps (past K at K = 256)
WORDSB = tuning.Cfg("wordsb", 16, 32, 64, 2, 1, 2)
WORDSB4 = tuning.Cfg("wordsb", 16, 16, 128, 4, 1)
WORDSB32 = tuning.Cfg("wordsb", 32, 16, 64, 2, 1)  # the 17..32-row bucket's tile (x rows masked past M)
# the group-shaped 4-bit GEMV (split-K; bk below a group is rounded up to it) and dequantize + torch.mm
GEMVG = tuning.Cfg("gemvg", 1, 16, 64, 4, 1, 2)
GEMVW = tuning.Cfg("gemvw", 1, 16, 256, 4, 1, 2)
GEMVX = tuning.Cfg("gemvx", 1, 8, 256, 4, 1, 2)  # x read once per step as whole words' k, split in registers
FUSEDK = tuning.Cfg("fusedk", 16, 32, 64, 4, 1, 3)  # splits that reduce themselves on counters
TILEK = tuning.Cfg("tilek", 16, 64, 64, 4, 1, 2)
GEMVR = tuning.Cfg("gemvr", 1, 1, 256, 4, 1, 2)  # one weight row per program
GEMVF = tuning.Cfg("gemvf", 1, 1, 256, 4, 1, 2)  # gemvr factored: scales once per word, halves side by side
GEMVF2 = tuning.Cfg("gemvf", 1, 2, 256, 2, 1)  # two rows per program sharing the x planes
LAG = tuning.Cfg("lag", 16, 32, 128, 4, 1, 2)  # fp8 partials added one K step late
LAG_BIG_K = tuning.Cfg("lag", 16, 64, 256, 4, 1)  # BLOCK_K 256: promoted every 128 inside the step
DEQB = tuning.Cfg("deqb", 1, 32, 64, 4, 1)  # dequantization tiles 32 x 64
TMA = tuning.Cfg("tma", 16, 64, 128, 4, 1)  # 8-bit operands read through tensor descriptors
TMAP = tuning.Cfg("tmap", 16, 32, 128, 4, 1)  # the same, persistent (2 programs here), stored by descriptor
PATH_IDS = {TILE: "tile", SPLIT: "split3", GEMV: "gemv-split2", DEQ: "deq", DOTLESS: "dotless",
            DOTLESS4: "dotless4", FUSED: "fused", GEMVG: "gemvg", GEMVW: "gemvw", GEMVX: "gemvx",
            GEMVR: "gemvr-split2", GEMVF: "gemvf-split2", GEMVF2: "gemvf-2rows", DEQB: "deqb", FUSEDK: "fusedk-split3", TILEK: "tilek-split2", LAG: "lag",
            TMA: "tma", TMAP: "tmap", WORDS: "words-split2", WORDSK: "wordsk-split3",
            WORDS32: "wordsk-32rows", WORDSB: "wordsb-split2", WORDSB4: "wordsb-4steps",
            WORDSB32: "wordsb-32rows"}  # fmt: skip


def paths(*cfgs: tuning.Cfg) -> list:
    """pytest params of pinned configs, each named by PATH_IDS (else by its path)."""
    return [pytest.param(c, id=PATH_IDS.get(c, c.path)) for c in cfgs]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def expand(s: torch.Tensor, rows: int, cols: int, rb: int, cb: int) -> torch.Tensor:
    return s.double().repeat_interleave(rb, 0).repeat_interleave(cb, 1)[:rows, :cols]


def fp8_data(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 40).clamp(-200, 200).to(dtype)


def pack(q: torch.Tensor) -> torch.Tensor:
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


# ----------------------------------------------------------------------------- 8-bit operands
@pytest.mark.parametrize("cfg", paths(TILE, SPLIT, GEMV, LAG, TMA, TMAP))
@pytest.mark.parametrize("Kd", [256, 300])
def test_fp8_block_paths(force, cfg: tuning.Cfg, Kd: int) -> None:
    force(cfg)
    M, N = 3, 130
    a, b = fp8_data((M, Kd), FN, 1), fp8_data((N, Kd), FN, 2)
    g = torch.Generator().manual_seed(3)
    G = -(-Kd // 128)
    sa, sb = torch.rand(M, G, generator=g) + 0.01, torch.rand(2, G, generator=g) + 0.01
    bias = torch.randn(N, generator=g)
    out = K.fp8_gemm(
        a, sa, b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32, bias=bias
    )
    ref = (a.double() * expand(sa, M, Kd, 1, 128)) @ (
        b.double() * expand(sb, N, Kd, 128, 128)
    ).T + bias.double()
    assert rel(out, ref) < 1e-6
    # swapped strides read the transposed grid (`scale-transposed`) on every path
    sq = torch.rand(G, G, generator=g) + 0.01
    b2 = fp8_data((128 * G, Kd), FN, 4)
    out = K.fp8_gemm(a, sa, b2, sq, a_scale_mode="block", b_scale_mode="block",
                     b_scale_strides=(sq.stride(1), sq.stride(0)), out_dtype=torch.float32)  # fmt: skip
    ref = (a.double() * expand(sa, M, Kd, 1, 128)) @ (b2.double() * expand(sq.T, 128 * G, Kd, 128, 128)).T
    assert rel(out, ref) < 1e-6


@pytest.mark.parametrize(
    "cfg", paths(TILE, SPLIT, DOTLESS, tuning.Cfg("tile", 16, 32, 256, 4, 1), LAG, LAG_BIG_K, TMA)
)
@pytest.mark.parametrize("mode", ["row", "tensor"])
def test_fp8_row_tensor_paths_and_bf16_out(force, cfg: tuning.Cfg, mode: str) -> None:
    force(cfg)
    M, N, Kd = 5, 72, 200
    a, b = fp8_data((M, Kd), FNUZ, 5), fp8_data((N, Kd), FNUZ, 6)
    g = torch.Generator().manual_seed(7)
    sa = torch.rand(M, 1, generator=g) + 0.01 if mode == "row" else torch.tensor([0.02])
    sb = torch.rand(N, 1, generator=g) + 0.01 if mode == "row" else torch.tensor([0.03])
    ref = (a.double() * sa.double()) @ (b.double() * sb.double().reshape(-1, 1)).T
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode=mode, b_scale_mode=mode, out_dtype=torch.float32)
    assert rel(out, ref) < 1e-6
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode=mode, b_scale_mode=mode, out_dtype=torch.bfloat16)
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()  # one bf16 rounding


@pytest.mark.parametrize("cfg", paths(TILE, SPLIT, DOTLESS4, TMA))
@pytest.mark.parametrize(("amode", "bmode"), [("block", "row"), ("tensor", "block")])
def test_fp8_mixed_block_and_row_tensor_scales(force, cfg: tuning.Cfg, amode: str, bmode: str) -> None:
    force(cfg)
    M, N, Kd = 3, 130, 300
    a, b = fp8_data((M, Kd), FN, 20), fp8_data((N, Kd), FN, 21)
    g = torch.Generator().manual_seed(22)
    sa = torch.rand(M, 3, generator=g) + 0.01 if amode == "block" else torch.tensor([0.02])
    sb = torch.rand(2, 3, generator=g) + 0.01 if bmode == "block" else torch.rand(N, 1, generator=g) + 0.01
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode=amode, b_scale_mode=bmode, out_dtype=torch.float32)
    ea = expand(sa, M, Kd, 1, 128) if amode == "block" else sa.double()
    eb = expand(sb, N, Kd, 128, 128) if bmode == "block" else sb.double()
    assert rel(out, (a.double() * ea) @ (b.double() * eb).T) < 1e-6


@pytest.mark.parametrize("cfg", paths(SPLIT, DOTLESS))
def test_fp8_decode_path_with_split(force, monkeypatch: pytest.MonkeyPatch, cfg: tuning.Cfg) -> None:
    force(cfg)
    monkeypatch.setattr(K, "_fp8_native", lambda device, dtype: False)
    M, N, Kd = 2, 40, 256
    a, b = fp8_data((M, Kd), FNUZ, 8), fp8_data((N, Kd), FNUZ, 9)
    sa, sb = torch.full((M, 2), 0.01), torch.tensor([[0.02, 0.03]])
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)
    assert rel(out, (a.double() * 0.01) @ (b.double() * expand(sb, N, Kd, 128, 128)).T) < 1e-6


@pytest.mark.parametrize("cfg", paths(TILE, SPLIT, DOTLESS, DOTLESS4, TMA, TMAP))
def test_int8_paths_are_exact_integer_sums(force, cfg: tuning.Cfg) -> None:
    force(cfg)
    g = torch.Generator().manual_seed(10)
    M, N, Kd = 3, 72, 300
    a = torch.randint(-127, 128, (M, Kd), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, generator=g)
    sa, sb = torch.rand(M, 1, generator=g) * 1e-2, torch.rand(N, 1, generator=g) * 1e-2
    out = K.int8_gemm(a, sa, b, sb, out_dtype=torch.float32)
    acc = a.double() @ b.double().T  # int32 partials summed as int32: the same integers
    assert torch.equal(out, (acc.float() * sa * sb.T))


@pytest.mark.parametrize("cfg", paths(SPLIT, DOTLESS))
def test_split_k_is_deterministic(force, cfg: tuning.Cfg) -> None:
    force(cfg)
    a, b = fp8_data((4, 384), FN, 11), fp8_data((64, 384), FN, 12)
    sa, sb = torch.rand(4, 3) + 0.01, torch.rand(1, 3) + 0.01
    runs = [K.fp8_gemm(a, sa, b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0], runs[1])


# ----------------------------------------------------------------------------- 4-bit weights
# every path of the 4-bit GEMM, pinned (the int4 and mxfp4 tests run each)
FOUR_BIT_PATHS = [
    TILE,
    SPLIT,
    GEMV,
    DEQ,
    DOTLESS,
    DOTLESS4,
    FUSED,
    WORDS,
    WORDSK,
    WORDS32,
    WORDSB,
    WORDSB4,
    WORDSB32,
    GEMVG,
    GEMVW,
    GEMVX,
    GEMVR,
    GEMVF,
    GEMVF2,
    DEQB,
    FUSEDK,
    TILEK,
]


def _int4_ref(x, q, scales, zeros, N, Kd):
    return x.double() @ ((q.double() - expand(zeros, N, Kd, 1, 128)) * expand(scales, N, Kd, 1, 128)).T


@pytest.mark.parametrize("cfg", paths(*FOUR_BIT_PATHS))
@pytest.mark.parametrize("Kd", [256, 201])
def test_int4_paths(force, cfg: tuning.Cfg, Kd: int) -> None:
    force(cfg)
    g = torch.Generator().manual_seed(13)
    M, N, G = 3, 72, -(-Kd // 128)
    x = torch.randn(M, Kd, generator=g)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    scales = torch.rand(N, G, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=g)
    bias = torch.randn(N, generator=g)
    out = K.int4_gemm(x, pack(q), scales, zeros, out_dtype=torch.float32, bias=bias)
    assert rel(out, _int4_ref(x, q, scales, zeros, N, Kd) + bias.double()) < 1e-6


@pytest.mark.parametrize("cfg", paths(GEMVW, GEMVX, GEMVR, GEMVF, GEMVF2))
def test_int4_word_gemv_ragged_k_and_fallbacks(force, cfg: tuning.Cfg) -> None:
    # K = 200: the words past K masked; K = 204 (K % 8 != 0, rows not whole words) falls back to the
    # byte kernel; group 64: four groups per 256-wide tile
    force(cfg)
    g = torch.Generator().manual_seed(31)
    for Kd, gs in ((200, 128), (204, 128), (200, 64)):
        M, N, G = 2, 24, -(-Kd // gs)
        x = torch.randn(M, Kd, generator=g)
        q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
        scales = torch.rand(N, G, generator=g) * 0.1 + 0.01
        zeros = torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=g)
        out = K.int4_gemm(x, pack(q), scales, zeros, group=gs, out_dtype=torch.float32)
        w = (q.double() - expand(zeros, N, Kd, 1, gs)) * expand(scales, N, Kd, 1, gs)
        assert rel(out, x.double() @ w.T) < 1e-6


@pytest.mark.parametrize(
    "cfg", paths(TILE, SPLIT, DEQ, DOTLESS, FUSED, GEMVG, GEMVW, GEMVX, GEMVR, DEQB, FUSEDK, TILEK)
)
def test_int4_bf16_rounds_weights_once(force, cfg: tuning.Cfg) -> None:
    force(cfg)
    g = torch.Generator().manual_seed(14)
    M, N, Kd = 2, 64, 256
    x = torch.randn(M, Kd, generator=g).to(torch.bfloat16)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    scales, zeros = torch.rand(N, 2, generator=g) * 0.1 + 0.01, torch.full((N, 2), 8, dtype=torch.uint8)
    out = K.int4_gemm(x, pack(q), scales, zeros, out_dtype=torch.float32)
    w = ((q.double() - 8) * expand(scales, N, Kd, 1, 128)).to(torch.bfloat16).double()
    assert rel(out, x.double() @ w.T) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "scheme, cfg",
    [pytest.param(s, tuning.Cfg("gemvf", 1, 1, 256, 4, 1), id=f"{s}-gemvf") for s in ("int4-g128", "mxfp4")]
    + [
        pytest.param("int4-g128", c, id=f"int4-g128-{i}")
        for c, i in PATH_IDS.items()
        if c in (WORDS, WORDSK, WORDS32, WORDSB, WORDSB4, WORDSB32)
    ],
)
def test_factored_4bit_is_the_unrounded_product(
    force, scheme: str, cfg: tuning.Cfg, dtype: torch.dtype
) -> None:
    """gemvf and int4's word tiles multiply the exact dequantized weight, as the torch backend does
    (no rounding to x's dtype first; the word tiles put the integers q - z in the dot and scale its
    fp32 partial): within fp32 summation of the float64 product, and -- for int4 in bf16, where
    rounding the weight moves the output ~1e-3 -- measurably not the rounded one. bf16 x is read
    as int32 pairs by gemvf (K = 200: the last word's pairs masked; x a column slice: 16-bit reads)."""
    force(cfg)
    g = torch.Generator().manual_seed(21)
    for Kd, sliced in ((512, False), (200, False), (200, True)):
        N = 64
        x = torch.randn(cfg.bm + 2 if cfg.bm > 1 else 1, Kd, generator=g).to(dtype)
        if sliced:  # an odd element offset: not 4-byte aligned, so no pair reads
            x = torch.randn(x.shape[0], Kd + 1, generator=g).to(dtype)[:, 1:]
        w = torch.randn(N, Kd, generator=g) * 0.02
        qw = F.quantize_weight(w, scheme)
        exact = x.double() @ F.dequantize(qw).double().T
        scales = F.logical_scales(qw)
        if scheme == "int4-g128":
            out = K.int4_gemm(x, qw.data, scales, qw.zeros, out_dtype=torch.float32)
        else:
            out = K.mxfp4_gemm(x, qw.data, scales, out_dtype=torch.float32)
        assert rel(out, exact) < 1e-6, (Kd, sliced)
        rounded = x.double() @ F.dequantize(qw).to(dtype).double().T
        if scheme == "int4-g128" and dtype == torch.bfloat16:
            assert rel(out, rounded) > 1e-4  # the case tells the two apart


@pytest.mark.parametrize("scheme", ["int4-g128", "mxfp4"])
def test_two_row_gemvf_covers_an_odd_n(force, scheme: str) -> None:
    """gemvf with two rows per program: N = 23 leaves the last program one row (its second row
    clamped, computed, not stored); every output is the float64 product, none is skipped or doubled."""
    force(GEMVF2)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    qw = F.quantize_weight(torch.randn(23, 256, generator=g) * 0.02, scheme)
    out = quant_matmul(x.float(), qw, None, "triton")
    exact = x.double() @ F.dequantize(qw).double().T
    assert out.shape == (1, 23) and rel(out, exact) < 1e-6
    assert (out.double() - exact).abs().max() < 1e-4 * exact.abs().max()  # the last row too


@pytest.mark.parametrize("cfg", paths(TILE, DEQ, DOTLESS, FUSED, GEMVG, GEMVW, GEMVX))
def test_fp16_activations_take_the_hardware_cast(force, cfg: tuning.Cfg) -> None:
    # fp16 is cast correctly by the interpreter too, so this runs the GPU's plain `.to()` rounding
    force(cfg)
    g = torch.Generator().manual_seed(19)
    M, N, Kd = 2, 64, 256
    x = torch.randn(M, Kd, generator=g).to(torch.float16)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    scales = torch.rand(N, 2, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (N, 2), dtype=torch.uint8, generator=g)
    out = K.int4_gemm(x, pack(q), scales, zeros, out_dtype=torch.float32)
    w = ((q.double() - expand(zeros, N, Kd, 1, 128)) * expand(scales, N, Kd, 1, 128)).float().half()
    assert rel(out, x.double() @ w.double().T) < 1e-6


@pytest.mark.parametrize("cfg", paths(*FOUR_BIT_PATHS))
def test_mxfp4_paths(force, cfg: tuning.Cfg) -> None:
    force(cfg)
    g = torch.Generator().manual_seed(15)
    M, N, Kd = 3, 40, 232  # 7 full groups of 32 and a partial one of 8
    x = torch.randn(M, Kd, generator=g)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    e = torch.randint(118, 136, (N, 8), dtype=torch.uint8, generator=g)
    out = K.mxfp4_gemm(x, pack(q), e, out_dtype=torch.float32)
    w = (
        E2M1[(q & 7).long()]
        * torch.where(q >= 8, -1.0, 1.0).double()
        * expand(torch.exp2(e.double() - 127), N, Kd, 1, 32)
    )
    assert rel(out, x.double() @ w.T) < 1e-6


# ----------------------------------------------------------------------------- switch + tuner
def test_legacy_switch_and_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = fp8_data((3, 256), FN, 16), fp8_data((40, 256), FN, 17)
    sa, sb = torch.rand(3, 2) + 0.01, torch.rand(1, 2) + 0.01
    args = dict(a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)
    g = torch.Generator().manual_seed(23)
    x, q = torch.randn(3, 256, generator=g), torch.randint(0, 16, (40, 256), dtype=torch.uint8, generator=g)
    s4, z4 = torch.rand(40, 2, generator=g) * 0.1 + 0.01, torch.full((40, 2), 8, dtype=torch.uint8)
    fast = K.fp8_gemm(a, sa, b, sb, **args)
    fast4 = K.int4_gemm(x, pack(q), s4, z4, out_dtype=torch.float32)
    monkeypatch.setenv("DIFFTEST_TRITON_KERNELS", "legacy")
    assert K.impl() == "legacy"
    assert rel(K.fp8_gemm(a, sa, b, sb, **args), fast) < 1e-6
    assert rel(K.int4_gemm(x, pack(q), s4, z4, out_dtype=torch.float32), fast4) < 1e-6
    monkeypatch.setenv("DIFFTEST_TRITON_KERNELS", "turbo")
    with pytest.raises(QuantConfigError, match="DIFFTEST_TRITON_KERNELS"):
        K.fp8_gemm(a, sa, b, sb, **args)


def test_buckets_configs_and_agreement() -> None:
    assert [tuning.m_bucket(m) for m in (1, 2, 16, 17, 32, 33, 100, 256, 1000, 4096, 9000)] == [
        1, 16, 16, 32, 32, 64, 256, 256, 1024, 4096, 4096]  # fmt: skip
    for fam, tables in tuning.TABLES.items():
        for kind, classes in tables.items():
            for cls, cands in classes.items():
                assert cands and all(tuning.Cfg.parse(c.name) == c for c in cands), (fam, kind, cls)
                if cls == "small":  # GEMV shapes: 16-row tiles
                    assert all(c.bm == 16 for c in cands)
    gemv = tuning.candidates("hopper", "mm8", 1, 4096, 4096)
    assert {c.path for c in gemv} == {"tile", "gemv"} and all(c.bm == 1 for c in gemv if c.path == "gemv")
    assert all(c.path != "gemv" for c in tuning.candidates("hopper", "wonly", 2, 4096, 4096))
    # a decode batch of 17..32 rows: Hopper's 4-bit list of its own (32-row "wordsb" first), elsewhere
    # and for the 8-bit kernels the mid list, as at 33..256
    mid32 = tuning.candidates("hopper", "wonly", 24, 4096, 4096)
    assert mid32[0] == tuning.Cfg("wordsb", 32, 32, 128, 4, 3) and {
        c.bm for c in mid32 if c.path == "wordsb"
    } == {32}
    assert all(c.path != "wordsb" for c in tuning.candidates("hopper", "wonly", 33, 4096, 4096))
    assert tuning.candidates("ampere", "wonly", 24, 4096, 4096) == tuning.candidates(
        "ampere", "wonly", 64, 4096, 4096
    )
    assert tuning.candidates("hopper", "mm8", 32, 4096, 4096) == tuning.candidates(
        "hopper", "mm8", 64, 4096, 4096
    )
    swz = tuning.Cfg("tile", 256, 128, 128, 8, 3, 1, 16)
    assert tuning.Cfg.parse(swz.name) == swz and swz.name.endswith(":g16")
    ref = torch.tensor([1.0, float("nan"), float("inf"), 4.0])
    assert tuning.agree(ref * (1 + 1e-4), ref)
    assert not tuning.agree(torch.tensor([1.0, float("nan"), -float("inf"), 4.0]), ref)
    assert not tuning.agree(torch.tensor([1.0, 0.0, float("inf"), 4.0]), ref)
    assert not tuning.agree(ref * 1.5, ref)


def test_tuner_picks_fastest_agreeing_config_and_caches(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cands = [tuning.Cfg("tile", 16, 32, 128, 4, 3), tuning.Cfg("tile", 16, 64, 128, 4, 3),
             tuning.Cfg("tile", 16, 64, 128, 4, 3, 4)]  # fmt: skip
    speed = {cands[0].name: 3.0, cands[1].name: 1.0, cands[2].name: 2.0}
    current: list[tuning.Cfg] = []
    good = torch.arange(8.0)

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        current.append(cfg)
        return good * 3 if cfg == cands[1] else good  # the fastest config computes garbage

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "time_graph", lambda fn, **kw: (fn(), speed[current[-1].name])[1])
    monkeypatch.setattr(tuning.Tuner, "_prefix", lambda self: "dev|tv|")
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(tuning, "REJECTED", [])
    tuner = tuning.Tuner()
    assert tuner.pick("key", lambda: cands, run, tune=True) == cands[2]
    rejected = tuning.REJECTED
    assert rejected == [{"key": "key", "config": cands[1].name, "reference": cands[0].name}]
    n = len(current)
    assert (
        tuner.pick("key", lambda: cands, run, tune=True) == cands[2] and len(current) == n
    )  # cached: no runs
    assert (
        tuning.Tuner().pick("key", lambda: cands, run, tune=True) == cands[2] and len(current) == n
    )  # from disk
    # inside a CUDA graph capture an unseen key never tunes: the first (default) config, uncached
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuner.pick("other", lambda: cands, run, tune=True) == cands[0] and len(current) == n
    assert tuner.pick("key", lambda: cands, run, tune=False) == cands[0]  # interpreter: no tuning at all


def test_precompiling_runs_each_candidate_once_untimed_and_chooses_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The warm-up's compile pass: every candidate runs once (Triton compiles it), nothing is timed,
    chosen, stored or reported as used, and the call takes the first; the tuning pass after it then
    times and stores as usual. A stored key is replayed even while precompiling (its other
    candidates are not compiled), and only the precompiling thread precompiles."""
    import threading

    cands = [tuning.Cfg("tile", 16, 32, 128, 4, 3), tuning.Cfg("tile", 16, 64, 128, 4, 3),
             tuning.Cfg("tile", 16, 64, 128, 4, 3, 4)]  # fmt: skip
    speed = {cands[0].name: 3.0, cands[2].name: 1.0}
    runs: list[tuning.Cfg] = []
    timed: list[str] = []

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        runs.append(cfg)
        if cfg == cands[1]:
            raise RuntimeError("out of resource: shared memory")  # a tile this GPU cannot hold
        return torch.arange(4.0)

    def bench(fn, **kw) -> float:  # noqa: ANN001, ANN003
        fn()
        timed.append(runs[-1].name)
        return speed[runs[-1].name]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "time_graph", bench)
    monkeypatch.setattr(tuning.Tuner, "_prefix", lambda self: "dev|tv|")
    path = tmp_path / "tune.json"
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", str(path))
    tuner = tuning.Tuner()
    with tuner.precompiling():
        assert tuner.pick("k", lambda: cands, run, tune=True) == cands[0]
        assert tuner.pick("k", lambda: cands, run, tune=True) == cands[0]  # compiled already: no runs
    assert runs == cands and timed == [] and not path.exists() and "k" not in tuner.used
    assert tuner.pick("k", lambda: cands, run, tune=True) == cands[2]  # the tuning pass
    assert set(timed) == {cands[0].name, cands[2].name} and tuner.used["k"] == cands[2].name
    assert path.exists()
    runs.clear()
    stored = tuning.Tuner()
    with stored.precompiling():
        assert stored.pick("k", lambda: cands, run, tune=True) == cands[2] and runs == []
        # another thread (a request, say) tunes as usual meanwhile
        picked: list[tuning.Cfg] = []
        other = threading.Thread(
            target=lambda: picked.append(stored.pick("k2", lambda: cands, run, tune=True))
        )
        other.start()
        other.join(30)
    assert picked == [cands[2]] and "k2" in stored.used


def test_finalists_are_the_near_ties_of_the_fastest() -> None:
    times = {"a": 10.0, "b": 10.3, "c": 10.31, "d": 9.9, "e": 20.0}
    # fastest d = 9.9; within 3%: <= 10.197 -> d, a
    assert tuning.finalists(times) == ["d", "a"]
    assert tuning.finalists(times, tie=0.05) == ["d", "a", "b"]  # <= 10.395, c at 10.31 too but most=3
    assert tuning.finalists(times, tie=0.05, most=4) == ["d", "a", "b", "c"]
    assert tuning.finalists({"x": 1.0}) == ["x"]


def test_near_ties_are_retimed_and_the_median_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first timing that puts a within 1% of b is not trusted: both are timed again, interleaved;
    b wins on the medians. A config 10% slower is not re-timed at all."""
    cands = [tuning.Cfg("tile", 16, 32, 128, 4, 3), tuning.Cfg("tile", 16, 64, 128, 4, 3),
             tuning.Cfg("tile", 16, 64, 128, 4, 4)]  # fmt: skip
    a, b, slow = (c.name for c in cands)
    draws = {a: [1.00, 1.20, 1.21, 1.19], b: [1.01, 1.00, 1.02, 0.99], slow: [1.10]}
    timed: list[str] = []
    current: list[str] = []

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        current.append(cfg.name)
        return torch.arange(4.0)

    def bench(fn, **kw) -> float:  # noqa: ANN001, ANN003
        fn()
        timed.append(current[-1])
        return draws[current[-1]].pop(0)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "time_graph", bench)
    monkeypatch.setattr(tuning.Tuner, "_prefix", lambda self: "dev|tv|")
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", "0")
    monkeypatch.setattr(tuning, "CHOSEN", {})
    assert tuning.Tuner().pick("key", lambda: cands, run, tune=True) == cands[1]
    assert timed == [a, b, slow, a, b, a, b, a, b]  # interleaved rounds of the two finalists only
    chosen = tuning.CHOSEN["key"]
    assert chosen["finalists"] == [a, b] and chosen["us"][a] == pytest.approx(1195.0)  # median of 4
    assert chosen["us"][b] == pytest.approx(1005.0) and chosen["us"][slow] == pytest.approx(1100.0)


def test_the_flush_spans_four_l2s_and_at_least_512_mib() -> None:
    mib = 1 << 20
    assert tuning.flush_bytes(50 * mib) == 512 * mib  # H100 / H200: 4 x 50 = 200 MiB, the floor wins
    assert tuning.flush_bytes(192 * mib) == 768 * mib  # a 192 MiB L2: 4 x 192


def test_a_wsp_config_run_as_tmap_keeps_the_stages_that_fit() -> None:
    """Where Gluon cannot run (int8, or off sm90) a pinned "wsp" config runs as "tmap", which also
    stages its whole output tile in shared memory. By hand, bf16 out, 227 KiB less 2 KiB:
    128 x 256: (232448 - 2048 - 65536) // 49152 = 3 stages (4 took 263 200 B on an H100);
    128 x 128: (232448 - 2048 - 32768) // 32768 = 6; fp32 out halves the 128 x 256 room: 2."""
    from server_shim.quant._fastpath import tmap_stages

    assert tmap_stages(tuning.Cfg.parse("wsp:128x256x128:w4:s4:k1"), 2) == 3
    assert tmap_stages(tuning.Cfg.parse("wsp:128x256x128:w4:s3:k1"), 2) == 3
    assert tmap_stages(tuning.Cfg.parse("wsp:128x128x128:w4:s6:k1:g16"), 2) == 6
    assert tmap_stages(tuning.Cfg.parse("wsp:128x128x128:w4:s6:k1"), 4) == 5
    assert tmap_stages(tuning.Cfg.parse("wsp:128x256x128:w4:s4:k1"), 4) == 2


def test_decode_gemms_are_timed_with_the_weights_from_hbm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to COLD_ROWS rows the tuner times with the L2 flushed (`time_cold`), above them from
    CUDA-graph replays (`_time`); CHOSEN says which."""
    cands = [tuning.Cfg("tile", 16, 32, 128, 4, 3), tuning.Cfg("tile", 16, 64, 128, 4, 3)]
    timers: list[str] = []
    monkeypatch.setattr(tuning, "time_cold", lambda fn: timers.append("cold") or (fn(), 1.0)[1])
    monkeypatch.setattr(tuning, "_time", lambda fn: timers.append("warm") or (fn(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning.Tuner, "_prefix", lambda self: "dev|tv|")
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", "0")
    monkeypatch.setattr(tuning, "CHOSEN", {})
    run = lambda cfg: torch.arange(4.0)  # noqa: E731
    for rows, timer in (
        (1, "cold"),
        (tuning.COLD_ROWS, "cold"),
        (tuning.COLD_ROWS + 1, "warm"),
        (4096, "warm"),
    ):
        timers.clear()
        tuning.Tuner().pick(f"k{rows}", lambda: cands, run, tune=True, rows=rows)
        assert timers and set(timers) == {timer}, (rows, timers)
        assert tuning.CHOSEN[f"k{rows}"]["cold"] is (timer == "cold")


def test_stored_choices_persist_by_default_and_stale_ones_are_retuned(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The disk cache: on by default under the model cache, keyed by the kernel sources' hash; a
    stored name that is not a candidate any more is retuned; "0" keeps choices in memory only."""
    import json

    cands = [tuning.Cfg("tile", 16, 32, 128, 4, 3), tuning.Cfg("tile", 16, 64, 128, 4, 3)]
    speed = {cands[0].name: 2.0, cands[1].name: 1.0}
    runs: list[tuning.Cfg] = []

    def run(cfg: tuning.Cfg) -> torch.Tensor:
        runs.append(cfg)
        return torch.arange(4.0)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "time_graph", lambda fn, **kw: (fn(), speed[runs[-1].name])[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "dev")
    monkeypatch.delenv("DIFFTEST_TRITON_TUNE_CACHE", raising=False)
    monkeypatch.setenv("DIFFTEST_CACHE_DIR", str(tmp_path / "cache"))
    assert tuning.Tuner().pick("k", lambda: cands, run, tune=True) == cands[1]
    path = tmp_path / "cache" / "triton-tune.json"
    stored = json.loads(path.read_text())
    (entry,) = stored
    assert entry.endswith(f"|{tuning.kernel_sources_hash()}|k") and stored[entry] == cands[1].name
    n = len(runs)
    assert tuning.Tuner().pick("k", lambda: cands, run, tune=True) == cands[1] and len(runs) == n  # replayed
    # other kernels' lists (the stored name is no candidate now): tuned again, the file updated
    other = [tuning.Cfg("tile", 16, 32, 128, 4, 3), tuning.Cfg("gemv", 1, 8, 512, 4, 1)]
    speed[other[1].name] = 0.5
    assert tuning.Tuner().pick("k", lambda: other, run, tune=True) == other[1] and len(runs) > n
    assert json.loads(path.read_text())[entry] == other[1].name
    # another kernel build (hash) never sees these entries
    monkeypatch.setattr(tuning, "kernel_sources_hash", lambda: "feedfacecafe")
    n = len(runs)
    assert tuning.Tuner().pick("k", lambda: other, run, tune=True) == other[1] and len(runs) > n
    # a corrupt file is ignored (warned), then rewritten
    path.write_text("{not json")
    assert tuning.Tuner().pick("k", lambda: cands, run, tune=True) == cands[1]
    assert len(json.loads(path.read_text())) == 1
    # "0": memory only, nothing read or written
    path.unlink()
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", "0")
    assert tuning.Tuner().pick("k", lambda: cands, run, tune=True) == cands[1] and not path.exists()
    # clear() forgets the stored choices too: the next pick tunes again
    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", str(path))
    tuner = tuning.Tuner()
    tuner.pick("k", lambda: cands, run, tune=True)
    tuner.clear()
    n = len(runs)
    assert tuner.pick("k", lambda: cands, run, tune=True) == cands[1] and len(runs) > n


def test_self_reducing_splits_are_deterministic_and_leave_their_counters_zero(force) -> None:
    """`_split_finish`: the last split to arrive sums every partial in split order, so repeated runs
    give the same bits as each other and the two-kernel reduction's sum; the counters end at 0."""
    from server_shim.quant import _fastpath

    g = torch.Generator().manual_seed(41)
    M, N, Kd = 5, 96, 512
    x = torch.randn(M, Kd, generator=g)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    scales = torch.rand(N, 4, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (N, 4), dtype=torch.uint8, generator=g)
    force(tuning.Cfg("fusedk", 16, 32, 64, 4, 1, 4))
    runs = [K.int4_gemm(x, pack(q), scales, zeros, out_dtype=torch.float32) for _ in range(2)]
    force(tuning.Cfg("fused", 16, 32, 64, 4, 1, 4))  # the same splits, reduced by the second kernel
    two_pass = K.int4_gemm(x, pack(q), scales, zeros, out_dtype=torch.float32)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], two_pass)
    assert rel(runs[0], _int4_ref(x, q, scales, zeros, N, Kd)) < 1e-6
    counters = _fastpath._COUNTERS["cpu"]
    assert counters.numel() >= 3 and int(counters.abs().sum()) == 0


@pytest.mark.parametrize(("amode", "bmode", "int8"), [("block", "block", False), ("row", "row", False),
                                                   ("tensor", "row", False), ("row", "row", True)])  # fmt: skip
def test_8bit_splits_sum_themselves_with_the_reduction_kernels_bits(
    force, monkeypatch, amode, bmode, int8
) -> None:
    """`_mm8_kernel` SPLIT_FIN: the splits of an 8-bit tile sum themselves (no reduction kernel
    launched), the tensor / row scales applied after the sum (block ones per K step), int8's
    partials summed as int32: the same bits as the two-kernel reduction, which still runs where the
    counters are missing (`_fastpath._counters` None: a graph capture that would grow them)."""
    from server_shim.quant import _fastpath

    force(SPLIT)
    g = torch.Generator().manual_seed(43)
    M, N, Kd = 3, 130, 300
    if int8:
        a = torch.randint(-127, 128, (M, Kd), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, generator=g)
        sa, sb = torch.rand(M, 1, generator=g) + 0.01, torch.rand(N, 1, generator=g) + 0.01

        def gemm() -> torch.Tensor:
            return K.int8_gemm(a, sa, b, sb, out_dtype=torch.float32)
    else:
        a, b = fp8_data((M, Kd), FN, 44), fp8_data((N, Kd), FN, 45)
        scale = {"block": (torch.rand(M, 3, generator=g) + 0.01, torch.rand(2, 3, generator=g) + 0.01),
                 "row": (torch.rand(M, 1, generator=g) + 0.01, torch.rand(N, 1, generator=g) + 0.01),
                 "tensor": (torch.tensor([0.02]), torch.tensor([0.03]))}  # fmt: skip
        sa, sb = scale[amode][0], scale[bmode][1]

        def gemm() -> torch.Tensor:
            return K.fp8_gemm(a, sa, b, sb, a_scale_mode=amode, b_scale_mode=bmode, out_dtype=torch.float32)

    spies = _spy_on(monkeypatch, "reduce")
    itself = gemm()
    assert spies["reduce"].launches == 0
    monkeypatch.setattr(_fastpath, "_counters", lambda device, tiles: None)
    two_kernels = gemm()
    assert spies["reduce"].launches == 1
    assert torch.equal(itself, two_kernels)
    assert int(_fastpath._COUNTERS["cpu"].abs().sum()) == 0


class _LaunchSpy:
    """Stands in for a built kernel: counts `kernel[grid](...)` launches and runs the real one."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _spy_on(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, _LaunchSpy]:
    """The built kernels `names`, each replaced by a launch-counting spy for the test."""
    built = K._build()
    spies = {name: _LaunchSpy(getattr(built, name)) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(built, name, spy)
    return spies


def test_tma_path_runs_where_descriptors_fit_and_falls_back_where_not(force, monkeypatch) -> None:
    """The "tma" config reads through tensor descriptors only when both operands' rows are 16-byte
    aligned native 8-bit; otherwise (K = 200 fp8 rows, decoded fp8 bits) it runs the pointer tile
    with the same numbers, and the tuner never lists it (no duplicate timings)."""
    from server_shim.quant import _fastpath

    if _fastpath._descriptor_type() is None:
        pytest.skip("this triton has no host tensor descriptors")
    force(TMA)
    spy = _spy_on(monkeypatch, "mm8_tma")["mm8_tma"]
    g = torch.Generator().manual_seed(31)
    for Kd, launched in ((256, 1), (200, 0)):
        a, b = fp8_data((5, Kd), FN, 32), fp8_data((40, Kd), FN, 33)
        sa, sb = torch.rand(5, 1, generator=g) + 0.01, torch.rand(40, 1, generator=g) + 0.01
        before = spy.launches
        out = K.fp8_gemm(a, sa, b, sb, a_scale_mode="row", b_scale_mode="row", out_dtype=torch.float32)
        assert spy.launches - before == launched, Kd
        assert rel(out, (a.double() * sa.double()) @ (b.double() * sb.double()).T) < 1e-6
    # views of 272-byte rows: 16 bytes in is aligned, 8 bytes in is not; 264-byte rows are not
    wide, a = fp8_data((40, 272), FN, 34), fp8_data((5, 256), FN, 35)
    assert _fastpath._tma_ok(a, wide[:, 16:], 0)
    assert not _fastpath._tma_ok(a, wide[:, 8:264], 0)
    assert not _fastpath._tma_ok(a, fp8_data((40, 264), FN, 36), 0)
    assert not _fastpath._tma_ok(a, wide[:, 16:], 1)  # decoded fp8 bits
    kept = [c.path for c in tuning.candidates("hopper", "mm8", 4096, 4096, 4096)]
    assert "tma" in kept and "tmap" in kept


@pytest.mark.parametrize("scheme", ["int4-g128", "mxfp4"])
def test_words_path_runs_where_words_fit_and_falls_back_where_not(force, monkeypatch, scheme: str) -> None:
    """ "words" reads int32 words where the packed rows are whole words and its K tile fits the
    groups (int4: inside one, mxfp4: whole ones); K = 200 (a ragged last tile, masked), 204 (not
    whole words) and a 32-wide tile for int4 (below 64: planes too narrow) run the byte kernel,
    with the same numbers either way."""
    spy = _spy_on(monkeypatch, "wonly_words")["wonly_words"]
    g = torch.Generator().manual_seed(51)
    for Kd, bk, launched in ((256, 64, 1), (200, 64, 1), (204, 64, 0), (256, 32, 0)):
        force(tuning.Cfg("words", 16, 32, bk, 4, 1, 2))
        w = torch.randn(40, Kd, generator=g) * 0.02
        x = torch.randn(3, Kd, generator=g)
        qw = F.quantize_weight(w, scheme)
        before = spy.launches
        got = quant_matmul(x, qw, None, "triton", FaultSet())
        assert spy.launches - before == launched, (Kd, bk)
        assert rel(got, x.double() @ F.dequantize(qw).double().T) < 1e-6, (Kd, bk)


@pytest.mark.parametrize("cfg", paths(WORDS, WORDS32, WORDSB4, FUSED))
def test_ragged_mxfp4_tile_reads_no_scale_past_k(force, cfg: tuning.Cfg) -> None:
    """K = 200 with 32-groups: the last K tile covers groups past the 7th that do not exist. The
    scales are a view whose next column (in memory, the next row's first group's neighbour) holds
    e8m0 255, a NaN scale: read by mistake, it would turn the masked zeros into NaN."""
    force(cfg)
    g = torch.Generator().manual_seed(53)
    N, Kd, G = 24, 200, 7
    codes = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    buf = torch.full((N, G + 2), 255, dtype=torch.uint8)
    buf[:, :G] = torch.randint(120, 134, (N, G), dtype=torch.uint8, generator=g)
    scales = buf[:, :G]
    x = torch.randn(3, Kd, generator=g)
    out = K.mxfp4_gemm(x, packed, scales, out_dtype=torch.float32)
    w = (
        E2M1[(codes & 7).long()]
        * (1 - 2 * (codes >> 3).double())
        * torch.exp2(scales.double().repeat_interleave(32, dim=1)[:, :Kd] - 127)
    )
    assert torch.isfinite(out).all()
    assert rel(out, x.double() @ w.T) < 1e-6


def test_a_config_of_unknown_path_or_shape_is_refused() -> None:
    """The dispatch runs any path it does not name as its default kernel: a config must not carry one."""
    assert tuning.Cfg.parse("wordsk:16x64x128:w4:s4:k4:g16") == tuning.Cfg("wordsk", 16, 64, 128, 4, 4, 4, 16)
    with pytest.raises(ValueError, match="unknown triton config path 'word'"):
        tuning.Cfg.parse("word:16x64x128:w4:s4:k4")
    with pytest.raises(ValueError, match="not a triton config name"):
        tuning.Cfg.parse("wordsk:16x64x128")
    every = {
        c.path for t in tuning.TABLES.values() for kind in t.values() for cs in kind.values() for c in cs
    }
    assert every <= tuning.PATHS and {c.path for cs in tuning._GEMV.values() for c in cs} <= tuning.PATHS


def test_words_configs_are_timed_only_where_they_run(monkeypatch) -> None:
    """The tuner's 4-bit list on Hopper keeps the "words" configs whose K tile the words fit
    (int4-g128: 64 and 128, mxfp4: whole 32-groups) and drops them where they would run as "fused"
    (K = 204: no int32 word view), so no config is timed twice under two names."""
    from server_shim.quant import _fastpath

    listed: dict[tuple, list[tuning.Cfg]] = {}

    def pick(key, candidates, run, *, tune, rows):  # record the list; run its default on the interpreter
        cs = candidates()
        listed[key_of] = cs
        return cs[0]

    monkeypatch.setattr(tuning.TUNER, "pick", pick)
    monkeypatch.setattr(_fastpath, "family", lambda k, device: "hopper")
    g = torch.Generator().manual_seed(52)
    for scheme in ("int4-g128", "mxfp4"):
        for Kd in (256, 204):
            key_of = (scheme, Kd)
            qw = F.quantize_weight(torch.randn(24, Kd, generator=g) * 0.02, scheme)
            quant_matmul(torch.randn(2, Kd, generator=g), qw, None, "triton", FaultSet())
    words = {k: [c for c in cs if c.path in _fastpath.WORD_PATHS] for k, cs in listed.items()}
    assert words[("int4-g128", 204)] == [] and words[("mxfp4", 204)] == []
    assert words[("int4-g128", 256)] and all(c.bk in (64, 128) for c in words[("int4-g128", 256)])
    assert any(c.bk == 256 for c in words[("mxfp4", 256)])  # whole groups: wider tiles too
    hopper = [c for c in tuning.candidates("hopper", "wonly", 16, 24, 256) if c.path in _fastpath.WORD_PATHS]
    assert len(words[("mxfp4", 256)]) == len(hopper) > len(words[("int4-g128", 256)])


@pytest.mark.parametrize(
    ("amode", "out_dtype"), [("row", torch.float32), ("block", torch.bfloat16), ("tensor", torch.float16)]
)
def test_persistent_tma_path_walks_tiles_and_stores_by_descriptor(force, monkeypatch, amode: str,
                                                                  out_dtype: torch.dtype) -> None:  # fmt: skip
    """ "tmap": 2 programs walk 3 x 5 tiles (partial ones at M = 37, N = 136) and store through a
    descriptor, bias and one rounding included; an output whose rows are not 16-byte aligned
    (N = 130: 520 / 260 bytes) is stored by the non-persistent "tma" kernel instead."""
    from server_shim.quant import _fastpath

    if _fastpath._descriptor_type() is None:
        pytest.skip("this triton has no host tensor descriptors")
    force(TMAP)
    spies = _spy_on(monkeypatch, "mm8_tma", "mm8_tmap")
    g = torch.Generator().manual_seed(41)
    for N, kernel in ((136, "mm8_tmap"), (130, "mm8_tma")):
        M, Kd = 37, 256
        a, b = fp8_data((M, Kd), FN, 42), fp8_data((N, Kd), FN, 43)
        if amode == "row":
            sa, sb = torch.rand(M, 1, generator=g) + 0.01, torch.rand(N, 1, generator=g) + 0.01
            ea, eb = sa.double(), sb.double()
        elif amode == "tensor":
            sa, sb = torch.tensor([0.02]), torch.tensor([0.03])
            ea, eb = sa.double(), sb.double()
        else:
            sa, sb = torch.rand(M, 2, generator=g) + 0.01, torch.rand(2, 2, generator=g) + 0.01
            ea, eb = expand(sa, M, Kd, 1, 128), expand(sb, N, Kd, 128, 128)
        bias = torch.randn(N, generator=g)
        before = {n: s.launches for n, s in spies.items()}
        out = K.fp8_gemm(a, sa, b, sb, a_scale_mode=amode, b_scale_mode=amode, out_dtype=out_dtype, bias=bias)
        assert {n: s.launches - before[n] for n, s in spies.items()} == {
            n: int(n == kernel) for n in spies
        }, N
        ref = (a.double() * ea) @ (b.double() * eb).T + bias.double()
        if out_dtype == torch.float32:
            assert rel(out, ref) < 1e-6
        else:  # one rounding to bf16 (8 significant bits) or fp16 (11)
            ulp = 2**-8 if out_dtype == torch.bfloat16 else 2**-11
            assert ((out.double() - ref).abs() <= ref.abs() * ulp + 1e-6).all()


# ----------------------------------------------------------------------------- faults inside the paths
@pytest.mark.parametrize(
    ("scheme", "fault"),
    [("fp8-block", "scale-transposed"), ("fp8-block", "slot-variant"), ("fp8-token", "garbage-gemm"),
     ("int4-g128", "scale-transposed"), ("mxfp4", "scale-skipped"), ("int8", "ue8m0-rounding")],
)  # fmt: skip
@pytest.mark.parametrize(
    "cfg",
    paths(
        SPLIT,
        DEQ,
        DOTLESS,
        FUSED,
        GEMVG,
        GEMVW,
        GEMVX,
        tuning.Cfg("gemvr", 1, 1, 512, 4, 1),
        tuning.Cfg("gemvf", 1, 1, 512, 4, 1),
        DEQB,
        LAG,
        FUSEDK,
        WORDS,
        TMA,
        TMAP,
    ),
)
def test_faults_reproduce_in_split_and_deq_paths(force, scheme: str, fault: str, cfg: tuning.Cfg) -> None:
    if (
        cfg.path in ("deq", "fused", "fusedk", "words", "gemvg", "gemvw", "gemvx", "gemvr", "gemvf", "deqb")
        and scheme not in F.WEIGHT_ONLY_SCHEMES
    ):
        pytest.skip(f"the {cfg.path} path is weight-only")
    if cfg.path in ("lag", "tma", "tmap") and scheme in F.WEIGHT_ONLY_SCHEMES:
        pytest.skip(f"the {cfg.path} path is the 8-bit GEMM's")
    force(cfg)
    g = torch.Generator().manual_seed(18)
    w = torch.randn(256, 384, generator=g) * 0.02 * (1 + 3 * torch.rand(256, 1, generator=g))
    x = torch.randn(4, 384, generator=g) * (1 + 5 * torch.rand(4, 1, generator=g))
    if cfg.path in ("gemvg", "gemvw", "gemvx", "gemvr", "gemvf"):
        # the M = 1 kernels: one row and fewer weight rows (the interpreter runs a program per row
        # and N block); 64 x 384 still spans 3 groups
        x, w = x[:1], w[:64]
    qw = F.quantize_weight(w, scheme)
    fs = FaultSet(**{fault.replace("-", "_"): True})
    faulty_triton, faulty_torch = (
        quant_matmul(x, qw, None, "triton", fs),
        quant_matmul(x, qw, None, "torch", fs),
    )
    golden = quant_matmul(x, qw, None, "torch")
    assert rel(faulty_triton, faulty_torch) < 1e-5  # the same bug, bit for bit up to summation order
    assert rel(faulty_triton, golden) > 1e-4  # and it is a bug


# ----------------------------------------------------------------------------- every 4-bit fault
# gemvr unsplit: the interpreter's slowest path; its splits are tested above
@pytest.mark.parametrize(
    "cfg",
    paths(
        FUSEDK,
        WORDSK,
        WORDSB,
        GEMVX,
        tuning.Cfg("gemvr", 1, 1, 256, 4, 1),
        tuning.Cfg("gemvf", 1, 1, 256, 4, 1),
    ),
)
@pytest.mark.parametrize("scheme", ["int4-g128", "mxfp4"])
def test_every_4bit_fault_reproduces_in_the_fast_kernels(force, scheme: str, cfg: tuning.Cfg) -> None:
    """Every non-MoE fault of the scheme (the 4-bit kernels' classes, scale-transposed and
    scale-skipped among them): the kernel shows the torch backend's bug, not the golden."""
    from server_shim.catalog import FAULT_SCHEMES, MOE_ONLY

    force(cfg)
    g = torch.Generator().manual_seed(44)
    w = torch.randn(32, 256, generator=g) * 0.02 * (1 + 3 * torch.rand(32, 1, generator=g))
    x = torch.randn(2, 256, generator=g) * (1 + 5 * torch.rand(2, 1, generator=g))
    x = x[:1] if cfg.bm == 1 else x  # the GEMVs serve M = 1
    faults = [f for f, schemes in FAULT_SCHEMES.items() if scheme in schemes and f not in MOE_ONLY]
    assert len(faults) >= 4
    for fault in faults:
        qw = F.quantize_weight(w, scheme, layout=F.ScaleLayout("row-major", fault == "scale-shuffle-ignored"))
        fs = FaultSet(**{fault.replace("-", "_"): True})
        faulty = quant_matmul(x, qw, None, "triton", fs)
        assert rel(faulty, quant_matmul(x, qw, None, "torch", fs)) < 1e-5, fault  # the same bug
        assert rel(faulty, quant_matmul(x, qw, None, "torch")) > 1e-4, fault  # and it is a bug


def test_removed_factored_switch_is_an_error_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFTEST_TRITON_FACTORED_4BIT", "1")
    monkeypatch.setattr(K, "_built", None)
    with pytest.raises(QuantConfigError, match="DIFFTEST_TRITON_FACTORED_4BIT is no longer supported"):
        K._build()
    monkeypatch.setenv("DIFFTEST_TRITON_FACTORED_4BIT", "0")  # off: nothing to refuse
    assert K._build().gemv4r is not None


# ----------------------------------------------------------------------------- act-quant inside the GEMV
def _dynamic(
    kind: str, x: torch.Tensor, b: torch.Tensor, bs: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    if kind == "int8":
        return K.int8_gemm_dynamic(x, b, bs, out_dtype=torch.float32, bias=bias)
    return K.fp8_block_gemm_dynamic(x, b, bs, block=64, out_dtype=torch.float32, bias=bias)


def _two_kernels(
    kind: str, x: torch.Tensor, b: torch.Tensor, bs: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    if kind == "int8":
        q, s = K.quantize_act_int8(x)
        return K.int8_gemm(q, s, b, bs, out_dtype=torch.float32, bias=bias)
    q, s = K.quantize_act_fp8(x, group=64, fp8_dtype=b.dtype)
    return K.fp8_gemm(q, s, b, bs, a_scale_mode="block", b_scale_mode="block", block=64, out_dtype=torch.float32,
                      bias=bias)  # fmt: skip


@pytest.mark.parametrize("kind", ["int8", "e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "cfg", paths(tuning.Cfg("gemv", 1, 16, 128, 4, 1), tuning.Cfg("gemv", 1, 8, 64, 4, 1, 3))
)
def test_act_quant_inside_the_gemv_is_the_two_kernels_bit_for_bit(
    force, monkeypatch, cfg: tuning.Cfg, dtype: torch.dtype, kind: str
) -> None:
    """One token: one GEMV launch, no act-quant kernel, and the very numbers of the act-quant
    kernel + the GEMM on the same config (int8 per token, split 3: the reduction reads the scale
    the GEMV wrote; fp8 per 1 x 64 block); K = 200 is ragged. Two tokens take the two kernels."""
    force(cfg)
    spies = _spy_on(monkeypatch, "gemv8", "quant")
    g = torch.Generator().manual_seed(47)
    for Kd, N in ((256, 40), (200, 24)):
        x = (torch.randn(1, Kd, generator=g) * 3).to(dtype)
        x[0, 7] = -11.5  # the amax, negative
        x[0, 64:128] = 0.0  # an all-zero group: the floor's scale
        if kind == "int8":
            b, bs = (
                torch.randint(-127, 128, (N, Kd), dtype=torch.int8, generator=g),
                torch.rand(N, 1, generator=g),
            )
        else:
            b = fp8_data((N, Kd), getattr(torch, f"float8_{kind}"), 49)
            bs = torch.rand(-(-N // 64), -(-Kd // 64), generator=g)
        bs, bias = bs + 0.01, torch.randn(N, generator=g)
        before = {n: s.launches for n, s in spies.items()}
        fused = _dynamic(kind, x, b, bs, bias)
        assert {n: s.launches - before[n] for n, s in spies.items()} == {"gemv8": 1, "quant": 0}
        assert torch.equal(fused, _two_kernels(kind, x, b, bs, bias))
        two = torch.cat([x, x * 0.5])
        before = {n: s.launches for n, s in spies.items()}
        out2 = _dynamic(kind, two, b, bs, bias)
        assert spies["quant"].launches - before["quant"] == 1
        assert torch.equal(out2[0], fused[0])


@pytest.mark.parametrize("scheme", ["int8", "fp8-block"])
def test_faults_reproduce_with_the_act_quant_inside_the_gemv(force, scheme: str) -> None:
    """Batch-1 decode takes the fused GEMV: every fault of the scheme the torch backend shows at
    one token, the Triton target shows too (a slot fault has no other slot at one token)."""
    from server_shim.catalog import FAULT_SCHEMES, MOE_ONLY, SLOT_FAULTS

    force(tuning.Cfg("gemv", 1, 8, 128, 4, 1, 2))
    g = torch.Generator().manual_seed(48)
    w = torch.randn(256, 384, generator=g) * 0.02 * (1 + 3 * torch.rand(256, 1, generator=g))
    x = torch.randn(1, 384, generator=g) * 4
    faults = [f for f, schemes in FAULT_SCHEMES.items() if scheme in schemes and f not in MOE_ONLY]
    shown = 0
    for fault in faults:
        qw = F.quantize_weight(w, scheme, layout=F.ScaleLayout("row-major", fault == "scale-shuffle-ignored"))
        fs = FaultSet(**{fault.replace("-", "_"): True})
        faulty, faulty_torch = quant_matmul(x, qw, None, "triton", fs), quant_matmul(x, qw, None, "torch", fs)
        assert rel(faulty, faulty_torch) < 1e-5, fault  # the same numbers, bug or not
        visible = rel(faulty_torch, quant_matmul(x, qw, None, "torch")) > 1e-4
        assert visible != (fault in SLOT_FAULTS), fault
        shown += visible
    assert len(faults) >= 5 and shown == len(faults) - len(set(faults) & set(SLOT_FAULTS))


def test_unfused_candidate_runs_the_two_kernels(monkeypatch) -> None:
    """ "quant2", the tuner's alternative to the fused GEMV (chosen where the in-kernel division
    costs more than the launch it saves): the act-quant kernel, then the GEMM's own choice."""
    spy = _spy_on(monkeypatch, "quant")["quant"]
    real = tuning.TUNER._pick
    monkeypatch.setattr(
        tuning.TUNER,
        "_pick",
        lambda key, cands, run, tune, cold: (
            tuning.QUANT2 if "|mm8q|" in key else real(key, cands, run, tune=tune, cold=cold)
        ),
    )
    g = torch.Generator().manual_seed(50)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    b, bs = (
        torch.randint(-127, 128, (24, 256), dtype=torch.int8, generator=g),
        torch.rand(24, 1, generator=g) + 0.01,
    )
    out = K.int8_gemm_dynamic(x, b, bs, out_dtype=torch.float32)
    assert spy.launches == 1
    q, s = K.quantize_act_int8(x)
    assert torch.equal(out, K.int8_gemm(q, s, b, bs, out_dtype=torch.float32))


def test_one_token_entry_points_refuse_bad_input() -> None:
    """The act-quant-inside entry points say what is wrong, as the other kernel wrappers do."""
    x, b8 = torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8)
    bf8, bs = torch.zeros(8, 64, dtype=torch.float8_e4m3fn), torch.ones(1, 1)
    with pytest.raises(QuantConfigError, match="K mismatch"):
        K.int8_gemm_dynamic(torch.randn(1, 32), b8, torch.ones(8, 1), out_dtype=torch.float32)
    with pytest.raises(QuantConfigError, match="x must be a 2-D tensor"):
        K.int8_gemm_dynamic(x.to(torch.int32), b8, torch.ones(8, 1), out_dtype=torch.float32)
    with pytest.raises(QuantConfigError, match="block must be a power of two"):
        K.fp8_block_gemm_dynamic(x, bf8, bs, block=48, out_dtype=torch.float32)
    with pytest.raises(QuantConfigError, match="b must be a 2-D tensor"):
        K.fp8_block_gemm_dynamic(x, b8, bs, block=64, out_dtype=torch.float32)


def test_pinned_sets_force_and_restores_what_was_there_even_on_error(monkeypatch) -> None:
    """tuning.pinned: the benches' one way to run a config; it parses names, nests, and never
    leaves a pin behind (a leaked pin would silently time every later GEMM on one config)."""
    outer = tuning.Cfg.parse("tile:16x32x128:w4:s2:k2")
    monkeypatch.setattr(tuning, "FORCE", outer)
    with tuning.pinned("gemv:1x8x128:w4:s1:k2"):
        assert tuning.FORCE is not None and tuning.FORCE.name == "gemv:1x8x128:w4:s1:k2"
        with tuning.pinned(None):
            assert tuning.FORCE is None
        assert tuning.FORCE is not None and tuning.FORCE.name == "gemv:1x8x128:w4:s1:k2"
    assert tuning.FORCE is outer
    with pytest.raises(RuntimeError), tuning.pinned(outer):
        tuning.FORCE = None  # whatever happens inside
        raise RuntimeError("a GEMM failed")
    assert tuning.FORCE is outer
