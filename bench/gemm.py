"""GEMM benchmark (GPU): the Triton kernels of server_shim/quant/kernels.py against torch.

    python bench/gemm.py [--out PATH] [--budget 230] [--full] [--fastacc] [--no-legacy] [--workers N]
    python bench/gemm.py --small-4bit --budget 110 --out PATH   # only the 4-bit rows at M <= 16 (~1.5 min)
    python bench/gemm.py --device cpu        # the checks at small sizes under the Triton interpreter

One command, in this order, and never longer than --budget seconds (a watchdog writes what it has
and exits 3):
1. Config checks, in a pool of worker processes: every candidate config of every Triton kernel
   (quant/tuning.py's lists for this GPU) runs pinned at every timed shape and at two odd ones
   (masks, partial tiles), and is compared with a float64 reference; a wrong config is a FAIL row.
   The workers also leave every compiled kernel in Triton's cache, so step 3 does not compile.
2. Exactness checks (in the pool as well): fp32 outputs (promoted fp8 accumulation, swapped
   block-scale strides, bias, e4m3fnuz), and the activation-quantization kernel bit for bit.
3. Timing at 4096^3, 1024x4096x4096, 16x4096x4096, 1x4096x4096 (--full adds more): torch bf16,
   `torch._scaled_mm`, every Triton kernel through the shim's own dispatch (the tuner picks
   and caches a config at the first call, which is then checked against float64 again), and the
   legacy kernels (DIFFTEST_TRITON_KERNELS=legacy) for fp8-block and int4. Medians of CUDA-graph
   replays (`tuning.time_graph`), so Python launch cost is not counted; every candidate's time per
   tuned key is printed ("tuned ...") and kept in the JSON ("tuned"). Rows of at most 16 (decode)
   are timed a second time with the L2 flushed before every call (`tuning.time_cold`: the weights
   come from HBM, as in a model's decode step and in the tuner's own timing of these rows).
Then a TFLOP/s table, ratios to bf16 and to `_scaled_mm`, the issue's targets (PASS / MISS), and
JSON (--out). Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

# the benchmark times every candidate: choices stored by an earlier process must not stand in for that
os.environ.setdefault("DIFFTEST_TRITON_TUNE_CACHE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gemm_cases as C  # noqa: E402

from server_shim.quant import arch, tuning  # noqa: E402
from server_shim.quant import formats as F  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

SHAPES = [(4096, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096), (1024, 4096, 4096)]  # most important first
# --full: M = 128, and smollm2's GEMMs (gate / up, down; at decode M = 1 also q / o and k / v, where the
# legacy kernels are timed too: batch-1 decode is where a tuned target can lose end to end)
FULL = [(128, 4096, 4096), *((m, n, k) for m in (1, 16, 1024) for (k, n) in ((576, 1536), (1536, 576)))]
FULL += [(1, 576, 576), (1, 192, 576)]
# masks, partial tiles, wrapped rows; M=1: GEMV; 300 x 1000 x 1104: partial tiles of the "tma" path
# (its 8-bit rows must be 16-byte aligned: K = 200 and 1100 take the pointer tile instead)
ODD = [(3, 130, 200), (33, 1000, 1100), (1, 130, 200), (300, 1000, 1104)]
LEGACY = ("triton fp8 block", "triton int8", "triton int4-g128")
CHUNK = 6  # configs per config-check job
# --small-4bit: the 4-bit decode case alone (M <= 16 shapes only)
SMALL_4BIT_ROWS = ("torch bf16", "triton int4-g128", "triton mxfp4")
FN = C.FN


class Run:
    """Everything measured so far; `save` writes it (also from the watchdog, mid-run)."""

    def __init__(self, out: Path | None, echo: bool = True) -> None:
        self.out, self.t0, self.echo = out, time.time(), echo
        self.data: dict = {"meta": {}, "checks": [], "rows": [], "fails": []}
        self.lock = threading.Lock()
        self.workers: list = []  # the pool's processes, stopped by the watchdog too

    def check(
        self, what: str, err: float | str, limit: float, vendor: bool = False, quiet: bool = False
    ) -> bool:
        """Record one check; print it unless quiet and passed (FAIL rows are always printed)."""
        ok = isinstance(err, float) and err <= limit
        status = "ok" if ok else ("vendor-fail" if vendor else "FAIL")
        shown = f"rel err {err:.2e} (tol {limit:.0e})" if isinstance(err, float) else str(err)[:160]
        if self.echo and not (ok and quiet):
            print(f"check {what:<62} {shown} {status}", flush=True)
        self.data["checks"].append({"what": what, "err": err, "tol": limit, "ok": ok})
        if not ok and not vendor:
            self.data["fails"].append(what)
        return ok

    def elapsed(self) -> float:
        return time.time() - self.t0

    def save(self) -> None:
        if self.out is None:
            return
        with self.lock:
            self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
            self.data["tuner"] = {"chosen": tuning.CHOSEN, "rejected": tuning.REJECTED}
            self.out.write_text(json.dumps(self.data, indent=1, default=str))


# ----------------------------------------------------------------------------- 1. config checks (pool)
def config_jobs(dev: torch.device, shapes: list[tuple[int, int, int]], legacy: bool,
                names: tuple[str, ...] | None = None) -> list[tuple]:  # fmt: skip
    fam = arch.gemm_family(dev)
    jobs = []
    for M, N, Kd in shapes + ODD:
        for name in C.TRITON:
            cands = C.candidates(name, fam, M, N, Kd)
            if not cands or (names is not None and name not in names):
                continue
            if (M, N, Kd) in ODD:  # the default, one split config and each other path's first: the masks
                firsts = [next(c for c in cands if c.path == p) for p in dict.fromkeys(c.path for c in cands)]
                cands = list(dict.fromkeys(cands[:1] + [c for c in cands if c.split > 1][:1] + firsts))
            # a few configs per job: a long list (27 at M = 1) would leave one worker compiling alone
            jobs += [
                (name, M, N, Kd, [c.name for c in cands[i : i + CHUNK]], "fast")
                for i in range(0, len(cands), CHUNK)
            ]
            if legacy and name in LEGACY and (M, N, Kd) in shapes[:3]:
                jobs.append((name, M, N, Kd, ["autotune"], "legacy"))
    return jobs


def run_pool(run: Run, jobs: list[tuple], workers: int, deadline: float, exact: bool = True) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    print(f"config checks: {len(jobs)} jobs in {workers} worker processes", flush=True)
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    futs = {pool.submit(exact_job, 4096): ("exact",)} if exact else {}  # first: it compiles a dozen kernels
    futs.update({pool.submit(C.check_configs, *j): j for j in jobs})
    run.workers = list(getattr(pool, "_processes", {}).values())
    try:
        for fut in cf.as_completed(futs, timeout=max(10.0, deadline - run.elapsed())):
            if futs[fut] == ("exact",):
                try:
                    for c in fut.result():
                        run.check(c["what"], c["err"], c["tol"])
                except Exception as e:
                    run.check("exactness checks (worker)", f"{type(e).__name__}: {e}", 0.0)
                continue
            name, M, N, Kd, _, impl = futs[fut][:6]
            try:
                res = fut.result()
            except Exception as e:  # a crashed worker: the main process still checks what it times
                run.check(f"{impl} {name} {M}x{N}x{Kd} (worker)", f"{type(e).__name__}: {e}", 0.0)
                continue
            results = res["results"]
            for cfg in [c for c, e in results.items() if isinstance(e, str) and _no_fit(e)]:
                print(
                    f"skip  {impl} {name} {M}x{N}x{Kd} {cfg}: does not fit this GPU ({results.pop(cfg)[:80]})"
                )
            oks = [run.check(f"{impl} {name} {M}x{N}x{Kd} {cfg}", err, C.tol(name), quiet=True)
                   for cfg, err in results.items()]  # fmt: skip
            errs = [e for e in res["results"].values() if isinstance(e, float)]
            print(f"checked {impl} {name} {M}x{N}x{Kd}: {sum(oks)}/{len(oks)} configs ok, max rel err "
                  f"{max(errs, default=float('nan')):.1e} ({res['s']:.0f} s)", flush=True)  # fmt: skip
    except cf.TimeoutError:
        print("config checks: out of time, stopping the workers, going on with what finished", flush=True)
        run.data["fails"].append("config checks timed out")
        for proc in list(getattr(pool, "_processes", {}).values()):  # they would skew the timings
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        pool.shutdown(wait=True)
    run.save()


def _no_fit(err: str) -> bool:
    """A config that needs more shared memory / registers than this GPU has: the tuner skips it too."""
    return "OutOfResources" in err or "out of resource" in err.lower()


# ----------------------------------------------------------------------------- 2. exactness checks
def exact_job(big: int, device: str = "cuda") -> list[dict]:
    """Worker: the exactness checks, returned as check records for the main process."""
    rec = Run(None, echo=False)
    exact_checks(rec, torch.device(device), big)
    return rec.data["checks"]


def exact_checks(run: Run, dev: torch.device, big: int) -> None:
    x = torch.randn(64, big, device=dev) * 3
    for grp in (None, 128):
        q, s = K.quantize_act_fp8(x, group=grp, fp8_dtype=FN)
        gk = big if grp is None else grp
        xs = x.view(64, -1, gk)
        amax = xs.abs().amax(-1).clamp(min=1e-12)
        sr = amax / torch.full_like(amax, 448.0)  # correctly rounded, as the kernel divides
        qr = (xs / sr[..., None]).clamp(-448, 448).to(FN).view(64, big)
        qr = torch.where(qr.view(torch.uint8) == 0x80, 0, qr.view(torch.uint8))  # no -0 (fnuz NaN code)
        diff = (s != sr).float().mean().item() + (q.view(torch.uint8) != qr).float().mean().item()
        run.check(f"quantize_act_fp8 group={grp} bit-exact", diff, 0.0)
    q8, s8 = K.quantize_act_int8(x)  # per token, against the torch golden's own quantization
    q8r, s8r = F.quantize_act(x, "int8")
    diff = (s8 != s8r).float().mean().item() + (q8 != q8r).float().mean().item()
    run.check("quantize_act_int8 bit-exact", diff, 0.0)
    # one pinned config per path (a tuned one would compile a whole list here, serially): the
    # default large-tile path and a split-K path, with fp32 outputs that show accumulation errors
    fam = "cpu" if dev.type == "cpu" else arch.gemm_family(dev)
    M = 256 if big >= 4096 else 16
    tile = tuning.candidates(fam, "mm8", M, big, big)[0]
    split = next((c for c in tuning.candidates(fam, "mm8", 16, big, big) if c.split > 1), tile)
    for m, cfg in ((M, tile), (16, split)):
        with tuning.pinned(cfg):
            _exact_gemms(run, dev, m, big, cfg.name, fnuz=cfg is tile)


def _exact_gemms(run: Run, dev: torch.device, M: int, big: int, cfg: str, fnuz: bool) -> None:
    c = C.Case(M, big, big, dev)
    sb, sa = c.sb_blk, C.expand(c.sa_grp, M, big, 1, 128)
    bias = torch.randn(big, device=dev)
    out = K.fp8_gemm(c.a_grp, c.sa_grp, c.b_blk, sb, a_scale_mode="block", b_scale_mode="block",
                     b_scale_strides=(sb.stride(1), sb.stride(0)), out_dtype=torch.float32, bias=bias)  # fmt: skip
    ref = (c.a_grp.double() * sa) @ (c.b_blk.double() * C.expand(sb.T, big, big, 128, 128)).T + bias.double()
    # fp8 tensor cores accumulate ~14 mantissa bits inside a 128-wide K tile (DeepSeek-V3 report, 3.3.2)
    run.check(f"fp8 block, swapped strides, bias, fp32 out, M={M} {cfg}", C.rel_err(out, ref), 5e-4)
    refr = (c.a_tok.double() * c.sa_tok) @ (c.b_row.double() * c.sb_row).T
    out = K.fp8_gemm(c.a_tok, c.sa_tok, c.b_row, c.sb_row, a_scale_mode="row", b_scale_mode="row",
                     out_dtype=torch.float32)  # fmt: skip
    run.check(f"fp8 row, fp32 out (promoted acc), M={M} {cfg}", C.rel_err(out, refr), 5e-4)
    outi = K.int8_gemm(c.a_i8, c.sa_i8, c.b_i8, c.sb_i8, out_dtype=torch.float32)
    refi = (c.a_i8.double() @ c.b_i8.double().T) * c.sa_i8.double() * c.sb_i8.double().T
    run.check(f"int8, fp32 out (exact int32 acc), M={M} {cfg}", C.rel_err(outi, refi), 1e-6)
    if not fnuz:
        return
    # e4m3fnuz: e4m3fn bits read as fnuz are half the value; doubled scales normalize them
    a8, b8 = c.a_grp.view(torch.uint8).clone(), c.b_blk.view(torch.uint8).clone()
    a8[a8 == 0x80], b8[b8 == 0x80] = 0, 0
    fz = torch.float8_e4m3fnuz
    out = K.fp8_gemm(a8.view(fz), c.sa_grp * 2, b8.view(fz), sb * 2, a_scale_mode="block", b_scale_mode="block",
                     out_dtype=torch.float32)  # fmt: skip
    ref = (c.a_grp.double() * sa) @ (c.b_blk.double() * C.expand(sb, big, big, 128, 128)).T
    run.check(f"fp8 block e4m3fnuz (normalized), M={M} {cfg}", C.rel_err(out, ref), 5e-4)
    run.save()


# ----------------------------------------------------------------------------- 3. timing
def bench(run: Run, shapes: list[tuple[int, int, int]], dev: torch.device, args: argparse.Namespace) -> None:
    for M, N, Kd in shapes:
        if run.elapsed() > args.budget * 0.85:
            print(f"skipping {M}x{N}x{Kd}: time budget", flush=True)
            run.data["fails"].append(f"timing {M}x{N}x{Kd} skipped (time budget)")
            continue
        c = C.Case(M, N, Kd, dev)
        fns = c.fns(args.fastacc)
        if args.small_4bit:  # the 4-bit rows only, and bf16 to compare with
            fns = {n: f for n, f in fns.items() if n in SMALL_4BIT_ROWS}
        if not args.no_legacy and ((M, N, Kd) in SHAPES[:3] or (M == 1 and (M, N, Kd) in FULL)):
            fns.update({f"legacy {n.removeprefix('triton ')}": C.with_impl(fns[n], "legacy") for n in LEGACY})
        row: dict = {"M": M, "N": N, "K": Kd, "ms": {}, "tflops": {}}
        for name, fn in fns.items():
            try:
                got = fn()  # the first call tunes (Triton kernels) and is checked before timing
                torch.cuda.synchronize()
                refname = name.replace("legacy ", "triton ")
                run.check(f"{name} {M}x{N}x{Kd} (as timed)", C.rel_err(got, c.reference(refname)), C.tol(refname),
                          vendor=not name.startswith(("triton", "legacy")))  # fmt: skip
                ms = C.time_ms(fn)
            except Exception as e:  # record and go on (_scaled_mm has shape limits: not our failure)
                ours = name.startswith(("triton", "legacy"))
                print(f"{'FAIL' if ours else 'skip'}  {name} {M}x{N}x{Kd}: {type(e).__name__}: {str(e)[:160]}",
                      flush=True)  # fmt: skip
                if ours:
                    run.data["fails"].append(f"{name} {M}x{N}x{Kd}: {type(e).__name__}")
                continue
            row["ms"][name] = ms
            row["tflops"][name] = 2 * M * N * Kd / ms / 1e9
            if M <= tuning.COLD_ROWS:  # decode: also with the weights read from HBM, as the tuner times it
                row.setdefault("cold_ms", {})[name] = tuning.time_cold(fn)
        for name, grp in (("quant per-token", None), ("quant 1x128", 128)):
            row["ms"][name] = C.time_ms(lambda grp=grp, x=c.x: K.quantize_act_fp8(x, group=grp, fp8_dtype=FN))
        print(f"{M}x{N}x{Kd}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["tflops"].items()), flush=True)
        run.data["rows"].append(row)
        run.save()


# ----------------------------------------------------------------------------- report
def _ratio(r: dict, a: str, b: str) -> float | None:
    return r["ms"][b] / r["ms"][a] if a in r["ms"] and b in r["ms"] else None


def markdown(rows: list[dict]) -> str:
    names: list[str] = []
    for r in rows:
        names += [n for n in r["tflops"] if n not in names]
    head = "| M | N | K | " + " | ".join(names) + " |"
    lines = ["TFLOP/s (median of CUDA-graph replays)", "", head, "|---" * (3 + len(names)) + "|"]
    for r in rows:
        cells = [f"{r['tflops'][n]:.1f}" if n in r["tflops"] else "n/a" for n in names]
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    tri = [n for n in names if n.startswith(("triton", "legacy"))]
    lines += ["", "Speed vs torch bf16 (>1 = faster); fp8 tensor/row also vs _scaled_mm", "",
              "| M | N | K | " + " | ".join(tri) + " | fp8 tensor / _scaled_mm | fp8 row / _scaled_mm row |",
              "|---" * (5 + len(tri)) + "|"]  # fmt: skip
    for r in rows:
        cells = [_fmt(_ratio(r, n, "torch bf16")) for n in tri]
        cells += [_fmt(_ratio(r, "triton fp8 tensor", "_scaled_mm tensor")),
                  _fmt(_ratio(r, "triton fp8 row", "_scaled_mm row"))]  # fmt: skip
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cold_markdown(rows: list[dict]) -> str:
    """The decode rows timed with the L2 flushed before every call (weights from HBM): µs, and the
    ratio to torch bf16 timed the same way."""
    rows = [r for r in rows if r.get("cold_ms")]
    if not rows:
        return ""
    names = [n for n in rows[0]["cold_ms"] if n.startswith(("torch bf16", "_scaled_mm", "triton"))]
    lines = ["Weights from HBM (L2 flushed before every call; µs, x = speed vs torch bf16 timed the same way)",
             "", "| M | N | K | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]  # fmt: skip
    for r in rows:
        cold = r["cold_ms"]
        cells = [f"{cold[n] * 1e3:.2f} ({_fmt(cold.get('torch bf16', 0) / cold[n])})" if n in cold else "n/a"
                 for n in names]  # fmt: skip
        lines.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's 'done when' speed targets, each with its measured ratio."""
    by = {(r["M"], r["N"], r["K"]): r for r in rows}
    out = []

    def want(shape: tuple[int, int, int], a: str, b: str, goal: float) -> None:
        r = by.get(shape)
        v = _ratio(r, a, b) if r else None
        out.append({"shape": "x".join(map(str, shape)), "what": f"{a} / {b}", "goal": goal, "ratio": v,
                    "ok": v is not None and v >= goal})  # fmt: skip

    for s in ((4096, 4096, 4096), (1024, 4096, 4096)):
        want(s, "triton fp8 block", "torch bf16", 1.3)
        want(s, "triton fp8 tensor", "_scaled_mm tensor", 0.9)
        want(s, "triton fp8 row", "_scaled_mm row", 0.9)
    for s in ((16, 4096, 4096), (1, 4096, 4096)):
        for n in ("triton int4-g128", "triton mxfp4"):
            want(s, n, "torch bf16", 1.5)
        for n in ("triton fp8 tensor", "triton fp8 row", "triton fp8 block", "triton int8"):
            want(s, n, "torch bf16", 1.0)
    for n in ("triton int4-g128", "triton mxfp4"):
        want((4096, 4096, 4096), n, "torch bf16", 0.8)
    return out


