"""White-box localisation fixes (tester t5's items 2, 3, 5, 6 and 7): which module is blamed when
several are out of bounds, what the sentence and table say of the others, and what a failed or
absent module replay does to `difftest layers`' exit code."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import numpy as np
import pytest

from difftest.cli.layers import diff_failed, render_layers, unmade
from difftest.cli.options import console
from difftest.errors import RequestRejected, ServerError, UnreadableBody
from difftest.results import LayerDiff, LayerPoint
from difftest.whitebox import replay as R
from difftest.whitebox.activations import Activations, LayerThresholds, layer_of
from difftest.whitebox.localise import localisation_sentence
from difftest.whitebox.replay import choose_guilty
from difftest.whitebox.safetensors import read_safetensors, write_safetensors
from server_shim import debug_protocol as P

TH = LayerThresholds(exact_local_rel_err=5e-4)


def _res(layer: int, rel: float, flagged: bool) -> LayerPoint:
    return LayerPoint(f"model.layers.{layer}", layer, "residual", 1 - rel, 1.0, rel, rel, 30.0, flagged)


def _mod(name: str, rel: float, kind: str = "linear") -> LayerPoint:
    return LayerPoint(name, layer_of(name), kind, 1.0, 1.0, 0.0, 0.0, 99.0, local_cosine=1 - rel / 2,
                      local_norm_ratio=1.0, local_rel_err=rel)  # fmt: skip


def _two_faults() -> LayerDiff:
    """smollm2 fp8-block: fnuz at layer 8's gate_proj (0.49999), transposed scales at layer 17's
    down_proj (0.599, worse): the residual first crosses its bound at layer 8."""
    pts = [_res(7, 1e-4, False), _res(8, 0.2, True), _res(17, 0.4, True)]
    pts += [_mod("model.layers.8.mlp.gate_proj", 0.49999), _mod("model.layers.8.mlp.up_proj", 1e-5)]
    pts += [_mod("model.layers.17.mlp.down_proj", 0.599)]
    return LayerDiff(
        "golden", "exactness", pts, first_divergent_layer=8, first_divergent_point="model.layers.8"
    )


def test_the_first_divergent_layers_module_is_blamed_and_the_other_counted(capsys) -> None:
    """Was: 'first divergent layer 8, local error in model.layers.17.mlp.down_proj', the layer-8
    fault named nowhere in the terminal."""
    diff = _two_faults()
    assert choose_guilty(diff, "fp8-block", TH) == ("model.layers.8.mlp.gate_proj", 0.49999)
    diff.guilty_module = "model.layers.8.mlp.gate_proj"
    assert localisation_sentence(diff, "fp8-block", TH) == (
        "first divergent layer 8, local error in model.layers.8.mlp.gate_proj (local cos 0.75, norm ratio 1.00, "
        "rel err 0.5); 1 other module out of bounds, the worst model.layers.17.mlp.down_proj (local rel err 0.599)"
    )
    diff.summary = localisation_sentence(diff, "fp8-block", TH)
    render_layers(diff, "tgt", console(), scheme="fp8-block", thresholds=TH)
    flags = {
        cells[2].strip(): cells[9].strip()
        for cells in (line.split("│") for line in capsys.readouterr().out.splitlines())
        if len(cells) > 9
    }
    assert flags["model.layers.8.mlp.gate_proj"] == "GUILTY"
    assert flags["model.layers.17.mlp.down_proj"] == "LOCAL"
    assert "model.layers.8.mlp.up_proj" not in flags  # in bounds: still only with --all-points


def test_a_first_divergent_layer_without_a_bad_module_falls_back_to_the_worst() -> None:
    diff = _two_faults()
    diff.first_divergent_layer = 5  # an attention-core fault upstream, say: no module of layer 5 replays bad
    assert choose_guilty(diff, "fp8-block", TH)[0] == "model.layers.17.mlp.down_proj"


@pytest.mark.parametrize("first", [1, None], ids=["first-divergent-layer-1", "no-divergent-layer"])
def test_a_fault_in_every_module_is_blamed_where_it_first_acts(first: int | None) -> None:
    """tiny-moe routed-scaling-missing: the three experts at 0.6 +- 3e-10 were blamed on layer 3,
    the top score by fp noise."""
    rels = {1: 0.5999999998856, 2: 0.6000000001566, 3: 0.6000000002581}
    pts = [_mod(f"model.layers.{i}.mlp.experts", r, "moe") for i, r in rels.items()]
    diff = LayerDiff("golden", "exactness", pts, first_divergent_layer=first)
    assert choose_guilty(diff, "fp8-block", TH)[0] == "model.layers.1.mlp.experts"
    diff.guilty_module = "model.layers.1.mlp.experts"
    assert localisation_sentence(diff, "fp8-block", TH).endswith(
        "; 2 other modules out of bounds, the worst model.layers.3.mlp.experts (local rel err 0.6)"
    )


def test_a_clearly_worse_module_still_wins_without_a_divergent_layer() -> None:
    pts = [_mod("model.layers.0.mlp.down_proj", 0.6), _mod("model.layers.2.mlp.down_proj", 0.61)]
    diff = LayerDiff("golden", "exactness", pts)
    assert choose_guilty(diff, "fp8-block", TH)[0] == "model.layers.2.mlp.down_proj"


def test_near_tie_is_relative_1e_6() -> None:
    assert R.near_tie(0.6000000002581, 0.5999999998856)  # 6e-10 relative
    assert R.near_tie(1.0, 1.0 + 0.9e-6) and not R.near_tie(1.0, 1.0 + 1.1e-6)
    assert R.near_tie(math.inf, math.inf) and not R.near_tie(math.inf, 1e308)
    assert not R.near_tie(math.nan, math.nan) and R.near_tie(0.0, 0.0)


def test_a_point_the_target_did_not_serve_does_not_fail_an_identical_target() -> None:
    """pxtest no_linears: a clean target without the *_proj points exited 1 on the NaN placeholders
    the replay made for them ("not compared"), while `run` passed it."""
    placeholder = LayerPoint("model.layers.0.mlp.up_proj", 0, "linear", *[math.nan] * 5, local_cosine=1.0,
                             local_norm_ratio=1.0, local_rel_err=0.0)  # fmt: skip
    diff = LayerDiff("golden", "exactness", [_res(0, 0.0, False), placeholder])
    assert not diff_failed(diff, "fp8-block", TH) and unmade(diff) == ("", 0)
    nan_stream = LayerDiff("golden", "exactness", [_res(0, math.nan, False), placeholder])
    assert diff_failed(nan_stream, "fp8-block", TH)  # a served residual point that is NaN still fails


# ---------------------------------------------------------------- replay_all against fake servers

MODS = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]


class _Ep:
    def __init__(self, name: str) -> None:
        self.name = name


def _base() -> Activations:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    st = read_safetensors(write_safetensors({f"{m}{P.INPUT_SUFFIX}": x for m in MODS}, {}))
    return Activations(st, [1, 2, 3], [], list(MODS))


CFG = {"modules": {m: {"kind": "linear"} for m in MODS}}


async def _replay_all(monkeypatch: pytest.MonkeyPatch, fail: Mapping[str, Exception]) -> LayerDiff:
    """replay_all where the target's replay of each module in `fail` raises that error."""

    async def fake_replay(ep: _Ep, module: str, tensors: dict) -> np.ndarray:
        if ep.name == "target" and module in fail:
            raise fail[module]
        return tensors[P.INPUT].astype(np.float64) * 2

    monkeypatch.setattr(R, "replay", fake_replay)
    diff = LayerDiff("golden", "exactness", [_mod(m, 0.0) for m in MODS])
    for p in diff.points:
        p.local_cosine = p.local_norm_ratio = p.local_rel_err = None
    await R.replay_all(_Ep("golden"), _Ep("target"), _base(), CFG, diff, TH)  # type: ignore[arg-type]
    return diff


