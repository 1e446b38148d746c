"""`difftest diff RUN_A RUN_B`: what moved between two report folders, and whether beyond noise.

Exit 1 when a target regressed (`TargetDiff.regressed`: a metric moved the wrong way beyond noise,
B's verdict contradicts its `expect` where A's did not, or B lost a verdict A had), else 0."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from difftest.cli import options as o
from difftest.report.words import metric_name
from difftest.rundiff import MIN_MOVE, MetricMove, TargetDiff
from difftest.verdict import MIN_PROMPTS_FOR_CI

HELP = "compare two report folders: per target and metric, what moved and whether beyond noise"
RESULT_FILE = "diff.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", type=Path, metavar="RUN_A", help="the earlier report folder (or its report.json)")
    p.add_argument("run_b", type=Path, metavar="RUN_B", help="the later report folder (or its report.json)")
    p.add_argument("--all", action="store_true", help="list unchanged metrics too")
    o.add_out(p, f"{RESULT_FILE} goes there (default: none written)")
    o.add_json(p)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def _beyond(m: MetricMove) -> str:
    """The "beyond noise" cell, with what decided it."""
    if m.noise == "unchanged":
        return "no (unchanged)"
    if m.noise == "missing":
        return "-"
    if m.noise == "small":
        return f"no (CIs disjoint, move < {MIN_MOVE[m.metric]:g})"
    if m.noise == "ci":
        return "YES (CIs disjoint)" if m.beyond_noise else "no (CIs overlap)"
    if m.noise == "floor":
        return "YES (over noise floor)" if m.beyond_noise else "no (within noise floor)"
    if m.noise == "floor-small":
        return f"no (over noise floor, move < {MIN_MOVE[m.metric]:g})"
    if m.noise == "few":
        return f"? (CIs over fewer than {MIN_PROMPTS_FOR_CI} prompts)"
    return "? (no CI or floor)"


def _head(t: TargetDiff) -> str:
    """'ctl: FAIL -> FAIL (expect fail -> pass) REGRESSED': the verdicts, and what else decides
    whether the move is a regression (an edited expect, a target one run lacks)."""
    head = f"{t.name}: {t.verdict_a or '-'} -> {t.verdict_b or '-'}"
    if t.expect_a is not None:
        head += f" (expect {t.expect_a} -> {t.expect})"
    if t.note == "only in A":
        head += " (only in A: B has no verdict for it)"
    elif t.note:
        head += f" ({t.note})"
    return head + (" REGRESSED" if t.regressed else "")


def run(args: argparse.Namespace) -> int:
    from difftest.report import load_run
    from difftest.report.jsonio import atomic_write_text, strict_json
    from difftest.rundiff import diff_runs

    result = diff_runs(
        load_run(args.run_a), load_run(args.run_b), name_a=str(args.run_a), name_b=str(args.run_b)
    )
    code = 1 if result.regressed else 0
    data = result.to_dict() | {"exit_code": code}
    if args.out is not None:
        from difftest.runner import folder_lock

        Path(args.out).mkdir(parents=True, exist_ok=True)
        with folder_lock(Path(args.out)):  # a folder a run is writing is refused, as a second run is
            atomic_write_text(Path(args.out) / RESULT_FILE, strict_json(data))
    if args.json:
        o.emit_json(data)
        return code
    con = o.console()
    for w in result.warnings:
        con.print(f"warning: {w}", style="yellow")
    for t in result.targets:
        con.print(_head(t), markup=False)
        for line in t.checks_changed:
            con.print(f"  check {line}", markup=False)
        for c in t.comparisons:
            table = Table(title=f"{t.name} vs {c.baseline} ({c.kind})")
            for col in ("metric", "A", "B", "delta", "CI A", "CI B", "beyond noise", "direction"):
                table.add_column(col, no_wrap=True)
            for m in c.metrics:
                if not args.all and m.noise == "unchanged":
                    continue
                table.add_row(
                    metric_name(m.metric), _num(m.a), _num(m.b), _num(m.delta), _ci(m.ci_a), _ci(m.ci_b),
                    _beyond(m), m.direction.upper() if m.regressed else m.direction,
                )  # fmt: skip
            if table.row_count:
                con.print(table)
            changed = c.continuations_changed
            con.print(
                f"  {c.kind} vs {c.baseline}: {len(changed)} of {c.prompts_compared} prompts' "
                "continuations changed"
                + (f": {', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''}" if changed else "")
            )
    con.print("regressed" if code else "no regression beyond noise")
    return code
