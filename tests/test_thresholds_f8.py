"""[thresholds] precedence (t14 findings 1 and 7): a scheme's table beats the general one check by
check, whichever spelling (budget field or `<part>.<check>`) each uses, and the check's note names
the table its limit came from; two different limits for one check in one scheme's tables (a budget
field and its dotted twin, or one key in [thresholds] and [thresholds.default]) are refused, exit 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from test_config import MINIMAL
from test_config import write as write_config
from test_secondary_fixes import _prompt

from difftest.cli import main
from difftest.config import load_config, load_thresholds, thresholds_for
from difftest.errors import ConfigError, exit_code_for
from difftest.metrics.aggregate import aggregate_prompts
from difftest.results import Comparison, PromptDiff
from difftest.verdict import budget_for, judge_target, threshold_checks


def _ok(i: int, top1: float = 0.85, kl: float = 0.001) -> PromptDiff:
    """test_secondary_fixes' identical-text prompt, with its top-1 agreement at `top1`."""
    p = _prompt(i, kl)
    p.top1_agreement = top1
    return p


def _comp(kind: str, n: int = 10) -> Comparison:
    """n prompts, each with top-1 0.85: the mean and every bootstrap draw are 0.85, so a limit of
    0.99 fails decided and a limit of 0.5 passes decided."""
    prompts = [_ok(i) for i in range(n)]
    agg, ci = aggregate_prompts(prompts)
    return Comparison(kind=kind, baseline="b", target="t", prompts=prompts, aggregate=agg, ci=ci)


def _judge(thresholds: dict, scheme: str = "fp8-block", exactness: bool = False):
    ov = thresholds_for(thresholds, scheme)
    exact = _comp("exactness") if exactness else None
    return judge_target("t", "pass", exact, _comp("accuracy"), budget_for(scheme, ov), None, overrides=ov)


def _check(verdict, part: str, name: str):
    return next(c for p in verdict.parts if p.part == part for c in p.checks if c.name == name)


# --------------------------------------------------------------- 1. the scheme's table wins


def test_a_scheme_budget_field_beats_a_general_dotted_key() -> None:
    """t14 #1: `[thresholds] accuracy.top1_agreement = 0.5` beat `[thresholds.fp8-block] top1_min =
    0.99`, and top-1 0.85 passed; the scheme's 0.99 is the limit now, and 0.85 < 0.99 fails."""
    v = _judge({"default": {"accuracy.top1_agreement": 0.5}, "fp8-block": {"top1_min": 0.99}})
    top1 = _check(v, "accuracy", "top1_agreement")
    assert top1.value == pytest.approx(0.85)
    assert top1.limit == 0.99 and top1.fails and top1.decided
    assert top1.note.startswith("override [thresholds.fp8-block] top1_min")
    assert v.label == "FAIL"


def test_a_scheme_dotted_key_beats_a_general_budget_field() -> None:
    v = _judge({"default": {"top1_min": 0.99}, "fp8-block": {"accuracy.top1_agreement": 0.5}})
    top1 = _check(v, "accuracy", "top1_agreement")
    assert top1.limit == 0.5 and top1.passed
    assert top1.note.startswith("override [thresholds.fp8-block] accuracy.top1_agreement")


def test_the_general_table_still_judges_other_schemes() -> None:
    thresholds = {"default": {"accuracy.top1_agreement": 0.5}, "fp8-block": {"top1_min": 0.99}}
    top1 = _check(_judge(thresholds, scheme="int8"), "accuracy", "top1_agreement")
    assert top1.limit == 0.5
    assert top1.note.startswith("override [thresholds] accuracy.top1_agreement")


def test_request_rates_the_scheme_gives_win_in_each_part_the_general_table_keeps_the_rest() -> None:
    """failed_rate_max sets both parts' failed_rate (judge_target); a scheme's exactness.failed_rate
    displaces it in exactness only, and a scheme's failed_rate_max displaces a general
    exactness.failed_rate entirely."""
    v = _judge(
        {"default": {"failed_rate_max": 0.2}, "fp8-block": {"exactness.failed_rate": 0.1}}, exactness=True
    )
    exact, acc = _check(v, "exactness", "failed_rate"), _check(v, "accuracy", "failed_rate")
    assert (exact.limit, acc.limit) == (0.1, 0.2)
    assert exact.note.startswith("override [thresholds.fp8-block] exactness.failed_rate")
    assert acc.note.startswith("override [thresholds] failed_rate_max")

    v = _judge(
        {"default": {"exactness.failed_rate": 0.3}, "fp8-block": {"failed_rate_max": 0.1}}, exactness=True
    )
    exact = _check(v, "exactness", "failed_rate")
    assert exact.limit == 0.1
    assert exact.note.startswith("override [thresholds.fp8-block] failed_rate_max")


