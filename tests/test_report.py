"""Reports rendered from sample results: content, escaping, JUnit counts, JSON round trip, n/a."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from rich.console import Console

from difftest.errors import UsageError
from difftest.report import load_run, write_report
from difftest.report.html import render_html
from difftest.report.jsonio import atomic_write_text
from difftest.report.junit import render_junit
from difftest.report.markdown import fmt_num, md_cell, prompt_order, render_markdown
from difftest.report.terminal import render_side_by_side, render_summary
from difftest.results import SCHEMA_VERSION, PromptDiff, RunResult

sys.path.insert(0, str(Path(__file__).parent))
from sample_results import LOCALISATION, XSS_PROMPT, degraded_run, sample_run  # noqa: E402


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_report(sample_run(), tmp_path_factory.mktemp("report"))


def _plain(width: int = 140) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=None, color_system=None), buf


# ----------------------------------------------------------------------------- folder


def test_write_report_writes_four_files_and_plots(sample_dir: dict[str, Path]) -> None:
    files = {k for k in sample_dir if not k.startswith("plot:")}
    assert files == {"json", "markdown", "html", "junit"}
    names = {sample_dir[k].name for k in files}
    assert names == {"report.json", "report.md", "report.html", "junit.xml"}
    plots = {k: p for k, p in sample_dir.items() if k.startswith("plot:")}
    folder = sample_dir["json"].parent
    assert {p.name for p in (folder / "plots").iterdir()} == {p.name for p in plots.values()}
    kinds = {k.split(":")[1] for k in plots}
    for t in ("fp8-block", "fp8-block-faulty"):
        for part in ("exactness", "accuracy"):
            assert {f"{t}-layers-{part}", f"{t}-kl-ladder-{part}", f"{t}-kl-position-{part}"} <= kinds
    # the guilty module against its siblings only where a module was named
    assert {k for k in kinds if "siblings" in k} == {
        "fp8-block-faulty-siblings-exactness",
        "fp8-block-faulty-siblings-accuracy",
    }
    for p in sample_dir.values():
        assert p.stat().st_size > 100
        # group-readable, never world-writable (mkstemp alone would leave 0600)
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))
    for p in plots.values():  # standalone SVG files: well-formed XML with the SVG namespace
        assert ET.parse(p).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def test_write_report_removes_stale_plots(tmp_path: Path) -> None:
    write_report(sample_run(), tmp_path)
    stale = tmp_path / "plots" / "gone-target-layers-exactness.svg"
    stale.write_text("<svg/>")
    write_report(degraded_run(), tmp_path)  # no layers, no per-position KL: no plots at all
    assert not stale.exists() and not list((tmp_path / "plots").glob("*.svg"))


# ----------------------------------------------------------------------------- markdown


def test_markdown_verdict_table_first(sample_dir: dict[str, Path]) -> None:
    md = sample_dir["markdown"].read_text()
    first_table = md.index("| target | scheme | expect | verdict | meets expectation |")
    assert first_table < md.index("## Targets") < md.index("## Signature") < md.index("## Noise floor")
    rows = [line for line in md.splitlines() if line.startswith("| fp8-block")]
    assert rows[0].startswith("| fp8-block | fp8-block | pass | **PASS** | yes |")
    assert rows[1].startswith("| fp8-block-faulty | fp8-block | fail | **FAIL** | yes |")
    assert "0.1994 [0.05, 0.41]" in rows[1]  # mean KL with its CI
    assert "| 2.4 | 85.7% | 88.6% | 3.5 | 0/12 |" in rows[1]


def test_markdown_failing_target_has_localisation_then_reasons(sample_dir: dict[str, Path]) -> None:
    md = sample_dir["markdown"].read_text()
    section = md[md.index("### fp8-block-faulty") :]
    loc = section.index(
        "> **Localisation:** first divergent layer 3, local error in model.layers.3.mlp.down_proj"
    )
    assert loc < section.index("Reasons:") < section.index("#### Exactness vs golden")
    assert r"- exactness: mean KL 0.1994 \> limit 0.005 (limit: noise floor x3)" in section
    assert (
        "- layers vs fp8-block-faulty-golden: worst module-local relative error 0.6 \\> limit 0.001 at "
        "model.layers.3.mlp.down_proj (limit: module replayed on the golden's input)"
    ) in section
    # the passing target has no localisation line
    passing = md[md.index("### fp8-block —") : md.index("### fp8-block-faulty")]
    assert "Localisation" not in passing
    # prompts worst first: the WRONG divergence (KL 0.405) before the DRIFT one and the exact match
    assert section.index("5 WRONG") < section.index("2 DRIFT") < section.index("| arith |")
    assert "Quantization audit" in section and "transposed" in section
    assert "| scale shape |" in section and "| 5 × 12 |" in section and "[5, 12]" not in section
    tags = section[section.index("#### By prompt tag") :]
    assert "| facts | 1 | 1/1 | 0.405 | 85.7% |" in tags and r"| \<b\>html\</b\> | 1 |" in tags
    assert "<- first divergent [3] [4]" in md


def test_markdown_escapes_untrusted_text(sample_dir: dict[str, Path]) -> None:
    md = sample_dir["markdown"].read_text()
    assert "<script>" not in md
    assert r"\<script\>" in md and r"a\|b" in md
    assert "Translate into Chinese:⏎Hello" in md  # the newline does not end the table row
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    assert "<script>" not in html and "&lt;script&gt;" in html
    # every table row of the per-prompt tables keeps its 9 cells despite the pipes in the texts
    for line in md.splitlines():
        if line.startswith("| capital |") or line.startswith("| zh |"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) == 9, line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a|b", r"a\|b"),
        ("<b>x</b>", r"\<b\>x\</b\>"),
        ("down_proj", "down_proj"),  # intraword underscores do not need escaping
        ("_em_", r"\_em\_"),
        ("x\ny\tz", "x⏎y⇥z"),
        ("&amp; and & alone", "&amp;amp; and & alone"),
        ("bell\x07", r"bell\\x07"),
    ],
)
def test_md_cell(text: str, expected: str) -> None:
    assert md_cell(text) == expected


def test_md_cell_truncates_before_escaping() -> None:
    assert md_cell("abcdefgh|", 5) == "abcd…"


# ----------------------------------------------------------------------------- html


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.titles: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key):
                self.srcs.append(a[key] or "")
        if a.get("title"):
            self.titles.append(a["title"] or "")


def explorer_json(text: str) -> dict:
    """The prompt explorer's JSON block of a report.html."""
    m = re.search(r'<script type="application/json" id="difftest-data">(.*?)</script>', text, re.S)
    assert m, "no explorer data block"
    return json.loads(m.group(1))


