"""MoE white-box fixes (tester t16: findings 1, 4, 5): the routing rescale measured per experts
module, router top-k flips named where no module explains a divergence, and experts replayed in
two batch slots like linears.

Pure parts with hand values, then in process over tiny-moe (CPU float32) as tests/test_layers.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_layers import PROMPT, build, shim_endpoint

from difftest.results import LayerDiff, LayerPoint, RoutingFlips
from difftest.whitebox.layers import diff_layers
from difftest.whitebox.localise import localisation_sentence, localise_target
from difftest.whitebox.replay import (
    rescale_note,
    routing_counts,
    routing_differences,
    routing_flips,
    routing_note,
    routing_rescales,
    slot_reach,
)
from difftest.whitebox.safetensors import SafeTensors

L1, L2, L3 = (f"model.layers.{i}.mlp.experts" for i in (1, 2, 3))


def _st(tensors: dict[str, np.ndarray]) -> SafeTensors:
    dtypes = {k: "I64" if v.dtype.kind == "i" else "F32" for k, v in tensors.items()}
    return SafeTensors(tensors, dtypes, {})


def _point(name: str, kind: str, **kw: float | bool | None) -> LayerPoint:
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    return LayerPoint(name, layer, kind, 1.0, 1.0, 0.0, 0.0, 99.0, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- finding 1: rescale per module


def test_the_routing_rescale_is_measured_per_experts_module() -> None:
    """The bug: one ratio, from the first experts module (layer 1: unquantized, factor still in the
    router, ratio 1.0), applied to every layer; layers 2-3 moved the factor (2.5) into the combine,
    so their replays got it twice (x2.5). Hand values: the target's layer-2 weights are the
    baseline's / 2.5 (ratio 0.4), layer 1's the same."""
    w = np.array([[1.5, 1.0], [2.0, 0.5], [1.25, 1.25]], np.float32)  # sums 2.5 each
    base = _st({f"{L1}:top_k_weights": w, f"{L2}:top_k_weights": w})
    tgt = _st({f"{L1}:top_k_weights": w, f"{L2}:top_k_weights": w / 2.5})
    got = routing_rescales(base, tgt, [L1, L2, L3])  # L3 captured on neither side: left out
    assert got == {L1: 1.0, L2: pytest.approx(0.4)}
    note = rescale_note(got)
    assert note is not None and "in 1 of 2 experts modules" in note and f"x0.4 in {L2}" in note
    assert rescale_note({L1: 1.0}) is None


async def test_a_target_quantizing_the_experts_of_some_layers_only_is_not_failed() -> None:
    """Tester's repro 1: fp8-block with `quant_skip = ["model.layers.1.mlp.experts"]` against fp32
    was blamed "model.layers.2.mlp.experts ... norm ratio 2.48 ... the factor looks applied
    twice". Every experts module now replays at the scheme's magnitude."""
    target = build("tiny-moe")
    from server_shim.quant.linear import quantize_model

    quantize_model(target.model, scheme="fp8-block", backend="torch", skip=[L1])
    async with shim_endpoint("reference", build("tiny-moe")) as r, shim_endpoint("target", target) as t:
        diff = await diff_layers(r, t, PROMPT, kind="accuracy")
    ratios = {p.name: p.local_norm_ratio for p in diff.points if p.kind == "moe"}
    assert set(ratios) == {L1, L2, L3}
    assert all(0.9 <= r <= 1.1 for r in ratios.values()), ratios  # were 1.0, 2.50, 2.52
    assert diff.guilty_module is None
    assert any("in 2 of 3 experts modules" in w for w in diff.warnings), diff.warnings


# ---------------------------------------------------------------- finding 4: routing flips


def test_routing_differences_count_tokens_whose_expert_set_differs() -> None:
    base = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    tgt = np.array([[1, 0], [2, 4], [4, 5], [7, 0]])  # token 0 reordered only: the same experts
    assert routing_differences(base, tgt) == 2


def test_the_routing_counts_per_layer_and_their_note() -> None:
    idx = np.array([[0, 1], [2, 3], [4, 5]])
    base = _st({f"{L1}:top_k_index": idx, f"{L2}:top_k_index": idx, f"{L3}:top_k_index": idx})
    moved = idx.copy()
    moved[1] = [2, 7]
    tgt = _st({f"{L1}:top_k_index": idx, f"{L2}:top_k_index": moved, f"{L3}:top_k_index": moved[::-1]})
    flips = routing_counts(base, tgt, [L1, L2, L3])
    assert flips == [RoutingFlips(2, 1, 3), RoutingFlips(3, 3, 3)]
    assert routing_note(flips, "ref") == (
        "router top-k differs from ref's (tokens sent to other experts) at "
        "1 of 3 tokens in layer 2, 3 of 3 tokens in layer 3"
    )
    assert routing_flips(LayerDiff("ref", "accuracy", routing_flips=flips)) == {2: (1, 3), 3: (3, 3)}
    assert routing_counts(base, base, [L1, L2, L3]) == []  # nothing differs: no counts, no warning
    assert routing_note([], "ref") is None


def _drift(flips: list[RoutingFlips], block_replayed: bool = True) -> LayerDiff:
    """A correct MoE target against FP16: residual flagged at layer 2, every replay within bounds."""
    points = [
        _point("model.layers.1", "residual"),
        _point("model.layers.2", "residual", flagged=True),
        _point(f"{L2}", "moe", local_cosine=0.998, local_norm_ratio=1.0, local_rel_err=0.06),
        _point("model.layers.2.mlp", "mlp", **({"local_cosine": 0.998, "local_norm_ratio": 1.0,
                                                 "local_rel_err": 0.06} if block_replayed else {})),
    ]  # fmt: skip
    note = routing_note(flips, "ref")
    return LayerDiff("ref", "accuracy", points=points, first_divergent_layer=2,
                     first_divergent_point="model.layers.2", warnings=[note] if note else [],
                     routing_flips=flips)  # fmt: skip


