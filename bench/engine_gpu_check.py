"""One-shot GPU check of the engine: CUDA-graph decode == eager decode, then throughput against HF.

Run on the GPU machine (about 3-4 minutes on an H200; hard limit --timeout, default 230 s):

    python bench/engine_gpu_check.py --out engine_gpu.json

Parts, each recorded in the JSON as soon as it is done (a timeout keeps what was measured):
  1. correctness (smollm2-135m, float16): the same prompts, submitted together so the batch
     composition is the same, through an engine with graphs and one without; the graph engine
     runs each composition twice (first run: eager first calls and captures; second: replays).
     PASS = identical greedy tokens in every composition, including one where sequences of
     different lengths join and leave, and graphs were really replayed.
  2. throughput: tokens/s and ms/step at batch 1/8/32/128, graph and eager, HF generate beside.
  3. quantized (int8, Triton backend): the same graph == eager check, and graphs replayed
     (i.e. the Triton kernels ran inside the graphs).
  4. HTTP (bench/load.py --mode throughput, 32 clients, logprobs off and 5), unless --no-http.
Exit code 0 = every check passed, 1 = a check failed, 2 = no CUDA device, 3 = timed out.
Fallback if graphs fail on the device: serve with `--no-cuda-graphs` or DIFFTEST_CUDA_GRAPHS=0.

`--fused` runs only the fused-decode comparison (server_shim/fused_decode.py; about a minute):
  a. the kernel's self-check passed on the device (else FAIL: the engine would decode plainly);
  b. with the path on, graph == eager greedy tokens in every composition (must hold: both launch
     the same kernels) and graphs replayed; the attention kernel launched, and the rotary kernel
     too where the model's rotary was swapped (DIFFTEST_FUSED_ROPE=0 keeps HF's);
  c. fused vs plain greedy tokens, 32 prompts x 64 tokens with logprobs: sequences identical,
     mean common prefix, and the largest |logprob| difference while they agree (reported; the
     kernel rounds differently, so not required equal; FAIL only when the prefix is under half
     or a logprob differs by more than 1 nat: numbers that wrong mean a broken kernel);
  d. tok/s and ms/step at batch 1/32/128, plain graph engine vs fused graph engine.
Fallback if the fused path misbehaves: serve with `--no-fused-decode` or DIFFTEST_FUSED_DECODE=0 (it is on by default on a GPU).
`--device cpu --model tiny-llama` runs the same flow on a CPU (graph and eager are both eager).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import bench_engine, bench_hf, prompts  # noqa: E402

from server_shim.engine import Engine, SamplingParams  # noqa: E402
from server_shim.launch import shim_env  # noqa: E402
from server_shim.models import load_model  # noqa: E402

RESULT: dict = {"checks": {}, "throughput": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}


class Timeout(Exception):
    pass


def timed_batches(
    engines: dict[str, Engine], batches: list[int], tokens: int, deadline: float
) -> Iterator[dict]:
    """A row per batch size, every engine's tok/s and ms/step in it, until the time budget is spent."""
    for b in batches:
        if time.monotonic() > deadline:
            print(f"(time budget spent: batch {b} and later skipped)")
            return
        yield {"batch": b, **{m: bench_engine(eng, prompts(b), tokens, None) for m, eng in engines.items()}}


def save(path: Path) -> None:
    path.write_text(json.dumps(RESULT, indent=2, default=str) + "\n")


def banner(name: str, ok: bool, detail: str) -> None:
    mark = "PASS" if ok else "FAIL"
    line = f"[{mark}] {name}: {detail}"
    print(("=" * 8 + " " if not ok else "") + line + (" " + "=" * 8 if not ok else ""), flush=True)


def graph_stats(engine: Engine) -> dict:
    g = engine.runner.graphs
    if g is None:
        return {"graphs": False}
    return {"graphs": True, "enabled": g.enabled, "error": g.error, "captures": g.captures, "replays": g.replays,
            "eager_steps": g.eager_steps}  # fmt: skip


