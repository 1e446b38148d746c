"""Operands, callables and float64 references of bench/gemm.py, plus its config-check worker.

`Case(M, N, K)` quantizes one random problem every way once; `fns()` are the timed callables
(bf16 outputs, as a model runs them), `references()` the float64 results they must match.
`check_configs` runs in worker processes: it pins each candidate config in turn
(quant/tuning.FORCE), checks its output against the reference, and -- the point of running it
in a pool -- leaves every compiled kernel in Triton's on-disk cache, so the main process's tuner
loads binaries instead of compiling ~100 of them one after another.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_shim.quant import formats as F  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402
from server_shim.quant import tuning  # noqa: E402

FN = torch.float8_e4m3fn
# the Triton kernels a check or timing row names, and the key under which tuning.py lists their configs
TRITON = {
    "triton fp8 tensor": "mm8", "triton fp8 row": "mm8", "triton fp8 block": "mm8", "triton int8": "mm8",
    "triton int4-g128": "wonly", "triton mxfp4": "wonly",
}  # fmt: skip
FASTACC = ("triton fp8 tensor fastacc", "triton fp8 row fastacc", "_scaled_mm tensor fastacc")


def quant_weight_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
    return (w / s).clamp(-448, 448).to(FN), s.float()


def quant_weight_blocks(w: torch.Tensor, blk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    N, Kd = w.shape
    nb, kb = -(-N // blk), -(-Kd // blk)
    wp = torch.nn.functional.pad(w, (0, kb * blk - Kd, 0, nb * blk - N)).view(nb, blk, kb, blk)
    s = wp.abs().amax((1, 3)).clamp(min=1e-12) / 448.0  # [nb, kb]
    q = (wp / s[:, None, :, None]).clamp(-448, 448).to(FN).view(nb * blk, kb * blk)[:N, :Kd]
    return q.contiguous(), s.float().contiguous()


def expand(s: torch.Tensor, rows: int, cols: int, rb: int, cb: int) -> torch.Tensor:
    return s.double().repeat_interleave(rb, 0).repeat_interleave(cb, 1)[:rows, :cols]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@dataclass
class W4Case:
    """One random 4-bit problem of the M <= 16 experiments (bench/wordsq_w4.py, wordsr_w4.py,
    wordsw.py): x, the quantized weight, its int32 word view, zero points (a 1 x 1 uint8 stand-in for
    mxfp4, which has none), the dequantized weight in x's dtype and the float64 reference."""

    x: torch.Tensor
    qw: F.QuantizedWeight
    words: torch.Tensor
    zeros: torch.Tensor
    dense: torch.Tensor
    ref: torch.Tensor

    def shim(self) -> torch.Tensor:
        """The shim's GEMM of this case (what a pinned config, `tuning.pinned`, runs)."""
        q, dt = self.qw, self.x.dtype
        if q.scheme == "int4-g128":
            return K.int4_gemm(self.x, q.data, q.scales, q.zeros, out_dtype=dt)
        return K.mxfp4_gemm(self.x, q.data, q.scales, out_dtype=dt)

    def us(self, fn: Callable[[], object]) -> tuple[float, float]:
        """fn's µs with the weights in L2 (CUDA-graph replays) and from HBM (the tuner's flushed timing)."""
        return time_ms(fn) * 1e3, tuning.time_cold(fn) * 1e3

    @property
    def mnk(self) -> tuple[int, int, int]:
        (m, k), n = self.x.shape, self.words.shape[0]
        return m, n, k

    def check_then_time(
        self, label: str, run: Callable[[], object], out: torch.Tensor
    ) -> tuple[float, float, float] | None:
        """`check_then_time` against this case's reference at its scheme's tolerance, then timed from
        HBM too: (µs in L2, relative error, µs from HBM), or None where the check failed."""
        timed = check_then_time(label, run, out, self.ref, tol(f"triton {self.qw.scheme}"))
        return None if timed is None else (*timed, tuning.time_cold(run) * 1e3)

    def baselines(self, pin: str) -> tuple[tuple[float, float], tuple[float, float]]:
        """torch's 16-bit GEMM and the shim pinned to `pin`, each `us`: what an experiment beats."""
        with tuning.pinned(pin):
            return self.us(lambda: self.x @ self.dense.T), self.us(self.shim)