def test_a_divergence_where_the_router_flipped_tokens_names_the_flips() -> None:
    """Tester's repro 4: "no replayed module shows local error (attention core, norm or rotary?)"
    where 3 of 12 tokens of layer 2 were routed to other experts."""
    flips = [RoutingFlips(2, 3, 12), RoutingFlips(3, 1, 12)]
    said = localisation_sentence(_drift(flips))
    assert said.startswith(
        "first divergent layer 2, no replayed module shows local error (router top-k differs at "
        "3 of 12 tokens in layer 2, 1 of 12 in layer 3: tokens sent to other experts, while the MoE "
        "block replays within bounds on the baseline's input, so near-tie routing flips"
    ), said
    assert "attention core" not in said
    # the MoE block not replayed: the sentence cannot vouch for the router, and says so
    assert "likely near-tie routing flips; the MoE block was not replayed" in localisation_sentence(
        _drift(flips, block_replayed=False)
    )
    # flips only after the first divergent layer do not explain it: the old suspects stay
    later = [RoutingFlips(3, 2, 12)]
    assert "(attention core, norm or rotary?)" in localisation_sentence(_drift(later))
    assert "(attention core, norm or rotary?)" in localisation_sentence(_drift([]))


async def test_a_correct_moe_target_drifting_on_routing_flips_says_so() -> None:
    """Live: fully quantized fp8-block tiny-moe against fp32 (the tester's repro 4)."""
    async with (
        shim_endpoint("reference", build("tiny-moe")) as r,
        shim_endpoint("target", build("tiny-moe", "fp8-block")) as t,
    ):
        loc = await localise_target(t, prompt=PROMPT, reference=r)
    (diff,) = loc.diffs
    layer = diff.first_divergent_layer
    assert diff.guilty_module is None and layer is not None
    flips = routing_flips(diff)
    assert flips.get(layer, (0, 0))[0] > 0, diff.warnings
    assert routing_note(diff.routing_flips, "reference") in diff.warnings  # the human's copy, same counts
    assert (
        f"router top-k differs at {flips[layer][0]} of {flips[layer][1]} tokens in layer {layer}"
        in diff.summary
    )
    assert "attention core" not in diff.summary


# ---------------------------------------------------------------- finding 5: experts in two slots


def test_slot_reach_counts_experts_apart_from_linears() -> None:
    lin = [_point(f"model.layers.{i}.mlp.up_proj", "linear", slot_rel_err=0.0) for i in range(2)]
    moe = [_point(L1, "moe", slot_rel_err=0.5, slot_dependent=True), _point(L2, "moe", slot_rel_err=0.0)]
    assert slot_reach(LayerDiff("g", "exactness", points=lin)) == "0 of 2 linears replayed in two slots"
    assert (
        slot_reach(LayerDiff("g", "exactness", points=lin + moe))
        == "0 of 2 linears and 1 of 2 MoE experts replayed in two slots"
    )


async def test_a_slot_variant_experts_kernel_is_attributed_to_the_batch_slot() -> None:
    """Tester's repro 5: slot-variant on the experts only, against the golden, one prompt: the
    served output is bit-identical (a request alone is slot 0), yet the experts were blamed with
    plain local error and no slot clause: replayed in one 2-D call, whose rows the shim read as
    slots. Now the experts are replayed in two slots, like linears: slot 1 is what moves."""
    gold = build("tiny-moe", "fp8-block")
    faulty = build("tiny-moe", "fp8-block", faults=["slot-variant@*.mlp.experts"])
    async with shim_endpoint("golden", gold) as g, shim_endpoint("target", faulty) as t:
        loc = await localise_target(t, prompt=PROMPT, golden=g)
    (diff,) = loc.diffs
    experts = {p.name: p for p in diff.points if p.kind == "moe"}
    assert all(p.rel_err == 0 for p in experts.values())  # served alike: a request alone is slot 0
    assert all(p.slot_dependent and p.slot_rel_err and p.slot_rel_err > 0.1 for p in experts.values())
    assert diff.guilty_module in experts
    assert "its output depends on the batch slot" in diff.summary
    assert "0 of 32 linears and 3 of 3 MoE experts replayed in two slots" in diff.summary
    assert not any(p.slot_dependent for p in diff.points if p.kind == "linear")


async def test_a_correct_experts_replay_in_two_slots_is_slot_independent_beside_a_2d_only_server() -> None:
    """The fp32 reference's experts (transformers' own) take [T, H] only: it refuses the two-slot
    [2, T, H] body and gets the rows stacked instead, so the pair still compares; the quantized
    target's slots are measured, and equal."""
    async with (
        shim_endpoint("reference", build("tiny-moe")) as r,
        shim_endpoint("target", build("tiny-moe", "fp8-block")) as t,
    ):
        diff = await diff_layers(r, t, PROMPT, kind="accuracy")
    experts = [p for p in diff.points if p.kind == "moe"]
    assert len(experts) == 3 and not any(w.startswith("replay of ") for w in diff.warnings), diff.warnings
    for p in experts:
        assert p.slot_rel_err == 0.0 and not p.slot_dependent
        assert p.local_cosine is not None and math.isfinite(p.local_cosine) and p.local_cosine > 0.99
