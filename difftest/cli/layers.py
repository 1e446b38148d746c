"""`difftest layers`: the white-box per-layer diff and localisation, without the black box.

    difftest layers CONFIG                      launch the config's servers (debug on), localise
    difftest layers --ref URL --target URL [--golden URL]

Exit 0 nothing flagged, 1 a target's layer verdict fails (as `run` judges layers) or a served
residual / logits point is not finite; with CONFIG each target's `expect` gates as in `run`: a
negative control (expect = "fail") whose fault is found is 0, one found clean is 1 (4 where its
faults, slot-tile, act past the replay's batch slots). 2 usage (also a debug request a server refused, HTTP 4xx),
3 infrastructure (also a debug answer that failed: no diff made, or a module replay a server
failed to answer or answered damaged), 4 a diff in which no module could be replayed (it decides
nothing) or one whose replay of some module was refused."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from difftest.cli import options as o
from difftest.cli.whitebox import (
    DEFAULT_OUT,
    Job,
    add_server_arguments,
    faults_out_of_reach,
    get,
    out_dir,
    run_whitebox,
)
from difftest.errors import UsageError
from difftest.results import LayerDiff, fmt_compact
from difftest.session import Session
from difftest.textsafe import safe
from server_shim.catalog import SLOT_TILE_ROWS

if TYPE_CHECKING:  # numpy behind it: `difftest --help` imports every command module
    from difftest.whitebox.activations import LayerThresholds

HELP = "white-box per-layer diff and localisation"
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"
RESULT_FILE = "layers.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, golden=True)
    p.add_argument(
        "--prompt",
        type=o.prompt_arg,
        action="append",
        help=f"the prompt the activations are captured on, once ('-' reads stdin; default: {DEFAULT_PROMPT!r})",
    )
    p.add_argument(
        "--all-points", action="store_true", help="show every capture point, not only flagged ones"
    )
    o.describe_out(p, o.result_out_help(RESULT_FILE, DEFAULT_OUT))


def _fmt(x: float | None, spec: str = ".5g") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(x: float | None) -> str:
    """A norm ratio: 4 decimals near 1, where they matter (fnuz's x0.5 reads 0.5000, a rounding
    1.0001); 3 significant digits, scientific, beyond [1e-3, 1e4), like rel err beside it (a
    skipped scale's 1611404929.3622 was a column of noise digits next to 1.61e+09)."""
    return fmt_compact(x, ".4f")


def render_layers(
    diff: LayerDiff, target: str, console: Console, *, all_points: bool = False, scheme: str | None = None,
    thresholds: LayerThresholds | None = None,
) -> None:  # fmt: skip
    """The diff's table: residual stream and logits, flagged points, and every module whose local
    error is out of bounds (GUILTY the one blamed, LOCAL the others: a second fault used to be
    visible only in layers.json), then its sentence and warnings."""
    from difftest.whitebox.activations import LayerThresholds
    from difftest.whitebox.replay import out_of_bounds_leaves

    oob = {p.name for p in out_of_bounds_leaves(diff, scheme, thresholds or LayerThresholds())}
    table = Table(title=f"{target} vs {diff.against} ({diff.kind})")
    for col in (
        "layer",
        "point",
        "cos",
        "norm ratio",
        "rel err",
        "local cos",
        "local norm",
        "local rel",
        "flag",
    ):
        table.add_column(col, no_wrap=True)
    for p in diff.points:
        guilty = p.name == diff.guilty_module
        if not (all_points or p.flagged or p.kind in ("residual", "logits") or guilty or p.name in oob):
            continue
        flag = "FLAG" if p.flagged else ("GUILTY" if guilty else ("LOCAL" if p.name in oob else ""))
        flag += " SLOT" if p.slot_dependent else ""  # its output depends on the batch slot
        table.add_row(
            _fmt(p.layer, "d"), p.name, _fmt(p.cosine, ".6f"), _ratio(p.norm_ratio), _fmt(p.rel_err, ".3g"),
            _fmt(p.local_cosine, ".6f"), _ratio(p.local_norm_ratio), _fmt(p.local_rel_err, ".3g"), flag,
        )  # fmt: skip
    console.print(table)
    console.print(f"{target} vs {diff.against}: {diff.summary}")
    if not diff.guilty_module and diff.first_divergent_layer is None:
        console.print(REPLAY_SLOTS_NOTE)
    for w in diff.warnings:
        console.print(f"warning: {w}", style="yellow")


# what a clean layer diff cannot vouch for (a fault from slot 16 on, the shim's slot-tile, passed it)
REPLAY_SLOTS_NOTE = (
    "note: the replay runs each module in batch slots 0 and 1 only; a fault that acts from a later "
    "slot is the batch-slot check's (difftest run, batch_slot_check = true)"
)


def diff_failed(diff: LayerDiff, scheme: str | None = None, thresholds: Any = None) -> bool:
    """What `run` fails a target's layers on (the layer verdict: module replay, and against a golden
    the accumulated error), and a non-finite residual or logits point. A residual point over the
    scheme's drift bound that no module explains is shown, not failed: against FP16 a correct MoE
    target's routing flips drift the residual stream (tiny-moe fp8-block: cosine 0.957 with every
    module's local cosine >= 0.998), and `run` never failed on it either. Module points are left to
    their replay: a module the target served no point for carries NaN, difftest's "not compared",
    and failed an identical target that `run` passed; a NaN a module really computes reaches the
    residual stream and its own replay."""
    from difftest.whitebox.layers import layer_verdict

    stream = [p for p in diff.points if p.kind in ("residual", "logits")]
    broken = any(not (math.isfinite(p.rel_err) and math.isfinite(p.cosine)) for p in stream)
    return broken or not layer_verdict(diff, thresholds, scheme=scheme).passed


def unmade(diff: LayerDiff) -> tuple[str, int]:
    """Why `diff` cannot say "nothing flagged", with its exit code: not made because a side refused
    the request (2) or failed to answer (3); a module replay a server failed to answer or answered
    damaged (3: the diff cannot vouch for that module, and a fault in it passed as exit 0); made
    with no module replayed, or some module's replay refused (4: undecided). ("", 0) when it speaks."""
    from difftest.whitebox.replay import replay_failure_lines, replay_failures

    if diff.not_made:
        return "; ".join(diff.warnings) or diff.summary, 2 if diff.not_made == "rejected" else 3
    fails = replay_failures(diff)
    code = 3 if fails["failed"] else 4
    said = replay_failure_lines(diff)
    why = f" ({'; '.join(said)})" if said else ""
    if not any(p.local_rel_err is not None for p in diff.points):
        return f"no module could be replayed{why}", code
    if fails["failed"] or fails["refused"]:
        n = fails["failed"] + fails["refused"]
        return f"the diff cannot vouch for {n} module{'s' if n > 1 else ''} whose replay failed{why}", code
    return "", 0


# Fault classes no layer diff can see: they act from batch slot 16 on, and the replay puts a
# module's input in slots 0 and 1 (REPLAY_SLOTS_NOTE); `run`'s batch-slot check is what catches them.
REPLAY_BLIND_FAULTS = frozenset({"slot-tile"})


def out_of_reach(faults: Sequence[str]) -> list[str]:
    """A negative control's fault classes when every one is of a class the layer diff cannot see."""
    return faults_out_of_reach(faults, REPLAY_BLIND_FAULTS)


def expected_code(expect: str, failed: bool, worst_open: int, blind: bool = False) -> int:
    """One target's exit code against its `expect`, as `run` gates: a fault found is 1 for a target
    expected to pass and 0 for a negative control; else a diff not made, or a module replay a
    server failed to answer, is the servers' (3) or the request's (2: a prompt over the context,
    say), a diff with no module replayed (or a replay refused) decides nothing (4), and a negative
    control whose diffs were all made and found nothing is 1 (its fault went unseen), or 4 where
    its faults are all out of the layer diff's reach (`blind`: undecided here, `run`'s to judge)."""
    if failed:
        return 0 if expect == "fail" else 1
    if worst_open:
        return worst_open
    if expect == "fail":
        return 4 if blind else 1
    return 0


def one_prompt(given: str | list[str] | None) -> str:
    """The one prompt `layers` captures on: `--prompt` given twice is a usage error (the second
    silently replaced the first), `-` reads stdin as `compare` does (it was captured as the text
    "-"), "" is refused (it used to fall back to the default, silently); none given: the default."""
    texts = [given] if isinstance(given, str) else list(given or [])
    if len(texts) > 1:
        raise UsageError("--prompt: layers captures the activations of one prompt; give it once")
    if not texts:
        return DEFAULT_PROMPT
    prompt = o.stdin_text() if texts[0] == "-" else texts[0]
    if not prompt.strip():
        raise UsageError("--prompt: empty prompt text")
    return prompt


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from difftest.null import replay_bound
    from difftest.report.jsonio import atomic_write_text, strict_json
    from difftest.whitebox.activations import LayerThresholds
    from difftest.whitebox.layers import scheme_of
    from difftest.whitebox.localise import localise_target

    con = o.console()
    prompt = one_prompt(getattr(args, "prompt", None))
    if getattr(args, "config", None) is None and not (args.ref or getattr(args, "golden", None)):
        raise UsageError("layers: give --ref URL and/or --golden URL to diff the target against")
    as_json = getattr(args, "json", False)

    async def work(session: Session, jobs: Sequence[Job]) -> int:
        open_: list[str] = []  # diffs that could not be made or replayed: never "nothing flagged"
        codes: list[int] = []  # each target's outcome against its expect
        found: list[dict[str, Any]] = []
        for job in jobs:
            failed = False
            worst_open = 0
            if job.golden is None and job.reference is None:  # a recorded baseline has no /debug
                raise UsageError(
                    f"layers: {job.target} has neither a golden nor a live reference to diff against"
                )
            tgt = session[job.target]
            config = await tgt.client.debug_config()
            scheme = scheme_of(config)
            # the module replay bound of the target's compute dtype, as `run` uses (difftest.null)
            th = LayerThresholds(exact_local_rel_err=replay_bound((config or {}).get("dtype"))[0])
            local = await localise_target(
                tgt, prompt=prompt, golden=get(session, job.golden), reference=get(session, job.reference),
                thresholds=th,
            )  # fmt: skip
            for diff in local.diffs:
                bad = diff_failed(diff, scheme, th)
                failed |= bad
                why, code = unmade(diff)
                if why:
                    open_.append(f"{job.target} vs {diff.against}: {why}")
                    worst_open = max(worst_open, code)
                found.append(
                    {"target": job.target, "expect": job.expect, "scheme": scheme, "failed": bad}
                    | dataclasses.asdict(diff)
                )
                if not as_json:
                    render_layers(diff, job.target, con, all_points=getattr(args, "all_points", False),
                                  scheme=scheme, thresholds=th)  # fmt: skip
            blind = out_of_reach(job.faults)
            codes.append(expected_code(job.expect, failed, worst_open, bool(blind)))
            if job.expect == "fail" and not as_json:
                if failed:
                    said = "its fault found, as expected"
                elif blind:
                    said = (
                        f"no fault found, undecided: its faults ({', '.join(blind)}) act from batch slot "
                        f"{SLOT_TILE_ROWS} on, out of the replay's reach; `difftest run`'s batch-slot check "
                        "judges them"
                    )
                else:
                    said = "no fault found: NOT as expected"
                con.print(f'{job.target} (expect = "fail", a negative control): {said}')
        code = 1 if 1 in codes else max(codes, default=0)
        for why in open_:
            print(f"difftest: layers: {safe(why)}", file=sys.stderr)
        result = {"exit_code": code, "prompt": prompt, "diffs": found, "not_made": open_}
        if getattr(args, "out", None) is not None:
            atomic_write_text(out_dir(args) / RESULT_FILE, strict_json(result))
        if as_json:
            o.emit_json(result)
        return code

    return run_whitebox(args, work)
