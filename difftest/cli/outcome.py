"""What `run`, `compare` and `report` end with: the report folder, the summary, the exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftest.cli.options import console, emit_json
from difftest.results import RunResult

if TYPE_CHECKING:
    from difftest.config import RunConfig
    from difftest.runner import RunOptions
from difftest.textsafe import safe


def run_summary(run: RunResult, out: Path, problems: list[str], code: int) -> dict[str, Any]:
    """The --json result of a run: per target its verdict, the failing checks (`reasons`) and, for an
    INCONCLUSIVE one, the checks this sample could not decide (`open_questions`), in the report's
    words ("exactness: mean KL 0.1994 > limit 0.005 (limit: ...)"); report.json has the rest."""
    from difftest.report.words import failing_checks, open_checks

    targets = []
    for t in run.targets:
        v = t.verdict
        targets.append(
            {
                "name": t.name,
                "scheme": t.scheme,
                "expect": t.expect,
                "verdict": v.label if v is not None else None,
                "passed": v.passed if v is not None else None,
                "meets_expectation": v.meets_expectation if v is not None else None,
                "reasons": [w.sentence() for w in failing_checks(t)],
                "open_questions": [w.sentence() for w in open_checks(t)],
                "localisation": v.localisation if v is not None else None,
                "warnings": list(t.conformance.get("warnings", [])),
            }
        )
    return {
        "exit_code": code,
        "gate": run.gate,
        "gate_passed": run.gate_passed,
        "report_dir": str(out),
        "report_json": str(Path(out) / "report.json"),
        "targets": targets,
        "infrastructure_problems": problems,
        "warnings": list(run.warnings),
    }


def execute_and_finish(cfg: RunConfig, opts: RunOptions, *, as_json: bool = False) -> int:
    """`run` and `compare`'s end: execute, write the report folder (`finish`), and only then drop
    the previous report that `execute` set aside."""
    from difftest.runner import drop_previous, executed

    with executed(cfg, opts) as (result, problems):  # the folder's lock held until both are done
        code = finish(result, opts.out_dir, problems, as_json=as_json)
        drop_previous(opts.out_dir)
    return code


def finish(run: RunResult, out: Path, problems: list[str], *, as_json: bool = False) -> int:
    """Write the report folder, show the verdicts; exit 3 (infrastructure) beats 1 / 4 (verdict).
    `problems` join those the run already stored (a re-rendered exit-3 run stays exit 3)."""
    from difftest.report import write_report
    from difftest.report.terminal import render_summary

    run.infrastructure = list(dict.fromkeys([*run.infrastructure, *problems]))
    write_report(run, out)
    code = run.exit_code
    if as_json:
        emit_json(run_summary(run, out, run.infrastructure, code))
    else:
        render_summary(run, console(), report_dir=out)
    say_infrastructure(run.infrastructure)
    return code


def say_infrastructure(problems: list[str]) -> None:
    """Each reason for exit 3 on stderr, one line each (a run's, the quick look's)."""
    for p in problems:
        print(f"difftest: infrastructure: {safe(p)}", file=sys.stderr)