def test_html_escapes_and_is_self_contained(sample_dir: dict[str, Path]) -> None:
    text = sample_dir["html"].read_text()
    assert '<script>alert("x")' not in text and XSS_PROMPT not in text
    # the untrusted prompt travels in the JSON block with `<` escaped: no </script> breakout
    assert '\\u003cscript>alert(\\"x\\")\\u003c/script> & a|b' in text
    prompts = {p[0]: p[1] for p in explorer_json(text)["prompts"]}
    assert prompts["capital"] == XSS_PROMPT  # and reads back exactly
    assert "&lt;b&gt;html&lt;/b&gt;" in text and "<b>html</b>" not in text  # a tag, escaped in HTML
    parser = _Collector()
    parser.feed(text)
    assert parser.scripts == 2  # the JSON block and our own inline script, nothing else
    for src in parser.srcs:
        assert src.startswith("#"), src  # no external resource, no data: image either
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


def test_html_first_screen_answers_which_why_where(sample_dir: dict[str, Path]) -> None:
    text = sample_dir["html"].read_text()
    cards = text.index('id="verdicts"')
    assert (
        cards
        < text.index("<h2>Headline metrics</h2>")
        < text.index('id="plots"')
        < text.index('id="prompts"')
    )
    faulty = text[text.index('data-target="fp8-block-faulty"') :]
    faulty = faulty[: faulty.index('<div class="sp">') + 4000]
    assert '<span class="badge b-FAIL">FAIL</span>' in faulty
    assert "exactness: mean KL 0.1994 &gt; limit 0.005 (limit: noise floor x3)" in faulty
    assert "<b>Where:</b> " + LOCALISATION in faulty
    assert "expected FAIL: as expected" in faulty
    # sparkline: one line over the 6 layers, layer 3 circled in red
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="spark"' in faulty
    assert 'stroke="#c62828" stroke-width="2"' in faulty and "layer 3 marked" in faulty
    passing = text[text.index('data-target="fp8-block"') : text.index('data-target="fp8-block-faulty"')]
    assert "all 10 informative checks passed" in passing and "Where:" not in passing
    assert "marked" not in passing  # nothing circled on a passing target


