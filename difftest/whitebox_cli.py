"""`difftest layers` and `difftest quant`: the white-box views of one run, without the black box.

    difftest layers CONFIG                      launch the config's servers (debug on), localise
    difftest layers --ref URL --target URL [--golden URL]
    difftest quant  CONFIG | --target URL [--ref URL]

Exit codes (docs/design.md "Errors and exit codes"): 0 nothing flagged, 1 a target has a flagged point or module, 2 usage,
3 infrastructure (from the launcher / client errors, mapped by difftest.cli).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from difftest.collect import Endpoint
from difftest.errors import UsageError
from difftest.results import LayerDiff
from difftest.session import ClientOptions, Session
from difftest.whitebox.audit import BACKEND_COSINE_MIN, BACKENDS, audit
from difftest.whitebox.layers import layer_verdict, scheme_of
from difftest.whitebox.localise import localise_target

DEFAULT_TIMEOUT_S = 600.0  # a debug call on a big model can take minutes on a CPU


@dataclasses.dataclass(frozen=True)
class _Job:
    """One target with the servers it is compared against."""

    target: str
    reference: str | None
    golden: str | None


def _check_url(flag: str, url: str | None) -> None:
    if url is not None and not url.startswith(("http://", "https://")):
        raise UsageError(f"{flag}: {url!r} is not an http(s) URL")


def _plan(args: argparse.Namespace) -> tuple[list[Any], dict[str, str], list[_Job], str | None]:
    """(specs to launch, urls of running servers, jobs, api key env)."""
    golden = getattr(args, "golden", None)
    if args.config is not None:
        if args.ref or args.target or golden:
            raise UsageError("give a CONFIG or --ref/--target URLs, not both")
        from difftest.config import load_config

        cfg = load_config(args.config)
        specs = [dataclasses.replace(s, debug=True) if s.model else s for s in cfg.servers()]
        jobs = [_Job(t.name, cfg.reference.name, t.golden.name if t.golden else None) for t in cfg.targets]
        return specs, {}, jobs, None
    if not args.target:
        raise UsageError("give a CONFIG, or --target URL (with --ref URL and/or --golden URL)")
    for flag, url in (("--ref", args.ref), ("--target", args.target), ("--golden", golden)):
        _check_url(flag, url)
    urls = {"target": args.target}
    if args.ref:
        urls["reference"] = args.ref
    if golden:
        urls["golden"] = golden
    job = _Job("target", "reference" if args.ref else None, "golden" if golden else None)
    key_env = getattr(args, "api_key_env", None)
    if key_env and key_env not in os.environ:
        raise UsageError(f"--api-key-env {key_env}: that environment variable is not set")
    return [], urls, [job], key_env


# a debug call on a big model can take minutes on a CPU; retrying one rarely helps
OPTIONS = ClientOptions(timeout_s=DEFAULT_TIMEOUT_S, max_retries=1, concurrency=4)


def _run(args: argparse.Namespace, work: Any) -> int:
    """Launch (CONFIG) or connect (URLs), probe each server once, then `await work(session, jobs)`."""
    specs, urls, jobs, key_env = _plan(args)

    async def go(session: Session) -> int:
        async with session:
            session.require_debug(*session)
            return await work(session, jobs)

    if not specs:
        key = os.environ.get(key_env) if key_env else None
        return asyncio.run(go(Session.of_urls(urls, api_key=key, options=OPTIONS)))
    from server_shim.launch import launch_servers

    out = Path(getattr(args, "out", None) or "runs/whitebox")
    with launch_servers(specs, log_dir=out / "logs") as running:
        return asyncio.run(go(Session.of_running(running, OPTIONS)))


# ---------------------------------------------------------------- layers


def _fmt(x: float | None, spec: str = ".5g") -> str:
    return "-" if x is None else format(x, spec)


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
        table.add_column(col)
    for p in diff.points:
        if not (all_points or p.flagged or p.kind in ("residual", "logits") or p.name == diff.guilty_module):
            continue
        flag = "FLAG" if p.flagged else ("GUILTY" if p.name == diff.guilty_module else "")
        table.add_row(
            _fmt(p.layer, "d"), p.name, _fmt(p.cosine, ".6f"), _fmt(p.norm_ratio, ".4f"), _fmt(p.rel_err, ".3g"),
            _fmt(p.local_cosine, ".6f"), _fmt(p.local_norm_ratio, ".4f"), _fmt(p.local_rel_err, ".3g"), flag,
        )  # fmt: skip
    console.print(table)
    console.print(f"{target} vs {diff.against}: {diff.summary}")
    for w in diff.warnings:
        console.print(f"warning: {w}", style="yellow")


def diff_failed(diff: LayerDiff, scheme: str | None = None) -> bool:
    return any(p.flagged for p in diff.points) or not layer_verdict(diff, scheme=scheme).passed


def layers_command(args: argparse.Namespace) -> int:
    console = Console()
    prompt = getattr(args, "prompt", None) or "The capital of France is Paris. The capital of Germany is"

    async def work(session: Session, jobs: Sequence[_Job]) -> int:
        failed = False
        for job in jobs:
            tgt = session[job.target]
            scheme = scheme_of(await tgt.client.debug_config())
            found = await localise_target(
                tgt, prompt=prompt, golden=_get(session, job.golden), reference=_get(session, job.reference)
            )
            for diff in found.diffs:
                render_layers(diff, job.target, console)
                failed |= diff_failed(diff, scheme)
        return 1 if failed else 0

    return _run(args, work)


# ---------------------------------------------------------------- quant


def render_audit(rows: Sequence[dict[str, Any]], target: str, console: Console) -> None:
    table = Table(title=f"quantization audit of {target}")
    for col in (
        "module",
        "scheme",
        "backend",
        "layout",
        "checks",
        "best",
        "hypotheses (rel err vs kernel)",
        "hint",
    ):
        table.add_column(col)
    for r in rows:
        checks = r.get("checks") or {}
        bad = [k for k, ok in checks.items() if not ok]
        hyp = r.get("kernel_hypotheses") or {}
        layout = r.get("layout") or {}
        table.add_row(
            str(r.get("module")), str(r.get("scheme")), str(r.get("backend")),
            f"{layout.get('order', '?')}{' shuffled' if layout.get('shuffled') else ''}" if layout else "-",
            "ok" if not bad else "FAIL " + ",".join(bad), str(r.get("best") or "-"),
            " ".join(f"{k}={v:.3g}" for k, v in hyp.items()) or "; ".join(r.get("notes") or []) or "-",
            str(r.get("hint") or ""),
        )  # fmt: skip
    console.print(table)
    with_backends = [r for r in rows if r.get("backends")]
    if with_backends:
        bt = Table(title=f"backends: cosine vs FP32 on one input (! = under {BACKEND_COSINE_MIN})")
        bt.add_column("module")
        for b in BACKENDS:
            bt.add_column(b)
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


def _get(session: Session, name: str | None) -> Endpoint | None:
    return session[name] if name is not None else None


def quant_command(args: argparse.Namespace) -> int:
    console = Console()

    async def work(session: Session, jobs: Sequence[_Job]) -> int:
        flagged = False
        for job in jobs:
            # the kernel's weight against full precision where there is a reference (as `run` does)
            ref = _get(session, job.reference) or _get(session, job.golden)
            rows = await audit(session[job.target], ref)
            render_audit(rows, job.target, console)
            flagged |= any(r.get("flagged") for r in rows)
        return 1 if flagged else 0

    return _run(args, work)
