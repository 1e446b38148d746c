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
from difftest.rundiff import checks_changed, diff_runs, floor_spread, metric_move
from difftest.verdict import PartVerdict

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
    assert moves["kl_mean"].direction == "better"  # the flipping fake's swapped top two cost KL


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
    assert metric_move("kl_mean", one(0.020), one(0.030), 0.0005).beyond_noise  # the floor still can
    assert metric_move("kl_mean", one(0.020), one(0.021), 0.0005).noise == "floor-small"  # < KL 0.005
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
    assert TargetDiff("t", "PASS", None, note="only in A").regressed  # README: B lost a verdict A had
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


def test_checks_are_paired_by_part_whatever_the_reference_is_called() -> None:
    """The bug (t22 #3): a live reference `ref` in A and a baseline's replay `reference` in B (the
    same numbers) listed every accuracy check as "only in A" and again "only in B", so an outcome
    that changed never read `pass -> FAIL`; so did the invariance part against a golden in A and
    against the reference in B. Worked by hand on the passing sample target: accuracy mean KL
    5.500e-04 under its limit 0.05 in A; in B the limit is 1e-4, a FAIL."""
    from dataclasses import replace

    from sample_results import sample_run

    run_a, run_b = sample_run(), sample_run()
    a, b = run_a.targets[0], run_b.targets[0]
    assert a.verdict is not None and b.verdict is not None
    a.comparisons[1].baseline = "ref"  # A: the live reference; B: replayed, called `reference`

    def moved(p: PartVerdict) -> PartVerdict:
        if p.part == "accuracy":
            return replace(p, against="ref")
        return replace(p, against=a.golden or "") if p.part == "invariance" else p

    a.verdict = replace(a.verdict, parts=tuple(moved(p) for p in a.verdict.parts))
    acc = next(p for p in b.verdict.parts if p.part == "accuracy")
    failing = replace(acc, checks=(replace(acc.checks[0], limit=1e-4, passed=False), *acc.checks[1:]))
    b.verdict = replace(b.verdict, parts=tuple(failing if p is acc else p for p in b.verdict.parts))
    assert checks_changed(a, b) == [
        "accuracy: mean KL pass -> FAIL (value 5.500e-04, limit 0.05 -> 1.000e-04)"
    ]
    warnings = diff_runs(run_a, run_b).warnings
    assert f"{a.name}: accuracy is against ref in A, reference in B" in warnings  # the renaming still said


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


def test_intervals_over_too_few_prompts_are_named_as_the_reason() -> None:
    """The bug (t22 #4): two 3-prompt intervals printed beside "? (no CI or floor)". Worked by hand
    on the report's numbers: top-1 0.6667 [0.625, 0.75] -> 0.5 [0.375, 0.625], 3 prompts each (under
    MIN_PROMPTS_FOR_CI = 5): undecided, and said so; a noise floor still decides."""
    from difftest.cli.diff import _beyond

    def three(v: float, ci: list[float]) -> Comparison:
        return Comparison("accuracy", "reference", "t", aggregate={"top1_agreement": v, "n_prompts": 3.0},
                          ci={"top1_agreement": ci})  # fmt: skip

    a, b = three(0.6667, [0.625, 0.75]), three(0.5, [0.375, 0.625])
    move = metric_move("top1_agreement", a, b, None)
    assert (move.noise, move.beyond_noise, move.ci_a, move.ci_b) == (
        "few",
        None,
        (0.625, 0.75),
        (0.375, 0.625),
    )
    assert _beyond(move) == "? (CIs over fewer than 5 prompts)"
    assert _beyond(metric_move("top1_agreement", a, b, 0.01)) == "YES (over noise floor)"


def test_a_zero_noise_floor_still_needs_the_smallest_move() -> None:
    """The bug (/tmp/t1/d1.py): an in-run A/A floor of 0 (`null = "aa"` on a CPU) made KL
    0.0010 -> 0.0010001 (a move of 1e-7) and top-1 100% -> 99.9% regressions beyond noise, 3 prompts
    or 10 with both intervals a single value alike. Worked by hand: KL moves of 1e-7 and 0.01 against
    the minimum 0.005, top-1 moves of 0.1 and 4 points against its minimum 3 points."""
    floor = floor_spread({"in_run": {"g": {"kl_mean": 0.0, "top1_disagreement": 0.0}}}, "kl_mean")
    assert floor == 0.0

    def comp(n: int, kl: float, top1: float, kl_ci: list[float] | None = None) -> Comparison:
        agg = {"n_prompts": float(n), "kl_mean": kl, "top1_agreement": top1}
        return Comparison("exactness", "g", "t", aggregate=agg, ci={"kl_mean": kl_ci} if kl_ci else {})

    a, b = comp(3, 0.0010, 1.0), comp(3, 0.0010001, 0.999)
    for metric in ("kl_mean", "top1_agreement"):
        move = metric_move(metric, a, b, 0.0)
        assert (move.noise, move.beyond_noise, move.regressed) == ("floor-small", False, False)
    points_a, points_b = (
        comp(10, 0.001, 1.0, [0.001, 0.001]),
        comp(10, 0.0010001, 1.0, [0.0010001, 0.0010001]),
    )
    assert metric_move("kl_mean", points_a, points_b, 0.0).beyond_noise is False
    assert metric_move("kl_mean", a, comp(3, 0.011, 0.96), 0.0).regressed  # 0.01 > 0.005
    assert metric_move("top1_agreement", a, comp(3, 0.011, 0.96), 0.0).regressed  # 4 points > 3
    from difftest.cli.diff import _beyond

    assert _beyond(metric_move("kl_mean", a, b, 0.0)) == "no (over noise floor, move < 0.005)"


