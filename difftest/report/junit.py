"""junit.xml: one testsuite per target, one testcase per threshold check, plus the expectation.

CI systems count `<failure>` elements, so failures must mean "the gate fails here". A negative
control (`expect = "fail"`) whose checks fail is the tool working: its failed checks are passing
testcases (their text says "failed as expected"), and its "meets expectation" testcase fails only
if the faulted target unexpectedly passed. A part that did not run, and a check whose 95% interval
straddles its limit (undecided), are `<skipped>`; a not-informative check decides nothing and
passes with a note; an INCONCLUSIVE verdict is an `<error>` (exit 4), neither pass nor failure.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from difftest.report.markdown import localisation_line, reasons
from difftest.report.words import check_fails, check_undecided, is_informative
from difftest.results import RunResult, TargetResult

# XML 1.0 forbids most control characters even when escaped; a prompt may carry them.
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # XML 1.0 Char


def _x(s: Any) -> str:
    return _ILLEGAL_XML.sub("\ufffd", str(s))


def _case(suite: ET.Element, classname: str, name: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", {"classname": _x(classname), "name": _x(name), "time": "0"})


def _suite(t: TargetResult) -> tuple[ET.Element, dict[str, int]]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suite = ET.Element("testsuite", {"name": _x(f"difftest.{t.name}")})
    props = ET.SubElement(suite, "properties")
    loc = localisation_line(t)
    for k, v in (("scheme", t.scheme), ("expect", t.expect), ("golden", t.golden), ("localisation", loc)):
        if v is not None:
            ET.SubElement(props, "property", {"name": k, "value": _x(v)})
    cls = f"difftest.{t.name}"
    negative = t.expect == "fail"
    if t.verdict is None:
        case = _case(suite, cls, "verdict")
        ET.SubElement(case, "error", {"message": "no verdict"}).text = _x("; ".join(reasons(t)))
        counts["tests"] += 1
        counts["errors"] += 1
    else:
        for part in t.verdict.parts:
            if part.skipped:
                case = _case(suite, f"{cls}.{part.part}", "(part)")
                ET.SubElement(case, "skipped", {"message": _x(part.skipped)})
                counts["tests"] += 1
                counts["skipped"] += 1
            for check in part.checks:
                case = _case(suite, f"{cls}.{part.part}", check.name)
                counts["tests"] += 1
                text = check.describe()
                if check_fails(check):
                    if negative:
                        ET.SubElement(case, "system-out").text = _x(
                            f"failed as expected (negative control): {text}"
                        )
                    else:
                        ET.SubElement(case, "failure", {"message": _x(text), "type": "threshold"}).text = _x(
                            text
                        )
                        counts["failures"] += 1
                elif check_undecided(check):  # neither side: the sample cannot tell
                    ET.SubElement(case, "skipped", {"message": _x(f"undecided: {text}")})
                    counts["skipped"] += 1
                elif not is_informative(check):
                    ET.SubElement(case, "system-out").text = _x(f"not informative (decides nothing): {text}")
                else:
                    ET.SubElement(case, "system-out").text = _x(f"ok: {text}")
        case = _case(suite, cls, f"meets expectation (expect {t.expect})")
        counts["tests"] += 1
        if not t.verdict.meets_expectation:
            why = reasons(t) or ["every check passed"]
            msg = f"verdict {t.verdict.label}, expected {t.expect.upper()}"
            body = msg + "\n" + "\n".join(why) + (f"\nlocalisation: {loc}" if loc else "")
            # INCONCLUSIVE is not a pass and not a contradiction: an error (exit 4), not a failure
            undecided = t.verdict.label == "INCONCLUSIVE"
            tag, kind = ("error", "inconclusive") if undecided else ("failure", "expectation")
            ET.SubElement(case, tag, {"message": _x(msg), "type": kind}).text = _x(body)
            counts["errors" if undecided else "failures"] += 1
    for k, v in counts.items():
        suite.set(k, str(v))
    suite.set("time", "0")
    return suite, counts


def render_junit(run: RunResult) -> str:
    root = ET.Element("testsuites", {"name": "difftest"})
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for t in run.targets:
        suite, counts = _suite(t)
        root.append(suite)
        for k in totals:
            totals[k] += counts[k]
    if run.infrastructure:  # an exit-3 run must not read green in a CI dashboard
        suite = ET.SubElement(root, "testsuite", {"name": "infrastructure", "tests": str(len(run.infrastructure)),
                                                  "failures": "0", "errors": str(len(run.infrastructure))})  # fmt: skip
        for i, problem in enumerate(run.infrastructure):
            case = ET.SubElement(
                suite, "testcase", {"classname": "difftest.infrastructure", "name": f"problem {i + 1}"}
            )
            ET.SubElement(case, "error", {"message": _x(problem)}).text = _x(problem)
        totals["tests"] += len(run.infrastructure)
        totals["errors"] += len(run.infrastructure)
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{run.elapsed_s:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