def test_html_unexpected_pass_is_loud() -> None:
    text = render_html(sample_run(fault_expect="pass"))
    assert "expected PASS, got FAIL: NOT as expected" in text
    assert 'Gate <span class="badge b-FAIL">FAIL</span>' in text


def test_html_explorer_data_worst_first_aligned_alternatives(sample_dir: dict[str, Path]) -> None:
    data = explorer_json(sample_dir["html"].read_text())
    assert [c["target"] + "/" + c["kind"] for c in data["cmps"]] == [
        "fp8-block/exactness",
        "fp8-block/accuracy",
        "fp8-block-faulty/exactness",
        "fp8-block-faulty/accuracy",
    ]
    assert sorted(data["tags"]) == ["<b>html</b>", "facts", "math", "translation"]
    faulty = data["cmps"][2]
    ids = [data["prompts"][r[0]][0] for r in faulty["rows"]]
    assert ids == ["capital", "zh", "arith"]  # worst first
    capital = faulty["details"][faulty["rows"][0][7]]
    # " Paris" -> " Lyon" is one replace; the rest aligns
    assert capital["o"] == [[0, 0, 5, 0, 5], [1, 5, 6, 5, 6], [0, 6, 7, 6, 7]]
    assert capital["ra"][:2] == [[" Paris", -0.05, 1], [" Lyon", -4.2, 1]]  # text, not ids
    assert capital["k"][5] == 2.5
    assert faulty["rows"][0][1] == 2 and faulty["rows"][0][5] == "W"  # diverged, WRONG, not garbled
    assert faulty["status"] == "FAIL" and data["cmps"][0]["status"] == "PASS"
    # the explorer opens on the failing target's exactness comparison
    assert 'id="cmp" data-default="2"' in sample_dir["html"].read_text()


def test_html_plots_inline_with_limits_and_marks(sample_dir: dict[str, Path]) -> None:
    text = sample_dir["html"].read_text()
    figures = re.findall(r'<figure class="plot" data-kind="([\w-]+)" id="plot-([\w.-]+)">', text)
    svgs = {k.split(":", 1)[1] for k in sample_dir if k.startswith("plot:")}
    assert {slug for _, slug in figures} == svgs  # every file is inline, and nothing else
    faulty = text[text.index('id="plot-fp8-block-faulty-layers-exactness"') :]
    faulty = faulty[: faulty.index("</figure>")]
    assert '<span class="badge b-FAIL">' not in faulty  # SVG, not HTML badges
    assert ">FAIL</text>" in faulty and "first divergent layer 3</text>" in faulty
    assert "local limit 0.001" in faulty and "accumulated limit 0.05" in faulty
    assert 'stroke="#c62828" stroke-width="1.5" stroke-dasharray="2 2" class="mark"' in faulty
    passing = text[text.index('id="plot-fp8-block-layers-exactness"') :]
    passing = passing[: passing.index("</figure>")]
    assert ">PASS</text>" in passing and "first divergent" not in passing


def test_html_grey_mark_for_a_passing_targets_divergence() -> None:
    run = sample_run()
    run.targets[0].layers[0].first_divergent_layer = 5  # within limits: not a finding
    text = render_html(run)
    passing = text[text.index('id="plot-fp8-block-layers-exactness"') :]
    passing = passing[: passing.index("</figure>")]
    assert "first divergent layer 5 (within limits)" in passing
    assert 'stroke="#999" stroke-width="1.5" stroke-dasharray="2 2" class="mark"' in passing


