"""`difftest report DIR`: re-judge (optionally with other thresholds) and re-render, offline.

With `-o NEWDIR` the re-judged report goes to a new folder and DIR stays as it was, so that a
run and its re-judgement can be put side by side (`difftest diff DIR NEWDIR`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from difftest.cli import options as o
from difftest.cli.outcome import finish
from difftest.errors import UsageError

HELP = "re-judge and re-render a report folder offline (no servers)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="a report folder written by run or compare")
    p.add_argument(
        "--thresholds",
        type=Path,
        metavar="TOML",
        help="TOML file with a [thresholds] table to re-judge with, applied on top of the run's own (its keys win)",
    )
    o.add_out(p, "where the re-judged report goes (default: DIR itself, rewritten)")
    o.add_json(p)


def threshold_file(path: Path) -> dict[str, dict[str, float]]:
    """The run config's own [thresholds] parser (difftest.config.load_thresholds): one dialect."""
    from difftest.config import load_thresholds

    return load_thresholds(path)


def merged_thresholds(stored: dict, given: dict) -> dict[str, dict[str, float]]:
    """The run's own [thresholds] with the file's on top, table by table (the file's keys win): a
    re-judgement changes what the file says and nothing else -- the run's `margin = 5` must not
    quietly fall back to the default 3 because the file does not repeat it."""
    return {
        name: {**stored.get(name, {}), **given.get(name, {})} for name in dict.fromkeys([*stored, *given])
    }


def run(args: argparse.Namespace) -> int:
    from difftest.config import thresholds_for
    from difftest.judge import rejudge
    from difftest.report import load_run

    result = load_run(args.dir)
    folder = args.dir.parent if args.dir.is_file() else args.dir  # DIR or DIR/report.json
    if not result.targets:  # an empty gate is vacuously PASS: refused, as `run` refuses no target
        raise UsageError(f"{folder}: report.json has no targets, nothing to judge")
    out = args.out or folder
    new = args.out is not None and Path(args.out).resolve() != Path(folder).resolve()
    if new and (Path(args.out) / "report.json").exists():
        raise UsageError(f"-o {args.out}: already holds a report.json (pick a new folder)")
    if args.thresholds:
        thresholds = merged_thresholds(
            result.signature.get("thresholds") or {}, threshold_file(args.thresholds)
        )
        by_scheme = {t.scheme: thresholds_for(thresholds, t.scheme) for t in result.targets}
        rejudge(result, by_scheme)
        result.signature["thresholds"] = thresholds
        result.signature["rejudged_with"] = str(args.thresholds)
    if out != folder:
        result.signature["rejudged_from"] = str(folder)
    return finish(result, out, [], as_json=args.json)
