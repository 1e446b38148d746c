"""MoE router top-k flips as a field of the layer diff (F15): the counts were written into a
warning's prose and parsed back with a regex, so rewording the warning lost them silently and a
stored layers.json / report.json held them only as text. Now `LayerDiff.routing_flips` carries
them, survives the report's JSON round trip, and is what the localisation sentence reads."""

from __future__ import annotations

import json
from pathlib import Path

from difftest.report import load_run
from difftest.report.jsonio import run_to_json
from difftest.results import LayerDiff, LayerPoint, RoutingFlips, RunResult, TargetResult
from difftest.whitebox.localise import localisation_sentence, routing_suspect
from difftest.whitebox.replay import routing_flips

FLIPS = [RoutingFlips(layer=2, flipped=3, tokens=12), RoutingFlips(layer=3, flipped=1, tokens=12)]


def _drifting(flips: list[RoutingFlips], warnings: list[str]) -> LayerDiff:
    """A residual flagged at layer 2 whose MoE block replays within bounds (no guilty module)."""
    points = [
        LayerPoint("model.layers.2", 2, "residual", 0.9, 1.0, 0.1, 0.1, 20.0, flagged=True),
        LayerPoint("model.layers.2.mlp", 2, "mlp", 0.99, 1.0, 0.01, 0.01, 40.0,
                   local_cosine=0.998, local_norm_ratio=1.0, local_rel_err=0.06),
    ]  # fmt: skip
    return LayerDiff("ref", "accuracy", points=points, first_divergent_layer=2,
                     first_divergent_point="model.layers.2", warnings=warnings, routing_flips=flips)  # fmt: skip


def _run(diff: LayerDiff) -> RunResult:
    return RunResult(reference="ref", targets=[TargetResult("t", "fp8-block", "pass", layers=[diff])])


def test_the_routing_flips_survive_the_reports_json_round_trip(tmp_path: Path) -> None:
    diff = _drifting(FLIPS, ["router top-k differs from ref's ... (the human's copy)"])
    (tmp_path / "report.json").write_text(run_to_json(_run(diff)))
    stored = json.loads((tmp_path / "report.json").read_text())["targets"][0]["layers"][0]
    assert stored["routing_flips"] == [{"layer": 2, "flipped": 3, "tokens": 12},
                                       {"layer": 3, "flipped": 1, "tokens": 12}]  # fmt: skip
    (loaded,) = load_run(tmp_path).targets[0].layers
    assert loaded.routing_flips == FLIPS
    assert routing_flips(loaded) == {2: (3, 12), 3: (1, 12)}
    assert loaded == diff


def test_a_report_written_before_the_field_still_loads_without_counts(tmp_path: Path) -> None:
    """An old report.json has no `routing_flips`: it loads, with no counts (its warning is not
    parsed), and its stored summary still says what it said."""
    diff = _drifting(
        [], ["router top-k differs from ref's (tokens sent to other experts) at 3 of 12 tokens in layer 2"]
    )
    diff.summary = (
        "first divergent layer 2, no replayed module shows local error (router top-k differs at 3 of 12 ...)"
    )
    data = json.loads(run_to_json(_run(diff)))
    del data["targets"][0]["layers"][0]["routing_flips"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    (loaded,) = load_run(tmp_path).targets[0].layers
    assert loaded.routing_flips == [] and routing_flips(loaded) == {}
    assert loaded.summary == diff.summary


def test_routing_suspect_reads_the_field_whatever_the_warning_says() -> None:
    """The warning reworded (or absent): the suspect is still named, from the numbers."""
    for warnings in (["the router picked other experts for some tokens"], []):
        said = routing_suspect(_drifting(FLIPS, warnings))
        assert said is not None and said.startswith(
            "router top-k differs at 3 of 12 tokens in layer 2, 1 of 12 in layer 3: tokens sent to other experts"
        ), said
    # the old wording in the warnings, but no counts in the field: nothing is read from the prose
    old = ["router top-k differs from ref's (tokens sent to other experts) at 3 of 12 tokens in layer 2"]
    assert routing_suspect(_drifting([], old)) is None
    assert "(attention core, norm or rotary?)" in localisation_sentence(_drifting([], old))
