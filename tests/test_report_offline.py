"""`difftest report DIR` re-judges what report.json says, consistently: a file with nothing to judge
is refused (exit 2, as `run` refuses a config without targets), an edited `expect` is the one both
the label and the gate use, edited numbers are re-judged with or without --thresholds (a warning
names the verdict that changed), what cannot be re-judged offline or applies to no target is said;
and report.json's signature holds JSON, not Python reprs, with old files (the repr form) still
loading."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBehaviour
from live_fakes import live_fake

from difftest.cli import main
from difftest.config import load_config
from difftest.report import load_run
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


PROMPTS = ["1+2+3=", "the quick brown fox", "def add(a, b):", "the lazy dog is", "a fox jumps over", "2+2="]


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run's report.json (live fakes, batch-slot check on): target `good` PASSes and the
    negative control `faulty` (every other token the runner-up, expect = "fail") FAILs -- verdicts
    the judge gave the stored numbers, as every run's are (sample_results' hand-built verdicts are
    not: a re-judge does not give them back)."""
    tmp = tmp_path_factory.mktemp("judged")
    prompts = tmp / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS))
    )
    with live_fake() as ref, live_fake() as good, live_fake(FakeBehaviour(flip_every=2)) as bad:
        cfg = tmp / "c.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 12\nwhitebox = "off"\n'
            f'[reference]\nname = "ref"\nurl = "{ref}"\n'
            f'[[target]]\nname = "good"\nurl = "{good}"\nscheme = "none"\n'
            f'[[target]]\nname = "faulty"\nurl = "{bad}"\nscheme = "none"\nexpect = "fail"\n'
        )
        assert main(["run", str(cfg), "-o", str(tmp / "run")]) == 0
    return tmp / "run" / "report.json"


def _stored(folder: Path, source: Path, edit: Callable[[dict], Any] = lambda d: None) -> Path:
    """A copy of report.json `source` in `folder`, edited."""
    data = json.loads(source.read_text())
    edit(data)
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(data))
    return folder


