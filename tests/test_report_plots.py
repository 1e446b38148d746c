"""The pure pieces behind report.html: token alignment, id -> text, plot data, SVG, checks in words."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from difftest.report import plotdata as pd
from difftest.report import svg
from difftest.report.explorer import num, script_json
from difftest.report.tokendiff import (
    Vocab,
    align,
    alternatives,
    chosen_labels,
    garbled,
    prompt_alignment,
)
from difftest.report.words import check_words, fmt_value, shape_words, value_words
from difftest.results import Check, Comparison, PartVerdict, PromptDiff

sys.path.insert(0, str(Path(__file__).parent))
from sample_results import sample_run  # noqa: E402

SVG_NS = "{http://www.w3.org/2000/svg}"


# ----------------------------------------------------------------------------- token diff


def test_align_shows_one_insertion_as_an_insertion() -> None:
    ref = ["The", " cat", " sat", " on", " the", " mat"]
    tgt = ["The", " big", " cat", " sat", " on", " the", " mat"]
    assert align(ref, tgt) == [("equal", 0, 1, 0, 1), ("insert", 1, 1, 1, 2), ("equal", 1, 6, 2, 7)]
    # by position, every token after the insertion would differ; aligned, five of six are equal
    equal = sum(i2 - i1 for tag, i1, i2, _, _ in align(ref, tgt) if tag == "equal")
    assert equal == 6


def test_align_deletion_and_replacement() -> None:
    assert align("abcd", "acd") == [("equal", 0, 1, 0, 1), ("delete", 1, 2, 1, 1), ("equal", 2, 4, 1, 3)]
    assert align("abc", "axc") == [("equal", 0, 1, 0, 1), ("replace", 1, 2, 1, 2), ("equal", 2, 3, 2, 3)]


def test_prompt_alignment_prefers_ids() -> None:
    # two different ids that display the same text must not align as equal
    p = PromptDiff(
        "p", "", ref_tokens=["a", "b"], tgt_tokens=["a", "b"], ref_token_ids=[1, 2], tgt_token_ids=[1, 3]
    )
    assert prompt_alignment(p) == [("equal", 0, 1, 0, 1), ("replace", 1, 2, 1, 2)]


def test_alternatives_as_text_from_the_runs_own_tokens() -> None:
    seen = PromptDiff(
        "a", "", ref_tokens=[" Paris", "."], tgt_tokens=[" Lyon"], ref_token_ids=[7, 9], tgt_token_ids=[8]
    )
    div = PromptDiff(
        "b",
        "",
        ref_tokens=[" x"],
        tgt_tokens=[" y"],
        ref_token_ids=[1],
        tgt_token_ids=[2],
        ref_alternatives={"7": -0.1, "8": -2.0, "2028": -3.0},
        tgt_alternatives={"8": -0.2},
    )
    vocab = Vocab.from_prompts([seen, div])
    assert alternatives(div, "ref", vocab) == [
        (" Paris", -0.1, True),
        (" Lyon", -2.0, True),
        ("id 2028", -3.0, False),
    ]
    assert alternatives(div, "tgt", vocab) == [(" Lyon", -0.2, True)]
    # keyed by string (no ids on a side): shown as they are, even when they look like numbers
    by_text = PromptDiff("c", "", ref_tokens=["1"], tgt_tokens=["2"], ref_alternatives={"42": -0.5})
    assert alternatives(by_text, "ref", vocab) == [("42", -0.5, True)]


def test_tokens_with_empty_text_are_named_by_id() -> None:
    # byte pieces of one CJK character: their text, cut by offsets, is "" until the last byte.
    # Shown as "" two different ones read as the same choice (both rows marked as chosen).
    p = PromptDiff(
        "zh",
        "",
        ref_tokens=["", "好"],
        tgt_tokens=["", "你"],
        ref_token_ids=[30866, 223],
        tgt_token_ids=[17097, 224],
        first_divergence=0,
        ref_alternatives={"30866": -1.28, "17097": -1.5, "99": -3.0},
        tgt_alternatives={"17097": -1.35, "30866": -1.51},
    )
    vocab = Vocab.from_prompts([p])
    assert alternatives(p, "ref", vocab) == [
        ("id 30866 (empty text)", -1.28, False),
        ("id 17097 (empty text)", -1.5, False),
        ("id 99", -3.0, False),
    ]
    assert chosen_labels(p) == {"rc": "id 30866 (empty text)", "tc": "id 17097 (empty text)"}
    # a chosen token with text of its own keeps it; keyed by text (no ids), nothing is relabelled
    assert chosen_labels(replace(p, ref_tokens=["x", "y"])) == {"tc": "id 17097 (empty text)"}
    assert chosen_labels(replace(p, ref_token_ids=None, tgt_token_ids=None)) == {}
    assert chosen_labels(replace(p, first_divergence=None)) == {}


def test_the_aligned_diff_gets_the_ids_of_tokens_with_no_text() -> None:
    """The aligned diff draws every byte piece as ∅; the sparse ri / ti maps give each its id
    (and nothing where tokens have text, or where ids do not line up with the tokens)."""
    from difftest.report.explorer import _empty_token_ids

    p = PromptDiff("zh", "", ref_tokens=["", "好", ""], tgt_tokens=["a", "你"])
    assert _empty_token_ids(replace(p, ref_token_ids=[30866, 223, 5], tgt_token_ids=[7, 224])) == {
        "ri": {0: 30866, 2: 5}
    }
    assert _empty_token_ids(replace(p, ref_token_ids=[30866, 223])) == {}  # misaligned: no guess
    assert _empty_token_ids(p) == {}


def test_the_explorer_marks_garbled_exactly_the_prompts_garbled_rate_counts() -> None:
    """It flagged only match < 0.5 AND top-1 < 0.5: a 30% match followed at 90% top-1 counted in
    garbled_rate yet showed as fine. Hand-worked: matches 0.3 (top-1 0.9), 0.49, 0.5, 1.0 and one
    failed request; garbled_rate = (0.3, 0.49, failed) / 5 = 0.6; the explorer marks 0.3 and 0.49
    garbled and the failed one failed (flag 1), which together are the rate's three."""
    from difftest.metrics.aggregate import aggregate_prompts
    from difftest.report.explorer import _flags

    prompts = [
        PromptDiff("a", "", match_rate=0.3, top1_agreement=0.9),
        PromptDiff("b", "", match_rate=0.49),
        PromptDiff("c", "", match_rate=0.5, top1_agreement=0.1),
        PromptDiff("d", "", match_rate=1.0),
        PromptDiff("e", "", error="target: HTTP 500"),
    ]
    assert [garbled(p) for p in prompts] == [True, True, False, False, False]
    flags = [_flags(p) for p in prompts]
    assert [bool(f & 4) for f in flags] == [True, True, False, False, False]
    agg, _ = aggregate_prompts(prompts, n_resamples=10)
    assert agg["garbled_rate"] == pytest.approx(0.6)
    assert sum(bool(f & 4) or bool(f & 1) for f in flags) == round(agg["garbled_rate"] * len(prompts))