def w4_cases(shapes: list[tuple[int, int, int]], schemes: list[str], dtype: str) -> Iterator[W4Case]:
    """Every shape x scheme as a `W4Case` on the GPU ("bf16" / "fp16" x), after one line naming the
    device: the experiments' outer loops."""
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    for m, n, k in shapes:
        for scheme in schemes:
            yield w4_case(m, n, k, scheme, dt, torch.device("cuda"))


def gluon_gpu_missing(script: str, runs_here: bool) -> bool:
    """True (and one line on stderr) where an experiment's Gluon kernel cannot run: no NVIDIA sm80+
    GPU, or `runs_here` (a triton with Gluon, ...) is False."""
    if runs_here and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        return False
    print(f"bench/{script} needs an NVIDIA GPU (sm80+) and a triton with Gluon; none here.", file=sys.stderr)
    return True


def w4_case(m: int, n: int, k: int, scheme: str, dtype: torch.dtype, dev: torch.device) -> W4Case:
    """`W4Case` of an M x N x K problem, the same operands for every experiment (seed 1)."""
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(m, k, device=dev, generator=g).to(dtype)
    qw = F.quantize_weight(torch.randn(n, k, device=dev, generator=g) * 0.02, scheme)
    zeros = qw.zeros if qw.zeros is not None else torch.zeros(1, 1, dtype=torch.uint8, device=dev)
    return W4Case(x, qw, qw.data.view(torch.int32), zeros, F.dequantize(qw).to(dtype),
                  x.double() @ F.dequantize(qw).double().T)  # fmt: skip


def check_then_time(label: str, run: Callable[[], object], out: torch.Tensor, ref: torch.Tensor,
                    tol_: float) -> tuple[float, float] | None:  # fmt: skip
    """The experiments' check before they are timed: run a kernel that writes `out` twice; the first
    result must be within tol_ of ref (relative, norm-wise) and the second have the same bits (a
    split-K tile summing itself in a fixed order). Off: a FAIL line and None; else (median us of
    CUDA-graph replays, the relative error)."""
    run()
    err = rel_err(out, ref)
    first = out.clone()
    run()
    same = torch.equal(first, out)
    if err >= tol_ or not same:
        print(f"FAIL {label}: rel err {err:.1e}, same bits twice: {same}", flush=True)
        return None
    return time_ms(run) * 1e3, err


def pack(q: torch.Tensor) -> torch.Tensor:
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def with_impl(fn: Callable[[], torch.Tensor], impl: str) -> Callable[[], torch.Tensor]:
    """The same call through the legacy or the fast kernels (a CUDA graph captures what it launches)."""

    def run() -> torch.Tensor:
        K.KERNEL_IMPL = impl
        try:
            return fn()
        finally:
            K.KERNEL_IMPL = None

    return run


def candidates(name: str, family: str, M: int, N: int, Kd: int) -> list[tuning.Cfg]:
    """The configs a check or timing row of `name` chooses among (none: the row does not exist)."""
    return tuning.candidates(family, TRITON[name], M, N, Kd)


def _fast(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The same call with Hopper's fast (never promoted) fp8 accumulation."""

    def run() -> torch.Tensor:
        K.FP8_FAST_ACCUM = True
        try:
            return fn()
        finally:
            K.FP8_FAST_ACCUM = False

    return run


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms of CUDA-graph replays: a launch's Python cost (validation, dispatch, argument
    binding: tens of us) is not the kernel's, and at small shapes it would swamp it. Warmed up on
    the capturing stream (`tuning.time_graph`): a self-reducing split-K config is timed as served."""
    import triton.testing

    try:
        return tuning.time_graph(fn, rep_ms=40)
    except Exception:  # a callable that cannot be captured
        return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5])


def tol(name: str) -> float:
    """bf16 outputs: one rounding (2**-9 relative, ~1e-3 norm-wise) plus fp32 accumulation noise;
    fast accumulation adds Hopper's ~14-bit fp8 accumulator over the whole K."""
    return 8e-3 if name in FASTACC else 4e-3


