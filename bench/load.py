"""Load on a launched shim over HTTP: N concurrent clients, mixed prompt and max_tokens sizes,
logprobs on and off, completions and chat; throughput, latency percentiles, server RSS before and
after, and every non-200 counted by status.

The shim runs as `difftest run` starts it (server_shim.launch, a subprocess on 127.0.0.1). Each
client sends its next request as soon as the last one answered; a 429 (the bounded queue is full)
is counted and retried after its Retry-After, as a well-behaved client would. Bounded in count
(`--requests`) and time (`--max-seconds`: clients stop starting new requests, in-flight ones
finish). A second phase (`--abandon`) starts long requests and drops their connections: the
server must cancel them (its RSS and the following requests' latency show whether it did).

    python bench/load.py [--clients 32] [--requests 400] [--max-seconds 120] [--model tiny-llama]
                         [--max-waiting 256] [--abandon 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.launch import ServerSpec, launch_servers  # noqa: E402

WORDS = (
    "the",
    "model",
    "server",
    "answers",
    "every",
    "request",
    "with",
    "tokens",
    "and",
    "logprobs",
    "while",
    "others",
    "wait",
)
MAX_RETRIES_429 = 20


def rss_mib(pid: int) -> float:
    """Resident set of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_request(rng: random.Random, model: str) -> tuple[str, dict]:
    """A mixed workload: prompts of 4..400 words, max_tokens 1..64, logprobs on for half, a chat
    request in four, streaming in eight."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice([4, 16, 64, 400])))
    max_tokens = rng.choice([1, 8, 16, 64])
    stream = rng.random() < 0.125
    if rng.random() < 0.25:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}  # fmt: skip
        if rng.random() < 0.5:
            body |= {"logprobs": True, "top_logprobs": 5}
        return "/v1/chat/completions", body
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]),
            "seed": rng.randrange(1000), "stream": stream}  # fmt: skip
    if rng.random() < 0.5:
        body["logprobs"] = 5
    return "/v1/completions", body


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)
    retried_429: int = 0
    errors: Counter = field(default_factory=Counter)  # transport errors by type
    tokens: int = 0


async def one(client: httpx.AsyncClient, path: str, body: dict, tally: Tally) -> None:
    start = time.perf_counter()
    for _ in range(MAX_RETRIES_429):
        try:
            resp = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            tally.errors[type(exc).__name__] += 1
            return
        if resp.status_code != 429:
            break
        tally.retried_429 += 1
        await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
    tally.status[resp.status_code] += 1
    if resp.status_code == 200:
        tally.latencies.append(time.perf_counter() - start)
        if not body.get("stream"):
            tally.tokens += resp.json()["usage"]["completion_tokens"]


async def drive(
    url: str, model: str, clients: int, requests: int, max_seconds: float, seed: int
) -> tuple[Tally, float]:
    rng = random.Random(seed)
    work = [make_request(rng, model) for _ in range(requests)]
    tally = Tally()
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, trust_env=False) as client:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{clients} clients", total=len(work))

            async def worker() -> None:
                while work and time.monotonic() < deadline:
                    path, body = work.pop()
                    await one(client, path, body, tally)
                    progress.advance(task)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            elapsed = time.perf_counter() - t0
    return tally, elapsed


async def abandon(url: str, model: str, n: int) -> int:
    """Start n long requests and close their connections after a moment: the server must cancel them.
    Returns how many the server had not finished (all of them, if cancellation is late)."""
    body = {"model": model, "prompt": "tell me a long story", "max_tokens": 2000, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as client:
        tasks = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(n)]
        await asyncio.sleep(1.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return n


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="a shim preset (tiny-llama: random weights, fast)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--requests", type=int, default=400, help="requests in all")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop starting requests after this")
    p.add_argument("--max-waiting", type=int, default=256, help="the shim's queue bound (--max-waiting)")
    p.add_argument("--abandon", type=int, default=16, help="long requests started and dropped (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    console = Console()
    spec = ServerSpec(
        name="load", model=args.model, device="cpu", startup_timeout_s=300,
        extra_args=("--max-waiting", str(args.max_waiting), "--log-level", "warning"),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as logs, launch_servers([spec], log_dir=Path(logs)) as servers:
        server = servers["load"]
        httpx.post(server.url + "/v1/completions", json={"model": args.model, "prompt": "warm up", "max_tokens": 2},
                   timeout=120, trust_env=False)  # fmt: skip
        rss_before = rss_mib(server.pid)
        tally, elapsed = asyncio.run(
            drive(server.url, args.model, args.clients, args.requests, args.max_seconds, args.seed)
        )
        rss_after = rss_mib(server.pid)
        abandoned = asyncio.run(abandon(server.url, args.model, args.abandon)) if args.abandon else 0
        t0 = time.perf_counter()
        after = httpx.post(server.url + "/v1/completions", json={"model": args.model, "prompt": "hi", "max_tokens": 2},
                           timeout=300, trust_env=False)  # fmt: skip
        after_abandon_s = time.perf_counter() - t0
        rss_end = rss_mib(server.pid)
    done = sum(tally.status.values())
    figures = {
        "model": args.model, "clients": args.clients, "requests_sent": done, "seconds": round(elapsed, 2),
        "requests_per_s": round(done / elapsed, 2), "completion_tokens_per_s": round(tally.tokens / elapsed, 1),
        "p50_s": round(pct(tally.latencies, 0.5), 3), "p99_s": round(pct(tally.latencies, 0.99), 3),
        "mean_s": round(statistics.fmean(tally.latencies), 3) if tally.latencies else None,
        "status": dict(sorted(tally.status.items())), "retried_429": tally.retried_429,
        "transport_errors": dict(tally.errors), "rss_before_mib": round(rss_before, 1),
        "rss_after_mib": round(rss_after, 1), "abandoned": abandoned, "rss_end_mib": round(rss_end, 1),
        "request_after_abandon_s": round(after_abandon_s, 3), "after_abandon_status": after.status_code,
    }  # fmt: skip
    table = Table(title=f"bench/load.py: {args.model}, {args.clients} clients")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in figures.items():
        table.add_row(k, str(v))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    failed = sum(v for k, v in tally.status.items() if k != 200) + sum(tally.errors.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