def test_explorer_numbers_and_script_json() -> None:
    assert num(None) is None and num(float("nan")) == "NaN" and num(float("inf")) == "inf"
    assert num(0.123456) == 0.123 and num(2.0) == 2 and num(1.23456e-7) == 1.23e-7
    text = script_json({"p": "</script><script>alert(1)</script>\u2028"})
    assert "</script>" not in text and "<" not in text and "\\u2028" in text


# ----------------------------------------------------------------------------- plot data


def test_layer_profile_units_limits_and_marks() -> None:
    t = sample_run().targets[1]
    exact, acc = pd.layer_profiles(t)
    assert exact.xlabels == ["0", "1", "2", "3", "4", "5", "logits"]
    assert exact.unit == "relative error" and exact.local[3] == 0.6 and exact.local[-1] is None
    assert exact.accumulated[3] == 0.35  # residual rel_err of the broken layer
    assert exact.local_limit == (1e-3, "<=", "module replayed on the golden's input")
    assert exact.accumulated_limit == (5e-2, "<=", "accumulated vs golden")
    assert exact.first_divergent == 3 and exact.guilty == 3 and exact.status == "FAIL"
    assert acc.unit == "1 − cosine" and acc.local[3] == pytest.approx(0.19)
    assert acc.local_limit is not None and acc.local_limit[0] == pytest.approx(0.005)
    assert pd.spark_profile(t) == exact


