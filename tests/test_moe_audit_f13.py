"""Tester 16's `difftest quant` findings on MoE experts: (2) the experts got structure checks only
(no hypothesis test, no backend table, down_proj's scales never described, a structure-only row
counted as audited: every expert fault exited 0); (3) a correct int4-g128 / mxfp4 MoE was flagged
because the experts reported their logical weight shape where linears report the stored, packed one."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from test_layers import _run_in_current_loop, build, serve_in_process, shim_endpoint, shim_server

from difftest.whitebox.audit import HINTS, audit_module, fp8_flavour, hypotheses, structure_checks
from difftest.whitebox.experts import (
    expert_forward,
    expert_readings,
    expert_tensors,
    quantized_act,
    sample_experts,
)
from difftest.whitebox.safetensors import read_safetensors
from server_shim.models import LoadedModel
from server_shim.quant import formats as F
from server_shim.quant.faults import FaultSet
from server_shim.quant.linear import quantize_for_device, quantize_model
from server_shim.quant.moe import QuantMoEExperts

EXPERTS = "model.layers.2.mlp.experts"
SCHEMES = ("fp8-tensor", "fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4")
_REFERENCE: list[LoadedModel] = []


def reference() -> LoadedModel:
    """The fp32 tiny-moe, built once for this file (servers only read it)."""
    if not _REFERENCE:
        _REFERENCE.append(build("tiny-moe"))
    return _REFERENCE[0]


def _experts(
    scheme: str, faults: FaultSet = FaultSet(), layout: F.ScaleLayout = F.ScaleLayout()
) -> QuantMoEExperts:
    """Two experts of H = 160, I = 136 (partial 128-blocks and groups), routed_scaling_factor 2.5."""
    g = torch.Generator().manual_seed(0)
    gu = [torch.randn(2 * 136, 160, generator=g) * 0.05 for _ in range(2)]
    dn = [torch.randn(160, 136, generator=g) * 0.05 for _ in range(2)]
    cpu = torch.device("cpu")
    return QuantMoEExperts(
        [quantize_for_device(w, scheme, cpu, layout) for w in gu],
        [quantize_for_device(w, scheme, cpu, layout) for w in dn],
        torch.nn.SiLU(), routed_scaling_factor=2.5, backend="torch", faults=faults,
    )  # fmt: skip


# ----------------------------------------------------------------------------- pure parts


def test_sample_experts_by_hand() -> None:
    assert sample_experts(8) == list(range(8))
    # 256 experts: round(i * 255 / 7) for i in 0..7 = 0, 36.4, 72.9, 109.3, 145.7, 182.1, 218.6, 255
    assert sample_experts(256) == [0, 36, 73, 109, 146, 182, 219, 255]


def test_quantized_act_by_hand() -> None:
    x = np.array([[1.0, -2.0, 0.5]])
    # fp8-token: s = 2/448; x/s = 224, -448, 112 are e4m3fn values: exact
    np.testing.assert_allclose(quantized_act(x, "fp8-token", "e4m3fn"), x, rtol=1e-7)
    # power-of-two scale 2**ceil(log2(2/448)) = 2**-7: x/s = 128, -256, 64: exact as well
    np.testing.assert_allclose(quantized_act(x, "fp8-token", "e4m3fn", pow2=True), x, rtol=1e-7)
    # int8: s = 2/127; x/s = 63.5 (a tie: to even, 64), -127, 31.75 (32)
    s = np.float32(2.0) / np.float32(127.0)
    np.testing.assert_allclose(quantized_act(x, "int8", ""), [[64 * s, -2.0, 32 * s]], rtol=1e-6)
    # e4m3fn between 1.0 (code 56) and 1.125 (57): the tie 1.0625 goes to the even code, 1.0; 1.1875
    # between 1.125 (57) and 1.25 (58) goes to 1.25. One 1x128 group of fp8-block, amax 448: s = 1.
    row = np.zeros((1, 128))
    row[0, :3] = [1.0625, 1.1875, 448.0]
    assert quantized_act(row, "fp8-block", "e4m3fn")[0, :3].tolist() == [1.0, 1.25, 448.0]
    np.testing.assert_array_equal(quantized_act(x, "int4-g128", ""), x)  # weight-only: untouched


@pytest.mark.parametrize("scheme", SCHEMES)
def test_numpy_expert_equals_the_shims_experts(scheme: str) -> None:
    """The declared reading recomputed in numpy is the shim's experts output (routing weight 1, the
    combine's factor 2.5 included) up to fp32 rounding, for every scheme."""
    mod = _experts(scheme)
    tensors = {k: v.contiguous() for k, v in mod.stored_tensors().items()}
    st = read_safetensors(st_save(tensors, metadata=mod.stored_metadata()))
    x = torch.randn(6, 160, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([[0], [1], [0], [1], [1], [0]])
    with torch.no_grad():
        served = mod(x, index, torch.ones(6, 1)).double().numpy()
    fmt = fp8_flavour(st.dtypes["gate_up_proj.weight"])
    for e in (0, 1):
        gu = hypotheses(scheme, expert_tensors(st, "gate_up", e), 272, 160)
        dn = hypotheses(scheme, expert_tensors(st, "down", e), 160, 136)
        rows = (index[:, 0] == e).numpy()
        y = expert_forward(x.numpy()[rows].astype(np.float64), gu["declared"], dn["declared"], scheme=scheme,
                           fmt=fmt, act="silu", dtype="float32", scale=2.5)  # fmt: skip
        np.testing.assert_allclose(y, served[rows], rtol=1e-4, atol=1e-6)


def test_expert_readings_name_each_gemm_and_the_combine() -> None:
    w = {"declared": np.zeros(1), "unit-scales": np.ones(1), "act-scales-pow2": np.zeros(1)}
    names = set(expert_readings(w, w | {"transposed": np.ones(1)}, "fp8-block", 2.5))
    assert names == {
        "declared", "unit-scales", "unit-scales@gate_up", "unit-scales@down", "transposed",
        "act-scales-pow2", "routed-scaling-missing",
    }  # fmt: skip
    assert set(expert_readings(w, w, "int4-g128", 1.0)) == {"declared", "unit-scales", "unit-scales@gate_up",
                                                            "unit-scales@down"}  # fmt: skip


def test_the_experts_describe_both_gemms_as_stored() -> None:
    """The contract (finding 3): weight_shape is the stored one (packed for 4-bit), as a linear's,
    with the logical in/out_features; down_proj is described too, and checked (finding 2)."""
    for scheme, packed in (("int4-g128", 80), ("mxfp4", 80), ("fp8-block", 160)):
        info = _experts(scheme).debug_info()
        assert info["weight_shape"] == [2, 272, packed] and (info["out_features"], info["in_features"]) == (
            272,
            160,
        )
        assert info["down"]["weight_shape"][:2] == [2, 160] and info["down"]["in_features"] == 136
        assert info["combine_scale"] == 2.5 and info["activation"] == "silu"
        assert all(structure_checks(info).values()), structure_checks(info)
        assert "down_scale_shape" in structure_checks(info)
    info = _experts("fp8-block").debug_info()
    info["down"] = info["down"] | {"scale_shape": [2, 1, 1]}  # [ceil(160/128), ceil(136/128)] = [2, 2]
    assert structure_checks(info)["down_scale_shape"] is False
    # the logical shape where the stored one is declared is a wrong entry
    info = _experts("int4-g128").debug_info() | {"weight_shape": [2, 272, 160]}
    assert structure_checks(info)["weight_shape"] is False


def test_a_direct_experts_call_is_one_request_and_a_3d_call_is_slots() -> None:
    """Finding 5's shim half: a 2-D direct call (a /debug/module replay of one request's rows) read
    each row as its own batch slot, so slot-variant changed it where the served output did not."""
    clean, faulty = _experts("fp8-block"), _experts("fp8-block", FaultSet(slot_variant=True))
    x = torch.randn(3, 4, 160, generator=torch.Generator().manual_seed(2))
    idx = torch.randint(0, 2, (3, 4, 2), generator=torch.Generator().manual_seed(3))
    w = torch.full((3, 4, 2), 0.5)
    with torch.no_grad():
        assert torch.equal(faulty(x[1], idx[1], w[1]), clean(x[1], idx[1], w[1]))  # one slot
        a, b = faulty(x, idx, w), clean(x, idx, w)  # [B, T, H]: B slots
    assert a.shape == x.shape and torch.equal(a[0], b[0])
    assert all((a[s] - b[s]).abs().max() > 1e-4 for s in (1, 2))


# ----------------------------------------------------------------------------- in process


async def test_correct_moe_targets_audit_clean_experts_included() -> None:
    """Finding 3: a correct int4-g128 / mxfp4 target (the torch golden) was FLAGGED (scale_shape,
    scale_stride) on every experts module; fp8-block: the experts are now measured, not flagged."""
    async with shim_endpoint("reference", reference()) as r:
        for scheme in ("int4-g128", "mxfp4", "fp8-block"):
            async with shim_endpoint("target", build("tiny-moe", scheme)) as t:
                rows = [await audit_module(t, r, f"model.layers.{i}.mlp.experts") for i in (1, 2, 3)]
            for row in rows:
                assert not row["flagged"] and row["audited"] and row["best"] == "declared", (scheme, row)
                assert row["kernel_hypotheses"]["declared"] < 1e-5 and all(row["checks"].values())
                assert row["backends"]["torch"]["available"] and not row["backends"]["torch"]["flagged"]
                assert "all 8 experts" in row["notes"][0]


@pytest.mark.parametrize(
    ("fault", "hint"),
    [
        ("scale-skipped", HINTS["unit-scales"]),
        ("fnuz-unnormalized", HINTS["fnuz-unnormalized"]),
        ("garbage-gemm", "the kernel's weight matches no layout hypothesis (wrong kernel for the arch?)"),
        ("scale-shuffle-ignored", HINTS["shuffle-toggled"]),
        (
            "routed-scaling-missing",
            "output x0.4 = 1/routed_scaling_factor 2.5: the factor looks never applied",
        ),
    ],
    ids=lambda v: v if " " not in v else "",
)
async def test_an_expert_fault_is_flagged_with_its_hint(fault: str, hint: str) -> None:
    """Finding 2: with the fault on the layer-2 experts of an fp8-block target the audit said "ok"
    (structure checks only) for all nine fault classes."""
    target = build("tiny-moe", "fp8-block", faults=[f"{fault}@{EXPERTS}"])
    async with shim_endpoint("reference", reference()) as r, shim_endpoint("target", target) as t:
        row = await audit_module(t, r, EXPERTS)
        other = await audit_module(t, r, "model.layers.1.mlp.experts")
    assert row["flagged"] and row["audited"] and row["hint"] == hint, row
    assert not other["flagged"] and other["best"] == "declared"


async def test_quant_flags_a_target_whose_only_quantized_modules_are_faulty_experts(
    monkeypatch, capsys
) -> None:
    """The repro: experts alone quantized, scale-skipped (output ~2e9x): "0 of 3 modules flagged",
    exit 0. A structure-only row is no audit either, so exit 4 would not do: flagged, exit 1."""
    from difftest.cli import quant as quant_cmd
    from difftest.cli import whitebox as whitebox_cli

    monkeypatch.setenv("COLUMNS", "400")
    bad = build("tiny-moe")
    skip = ["model.layers.*.self_attn.*", "model.layers.0.mlp.*", "model.layers.*.mlp.shared_experts.*"]
    quantize_model(bad.model, scheme="fp8-block", backend="torch", skip=skip, faults=["scale-skipped"])
    with shim_server("reference", reference()) as (r, _), shim_server("target", bad) as (t, _):
        serve_in_process(monkeypatch, {"reference": r, "target": t})
        monkeypatch.setattr(whitebox_cli.aio, "run", _run_in_current_loop)
        code = await quant_cmd.run(
            argparse.Namespace(config=None, ref="http://r", target="http://t", api_key_env=None)
        )
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "target: 3 of 3 modules flagged" in out, out
    assert f"FLAGGED {EXPERTS}: {HINTS['unit-scales']}" in out


async def test_rows_that_measured_nothing_are_nothing_audited(monkeypatch, capsys) -> None:
    """A target whose rows only passed structure checks audited nothing: exit 4, said, never 0."""
    from difftest.cli import quant as quant_cmd
    from difftest.cli import whitebox as whitebox_cli
    from difftest.whitebox import audit as audit_mod

    async def structure_only(target, reference):  # noqa: ANN001, ANN202
        return [{"module": EXPERTS, "scheme": "fp8-block", "checks": {"scale_shape": True}, "flagged": False,
                 "audited": False, "hint": None, "notes": ["hypothesis test n/a: a moe module"]}]  # fmt: skip

    monkeypatch.setattr(audit_mod, "audit", structure_only)
    with shim_server("target", build("tiny-moe", "fp8-block")) as (t, _):
        serve_in_process(monkeypatch, {"target": t})
        monkeypatch.setattr(whitebox_cli.aio, "run", _run_in_current_loop)
        code = await quant_cmd.run(
            argparse.Namespace(config=None, ref=None, target="http://t", api_key_env=None)
        )
    out = " ".join(capsys.readouterr().out.split())
    assert code == quant_cmd.NOTHING_AUDITED == 4, out
    assert "0 of 1 modules flagged; 1 not audited" in out and "nothing audited" in out