def compositions(tok) -> list[tuple[str, list[list[int]], list[SamplingParams]]]:  # noqa: ANN001
    """(name, prompts, params per prompt): uniform batches, and one where lengths differ (join/leave)."""
    out = []
    for b in (1, 8, 32):
        ids = [tok(t)["input_ids"] for t in prompts(b)]
        out.append((f"batch {b}", ids, [SamplingParams(max_tokens=32, ignore_eos=True, logprobs=5)] * b))
    ids = [tok(t)["input_ids"] for t in prompts(24)]
    params = [SamplingParams(max_tokens=4 + (11 * i) % 45, ignore_eos=True) for i in range(24)]
    out.append(("24 mixed lengths", ids, params))
    return out


def run_mixed(engine: Engine, ids: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    import asyncio

    async def go() -> list[list[int]]:
        handles = [engine.submit([p], sp) for p, sp in zip(ids, params, strict=True)]

        async def drain(h) -> list[int]:  # noqa: ANN001
            return [t.token_id async for ev in h.events() if not ev.prompt for t in ev.tokens]

        return list(await asyncio.gather(*(drain(h) for h in handles)))

    return asyncio.run(go())


def graph_vs_eager(name: str, loaded, max_batch: int, fused: bool = False) -> bool:  # noqa: ANN001
    graph = Engine(loaded, max_batch_size=max_batch, cuda_graphs=True, fused_decode=fused)
    eager = Engine(loaded, max_batch_size=max_batch, cuda_graphs=False, fused_decode=fused)
    ok_all = True
    try:
        if fused and not (graph.runner.fused and eager.runner.fused):
            banner(f"{name} fused path on", False, f"switched off: {graph.runner.fused_error}")
            RESULT["checks"][f"{name}: fused path on"] = {"pass": False, "error": graph.runner.fused_error}
            return False
        for comp, ids, params in compositions(loaded.tokenizer):
            run_mixed(graph, ids, params)  # first calls eager, second captures
            before = graph.runner.graphs.replays if graph.runner.graphs else 0
            got = run_mixed(graph, ids, params)
            replayed = (graph.runner.graphs.replays if graph.runner.graphs else 0) - before
            want = run_mixed(eager, ids, params)
            same = sum(a == b for a, b in zip(got, want, strict=True))
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
            cuda = loaded.device.type == "cuda"
            ok = same == len(ids) and (replayed > 0 or not cuda)
            detail = f"{same}/{len(ids)} sequences identical, {replayed} graph replays"
            if first is not None:
                detail += f"; first difference in sequence {first}: {got[first][:8]} vs {want[first][:8]}"
            banner(f"{name} graph == eager, {comp}", ok, detail)
            RESULT["checks"][f"{name}: {comp}"] = {
                "pass": ok,
                "identical": same,
                "of": len(ids),
                "replays": replayed,
            }
            ok_all &= ok
        if fused:  # the function may decline every call (an unexpected kwarg, dtype): then it is plain
            calls = {"graph": graph.runner.fused_calls, "eager": eager.runner.fused_calls}
            rope = {"graph": graph.runner.fused_rope_calls, "eager": eager.runner.fused_rope_calls}
            launched = min(calls.values()) > 0 and (min(rope.values()) > 0 or not graph.runner.fused_rope)
            calls.update({"rope_" + k: v for k, v in rope.items()}, rope_swapped=graph.runner.fused_rope)
            banner(f"{name} kernel launched", launched, f"attention / rotary launches from Python: {calls}")
            RESULT["checks"][f"{name}: kernel launched"] = {"pass": launched, **calls}
            ok_all &= launched
        RESULT["checks"][f"{name}: graph stats"] = graph_stats(graph)
        gs = graph_stats(graph)
        if gs.get("graphs") and not gs.get("enabled"):
            banner(f"{name} graphs", False, f"capture failed, engine fell back to eager: {gs.get('error')}")
            ok_all = False
    finally:
        graph.close()
        eager.close()
    return ok_all


def throughput(loaded, batches: list[int], tokens: int, deadline: float, hf: bool) -> None:  # noqa: ANN001
    engines = {"graph": Engine(loaded, max_batch_size=max(batches), cuda_graphs=True),
               "eager": Engine(loaded, max_batch_size=max(batches), cuda_graphs=False)}  # fmt: skip
    print(
        f"{'batch':>5}  {'graph tok/s':>11}  {'ms/step':>7}  {'eager tok/s':>11}  {'ms/step':>7}  {'HF tok/s':>9}"
    )
    try:
        if hf:
            bench_hf(loaded, prompts(2), 4)
        for row in timed_batches(engines, batches, tokens, deadline):
            b = row["batch"]
            row["hf_tok_s"] = bench_hf(loaded, prompts(b), tokens) if hf else None
            RESULT["throughput"].append(row)
            g, e = row["graph"], row["eager"]
            print(f"{b:>5}  {g['tok_s']:>11.1f}  {g['ms_step']:>7.2f}  {e['tok_s']:>11.1f}  {e['ms_step']:>7.2f}  "
                  f"{row['hf_tok_s'] or 0:>9.1f}", flush=True)  # fmt: skip
        RESULT["throughput_graph_stats"] = graph_stats(engines["graph"])
        # logprobs=5 at batch 32: what the top-k path costs
        if time.monotonic() < deadline and 32 in batches:
            RESULT["throughput_logprobs5_batch32"] = bench_engine(engines["graph"], prompts(32), tokens, 5)
            print(f"batch 32, logprobs=5, graph: {RESULT['throughput_logprobs5_batch32']['tok_s']:.1f} tok/s")
    finally:
        for eng in engines.values():
            eng.close()


def run_detail(engine: Engine, ids: list[list[int]], tokens: int) -> list[list[tuple[int, float]]]:
    """Greedy (token id, logprob) per generated token, every prompt submitted together."""
    import asyncio

    params = SamplingParams(max_tokens=tokens, ignore_eos=True, logprobs=1)

    async def go() -> list[list[tuple[int, float]]]:
        handles = [engine.submit([p], params) for p in ids]

        async def drain(h) -> list[tuple[int, float]]:  # noqa: ANN001
            return [(t.token_id, t.logprob) async for ev in h.events() if not ev.prompt for t in ev.tokens]

        return list(await asyncio.gather(*(drain(h) for h in handles)))

    return asyncio.run(go())


def fused_vs_plain(loaded, tokens: int) -> bool:  # noqa: ANN001 - LoadedModel
    """Greedy tokens and logprobs of the fused graph engine against the plain one (reported)."""
    ids = [loaded.tokenizer(t)["input_ids"] for t in prompts(32)]
    got: dict[str, list] = {}
    for mode in ("plain", "fused"):
        eng = Engine(loaded, max_batch_size=32, cuda_graphs=True, fused_decode=(mode == "fused"))
        try:
            run_detail(eng, ids, 4)  # first calls eager, captures
            got[mode] = run_detail(eng, ids, tokens)
        finally:
            eng.close()
    same, prefix, lp_diff = 0, [], 0.0
    for a, b in zip(got["plain"], got["fused"], strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x[0] != y[0]), len(a))
        same += n == len(a)
        prefix.append(n / len(a))
        lp_diff = max([lp_diff] + [abs(x[1] - y[1]) for x, y in zip(a[:n], b[:n], strict=True)])
    mean_prefix = sum(prefix) / len(prefix)
    ok = mean_prefix >= 0.5 and lp_diff <= 1.0
    detail = (f"{same}/{len(ids)} sequences identical over {tokens} tokens, mean common prefix "
              f"{100 * mean_prefix:.1f}%, max |logprob diff| while equal {lp_diff:.3g}")  # fmt: skip
    banner("fused vs plain greedy tokens (reported; rounding differs)", ok, detail)
    RESULT["checks"]["fused vs plain tokens"] = {"pass": ok, "identical": same, "of": len(ids),
                                                 "mean_prefix": mean_prefix, "max_logprob_diff": lp_diff}  # fmt: skip
    return ok


