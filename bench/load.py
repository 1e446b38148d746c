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

`--mode throughput` measures the engine over HTTP instead: N clients each send `--per-client`
greedy completions of exactly `--tokens` tokens (EOS ignored), once without logprobs and once
with `logprobs=5`; completion tokens/s, p50/p99 latency, and HF `generate` at batch N on the same
model and device, in the same run (the ratio is what to compare across machines):

    python bench/load.py --mode throughput --model smollm2-135m --device cuda --clients 32 --tokens 128
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import BASE  # noqa: E402 - bench/serve.py, the same prompts

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


async def fixed_load(url: str, model: str, clients: int, per_client: int, tokens: int,
                     logprobs: int | None) -> tuple[Tally, float]:  # fmt: skip
    """N clients, each `per_client` greedy completions of exactly `tokens` tokens, back to back."""
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, trust_env=False) as client:

        async def worker(c: int) -> None:
            for r in range(per_client):
                body = {"model": model, "prompt": BASE[(c + r) % len(BASE)], "max_tokens": tokens,
                        "temperature": 0, "ignore_eos": True}  # fmt: skip
                if logprobs is not None:
                    body["logprobs"] = logprobs
                await one(client, "/v1/completions", body, tally)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    return tally, elapsed


def throughput(args: argparse.Namespace, console: Console) -> int:
    """--mode throughput: the engine over HTTP, logprobs off and on, against HF generate."""
    from serve import bench_hf, prompts  # torch only in this mode

    spec = ServerSpec(
        name="load", model=args.model, device=args.device, dtype=args.dtype, startup_timeout_s=600,
        no_cuda_graphs=args.no_cuda_graphs,
        extra_args=("--max-waiting", str(max(args.max_waiting, args.clients * 2)), "--log-level", "warning",
                    "--max-batch-size", str(max(args.clients, 32))),
    )  # fmt: skip
    rows = []
    failed = 0
    with tempfile.TemporaryDirectory() as logs, launch_servers([spec], log_dir=Path(logs)) as servers:
        server = servers["load"]
        for lp in (None, 5):
            # untimed round of the same shape first: graph captures and autotuning are not measured
            asyncio.run(fixed_load(server.url, args.model, args.clients, 1, args.tokens, lp))
            tally, elapsed = asyncio.run(
                fixed_load(server.url, args.model, args.clients, args.per_client, args.tokens, lp)
            )
            failed += sum(v for k, v in tally.status.items() if k != 200) + sum(tally.errors.values())
            rows.append({
                "clients": args.clients, "logprobs": lp, "tokens": args.tokens, "requests": sum(tally.status.values()),
                "tok_s": round(tally.tokens / elapsed, 1), "p50_s": round(pct(tally.latencies, 0.5), 3),
                "p99_s": round(pct(tally.latencies, 0.99), 3), "status": dict(tally.status),
            })  # fmt: skip
    hf = None
    if not args.no_hf:
        from server_shim.models import load_model

        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        bench_hf(loaded, prompts(2), 4)  # warm-up
        hf = round(bench_hf(loaded, prompts(args.clients), args.tokens), 1)
    table = Table(
        title=f"bench/load.py --mode throughput: {args.model} on {args.device}, {args.tokens} tokens"
    )
    for col in (
        "clients",
        "logprobs",
        "HTTP tok/s",
        "p50 s",
        "p99 s",
        f"HF generate tok/s (batch {args.clients})",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["clients"]), str(r["logprobs"]), str(r["tok_s"]), str(r["p50_s"]), str(r["p99_s"]), str(hf)
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"mode": "throughput", "model": args.model, "device": args.device,
                                         "rows": rows, "hf_tok_s": hf}, indent=2) + "\n")  # fmt: skip
    return 1 if failed else 0


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
    p.add_argument("--mode", choices=("mixed", "throughput"), default="mixed")
    p.add_argument(
        "--device", default="cpu", help="the shim's device (and HF generate's, in throughput mode)"
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", type=int, default=64, help="throughput mode: tokens per completion")
    p.add_argument("--per-client", type=int, default=4, help="throughput mode: requests per client")
    p.add_argument("--no-hf", action="store_true", help="throughput mode: skip the HF generate baseline")
    p.add_argument("--no-cuda-graphs", action="store_true", help="the shim decodes eagerly")
    args = p.parse_args()
    console = Console()
    if args.mode == "throughput":
        return throughput(args, console)
    spec = ServerSpec(
        name="load", model=args.model, device=args.device, dtype=args.dtype, startup_timeout_s=300,
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
