"""`difftest report DIR`: re-judge (optionally with other thresholds) and re-render, offline.

Every call re-judges from report.json's stored numbers with its stored thresholds -- a verdict is
never taken on trust from the file (an edited number must not re-render as the old PASS) -- and a
warning names each verdict that re-judging changes. `--thresholds` then re-judges with its tables
on top. With `-o NEWDIR` the re-judged report goes to a new folder and DIR stays as it was, so that
a run and its re-judgement can be put side by side (`difftest diff DIR NEWDIR`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difftest.cli import options as o
from difftest.cli.outcome import finish
from difftest.errors import UsageError
from difftest.results import RunResult, TargetResult

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
    """The run's own [thresholds] with the file's on top (the file's keys win): a re-judgement
    changes what the file says and nothing else -- the run's `margin = 5` must not quietly fall
    back to the default 3 because the file does not repeat it. A stored limit for a check the file
    sets is dropped wherever it would still decide that check: in the same table in another
    spelling (`top1_min` in the file, `accuracy.top1_agreement` stored), and in every stored
    `[thresholds.<scheme>]` table for a check the file's `[thresholds]` sets (unless the file's own
    table of that scheme sets it), since config.thresholds_for ranks a scheme's table above the
    default one: the file's `top1_min = 0.9` was recorded as used yet the run's scheme value judged
    (t22 #2)."""
    from difftest.verdict import threshold_checks

    def checks(table: Mapping[str, float]) -> set[str]:
        return {c for key in table for c in threshold_checks(key)}

    general = checks(given.get("default", {}))
    merged: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys([*stored, *given]):
        mine = given.get(name, {})
        covered = checks(mine) | (general if name != "default" else set())
        merged[name] = {**_without(stored.get(name, {}), covered), **mine}
    return merged


def _without(table: Mapping[str, float], checks: set[str]) -> dict[str, float]:
    """`table` less its limits for `checks`: a key that sets only such checks is dropped, and a
    budget field that sets one beside another (`failed_rate_max`: exactness and accuracy) is
    narrowed to the dotted keys of the rest (`accuracy.failed_rate`), so that it still judges those
    but no longer outranks the file's limit for the other (a dotted key of the table is kept)."""
    from difftest.verdict import threshold_checks

    out: dict[str, float] = {}
    for key, value in table.items():
        sets = threshold_checks(key)
        if not sets & checks:
            out[key] = value
            continue
        out.update({check: value for check in sorted(sets - checks) if check not in table})
    return out


def _rejudged(result: RunResult, thresholds: Mapping[str, Mapping[str, float]], whose: str) -> list[str]:
    """Re-judge `result` in place with `thresholds` (the run's [thresholds] form; `whose` names
    them in an error); what could not be re-judged, in words. A report.json the current rules cannot
    judge -- no accuracy comparison, an unreadable noise floor, a limit they refuse -- is exit 2
    with the reason: its stored verdict cannot be reproduced, so it is not re-rendered as if it were."""
    from difftest.config import thresholds_for
    from difftest.errors import NoiseFloorError
    from difftest.judge import rejudge

    by_scheme = {t.scheme: thresholds_for(thresholds, t.scheme) for t in result.targets}
    try:
        return rejudge(result, by_scheme)
    except NoiseFloorError as exc:  # the floor the run judged with cannot be read back
        raise UsageError(f"report.json: noise_floor: {exc}") from None
    except UsageError as exc:  # verdict._check_overrides: a limit the current rules refuse
        raise UsageError(f"re-judging with {whose}: {exc}") from None
    except ValueError as exc:  # judge_one: a target without an accuracy comparison
        raise UsageError(f"report.json: {exc}") from None


def stored_thresholds(signature: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """report.json's `signature.thresholds` ({"default" | scheme: {metric: limit}}), which every
    re-judge reads: a damaged one is exit 2 naming the entry, not a traceback in the merge."""
    stored = signature.get("thresholds") or {}
    bad = (
        ["thresholds"]
        if not isinstance(stored, Mapping)
        else [f"thresholds[{k!r}]" for k, v in stored.items() if not isinstance(v, Mapping)]
    )
    if bad:
        raise UsageError(f"report.json: signature.{bad[0]} is not a table of limits")
    return {k: dict(v) for k, v in stored.items()}


def _label(t: TargetResult) -> str:
    return t.verdict.label if t.verdict is not None else "no verdict"


def run(args: argparse.Namespace) -> int:
    from difftest.config import unused_tables
    from difftest.report import load_run

    result = load_run(args.dir)
    folder = args.dir.parent if args.dir.is_file() else args.dir  # DIR or DIR/report.json
    if not result.targets:  # an empty gate is vacuously PASS: refused, as `run` refuses no target
        raise UsageError(f"{folder}: report.json has no targets, nothing to judge")
    out = args.out or folder
    new = args.out is not None and Path(args.out).resolve() != Path(folder).resolve()
    if new and (Path(args.out) / "report.json").exists():
        raise UsageError(f"-o {args.out}: already holds a report.json (pick a new folder)")
    stored = stored_thresholds(result.signature)
    given = threshold_file(args.thresholds) if args.thresholds else {}
    schemes = [t.scheme for t in result.targets]
    warnings = unused_tables(given, schemes, f"--thresholds {args.thresholds}: ") if args.thresholds else []
    before = {t.name: _label(t) for t in result.targets}
    # first with the run's own thresholds: a verdict its stored numbers no longer give is said, not kept
    warnings += _rejudged(result, stored, "report.json's own [thresholds]")
    warnings += [
        f"{t.name}: stored verdict {before[t.name]}, re-judged from report.json's own numbers and "
        f"thresholds: {_label(t)} (numbers edited, or written by another difftest version)"
        for t in result.targets
        if _label(t) != before[t.name]
    ]
    if args.thresholds:
        thresholds = merged_thresholds(stored, given)
        warnings += _rejudged(result, thresholds, f"report.json's [thresholds] and {args.thresholds}'s")
        result.signature["thresholds"] = thresholds
        result.signature["rejudged_with"] = str(args.thresholds)
    result.warnings = list(dict.fromkeys([*result.warnings, *warnings]))
    if out != folder:
        result.signature["rejudged_from"] = str(folder)
    from difftest.runner import folder_lock

    Path(out).mkdir(parents=True, exist_ok=True)
    with folder_lock(Path(out)):  # a folder a run is writing is refused, as a second run is
        return finish(result, out, [], as_json=args.json)