def test_html_tag_breakdown_audit_and_signature_in_words(sample_dir: dict[str, Path]) -> None:
    text = sample_dir["html"].read_text()
    tags = text[text.index('id="tags"') : text.index('id="prompts"')]
    assert "<td>facts</td>" in tags and "<td>translation</td>" in tags and "<td>math</td>" in tags
    audit = text[text.index('id="t-fp8-block-faulty"') :]
    audit = audit[audit.index("<h4>Quantization audit</h4>") :]
    audit = audit[: audit.index("</table>")]
    assert "5 × 12" in audit and "<th>scale shape</th>" in audit and "[5, 12]" not in audit
    assert "{" not in audit and "<b>transposed</b>" in audit  # the flagged row in bold
    run = sample_run()
    run.signature["prompts"] = "(PosixPath('/data/prompts/smoke.jsonl'),)"
    run.signature["files"] = ["a.jsonl", "b.jsonl"]
    sig = render_html(run)
    sig = sig[sig.index("<h2>Signature</h2>") :]
    assert "<td>/data/prompts/smoke.jsonl</td>" in sig and "PosixPath" not in sig
    assert "<td>a.jsonl, b.jsonl</td>" in sig and "<td>servers.reference.model</td>" in sig


def _inconclusive_run() -> RunResult:
    """The PASS target's accuracy part: one undecided check and one not-informative one."""
    from difftest.results import Check, PartVerdict, TargetVerdict

    run = sample_run()
    t = run.targets[0]
    undecided = Check(
        "kl_mean",
        0.021,
        0.02,
        "<=",
        False,
        note="twin p99 x3",
        decided=False,
        ci=[0.012, 0.031],
        prompts_to_decide=140,
    )
    wide = Check("top1_agreement", 0.91, 0.2, ">=", True, note="in-run A/A floor x3", informative=False)
    t.verdict = TargetVerdict(
        target=t.name, expect="pass", parts=(PartVerdict("accuracy", "reference", (undecided, wide)),)
    )
    return run


def test_html_inconclusive_and_not_informative_checks_render() -> None:
    run = _inconclusive_run()
    assert run.targets[0].verdict.label == "INCONCLUSIVE" and run.gate == "INCONCLUSIVE"  # type: ignore[union-attr]
    text = render_html(run)
    assert 'Gate <span class="badge b-INCONCLUSIVE">INCONCLUSIVE</span> no target contradicts' in text
    card = text[text.index('data-target="fp8-block"') :]
    card = card[: card.index('<div class="sp">')]
    assert '<span class="badge b-INCONCLUSIVE">INCONCLUSIVE</span>' in card
    assert "expected PASS, got INCONCLUSIVE: undecided" in card
    assert (
        '<b>Undecided:</b><ul><li class="t-INCONCLUSIVE">accuracy: mean KL 0.021 vs limit 0.02, '
        "95% CI [0.012, 0.031] straddles the limit (~140 prompts would decide) (limit: twin p99 x3)</li>"
    ) in card
    assert (
        '<li class="ni">accuracy: top-1 agreement 91.0% &gt;= limit 20.0% (limit: in-run A/A floor x3) — '
        "not informative: a broken target would pass this limit too"
    ) in card
    assert "<b>Why:</b>" not in card  # nothing failed
    md = render_markdown(run)
    assert "**Gate: INCONCLUSIVE" in md and "undecided: accuracy: mean KL 0.021 vs limit 0.02" in md
    suites = _suites(render_junit(run))
    ok = suites["difftest.fp8-block"]
    assert ok.get("errors") == "1" and ok.get("skipped") == "1" and ok.get("failures") == "0"


# ----------------------------------------------------------------------------- junit


def _suites(xml_text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml_text)
    assert root.tag == "testsuites"
    return {s.get("name", ""): s for s in root.findall("testsuite")}


