"""formats.py: hand-worked constants and codecs, round-trip bounds, declared scale layouts."""

from __future__ import annotations

import math

import pytest
import torch

from server_shim.quant import formats as F


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp8_maxima_match_the_formats() -> None:
    # e4m3fn: 1.75 * 2**8 (S.1111.110, 1111.111 is NaN); e4m3fnuz: bias 8 -> 1.875 * 2**7
    assert F.E4M3FN_MAX == 448.0 == torch.finfo(torch.float8_e4m3fn).max
    assert F.E4M3FNUZ_MAX == 240.0 == torch.finfo(torch.float8_e4m3fnuz).max
    assert F.fp8_max(torch.float8_e4m3fnuz) == 240.0


def test_e2m1_grid_decodes_all_16_codes() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    expect = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert F.e2m1_decode(codes).tolist() == expect


@pytest.mark.parametrize(
    ("value", "code"),
    [(0.25, 0), (0.26, 1), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6), (5.1, 7), (99.0, 7),
     (-0.1, 0), (-6.0, 15), (-1.0, 10)],
)  # fmt: skip
def test_e2m1_encode_rounds_to_nearest_ties_to_even(value: float, code: int) -> None:
    assert F.e2m1_encode(torch.tensor([value])).item() == code


def test_e8m0_decoding_and_encoding() -> None:
    codes = torch.tensor([127, 128, 125, 0, 254, 255], dtype=torch.uint8)
    got = F.e8m0_decode(codes)
    assert got[:5].tolist() == [1.0, 2.0, 0.25, 2.0**-127, 2.0**127]
    assert math.isnan(got[5].item())
    assert F.e8m0_encode(torch.tensor([0.25, 1.0, 8.0])).tolist() == [125, 127, 130]


def test_block_scale_1x128_by_hand() -> None:
    x = torch.zeros(1, 200)
    x[0, 5] = -224.0  # group 0 amax 224 -> scale 224 / 448 = 0.5
    x[0, 130] = 4.48  # group 1 (72 wide, partial) amax 4.48 -> 0.01
    q, s = F.quantize_act(x, "fp8-block")
    assert s.shape == (1, 2)
    assert torch.allclose(s, torch.tensor([[0.5, 0.01]]))
    assert q[0, 5].float().item() == -448.0 and q[0, 130].float().item() == 448.0


def test_weight_block_scales_cover_partial_blocks() -> None:
    w = torch.zeros(130, 257)
    w[129, 256] = 448.0 * 3  # lone element in the bottom-right partial block
    qw = F.quantize_weight(w, "fp8-block")
    assert qw.scales.shape == (2, 3)
    assert qw.scales[1, 2].item() == pytest.approx(3.0)
    assert F.dequantize(qw)[129, 256].item() == pytest.approx(1344.0)


def test_mxfp4_scale_by_hand() -> None:
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 5.0, -0.75  # amax 5: 2**(floor(log2 5) - 2) = 1 -> e8m0 code 127
    qw = F.quantize_weight(w, "mxfp4")
    assert qw.scales.tolist() == [[127]]
    d = F.dequantize(qw)
    assert d[0, 0].item() == 4.0 and d[0, 1].item() == -1.0  # 5 ties to 4 (even), -0.75 ties to -1


def test_int4_asymmetric_by_hand() -> None:
    w = torch.linspace(-0.5, 1.0, 128).reshape(1, 128)  # scale 1.5 / 15 = 0.1, zero 5
    qw = F.quantize_weight(w, "int4-g128")
    assert qw.scales.item() == pytest.approx(0.1)
    assert qw.zeros.item() == 5
    assert qw.data.shape == (1, 64) and qw.data.dtype == torch.uint8
    assert (F.dequantize(qw) - w).abs().max().item() <= 0.05 + 1e-6


def test_nibble_packing_low_nibble_is_even_k() -> None:
    q = torch.tensor([[1, 2, 3, 15]])
    assert F.pack_nibbles(q).tolist() == [[0x21, 0xF3]]
    assert F.unpack_nibbles(F.pack_nibbles(q), 4).tolist() == q.tolist()


