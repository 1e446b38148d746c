"""`difftest diff RUN_A RUN_B` (what moved, beyond noise or not) and `report DIR -o NEWDIR`
(re-judged into a new folder, the original untouched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from live_fakes import live_fake

from difftest.cli import main
from difftest.report import load_run
from difftest.results import Comparison
from difftest.rundiff import diff_runs, floor_spread, metric_move

PROMPTS = ["1+2+3=", "the quick brown fox", "def add(a, b):", "the lazy dog is", "a fox jumps over", "2+2="]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three report folders: a good target twice (same server, two runs) and a faulty one."""
    tmp = tmp_path_factory.mktemp("runs")
    prompts = tmp / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS))
    )
    out = {name: tmp / name for name in ("good1", "good2", "bad")}
    with (
        live_fake() as ref,
        live_fake() as good,
        live_fake(FakeBehaviour(flip_every=2)) as bad,
    ):
        for name, tgt in (("good1", good), ("good2", good), ("bad", bad)):
            argv = [
                "compare",
                "--ref",
                ref,
                "--target",
                tgt,
                "--prompts",
                str(prompts),
                "--scheme",
                "none",
            ]
            main([*argv, "--max-tokens", "12", "-o", str(out[name])])
    return out


def test_same_server_twice_moves_nothing(runs: dict[str, Path], capsys) -> None:
    assert main(["diff", str(runs["good1"]), str(runs["good2"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 0 and not data["regressed"] and data["warnings"] == []
    (t,) = data["targets"]
    assert t["verdict_a"] == t["verdict_b"] == "PASS" and not t["verdict_changed"]
    acc = next(c for c in t["comparisons"] if c["kind"] == "accuracy")
    assert acc["prompts_compared"] == len(PROMPTS) and acc["continuations_changed"] == []
    assert all(not m["beyond_noise"] for m in acc["metrics"])


def test_faulty_build_is_a_regression_beyond_noise(runs: dict[str, Path], capsys) -> None:
    assert main(["diff", str(runs["good1"]), str(runs["bad"]), "-o", str(runs["bad"] / "d")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "PASS -> FAIL REGRESSED" in out and "token match" in out and "YES (CIs disjoint)" in out
    data = json.loads((runs["bad"] / "d" / "diff.json").read_text())
    moves = {m["metric"]: m for m in data["targets"][0]["comparisons"][0]["metrics"]}
    tm = moves["token_match"]
    assert tm["delta"] < 0 and tm["beyond_noise"] and tm["noise"] == "ci" and tm["regressed"]
    assert tm["ci_a"][0] > tm["ci_b"][1]  # disjoint intervals: that is what "beyond noise" means here
    assert len(data["targets"][0]["comparisons"][0]["continuations_changed"]) > 0


def test_reverse_direction_is_an_improvement(runs: dict[str, Path]) -> None:
    d = diff_runs(load_run(runs["bad"]), load_run(runs["good1"]))
    t = d.targets[0]
    assert (t.verdict_a, t.verdict_b) == ("FAIL", "PASS") and not d.regressed
    moves = {m.metric: m for m in t.comparisons[0].metrics}
    assert moves["token_match"].beyond_noise and moves["token_match"].direction == "better"
    assert moves["kl_mean"].noise == "unchanged"  # both fakes keep the reference's logprobs


def _comp(value: float, ci: list[float] | None = None) -> Comparison:
    return Comparison(
        "exactness", "golden", "t", aggregate={"kl_mean": value}, ci={"kl_mean": ci} if ci else {}
    )


def test_metric_move_rules() -> None:
    assert (
        metric_move("kl_mean", _comp(0.1, [0.05, 0.15]), _comp(0.12, [0.08, 0.2]), None).beyond_noise is False
    )
    assert metric_move("kl_mean", _comp(0.1, [0.05, 0.15]), _comp(0.3, [0.2, 0.4]), None).regressed
    assert metric_move("kl_mean", _comp(0.1), _comp(0.3), None).beyond_noise is None  # nothing to judge by
    assert metric_move("kl_mean", _comp(0.1), _comp(0.3), 0.05).noise == "floor"
    assert not metric_move("kl_mean", _comp(0.1), _comp(0.12), 0.05).beyond_noise
    floor = {"in_run": {"g1": {"kl_mean": 0.01}, "g2": {"kl_mean": 0.03}}}
    assert floor_spread(floor, "kl_mean") == 0.03 and floor_spread(floor, "bleu") is None


def test_degenerate_intervals_do_not_call_noise() -> None:
    """The bugs: two one-prompt runs (point intervals) made KL 0.020 -> 0.021 a regression beyond
    noise, and KL 0 on every prompt of A made B's 1.4e-9 one too."""
    one = lambda v: Comparison("exactness", "golden", "t", aggregate={"kl_mean": v, "n_prompts": 1},  # noqa: E731
                               ci={"kl_mean": [v, v]})  # fmt: skip
    assert metric_move("kl_mean", one(0.020), one(0.021), None).beyond_noise is None
    assert metric_move("kl_mean", one(0.020), one(0.021), 0.0005).noise == "floor"  # the floor still can
    ten = lambda v, ci: Comparison("exactness", "golden", "t", aggregate={"kl_mean": v, "n_prompts": 10},  # noqa: E731
                                   ci={"kl_mean": ci})  # fmt: skip
    tiny = metric_move("kl_mean", ten(0.0, [0.0, 0.0]), ten(1.4e-9, [1e-9, 2e-9]), None)
    assert tiny.noise == "small" and tiny.beyond_noise is False  # under the verdict's KL minimum 0.005
    real = metric_move("kl_mean", ten(0.0, [0.0, 0.0]), ten(0.05, [0.03, 0.07]), None)
    assert real.beyond_noise and real.regressed


def test_a_negative_control_that_stops_failing_is_a_regression() -> None:
    from difftest.rundiff import TargetDiff

    assert TargetDiff("ctl", "FAIL", "PASS", expect="fail").regressed
    assert not TargetDiff("ctl", "PASS", "FAIL", expect="fail").regressed
    assert TargetDiff("t", "PASS", "FAIL").regressed and not TargetDiff("t", "FAIL", "PASS").regressed


def test_diff_of_different_prompt_sets_warns(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["good1"]), load_run(runs["good2"])
    b.signature["prompts"] = {"count": 2, "ids": ["p0", "p1"]}
    assert any("different prompts" in w for w in diff_runs(a, b).warnings)


def test_report_to_a_new_folder_leaves_the_original(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    original = (runs["good1"] / "report.json").read_text()
    strict = tmp_path / "strict.toml"
    strict.write_text("[thresholds.none]\nbleu_min = 100.5\n")  # over identical texts' 100: FAIL
    new = tmp_path / "rejudged"
    assert main(["report", str(runs["good1"]), "--thresholds", str(strict), "-o", str(new), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["report_dir"] == str(new) and summary["targets"][0]["verdict"] == "FAIL"
    assert (runs["good1"] / "report.json").read_text() == original
    assert {p.name for p in new.iterdir()} >= {"report.json", "report.md", "report.html", "junit.xml"}
    assert load_run(new).signature["rejudged_from"] == str(runs["good1"])
    # and diff says what the re-judgement changed
    assert main(["diff", str(runs["good1"]), str(new), "--json"]) == 1
    (t,) = json.loads(capsys.readouterr().out)["targets"]
    assert t["verdict_changed"]
    # ... and which check turned it: no metric moved, only the limit did
    assert t["checks_changed"] == ["accuracy: BLEU only in B: FAIL (value 100, limit 100.5)"]  # none before
    assert main(["diff", str(runs["good1"]), str(new)]) == 1
    out = capsys.readouterr().out
    assert "  check accuracy: BLEU only in B: FAIL" in out
    assert "  accuracy vs reference: 0 of 6 prompts' continuations changed" in out
    # a folder that already holds a report is not overwritten
    assert main(["report", str(runs["good1"]), "-o", str(new)]) == 2


def test_report_thresholds_go_on_top_of_the_runs_own(runs: dict[str, Path], tmp_path: Path) -> None:
    """The bug: `report --thresholds T` replaced the run's [thresholds], so a key T did not repeat
    fell back to its default without a word."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["good1"], run)
    data = json.loads((run / "report.json").read_text())
    data["signature"]["thresholds"] = {"default": {"kl_mean_max": 0.5}}
    (run / "report.json").write_text(json.dumps(data))
    extra = tmp_path / "t.toml"
    extra.write_text("[thresholds.none]\ntop1_min = 0.5\n")
    assert main(["report", str(run), "--thresholds", str(extra), "-o", str(tmp_path / "new")]) in (0, 1, 4)
    new = load_run(tmp_path / "new")
    assert new.signature["thresholds"] == {"default": {"kl_mean_max": 0.5}, "none": {"top1_min": 0.5}}
    checks = {c.name: c for p in new.targets[0].verdict.parts if p.part == "accuracy" for c in p.checks}
    assert checks["kl_mean"].limit == 0.5 and checks["top1_agreement"].limit == 0.5


def test_every_metric_has_a_smallest_move() -> None:
    """The bug: dp_mean 0 -> 1e-9 (intervals [0, 0] and [1e-10, 2e-9], 10 prompts) was a regression
    beyond noise, exit 1: only the metrics with a verdict minimum had one."""
    ten = lambda v, ci: Comparison("exactness", "golden", "t", aggregate={"dp_mean": v, "n_prompts": 10},  # noqa: E731
                                   ci={"dp_mean": ci})  # fmt: skip
    assert not metric_move("dp_mean", ten(0.0, [0.0, 0.0]), ten(1e-9, [1e-10, 2e-9]), None).beyond_noise
    assert metric_move("dp_mean", ten(0.0, [0.0, 0.0]), ten(0.02, [0.01, 0.03]), None).regressed


def test_report_takes_the_report_json_itself(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`report DIR/report.json` (load_run reads either) re-rendered into DIR; it crashed writing to
    the file's own path as if a folder."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["good1"], run)
    (run / "report.md").unlink()
    assert main(["report", str(run / "report.json")]) == 0
    assert (run / "report.md").exists() and "Traceback" not in capsys.readouterr().err


def test_a_verdict_that_turns_against_its_expectation_from_anywhere_is_a_regression() -> None:
    """The misses: INCONCLUSIVE -> FAIL, PASS -> no verdict, and a new target that FAILs exited 0."""
    from difftest.rundiff import TargetDiff

    assert TargetDiff("t", "INCONCLUSIVE", "FAIL").regressed
    assert TargetDiff("t", "PASS", None).regressed
    assert TargetDiff("t", None, "FAIL", note="only in B").regressed
    assert not TargetDiff("t", "FAIL", "FAIL").regressed  # failing before and after: no news
    assert not TargetDiff("t", "PASS", None, note="only in A").regressed  # removed from the run
    assert TargetDiff("ctl", "INCONCLUSIVE", "PASS", expect="fail").regressed
    assert not TargetDiff("ctl", "PASS", "FAIL", expect="fail").regressed


def test_diff_warns_of_what_it_cannot_pair_and_of_exit_3_runs(runs: dict[str, Path]) -> None:
    a, b = load_run(runs["good1"]), load_run(runs["good2"])
    b.infrastructure = ["server tgt exited with code -9 during the run"]
    lost = a.targets[0].comparisons[0]
    b.targets[0].comparisons = [c for c in b.targets[0].comparisons if c.kind != lost.kind]
    warnings = diff_runs(a, b).warnings
    assert any("B ended in exit 3 (infrastructure: server tgt exited" in w for w in warnings)
    assert any(f"{lost.kind} vs {lost.baseline} is in A only" in w for w in warnings)


def test_checks_changed_pairs_checks_and_says_both_sides() -> None:
    """Worked by hand on the faulty sample target (tests/sample_results.py): exactness mean KL
    0.1994 against 0.005 fails; in B its limit is 0.5 (pass), and top-1 agreement 0.857 against
    0.95 (a failure in A) is made not informative."""
    from dataclasses import replace

    from sample_results import sample_run

    from difftest.rundiff import checks_changed

    a = sample_run().targets[1]
    b = sample_run().targets[1]
    assert b.verdict is not None
    exact = b.verdict.parts[0]
    moved = {
        "kl_mean": lambda c: replace(c, limit=0.5, passed=True),
        "top1_agreement": lambda c: replace(c, informative=False),
    }
    checks = tuple(moved.get(c.name, lambda c: c)(c) for c in exact.checks)
    b.verdict = replace(b.verdict, parts=(replace(exact, checks=checks), *b.verdict.parts[1:]))
    assert checks_changed(a, b) == [
        "exactness: mean KL FAIL -> pass (value 0.1994, limit 0.005 -> 0.5)",
        "exactness: top-1 agreement FAIL -> not informative (value 85.7%, limit 95.0%)",
    ]
    assert checks_changed(a, a) == []
    b.verdict = None  # a lost verdict is the regression itself, not a list of every check
    assert checks_changed(a, b) == []


def test_the_beyond_noise_cell_says_what_decided_it() -> None:
    """Disjoint intervals printed "no (ci)" when the move was under the verdict's minimum: the
    reader saw two disjoint intervals called noise, with no reason given."""
    from difftest.cli.diff import _beyond

    ten = lambda v, ci: Comparison("accuracy", "reference", "t", aggregate={"kl_mean": v, "n_prompts": 10},  # noqa: E731
                                   ci={"kl_mean": ci})  # fmt: skip
    small = metric_move("kl_mean", ten(0.0005, [0.0004, 0.0006]), ten(0.0035, [0.0033, 0.0037]), None)
    assert _beyond(small) == "no (CIs disjoint, move < 0.005)" and not small.regressed
    big = metric_move("kl_mean", ten(0.0005, [0.0004, 0.0006]), ten(0.05, [0.04, 0.06]), None)
    assert _beyond(big) == "YES (CIs disjoint)" and big.regressed
    overlap = metric_move("kl_mean", ten(0.03, [0.01, 0.05]), ten(0.04, [0.02, 0.06]), None)
    assert _beyond(overlap) == "no (CIs overlap)"
    assert _beyond(metric_move("kl_mean", _comp(0.1), _comp(0.3), None)) == "? (no CI or floor)"
    assert _beyond(metric_move("kl_mean", _comp(0.1), _comp(0.3), 0.05)) == "YES (over noise floor)"
