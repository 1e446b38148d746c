"""Reports fixes (F7): a PASS carries no localisation sentence (judge, report.json, markdown, HTML,
junit, terminal), a re-judged old report.json drops a PASS's stored one; `difftest quant` says what
a weight audit of an MoE model cannot see."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import pytest

from difftest.cli import main
from difftest.judge import judge_one
from difftest.report import write_report
from difftest.report.html import render_html
from difftest.report.jsonio import atomic_write_text, run_to_json
from difftest.report.junit import render_junit
from difftest.report.markdown import PASSED_LAYERS_NOTE, localisation_line, render_markdown
from difftest.results import Comparison, LayerDiff, LayerPoint, PromptDiff, RunResult, TargetResult

# what a bfloat16 GPU gate wrote for its int8 and mxfp4 targets, both PASS
SENTENCE = "first divergent layer 9, no replayed module shows local error"


def _accuracy(kl: float) -> Comparison:
    """Ten answered prompts of mean KL `kl`, all top-1 and token matches: int8's budget (KL <= 0.08)
    passes 0.001 and fails 1.0, with a decided interval either way."""
    prompts = [
        PromptDiff(prompt_id=f"p{i}", prompt="x", kl_mean=kl, top1_agreement=1.0, match_rate=1.0)
        for i in range(10)
    ]
    agg = {"n_prompts": 10.0, "failed_rate": 0.0, "broken_rate": 0.0, "token_match": 1.0,
           "kl_mean": kl, "top1_agreement": 1.0}  # fmt: skip
    ci = {"kl_mean": [kl, kl], "top1_agreement": [1.0, 1.0], "token_match": [1.0, 1.0]}
    return Comparison("accuracy", "ref", "t", prompts=prompts, aggregate=agg, ci=ci)


def _layers() -> LayerDiff:
    """A residual past the flag limit at layer 9, its replayed module within every accuracy bound
    (cosine 0.9999, norm ratio 1.0, the only sibling): the layer part passes, the diff localises."""
    points = [
        LayerPoint("model.layers.9", 9, "residual", 0.999, 1.0, 0.04, 0.1, 30.0, flagged=True),
        LayerPoint("model.layers.9.mlp.down_proj", 9, "linear", 0.999, 1.0, 0.04, 0.1, 30.0,
                   local_cosine=0.9999, local_norm_ratio=1.0, local_rel_err=0.01),
    ]  # fmt: skip
    return LayerDiff("ref", "accuracy", points=points, first_divergent_layer=9, summary=SENTENCE)


def _judged(kl: float, expect: str = "pass") -> tuple[RunResult, TargetResult]:
    t = TargetResult(name="t", scheme="int8", expect=expect, comparisons=[_accuracy(kl)], layers=[_layers()])
    run = RunResult(reference="ref", targets=[t])
    judge_one(run, t, {})
    assert t.verdict is not None
    return run, t


def test_a_passing_target_gets_no_localisation_from_the_judge() -> None:
    """The bug: judge_one attached the first localised diff's sentence to every verdict with layers."""
    _, t = _judged(0.001)
    assert t.verdict is not None and t.verdict.label == "PASS"
    assert t.verdict.localisation is None
    assert t.layers[0].summary == SENTENCE  # the per-layer data stays


@pytest.mark.parametrize("expect", ["pass", "fail"])
def test_a_failing_target_keeps_it_whatever_its_expectation(expect: str) -> None:
    _, t = _judged(1.0, expect)
    assert t.verdict is not None and t.verdict.label == "FAIL" and t.verdict.localisation == SENTENCE


def _old_pass() -> RunResult:
    """A report.json an older difftest wrote: a PASS verdict that carries the sentence."""
    run, t = _judged(0.001)
    t.verdict = dataclasses.replace(t.verdict, localisation=SENTENCE)  # type: ignore[arg-type]
    return run