def test_threshold_checks_pairs_budget_fields_with_their_dotted_twins() -> None:
    assert threshold_checks("top1_min") == {"accuracy.top1_agreement"}
    assert threshold_checks("failed_rate_max") == {"exactness.failed_rate", "accuracy.failed_rate"}
    assert threshold_checks("exactness.kl_mean") == {"exactness.kl_mean"}
    assert threshold_checks("margin") == {"margin"}


def write(tmp_path: Path, thresholds: str, name: str = "x.toml") -> Path:
    """test_config's minimal config (its target judged without a golden) with `thresholds` after."""
    return write_config(
        tmp_path, MINIMAL.replace('golden = "auto"', 'golden = "none"') + "\n" + thresholds, name
    )


def _table(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def test_a_config_gives_the_scheme_value_for_its_targets(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, _table("""
            [thresholds]
            accuracy.top1_agreement = 0.5
            margin = 4
            [thresholds.fp8-block]
            top1_min = 0.99
        """))
    )  # fmt: skip
    assert cfg.thresholds_for("fp8-block") == {"margin": 4.0, "top1_min": 0.99}
    assert cfg.thresholds_for("int8") == {"margin": 4.0, "accuracy.top1_agreement": 0.5}


# ------------------------------------------- two different limits for one check: refused


REFUSED = [
    # t14 #7: the later table won silently, in either order
    ("[thresholds]\ntop1_min = 0.99\n[thresholds.default]\ntop1_min = 0.5",
     "x.toml:4: [thresholds.default] top1_min = 0.5 disagrees with [thresholds] top1_min = 0.99 (line 2)"),
    ("[thresholds.default]\ntop1_min = 0.5\n[thresholds]\ntop1_min = 0.99",
     "x.toml:4: [thresholds] top1_min = 0.99 disagrees with [thresholds.default] top1_min = 0.5 (line 2)"),
    # both spellings of one check in one table
    ("[thresholds.fp8-block]\ntop1_min = 0.99\naccuracy.top1_agreement = 0.5",
     "x.toml:3: [thresholds.fp8-block] accuracy.top1_agreement = 0.5 disagrees with "
     "[thresholds.fp8-block] top1_min = 0.99 (line 2): both set the limit of accuracy.top1_agreement; keep one"),
    # across [thresholds] and [thresholds.default], twins too
    ("[thresholds]\naccuracy.top1_agreement = 0.5\n[thresholds.default]\ntop1_min = 0.9",
     "x.toml:4: [thresholds.default] top1_min = 0.9 disagrees with [thresholds] accuracy.top1_agreement = 0.5"),
]  # fmt: skip


@pytest.mark.parametrize(("thresholds", "message"), REFUSED)
def test_two_limits_for_one_check_in_one_schemes_tables_are_refused(
    tmp_path: Path, thresholds: str, message: str
) -> None:
    """Read as a `report --thresholds` file, which a run config's [thresholds] shares its parser with
    (test_run_refuses_the_config_in_one_line_exit_2): its lines are the ones written here."""
    path = tmp_path / "x.toml"
    path.write_text(thresholds + "\n")
    with pytest.raises(ConfigError) as err:
        load_thresholds(path)
    assert str(err.value).startswith(f"{tmp_path / message}")
    assert "\n" not in str(err.value) and exit_code_for(err.value) == 2


def test_equal_values_for_one_check_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, _table("""
            [thresholds]
            top1_min = 0.9
            accuracy.top1_agreement = 0.9
            [thresholds.default]
            top1_min = 0.9
            [thresholds.fp8-block]
            failed_rate_max = 0.1
            exactness.failed_rate = 0.1
        """))
    )  # fmt: skip
    assert cfg.thresholds["default"] == {"top1_min": 0.9, "accuracy.top1_agreement": 0.9}


def test_a_thresholds_file_refuses_them_too(tmp_path: Path) -> None:
    """`report --thresholds FILE` reads a bare table body: `[default]` there is [thresholds.default]."""
    path = tmp_path / "t.toml"
    path.write_text("top1_min = 0.99\n[default]\ntop1_min = 0.5\n")
    with pytest.raises(
        ConfigError, match=r"t\.toml:3: \[default\] top1_min = 0\.5 disagrees with the top level"
    ):
        load_thresholds(path)


