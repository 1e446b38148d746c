"""Issue 6 acceptance, in process: every fault class of docs/design.md "Fault injection" injected into one module of
tiny-llama (tiny-moe for routed-scaling-missing), localised against its golden and against FP32.

- with a golden: the layers verdict FAILs and the guilty module is the injected one;
- without a golden (vs FP32): the injected module ranks first by local error relative to its
  siblings' median (ue8m0-rounding excepted: see UE8M0 below);
- correct fp8-block / int8 / int4-g128 targets PASS exactness (torch vs torch; triton in the
  interpreter vs torch); the reference against itself and against its rounding twin flags nothing.

All with the limits `run` uses: the module replay bound of the dtype (float32: 5e-4; server_shim.tolerance).
CI runs it on CPU in float32; the env variables of test_layers.py run it on a GPU.

Run with `-s` to see the table of numbers (fault, guilty module, local cos, norm ratio, rel err).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from test_layers import DTYPE, PROMPT, build, shim_endpoint

from difftest.null import MARGIN, replay_bound
from difftest.results import LayerDiff
from difftest.whitebox.activations import LayerThresholds
from difftest.whitebox.audit import HINTS
from difftest.whitebox.layers import diff_layers, layer_verdict
from difftest.whitebox.localise import localise_target
from difftest.whitebox.replay import rank_modules
from server_shim.models import LoadedModel
from server_shim.twin import apply_rounding_twin

TH = LayerThresholds(exact_local_rel_err=replay_bound(DTYPE)[0])
# The backend the faulty targets run on (their goldens are torch): triton on a GPU.
FAULT_BACKEND = os.environ.get("DIFFTEST_TEST_BACKEND", "torch")

# (fault, model, scheme, module). Schemes where the class bites on tiny-llama's 128-wide
# matrices: fp8-block scales there are 1x1 / 2x1 / 1x2, so a transposed read of them is a no-op;
# int4-g128's [N, K/128] scales are not.
CASES = [
    ("garbage-gemm", "tiny-llama", "fp8-block", "model.layers.0.self_attn.q_proj"),
    ("scale-transposed", "tiny-llama", "int4-g128", "model.layers.1.mlp.down_proj"),
    ("scale-shuffle-ignored", "tiny-llama", "int8", "model.layers.2.mlp.gate_proj"),
    ("scale-skipped", "tiny-llama", "fp8-block", "model.layers.3.self_attn.v_proj"),
    ("fnuz-unnormalized", "tiny-llama", "fp8-block", "model.layers.1.self_attn.o_proj"),
    ("transpose-noop", "tiny-llama", "int8", "model.layers.2.self_attn.q_proj"),
    ("routed-scaling-missing", "tiny-moe", "fp8-block", "model.layers.2.mlp.experts"),
    ("ue8m0-rounding", "tiny-llama", "fp8-block", "model.layers.3.mlp.up_proj"),
    ("ue8m0-rounding", "tiny-llama", "int8", "model.layers.2.mlp.up_proj"),
    ("slot-variant", "tiny-llama", "fp8-token", "model.layers.0.mlp.down_proj"),
]
# UE8M0 (power-of-two activation scales) barely moves fp8: e4m3's relative precision does not
# depend on the scale. Measured: local rel err 0.036 vs golden (36x the 1e-3 bound: it FAILs),
# but vs FP32 0.038 against a sibling median of ~0.035: not separable from the scheme's own error.
UE8M0 = "ue8m0-rounding"
# int8's ue8m0 moves its module by ~1.1% (local rel err 0.0109 in float16 and float32): over the
# float16 / float32 replay bounds, under bfloat16's (0.0156; 0.0122 measured on an H200, Triton).
INT8_UE8M0_BF16 = (
    "int8 ue8m0 (local rel err ~0.012) lies inside the bfloat16 replay bound 0.0156: not a failure there"
)
_models: dict[tuple[str, str], LoadedModel] = {}


def model(name: str, scheme: str = "none") -> LoadedModel:
    if (name, scheme) not in _models:
        _models[(name, scheme)] = build(name, scheme)
    return _models[(name, scheme)]


def _row(label: str, diff: LayerDiff, module: str, rank: int) -> str:
    p = next(q for q in diff.points if q.name == module)
    return (
        f"{label:24s} {diff.kind:10s} guilty={diff.guilty_module} rank={rank} local cos {p.local_cosine:.4f} "
        f"norm ratio {p.local_norm_ratio:.3f} rel err {p.local_rel_err:.3g} first layer {diff.first_divergent_layer}"
    )


def _rank(diff: LayerDiff, module: str) -> int:
    leaves = {
        p.name: p.local_rel_err
        for p in diff.points
        if p.local_rel_err is not None and p.kind in ("linear", "moe")
    }
    return [n for n, _ in rank_modules(leaves, diff.kind)].index(module)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fault", "name", "scheme", "module"),
    CASES,
    ids=[c[0] if c[0] != UE8M0 else f"{c[0]}-{c[2]}" for c in CASES],
)
async def test_fault_is_failed_and_localised(fault: str, name: str, scheme: str, module: str) -> None:
    if fault == UE8M0 and scheme == "int8" and DTYPE == "bfloat16":
        pytest.skip(INT8_UE8M0_BF16)
    target = build(name, scheme, backend=FAULT_BACKEND, faults=[f"{fault}@{module}"])
    async with (
        shim_endpoint("golden", model(name, scheme)) as gold,
        shim_endpoint("reference", model(name)) as ref,
        shim_endpoint("target", target) as tgt,
    ):
        found = await localise_target(
            tgt, prompt=PROMPT, golden=gold, reference=ref, decode_steps=1, thresholds=TH
        )
    exact, acc = found.diffs
    blamed = {d.guilty_module for d in found.diffs if d.guilty_module}
    assert sorted(r["module"] for r in found.audit) == sorted(blamed)  # one audit per blamed module
    print("\n" + _row(fault, exact, module, _rank(exact, module)))
    print(_row(fault, acc, module, _rank(acc, module)))
    print("   ", exact.summary)
    verdict = layer_verdict(exact, TH)
    assert not verdict.passed and any(module in r for r in verdict.reasons), verdict.reasons
    assert exact.guilty_module == module
    assert exact.guilty_backend == FAULT_BACKEND
    assert module in exact.summary
    # the audit names ue8m0 (activation scales rounded to powers of two) and nothing else as it
    # (int8 in bf16, where no probe can show it, was skipped above)
    assert (exact.audit_hint == HINTS["act-scales-pow2"]) == (fault == UE8M0), exact.audit_hint
    # an MoE off by its own routed_scaling_factor says so (norm ratio 1/2.5 on tiny-moe)
    assert ("1/routed_scaling_factor 2.5" in (exact.audit_hint or "")) == (fault == "routed-scaling-missing")
    if fault == UE8M0:
        # inside the scheme's own error vs FP32 (see UE8M0): nothing else may be blamed either
        assert acc.guilty_module in (None, module)
    else:
        assert _rank(acc, module) == 0


@pytest.mark.parametrize(
    ("scheme", "backend"),
    [
        ("fp8-block", "torch"),
        ("int8", "torch"),
        ("int4-g128", "torch"),
        ("fp8-block", "triton"),  # the Triton interpreter on CPU: ~2-5 s each
        ("int8", "triton"),
        ("int4-g128", "triton"),
    ],
)
async def test_correct_target_passes_exactness(scheme: str, backend: str) -> None:
    target = build("tiny-llama", scheme, backend=backend)
    async with (
        shim_endpoint("golden", model("tiny-llama", scheme)) as g,
        shim_endpoint("target", target) as t,
    ):
        diff = await diff_layers(g, t, PROMPT, kind="exactness", thresholds=TH)
    worst = max(p.local_rel_err for p in diff.points if p.local_rel_err is not None)
    resid = max(p.rel_err for p in diff.points if p.kind in ("residual", "logits"))
    print(
        f"\n{scheme} {backend} vs torch golden: worst local rel err {worst:.3g}, worst residual/logits rel err {resid:.3g}"
    )
    assert layer_verdict(diff, TH).passed, layer_verdict(diff, TH).reasons
    assert diff.guilty_module is None and not any(p.flagged for p in diff.points)


async def test_reference_against_itself_has_zero_flagged_layers() -> None:
    async with shim_endpoint("a", model("tiny-moe")) as a, shim_endpoint("b", model("tiny-moe")) as b:
        diff = await diff_layers(a, b, PROMPT, kind="exactness")
    assert diff.points and not any(p.flagged for p in diff.points)
    assert diff.first_divergent_layer is None and diff.guilty_module is None
    assert any(p.kind == "moe" and p.local_rel_err == 0.0 for p in diff.points)  # experts replayed too


async def test_reference_against_its_rounding_twin_has_zero_flagged_layers() -> None:
    """As `run` judges it: one twin (seed 0) sets the accumulated point bound (max of the fixed
    default and MARGIN x its worst point, runner._whitebox); a second twin (seed 1) is judged."""
    twins = [build("tiny-llama", "fp8-block") for _ in range(2)]
    for seed, twin in enumerate(twins):
        assert apply_rounding_twin(twin.model, None, seed=seed, dtype=DTYPE) > 0
    async with (
        shim_endpoint("g", model("tiny-llama", "fp8-block")) as g,
        shim_endpoint("null", twins[0]) as n,
        shim_endpoint("twin", twins[1]) as t,
    ):
        null = await diff_layers(g, n, PROMPT, kind="exactness", thresholds=TH)
        null_point = max(p.rel_err for p in null.points if p.kind in ("residual", "logits"))
        th = dataclasses.replace(TH, exact_point_rel_err=max(TH.exact_point_rel_err, MARGIN * null_point))
        diff = await diff_layers(g, t, PROMPT, kind="exactness", thresholds=th)
    worst = max(p.local_rel_err for p in diff.points if p.local_rel_err is not None)
    print(f"\ntwin: worst local rel err {worst:.3g}, point bound {th.exact_point_rel_err:.3g}")
    assert 0 < worst < TH.exact_local_rel_err  # the twin really differs, and within the bound
    assert not any(p.flagged for p in diff.points) and diff.guilty_module is None
    assert layer_verdict(diff, th).passed


async def test_slot_variant_is_named_as_such_not_as_a_layout() -> None:
    """fp8-block slot-variant in a K = 256 module (two scale groups per row): the sentence names the
    slot dependence, and the audit, which reads the weight in one batch slot, finds the declared
    layout. Read as 256 slots, the identity's rows met slot 0's group scales and the audit blamed
    "no layout hypothesis (wrong kernel for the arch?)" (smollm2 on an H200, 2026-12-04)."""
    module = "model.layers.0.mlp.down_proj"
    target = build("tiny-llama", "fp8-block", backend=FAULT_BACKEND, faults=[f"slot-variant@{module}"])
    async with (
        shim_endpoint("golden", model("tiny-llama", "fp8-block")) as gold,
        shim_endpoint("target", target) as tgt,
    ):
        found = await localise_target(tgt, prompt=PROMPT, golden=gold, decode_steps=1, thresholds=TH)
    (exact,) = found.diffs
    assert exact.guilty_module == module
    point = next(p for p in exact.points if p.name == module)
    assert point.slot_dependent and point.slot_rel_err > 10 * TH.slot_rel_err
    assert [p.name for p in exact.points if p.slot_dependent] == [module]
    assert "its output depends on the batch slot" in exact.summary and "so do 1 of " in exact.summary
    (row,) = found.audit
    assert not row.get("hint"), row  # the weight itself is the declared one
    assert any(w.startswith("output depends on the batch slot in 1 of ") for w in exact.warnings)
