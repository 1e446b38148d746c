"""`difftest probe URL [--endpoint chat]`: the conformance / capability table of one server.

Exit 1 when a check is FAIL (the differ will run degraded against this server), else 0."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from difftest import aio
from difftest.cli import options as o

HELP = "conformance / capability table of one server"
DEFAULT_TIMEOUT_S = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", type=o.http_url, help="the server's base URL (http://host:port)")
    p.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="probe /v1/completions or /v1/chat/completions, as a run with that endpoint does "
        "(default: completions)",
    )
    o.add_keys(p)
    o.add_jobs(p, default=4)
    o.add_timeout(p, f"{DEFAULT_TIMEOUT_S:g}")
    o.add_json(p)


def run(args: argparse.Namespace) -> int:
    from difftest.client import CompletionClient
    from difftest.conformance import FAIL, probe

    o.positive("--timeout", args.timeout)
    o.positive("--concurrency", args.concurrency)
    envs = o.key_envs(args.api_key_env)
    o.check_key_servers(envs, ["server"])
    key = o.key_for(envs, "server")

    async def go() -> Any:
        async with CompletionClient(
            args.url, name="server", api_key=key, max_retries=1,
            timeout_s=args.timeout or DEFAULT_TIMEOUT_S, concurrency=args.concurrency,
        ) as client:  # fmt: skip
            if args.endpoint == "chat":  # the probe `compare --endpoint chat` runs
                from difftest.chat import probe_chat

                return await probe_chat(client)
            return await probe(client)

    caps = aio.run(go())
    code = 1 if any(status == FAIL for _, status, _ in caps.table()) else 0
    if args.json:
        o.emit_json(
            {
                "url": args.url,
                "endpoint": caps.api,
                "exit_code": code,
                "checks": [{"check": c, "status": s, "detail": d} for c, s, d in caps.table()],
                "warnings": list(caps.warnings),
                "capabilities": {k: v for k, v in caps.to_dict().items() if k not in ("checks", "warnings")},
            }
        )
        return code
    over = " over /v1/chat/completions" if caps.api == "chat" else ""
    table = Table(title=f"capabilities of {args.url}{over}")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for check, status, detail in caps.table():
        table.add_row(check, status, detail)
    con = o.console()
    con.print(table)
    for w in caps.warnings:
        con.print(f"warning: {w}", style="yellow")
    return code
