"""Shared by `difftest layers` and `difftest quant`: launch (CONFIG) or connect (URLs) servers that
serve the debug protocol, then hand the endpoints to the command's work."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from difftest.cli import options as o
from difftest.client import CompletionClient
from difftest.collect import Endpoint
from difftest.conformance import Capabilities
from difftest.errors import ConformanceError, DifftestError, UsageError

DEFAULT_TIMEOUT_S = 600.0  # a debug call on a big model can take minutes on a CPU
DEFAULT_OUT = Path("runs/whitebox")


@dataclasses.dataclass(frozen=True)
class Job:
    """One target with the servers it is compared against."""

    target: str
    reference: str | None
    golden: str | None


def add_server_arguments(p: argparse.ArgumentParser, *, golden: bool) -> None:
    p.add_argument(
        "config", nargs="?", type=Path, help="a run config: its servers are launched with debug on"
    )
    p.add_argument("--ref", metavar="URL", help="reference server URL (instead of CONFIG)")
    p.add_argument("--target", metavar="URL", help="target server URL (instead of CONFIG)")
    if golden:
        p.add_argument("--golden", metavar="URL", help="golden server URL, for exactness (instead of CONFIG)")
    o.add_keys(p)
    o.add_out(p, f"launched servers' logs and the JSON result (default: {DEFAULT_OUT})")
    o.add_timeout(p, f"{DEFAULT_TIMEOUT_S:g}")
    o.add_json(p)


async def connect(name: str, url: str, api_key: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Endpoint:
    """A client for a server that must serve the debug protocol (else a conformance error)."""
    client = CompletionClient(url, name=name, api_key=api_key, timeout_s=timeout_s, max_retries=1)
    try:
        await client.get_json("/debug/config", retries=0)
    except DifftestError as exc:
        await client.aclose()
        raise ConformanceError(f"{name} ({url}) does not serve the debug protocol: {exc}") from None
    return Endpoint(name, client, Capabilities(name=name, url=url, model=None, debug=True))


def _plan(args: argparse.Namespace) -> tuple[list[Any], dict[str, str], list[Job]]:
    """(specs to launch, urls of running servers, jobs)."""
    golden = getattr(args, "golden", None)
    if args.config is not None:
        if args.ref or args.target or golden:
            raise UsageError("give a CONFIG or --ref/--target URLs, not both")
        from difftest.config import load_config

        cfg = load_config(args.config)
        specs = [dataclasses.replace(s, debug=True) if s.model else s for s in cfg.servers()]
        jobs = [Job(t.name, cfg.reference.name, t.golden.name if t.golden else None) for t in cfg.targets]
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
    args: argparse.Namespace, work: Callable[[dict[str, Endpoint], Sequence[Job]], Awaitable[int]]
) -> int:
    """Launch (CONFIG) or connect (URLs), then `await work(endpoints, jobs)`."""
    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT_S
    o.positive("--timeout", timeout)
    specs, urls, jobs = _plan(args)
    envs = o.key_envs(getattr(args, "api_key_env", None) or [])

    async def go(found: dict[str, str], keys: dict[str, str | None]) -> int:
        eps: dict[str, Endpoint] = {}
        try:
            for name, url in found.items():
                eps[name] = await connect(name, url, keys.get(name), timeout)
            return await work(eps, jobs)
        finally:
            await asyncio.gather(*(e.client.aclose() for e in eps.values()))

    if not specs:
        return asyncio.run(go(urls, {n: o.key_for(envs, n) for n in urls}))
    from server_shim.launch import launch_servers

    with launch_servers(specs, log_dir=out_dir(args) / "logs") as running:
        keys = {
            n: os.environ.get(s.spec.api_key_env) if s.spec.api_key_env else o.key_for(envs, n)
            for n, s in running.items()
        }
        return asyncio.run(go({n: s.url for n, s in running.items()}, keys))
