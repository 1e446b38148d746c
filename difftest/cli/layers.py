"""`difftest layers`: the white-box per-layer diff and localisation, without the black box.

    difftest layers CONFIG                      launch the config's servers (debug on), localise
    difftest layers --ref URL --target URL [--golden URL]

Exit 0 nothing flagged, 1 a target's layer verdict fails (as `run` judges layers) or a point is not finite, 2 usage (also a
debug request a server refused, HTTP 4xx), 3 infrastructure (also a debug answer that failed: no
diff made), 4 a diff in which no module could be replayed (it decides nothing)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from difftest.cli import options as o
from difftest.cli.whitebox import DEFAULT_OUT, Job, add_server_arguments, get, out_dir, run_whitebox
from difftest.errors import UsageError
from difftest.results import LayerDiff
from difftest.session import Session
from difftest.textsafe import safe

HELP = "white-box per-layer diff and localisation"
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"
RESULT_FILE = "layers.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, golden=True)
    p.add_argument(
        "--prompt",
        type=o.prompt_arg,
        default=DEFAULT_PROMPT,
        help=f"the prompt the activations are captured on (default: {DEFAULT_PROMPT!r})",
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
    if x is None:
        return "-"
    if x == 0 or (math.isfinite(x) and 1e-3 <= abs(x) < 1e4):
        return format(x, ".4f")
    return format(x, ".3g")


def render_layers(diff: LayerDiff, target: str, console: Console, *, all_points: bool = False) -> None:
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
        if not (all_points or p.flagged or p.kind in ("residual", "logits") or p.name == diff.guilty_module):
            continue
        flag = "FLAG" if p.flagged else ("GUILTY" if p.name == diff.guilty_module else "")
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
    the accumulated error), and a non-finite point. A residual point over the scheme's drift bound
    that no module explains is shown, not failed: against FP16 a correct MoE target's routing
    flips drift the residual stream (tiny-moe fp8-block: cosine 0.957 with every module's local
    cosine >= 0.998), and `run` never failed on it either."""
    from difftest.whitebox.layers import layer_verdict

    broken = any(not (math.isfinite(p.rel_err) and math.isfinite(p.cosine)) for p in diff.points)
    return broken or not layer_verdict(diff, thresholds, scheme=scheme).passed


def unmade(diff: LayerDiff) -> tuple[str, int]:
    """Why `diff` says nothing, with its exit code: not made because a side refused the request
    (2) or failed to answer (3), or made with no module replayed (4); ("", 0) when it speaks."""
    if diff.not_made:
        return "; ".join(diff.warnings) or diff.summary, 2 if diff.not_made == "rejected" else 3
    if not any(p.local_rel_err is not None for p in diff.points):
        failures = [w for w in diff.warnings if w.startswith("replay of ")]
        return "no module could be replayed" + (f" ({failures[0]}, ...)" if failures else ""), 4
    return "", 0


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from difftest.null import replay_bound
    from difftest.report.jsonio import atomic_write_text
    from difftest.whitebox.activations import LayerThresholds
    from difftest.whitebox.layers import scheme_of
    from difftest.whitebox.localise import localise_target

    con = o.console()
    prompt = getattr(args, "prompt", None)
    if prompt is not None and not prompt.strip():  # "" used to fall back to the default, silently
        raise UsageError("--prompt: empty prompt text")
    prompt = prompt or DEFAULT_PROMPT
    if getattr(args, "config", None) is None and not (args.ref or getattr(args, "golden", None)):
        raise UsageError("layers: give --ref URL and/or --golden URL to diff the target against")
    as_json = getattr(args, "json", False)

    async def work(session: Session, jobs: Sequence[Job]) -> int:
        failed = False
        open_: list[str] = []  # diffs that could not be made or replayed: never "nothing flagged"
        worst_open = 0
        found: list[dict[str, Any]] = []
        for job in jobs:
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
                    {"target": job.target, "scheme": scheme, "failed": bad} | dataclasses.asdict(diff)
                )
                if not as_json:
                    render_layers(diff, job.target, con, all_points=getattr(args, "all_points", False))
        # a fault found is found (1); else a diff not made is the servers' (3), or the request's
        # (2: a prompt over the context, say), and a diff with no module replayed decides nothing (4)
        code = 1 if failed else worst_open
        for why in open_:
            print(f"difftest: layers: {safe(why)}", file=sys.stderr)
        result = {"exit_code": code, "prompt": prompt, "diffs": found, "not_made": open_}
        if getattr(args, "out", None) is not None:
            import json

            atomic_write_text(out_dir(args) / RESULT_FILE, json.dumps(result, indent=1) + "\n")
        if as_json:
            o.emit_json(result)
        return code

    return run_whitebox(args, work)