async def test_one_damaged_replay_is_never_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """pxtest module_garbage: one module's unreadable replay was a warning and exit 0, "no
    divergence": a fault in that module passed."""
    diff = await _replay_all(monkeypatch, {MODS[1]: UnreadableBody("target: not a safetensors body")})
    assert diff.warnings == [f"replay of {MODS[1]} failed: target: not a safetensors body"]
    why, code = unmade(diff)
    assert code == 3 and why.startswith("the diff cannot vouch for 1 module whose replay failed (replay of")
    assert localisation_sentence(diff) == "no divergence vs golden; 1 module not judged (replay failed)"


async def test_a_refused_replay_is_undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = RequestRejected("target: HTTP 413", server="target", status_code=413, reason="HTTP 413")
    diff = await _replay_all(monkeypatch, {MODS[0]: refused})
    assert diff.warnings == [f"replay of {MODS[0]} refused: target: HTTP 413"]
    assert R.replay_failures(diff) == {"failed": 0, "refused": 1} and unmade(diff)[1] == 4


async def test_failed_replays_are_one_warning_and_the_sentence_says_none_ran(monkeypatch) -> None:
    """pxtest module_404 / slow_module: 28 warning lines, and 'no replayed module shows local error'
    when no module was replayed."""
    down = ServerError("target: POST /debug/module timed out after 2s")
    diff = await _replay_all(monkeypatch, dict.fromkeys(MODS, down))
    assert diff.warnings == [
        f"replay of {MODS[0]} failed: target: POST /debug/module timed out after 2s (and 2 more of 3 modules)"
    ]
    assert R.replay_failures(diff) == {"failed": 3, "refused": 0}
    assert unmade(diff) == (f"no module could be replayed ({diff.warnings[0]})", 3)
    diff.points.append(_res(2, 0.16, True))
    diff.first_divergent_layer = 2
    assert (
        localisation_sentence(diff) == "first divergent layer 2, no module could be replayed to localise it"
    )


