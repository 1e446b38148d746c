"""`whitebox = "auto"` says which sides had no /debug and what was therefore not run.

The bug: a target without the debug protocol (a shim with `debug = false`) under whitebox "auto"
lost its per-layer diff, localisation and quant audit without a word: no run warning, report.md
only "_no white-box layer data (n/a)_". Now the verdict carries a skipped "white-box" part naming
the sides (terminal, report.md, junit) and the target's warnings in report.json say it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeBehaviour, make_fake_app
from test_runner import run_with_golden

from difftest.cli import main


def _run(tmp_path: Path, capsys: pytest.CaptureFixture, debug: dict[str, bool]) -> tuple[int, str, str, dict]:
    apps = {name: make_fake_app(FakeBehaviour(debug=on)) for name, on in debug.items()}
    code = run_with_golden(tmp_path, apps, "auto")
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    return code, out, (tmp_path / "out" / "report.md").read_text(), report


def test_auto_names_the_sides_without_debug_and_what_was_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, md, report = _run(tmp_path, capsys, {"ref": True, "gold": False, "tgt": False})
    said = "no /debug on target t, golden g"
    assert code == 0  # black-box verdict stands: the skipped part neither passes nor fails
    (t,) = report["targets"]
    assert t["verdict"]["label"] == "PASS"
    assert any(
        said in w and "localisation and quant audit not run" in w for w in t["conformance"]["warnings"]
    )
    skipped = [p for p in t["verdict"]["parts"] if p["part"] == "white-box"]
    assert len(skipped) == 1 and said in skipped[0]["skipped"]
    assert said in " ".join(out.split())  # the terminal (rich may wrap the line)
    assert said in md and "reference ref" not in md
    # a re-judge (report --thresholds) keeps the skipped part: it was dropped with the stored verdict
    (tmp_path / "th.toml").write_text("[thresholds]\nmargin = 3\n")
    argv = [
        "report",
        str(tmp_path / "out"),
        "--thresholds",
        str(tmp_path / "th.toml"),
        "-o",
        str(tmp_path / "again"),
    ]
    assert main(argv) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [p["skipped"] for p in again["targets"][0]["verdict"]["parts"] if p["part"] == "white-box"] == [
        skipped[0]["skipped"]
    ]


def test_auto_is_quiet_when_every_side_serves_debug(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, md, report = _run(tmp_path, capsys, {"ref": True, "gold": True, "tgt": True})
    assert code == 0 and "no /debug" not in out and "no /debug" not in md
    assert not [p for p in report["targets"][0]["verdict"]["parts"] if p["part"] == "white-box"]
