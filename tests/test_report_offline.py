"""`difftest report DIR` re-judges what report.json says, consistently: a file with nothing to judge
is refused (exit 2, as `run` refuses a config without targets), an edited `expect` is the one both
the label and the gate use; and report.json's signature holds JSON, not Python reprs, with old
files (the repr form) still loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from live_fakes import live_fake
from sample_results import sample_run

from difftest.cli import main
from difftest.config import load_config
from difftest.report import load_run, write_report
from difftest.report.words import expectation_words
from difftest.signature import run_signature

OLD_RUN_SIGNATURE = {
    "prompts": "(PosixPath('/data/prompts/smoke.jsonl'),)",
    "output_dir": "/data/runs/ci",
    "max_tokens": 24,
    "logprobs": 5,
    "seed": 0,
    "endpoint": "completions",
}


def _stored(folder: Path, edit: Callable[[dict], Any] = lambda d: None) -> Path:
    paths = write_report(sample_run(), folder)
    data = json.loads(paths["json"].read_text())
    edit(data)
    paths["json"].write_text(json.dumps(data))
    return folder


def test_a_report_without_targets_is_refused(tmp_path: Path, capsys) -> None:
    """The bug: an empty table, then `gate PASS: every target as expected`, exit 0."""
    run_dir = _stored(tmp_path / "run", lambda d: d.update(targets=[]))
    capsys.readouterr()
    code = main(["report", str(run_dir), "-o", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("difftest: error: ") and "no targets" in err
    assert not (tmp_path / "new").exists()


def test_an_edited_expect_decides_label_and_gate(tmp_path: Path, capsys) -> None:
    """The bug: the negative control's `expect` edited to "pass" (its verdict's copy not) printed
    `FAIL (expected PASS: as expected)` and `gate PASS`, exit 0."""
    run_dir = _stored(tmp_path / "run", lambda d: d["targets"][1].update(expect="pass"))
    capsys.readouterr()
    code = main(["report", str(run_dir), "-o", str(tmp_path / "new"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["gate"] == "FAIL" and not summary["gate_passed"]
    t = load_run(tmp_path / "new").targets[1]
    assert t.expect == "pass" and t.verdict is not None and t.verdict.expect == "pass"
    assert expectation_words(t) == ("expected PASS, got FAIL: NOT as expected", False)
    # and back: the same file with the control's expect "fail" everywhere is as expected again
    assert main(["report", str(tmp_path / "new"), "-o", str(tmp_path / "again")]) == 1
    ok_dir = _stored(tmp_path / "ok")
    assert main(["report", str(ok_dir), "-o", str(tmp_path / "ok2")]) == 0


@pytest.mark.parametrize("expect", ["PASS", "maybe", ""])
def test_an_expect_that_is_neither_pass_nor_fail_is_refused(tmp_path: Path, expect: str, capsys) -> None:
    run_dir = _stored(tmp_path / "run", lambda d: d["targets"][0].update(expect=expect))
    capsys.readouterr()
    assert main(["report", str(run_dir), "-o", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "targets[0].expect" in err


def test_signature_run_settings_are_json(tmp_path: Path) -> None:
    """The bug: run.prompts was the repr "(PosixPath('...smoke.jsonl'),)" and run.output_dir the
    config's folder even when `-o` wrote elsewhere."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps({"id": name, "prompt": "x"}) + "\n")
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        '[run]\nprompts = ["a.jsonl", "b.jsonl"]\noutput_dir = "cfg-out"\n'
        '[reference]\nname = "r"\nurl = "http://127.0.0.1:9"\n'
        '[[target]]\nname = "t"\nurl = "http://127.0.0.1:10"\nscheme = "fp8-block"\n'
    )
    cfg = load_config(cfg_path)
    sig = run_signature(cfg, {}, [], None, out_dir=tmp_path / "elsewhere")["run"]
    assert sig["prompts"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert sig["output_dir"] == str((tmp_path / "elsewhere").resolve())
    assert "output_dir" not in run_signature(cfg, {}, [], None)["run"]  # unknown: not the config's guess
    assert json.loads(json.dumps(sig)) == sig


def test_a_run_records_its_prompts_as_paths_and_never_the_configs_folder(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "1+2+3="}) + "\n")
    with live_fake() as ref, live_fake() as tgt:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 4\nwhitebox = "off"\nbatch_slot_check = false\n'
            f'output_dir = "{tmp_path / "cfg-out"}"\n[reference]\nname = "r"\nurl = "{ref}"\n'
            f'[[target]]\nname = "t"\nurl = "{tgt}"\nscheme = "none"\n'
        )
        main(["run", str(cfg), "-o", str(tmp_path / "written")])
    sig = json.loads((tmp_path / "written" / "report.json").read_text())["signature"]["run"]
    assert sig["prompts"] == [str(prompts)]
    assert sig.get("output_dir", str((tmp_path / "written").resolve())) == str(
        (tmp_path / "written").resolve()
    )


def test_old_reports_with_repr_signatures_still_load_diff_and_render(tmp_path: Path, capsys) -> None:
    def old(d: dict) -> None:
        d["signature"]["run"] = dict(OLD_RUN_SIGNATURE)

    a, b = _stored(tmp_path / "a", old), _stored(tmp_path / "b", old)
    assert load_run(a).signature["run"]["prompts"] == OLD_RUN_SIGNATURE["prompts"]
    assert main(["diff", str(a), str(b)]) == 0
    assert main(["report", str(a), "-o", str(tmp_path / "new")]) == 0
    assert "PosixPath" not in (tmp_path / "new" / "report.html").read_text()