def test_a_report_without_targets_is_refused(tmp_path: Path, judged: Path, capsys) -> None:
    """The bug: an empty table, then `gate PASS: every target as expected`, exit 0."""
    run_dir = _stored(tmp_path / "run", judged, lambda d: d.update(targets=[]))
    capsys.readouterr()
    code = main(["report", str(run_dir), "-o", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("difftest: error: ") and "no targets" in err
    assert not (tmp_path / "new").exists()


def test_an_edited_expect_decides_label_and_gate(tmp_path: Path, judged: Path, capsys) -> None:
    """The bug: the negative control's `expect` edited to "pass" (its verdict's copy not) printed
    `FAIL (expected PASS: as expected)` and `gate PASS`, exit 0."""
    run_dir = _stored(tmp_path / "run", judged, lambda d: d["targets"][1].update(expect="pass"))
    capsys.readouterr()
    code = main(["report", str(run_dir), "-o", str(tmp_path / "new"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["gate"] == "FAIL" and not summary["gate_passed"]
    t = load_run(tmp_path / "new").targets[1]
    assert t.expect == "pass" and t.verdict is not None and t.verdict.expect == "pass"
    assert expectation_words(t) == ("expected PASS, got FAIL: NOT as expected", False)
    # and back: the same file with the control's expect "fail" everywhere is as expected again
    assert main(["report", str(tmp_path / "new"), "-o", str(tmp_path / "again")]) == 1
    ok_dir = _stored(tmp_path / "ok", judged)
    assert main(["report", str(ok_dir), "-o", str(tmp_path / "ok2")]) == 0


@pytest.mark.parametrize("expect", ["PASS", "maybe", ""])
def test_an_expect_that_is_neither_pass_nor_fail_is_refused(
    tmp_path: Path, judged: Path, expect: str, capsys
) -> None:
    run_dir = _stored(tmp_path / "run", judged, lambda d: d["targets"][0].update(expect=expect))
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


def test_old_reports_with_repr_signatures_still_load_diff_and_render(
    tmp_path: Path, judged: Path, capsys
) -> None:
    def old(d: dict) -> None:
        d["signature"]["run"] = dict(OLD_RUN_SIGNATURE)

    a, b = _stored(tmp_path / "a", judged, old), _stored(tmp_path / "b", judged, old)
    assert load_run(a).signature["run"]["prompts"] == OLD_RUN_SIGNATURE["prompts"]
    assert main(["diff", str(a), str(b)]) == 0
    assert main(["report", str(a), "-o", str(tmp_path / "new")]) == 0
    assert "PosixPath" not in (tmp_path / "new" / "report.html").read_text()


def _verdicts(folder: Path) -> list[dict]:
    return [t["verdict"] for t in json.loads((folder / "report.json").read_text())["targets"]]


def test_an_untampered_run_re_judges_to_exactly_its_verdicts(tmp_path: Path, judged: Path, capsys) -> None:
    run_dir = _stored(tmp_path / "run", judged)
    assert main(["report", str(run_dir), "-o", str(tmp_path / "new"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
    assert _verdicts(tmp_path / "new") == _verdicts(run_dir)


def _tamper_kl(d: dict) -> None:
    """The target that PASSes, its mean KL edited to 1.0 (the stored verdict left as it was)."""
    acc = next(c for c in d["targets"][0]["comparisons"] if c["kind"] == "accuracy")
    acc["aggregate"]["kl_mean"], acc["ci"]["kl_mean"] = 1.0, [0.9, 1.1]


@pytest.mark.parametrize("thresholds", [False, True])
def test_report_re_judges_edited_numbers_with_or_without_thresholds(
    tmp_path: Path, judged: Path, thresholds: bool, capsys
) -> None:
    """The bug (/tmp/t3/dmg/i, /tmp/t1/runs/tamper): without --thresholds `report DIR` re-rendered
    the stored PASS of a target whose stored mean KL is 1.0, exit 0; `--thresholds empty.toml` gave
    FAIL, exit 1. Both re-judge now, and a warning line names the verdict the numbers changed."""
    run_dir = _stored(tmp_path / "run", judged, _tamper_kl)
    empty = tmp_path / "empty.toml"
    empty.write_text("[thresholds]\n")
    argv = ["report", str(run_dir), "-o", str(tmp_path / "new")] + (
        ["--thresholds", str(empty)] if thresholds else []
    )
    capsys.readouterr()
    assert main(argv) == 1
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert said == [
        "warning: good: stored verdict PASS, re-judged from report.json's own numbers and thresholds: "
        "FAIL (numbers edited, or written by another difftest version)"
    ]
    assert [v["label"] for v in _verdicts(tmp_path / "new")] == ["FAIL", "FAIL"]


def _slot_part_failed(d: dict) -> None:
    """The target that PASSes, as if its batch-slot check had flipped a token (stored verdict FAIL)."""
    inv = next(p for p in d["targets"][0]["verdict"]["parts"] if p["part"] == "invariance")
    check = next(c for c in inv["checks"] if c["name"] == "slot_token_mismatches")
    check.update(value=1.0, passed=False)
    d["targets"][0]["verdict"].update(label="FAIL", meets_expectation=False)  # as report.json derives them


def test_a_failing_targets_batch_slot_part_survives_a_re_judge(tmp_path: Path, judged: Path) -> None:
    """The bug: rejudge read the stored verdict's parts under `if old`, and a FAIL verdict is falsy:
    a target failing only its batch-slot check lost that part on `report --thresholds` and PASSed."""
    run_dir = _stored(tmp_path / "run", judged, _slot_part_failed)
    empty = tmp_path / "empty.toml"
    empty.write_text("[thresholds]\n")
    assert main(["report", str(run_dir), "--thresholds", str(empty), "-o", str(tmp_path / "new")]) == 1
    assert _verdicts(tmp_path / "new") == _verdicts(run_dir)


def test_a_tie_margin_the_slot_part_cannot_take_offline_is_said(tmp_path: Path, judged: Path, capsys) -> None:
    """The bug: `report --thresholds` with `tie_margin` re-classified the divergences but carried the
    batch-slot part judged with the run's margin, without a word. A run whose golden has a twin
    stores the margin it used there (here the minimum 0.05 a target without a twin null gets)."""
    run_dir = _stored(
        tmp_path / "run", judged, lambda d: d["targets"][0]["invariance"].update(tie_margin=0.05)
    )
    wide, same = tmp_path / "wide.toml", tmp_path / "same.toml"
    wide.write_text("[thresholds]\ntie_margin = 0.9\n")
    same.write_text("[thresholds]\ntie_margin = 0.05\n")
    capsys.readouterr()
    assert main(["report", str(run_dir), "--thresholds", str(wide), "-o", str(tmp_path / "w"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [
        "good: batch-slot part not re-judged offline: kept at the run's TIE margin 0.05 nats, not 0.9 "
        "(override [thresholds] tie_margin); report.json holds the baseline draws' flip counts, not their flips"
    ]
    assert main(["report", str(run_dir), "--thresholds", str(same), "-o", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []  # the margin the run used: nothing lost


def test_a_thresholds_table_no_target_reads_is_warned(tmp_path: Path, judged: Path, capsys) -> None:
    """The bug (/tmp/t1/other.toml): `[thresholds.int4-g128]` on a run with no int4 target changed
    nothing without a word. Warned in one line (`difftest run` accepts such a table silently, and
    one file may serve runs of several schemes): not refused."""
    run_dir = _stored(tmp_path / "run", judged)
    other, used = tmp_path / "other.toml", tmp_path / "used.toml"
    other.write_text("[thresholds.int4-g128]\nkl_mean_max = 0.0001\n")
    used.write_text("[thresholds.none]\nkl_mean_max = 0.5\n")
    capsys.readouterr()
    assert main(["report", str(run_dir), "--thresholds", str(other), "-o", str(tmp_path / "o")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert said == [
        f"warning: --thresholds {other}: [thresholds.int4-g128] applies to no target of this run "
        "(schemes: none): ignored"
    ]
    assert main(["report", str(run_dir), "--thresholds", str(used), "-o", str(tmp_path / "u"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


def test_a_report_the_current_rules_cannot_judge_is_exit_2(tmp_path: Path, judged: Path, capsys) -> None:
    """Re-judging every time reads the stored thresholds and noise floor: a damaged one is a one-line
    exit 2, never a traceback nor a stored verdict re-rendered as if reproduced."""
    edits: list[Callable[[dict], Any]] = [
        lambda d: d["signature"].update(thresholds={"default": {"broken_rate_max": 1.0}}),
        lambda d: d["signature"].update(thresholds={"kl_mean_max": 0.5}),
        lambda d: d.update(noise_floor={"kl_mean": 0.001}),
    ]
    for i, edit in enumerate(edits):
        run_dir = _stored(tmp_path / f"run{i}", judged, edit)
        capsys.readouterr()
        assert main(["report", str(run_dir), "-o", str(tmp_path / f"new{i}")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("difftest: error: ") and "Traceback" not in err


def test_report_and_diff_refuse_a_folder_a_run_holds(tmp_path: Path, judged: Path, capsys) -> None:
    """The bug: `report -o DIR` and `diff -o DIR` wrote report.json / junit.xml (or diff.json) into a
    folder a run was writing, exit 0; the run, interrupted, then left that other report at the top
    for CI to read as its result."""
    from difftest.runner import folder_lock

    busy = tmp_path / "busy"
    busy.mkdir()
    with folder_lock(busy):
        assert main(["report", str(judged), "-o", str(busy)]) == 2
        assert "in use by another difftest run" in capsys.readouterr().err
        assert main(["diff", str(judged), str(judged), "-o", str(busy)]) == 2
        assert "in use by another difftest run" in capsys.readouterr().err
        assert main(["report", str(busy.parent / "elsewhere")]) == 2  # (unrelated: no report there)
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]
    assert main(["report", str(judged), "-o", str(busy)]) == 0  # the lock gone, it writes
    assert (busy / "report.json").exists()


def _top1_check(folder: Path, target: int) -> dict:
    part = next(p for p in _verdicts(folder)[target]["parts"] if p["part"] == "accuracy")
    return next(c for c in part["checks"] if c["name"] == "top1_agreement")


def test_a_thresholds_files_general_key_beats_the_runs_scheme_table(
    tmp_path: Path, judged: Path, capsys
) -> None:
    """The bug (t22 #2): the run stored `[thresholds.none] top1_min`; `--thresholds F` with
    `[thresholds] top1_min = 0.9` changed no verdict (config.thresholds_for ranks the stored scheme
    table above F's default one) yet was recorded in signature.thresholds as if it had judged. F's
    key wins now, its table named as the limit's source; F's own scheme table beats it still."""
    stored = {"none": {"top1_min": 0.1, "margin": 4.0}}
    run_dir = _stored(tmp_path / "run", judged, lambda d: d["signature"].update(thresholds=stored))
    general, both = tmp_path / "general.toml", tmp_path / "both.toml"
    general.write_text("[thresholds]\ntop1_min = 0.9\n")
    both.write_text("[thresholds]\ntop1_min = 0.9\n[thresholds.none]\ntop1_min = 0.2\n")
    capsys.readouterr()
    assert main(["report", str(run_dir), "--thresholds", str(general), "-o", str(tmp_path / "g")]) == 0
    check = _top1_check(tmp_path / "g", 1)  # the negative control: top-1 ~50%, failing harder
    assert (check["limit"], check["passed"]) == (0.9, False)
    assert "override [thresholds] top1_min" in check["note"]
    recorded = json.loads((tmp_path / "g" / "report.json").read_text())["signature"]["thresholds"]
    assert recorded == {"none": {"margin": 4.0}, "default": {"top1_min": 0.9}}  # what judged, no more
    assert main(["report", str(run_dir), "--thresholds", str(both), "-o", str(tmp_path / "b")]) == 0
    check = _top1_check(tmp_path / "b", 1)
    assert check["limit"] == 0.2 and "override [thresholds.none] top1_min" in check["note"]