async def test_a_failed_side_cancels_its_partners_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline's replay outlived the target's failure and the session: 'unhandled exception
    during asyncio.run() shutdown ... the client has been closed'."""
    left: list[str] = []

    async def fake_replay(ep: _Ep, module: str, tensors: dict) -> np.ndarray:
        if ep.name == "target":
            raise ServerError("target: HTTP 500")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            left.append("cancelled")
            raise
        return tensors[P.INPUT]

    monkeypatch.setattr(R, "replay", fake_replay)
    with pytest.raises(ServerError):
        await R.replay_module(_Ep("golden"), _Ep("target"), MODS[0], "linear", _base())  # type: ignore[arg-type]
    assert left == ["cancelled"]
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_gather_or_cancel_returns_in_order() -> None:
    async def value(x: int) -> int:
        await asyncio.sleep(0.01 * (3 - x))
        return x

    assert await R.gather_or_cancel(*(value(i) for i in range(3))) == [0, 1, 2]


async def test_a_damaged_replay_answer_names_its_server() -> None:
    """'replay of X failed: not a safetensors body: ...' said not which server sent the bytes."""

    class _Client:
        async def post_bytes(self, path: str, body: bytes) -> bytes:
            return b"garbage" * 10

    ep = _Ep("target")
    ep.client = _Client()  # type: ignore[attr-defined]
    with pytest.raises(UnreadableBody, match=r"^target: /debug/module answered not a safetensors body"):
        await R.replay(ep, MODS[0], {P.INPUT: np.ones((2, 4), np.float32)})  # type: ignore[arg-type]


