"""`difftest quant`: the quantization audit of each target (scale layouts, kernel backends).

    difftest quant CONFIG | --target URL [--ref URL]

Exit 0 nothing flagged, 1 a module flagged, 2 usage, 3 infrastructure, 4 a target of which nothing
was audited: no quantized module, or none whose kernel could be measured (structure checks alone
said "0 of 3 modules flagged" with exit 0 over experts whose scales were read as 1). With CONFIG
each target's `expect` gates as in `run` and `layers`: a negative control (expect = "fail") the
audit flags is 0, one it audits clean 1 (its fault went unseen), or 4 where its faults are all
slot faults, which the audit's one-request measurement cannot see."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from difftest.cli import options as o
from difftest.cli.layers import expected_code
from difftest.cli.whitebox import (
    DEFAULT_OUT,
    Job,
    add_server_arguments,
    faults_out_of_reach,
    get,
    out_dir,
    run_whitebox,
)
from difftest.session import Session
from server_shim.catalog import SLOT_FAULTS
from server_shim.option_rules import DTYPE_NAMES

HELP = "quantization audit of each target (scale layouts, backends)"
RESULT_FILE = "quant.json"
NOTHING_AUDITED = 4  # as `layers` exits for a diff that decides nothing
# Fault classes the audit cannot flag: its hypothesis test measures each module in one batch slot
# (effective_weight's [1, rows, K], the experts' probe rows of one request), and a slot fault reads
# another slot's activation scale, so only a batch shows it (`run`'s batch-slot check; `layers`'
# two-slot replay for slot-variant). The backend table's rows are slots, but its marks flag nothing.
AUDIT_BLIND_FAULTS = frozenset(SLOT_FAULTS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, golden=False)
    o.describe_out(p, o.result_out_help(RESULT_FILE, DEFAULT_OUT))


def moe_note(modules: Mapping[str, Any]) -> str | None:
    """What the audit cannot see in an MoE model (None: no MoE module in /debug/config's modules):
    the experts are measured on fixed routing (a sample of them, their combine with its declared
    routed_scaling_factor included), so the router -- which experts a token goes to, with which
    weights -- is not audited; the layer diff is what shows a router fault."""
    from difftest.whitebox.experts import declared_factor

    moe = [i for i in modules.values() if isinstance(i, Mapping) and i.get("kind") == "moe"]
    if not moe:
        return None
    read = [declared_factor(i.get("routed_scaling_factor")) for i in moe]
    factors = sorted({f for f in read if f is not None})
    declared = f", routed_scaling_factor {' / '.join(f'{f:g}' for f in factors)}" if factors else ""
    return (
        "note: MoE experts are audited on fixed routing (sampled experts, their combine"
        f"{declared}); the router (top-k choice, routing weights) is not: a fault there shows in "
        "`difftest layers` / `difftest run`"
    )


def audit_blind_faults(scheme: str | None, dtypes: Sequence[str]) -> frozenset[str]:
    """The fault classes the audit cannot see on a target of `scheme` whose servers compute in
    `dtypes`: the slot faults always; ue8m0-rounding on int8 where one computes in bfloat16 (the
    int8 probe needs fp16 / fp32 to show a power-of-two scale: whitebox.audit.PROBE_INT8). Such a
    control found clean was exit 1, "the audit missed it", where it can prove nothing. The audit's
    own rule decides (`audit.probe_value`), on the dtypes as configured ("auto" is fp32 on a CPU,
    fp16 on a GPU: wide either way)."""
    from difftest.whitebox.audit import PROBE_INT8, probe_value

    resolved = [DTYPE_NAMES.get(d, "float16") for d in dtypes]
    if scheme == "int8" and resolved and probe_value(scheme, resolved) != PROBE_INT8:
        return AUDIT_BLIND_FAULTS | {"ue8m0-rounding"}
    return AUDIT_BLIND_FAULTS


def unseen_faults(faults: Sequence[str], scheme: str | None = None, dtypes: Sequence[str] = ()) -> list[str]:
    """A negative control's fault classes when every one is of a class the audit cannot see."""
    return faults_out_of_reach(faults, audit_blind_faults(scheme, dtypes))


def control_line(
    target: str, flagged: bool, unseen: Sequence[str], nothing_audited: bool, not_audited: int = 0
) -> str:
    """What a negative control's audit says against its expect = "fail", worded as `layers` does;
    `not_audited`: modules a server failed or refused to answer for (audit.audit_failure)."""
    if flagged:
        said = "a module flagged, as expected"
    elif nothing_audited:
        said = "nothing audited, undecided"
    elif not_audited:
        said = f"no module flagged, undecided: {not_audited} modules could not be audited"
    elif unseen and "ue8m0-rounding" in unseen:
        said = (
            f"no module flagged, undecided: its faults ({', '.join(unseen)}) are out of the audit's "
            "reach here (an int8 activation scale rounded to a power of two shows only through a "
            "probe that bfloat16 cannot hold: audit the target in float16 or float32)"
        )
    elif unseen:
        said = (
            f"no module flagged, undecided: its faults ({', '.join(unseen)}) act across batch slots, "
            "which the audit (one request, one slot) cannot see; `difftest run`'s batch-slot check "
            "judges them"
        )
    else:
        said = "no module flagged: NOT as expected"
    return f'{target} (expect = "fail", a negative control): {said}'


# a module the audit could not measure, by whose doing (audit.audit_failure): the servers' (3), a
# request the reference or golden refused (2); a target's own refusal flags its module instead
FAILURE_EXIT = {"infrastructure": 3, "refused": 2}


def _worst_failure(rows: Sequence[Mapping[str, Any]]) -> str | None:
    kinds = {r.get("failure") for r in rows}
    return next((k for k in FAILURE_EXIT if k in kinds), None)


def failed_audits(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The line saying how many modules could not be audited and why (the first reason), or None."""
    failed = [r for r in rows if r.get("failure")]
    if not failed:
        return None
    first = (failed[0].get("notes") or ["?"])[0]
    return f"{len(failed)} of {len(rows)} modules not audited (the target not blamed): {failed[0]['module']}: {first}"


def audited(row: Mapping[str, Any]) -> bool:
    """A row whose kernel was measured (its hypothesis test ran). Rows from before the key existed:
    those with kernel hypotheses."""
    return bool(row.get("audited", bool(row.get("kernel_hypotheses"))))


def count_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """How many modules are flagged, and how many rows measured nothing: a structure-only row is
    no evidence that the module computes right."""
    flagged = sum(1 for r in rows if r.get("flagged"))
    line = f"{flagged} of {len(rows)} modules flagged"
    unmeasured = sum(1 for r in rows if not audited(r) and not r.get("flagged"))
    if unmeasured:
        line += f"; {unmeasured} not audited (structure checks only: no hypothesis test)"
    return line


def render_audit(
    rows: Sequence[dict[str, Any]], target: str, console: Console, notes: Sequence[str] = ()
) -> None:
    """The audit table, then one line per flagged module with its hint: piped into a file the
    table is cut to the console's width, and the hint (the one sentence that names the bug) came
    last and got no width at all among 210 rows. `notes` (what the audit cannot see) follow the
    count, so that "0 of N modules flagged" is not read as a clean bill."""
    from difftest.whitebox.audit import EXPLAINED

    table = Table(title=f"quantization audit of {target}")
    for col in ("module", "scheme", "backend", "layout", "checks", "best", "hint"):
        table.add_column(col, no_wrap=col != "hint", min_width=20 if col == "hint" else None)
    table.add_column("hypotheses (rel err vs kernel)", overflow="fold")
    for r in rows:
        checks = r.get("checks") or {}
        bad = [k for k, ok in checks.items() if not ok]
        hyp = r.get("kernel_hypotheses") or {}
        layout = r.get("layout") or {}
        best = r.get("best")
        # a best hypothesis that reconstructs nothing is no explanation (garbage-gemm's "best" was
        # fnuz-unnormalized at rel err 1.09)
        explains = best is not None and isinstance(hyp.get(best), int | float) and hyp[best] <= EXPLAINED
        status = "FLAGGED" if r.get("flagged") else "ok"
        table.add_row(
            str(r.get("module")), str(r.get("scheme")), str(r.get("backend")),
            f"{layout.get('order', '?')}{' shuffled' if layout.get('shuffled') else ''}" if layout else "-",
            status + (" (" + ",".join(bad) + ")" if bad else ""), str(best) if explains else "none" if hyp else "-",
            str(r.get("hint") or ""),
            " ".join(f"{k}={v:.3g}" for k, v in hyp.items()) or "; ".join(r.get("notes") or []) or "-",
        )  # fmt: skip
    console.print(table)
    flagged = [r for r in rows if r.get("flagged")]
    for r in flagged:
        console.print(
            f"FLAGGED {r.get('module')}: {r.get('hint') or 'see its checks'}", markup=False, soft_wrap=True
        )
    console.print(f"{target}: {count_line(rows)}", markup=False)
    for n in notes:
        console.print(n, markup=False, soft_wrap=True)
    with_backends = [r for r in rows if r.get("backends")]
    if with_backends:
        from difftest.whitebox.audit import BACKENDS

        bounds = sorted({c["bound"] for r in with_backends for c in r["backends"].values() if "bound" in c})
        under = " / ".join(f"{b:g}" for b in bounds) or "the bound"
        bt = Table(
            title=f"backends: cosine vs FP32 on one input (! = under {under}, the scheme's module bound)"
        )
        bt.add_column("module", no_wrap=True)
        for b in BACKENDS:
            bt.add_column(b, no_wrap=True)
        for r in with_backends:
            cells = []
            for b in BACKENDS:
                cell = r["backends"].get(b) or {}
                if not cell.get("available"):
                    cells.append("n/a")
                else:
                    cells.append(f"{cell['cosine']:.5f}{' !' if cell['flagged'] else ''}")
            bt.add_row(str(r.get("module")), *cells)
        console.print(bt)


def run(args: argparse.Namespace) -> int:
    from difftest.report.jsonio import atomic_write_text, strict_json
    from difftest.whitebox.audit import audit

    con = o.console()
    as_json = getattr(args, "json", False)

    async def work(session: Session, jobs: Sequence[Job]) -> int:
        codes: list[int] = []  # each target's outcome against its expect
        empty: list[str] = []  # targets without a quantized module: audited nothing, decided nothing
        found: list[dict[str, Any]] = []
        for job in jobs:
            # the kernel's weight against full precision where there is a reference (as `run` does)
            ref = get(session, job.reference) or get(session, job.golden)
            rows = await audit(session[job.target], ref)
            bad = any(r.get("flagged") for r in rows)
            config = await session[job.target].client.debug_config()  # cached: audit() asked it
            notes = [n for n in [moe_note(config.get("modules", {}))] if n]
            found.append(
                {"target": job.target, "expect": job.expect, "flagged": bad, "modules": rows, "notes": notes}
            )
            if not as_json and rows:
                render_audit(rows, job.target, con, notes)
            nothing = not any(audited(r) for r in rows)  # nothing measured decides nothing: never exit 0
            if nothing:
                empty.append(job.target)
                if not as_json:
                    why = (
                        "nothing audited: no module's kernel could be measured"
                        if rows
                        else "nothing to audit: it serves no quantized module"
                    )
                    con.print(f"{job.target}: {why}", markup=False)
            failed = failed_audits(rows)
            if failed and not as_json:
                con.print(f"{job.target}: {failed}", markup=False, soft_wrap=True)
            unseen = unseen_faults(job.faults, job.scheme, job.dtypes)
            open_code = FAILURE_EXIT.get(_worst_failure(rows), NOTHING_AUDITED if nothing else 0)
            codes.append(expected_code(job.expect, bad, open_code, bool(unseen)))
            if job.expect == "fail" and not as_json:
                not_audited = sum(bool(r.get("failure")) for r in rows)
                con.print(
                    control_line(job.target, bad, unseen, nothing, not_audited), markup=False, soft_wrap=True
                )
        code = 1 if 1 in codes else max(codes, default=0)
        result = {"exit_code": code, "audits": found}
        if empty:
            result["nothing_audited"] = empty
        if getattr(args, "out", None) is not None:
            atomic_write_text(out_dir(args) / RESULT_FILE, strict_json(result, fallback=str))
        if as_json:
            o.emit_json(result)
        return code

    # the audit reads a golden only where no live reference exists: none launched beside one
    return run_whitebox(args, work, golden_as_fallback=True)
