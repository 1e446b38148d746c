"""End to end: the quantized targets of configs/gpu.toml in the shim's engine, legacy vs tuned kernels.

    python bench/quant_e2e.py --out quant_e2e.json           # GPU: ~7.5 min cold, ~2.5 with stored configs
    python bench/quant_e2e.py --model HF_FOLDER --profile     # + kernels / GPU-busy time per decode step
    python bench/quant_e2e.py --device cpu --model tiny-llama --dtype float32 --batches 2 --tokens 4  # smoke

For every quantized target of the config (scheme + backend), the model is loaded, quantized and
served by an Engine (CUDA graphs on a GPU), and greedy decoding is timed at each batch size
(bench/serve.py's bench_engine: a warm-up run, then a timed one). Triton targets run twice, with
the pre-tuning kernels (DIFFTEST_TRITON_KERNELS=legacy) and with the tuned ones (the default), so
the ratio is the end-to-end gain of the kernel work on the same model in the same process; the
unquantized model is the baseline. Before timing, each quantized engine's first greedy tokens are
compared with the unquantized model's at batch 1 (reported: quantization may legitimately change a
near-tie, but a kernel that returns garbage does not share a prefix). The engines are built
directly, without `serve`'s kernel warm-up, so "first request" includes any tuning not stored yet.
For each tuned Triton target the JSON lists the config every GEMM key ran ("triton_configs"), with
the tuner's per-candidate timings where it timed them in this run: a slow target is traced to its
choices from one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import bench_engine, prompts, run_engine  # noqa: E402

from server_shim.engine import Engine, SamplingParams  # noqa: E402
from server_shim.models import load_model  # noqa: E402
from server_shim.quant import kernels, tuning  # noqa: E402
from server_shim.quant.linear import quantize_model  # noqa: E402


def targets(config: Path) -> list[tuple[str, str]]:
    """(scheme, backend) of every quantized target without faults, in config order, once each."""
    seen: list[tuple[str, str]] = []
    for t in tomllib.loads(config.read_text())["target"]:
        key = (t.get("quant", "none"), t.get("backend", "auto"))
        if key[0] != "none" and not t.get("faults") and key not in seen:
            seen.append(key)
    return seen


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def graph_stats(engine: Engine) -> dict:
    """Were the decode steps graph replays? (captures, replays, eager steps; an error turns them off)"""
    g = engine.runner.graphs
    if g is None:
        return {"graphs": False}
    return {"graphs": g.enabled, "error": g.error, "captures": g.captures, "replays": g.replays,
            "eager_steps": g.eager_steps}  # fmt: skip


def profile_steps(engine: Engine, batch: int, tokens: int) -> dict:
    """GPU kernels per decode step and the GPU's busy time per step (torch.profiler): where a step's
    wall time goes -- kernels back to back (busy ~ wall) or gaps between them (launch / host bound)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ids = [engine.loaded.tokenizer(t)["input_ids"] for t in prompts(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    steps0 = engine.stats.decode_steps
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_engine(engine, ids, params)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = max(engine.stats.decode_steps - steps0, 1)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    return {"kernels_per_step": round(len(kernels) / steps, 1), "gpu_busy_us_per_step": round(busy / steps, 1),
            "wall_us_per_step_profiled": round(1e6 * wall / steps, 1)}  # fmt: skip


def measure(args: argparse.Namespace, scheme: str, backend: str, reference: list[int] | None) -> dict:
    """Load, quantize, serve; greedy prefix vs the reference, then tok/s per batch size."""
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    row: dict = {"scheme": scheme, "backend": backend, "impl": kernels.impl() if backend == "triton" else "-"}
    if scheme != "none":
        summary = quantize_model(loaded.model, scheme=scheme, backend=backend)
        loaded.quant = scheme
        row["backend_used"] = sorted(set(summary.modules.values()))
    engine = Engine(
        loaded, max_batch_size=max(args.batches), cuda_graphs=None if args.device == "cuda" else False
    )
    seen = set(tuning.TUNER.used)
    try:
        tok = loaded.tokenizer
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()  # the first request pays the tuning, compiles and graph captures
        greedy = run_engine(engine, [tok(prompts(1)[0])["input_ids"]], params)[0]
        row["first_request_s"] = round(time.perf_counter() - t0, 2)
        row["greedy"] = list(greedy)
        if reference is not None:
            row["prefix_vs_fp"] = f"{common_prefix(reference, list(greedy))}/{len(reference)}"
        for b in args.batches:
            r = bench_engine(engine, prompts(b), args.tokens, None)
            row[f"b{b}_tok_s"], row[f"b{b}_ms_step"] = r["tok_s"], r["ms_step"]
        row["graph_stats"] = graph_stats(engine)
        # the config each of its GEMM keys ran, with the tuner's timings where it timed them
        if row["impl"] == "fast":
            used = {k: v for k, v in tuning.TUNER.used.items() if k not in seen}
            row["triton_configs"] = {k: {"config": v, "tuned_us": tuning.CHOSEN.get(k, {}).get("us")}
                                     for k, v in sorted(used.items())}  # fmt: skip
        if args.profile and args.device == "cuda":
            row["profile_b1"] = profile_steps(engine, 1, args.tokens)
    finally:
        engine.close()
    del loaded
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "gpu.toml")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--profile", action="store_true", help="also kernels and GPU busy time per step, batch 1")
    ap.add_argument("--schemes", default="", help="comma-separated schemes to run (default: every one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        plan = targets(args.config)
        wanted = [x for x in args.schemes.split(",") if x]
        if unknown := set(wanted) - {scheme for scheme, _ in plan}:
            raise ValueError(f"--schemes: not a quantized target of {args.config}: {sorted(unknown)}")
        plan = [t for t in plan if not wanted or t[0] in wanted]
    except (ValueError, OSError, KeyError, tomllib.TOMLDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA / ROCm device: this benchmark times GPU kernels; run it on a GPU machine")
        return 0
    rows: list[dict] = []

    def save() -> None:
        if args.out:
            args.out.write_text(
                json.dumps({"model": args.model, "dtype": args.dtype, "rows": rows}, indent=1)
            )

    t0 = time.time()
    base = measure(args, "none", "auto", None)
    rows.append(base)
    save()
    for scheme, backend in plan:
        impls = ("legacy", "fast") if backend == "triton" else (None,)
        for name in impls:
            kernels.KERNEL_IMPL = name
            rows.append(measure(args, scheme, backend, base["greedy"]))
            save()
        kernels.KERNEL_IMPL = None
    cols = [f"b{b}_tok_s" for b in args.batches]
    print(f"\n{args.model} {args.dtype}, {args.tokens} tokens, {time.time() - t0:.0f} s")
    print(
        f"{'scheme':<12} {'backend':<8} {'kernels':<8} "
        + " ".join(f"{c:>11}" for c in cols)
        + "  greedy prefix  first request"
    )
    for r in rows:
        print(f"{r['scheme']:<12} {r['backend']:<8} {r['impl']:<8} " +
              " ".join(f"{r[c]:>11.1f}" for c in cols) + f"  {r.get('prefix_vs_fp', '-'):>13}  {r['first_request_s']:>6.1f} s")  # fmt: skip
    for r in rows:
        if "profile_b1" in r or not r["graph_stats"].get("graphs"):
            print(f"{r['scheme']:<12} {r['impl']:<8} graphs {r['graph_stats']}  {r.get('profile_b1', '')}")
    for i, r in enumerate(rows):
        if r["impl"] == "fast" and i and rows[i - 1]["impl"] == "legacy":
            gains = ", ".join(f"batch {c[1:-6]} {r[c] / rows[i - 1][c]:.2f}x" for c in cols)
            print(f"tuned / legacy, {r['scheme']}: {gains}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