def fused_throughput(loaded, batches: list[int], tokens: int, deadline: float) -> None:  # noqa: ANN001
    engines = {m: Engine(loaded, max_batch_size=max(batches), cuda_graphs=True, fused_decode=(m == "fused"))
               for m in ("plain", "fused")}  # fmt: skip
    print(
        f"{'batch':>5}  {'plain tok/s':>11}  {'ms/step':>7}  {'fused tok/s':>11}  {'ms/step':>7}  {'speedup':>7}"
    )
    rows = RESULT.setdefault("fused_throughput", [])
    try:
        for row in timed_batches(engines, batches, tokens, deadline):
            b = row["batch"]
            rows.append(row)
            p, f = row["plain"], row["fused"]
            print(f"{b:>5}  {p['tok_s']:>11.1f}  {p['ms_step']:>7.2f}  {f['tok_s']:>11.1f}  {f['ms_step']:>7.2f}  "
                  f"{f['tok_s'] / p['tok_s']:>6.2f}x", flush=True)  # fmt: skip
        RESULT["fused_graph_stats"] = graph_stats(engines["fused"])
        RESULT["fused_kernel_calls"] = {
            "attention": engines["fused"].runner.fused_calls,
            "rotary": engines["fused"].runner.fused_rope_calls,
        }
    finally:
        for eng in engines.values():
            eng.close()