def test_normalize_e4m3fn_to_fnuz_halves_values_doubles_scale() -> None:
    w = torch.tensor([[1.0, -2.0, 448.0, 0.0]]).to(torch.float8_e4m3fn)
    w.view(torch.uint8)[0, 3] = 0x80  # -0 in e4m3fn, NaN in fnuz
    wz, s = F.normalize_e4m3fn_to_e4m3fnuz(w, torch.tensor(3.0))
    assert wz.dtype == torch.float8_e4m3fnuz
    assert wz.float().tolist() == [[0.5, -1.0, 224.0, 0.0]]
    assert s.item() == 6.0


ROUND_TRIP = {"fp8-tensor": 0.04, "fp8-token": 0.04, "fp8-block": 0.04, "int8": 0.012,
              "int4-g128": 0.12, "mxfp4": 0.15}  # fmt: skip


@pytest.mark.parametrize("scheme", list(ROUND_TRIP))
def test_round_trip_error_bounds(scheme: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.02  # K=200: partial 128-, 32- groups
    qw = F.quantize_weight(w, scheme)
    err = _rel(F.dequantize(qw), w)
    assert 0 < err < ROUND_TRIP[scheme]


@pytest.mark.parametrize("scheme", ["fp8-block", "int4-g128", "mxfp4", "int8"])
def test_declared_layout_is_physical_and_dequantize_reads_it(scheme: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(300, 260) * 0.02
    plain = F.quantize_weight(w, scheme)
    for layout in (
        F.ScaleLayout("col-major"),
        F.ScaleLayout("row-major", True),
        F.ScaleLayout("col-major", True),
    ):
        qw = F.quantize_weight(w, scheme, layout=layout)
        r, c = qw.scales.shape
        if layout.order == "col-major" and c > 1:
            assert qw.scales.stride() == (1, r)
        if layout.shuffled:
            assert not torch.equal(qw.scales, plain.scales)
        assert torch.equal(F.dequantize(qw), F.dequantize(plain))


def test_shuffle_permutation_is_documented_and_invertible() -> None:
    p = F.shuffle_perm(21)
    assert p[:8].tolist() == [0, 4, 8, 12, 1, 5, 9, 13]  # 4x4 transpose of the first 16-row tile
    assert p[16:].tolist() == [20, 19, 18, 17, 16]  # tail reversed
    s = torch.arange(21.0).reshape(21, 1)
    assert torch.equal(F.unshuffle_scales(F.shuffle_scales(s)), s)


def test_fp8_quantization_never_stores_negative_zero() -> None:
    qw = F.quantize_weight(torch.tensor([[-1e-9, 1.0, -1.0]]), "fp8-token")
    assert 0x80 not in qw.data.view(torch.uint8).flatten().tolist()


@pytest.mark.parametrize("scheme", list(ROUND_TRIP))
def test_reference_linear_3d_and_non_multiple_k(scheme: str) -> None:
    torch.manual_seed(2)
    w, x = torch.randn(72, 200) * 0.05, torch.randn(2, 5, 200)
    y = F.reference_linear(x, F.quantize_weight(w, scheme), torch.ones(72))
    exact = x @ w.t() + 1
    assert y.shape == (2, 5, 72)
    assert _rel(y, exact) < {"int4-g128": 0.15, "mxfp4": 0.15}.get(scheme, 0.06)


def test_act_scale_shapes() -> None:
    x = torch.randn(3, 300)
    assert F.quantize_act(x, "fp8-tensor")[1].shape == (1, 1)
    assert F.quantize_act(x, "fp8-token")[1].shape == (3, 1)
    assert F.quantize_act(x, "fp8-block")[1].shape == (3, 3)
    q, s = F.quantize_act(x, "int8")
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    p2 = F.quantize_act(x, "fp8-block", pow2_scales=True)[1]
    assert torch.equal(p2, torch.exp2(torch.round(torch.log2(p2))))