def test_no_renderer_shows_a_passing_targets_localisation() -> None:
    """The bug: the terminal hid it for a PASS, but junit (its `localisation` property) showed the
    stored sentence, and markdown/HTML/junit fell back to the white-box line with no verdict one."""
    for run in (_old_pass(), _judged(0.001)[0]):
        assert localisation_line(run.targets[0]) is None
        assert "localisation" not in render_junit(run)
        md, page = render_markdown(run), render_html(run)
        assert "Localisation:" not in md and "Where:" not in page
        # the per-layer line stays, saying it is no finding
        assert f"{SENTENCE}{PASSED_LAYERS_NOTE}" in md
        assert html.escape(SENTENCE + PASSED_LAYERS_NOTE) in page


def test_a_failing_targets_localisation_is_rendered_everywhere() -> None:
    run, _ = _judged(1.0)
    assert localisation_line(run.targets[0]) == SENTENCE
    assert f'name="localisation" value="{SENTENCE}"' in render_junit(run)
    assert f"**Localisation:** {SENTENCE}" in render_markdown(run)
    assert PASSED_LAYERS_NOTE not in render_markdown(run)


def test_report_dir_drops_an_old_passing_verdicts_localisation(tmp_path: Path, capsys) -> None:
    """`report DIR` re-judges: a stored PASS's sentence does not survive into the new report.json
    (judge_one used to fall back to the old verdict's localisation)."""
    old = tmp_path / "old"
    old.mkdir()
    atomic_write_text(old / "report.json", run_to_json(_old_pass()))
    assert main(["report", str(old), "-o", str(tmp_path / "new"), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["targets"][0]["verdict"] == "PASS" and said["targets"][0]["localisation"] is None
    verdict = json.loads((tmp_path / "new" / "report.json").read_text())["targets"][0]["verdict"]
    assert verdict["label"] == "PASS" and verdict["localisation"] is None


def test_write_report_of_a_fresh_pass_has_no_sentence_in_report_json(tmp_path: Path) -> None:
    run, _ = _judged(0.001)
    write_report(run, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())["targets"][0]
    assert data["verdict"]["localisation"] is None and data["layers"][0]["summary"] == SENTENCE


# ---------------------------------------------------------------------------------- quant (item 2)


def test_the_moe_note_needs_an_moe_module_and_names_its_factor() -> None:
    from difftest.cli.quant import moe_note

    dense = {"model.layers.0.mlp.up_proj": {"kind": "linear", "scheme": "fp8-block"}}
    assert moe_note(dense) is None and moe_note({}) is None
    moe = dense | {"model.layers.1.mlp.experts": {"kind": "moe", "routed_scaling_factor": 2.5}}
    assert moe_note(moe) == (
        "note: MoE experts are audited on fixed routing (sampled experts, their combine, "
        "routed_scaling_factor 2.5); the router (top-k choice, routing weights) is not: a fault there "
        "shows in `difftest layers` / `difftest run`"
    )
    # an unquantized MoE (scheme none) declares no factor: the note stays, without a number
    assert "(sampled experts, their combine); the router" in (
        moe_note({"e": {"kind": "moe", "scheme": "none"}}) or ""
    )


async def test_quant_of_an_moe_missing_its_routed_scaling_flags_it_and_says_what_it_cannot_see(
    monkeypatch, capsys
) -> None:
    """The bug: tiny-moe fp8-block with `routed-scaling-missing` audited "0 of N modules flagged",
    exit 0, and nothing said where the audit does not look. The experts are now recomputed on
    fixed routing (their combine included): the fault is flagged with its factor, and the note
    names what stays unaudited (the router)."""
    from test_layers import _run_in_current_loop, build, serve_in_process, shim_server

    from difftest.cli import build_parser, whitebox
    from difftest.cli import quant as quant_cmd

    bad = build("tiny-moe", scheme="fp8-block", faults=["routed-scaling-missing"])
    with shim_server("reference", build("tiny-moe")) as (r, _), shim_server("target", bad) as (t, _):
        serve_in_process(monkeypatch, {"reference": r, "target": t})
        monkeypatch.setattr(whitebox.aio, "run", _run_in_current_loop)  # already inside a loop
        args = build_parser().parse_args(["quant", "--ref", "http://r", "--target", "http://t"])
        assert await quant_cmd.run(args) == 1
    out = capsys.readouterr().out
    assert "1/routed_scaling_factor 2.5" in out
    assert "the router (top-k choice, routing weights) is not" in out