def _ten(metric: str, value: float, ci: list[float]) -> Comparison:
    return Comparison("exactness", "g", "t", aggregate={metric: value, "n_prompts": 10.0}, ci={metric: ci})


def test_a_negative_controls_move_toward_its_limit_is_the_regression() -> None:
    """The bug: a control (expect = "fail") whose KL rose 0.075 -> 0.116 (failing harder) was
    REGRESSED, exit 1, and one whose KL fell back toward the limit was not. Lost requests stay
    worse for a control too: they leave its verdict open."""
    low, high = _ten("kl_mean", 0.075, [0.067, 0.083]), _ten("kl_mean", 0.116, [0.106, 0.126])
    harder = metric_move("kl_mean", low, high, None, expect="fail")
    assert harder.beyond_noise and harder.direction == "better" and not harder.regressed
    escaping = metric_move("kl_mean", high, low, None, expect="fail")
    assert escaping.direction == "worse" and escaping.regressed
    assert metric_move("kl_mean", low, high, None).regressed  # the same move for a target meant to pass
    top1 = metric_move("top1_agreement", _ten("top1_agreement", 0.2, [0.1, 0.3]),
                       _ten("top1_agreement", 0.8, [0.7, 0.9]), None, expect="fail")  # fmt: skip
    assert top1.regressed  # agreement back up: the control nearly passes
    lost = metric_move("failed_rate", _ten("failed_rate", 0.0, [0.0, 0.0]), _ten("failed_rate", 0.5, [0.4, 0.6]),
                       None, expect="fail")  # fmt: skip
    assert lost.direction == "worse" and lost.regressed


def test_diff_judges_a_control_by_its_expect(tmp_path: Path, capsys) -> None:
    """End to end on the sample run: its negative control's exactness KL falls 0.1994 -> 0.02 (toward
    the limit, disjoint intervals) in B: REGRESSED; the reverse (failing harder) is not."""
    from sample_results import sample_run

    from difftest.report import write_report

    a, b = sample_run(), sample_run()
    for run, kl, ci in ((a, 0.1994, [0.15, 0.25]), (b, 0.02, [0.01, 0.03])):
        exact = run.targets[1].comparison("exactness")
        assert exact is not None
        exact.aggregate.update(kl_mean=kl, n_prompts=10.0)
        exact.ci["kl_mean"] = ci
    assert diff_runs(a, b).targets[1].regressed and not diff_runs(b, a).targets[1].regressed
    write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    assert main(["diff", str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_each_run_is_judged_against_its_own_expect(tmp_path: Path, capsys) -> None:
    """The bug (/tmp/t3/dmg/h): B's control edited to expect = "pass", FAIL in both runs: `report`
    gated FAIL but `diff` said "FAIL -> FAIL ... no regression", exit 0, judging A by B's expect."""
    from sample_results import sample_run

    from difftest.report import write_report
    from difftest.rundiff import TargetDiff

    assert TargetDiff("ctl", "FAIL", "FAIL", expect="pass", expect_a="fail").regressed
    assert not TargetDiff("ctl", "FAIL", "FAIL", expect="fail", expect_a="pass").regressed  # fixed
    assert not TargetDiff("ctl", "PASS", "FAIL", expect="fail", expect_a="pass").regressed
    a, b = sample_run(), sample_run()
    b.targets[1].expect = "pass"
    write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "fp8-block-faulty: FAIL -> FAIL (expect fail -> pass) REGRESSED" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "b"), str(tmp_path / "a")]) == 0


def test_a_target_only_in_a_is_a_lost_verdict(tmp_path: Path, capsys) -> None:
    """The bug (/tmp/t3/run1 vs /tmp/t3/runbl): "fp8-block: PASS -> - (only in A)", exit 0, where
    README says exit 1 when B lost a verdict A had."""
    from sample_results import sample_run

    from difftest.report import write_report

    a, b = sample_run(), sample_run()
    b.targets = b.targets[1:]
    assert diff_runs(a, b).regressed
    write_report(a, tmp_path / "a")
    write_report(b, tmp_path / "b")
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "fp8-block: PASS -> - (only in A: B has no verdict for it) REGRESSED" in lines
    assert main(["diff", str(tmp_path / "b"), str(tmp_path / "a")]) == 0  # a new target that PASSes


def test_every_metric_a_run_reports_has_a_direction(runs: dict[str, Path]) -> None:
    """The bug: broken_rate and broken_answers had none, so a rise in impossible answers was never
    flagged. Every key of a real comparison's aggregate is in exactly one of the four sets."""
    from difftest import rundiff as rd

    sets = (rd.HIGHER_IS_BETTER, rd.LOWER_IS_BETTER, rd.CLOSER_TO_ZERO_IS_BETTER, rd.NO_DIRECTION)
    keys = {k for t in load_run(runs["bad"]).targets for c in t.comparisons for k in c.aggregate}
    assert keys >= {"broken_rate", "broken_answers", "kl_mean", "n_prompts"}
    assert {k: sum(k in s for s in sets) for k in keys} == dict.fromkeys(keys, 1)
    assert rd.direction("broken_rate", 0.0, 0.25) == rd.direction("broken_answers", 0.0, 2.0) == "worse"
    rise = metric_move(
        "broken_rate", _ten("broken_rate", 0.0, [0.0, 0.0]), _ten("broken_rate", 0.3, [0.2, 0.4]), None
    )
    assert rise.regressed
