"""Shared by `difftest layers` and `difftest quant`: launch (CONFIG) or connect (URLs) servers that
serve the debug protocol, then hand the endpoints to the command's work."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from difftest import aio
from difftest.cli import options as o
from difftest.collect import Endpoint
from difftest.errors import UsageError
from difftest.session import ClientOptions, Session

DEFAULT_TIMEOUT_S = 600.0  # a debug call on a big model can take minutes on a CPU
DEFAULT_OUT = Path("runs/whitebox")


@dataclasses.dataclass(frozen=True)
class Job:
    """One target with the servers it is compared against."""

    target: str
    reference: str | None
    golden: str | None
    expect: str = "pass"  # the config's: `layers` / `quant` gate on it as `run` does (a caught control is 0)
    faults: tuple[str, ...] = ()  # a launched shim target's injected faults (its config's `faults`)
    scheme: str | None = None  # the target's `quant`, where the config gives one
    dtypes: tuple[str, ...] = ()  # the compute dtypes of the job's shim servers, as configured

    def servers(self) -> tuple[str, ...]:
        return tuple(n for n in (self.target, self.reference, self.golden) if n is not None)


def faults_out_of_reach(faults: Sequence[str], blind: frozenset[str]) -> list[str]:
    """A negative control's fault classes when every one is of a class in `blind` (what a command
    cannot see; "slot-tile@GLOB" read as its class), else []: such a control found clean proves
    nothing either way, where one with a visible fault found clean is the command missing it."""
    classes = [f.split("@", 1)[0] for f in faults]
    return classes if classes and all(c in blind for c in classes) else []


def add_server_arguments(p: argparse.ArgumentParser, *, golden: bool) -> None:
    expect = (
        "its targets' `expect` gates the exit code as in `run` (a negative control whose fault is "
        "found is 0, one found clean 1, or 4 where its faults are all of a class this command "
        "cannot see)"
    )
    p.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="a run config: the servers its targets are diffed against are launched with debug on "
        f"(not its goldens' rounding twins, which no diff uses); {expect}",
    )
    url = o.http_url
    p.add_argument("--ref", type=url, metavar="URL", help="reference server URL (instead of CONFIG)")
    p.add_argument("--target", type=url, metavar="URL", help="target server URL (instead of CONFIG)")
    if golden:
        p.add_argument(
            "--golden", type=url, metavar="URL", help="golden server URL, for exactness (instead of CONFIG)"
        )
    o.add_keys(p)
    o.add_jobs(p, default=4)
    o.add_out(p, f"launched servers' logs and the JSON result (default: {DEFAULT_OUT})")
    o.add_timeout(p, f"{DEFAULT_TIMEOUT_S:g}")
    o.add_json(p)


def get(session: Session, name: str | None) -> Endpoint | None:
    return session[name] if name is not None else None


def _plan(
    args: argparse.Namespace, golden_as_fallback: bool = False
) -> tuple[list[Any], dict[str, str], list[Job]]:
    """(specs to launch, urls of running servers, jobs). `golden_as_fallback`: the command reads a
    target's golden only where no live reference exists (`quant`), so no golden is launched beside
    one."""
    golden = getattr(args, "golden", None)
    if args.config is not None:
        if args.ref or args.target or golden:
            raise UsageError("give a CONFIG or --ref/--target URLs, not both")
        from difftest.cli.run import with_overrides
        from difftest.config import load_config

        cfg = with_overrides(load_config(args.config), args)  # url servers' API keys, as `run` gives them
        ref = cfg.reference.name if cfg.baseline is None else None  # a recorded baseline has no /debug
        skip_goldens = golden_as_fallback and ref is not None
        jobs = [
            Job(
                t.name,
                ref,
                t.golden.name if t.golden and not skip_goldens else None,
                t.expect,
                tuple(t.server.faults or ()),
                t.server.quant,
                tuple(s.dtype for s in (cfg.reference, t.server) if s.kind == "shim" and s.dtype),
            )
            for t in cfg.targets
        ]
        # only the servers a job diffs: a golden's rounding twin (the exactness null of `run`) was
        # launched too, one more model loaded per golden that no job ever asked
        used = {name for job in jobs for name in job.servers()}
        live = [s for s in cfg.servers() if s.name in used]
        specs = [dataclasses.replace(s, debug=True) if s.model else s for s in live]
        return specs, {}, jobs
    if not args.target:
        raise UsageError("give a CONFIG, or --target URL (with --ref URL and/or --golden URL)")
    for flag, url in (("--ref", args.ref), ("--target", args.target), ("--golden", golden)):
        o.check_url(flag, url)
    urls = {"target": args.target}
    if args.ref:
        urls["reference"] = args.ref
    if golden:
        urls["golden"] = golden
    return [], urls, [Job("target", "reference" if args.ref else None, "golden" if golden else None)]


def out_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "out", None) or DEFAULT_OUT)


def run_whitebox(
    args: argparse.Namespace,
    work: Callable[[Session, Sequence[Job]], Awaitable[int]],
    golden_as_fallback: bool = False,
) -> int:
    """Launch (CONFIG) or connect (URLs), probe each server once, then `await work(session, jobs)`
    (`golden_as_fallback`: see `_plan`)."""
    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT_S
    o.positive("--timeout", timeout)
    specs, urls, jobs = _plan(args, golden_as_fallback)
    envs = o.key_envs(getattr(args, "api_key_env", None) or [])
    # a debug call on a big model can take minutes on a CPU; retrying one rarely helps
    jobs_n = getattr(args, "concurrency", None)
    jobs_n = 4 if jobs_n is None else jobs_n  # -j 0 is refused, not read as the default
    o.positive("--concurrency", jobs_n)
    options = ClientOptions(timeout_s=timeout, max_retries=1, concurrency=jobs_n)

    async def go(session: Session) -> int:
        async with session:
            session.require_debug(*session)
            return await work(session, jobs)

    if not specs:
        o.check_key_servers(envs, list(urls))
        keys = {name: o.key_for(envs, name) for name in urls}  # per server (--api-key-env NAME=VAR)
        session = Session.of_urls(urls, api_key=o.key_for(envs, "*"), keys=keys, options=options)
        return aio.run(go(session))
    from difftest.session import launch_shown

    with launch_shown(specs, log_dir=out_dir(args) / "logs") as running:
        return aio.run(go(Session.of_running(running, options)))
