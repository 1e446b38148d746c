"""The differ's own throughput and memory, against two in-process servers that answer instantly.

Why: with real servers the differ's cost hides behind model time, until a 20k-prompt nightly run
spends minutes in sacreBLEU or a per-prompt list grows without bound. Here the servers cost almost
nothing, so what is left is the differ: CompletionClient (httpx, semaphore, JSON), `collect`
(parse every logprobs block, align echoes), `scoring` (token match, TIE/DRIFT/WRONG, top-k KL with
bounds per position) and `aggregate_prompts` (BLEU/chrF, bootstrap CIs).

The "servers" are an `httpx.MockTransport` in this process (no sockets): a seeded table model
whose logprobs depend on the last two tokens (context hashed into `ROWS` rows), serving
`/v1/completions` (greedy, top-k logprobs keyed "token_id:N", echo with max_tokens=0, text
offsets) and `/tokenize`. The target's table is the reference's plus seeded noise, so prompts
diverge (TIE / DRIFT / WRONG), KL is non-zero and BLEU/chrF have real work. The time spent inside
the handlers is measured and subtracted ("differ only"), and scoring is also timed on its own
from the collected responses, so the table shows where time goes.

Memory: each N runs in a fresh subprocess; peak RSS growth (getrusage) is measured from a
baseline taken after imports and server setup, and `--tracemalloc` adds Python-heap peak and the
top retained allocation sites at the end (what grows with N).

    python bench/differ.py [--prompts 1000,5000,20000] [--max-tokens 32] [--k 5] [--cache]
                           [--tracemalloc] [--profile] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difftest.cache import ResponseCache  # noqa: E402
from difftest.collect import force_all, generate_all, prompt_token_ids  # noqa: E402
from difftest.metrics.aggregate import aggregate_prompts  # noqa: E402
from difftest.prompts import Prompt  # noqa: E402
from difftest.runner import CHUNK_PROMPTS  # noqa: E402  (the runner's chunk size)
from difftest.scoring import DepthTally, compared_depths, finish_comparison, score_prompts  # noqa: E402
from difftest.session import ClientOptions, Server, Session  # noqa: E402

URL = "http://instant.invalid"
VOCAB = 512
ROWS = 4096  # context rows: (last two ids) hashed; enough that greedy chains do not loop at once
MODEL = "instant"


# ---------------------------------------------------------------- the instant servers
class InstantModel:
    """Seeded table: log-softmax rows of [ROWS, VOCAB]; top-k JSON fragments precomputed per row."""

    def __init__(self, seed: int, k: int, noise: float = 0.0) -> None:
        z = np.random.default_rng(seed).standard_normal((ROWS, VOCAB)) * 2.0
        if noise:
            z = z + np.random.default_rng(seed + 7919).standard_normal((ROWS, VOCAB)) * noise
        z -= z.max(axis=1, keepdims=True)
        self.lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        top = np.argsort(-self.lp, axis=1, kind="stable")[:, :k]
        self.argmax = top[:, 0].tolist()
        self.top_ids = [set(r) for r in top.tolist()]
        self.top_json = [
            ", ".join(f'"token_id:{t}": {float(self.lp[r, t])!r}' for t in top[r].tolist())
            for r in range(ROWS)
        ]

    @staticmethod
    def row(a: int, b: int) -> int:
        return (a * 1_000_003 + b * 7919 + 12345) % ROWS


class InstantServer:
    """One side: an `httpx.MockTransport` handler that builds the response JSON by string joins."""

    def __init__(self, model: InstantModel, words: list[str]) -> None:
        self.model = model
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}
        self.busy_s = 0.0  # time spent in the handler: the "server", excluded from differ-only numbers
        self.requests = 0

    def tokenize(self, text: str) -> list[int]:
        """Our prompts are " word" pieces; any other text (the conformance probes) maps each
        space-separated piece to a fixed id, so that probing works and stays deterministic."""
        return [self.ids.get(" " + w, zlib.crc32(w.encode()) % VOCAB) for w in text.split(" ")[1:]]

    def handle(self, request: httpx.Request) -> httpx.Response:
        t0 = time.perf_counter()
        self.requests += 1
        path = request.url.path
        if path == "/v1/completions":
            body = self._completion(json.loads(request.content))
        elif path == "/tokenize":
            ids = self.tokenize(json.loads(request.content)["prompt"])
            body = json.dumps({"tokens": ids, "count": len(ids)})
        elif path == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self.busy_s += time.perf_counter() - t0
            return httpx.Response(404, json={"error": {"message": "Not Found"}})
        resp = httpx.Response(200, content=body.encode(), headers={"content-type": "application/json"})
        self.busy_s += time.perf_counter() - t0
        return resp

    def _completion(self, req: dict) -> str:
        m, words = self.model, self.words
        prompt = req["prompt"]
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        echo = bool(req.get("echo"))
        ctx = list(ids)
        gen = []
        for _ in range(int(req.get("max_tokens", 16))):
            tok = m.argmax[m.row(ctx[-1], ctx[-2] if len(ctx) > 1 else -1)]
            gen.append(tok)
            ctx.append(tok)
        shown_from = 0 if echo else len(ids)
        toks, lps, tops, offs, off = [], [], [], [], 0
        for i in range(shown_from, len(ctx)):
            tok = ctx[i]
            toks.append(f'"token_id:{tok}"')
            offs.append(str(off))
            off += len(words[tok])
            if i == 0:
                lps.append("null")
                tops.append("null")
                continue
            r = m.row(ctx[i - 1], ctx[i - 2] if i > 1 else -1)
            lp = repr(float(m.lp[r, tok]))
            lps.append(lp)
            extra = "" if tok in m.top_ids[r] else f', "token_id:{tok}": {lp}'
            tops.append("{" + m.top_json[r] + extra + "}")
        text = "".join(words[t] for t in (ctx if echo else gen))
        block = (
            f'{{"tokens": [{", ".join(toks)}], "token_logprobs": [{", ".join(lps)}], '
            f'"top_logprobs": [{", ".join(tops)}], "text_offset": [{", ".join(offs)}]}}'
        )
        return (
            f'{{"id": "cmpl-{self.requests}", "object": "text_completion", "model": "{MODEL}", '
            f'"choices": [{{"index": 0, "text": {json.dumps(text)}, "logprobs": {block}, '
            f'"finish_reason": "length"}}]}}'
        )


def make_words(seed: int) -> list[str]:
    """VOCAB distinct " word" pieces (leading space, no inner space): tokenizing is a split."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: dict[str, None] = {}
    while len(out) < VOCAB:
        out[" " + "".join(rng.choice(letters, size=int(rng.integers(1, 8))))] = None
    return list(out)


