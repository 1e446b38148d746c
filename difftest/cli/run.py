"""`difftest run CONFIG`: launch the config's servers, compare, judge, write the report folder."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from difftest.cli import options as o
from difftest.cli.outcome import execute_and_finish
from difftest.config import RunConfig, load_config

HELP = "run a config: launch servers, compare, judge, report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the run's TOML config")
    o.add_out(p, "report (default: run.output_dir of the config)")
    p.add_argument(
        "--resume", action="store_true", help="reuse the folder's response cache: ask only what is missing"
    )
    o.add_jobs(p)
    o.add_limit(p)
    o.add_timeout(p, "the config's run.request_timeout_s")
    o.add_keys(p, "for running servers (url) without their own api_key_env")
    o.add_json(p)


def with_overrides(cfg: RunConfig, args: argparse.Namespace, *, reference_only: bool = False) -> RunConfig:
    """The command line's -j / --timeout / --limit over the config's values (so the report's
    signature.run holds what the run used), and API keys (--api-key-env, else OPENAI_API_KEY)
    for running servers (url) whose table names none. `reference_only`: the command (`noise`,
    `record`) asks the reference alone, so a key named for another server would go nowhere."""
    run = cfg.run
    if getattr(args, "timeout", None) is not None:
        run = dataclasses.replace(run, request_timeout_s=args.timeout)
    if getattr(args, "concurrency", None) is not None:
        run = dataclasses.replace(run, concurrency=args.concurrency)
    if getattr(args, "limit", None) is not None:
        run = dataclasses.replace(run, limit=args.limit)
    envs = o.key_envs(getattr(args, "api_key_env", None) or [])
    o.check_key_servers(envs, [s.name for s in cfg.servers()])
    refusals = {s.name: key_refusal(cfg, s) for s in cfg.servers()}
    if reference_only:
        asked = cfg.reference.name
        refusals = {
            n: why or (None if n == asked else "this command asks the reference alone")
            for n, why in refusals.items()
        }
    o.check_key_takers(envs, refusals)

    def keyed(spec: Any) -> Any:
        if spec is None or key_refusal(cfg, spec) is not None:
            return spec
        var = o.key_env_for(envs, spec.name)
        return dataclasses.replace(spec, api_key_env=var) if var else spec

    targets = tuple(
        dataclasses.replace(t, server=keyed(t.server), golden=keyed(t.golden)) for t in cfg.targets
    )
    return dataclasses.replace(cfg, run=run, reference=keyed(cfg.reference), targets=targets)


def key_refusal(cfg: RunConfig, spec: Any) -> str | None:
    """Why `spec` takes no key from --api-key-env (None: it takes one): only a running url server
    whose table names no api_key_env is given one; the flag does nothing for any other server."""
    if cfg.baseline is not None and spec is cfg.reference:
        return "it is a recorded baseline, which is sent no request"
    if spec.kind != "url":
        return f"it is launched ({spec.kind}), and a launched server's key comes from its table's api_key_env"
    if spec.api_key_env is not None:
        return f"its table names api_key_env = {spec.api_key_env!r}, which the flag does not override"
    return None


def run(args: argparse.Namespace) -> int:
    from difftest.runner import RunOptions

    o.positive("--concurrency", args.concurrency)
    o.positive("--limit", args.limit)
    o.positive("--timeout", args.timeout)
    cfg = with_overrides(load_config(args.config), args)
    out = args.out or cfg.run.output_dir
    if args.out is None:  # -o is checked as it is parsed
        o.check_folder("run.output_dir", out)
    opts = RunOptions(out_dir=out, resume=args.resume, concurrency=args.concurrency, limit=args.limit)
    return execute_and_finish(cfg, opts, as_json=args.json)
