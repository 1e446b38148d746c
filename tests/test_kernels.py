"""Triton kernels (server_shim/quant/kernels.py) in the interpreter against torch references.

The references below dequantize in float64 and multiply, written independently of the kernels
(and of formats.py), so a shared misreading of a layout cannot make both sides agree.
"""

from __future__ import annotations

import os

# must precede any triton import: triton.jit picks compiled vs interpreted when it decorates
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from server_shim.errors import QuantConfigError  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

pytest.importorskip("triton")

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """fp32 accumulation: error relative to the output's norm, and per element to its max."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    scale = ref.norm().item()
    assert scale > 0
    assert (out - ref).norm().item() <= rtol * scale, (out - ref).norm().item() / scale
    assert (out - ref).abs().max().item() <= rtol * ref.abs().max().item() * 10


def expand(s: torch.Tensor, rows: int, cols: int, rblock: int, cblock: int) -> torch.Tensor:
    return s.double().repeat_interleave(rblock, 0).repeat_interleave(cblock, 1)[:rows, :cols]


def fp8_data(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 40).clamp(-200, 200).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


@pytest.fixture
def decode_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the uint8-bits path that GPUs without native fp8 take."""
    monkeypatch.setattr(K, "_fp8_native", lambda device, dtype: False)


def test_triton_available_under_interpreter() -> None:
    from server_shim.quant.arch import triton_available

    assert triton_available(torch.device("cpu"))


# ----------------------------------------------------------------------------- activation quant
def ref_quant(x: torch.Tensor, group: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    M, Kd = x.shape
    gk = Kd if group is None else group
    G = -(-Kd // gk)
    xp = torch.nn.functional.pad(x.float(), (0, G * gk - Kd)).view(M, G, gk)
    scale = xp.abs().amax(-1).clamp(min=1e-12) / K.FP8_MAX[dtype]
    fmax = K.FP8_MAX[dtype]
    q = (xp / scale[..., None]).clamp(-fmax, fmax).to(dtype).view(M, G * gk)[:, :Kd]
    return q, scale


@pytest.mark.parametrize("dtype", [FN, FNUZ])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_quantize_act_bit_exact(dtype: torch.dtype, group: int | None, xdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 200, generator=g) * 3).to(xdtype)
    x[1] = 0  # all-zero row: the amax floor keeps the scale finite
    x[2, 5] = 1e-9  # deep subnormal after scaling
    q, s = K.quantize_act_fp8(x, group=group, fp8_dtype=dtype)
    qr, sr = ref_quant(x, group, dtype)
    assert q.dtype == dtype and q.shape == (5, 200)
    assert s.shape == (5, 1 if group is None else 2) and s.dtype == torch.float32
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


def test_quantize_act_rounds_with_carry_and_ties_to_even() -> None:
    # the interpreter's own fp32->fp8 cast gives 16 for 31.13 (no carry into the exponent)
    x = torch.tensor([[448.0, 31.13, -7.87, 17.0, 19.0, 0.0029296875, -0.0]])
    q, s = K.quantize_act_fp8(x, group=None, fp8_dtype=FN)
    assert s.item() == 1.0
    # 17 is a tie between 16 and 18 -> 16 (even mantissa); 19 between 18 and 20 -> 20; 1.5 * 2**-9 -> 2 * 2**-9
    assert q.float().tolist() == [[448.0, 32.0, -8.0, 16.0, 20.0, 0.00390625, 0.0]]


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_act_int8_is_the_reference_bit_for_bit(xdtype: torch.dtype) -> None:
    """The int8 act-quant kernel against formats.quantize_act: scales and codes identical, ties
    to even (x / s = 2.5 -> 2, 3.5 -> 4, -0.5 -> 0), the amax row at +-127, a zero row."""
    from server_shim.quant import formats as F

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 300, generator=g) * 4).to(xdtype)
    x[1] = 0  # all-zero row: the amax floor keeps the scale finite
    x[2, :4] = torch.tensor([127.0, 2.5, 3.5, -0.5])  # scale exactly 1: the ties land on x / s
    x[2, 4:] = 0
    q, s = K.quantize_act_int8(x)
    qr, sr = F.quantize_act(x, "int8")
    assert q.dtype == torch.int8 and q.shape == (6, 300) and s.shape == (6, 1) and s.dtype == torch.float32
    assert torch.equal(s, sr) and torch.equal(q, qr)
    assert q[2, :4].tolist() == [127, 2, 4, 0] and int(q.abs().max()) == 127 and not q[1].any()
    # K larger than one interpreter block: the amax loop and the store loop both step
    x = torch.randn(3, 5000, generator=g).to(xdtype)
    q, s = K.quantize_act_int8(x)
    qr, sr = F.quantize_act(x, "int8")
    assert torch.equal(s, sr) and torch.equal(q, qr)