def make_prompts(n: int, words: list[str], seed: int) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    return [
        Prompt(
            id=f"p{i}",
            prompt="".join(words[t] for t in rng.integers(0, VOCAB, size=int(rng.integers(4, 24)))),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- one measured run
def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def session(
    servers: dict[str, InstantServer], args: argparse.Namespace, cache: ResponseCache | None
) -> Session:
    return Session(
        [Server(name, URL, transport=httpx.MockTransport(srv.handle), cache_identity={"bench": name})
         for name, srv in servers.items()],
        ClientOptions(concurrency=args.concurrency, cache=cache),
    )  # fmt: skip


async def _collect_and_score(
    servers: dict[str, InstantServer],
    prompts: list[Prompt],
    args: argparse.Namespace,
    cache: ResponseCache | None,
) -> dict[str, Any]:
    """As the runner does it: per chunk generate, force and score, drop the raw responses."""
    out: dict[str, Any] = {
        "collect_s": 0.0, "score_s": 0.0, "diffs": [], "unforced": [], "first_error": None, "depths": DepthTally(args.k)
    }  # fmt: skip
    async with session(servers, args, cache) as s:
        ref, tgt = s["ref"], s["tgt"]
        if not (ref.caps.int_prompts and ref.caps.token_id_strings and ref.caps.logprobs_cap >= args.k):
            raise SystemExit(
                f"the instant server lost a feature the runner's fast path needs: {ref.caps.warnings}"
            )
        for srv in servers.values():  # probing is a per-run constant: not counted as server time
            srv.requests, srv.busy_s = 0, 0.0
        ids: dict[str, list[int] | None] = {}

        async def ref_ids(p: Prompt) -> list[int] | None:  # the baseline's ids, shared by both sides
            if p.id not in ids:
                ids[p.id] = await prompt_token_ids(ref, p.prompt)
            return ids[p.id]

        for start in range(0, len(prompts), CHUNK_PROMPTS):
            chunk = prompts[start : start + CHUNK_PROMPTS]
            ta = time.perf_counter()
            gen = dict(zip(("ref", "tgt"), await asyncio.gather(
                *(generate_all(ep, chunk, max_tokens=args.max_tokens, k=args.k, seed=0) for ep in (ref, tgt))
            ), strict=True))  # fmt: skip
            forced = [await force_all(ep, chunk, gen["ref"], k=args.k, as_ids=True, prompt_ids=ref_ids)
                      for ep in (ref, tgt)]  # fmt: skip
            tb = time.perf_counter()
            d, u = score_prompts(chunk, gen["ref"], gen["tgt"], ref_forced=forced[0], tgt_forced=forced[1],
                                 tie_margin=0.05, k=args.k)  # fmt: skip
            out["diffs"] += d
            out["unforced"] += u
            out["depths"].merge(compared_depths(d, forced[0], forced[1], k=args.k))  # as the runner
            out["first_error"] = out["first_error"] or gen["ref"][chunk[0].id].error
            del gen, forced
            ids.clear()
            out["collect_s"] += tb - ta
            out["score_s"] += time.perf_counter() - tb
    return out


def run_once(n: int, args: argparse.Namespace) -> dict[str, Any]:
    words = make_words(1)
    ref_model = InstantModel(seed=2, k=args.k)
    tgt_model = InstantModel(seed=2, k=args.k, noise=args.noise)
    servers = {"ref": InstantServer(ref_model, words), "tgt": InstantServer(tgt_model, words)}
    prompts = make_prompts(n, words, seed=3)
    if args.tracemalloc:
        tracemalloc.start(4)
    rss0 = _rss_mib()
    cache = ResponseCache(Path(args.tmp) / f"cache-{n}.sqlite") if args.cache else None
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    # per chunk collect, force and score, drop the raw responses; then aggregate
    res = asyncio.run(_collect_and_score(servers, prompts, args, cache))
    collect_s, score_s, diffs, unforced = res["collect_s"], res["score_s"], res["diffs"], res["unforced"]
    first_error = res["first_error"]
    t0 = 0.0
    t1 = collect_s
    tc = time.perf_counter()
    comp = finish_comparison("accuracy", "ref", "tgt", diffs, unforced=unforced, seed=0, depths=res["depths"])
    t2 = t1 + score_s + (time.perf_counter() - tc)
    rss1 = _rss_mib()
    live = len(gc.get_objects())  # containers the cyclic GC must scan on every full collection
    # the split: aggregate_prompts again over the same PromptDiffs (same result), timed on its own
    ta = time.perf_counter()
    aggregate_prompts(comp.prompts, seed=0)
    aggregate_s = time.perf_counter() - ta
    if prof:
        prof.disable()
    missing = [
        k
        for k in ("token_match", "kl_mean", "kl_upper_mean", "top1_agreement", "bleu", "chrf", "kl_depth_min")
        if k not in comp.aggregate
    ] + [k for k in ("token_match", "kl_mean") if k not in comp.ci]
    if missing or comp.aggregate["failed_requests"]:  # a bench that skipped a metric would flatter the differ
        raise SystemExit(
            f"metrics not measured: {missing}; failed: {comp.aggregate['failed_requests']}; "
            f"warnings: {comp.warnings[:2]}; e.g. {first_error}"
        )
    out: dict[str, Any] = {
        "prompts": n,
        "requests": sum(s.requests for s in servers.values()),
        "server_s": sum(s.busy_s for s in servers.values()),
        "collect_s": t1 - t0,
        "scoring_s": t2 - t1,  # build_comparison: score_prompt per prompt + aggregate_prompts
        "aggregate_s": aggregate_s,
        "rss_base_mib": rss0,
        "rss_peak_mib": rss1,
        "gc_objects": live,
        "agg": {
            k: comp.aggregate[k] for k in ("token_match", "kl_mean", "bleu", "chrf", "tie", "drift", "wrong")
        },
    }
    out["score_prompts_s"] = max(0.0, out["scoring_s"] - out["aggregate_s"])
    out["e2e_s"] = out["collect_s"] + out["scoring_s"]
    out["differ_s"] = out["e2e_s"] - out["server_s"]
    if args.tracemalloc:
        snap = tracemalloc.take_snapshot()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["py_peak_mib"] = peak / 2**20
        out["retained_top"] = [
            f"{s.size / 2**20:.1f} MiB {s.traceback[0].filename.split('/')[-1]}:{s.traceback[0].lineno}"
            for s in snap.statistics("lineno")[:8]
        ]
    if prof:
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(25)
    del comp
    if cache is not None:
        cache.close()
    return out


# ---------------------------------------------------------------- table
def _rate(n: int, s: float) -> str:
    return f"{n / s:,.0f}" if s > 0 else "inf"


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = ("prompts", "e2e p/s", "differ p/s", "scoring p/s", "collect s", "server s", "score_prompt s",
            "aggregate s", "peak RSS MiB", "RSS growth MiB", "KiB/prompt")  # fmt: skip
    print(" | ".join(cols))
    print(" | ".join("-" * len(c) for c in cols))
    for r in rows:
        growth = r["rss_peak_mib"] - r["rss_base_mib"]
        cells = (
            f"{r['prompts']:,}", _rate(r["prompts"], r["e2e_s"]), _rate(r["prompts"], r["differ_s"]),
            _rate(r["prompts"], r["scoring_s"]), f"{r['collect_s']:.2f}", f"{r['server_s']:.2f}",
            f"{r['score_prompts_s']:.2f}", f"{r['aggregate_s']:.2f}", f"{r['rss_peak_mib']:.0f}",
            f"{growth:.0f}", f"{growth * 1024 / r['prompts']:.1f}",
        )  # fmt: skip
        print(" | ".join(cells))
    for r in rows:
        if "py_peak_mib" in r:
            print(
                f"\n{r['prompts']:,} prompts: Python heap peak {r['py_peak_mib']:.0f} MiB; retained at the end:"
            )
            for line in r["retained_top"]:
                print("   ", line)
    print(
        "\ne2e = CompletionClient + collect (generate + teacher-forced echoes) + scoring, servers included;"
        "\ndiffer = e2e minus the time inside the instant servers' handlers; scoring = per-chunk scoring on"
        "\ncollected responses (score_prompt per prompt + aggregate_prompts: BLEU/chrF, bootstrap CIs)."
        "\nRSS growth = peak RSS minus the RSS after imports and server setup, fresh process per row."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="1000,5000,20000", help="comma-separated prompt counts")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=5, help="top-k logprobs")
    ap.add_argument("--noise", type=float, default=0.1, help="target's logit noise (divergences, KL)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--cache", action="store_true", help="also write every response to sqlite, as `run` does")
    ap.add_argument("--tracemalloc", action="store_true", help="Python heap peak and top retained sites")
    ap.add_argument("--profile", action="store_true", help="cProfile the run (to stderr)")
    ap.add_argument("--gc-off", action="store_true", help="diagnostic: run with the cyclic GC disabled")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child is not None:
        if args.gc_off:
            gc.disable()
        print(json.dumps(run_once(args._child, args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.prompts.split(",")):
            cmd = [sys.executable, __file__, "--_child", str(n), "--tmp", tmp, "--max-tokens", str(args.max_tokens),
                   "--k", str(args.k), "--noise", str(args.noise), "--concurrency", str(args.concurrency)]  # fmt: skip
            cmd += [f for f, on in (("--cache", args.cache), ("--tracemalloc", args.tracemalloc),
                                    ("--profile", args.profile), ("--gc-off", args.gc_off)) if on]  # fmt: skip
            done = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print_table(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bench": "differ", "args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