def test_junit_negative_control_meets_expectation(sample_dir: dict[str, Path]) -> None:
    root = ET.parse(sample_dir["junit"]).getroot()
    assert root.get("failures") == "0" and root.get("errors") == "0"
    suites = _suites(sample_dir["junit"].read_text())
    assert set(suites) == {"difftest.fp8-block", "difftest.fp8-block-faulty"}
    faulty = suites["difftest.fp8-block-faulty"]
    # 3 checks x 2 parts + 2 + 1 layer checks + 1 invariance check + "meets expectation"
    assert faulty.get("tests") == "11" and len(faulty.findall("testcase")) == 11
    outs = [c.findtext("system-out") or "" for c in faulty.findall("testcase")]
    assert sum("failed as expected" in o for o in outs) == 7


def test_junit_counts_failures_when_fault_was_expected_to_pass() -> None:
    suites = _suites(render_junit(sample_run(fault_expect="pass")))
    faulty = suites["difftest.fp8-block-faulty"]
    failures = [c for c in faulty.findall("testcase") if c.find("failure") is not None]
    assert faulty.get("failures") == "8" and len(failures) == 8  # 7 checks + the expectation
    names = {c.get("name") for c in failures}
    assert names == {
        "kl_mean",
        "top1_agreement",
        "local_rel_err_max",
        "point_rel_err_max",
        "local_cosine_min",
        "meets expectation (expect pass)",
    }
    msg = failures[0].find("failure").get("message")  # type: ignore[union-attr]
    assert msg == "kl_mean 0.1994 > 0.005 (noise floor x3)"
    assert suites["difftest.fp8-block"].get("failures") == "0"


def test_junit_degraded_run_is_valid_xml() -> None:
    run = degraded_run()
    run.targets[0].comparisons[0].prompts[0].error = "bad \x00 byte"  # not rendered, but never mind
    suites = _suites(render_junit(run))
    broken = suites["difftest.broken"]
    assert broken.get("skipped") == "1" and broken.get("failures") == "2"
    assert suites["difftest.never-ran"].get("errors") == "1"


# ----------------------------------------------------------------------------- json


def test_json_round_trip(sample_dir: dict[str, Path]) -> None:
    data = json.loads(sample_dir["json"].read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert load_run(sample_dir["json"]) == sample_run()
    assert load_run(sample_dir["json"].parent) == sample_run()  # a folder works too
    assert load_run(sample_dir["json"]).targets[1].verdict.localisation == LOCALISATION  # type: ignore[union-attr]


def test_json_round_trip_degraded(tmp_path: Path) -> None:
    paths = write_report(degraded_run(), tmp_path)
    assert load_run(paths["json"]) == degraded_run()


def test_load_run_rejects_other_schema_version(tmp_path: Path) -> None:
    data = sample_run().to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        UsageError, match=rf"schema_version {SCHEMA_VERSION + 1}.*reads version {SCHEMA_VERSION}"
    ):
        load_run(path)
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not a valid report.json"):
        load_run(path)
    with pytest.raises(UsageError, match="no such report"):
        load_run(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [(("targets", 0, "name"), None, "targets[0].name"), (("warnings",), None, "warnings"),
     (("targets", 0, "comparisons", 0, "aggregate"), None, "targets[0].comparisons[0].aggregate")],
)  # fmt: skip
def test_load_run_names_a_field_of_the_wrong_type(
    tmp_path: Path, where: tuple, value: object, named: str
) -> None:
    """from_dict took fields as they came: a null target name or aggregate loaded, then crashed the
    renderers (a traceback from `difftest report`); the report's own samples still load."""
    data = sample_run().to_dict() | {"schema_version": SCHEMA_VERSION}
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=rf"does not fit the result model \({re.escape(named)}: "):
        load_run(path)


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "x.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_json_round_trip_keeps_text_that_reads_like_a_float() -> None:
    run = RunResult(reference="ref")
    run.warnings.append("inf")
    assert RunResult.from_dict(json.loads(json.dumps(run.to_dict()))) == run


# ----------------------------------------------------------------------------- missing data