def test_run_refuses_the_config_in_one_line_exit_2(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, _table("[thresholds]\ntop1_min = 0.99\n[thresholds.default]\ntop1_min = 0.5"))
    assert main(["run", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disagrees with [thresholds] top1_min = 0.99" in err
    assert not (tmp_path / "out").exists()


def test_a_thresholds_file_overrides_a_stored_limit_given_in_another_spelling() -> None:
    """`report DIR --thresholds F`: the run stored `accuracy.top1_agreement`, the file gives
    `top1_min` for the same check in the same table; the stored spelling used to survive the merge
    and decide the check, the file's limit silently ignored."""
    from difftest.cli.report import merged_thresholds

    stored = {"fp8-block": {"accuracy.top1_agreement": 0.5, "margin": 5.0}, "default": {"top1_min": 0.7}}
    given = {"fp8-block": {"top1_min": 0.99}}
    merged = merged_thresholds(stored, given)
    assert merged["fp8-block"] == {"top1_min": 0.99, "margin": 5.0}  # margin kept: the file is silent on it
    assert merged["default"] == {"top1_min": 0.7}
    assert thresholds_for(merged, "fp8-block")["top1_min"] == 0.99


def test_a_thresholds_files_general_key_beats_a_stored_scheme_key_part_by_part() -> None:
    """(t22 #2) The file's `[thresholds]` beats the run's `[thresholds.<scheme>]` for the checks it
    sets: the stored `failed_rate_max` (both parts) still sets accuracy, narrowed to its dotted key,
    while the file's `exactness.failed_rate` decides exactness; a field the file sets for both parts
    drops the stored dotted key; the file's own scheme value beats its general one."""
    from difftest.cli.report import merged_thresholds

    stored = {"fp8-block": {"failed_rate_max": 0.1, "top1_min": 0.6, "margin": 5.0}}
    merged = merged_thresholds(stored, {"default": {"exactness.failed_rate": 0.3, "top1_min": 0.9}})
    assert merged["fp8-block"] == {"accuracy.failed_rate": 0.1, "margin": 5.0}
    flat = thresholds_for(merged, "fp8-block")
    assert (flat["exactness.failed_rate"], flat["accuracy.failed_rate"], flat["top1_min"]) == (0.3, 0.1, 0.9)
    assert flat.tables["accuracy.failed_rate"] == "[thresholds.fp8-block]" and "top1_min" not in flat.tables
    stored = {"fp8-block": {"exactness.failed_rate": 0.1, "accuracy.top1_agreement": 0.6}}
    merged = merged_thresholds(stored, {"default": {"failed_rate_max": 0.3}, "fp8-block": {"top1_min": 0.7}})
    assert merged["fp8-block"] == {"top1_min": 0.7}
    assert thresholds_for(merged, "fp8-block") == {"failed_rate_max": 0.3, "top1_min": 0.7}


def test_a_dotted_key_narrowing_a_two_part_field_in_one_table_is_accepted(tmp_path: Path) -> None:
    """(t17) `failed_rate_max = 0.1` beside `exactness.failed_rate = 0.2` in one table was refused
    ("keep one"), though it says one thing: exactness 0.2, accuracy 0.1 (verdict._part reads the
    dotted key first), as the same pair split over two tables already meant. Two dotted keys that
    disagree are still refused, a field between them or not."""
    path = tmp_path / "t.toml"
    path.write_text("failed_rate_max = 0.1\nexactness.failed_rate = 0.2\n")
    flat = thresholds_for(load_thresholds(path), "fp8-block")
    assert flat["failed_rate_max"] == 0.1 and flat["exactness.failed_rate"] == 0.2
    path.write_text(
        "exactness.failed_rate = 0.2\nfailed_rate_max = 0.1\n[default]\nexactness.failed_rate = 0.3\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"exactness\.failed_rate = 0\.3 disagrees with the top level exactness\.failed_rate",
    ):
        load_thresholds(path)
    path.write_text("failed_rate_max = 0.1\n[default]\nfailed_rate_max = 0.2\nexactness.failed_rate = 0.3\n")
    with pytest.raises(ConfigError, match=r"failed_rate_max = 0\.2 disagrees"):
        load_thresholds(path)