@pytest.mark.parametrize("dtype", [FN, FNUZ])
def test_quantize_act_encode_path_matches(dtype: torch.dtype, decode_path: None) -> None:
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(2)) * 5
    q, s = K.quantize_act_fp8(x, group=128, fp8_dtype=dtype)
    qr, sr = ref_quant(x, 128, dtype)
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


# ----------------------------------------------------------------------------- fp8 gemm
@pytest.mark.parametrize("dtype", [FN, FNUZ])
@pytest.mark.parametrize("path", ["native", "decode"])
def test_fp8_every_code_reads_exactly(dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "decode":
        monkeypatch.setattr(K, "_fp8_native", lambda device, dtype: False)
    codes = torch.arange(256, dtype=torch.uint8)
    nan = codes.view(dtype).float().isnan()
    codes[nan] = 0
    a = codes.view(dtype).view(16, 16)
    one = torch.ones(1)
    out = K.fp8_gemm(a, one, torch.eye(16).to(dtype), one, a_scale_mode="tensor", b_scale_mode="tensor",
                     out_dtype=torch.float32)  # fmt: skip
    assert torch.equal(out, a.float())


def test_fp8_decode_path_propagates_nan(decode_path: None) -> None:
    a = torch.zeros(2, 16, dtype=torch.uint8)
    a[1, 3] = 0x80  # the fnuz NaN code
    one = torch.ones(1)
    out = K.fp8_gemm(a.view(FNUZ), one, torch.eye(16).to(FNUZ), one, a_scale_mode="tensor",
                     b_scale_mode="tensor", out_dtype=torch.float32)  # fmt: skip
    assert torch.isnan(out[1]).all() and (out[0] == 0).all()


@pytest.mark.parametrize("dtype", [FN, FNUZ])
@pytest.mark.parametrize("mode", ["row", "tensor"])
def test_fp8_gemm_row_tensor(dtype: torch.dtype, mode: str) -> None:
    M, N, Kd = 3, 130, 200
    a, b = fp8_data((M, Kd), dtype, 3), fp8_data((N, Kd), dtype, 4)
    g = torch.Generator().manual_seed(5)
    sa = torch.rand(M, 1, generator=g) + 0.01 if mode == "row" else torch.tensor([0.02])
    sb = torch.rand(N, 1, generator=g) + 0.01 if mode == "row" else torch.tensor([0.03])
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode=mode, b_scale_mode=mode, out_dtype=torch.float32)
    ref = (a.double() * sa.double()) @ (b.double() * sb.double().reshape(-1, 1)).T
    assert out.shape == (M, N) and out.dtype == torch.float32
    close(out, ref)