class Case:
    """All operands of one (M, N, K), quantized once; `fns` are the timed callables."""

    def __init__(self, M: int, N: int, Kd: int, dev: torch.device) -> None:
        g = torch.Generator(device=dev).manual_seed(M * 7 + N * 3 + Kd)
        self.M, self.N, self.K = M, N, Kd
        self.x = torch.randn(M, Kd, device=dev, generator=g).to(torch.bfloat16)
        w = torch.randn(N, Kd, device=dev, generator=g) * 0.05
        self.w_bf16 = w.to(torch.bfloat16)
        self.a_tok, self.sa_tok = K.quantize_act_fp8(self.x, group=None, fp8_dtype=FN)
        self.a_grp, self.sa_grp = K.quantize_act_fp8(self.x, group=128, fp8_dtype=FN)
        self.sa_ten = (self.x.float().abs().amax().clamp(min=1e-12) / 448.0).reshape(1)
        self.a_ten = (self.x.float() / self.sa_ten).clamp(-448, 448).to(FN)
        self.b_row, self.sb_row = quant_weight_rows(w)
        self.sb_ten = (w.abs().amax() / 448.0).reshape(1).float()
        self.b_ten = (w / self.sb_ten).to(FN)
        self.b_blk, self.sb_blk = quant_weight_blocks(w)
        xi = self.x.float()
        self.sa_i8 = xi.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
        self.a_i8 = (xi / self.sa_i8).round().clamp(-127, 127).to(torch.int8)
        self.sb_i8 = w.abs().amax(1, keepdim=True) / 127.0
        self.b_i8 = (w / self.sb_i8).round().clamp(-127, 127).to(torch.int8)
        G = -(-Kd // 128)
        self.q4 = torch.randint(0, 16, (N, Kd), device=dev, dtype=torch.uint8, generator=g)
        self.s4 = torch.rand(N, G, device=dev, generator=g) * 0.01 + 1e-3
        self.z4 = torch.randint(0, 16, (N, G), device=dev, dtype=torch.uint8, generator=g)
        self.qm = torch.randint(0, 16, (N, Kd), device=dev, dtype=torch.uint8, generator=g)
        self.em = torch.randint(118, 124, (N, -(-Kd // 32)), device=dev, dtype=torch.uint8, generator=g)
        self.p4, self.pm = pack(self.q4), pack(self.qm)

    def fns(self, fastacc: bool = False) -> dict[str, Callable[[], torch.Tensor]]:
        bf = torch.bfloat16
        f: dict[str, Callable[[], torch.Tensor]] = {"torch bf16": lambda: self.x @ self.w_bf16.T}
        if hasattr(torch, "_scaled_mm"):
            bt, br = self.b_ten.T, self.b_row.T  # column-major [K, N], as cuBLASLt wants
            st, sbt = self.sa_ten.reshape(()), self.sb_ten.reshape(())
            sat = self.sa_tok.reshape(-1)[:, None]  # [M, 1] with stride(1) == 1, as _scaled_mm checks
            f["_scaled_mm tensor"] = lambda: torch._scaled_mm(self.a_ten, bt, st, sbt, out_dtype=bf)
            f["_scaled_mm row"] = lambda: torch._scaled_mm(self.a_tok, br, sat, self.sb_row.T, out_dtype=bf)
            if fastacc:
                f["_scaled_mm tensor fastacc"] = lambda: torch._scaled_mm(
                    self.a_ten, bt, st, sbt, out_dtype=bf, use_fast_accum=True
                )
        f["triton fp8 tensor"] = lambda: K.fp8_gemm(
            self.a_ten, self.sa_ten, self.b_ten, self.sb_ten, a_scale_mode="tensor", b_scale_mode="tensor",
            out_dtype=bf)  # fmt: skip
        f["triton fp8 row"] = lambda: K.fp8_gemm(
            self.a_tok, self.sa_tok, self.b_row, self.sb_row, a_scale_mode="row", b_scale_mode="row",
            out_dtype=bf)  # fmt: skip
        f["triton fp8 block"] = lambda: K.fp8_gemm(
            self.a_grp, self.sa_grp, self.b_blk, self.sb_blk, a_scale_mode="block", b_scale_mode="block",
            out_dtype=bf)  # fmt: skip
        if fastacc:
            f["triton fp8 tensor fastacc"] = _fast(f["triton fp8 tensor"])
            f["triton fp8 row fastacc"] = _fast(f["triton fp8 row"])
        f["triton int8"] = lambda: K.int8_gemm(self.a_i8, self.sa_i8, self.b_i8, self.sb_i8, out_dtype=bf)
        f["triton int4-g128"] = lambda: K.int4_gemm(self.x, self.p4, self.s4, self.z4, out_dtype=bf)
        f["triton mxfp4"] = lambda: K.mxfp4_gemm(self.x, self.pm, self.em, out_dtype=bf)
        return f

    def reference(self, name: str) -> torch.Tensor:
        """float64 result of the callable `name` (its operands dequantized exactly)."""
        M, N, Kd = self.M, self.N, self.K
        base = name.removesuffix(" fastacc").removeprefix("triton ").removeprefix("_scaled_mm ")
        if name == "torch bf16":
            return self.x.double() @ self.w_bf16.double().T
        if base in ("tensor", "fp8 tensor"):
            return (self.a_ten.double() * self.sa_ten.double()) @ (self.b_ten.double() * self.sb_ten).T
        if base in ("row", "fp8 row"):
            return (self.a_tok.double() * self.sa_tok) @ (self.b_row.double() * self.sb_row).T
        if base == "fp8 block":
            return (self.a_grp.double() * expand(self.sa_grp, M, Kd, 1, 128)) @ (
                self.b_blk.double() * expand(self.sb_blk, N, Kd, 128, 128)
            ).T
        if base == "int8":
            return (self.a_i8.double() @ self.b_i8.double().T) * self.sa_i8.double() * self.sb_i8.double().T
        if base == "int4-g128":
            w4 = (self.q4.double() - expand(self.z4, N, Kd, 1, 128)) * expand(self.s4, N, Kd, 1, 128)
            w4 = w4.to(torch.bfloat16).double()  # bf16 weights meet the tensor cores
            return self.x.double() @ w4.T
        if base == "mxfp4":
            grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64, device=self.x.device)
            wm = grid[(self.qm & 7).long()] * torch.where(self.qm >= 8, -1.0, 1.0).double()
            wm = wm * expand(torch.exp2(self.em.double() - 127), N, Kd, 1, 32)
            return self.x.double() @ wm.to(torch.bfloat16).double().T  # exact either way (e2m1 * 2**e)
        raise KeyError(name)


def check_configs(
    name: str, M: int, N: int, Kd: int, cfgs: list[str], impl: str = "fast", device: str = "cuda"
) -> dict:
    """Worker: run `name` at M x N x K under each pinned config (or once through the legacy
    autotuner), returning {config: rel err or error text} and the seconds it took."""
    t0 = time.time()
    dev = torch.device(device)
    c = Case(M, N, Kd, dev)
    fn = c.fns()[name]
    ref = c.reference(name)
    out: dict[str, float | str] = {}
    for cfg in cfgs:
        try:
            with tuning.pinned(None if impl == "legacy" else cfg):
                got = with_impl(fn, "legacy")() if impl == "legacy" else fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out[cfg] = rel_err(got, ref)
        except Exception as e:  # reported as a FAIL row by the caller
            out[cfg] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return {"name": name, "M": M, "N": N, "K": Kd, "impl": impl, "results": out, "s": time.time() - t0,
            "pid": os.getpid()}  # fmt: skip