def _watchdog(run: Run, budget: float) -> None:
    def fire() -> None:
        print(f"\nWATCHDOG: {budget:.0f} s budget spent; writing partial results and exiting", flush=True)
        run.data["fails"].append("watchdog: budget exceeded")
        for proc in run.workers:
            proc.terminate()
        try:
            run.save()
        finally:
            os._exit(3)

    t = threading.Timer(budget, fire)
    t.daemon = True
    t.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", "--json", dest="out", type=Path, help="write every number as JSON here")
    p.add_argument(
        "--budget", type=float, default=230.0, help="hard wall-clock limit in seconds (default 230)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="also M=128 and the smollm2 shapes (M = 1, 16, 1024; the legacy kernels too at M = 1)",
    )
    p.add_argument("--fastacc", action="store_true", help="also time fast (unpromoted) fp8 accumulation")
    p.add_argument("--no-legacy", action="store_true", help="do not time the legacy kernels")
    p.add_argument("--small-4bit", action="store_true",
                   help="only M <= 16 and the 4-bit rows (bf16, int4-g128, mxfp4); "
                        "no legacy kernels, no fp8/int8 exactness checks")  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=min(12, os.cpu_count() or 4), help="config-check processes (0: none)"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the exactness checks at small sizes under the Triton interpreter")  # fmt: skip
    args = p.parse_args(argv)
    run = Run(args.out)
    if args.device == "cpu":
        from server_shim.quant.linear import load_kernels

        load_kernels(torch.device("cpu"))  # the interpreter on, kernels.py rebuilt in place for it
        exact_checks(run, torch.device("cpu"), big=256)
        fails = run.data["fails"]
        print(f"correctness FAILED: {fails}" if fails else "all checks passed (no timing on CPU)")
        return 1 if fails else 0
    if not torch.cuda.is_available():
        print(
            "bench/gemm.py needs a CUDA or ROCm GPU; none is visible (CPU-only torch or no device).",
            file=sys.stderr,
        )
        return 0  # `make bench` runs it everywhere: no GPU is nothing to time, not a failure
    import triton

    _watchdog(run, args.budget)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    run.data["meta"] = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                        "family": arch.gemm_family(dev), "impl": K.impl(),
                        "timing": "median of CUDA-graph replays (tuning.time_graph)"}  # fmt: skip
    print(f"device {name} ({arch.gemm_family(dev)}), torch {torch.__version__}, triton {triton.__version__}, "
          f"kernels {K.impl()}", flush=True)  # fmt: skip
    shapes = SHAPES + (FULL if args.full else [])
    if args.small_4bit:
        shapes, args.no_legacy = [s for s in shapes if s[0] <= 16], True
    names = tuple(n for n in SMALL_4BIT_ROWS if n in C.TRITON) if args.small_4bit else None
    if args.workers > 0:  # the exactness checks run in the pool too
        jobs = config_jobs(dev, shapes, not args.no_legacy, names)
        run_pool(
            run,
            jobs,
            args.workers,
            args.budget * (0.6 if args.small_4bit else 0.5),
            exact=not args.small_4bit,
        )
    elif not args.small_4bit:
        print(f"[{run.elapsed():.0f} s] exactness checks", flush=True)
        exact_checks(run, dev, big=4096)
    print(f"[{run.elapsed():.0f} s] timing", flush=True)
    bench(run, shapes, dev, args)
    for key, v in sorted(tuning.CHOSEN.items()):
        timed = ", ".join(f"{n} {us:.1f}" for n, us in sorted(v["us"].items(), key=lambda kv: kv[1])[:6])
        print(f"tuned {key}: {v['config']} (us, fastest first: {timed})")
    run.data["tuned"] = tuning.CHOSEN  # every timed candidate per key, for the next round of tile lists
    table = markdown(run.data["rows"])
    print(f"\n## GEMM benchmark on {name}\n\n{table}\n\n{cold_markdown(run.data['rows'])}\n")
    run.data["targets"] = targets(run.data["rows"])
    for t in run.data["targets"]:
        print(f"target {t['shape']:>14} {t['what']:<44} >= {t['goal']:.2f}x: {_fmt(t['ratio'])} "
              f"{'PASS' if t['ok'] else 'MISS'}")  # fmt: skip
    for r in tuning.REJECTED:
        print(f"FAIL tuner rejected {r['config']} for {r['key']} (disagrees with {r['reference']})")
        run.data["fails"].append(f"tuner rejected {r['config']} for {r['key']}")
    fails = run.data["fails"]
    print(f"\ncorrectness FAILED ({len(fails)}): {fails[:20]}" if fails else "\nall checks passed")
    print(f"elapsed {run.elapsed():.0f} s")
    run.save()
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
