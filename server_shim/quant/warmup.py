"""Tune the Triton GEMMs of a quantized model before it serves, not at its first requests.

The tuner (tuning.py) picks a config at the first call of each (kernel, M bucket, N, K) key. Left
to the first requests, that took 116-124 s for a 4-bit smollm2-135m on an H200 (64 keys): about
a client's 120 s request timeout, and the config a bucket got depended on which batch size
happened to arrive first. `warm_up` runs every Triton-backed QuantLinear once per M bucket the
engine can produce (decode rows up to its largest batch, prefill chunks up to its chunk size)
before the server answers /health, whose wait allows 600 s; with the choices stored on disk a
later start takes seconds. The inputs are random, not zeros: the tuner rejects a candidate whose
output disagrees with the first one's, a check that zeros would pass for any config.

Two passes: the first runs every candidate once, untimed (`Tuner.precompiling`: Triton compiles
it), outside the lock that makes servers started side by side take turns; the second tunes under
that lock. Compiling was 72% of a cold warm-up (int4-g128: 66 of 92 s on an H100,
`bench/warmup_split.py`), and it is CPU work that other servers' timing does not disturb much;
so the servers of a GPU gate compile at once and queue only for the timing.
DIFFTEST_TRITON_PRECOMPILE=0 folds the first pass back into the second.
MoE experts still tune at their first call (their rows per expert depend on the routing).
DIFFTEST_TRITON_WARMUP=0 skips it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from server_shim.quant import tuning
from server_shim.quant.linear import QuantLinear
from server_shim.switches import env_switch

logger = logging.getLogger(__name__)

ENV = "DIFFTEST_TRITON_WARMUP"
PRECOMPILE_ENV = "DIFFTEST_TRITON_PRECOMPILE"  # 0: compile inside the lock, while timing (as before)
MAX_ROWS = 4096  # tuning.m_bucket's last bucket: every larger M shares its config


def warm_m_sizes(max_rows: int, prefill_chunk: int) -> list[int]:
    """One M per tuning bucket up to the most rows one forward can hold: each bucket's top,
    and the largest M itself for the bucket it falls in (tuned at the size it will run)."""
    top = min(max(max_rows, prefill_chunk, 1), MAX_ROWS)
    return [b for b in tuning.M_BUCKETS if b < tuning.m_bucket(top)] + [top]


def triton_linears(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.backend == "triton"]


def warm_up(model: nn.Module, m_sizes: list[int], *, dtype: torch.dtype, device: torch.device,
            seed: int = 0) -> int:  # fmt: skip
    """Call every Triton QuantLinear at every size in `m_sizes` (random inputs); the number of
    modules warmed. Only where the tuner times configs (a GPU): elsewhere nothing is tuned."""
    mods = triton_linears(model)
    if not mods or not env_switch(ENV, True) or not tuning_active(device):
        return 0
    t0 = time.monotonic()
    with torch.inference_mode():
        if env_switch(PRECOMPILE_ENV, True):
            with tuning.TUNER.precompiling():  # side by side with the other servers: compiling only
                m_sizes = _run_all(mods, m_sizes, dtype, device, seed, "compiling Triton GEMM candidates")
        with tuning_lock():
            tuning.TUNER.reload_disk()  # what a server that tuned before us stored: replayed, not retuned
            m_sizes = _run_all(mods, m_sizes, dtype, device, seed, "tuning Triton GEMMs")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info(
        "Triton GEMMs tuned for %d linears at M = %s in %.1f s", len(mods), m_sizes, time.monotonic() - t0
    )
    return len(mods)


def _run_all(mods: list[QuantLinear], m_sizes: list[int], dtype: torch.dtype, device: torch.device, seed: int,
             desc: str) -> list[int]:  # fmt: skip
    """Every module once at every size (random inputs: the tuner's agreement check compares real
    numbers); the sizes left (one that runs out of memory is dropped, with every larger one)."""
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(seed)
    for mod in tqdm(mods, desc=desc, unit="linear", disable=None):
        for rows in m_sizes:
            try:
                mod(torch.randn(rows, mod.in_features, generator=gen, device=device).to(dtype))
            except torch.cuda.OutOfMemoryError:  # a size this GPU cannot hold beside the model
                logger.warning("warm-up at M = %d ran out of memory: larger M tune at their first call", rows)
                m_sizes = [m for m in m_sizes if m < rows]
                break
    return m_sizes


@contextlib.contextmanager
def tuning_lock() -> Iterator[None]:
    """One warm-up at a time per stored-choices file: servers started side by side on one GPU
    (configs/gpu.toml starts eight) would otherwise time their candidates against one another's
    kernels, and the noisy picks would be stored for good. The others wait, then replay."""
    path = tuning.TUNER.disk_path()
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - closed below
    except OSError as e:  # a read-only cache: tune unserialised rather than not start
        logger.warning("cannot lock %s (%s): tuning without waiting for other servers", path, e)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another server is tuning Triton GEMMs (%s): waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tuning_active(device: torch.device) -> bool:
    """The tuner times configs only for compiled kernels on a GPU (the interpreter takes the first)."""
    return device.type == "cuda"