def test_part_for_finds_the_runners_part_names() -> None:
    t = sample_run().targets[1]
    assert t.verdict is not None
    renamed = [
        PartVerdict(
            "layers-" + ("accuracy" if p.against == "reference" else "exactness"), p.against, p.checks
        )
        if p.part == "layers"
        else p
        for p in t.verdict.parts
    ]
    t.verdict = type(t.verdict)(t.verdict.target, t.verdict.expect, tuple(renamed))
    p = pd.part_for(t, "layers-exactness", "fp8-block-faulty-golden")
    assert p is not None and p.part == "layers-exactness"
    assert pd.part_for(t, "layers-accuracy", "reference").against == "reference"  # type: ignore[union-attr]


def test_kl_ladder_percentiles_and_limits() -> None:
    c = Comparison(
        "exactness", "g", "t", prompts=[PromptDiff(str(i), "", position_kl=[float(i)]) for i in range(101)]
    )
    c.aggregate = {"kl_mean": 50.0}
    part = PartVerdict("exactness", "g", (Check("kl_mean", 50.0, 10.0, "<=", False, note="twin x3"),))
    ladder = pd.kl_ladder(c, part)
    assert ladder is not None
    assert dict(ladder.rungs) == {"mean": 50.0, "median": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert ladder.limits == {"mean": (10.0, "twin x3")} and ladder.n_positions == 101
    c.aggregate["kl_p99"] = 98.5  # the aggregate's own p99 wins: it is what the check read
    assert dict(pd.kl_ladder(c, None).rungs)["p99"] == 98.5  # type: ignore[union-attr]
    nan = Comparison("e", "g", "t", prompts=[PromptDiff("x", "", position_kl=[0.1, math.nan])])
    assert math.isnan(dict(pd.kl_ladder(nan, None).rungs)["max"])  # type: ignore[union-attr, arg-type]


def test_position_profile_counts_prompts_that_reached_a_position() -> None:
    c = Comparison(
        "accuracy",
        "r",
        "t",
        prompts=[
            PromptDiff("a", "", position_kl=[0.1, 0.3]),
            PromptDiff("b", "", position_kl=[0.3]),
            PromptDiff("c", "", error="boom", position_kl=[9.0]),
        ],
    )
    prof = pd.position_profile(c)
    assert prof is not None and prof.counts == [2, 1]
    assert prof.mean == [pytest.approx(0.2), pytest.approx(0.3)] and prof.max == [0.3, 0.3]


def test_sibling_errors_highlight_the_guilty_module() -> None:
    t = sample_run().targets[1]
    sib = pd.sibling_errors(t, t.layers[0])
    assert sib is not None and sib.role == "model.layers.*.mlp.down_proj"
    assert [name for name, _, guilty in sib.rows if guilty] == ["model.layers.3.mlp.down_proj"]
    assert len(sib.rows) == 6 and sib.limit == (1e-3, "module replayed on the golden's input")
    assert pd.sibling_errors(t, sample_run().targets[0].layers[0]) is None  # nothing named


def test_tag_rows() -> None:
    ps = [
        PromptDiff("a", "", tags=["math"], kl_mean=0.1, first_divergence=3, match_rate=0.5),
        PromptDiff("b", "", tags=["math", "code"], kl_mean=0.3, match_rate=1.0),
        PromptDiff("c", "", error="x"),
    ]
    rows = {r.tag: r for r in pd.tag_rows(ps)}
    assert rows["math"].n == 2 and rows["math"].diverged == 1 and rows["math"].kl_mean == pytest.approx(0.2)
    assert rows["code"].n == 1 and rows["(untagged)"].failed == 1
    assert list(rows)[-1] == "(untagged)"


# ----------------------------------------------------------------------------- SVG


def _svg(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{SVG_NS}svg"
    return root


def test_line_chart_limit_marks_nan_and_status() -> None:
    limit = svg.Limit(0.01, "<=", "limit 0.01")
    text = svg.line_chart(
        [svg.Series("local", [0.001, 0.5, None, math.nan, 0.0], limit=limit)],
        ["0", "1", "2", "3", "logits"],
        title="t <x>",
        status="FAIL",
        marks=[(1, "first divergent layer 1", svg.BAD)],
    )
    root = _svg(text)
    circles = root.findall(f".//{SVG_NS}circle")
    reds = [c for c in circles if c.get("fill") == svg.BAD]
    assert len(reds) == 1  # only 0.5 is past the limit
    assert any(c.get("fill") == svg.NAN for c in circles)
    texts = [t.text for t in root.iter(f"{SVG_NS}text")]
    assert "FAIL" in texts and "t <x>" in texts and "limit 0.01" in texts and "NaN" in texts
    assert "first divergent layer 1" in texts
    assert any(t and t.startswith("≤") for t in texts)  # a zero sits on the bottom line, said so
    assert root.find(f"{SVG_NS}title").text == "FAIL: t <x>"  # type: ignore[union-attr]


def test_bar_chart_per_bar_limits() -> None:
    bars = [svg.Bar("mean KL", 0.2, True, svg.Limit(0.05)), svg.Bar("p90 KL", 0.01), svg.Bar("max", None)]
    root = _svg(svg.bar_chart(bars, title="ladder", status="PASS"))
    rects = [r for r in root.iter(f"{SVG_NS}rect") if r.find(f"{SVG_NS}title") is not None]
    assert [r.get("fill") for r in rects] == [svg.BAD, svg.GOOD]
    assert len(root.findall(f".//{SVG_NS}line[@class='limit']")) == 1
    assert "n/a" in [t.text for t in root.iter(f"{SVG_NS}text")]


def _text_extents(root: ET.Element) -> list[tuple[str, float, float]]:
    """(text, left, right) of every positioned <text>, its width estimated at 0.55 em a character
    (sans-serif digits are 0.556 em; the clipped "(limit 0.00" measured 0.47 em a character)."""
    size0 = float(root.get("font-size") or 11)
    out = []
    for t in root.iter(f"{SVG_NS}text"):
        if t.get("x") is None:  # rotated axis labels sit at a transform, inside by construction
            continue
        width = len(t.text or "") * 0.55 * float(t.get("font-size") or size0)
        x = float(t.get("x"))  # type: ignore[arg-type]
        left = {"start": x, "middle": x - width / 2, "end": x - width}[t.get("text-anchor") or "start"]
        out.append((t.text or "", left, left + width))
    return out


@pytest.mark.parametrize("kl", [0.135, 4.2e-7, 25.0])
def test_kl_ladder_labels_stay_inside_the_viewbox(kl: float) -> None:
    """The limit rode after the value: "0.135  (limit 0.005)" at x=467 of a 560-wide box was cut
    to "(limit 0.00". Every label's estimated extent now fits, at any value."""
    from difftest.report.plots import ladder_plot

    ladder = pd.Ladder(
        rungs=[("mean", kl), ("median", kl / 2), ("p90", kl), ("p99", kl * 3), ("max", kl * 3)],
        limits={"mean": (0.005, "twin x3"), "p99": (0.05, "absolute minimum")},
        n_positions=240,
        null={"mean": 3.8e-6},
    )
    t = sample_run().targets[0]
    root = _svg(ladder_plot(t, "exactness", "golden", ladder, "FAIL").svg)
    width = float(root.get("viewBox").split()[2])  # type: ignore[union-attr]
    outside = [(text, round(a), round(b)) for text, a, b in _text_extents(root) if a < 0 or b > width]
    assert not outside, f"labels past the {width:g}-wide viewBox: {outside}"
    texts = [text for text, _, _ in _text_extents(root)]
    assert "mean KL ≤ 0.005" in texts and "p99 KL ≤ 0.05" in texts  # the limit is still said


def test_sparkline_marks_one_index() -> None:
    root = _svg(svg.sparkline([1e-6, 1e-6, 0.5, 1e-6], mark=2, status="FAIL", limit=1e-3))
    marked = [c for c in root.iter(f"{SVG_NS}circle") if c.get("stroke") == svg.BAD]
    assert len(marked) == 1 and float(marked[0].get("cx", 0)) > 75  # the third of four points
    assert root.find(f"{SVG_NS}polyline").get("stroke") == svg.STATUS_COLOUR["FAIL"]  # type: ignore[union-attr]


def test_make_scale_log_and_linear() -> None:
    s = svg.make_scale([0.0, 3e-4, 0.2], 100, 0, log=True)
    assert (s.lo, s.hi) == (1e-4, 1.0) and s(0.0) == 100 and s(1.0) == 0
    lin = svg.make_scale([0.0, 7.0], 100, 0, log=False)
    assert lin.lo == 0 and lin.hi >= 7 and lin.ticks[0] == 0


# ----------------------------------------------------------------------------- words


def test_check_words_for_module_checks_and_rates() -> None:
    part = PartVerdict("layers-exactness", "golden", ())
    c = Check(
        "local_rel_err_max", 0.52, 1e-3, "<=", False, note="model.layers.5.mlp.down_proj; module replayed"
    )
    w = check_words(part, c)
    assert w.sentence() == (
        "layers-exactness: worst module-local relative error 0.52 > limit 0.001 at "
        "model.layers.5.mlp.down_proj (limit: module replayed)"
    )
    top1 = check_words(
        PartVerdict("accuracy", "r", ()), Check("top1_agreement", 0.857, 0.95, ">=", False, note="budget")
    )
    assert top1.sentence() == "accuracy: top-1 agreement 85.7% < limit 95.0% (limit: budget)"
    nan = check_words(PartVerdict("accuracy", "r", ()), Check("kl_mean", math.nan, 0.1, "<=", False))
    assert nan.sentence() == "accuracy: mean KL NaN (NaN always fails) vs limit 0.1"
    assert fmt_value("kl_mean", 1.5e-5) == "1.500e-05"


def test_values_in_words() -> None:
    assert shape_words("scale_shape", [5, 12]) == "5 × 12"
    assert value_words({"order": "row-major", "shuffled": False}) == "order row-major, shuffled no"
    assert value_words({"torch": {"cosine": 0.88}, "vendor": {"available": False}}) == (
        "torch: cosine 0.88; vendor: available no"
    )
    assert value_words("(PosixPath('/p/a.jsonl'), PosixPath('/p/b.jsonl'))") == "/p/a.jsonl, /p/b.jsonl"
    assert value_words(None) == "n/a" and value_words([]) == "—"


def test_null_model_drawn_for_scale() -> None:
    from sample_results import _comparison, _layers

    from difftest.report.html import render_html
    from difftest.report.plots import run_plots

    run = sample_run()
    golden = run.targets[1].golden or ""
    null = _comparison("null", golden, f"{golden}-twin", faulty=False)
    null.module_noise = 2.5e-4
    run.nulls = [null]
    run.null_layers = [_layers(golden, "exactness", None)]
    plots = {p.slug: p.svg for p in run_plots(run)}
    ladder = _svg(plots["fp8-block-faulty-kl-ladder-exactness"])
    assert len(ladder.findall(f".//{SVG_NS}path[@class='ref']")) == 5  # one grey diamond per rung
    layers = plots["fp8-block-faulty-layers-exactness"]
    assert "null (twin vs golden)" in layers
    assert "null (twin" not in plots["fp8-block-layers-exactness"]  # another golden
    text = render_html(run)
    table = text[text.index('id="null"') :]
    table = table[: table.index("</table>")]
    assert f"<code>{golden}-twin</code>" in table and '<td class="n">2.500e-04</td>' in table