def test_degraded_run_shows_na_not_zero(tmp_path: Path) -> None:
    paths = write_report(degraded_run(), tmp_path)
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| broken |"))
    assert row == (
        "| broken | n/a | pass | **FAIL** | NO | accuracy vs `reference` | n/a | n/a | n/a | 50.0% | n/a | 1/2 |"
    )
    assert "| never-ran | int4-g128 | pass | **NO VERDICT** | NO |" in md
    assert "accuracy: mean KL not measured (limit: no echo)" in md and "exactness: skipped (no golden)" in md
    assert "| p1 | Tell me a story | n/a | n/a | n/a | n/a | n/a | n/a | HTTP 500: engine died |" in md
    assert (
        "no white-box layer data (n/a)" in md
        and "no noise floor (n/a): exactness limits are the absolute" in md
    )
    html = paths["html"].read_text()
    data = explorer_json(html)
    rows = data["cmps"][0]["rows"]
    assert rows[0][1] & 1 and rows[0][2] is None  # the failed request first, its KL null (n/a), not 0
    assert data["cmps"][0]["details"][0]["e"] == "HTTP 500: engine died"
    assert "no per-layer data" in html


def test_fmt_num() -> None:
    assert fmt_num(None) == "n/a"
    assert fmt_num(0.0) == "0"
    assert fmt_num(0.857, pct=True) == "85.7%"
    assert fmt_num(float("nan")) == "nan"
    assert fmt_num(1.5e-5) == "1.500e-05"


def test_prompt_order_worst_first() -> None:
    ps = [
        PromptDiff("ok", "", kl_mean=0.001, match_rate=1.0),
        PromptDiff("bad", "", kl_mean=0.5, match_rate=0.5),
        PromptDiff("err", "", error="timeout"),
        PromptDiff("nokl", "", match_rate=0.2),
    ]
    assert [p.prompt_id for p in prompt_order(ps)] == ["err", "bad", "ok", "nokl"]


# ----------------------------------------------------------------------------- terminal


def test_render_summary_plain() -> None:
    console, buf = _plain()
    render_summary(sample_run(), console, report_dir=Path("/tmp/out/run1"))
    out = buf.getvalue()
    assert "\x1b[" not in out  # no escape codes when not a terminal
    assert "0.1994" in out and "[0.05, 0.41]" in out and "85.7%" in out and "0/12" in out
    assert f"localisation: {LOCALISATION}" in " ".join(out.split())
    assert "exactness: mean KL 0.1994 > limit 0.005 (limit: noise floor x3)" in " ".join(out.split())
    assert "gate PASS" in out and "report: /tmp/out/run1" in out


def test_render_summary_degraded() -> None:
    console, buf = _plain()
    render_summary(degraded_run(), console)
    out = buf.getvalue()
    assert "n/a" in out and "1/2" in out and "NO VERDICT" in out and "gate FAIL" in out


def test_render_summary_names_checks_a_pass_did_not_measure() -> None:
    """A chat comparison (no echo) PASSed with 'n/a' for KL and top-1 and no word on the terminal
    that those checks had been skipped; report.md and report.html said it, the summary did not."""
    run = sample_run()
    t = run.targets[0]
    skipped = "accuracy: teacher-forced checks skipped: the chat protocol has no echo"
    t.verdict = dataclasses.replace(
        t.verdict, warnings=(*t.verdict.warnings, skipped, "exactness limits from x")
    )
    console, buf = _plain()
    render_summary(run, console)
    out = " ".join(buf.getvalue().split())
    assert f"- {skipped}" in out and "exactness limits from x" not in out
    short = "accuracy: BLEU of 1- to 3-grams only: no target continuation reaches 4 tokens"
    t.verdict = dataclasses.replace(t.verdict, warnings=(short,))
    console, buf = _plain()
    render_summary(run, console)
    assert short in " ".join(buf.getvalue().split())  # a PASS on a BLEU it did not measure says so