def test_the_second_out_of_bounds_module_gets_its_own_audit_and_hint(monkeypatch) -> None:
    """Was: only the guilty module was audited, so a second fault (transposed scales at layer 17
    behind an fnuz fault at layer 8) was counted but its layout never named."""
    from difftest.whitebox import localise as L

    async def fake_diff(baseline, target, prompt, *, kind, decode_steps, thresholds):
        diff = _two_faults()
        diff.guilty_module = "model.layers.8.mlp.gate_proj"
        return diff

    audited: list[str] = []

    async def fake_audit(target, baseline, module, info):
        audited.append(module)
        hint = "scales look transposed" if module.endswith("down_proj") else None
        return {"module": module, "scheme": "fp8-block", "flagged": hint is not None, "hint": hint}

    class Client:
        async def debug_config(self):
            mods = ("model.layers.8.mlp.gate_proj", "model.layers.17.mlp.down_proj")
            return {"scheme": "fp8-block", "modules": {m: {"scheme": "fp8-block"} for m in mods}}

    class Target:
        client = Client()

    monkeypatch.setattr(L, "diff_layers", fake_diff)
    monkeypatch.setattr(L, "audit_module", fake_audit)
    out = asyncio.run(L.localise_target(Target(), prompt="p", golden=object(), thresholds=TH))  # type: ignore[arg-type]
    assert audited == ["model.layers.8.mlp.gate_proj", "model.layers.17.mlp.down_proj"]
    assert out.diffs[0].summary.endswith(
        "the worst model.layers.17.mlp.down_proj (local rel err 0.599, scales look transposed)"
    )


def test_an_moe_off_by_its_routed_scaling_factor_is_named() -> None:
    """T12: routed-scaling-missing on tiny-moe was localised to layer 1's experts with 'norm ratio
    0.40' and no word that 0.40 is 1/routed_scaling_factor 2.5 (the layout audit cannot see it)."""
    from difftest.whitebox.localise import routed_scaling_hint

    p = _mod("model.layers.1.mlp.experts", 0.6, "moe")
    p.local_norm_ratio = 0.4000013
    assert routed_scaling_hint(p, {"routed_scaling_factor": 2.5}) == (
        "output x0.4 = 1/routed_scaling_factor 2.5: the factor looks never applied"
    )
    p.local_norm_ratio = 2.49
    assert routed_scaling_hint(p, {"routed_scaling_factor": 2.5}).endswith("the factor looks applied twice")  # type: ignore[union-attr]
    p.local_norm_ratio = 0.5  # another magnitude bug: nothing claimed
    assert routed_scaling_hint(p, {"routed_scaling_factor": 2.5}) is None
    assert (
        routed_scaling_hint(p, {}) is None and routed_scaling_hint(p, {"routed_scaling_factor": 1.0}) is None
    )


def test_the_sentence_writes_huge_ratios_as_the_table_does() -> None:
    """(t23) a skipped scale's "norm ratio 169265238.60, rel err 1.69e+08, 8256539346.4x its
    siblings' median": fixed point past 1e4, where the table beside it said 1.69e+08."""
    from difftest.results import fmt_compact

    pts = [_res(1, 0.9, True), _mod("model.layers.1.mlp.experts", 1.69e8)]
    pts += [_mod(f"model.layers.{i}.mlp.down_proj", 0.02) for i in range(4)]
    pts[1].local_norm_ratio, pts[1].local_cosine = 169265238.6, 0.9421
    diff = LayerDiff(
        "reference", "accuracy", pts, first_divergent_layer=1, guilty_module="model.layers.1.mlp.experts"
    )
    said = localisation_sentence(diff, "int8", TH)
    assert "norm ratio 1.69e+08, rel err 1.69e+08, " in said and "e+09x its siblings' median" in said, said
    assert [fmt_compact(x, ".2f") for x in (1.1734, 0.5, 0.0, 12345.6, 2e-4, None)] == [
        "1.17", "0.50", "0.00", "1.23e+04", "0.0002", "-"
    ]  # fmt: skip
