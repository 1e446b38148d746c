"""difftest.whitebox.audit: structure checks, numpy dequantization against server_shim's torch
reference, hypothesis judging; in process: audits of a correct and of faulty targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from test_layers import _run_in_current_loop, build, serve_in_process, shim_endpoint, shim_server

from difftest.whitebox.audit import (
    audit,
    audit_module,
    expected_scale_shape,
    hypotheses,
    judge_hypotheses,
    pow2_act_factor,
    probe_value,
    reread,
    shuffle_perm,
    structure_checks,
)
from difftest.whitebox.safetensors import read_safetensors
from server_shim.quant import formats as F
from server_shim.quant.linear import _metadata


def test_expected_scale_shapes() -> None:
    assert expected_scale_shape("fp8-block", 300, 129) == (3, 2)  # ceil(300/128) x ceil(129/128)
    assert expected_scale_shape("int4-g128", 64, 256) == (64, 2)
    assert expected_scale_shape("mxfp4", 64, 96) == (64, 3)
    assert expected_scale_shape("fp8-token", 64, 96) == (64, 1)
    assert expected_scale_shape("fp8-tensor", 64, 96) == (1, 1)


def _info(**kw: object) -> dict:
    base = {"kind": "linear", "scheme": "int4-g128", "weight_dtype": "uint8", "weight_shape": [128, 128],
            "scale_shape": [128, 2], "scale_stride": [2, 1], "scale_layout": {"order": "row-major", "shuffled": False},
            "in_features": 256, "out_features": 128}  # fmt: skip
    return base | kw


def test_structure_checks() -> None:
    assert all(structure_checks(_info()).values())
    assert not structure_checks(_info(scale_stride=[1, 128]))[
        "scale_stride"
    ]  # col-major strides, row-major declared
    assert structure_checks(_info(scale_stride=[1, 128], scale_layout={"order": "col-major"}))["scale_stride"]
    assert not structure_checks(_info(scale_shape=[2, 128]))["scale_shape"]
    assert not structure_checks(_info(weight_dtype="int8"))["weight_dtype"]
    # a size-1 dimension's stride is never read
    tok = _info(
        scheme="fp8-token",
        weight_dtype="float8_e4m3fn",
        weight_shape=[128, 256],
        scale_shape=[128, 1],
        scale_stride=[1, 7],
    )
    assert all(structure_checks(tok).values())


def test_reread_transposes_and_shuffle_matches_the_shim() -> None:
    s = np.arange(6.0).reshape(2, 3)
    t = reread(s, (3, 1), (1, 2))  # row-major memory read with col-major strides
    assert t.tolist() == [[0, 2, 4], [1, 3, 5]]
    for rows in (1, 5, 16, 37):
        assert shuffle_perm(rows).tolist() == F.shuffle_perm(rows).tolist()


def _stored(
    scheme: str, w: torch.Tensor, layout: F.ScaleLayout = F.ScaleLayout()
) -> tuple[F.QuantizedWeight, bytes]:
    qw = F.quantize_weight(w, scheme, layout=layout)
    tensors = {"weight": qw.data, "weight_scale": qw.scales.contiguous()}
    if qw.zeros is not None:
        tensors["weight_zero"] = qw.zeros
    return qw, st_save(tensors, metadata=_metadata(scheme, layout, qw.scales, qw.shape))


@pytest.mark.parametrize("scheme", ["fp8-tensor", "fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4"])
def test_numpy_dequantize_equals_the_torch_reference(scheme: str) -> None:
    w = torch.randn(160, 256, generator=torch.Generator().manual_seed(0))
    qw, body = _stored(scheme, w, F.ScaleLayout("row-major", shuffled=True))
    st = read_safetensors(body)
    h = hypotheses(scheme, st, 160, 256)
    np.testing.assert_allclose(h["declared"], F.dequantize(qw).double().numpy(), rtol=1e-6, atol=0)
    assert "unit-scales" in h
    if scheme != "fp8-tensor":  # one scale has no rows to shuffle
        assert float(np.abs(h["shuffle-toggled"] - h["declared"]).max()) > 0


def test_pow2_act_factor_by_hand() -> None:
    # 45/64 / 448 = 2**-9.32 -> scale 2**-9 -> 360, between e4m3's 352 and 384 (step 32): 352
    assert pow2_act_factor("e4m3fn", 45 / 64) == 352 / 360
    # e4m3fnuz (qmax 240): 2**-8.42 -> 2**-8 -> 180, between 176 and 192 (step 16): 176
    assert pow2_act_factor("e4m3fnuz", 45 / 64) == 176 / 180
    # an identity of ones is blind: 1 / 448 -> 2**-8 -> 256, an e4m3 value
    assert pow2_act_factor("e4m3fn", 1.0) == 1.0
    # a tie goes to the even code (round to nearest even): 0.71875 * 2**9 = 368, half way between
    # 352 (code 0x7B, mantissa 011) and 384 (0x7C, mantissa 100) -> 384
    assert pow2_act_factor("e4m3fn", 0.71875) == 384 / 368
    # int8 (qmax 127): 45/64 / 127 = 2**-7.50 -> 2**-7 -> 90, an integer: blind
    assert pow2_act_factor("int8", 45 / 64) == 1.0
    # 1031/2048 / 127 = 2**-7.98 -> 2**-7 -> 64.4375 -> 64
    assert pow2_act_factor("int8", 1031 / 2048) == 64 / 64.4375
    # a tie goes to the even integer: 181/256 * 2**7 = 90.5 -> 90; 183/256 -> 91.5 -> 92
    assert pow2_act_factor("int8", 181 / 256) == 90 / 90.5
    assert pow2_act_factor("int8", 183 / 256) == 92 / 91.5


def test_probe_value_is_exact_in_every_dtype_it_is_sent_in() -> None:
    wide = probe_value("int8", ["float32", "float16"])
    assert wide == 1031 / 2048 and torch.tensor(wide, dtype=torch.float16).item() == wide
    assert torch.tensor(wide, dtype=torch.bfloat16).item() != wide  # why bf16 keeps PROBE
    for scheme, dtypes in [("int8", ["float16", "bfloat16"]), ("int8", ["float16", None]), ("int8", []),
                           ("fp8-block", ["float32"]), ("int4-g128", ["float16"])]:  # fmt: skip
        p = probe_value(scheme, dtypes)
        assert p == 45 / 64 and torch.tensor(p, dtype=torch.bfloat16).item() == p


def test_int8_pow2_hypothesis_only_where_the_probe_can_show_it() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    st = read_safetensors(_stored("int8", w)[1])
    assert "act-scales-pow2" not in hypotheses("int8", st, 64, 128)  # PROBE: the factor is 1
    h = hypotheses("int8", st, 64, 128, probe_value("int8", ["float32"]))
    np.testing.assert_allclose(h["act-scales-pow2"], h["declared"] * (64 / 64.4375), rtol=1e-12)


def test_judge_hypotheses() -> None:
    assert judge_hypotheses({}, {"declared": 0.0, "transposed": 0.3}) == ("declared", None)
    best, hint = judge_hypotheses({}, {"declared": 0.2, "transposed": 1e-7, "unit-scales": 50.0})
    assert (best, hint) == ("transposed", "scales look transposed")
    best, hint = judge_hypotheses({}, {"declared": 1.4, "transposed": 1.3, "unit-scales": 80.0})
    assert hint is not None and "matches no layout hypothesis" in hint
    assert (
        judge_hypotheses({"declared": 0.9}, {})[1]
        == "the stored weight does not reconstruct the reference weight"
    )


async def test_audit_of_correct_and_faulty_targets() -> None:
    ref = build()
    good = build(scheme="int4-g128")
    bad = build(scheme="int4-g128", faults=["scale-transposed@model.layers.1.mlp.down_proj"])
    async with (
        shim_endpoint("ref", ref) as r,
        shim_endpoint("good", good) as g,
        shim_endpoint("bad", bad) as b,
    ):
        rows = await audit(g, r)
        row = await audit_module(b, r, "model.layers.1.mlp.down_proj")
        other = await audit_module(b, r, "model.layers.0.mlp.down_proj")
    assert len(rows) == 28 and not any(x["flagged"] for x in rows), [x for x in rows if x["flagged"]]
    assert all(x["best"] == "declared" for x in rows)
    # backend table: torch and the Triton interpreter run the same arithmetic; _scaled_mm has no int4
    for x in rows:
        bt = x["backends"]
        assert bt["torch"]["available"] and bt["triton"]["available"], bt
        assert bt["torch"]["cosine"] == pytest.approx(bt["triton"]["cosine"], abs=1e-5)
        assert 0.95 < bt["torch"]["cosine"] < 1.0  # int4's own error vs FP32 weights
        assert not bt["vendor"]["available"] and bt["vendor"]["reason"]
    # int4 on gaussian weights: the scheme's own error vs FP32 is ~0.1 of the weight norm
    assert all(0.0 < x["hypotheses"]["declared"] < 0.2 for x in rows)
    assert row["best"] == "transposed" and row["hint"] == "scales look transposed" and row["flagged"]
    assert row["kernel_hypotheses"]["transposed"] < 1e-6 < row["kernel_hypotheses"]["declared"]
    assert other["best"] == "declared" and not other["flagged"]


async def test_quant_command_flags_a_faulty_target(monkeypatch, capsys) -> None:
    import argparse

    from difftest.cli import quant as quant_cmd
    from difftest.cli import whitebox as whitebox_cli

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    bad = build(scheme="fp8-block", faults=["scale-skipped@model.layers.0.self_attn.q_proj"])
    with shim_server("reference", build()) as (r, r_t), shim_server("target", bad) as (t, t_t):
        serve_in_process(monkeypatch, {"reference": r, "target": t})
        monkeypatch.setattr(whitebox_cli.aio, "run", _run_in_current_loop)
        code = await quant_cmd.run(
            argparse.Namespace(config=None, ref="http://r", target="http://t", api_key_env=None)
        )
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "scales look skipped" in out and "backends: cosine vs FP32" in out
    assert r_t.count("GET", "/debug/config") == t_t.count("GET", "/debug/config") == 1
