"""faults.py: parsing and targeting, and each fault's numeric signature against the golden."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from server_shim.errors import QuantConfigError
from server_shim.models import LoadedModel
from server_shim.quant import formats as F
from server_shim.quant.faults import FAULTS, FaultSet, parse_fault, read_weight, resolve_faults
from server_shim.quant.linear import quant_matmul, quantize_model

ORDER_NOISE = 1e-5  # a correct backend vs the golden: fp32 accumulation order only


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def case() -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with structure (per-row and per-column magnitudes, so block scales differ) and
    activations with per-row magnitudes (so per-token scales differ between slots)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 640, generator=g) * 0.02 * (1 + 3 * torch.rand(384, 1, generator=g))
    w = w * (1 + torch.rand(1, 640, generator=g))
    x = torch.randn(6, 640, generator=g) * (1 + 5 * torch.rand(6, 1, generator=g))
    return w, x


def _run(case, scheme: str, fault: str, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    w, x = case
    layout = F.ScaleLayout("row-major", fault == "scale-shuffle-ignored")
    qw = F.quantize_weight(w, scheme, layout=layout)
    fs = FaultSet(**{fault.replace("-", "_"): True})
    return quant_matmul(x, qw, None, backend, fs), quant_matmul(x, qw, None, "torch")


def test_parse_and_targeting_errors() -> None:
    assert parse_fault("garbage-gemm@model.layers.3.*").glob == "model.layers.3.*"
    with pytest.raises(QuantConfigError, match="valid: garbage-gemm, scale-transposed"):
        parse_fault("bit-flip")
    mods = {"a.q_proj": "linear", "a.experts": "moe"}
    with pytest.raises(QuantConfigError, match="matches no quantized module"):
        resolve_faults(["scale-skipped@b.*"], scheme="fp8-block", modules=mods)
    with pytest.raises(QuantConfigError, match="applies to: fp8-block, int4-g128, mxfp4"):
        resolve_faults(["scale-transposed"], scheme="fp8-tensor", modules=mods)
    with pytest.raises(QuantConfigError, match="applies to: fp8-token, fp8-block, int8"):
        resolve_faults(["slot-variant"], scheme="mxfp4", modules=mods)
    got = resolve_faults(["routed-scaling-missing", "scale-skipped@a.q*"], scheme="int8", modules=mods)
    assert got == {
        "a.experts": FaultSet(routed_scaling_missing=True),
        "a.q_proj": FaultSet(scale_skipped=True),
    }
    with pytest.raises(QuantConfigError, match="MoE"):
        resolve_faults(["routed-scaling-missing"], scheme="int8", modules={"a.q_proj": "linear"})


def test_garbage_gemm_is_uncorrelated(case) -> None:
    y, golden = _run(case, "fp8-block", "garbage-gemm")
    assert abs(_cos(y, golden)) < 0.1


def test_scale_skipped_is_off_by_orders_of_magnitude(case) -> None:
    y, golden = _run(case, "fp8-block", "scale-skipped")
    assert _ratio(y, golden) > 100


@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-token", "fp8-block"])
def test_fnuz_unnormalized_halves_the_output(case, scheme: str) -> None:
    y, golden = _run(case, scheme, "fnuz-unnormalized")
    assert _ratio(y, golden) == pytest.approx(0.5, abs=1e-3)
    assert _cos(y, golden) > 0.99999  # cosine is blind to it: the norm ratio is the signature


def test_fnuz_unnormalized_reads_0x80_as_nan() -> None:
    qw = F.quantize_weight(torch.ones(2, 4), "fp8-token")
    qw.data.view(torch.uint8)[1, 2] = 0x80  # a -0 written by a producer that does not canonicalise
    data, _, _ = read_weight(qw, FaultSet(fnuz_unnormalized=True))
    assert torch.isnan(data.float()[1, 2]) and data.float()[0, 0].item() == pytest.approx(224.0)


@pytest.mark.parametrize("scheme", ["fp8-token", "fp8-block", "int8"])
def test_slot_variant_differs_only_for_rows_after_the_first(case, scheme: str) -> None:
    y, golden = _run(case, scheme, "slot-variant")
    assert torch.equal(y[0], golden[0])
    assert all(_rel(y[i], golden[i]) > 0.01 for i in range(1, y.shape[0]))


def test_slot_variant_uses_the_batch_dim_of_3d_inputs(case) -> None:
    w, x = case
    qw = F.quantize_weight(w, "fp8-token")
    x3 = x.reshape(2, 3, 640)  # slot 0 = its 3 tokens, slot 1 reads slot 0's scale rows
    y = quant_matmul(x3, qw, None, "torch", FaultSet(slot_variant=True))
    golden = quant_matmul(x3, qw, None, "torch")
    assert torch.equal(y[0], golden[0]) and _rel(y[1], golden[1]) > 0.01


@pytest.mark.parametrize(
    ("scheme", "backend"), [("fp8-token", "torch"), ("fp8-block", "torch"), ("int8", "triton")]
)
def test_slot_tile_is_wrong_only_past_the_first_m_tile(scheme: str, backend: str) -> None:
    """20 slots: 0-15 read their own scale rows, 16-19 read rows 0-3 (the first tile's), so a
    batch of 4 cannot show it and slot 17 of 20 does."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=g) * 0.05
    x = torch.randn(20, 256, generator=g) * (1 + 5 * torch.rand(20, 1, generator=g))
    qw = F.quantize_weight(w, scheme)
    y = quant_matmul(x, qw, None, backend, FaultSet(slot_tile=True))
    golden = quant_matmul(x, qw, None, backend)
    assert torch.equal(y[:16], golden[:16])
    assert all(_rel(y[i], golden[i]) > 0.01 for i in range(16, 20))
    four = x[:4]
    assert torch.equal(
        quant_matmul(four, qw, None, backend, FaultSet(slot_tile=True)), quant_matmul(four, qw, None, backend)
    )


@pytest.mark.parametrize("scheme", ["fp8-block", "int8"])
def test_ue8m0_rounding_is_small_but_nonzero(case, scheme: str) -> None:
    y, golden = _run(case, scheme, "ue8m0-rounding")
    assert 1e-3 < _rel(y, golden) < 0.1
    assert _cos(y, golden) > 0.998


@pytest.mark.parametrize(
    ("scheme", "fault"),
    [("fp8-block", "scale-transposed"), ("int4-g128", "scale-transposed"), ("mxfp4", "scale-transposed"),
     ("fp8-block", "scale-shuffle-ignored"), ("int8", "scale-shuffle-ignored"), ("mxfp4", "scale-shuffle-ignored"),
     ("fp8-block", "transpose-noop"), ("int4-g128", "transpose-noop")],
)  # fmt: skip
def test_layout_faults_are_clearly_wrong(case, scheme: str, fault: str) -> None:
    y, golden = _run(case, scheme, fault)
    assert _rel(y, golden) > 0.05  # vs ~1e-7 for a correct backend: thousands of times the noise


@pytest.mark.parametrize(
    ("scheme", "fault", "backend"),
    [("fp8-block", "scale-transposed", "triton"), ("fp8-block", "garbage-gemm", "triton"),
     ("fp8-block", "slot-variant", "triton"), ("mxfp4", "scale-shuffle-ignored", "triton"),
     ("int4-g128", "scale-skipped", "triton"), ("fp8-token", "fnuz-unnormalized", "vendor"),
     ("int8", "slot-variant", "vendor"), ("fp8-tensor", "transpose-noop", "vendor")],
)  # fmt: skip
def test_faults_live_in_the_shared_read_so_every_backend_shows_them(case, scheme, fault, backend) -> None:
    faulty_torch, _ = _run(case, scheme, fault, "torch")
    faulty_other, _ = _run(case, scheme, fault, backend)
    assert _rel(faulty_other, faulty_torch) < ORDER_NOISE


def test_routed_scaling_missing_on_tiny_moe(tiny_moe: LoadedModel) -> None:
    golden, faulty = copy.deepcopy(tiny_moe.model), copy.deepcopy(tiny_moe.model)
    quantize_model(golden, scheme="fp8-block", backend="torch")
    quantize_model(
        faulty, scheme="fp8-block", backend="torch", faults=["routed-scaling-missing@*.layers.2.*"]
    )
    torch.manual_seed(0)
    h = torch.randn(7, tiny_moe.model.config.hidden_size)
    with torch.no_grad():
        _, w, idx = golden.model.layers[2].mlp.gate(h)
        ref = golden.model.layers[2].mlp.experts(h, idx, w)
        out = faulty.model.layers[2].mlp.experts(h, idx, w)
        other = faulty.model.layers[1].mlp.experts(h, idx, w)
        ref_other = golden.model.layers[1].mlp.experts(h, idx, w)
    assert _ratio(out, ref) == pytest.approx(1 / 2.5, rel=1e-5)
    assert torch.equal(other, ref_other)  # the glob picked layer 2 only


def test_debug_info_never_reveals_a_fault() -> None:
    def build(faults: list[str]) -> nn.Sequential:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
        quantize_model(m, scheme="fp8-block", faults=faults)
        return m

    clean = build([])
    for fault in [f for f in FAULTS if f not in ("routed-scaling-missing", "scale-shuffle-ignored")]:
        faulty = build([f"{fault}@0"])
        assert faulty[0].debug_info() == clean[0].debug_info()
        assert faulty[0].stored_metadata() == clean[0].stored_metadata()
        assert all(torch.equal(a, b) for a, b in zip(faulty[0].stored_tensors().values(),
                                                     clean[0].stored_tensors().values(), strict=True))  # fmt: skip
    shuffled = build(["scale-shuffle-ignored@0"])  # the layout is model-wide: both modules declare it
    assert shuffled[0].debug_info() == shuffled[1].debug_info()
    assert shuffled[0].debug_info()["scale_layout"]["shuffled"] is True


def test_a_scale_transpose_that_reads_the_same_scales_is_refused() -> None:
    """The bug: scale-transposed on tiny-llama's fp8-block down_proj (a [1, 2] scale grid) changed
    nothing -- swapped strides read the same values -- so a negative control built on it passed,
    silently. Such a fault is refused at load, naming the module and its grid."""
    from server_shim.errors import QuantConfigError
    from server_shim.models import load_model
    from server_shim.quant.linear import quantize_model

    model = load_model("tiny-llama", dtype="float32", device="cpu").model
    with pytest.raises(
        QuantConfigError, match=r"would change nothing.*model.layers.1.mlp.down_proj \[1, 2\]"
    ):
        quantize_model(model, scheme="fp8-block", faults=["scale-transposed@model.layers.1.mlp.down_proj"])
    model = load_model("tiny-llama", dtype="float32", device="cpu").model  # int4-g128: a [N, K/128] grid
    quantize_model(model, scheme="int4-g128", faults=["scale-transposed@model.layers.1.mlp.down_proj"])


def test_a_scale_shuffle_ignored_that_reads_the_same_scales_is_refused() -> None:
    """The bug: scale-shuffle-ignored on tiny-llama's fp8-block down_proj (a [1, 2] scale grid: the
    shuffle of one row is the identity) or q/k/v/o_proj ([1, 1]) changed nothing, so a negative
    control built on it passed, silently. Refused at load like a no-op scale-transposed; a glob that
    also matches a module where it acts is accepted (the fault is real there)."""
    from server_shim.models import load_model

    def quantize(preset: str, scheme: str, fault: str) -> None:
        model = load_model(preset, dtype="float32", device="cpu").model
        quantize_model(model, scheme=scheme, backend="torch", faults=[fault])

    for fault, shown in (
        ("scale-shuffle-ignored@model.layers.1.mlp.down_proj", r"model.layers.1.mlp.down_proj \[1, 2\]"),
        ("scale-shuffle-ignored@model.layers.1.self_attn.*", r"model.layers.1.self_attn.q_proj \[1, 1\]"),
    ):
        with pytest.raises(QuantConfigError, match=rf"scale-shuffle-ignored would change nothing.*{shown}"):
            quantize("tiny-llama", "fp8-block", fault)
    with pytest.raises(QuantConfigError, match=r"would change nothing.*shared_experts.gate_proj \[1, 1\]"):
        quantize("tiny-moe", "fp8-block", "scale-shuffle-ignored@model.layers.1.mlp.shared_experts.*")
    quantize("tiny-llama", "fp8-block", "scale-shuffle-ignored@model.layers.1.mlp.*")  # up/gate_proj: [2, 1]
    quantize("tiny-llama", "int8", "scale-shuffle-ignored@model.layers.1.mlp.down_proj")  # per-row scales
    quantize("tiny-moe", "fp8-block", "scale-shuffle-ignored@model.layers.1.mlp.experts")


def test_scale_shuffle_refusal_looks_at_values_not_only_shapes() -> None:
    """Rows the shuffle swaps that hold equal scales read the same values: refused too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))  # fp8-block: a [2, 2] grid, its two rows swapped
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(1, 256).expand(256, 256) * 0.02)  # both 128-row blocks alike
    with pytest.raises(QuantConfigError, match=r"scale-shuffle-ignored would change nothing.*0 \[2, 2\]"):
        quantize_model(model, scheme="fp8-block", faults=["scale-shuffle-ignored@0"])
    model = nn.Sequential(nn.Linear(256, 256))
    quantize_model(model, scheme="fp8-block", faults=["scale-shuffle-ignored@0"])


def test_scale_transpose_refusal_looks_at_values_not_only_shapes() -> None:
    """A [2, 2] grid of four equal scales reads the same transposed; the old shape rule (more than
    one row and column) accepted it and the negative control passed silently."""
    model = nn.Sequential(nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight.fill_(0.01)  # every 128x128 block alike: one scale value
    with pytest.raises(QuantConfigError, match=r"scale-transposed would change nothing.*0 \[2, 2\]"):
        quantize_model(model, scheme="fp8-block", faults=["scale-transposed@0"])
    model = nn.Sequential(nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight[:128, 128:] *= 3  # scale (0, 1) differs from (1, 0): the transpose moves it
    quantize_model(model, scheme="fp8-block", faults=["scale-transposed@0"])
