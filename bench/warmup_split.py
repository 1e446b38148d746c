"""Where a quantized server's cold start goes: Triton compiling the tuner's candidates, or timing them.

    python bench/warmup_split.py                          # GPU: smollm2-135m's GEMM shapes, int4-g128
    python bench/warmup_split.py --schemes fp8-block int4-g128 mxfp4 --dtype bf16

A GPU gate starts its servers side by side and their warm-ups (server_shim/quant/warmup.py) take
turns under one lock, so a fresh machine waits for the sum of them (408 s for configs/gpu-bf16.toml's
18 servers on an H200, 2026-12-06). What to speed up depends on what that sum is made of. Each
scheme's warm-up runs here three times, each in a fresh process over random weights of the model's
four GEMM shapes at the M sizes a server warms (no model weights needed):

  cold    an empty Triton kernel cache and an empty tuning cache: compile + time (a fresh machine)
  tuned   Triton's kernels cached, the tuning cache empty: time only (compile share = cold - tuned)
  stored  both cached: what a restart on the same machine costs

`--side-by-side` starts one process per listed scheme at once, as a GPU gate starts its servers
(a scheme listed twice: a second server of it, as the gate's fault controls are), over one empty
Triton cache and one empty tuning file, and times until the last warm-up ends: once with the
compile pass off (DIFFTEST_TRITON_PRECOMPILE=0: every warm-up compiles inside the servers' tuning
lock) and once with it on (they compile side by side, then take turns to time).

Needs a GPU (elsewhere the tuner times nothing and the warm-up is skipped: it says so and exits 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# smollm2-135m: hidden 576, 9 query and 3 key/value heads of 64, MLP 1536 -- (out, in) per linear
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}  # fmt: skip
MAX_ROWS, PREFILL_CHUNK = 32, 2048  # the engine's defaults on a GPU
PHASES = ("cold", "tuned", "stored")

_CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from server_shim.quant import formats as F
from server_shim.quant.linear import QuantLinear
from server_shim.quant.warmup import tuning_active, warm_m_sizes, warm_up
from torch import nn
dev, dt = torch.device("cuda"), {dtype}
if not torch.cuda.is_available() or not tuning_active(dev):
    print(json.dumps({{"skipped": "no GPU"}})); raise SystemExit(0)
g = torch.Generator().manual_seed(0)
mods = nn.ModuleList(
    QuantLinear(F.quantize_weight(torch.randn(o, i, generator=g) * 0.02, {scheme!r}), None, backend="triton")
    for o, i in {shapes!r}
).to(dev)
sizes = warm_m_sizes({rows}, {chunk})
t0 = time.monotonic()
n = warm_up(mods, sizes, dtype=dt, device=dev)
print(json.dumps({{"seconds": time.monotonic() - t0, "linears": n, "m_sizes": sizes}}))
"""


def start_phase(
    scheme: str, dtype: str, triton_cache: Path, tune_cache: Path, **env: str
) -> subprocess.Popen:
    """One warm-up in a fresh process with the given caches (and env)."""
    code = _CHILD.format(root=str(ROOT), dtype=f"torch.{dtype}", scheme=scheme,
                         shapes=sorted(set(SHAPES.values())), rows=MAX_ROWS, chunk=PREFILL_CHUNK)  # fmt: skip
    env = {**os.environ, "TRITON_CACHE_DIR": str(triton_cache), "DIFFTEST_TRITON_TUNE_CACHE": str(tune_cache),
           **env}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def result(proc: subprocess.Popen) -> dict:
    """The warm-up's JSON line, or its last error line."""
    out, err = proc.communicate(timeout=1800)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err or out).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def run_phase(scheme: str, dtype: str, triton_cache: Path, tune_cache: Path) -> dict:
    return result(start_phase(scheme, dtype, triton_cache, tune_cache))


def side_by_side(schemes: list[str], dtype: str) -> dict[str, dict]:
    """Every scheme's warm-up at once over empty caches, compile pass off then on: wall seconds."""
    out: dict[str, dict] = {}
    for precompile in ("0", "1"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            procs = [start_phase(s, dtype, Path(tmp) / "triton", Path(tmp) / "tune.json",
                                 DIFFTEST_TRITON_PRECOMPILE=precompile) for s in schemes]  # fmt: skip
            rows = [result(p) for p in procs]
            wall = time.monotonic() - t0
        errors = [r for r in rows if "error" in r or "skipped" in r]
        out[precompile] = {"wall_s": wall, "warm_ups_s": [r.get("seconds") for r in rows], "errors": errors}
        ends = ", ".join(
            f"{s} {r['seconds']:.0f}" for s, r in zip(schemes, rows, strict=True) if "seconds" in r
        )
        mode = "compile pass on " if precompile == "1" else "compile pass off"
        print(f"side by side, {mode}: all done in {wall:.1f} s (each: {ends}){' FAIL ' + str(errors) if errors else ''}",
              flush=True)  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["int4-g128"])
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    ap.add_argument(
        "--side-by-side", action="store_true", help="the schemes' warm-ups at once, compile pass off / on"
    )
    args = ap.parse_args()
    if args.side_by_side:
        import torch

        if not torch.cuda.is_available():
            print("warm-up skipped (no GPU): nothing is tuned here")
            return 0
        both = side_by_side(args.schemes, args.dtype)
        if args.out:
            args.out.write_text(json.dumps(both, indent=1))
        return 1 if any(v["errors"] for v in both.values()) else 0
    results: dict[str, dict[str, dict]] = {}
    for scheme in args.schemes:
        with tempfile.TemporaryDirectory() as tmp:
            triton_cache, tune_cache = Path(tmp) / "triton", Path(tmp) / "tune.json"
            rows = {}
            for phase in PHASES:
                if phase == "tuned":
                    tune_cache.unlink(missing_ok=True)  # forget the choices, keep the compiled kernels
                rows[phase] = run_phase(scheme, args.dtype, triton_cache, tune_cache)
                if "skipped" in rows[phase]:
                    print(f"{scheme}: warm-up skipped ({rows[phase]['skipped']}): nothing is tuned here")
                    return 0
            results[scheme] = rows
        s = {p: r.get("seconds") for p, r in rows.items()}
        if any(v is None for v in s.values()):
            print(f"{scheme}: FAIL {rows}")
            continue
        print(f"{scheme} {args.dtype}: cold {s['cold']:.1f} s = compile {s['cold'] - s['tuned']:.1f} "
              f"+ tune {s['tuned']:.1f}; stored {s['stored']:.1f} s "
              f"({rows['cold']['linears']} linears at M = {rows['cold']['m_sizes']})", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    failed = [s for s, rows in results.items() if any("error" in r for r in rows.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