def test_side_by_side_aligns_and_marks_divergence() -> None:
    console, buf = _plain(80)
    render_side_by_side(
        ["你好", "\n", "世界", "!"],
        ["你好", "\n", "地球"],
        2,
        {"世界": -0.2, "地球": -1.9},
        {"地球": -0.4, "世界": -1.2},
        console,
    )
    lines = buf.getvalue().splitlines()
    ref = next(line for line in lines if line.startswith("ref"))
    tgt = next(line for line in lines if line.startswith("target"))
    marker = lines[lines.index(tgt) + 1]
    from rich.cells import cell_len

    # the divergent column starts at the same display cell in both rows and under the marker
    col = cell_len(ref[: ref.index("世界")])
    assert cell_len(tgt[: tgt.index("地球")]) == col and cell_len(marker[: marker.index("^")]) == col
    assert "∅" in tgt  # the target is one token shorter
    out = buf.getvalue()
    assert "first divergence at token 2" in out and "-0.200" in out and "-1.200" in out


def test_side_by_side_identical() -> None:
    console, buf = _plain()
    render_side_by_side(["a", "b"], ["a", "b"], None, None, None, console)
    assert "identical continuations" in buf.getvalue()


def test_render_html_without_layers_or_prompts() -> None:
    text = render_html(RunResult(reference="r"))
    assert "no plots: no per-prompt KL and no white-box layer data (n/a)" in text and "<table>" in text
    assert "no per-prompt results (n/a)" in text
    assert render_markdown(RunResult(reference="r")).startswith("# difftest report")


def test_headline_reads_the_keys_metrics_aggregate_writes() -> None:
    """Contract with difftest.metrics.aggregate: every headline column finds its key."""
    from difftest.metrics.aggregate import aggregate_prompts
    from difftest.report.markdown import headline_cells

    comp = sample_run().targets[1].comparisons[0]
    comp.aggregate, comp.ci = aggregate_prompts(comp.prompts)
    cells = headline_cells(comp)
    assert "n/a" not in " ".join(cells), cells
    assert cells[0].startswith("0.1993 [")  # mean of 1.5e-4, 0.405, 0.1926
    assert cells[2] == "88.6%"  # top-1: mean of 1, 6/7, 0.8


def test_a_pipe_in_a_baseline_name_stays_inside_its_table_cell() -> None:
    """GFM splits a table row at `|` even inside a code span: a baseline named "ref|x" gave the
    verdict row one cell more than its header."""
    from difftest.report.markdown import md_code

    assert md_code("ref|x", cell=True) == "`ref\\|x`" and md_code("ref|x") == "`ref|x`"


def test_a_nan_check_reads_as_failing_and_a_failing_check_is_never_greyed() -> None:
    """The bugs: "mean KL NaN <= limit 0.01" read as a pass, and a NaN failing a not-informative
    check was greyed out as "not informative" -- the only reason the target failed."""
    from difftest.report.html import _check_li
    from difftest.report.words import check_words
    from difftest.results import Check, PartVerdict

    c = Check("kl_mean", math.nan, 100.0, "<=", False, True, "override", informative=False)
    w = check_words(PartVerdict("accuracy", "fp16", (c,)), c)
    assert w.fails and "(NaN always fails) vs limit" in w.sentence() and "<=" not in w.sentence()
    assert _check_li(w).startswith("<li>") and 'class="ni"' not in _check_li(w)


def test_the_json_summary_gives_reasons_and_open_questions_in_the_reports_words(tmp_path: Path) -> None:
    """`run --json` reasons read as the report's ("mean KL 0.1994 > limit 0.005"), not as the check's
    key and raw numbers, and an INCONCLUSIVE target says what this sample could not decide."""
    from difftest.cli.outcome import run_summary
    from difftest.results import Check, PartVerdict, TargetVerdict

    run = sample_run()
    undecided = Check("kl_mean", 0.04, 0.05, "<=", True, ci=(0.02, 0.07), decided=False, prompts_to_decide=40)
    run.targets[0].verdict = TargetVerdict(
        target="fp8-block", expect="pass", parts=(PartVerdict("accuracy", "reference", (undecided,)),)
    )
    summary = run_summary(run, tmp_path, [], 4)
    open_target, failing = summary["targets"]
    assert open_target["verdict"] == "INCONCLUSIVE" and open_target["reasons"] == []
    assert open_target["open_questions"] == [
        "accuracy: mean KL 0.04 vs limit 0.05, 95% CI [0.02, 0.07] straddles the limit (~40 prompts would decide)"
    ]
    assert failing["verdict"] == "FAIL" and failing["open_questions"] == []
    assert "exactness: mean KL 0.1994 > limit 0.005 (limit: noise floor x3)" in failing["reasons"]
    assert "exactness: top-1 agreement 85.7% < limit 95.0% (limit: noise floor x3)" in failing["reasons"]
    assert not any("kl_mean" in r or "top1_agreement" in r for r in failing["reasons"])