def test_fp8_gemm_bias_bf16_out_and_m1() -> None:
    M, N, Kd = 1, 130, 200
    a, b = fp8_data((M, Kd), FN, 6), fp8_data((N, Kd), FN, 7)
    sa, sb = torch.tensor([[0.01]]), torch.rand(N, 1, generator=torch.Generator().manual_seed(8)) + 0.01
    bias = torch.randn(N, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out = K.fp8_gemm(
        a, sa, b, sb, a_scale_mode="row", b_scale_mode="row", out_dtype=torch.bfloat16, bias=bias
    )
    ref = (a.double() * 0.01) @ (b.double() * sb.double()).T + bias.double()
    assert out.dtype == torch.bfloat16
    # bf16 output: within one bf16 rounding (2**-8 relative) of the exact result, element-wise
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()


def test_fp8_gemm_block() -> None:
    M, N, Kd = 3, 130, 256
    a, b = fp8_data((M, Kd), FN, 10), fp8_data((N, Kd), FN, 11)
    g = torch.Generator().manual_seed(12)
    sa, sb = torch.rand(M, 2, generator=g) + 0.01, torch.rand(2, 2, generator=g) + 0.01
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)
    ref = (a.double() * expand(sa, M, Kd, 1, 128)) @ (b.double() * expand(sb, N, Kd, 128, 128)).T
    close(out, ref)
    # swapped strides read the transposed grid: the `scale-transposed` bug class
    swapped = K.fp8_gemm(a, sa, b, sb, a_scale_mode="block", b_scale_mode="block",
                         b_scale_strides=(sb.stride(1), sb.stride(0)), out_dtype=torch.float32)  # fmt: skip
    ref_t = (a.double() * expand(sa, M, Kd, 1, 128)) @ (b.double() * expand(sb.T, N, Kd, 128, 128)).T
    close(swapped, ref_t)
    assert (swapped - out).norm() > 1e-3 * out.norm()


def test_fp8_gemm_block_partial_and_col_major_scales() -> None:
    # N=130, K=300: a 2x3 block grid with partial last blocks, stored column-major and
    # declared through its strides; the a-scales are a transposed (column-major) view too
    M, N, Kd = 3, 130, 300
    a, b = fp8_data((M, Kd), FNUZ, 13), fp8_data((N, Kd), FNUZ, 14)
    g = torch.Generator().manual_seed(15)
    sa = (torch.rand(3, M, generator=g) + 0.01).T  # [M, 3], strides (1, M)
    sb = torch.rand(2, 3, generator=g) + 0.01
    stored = sb.T.contiguous()  # col-major storage of the [2, 3] grid
    out = K.fp8_gemm(a, sa, b, stored, a_scale_mode="block", b_scale_mode="block", b_scale_strides=(1, 2),
                     out_dtype=torch.float32, bias=torch.ones(N))  # fmt: skip
    ref = (a.double() * expand(sa, M, Kd, 1, 128)) @ (b.double() * expand(sb, N, Kd, 128, 128)).T + 1
    close(out, ref)


def test_fp8_gemm_block_decode_path(decode_path: None) -> None:
    M, N, Kd = 3, 130, 256
    a, b = fp8_data((M, Kd), FNUZ, 16), fp8_data((N, Kd), FNUZ, 17)
    sa, sb = torch.full((M, 2), 0.01), torch.tensor([[0.02, 0.03], [0.04, 0.05]])
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)
    close(out, (a.double() * 0.01) @ (b.double() * expand(sb, N, Kd, 128, 128)).T)


def test_fp8_gemm_rejects_out_of_bounds_strides_and_bad_inputs() -> None:
    a, b = fp8_data((3, 384), FN, 18), fp8_data((130, 384), FN, 19)
    sa, sb = torch.ones(3, 3), torch.ones(2, 3)
    with pytest.raises(QuantConfigError, match="past"):
        # (1, 3) on a 2x3 row-major grid would read element 1 + 2*3 = 7 of 6
        K.fp8_gemm(a, sa, b, sb, a_scale_mode="block", b_scale_mode="block", b_scale_strides=(1, 3),
                   out_dtype=torch.float32)  # fmt: skip
    with pytest.raises(QuantConfigError, match="float32"):
        K.fp8_gemm(a, sa.double(), b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)
    with pytest.raises(QuantConfigError, match="modes"):
        K.fp8_gemm(a, sa, b, sb, a_scale_mode="channel", b_scale_mode="block", out_dtype=torch.float32)
    with pytest.raises(QuantConfigError, match="2-D"):
        K.fp8_gemm(a.float(), sa, b, sb, a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)