def fused_part(args: argparse.Namespace, loaded, end: float) -> bool:  # noqa: ANN001
    """--fused: a-d of the module docstring."""
    name = "fused " + ("fp16" if args.dtype == "float16" else args.dtype)
    ok = graph_vs_eager(name, loaded, 32, fused=True)
    save(args.out)
    if not ok and RESULT["checks"].get(f"{name}: fused path on", {}).get("pass") is False:
        return False  # the path is off on this device: nothing more to compare
    ok &= fused_vs_plain(loaded, min(64, args.tokens))
    save(args.out)
    fused_throughput(loaded, [int(b) for b in args.fused_batches.split(",")], args.tokens, end - 10)
    return ok


def http(args: argparse.Namespace, out: Path, remaining: float) -> bool:
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--mode", "throughput", "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--clients", "32", "--tokens", "128",
           "--per-client", "4", "--json", str(out)]  # fmt: skip
    # the launcher's environment: this checkout prepended to PYTHONPATH, never replacing it (on the
    # H200 the web stack lived there, and the load server died with "No module named uvicorn")
    env = shim_env({})
    # its own process group: on a timeout the launched server goes down with it, not left holding the GPU
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=max(remaining, 10))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        banner("HTTP load", False, "timed out (killed with its server)")
        RESULT["http"] = {"timeout": True}
        return False
    print(text[-2500:])
    ok = proc.returncode == 0 and out.is_file()
    RESULT["http"] = json.loads(out.read_text()) if out.is_file() else {"output": text[-2000:]}
    banner("HTTP load: every request answered 200", ok, f"exit {proc.returncode}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="write the JSON here")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--timeout", type=int, default=240, help="hard limit for the whole check, seconds")
    ap.add_argument("--no-quant", action="store_true", help="skip the int8 / Triton part")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP part")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    ap.add_argument("--fused", action="store_true", help="only the fused-decode comparison (docstring: a-d)")
    ap.add_argument("--fused-batches", default="1,32,128", help="batch sizes of --fused's throughput part")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu --model tiny-llama for a dry run)")
        return 2
    t0 = time.monotonic()
    end = t0 + args.timeout

    def on_alarm(signum, frame) -> None:  # noqa: ANN001
        raise Timeout(f"--timeout {args.timeout}s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.timeout)
    killer = threading.Timer(args.timeout + 60, lambda: (save(args.out), os._exit(3)))
    killer.daemon = True
    killer.start()
    RESULT["args"] = vars(args) | {"out": str(args.out)}
    RESULT["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
    ok = True
    code = 0
    try:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        print(
            f"{args.model} {args.dtype} on {loaded.device} loaded in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        if args.fused:
            ok &= fused_part(args, loaded, end)
            return finish(args, t0, 0 if ok else 1)
        ok &= graph_vs_eager("fp16" if args.dtype == "float16" else args.dtype, loaded, 32)
        save(args.out)
        batches = [int(b) for b in args.batches.split(",")]
        # leave room for the quantized check and HTTP
        throughput(loaded, batches, args.tokens, end - 120, not args.no_hf)
        save(args.out)
        if not args.no_http and time.monotonic() < end - 70:
            ok &= http(args, args.out.with_suffix(".http.json"), min(110.0, end - time.monotonic() - 30))
        if not args.no_quant and time.monotonic() < end - 45:
            ok &= quant_part(args, end)
        elif not args.no_quant:
            print("int8/triton part skipped: not enough of --timeout left", flush=True)
            RESULT["quant"] = {"skipped": "time budget"}
        code = 0 if ok else 1
    except Timeout as exc:
        print(f"TIMEOUT: {exc}; partial results in {args.out}", flush=True)
        RESULT["timeout"] = str(exc)
        code = 3
    except Exception as exc:  # noqa: BLE001 - record and fail loudly
        traceback.print_exc()
        RESULT["error"] = f"{type(exc).__name__}: {exc}"
        banner("engine GPU check", False, RESULT["error"])
        code = 1
    finally:
        signal.alarm(0)
    return finish(args, t0, code)


def quant_part(args: argparse.Namespace, end: float) -> bool:
    """int8 / Triton: graph == eager, and graphs replayed. A timeout here fails this part only."""
    from server_shim.quant.linear import quantize_model

    try:
        q = load_model(args.model, dtype=args.dtype, device=args.device)
        summary = quantize_model(q.model, scheme="int8", backend="triton")
        q.quant = "int8"
        RESULT["quant"] = {"scheme": "int8", "backend": "triton", "modules": len(summary.modules)}
        ok = graph_vs_eager("int8/triton", q, 32)
        save(args.out)
        if time.monotonic() < end - 15:
            eng = Engine(q, max_batch_size=32, cuda_graphs=True)
            try:
                RESULT["quant"]["batch32_graph"] = bench_engine(eng, prompts(32), args.tokens, None)
                RESULT["quant"]["graph_stats"] = graph_stats(eng)
                print(f"int8/triton batch 32 graph: {RESULT['quant']['batch32_graph']['tok_s']:.1f} tok/s")
            finally:
                eng.close()
        del q
    except Timeout:
        print(
            "TIMEOUT in the int8/triton part (Triton autotuning is slow on a cold cache); earlier parts stand",
            flush=True,
        )
        RESULT.setdefault("quant", {})["timeout"] = True
        return False
    return ok


def finish(args: argparse.Namespace, t0: float, code: int) -> int:
    RESULT["pass"] = code == 0
    RESULT["seconds"] = round(time.monotonic() - t0, 1)
    save(args.out)
    print("\nsummary:")
    for name, check in RESULT["checks"].items():
        if "pass" in check:
            print(f"  {'PASS' if check['pass'] else 'FAIL'}  {name}")
    for part in ("throughput_graph_stats", "fused_graph_stats", "fused_kernel_calls"):
        if part in RESULT:
            print(f"  {part}: {RESULT[part]}")
    if "quant" in RESULT:
        print(
            f"  int8/triton: {RESULT['quant'].get('graph_stats') or RESULT['checks'].get('int8/triton: graph stats')}"
        )
    print(
        "\n"
        + ("PASS" if code == 0 else "FAIL")
        + f": engine GPU check ({RESULT['seconds']} s), JSON in {args.out}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