def test_a_check_that_was_not_measured_says_so_not_that_its_limit_is_loose() -> None:
    """A chat comparison's PASS card read "accuracy mean KL n/a ≤ limit 0.08", and its skipped KL
    check "not measured (limit: skipped: ...) — not informative: a broken target would pass this
    limit too": neither was true, no limit had been applied."""
    from difftest.report.words import check_words
    from difftest.results import Check, PartVerdict

    why = "skipped: teacher forcing unavailable over /v1/chat/completions"
    c = Check("kl_mean", None, 0.08, "<=", True, False, why, informative=False)
    w = check_words(PartVerdict("accuracy", "fp16", (c,)), c)
    assert w.sentence() == f"accuracy: mean KL not measured ({why})"
    run = sample_run()
    t = next(t for t in run.targets if t.name == "fp8-block")
    assert t.verdict is not None
    parts = tuple(
        dataclasses.replace(p, checks=tuple(x for x in p.checks if x.name != "kl_mean") + (c,))
        if p.part == "accuracy"
        else p
        for p in t.verdict.parts
    )
    t.verdict = dataclasses.replace(t.verdict, parts=parts)
    text = render_html(run)
    card = text[text.index('data-target="fp8-block"') : text.index('data-target="fp8-block-faulty"')]
    assert "informative checks passed" in card and "mean KL n/a" not in card and "≤ limit" not in card
    assert f"accuracy: mean KL not measured ({why})" in card and "broken target would pass" not in card


# ----------------------------------------------------------------------------- report.md: null, slots


def test_markdown_says_the_limits_came_from_the_twin() -> None:
    """The bug: under the twin null report.md read "no noise floor used (n/a): exactness limits
    fall back to defaults"; the limits came from the rounding twin, as report.html's table says."""
    from sample_results import _comparison

    run = sample_run()
    run.noise_floor = None
    run.signature["null"] = "rounding twin of each built-in golden (module tolerance of its dtype)"
    twin = _comparison("null", "gold", "gold-twin", faulty=False)
    twin.module_noise = 0.002
    run.nulls = [twin]
    md = render_markdown(run)
    section = md[md.index("## Null model (where exactness limits come from)") :]
    assert "Null model: rounding twin of each built-in golden" in section
    assert "| `gold` | `gold-twin` | " in section and "| 0.002 |" in section
    assert "_no noise floor file (n/a): the limits come from the rounding twin above_" in section
    assert "fall back to defaults" not in md


def test_markdown_batch_slot_invariance_is_a_table_row_per_placement() -> None:
    """The bug: one ~3,000-character comma-separated line of raw keys and words."""
    run = sample_run()
    slot = {"placement": "batch slot 1 of 4", "same_tokens": True, "max_logprob_diff": 0.0}
    run.targets[0].invariance = {
        "prompt_id": "arith-sum",
        "tie_margin": None,
        "slots": [slot, slot | {"placement": "batch slot 3 of 4", "same_tokens": False}],
        "baseline_draw_worst": [2.5e-06, 0.0],
    }
    md = render_markdown(run)
    block = md[md.index("#### Batch-slot invariance") :]
    assert "| tie margin | n/a |" in block and "| baseline draw worst | 2.500e-06, 0 |" in block
    assert "| placement | same tokens | max logprob diff |" in block
    assert "| batch slot 1 of 4 | yes | 0 |" in block and "| batch slot 3 of 4 | no | 0 |" in block
    assert max(len(line) for line in md.splitlines() if "slot" in line) < 200
    assert "Batch-slot invariance:" not in md  # the one-line form