# ----------------------------------------------------------------------------- int8
def test_int8_gemm() -> None:
    g = torch.Generator().manual_seed(20)
    M, N, Kd = 3, 130, 200
    a = torch.randint(-127, 128, (M, Kd), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, generator=g)
    sa, sb = torch.rand(M, 1, generator=g) * 1e-2, torch.rand(N, 1, generator=g) * 1e-2
    bias = torch.randn(N, generator=g)
    out = K.int8_gemm(a, sa, b, sb, out_dtype=torch.float32, bias=bias)
    ref = (a.double() @ b.double().T) * sa.double() * sb.double().T + bias.double()
    close(out, ref)


# ----------------------------------------------------------------------------- int4 / mxfp4
@pytest.mark.parametrize("Kd", [256, 200])
@pytest.mark.parametrize("zdtype", [torch.uint8, torch.float32])
def test_int4_gemm(Kd: int, zdtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(21)
    M, N, G = 3, 130, -(-Kd // 128)
    x = torch.randn(M, Kd, generator=g)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    scales = torch.rand(N, G, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=g).to(zdtype)
    out = K.int4_gemm(x, pack_nibbles(q), scales, zeros, out_dtype=torch.float32)
    w = (q.double() - expand(zeros, N, Kd, 1, 128)) * expand(scales, N, Kd, 1, 128)
    close(out, x.double() @ w.T)


def test_int4_gemm_bf16_activations_and_bias() -> None:
    g = torch.Generator().manual_seed(22)
    M, N, Kd = 4, 64, 256
    x = torch.randn(M, Kd, generator=g).to(torch.bfloat16)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    scales = torch.rand(N, 2, generator=g) * 0.1 + 0.01
    zeros = torch.full((N, 2), 8, dtype=torch.uint8)
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    out = K.int4_gemm(x, pack_nibbles(q), scales, zeros, out_dtype=torch.bfloat16, bias=bias)
    w = ((q.double() - 8) * expand(scales, N, Kd, 1, 128)).to(torch.bfloat16).double()  # bf16 dot operands
    ref = x.double() @ w.T + bias.double()
    assert out.dtype == torch.bfloat16
    close(out, ref, rtol=4e-3)  # bf16 output rounding


def test_mxfp4_gemm() -> None:
    g = torch.Generator().manual_seed(23)
    M, N, Kd = 3, 130, 96
    x = torch.randn(M, Kd, generator=g)
    q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
    e = torch.randint(118, 136, (N, 3), dtype=torch.uint8, generator=g)
    out = K.mxfp4_gemm(x, pack_nibbles(q), e, out_dtype=torch.float32, bias=torch.ones(N))
    sign = torch.where(q >= 8, -1.0, 1.0).double()
    w = E2M1[(q & 7).long()] * sign * expand(torch.exp2(e.double() - 127), N, Kd, 1, 32)
    close(out, x.double() @ w.T + 1)


def test_mxfp4_hand_values_and_partial_group() -> None:
    # K=40: one full group of 32 and a partial one of 8. Row n holds code n everywhere;
    # x = e_0 + e_39 reads w[:, 0] + w[:, 39], i.e. the grid value times 2**(e0-127) + 2**(e1-127)
    N, Kd = 16, 40
    q = torch.arange(16, dtype=torch.uint8)[:, None].expand(N, Kd).contiguous()
    e = torch.tensor([[127, 129]], dtype=torch.uint8).expand(N, 2).contiguous()  # scales 1 and 4
    x = torch.zeros(1, Kd)
    x[0, 0] = x[0, 39] = 1.0
    out = K.mxfp4_gemm(x, pack_nibbles(q), e, out_dtype=torch.float32)
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    expected = [5.0 * v for v in grid] + [-5.0 * v for v in grid]
    assert out[0].tolist() == expected
