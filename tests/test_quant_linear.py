"""linear.py / moe.py: the in-place swap, backend dispatch and policy, backends against each other."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from server_shim.errors import QuantConfigError
from server_shim.models import LoadedModel
from server_shim.quant import arch
from server_shim.quant import formats as F
from server_shim.quant.linear import QuantLinear, quant_matmul, quantize_model, select_backend
from server_shim.quant.moe import QuantMoEExperts

SCHEMES = ("fp8-tensor", "fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4")
VENDOR = ("fp8-tensor", "fp8-token", "int8")  # measured on this CPU build (arch.vendor_supports)
DEBUG_KEYS = {"kind", "scheme", "backend", "fallback_reason", "weight_dtype", "weight_shape", "scale_shape",
              "scale_stride", "scale_layout"}  # fmt: skip
# A correct backend differs from the golden by fp32 accumulation order only.
ORDER_NOISE = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _weight(n: int = 72, k: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(5, k, generator=g)


def test_vendor_support_is_measured_on_cpu() -> None:
    for s in SCHEMES:
        ok, why = arch.vendor_supports(s, "cpu")
        assert ok == (s in VENDOR), (s, why)
    assert arch.device_arch("cpu") == "cpu"
    assert arch.fp8_dtype_for("cpu") == torch.float8_e4m3fn


@pytest.mark.parametrize("scheme", VENDOR)
def test_vendor_matches_torch_golden(scheme: str) -> None:
    w, x = _weight()
    qw = F.quantize_weight(w, scheme)
    golden = F.reference_linear(x, qw)
    assert _rel(quant_matmul(x, qw, None, "vendor"), golden) < ORDER_NOISE
    if scheme == "int8":  # exact integer accumulation on both sides: bit-identical
        assert torch.equal(quant_matmul(x, qw, None, "vendor"), golden)


def test_vendor_never_falls_back_silently() -> None:
    w, x = _weight()
    with pytest.raises(QuantConfigError, match="vendor backend has no int4-g128 path"):
        quant_matmul(x, F.quantize_weight(w, "int4-g128"), None, "vendor")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_backend_is_the_reference(scheme: str) -> None:
    w, x = _weight()
    qw = F.quantize_weight(w, scheme, layout=F.ScaleLayout("col-major", True))
    assert torch.equal(
        quant_matmul(x, qw, torch.ones(72), "torch"), F.reference_linear(x, qw, torch.ones(72))
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_triton_matches_torch_golden(scheme: str) -> None:
    w, x = _weight(n=72, k=200)  # non-multiple N and K
    for layout in (F.ScaleLayout(), F.ScaleLayout("col-major", True)):
        qw = F.quantize_weight(w, scheme, layout=layout)
        golden = F.reference_linear(x, qw, torch.ones(72))
        assert _rel(quant_matmul(x, qw, torch.ones(72), "triton"), golden) < ORDER_NOISE
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set by the shim itself on CPU


def test_backend_policy_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert select_backend("fp8-block", "auto", cpu, ck_free=False) == ("torch", "")
    assert select_backend("fp8-token", "vendor", cpu, ck_free=False) == ("vendor", "")
    with pytest.raises(QuantConfigError, match="ck-free"):
        select_backend("fp8-token", "vendor", cpu, ck_free=True)
    with pytest.raises(QuantConfigError, match="vendor backend cannot run fp8-block"):
        select_backend("fp8-block", "vendor", cpu, ck_free=False)
    with pytest.raises(QuantConfigError, match="unknown backend"):
        select_backend("fp8-block", "cuda", cpu, ck_free=False)
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(QuantConfigError, match="unknown scheme"):
        quantize_model(model, scheme="fp6")
    monkeypatch.setenv("DIFFTEST_CK_FREE", "1")
    with pytest.raises(QuantConfigError, match="ck-free"):
        quantize_model(model, scheme="int8", backend="vendor")
    assert isinstance(model[0], nn.Linear)  # nothing swapped when the config is refused
    from server_shim.quant.linear import ck_free_from_env

    for value, want in (("true", True), ("on", True), ("0", False), ("off", False)):  # env_switch's rule
        monkeypatch.setenv("DIFFTEST_CK_FREE", value)
        assert ck_free_from_env(None) is want
    assert ck_free_from_env(False) is False  # an explicit option wins over the environment


def test_quantize_model_swaps_in_place_keeping_names(tiny_llama: LoadedModel) -> None:
    model = copy.deepcopy(tiny_llama.model)
    names_before = [n for n, _ in model.named_modules()]
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        ref = model(ids).logits
    summary = quantize_model(model, scheme="fp8-block", skip=["*.layers.0.*"])
    assert [n for n, _ in model.named_modules()] == names_before
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert "lm_head" in summary.skipped and "model.layers.0.mlp.up_proj" in summary.skipped
    assert set(summary.modules.values()) == {"torch"} and summary.arch == "cpu"
    with torch.no_grad():
        out = model(ids).logits
    assert 0 < _rel(out, ref) < 0.15  # fp8 noise through 4 random layers


def test_debug_info_and_stored_tensors() -> None:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(200, 72))
    quantize_model(model, scheme="int4-g128", backend="torch")
    info = model.proj.debug_info()
    assert set(info) >= DEBUG_KEYS
    assert info["kind"] == "linear" and info["weight_dtype"] == "uint8" and info["weight_shape"] == [72, 100]
    assert info["scale_shape"] == [72, 2] and info["scale_stride"] == [2, 1]
    assert info["scale_layout"] == {"order": "row-major", "shuffled": False}
    assert set(model.proj.stored_tensors()) == {"weight", "weight_scale", "weight_zero"}
    meta = model.proj.stored_metadata()
    assert all(isinstance(v, str) for v in meta.values()) and meta["scale_group"] == "1x128"


def test_forward_with_backend_and_3d_input() -> None:
    w, _ = _weight(64, 256)
    lin = nn.Linear(256, 64)
    lin.weight.data = w
    model = nn.Sequential(lin)
    quantize_model(model, scheme="fp8-token")
    x = torch.randn(2, 3, 256)
    y = model(x)
    assert y.shape == (2, 3, 64)
    assert _rel(model[0].forward_with_backend(x, "vendor"), y) < ORDER_NOISE
    assert torch.equal(model[0].forward_with_backend(x, "auto"), y)


def test_triton_backend_on_cpu_serves_a_model(tiny_llama: LoadedModel) -> None:
    model = copy.deepcopy(tiny_llama.model)
    ids = torch.tensor([[1, 5, 9, 200]])
    golden = copy.deepcopy(model)
    quantize_model(golden, scheme="fp8-block", backend="torch")
    quantize_model(model, scheme="fp8-block", backend="triton")
    assert model.model.layers[0].mlp.up_proj.debug_info()["backend"] == "triton"
    with torch.no_grad():
        assert _rel(model(ids).logits, golden(ids).logits) < 1e-4


@pytest.mark.parametrize(("scheme", "bound"), [("int8", 0.03), ("fp8-block", 0.1)])
def test_moe_experts_are_quantized_and_match_hf(tiny_moe: LoadedModel, scheme: str, bound: float) -> None:
    model = copy.deepcopy(tiny_moe.model)
    hf_moe = model.model.layers[1].mlp
    hf_experts = copy.deepcopy(hf_moe.experts)
    torch.manual_seed(0)
    h = torch.randn(6, model.config.hidden_size)
    with torch.no_grad():
        _, w, idx = hf_moe.gate(h)
        ref = hf_experts(h, idx, w)
    quantize_model(model, scheme=scheme)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantMoEExperts)
    assert experts.debug_info()["kind"] == "moe" and experts.routed_scaling_factor == 2.5
    assert model.model.layers[1].mlp.gate.routed_scaling_factor == 1.0  # moved onto the experts
    with torch.no_grad():
        _, w2, idx2 = model.model.layers[1].mlp.gate(h)
        out = experts(h, idx2, w2)
    assert torch.equal(idx, idx2)
    assert 0 < _rel(out, ref) < bound  # two GEMMs, each with weight and activation rounding
    if scheme == "int8":
        assert (
            _rel(experts.forward_with_backend(h, "vendor"), experts.forward_with_backend(h, "torch"))
            < ORDER_NOISE
        )
