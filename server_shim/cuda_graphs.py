"""CUDA graphs of the decode step, one per (rows, kv_len) bucket, captured lazily and replayed.

The rule that keeps capture safe: a key's first call runs eagerly. Triton kernels (the quantized
linears) autotune on their first call per shape, and autotuning synchronises, which is illegal
inside a capture; cuBLAS and the caching allocator also do one-time work on a first call. The
second call warms up once more on the capture stream (the same writes the replay will do, so the
KV cache is unchanged by it), captures, then replays. From the third call on: replay only.

A capture that fails (a host sync somewhere in the model's forward, an op that cannot be
captured) switches graphs off for this engine, loudly, and the step runs eagerly: the numbers
stay right, only slower. `DIFFTEST_CUDA_GRAPHS=0` or `--no-cuda-graphs` never tries.

One process may hold several engines on one GPU (the in-process tests do). A capture there must
not overlap another engine's device work: on an H200 a module replay in one engine failed with
"operation not permitted when stream is capturing" while another engine's capture (an MoE model,
whose routing syncs with the host) was being abandoned. `device_lock` serialises them; with one
engine per process (every server) it is never contended.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from server_shim.switches import env_switch

logger = logging.getLogger(__name__)

__all__ = ["DecodeGraphs", "device_lock", "graphs_wanted"]

ENV = "DIFFTEST_CUDA_GRAPHS"

Body = Callable[[int, int], tuple[Tensor, Tensor]]

_device_locks: dict[int, threading.RLock] = {}
_locks_guard = threading.Lock()


def device_lock(device: torch.device) -> contextlib.AbstractContextManager:
    """The process-wide lock of one CUDA device (re-entrant: a step that captures holds it
    twice); a no-op context elsewhere, where nothing is captured."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _locks_guard:
        return _device_locks.setdefault(index, threading.RLock())


def graphs_wanted(device: torch.device, option: bool | None = None) -> bool:
    """Graphs on a CUDA device unless the option or the environment (`DIFFTEST_CUDA_GRAPHS=0`) says no."""
    if device.type != "cuda":
        return False
    if option is not None:
        return option
    return env_switch(ENV, True)


class DecodeGraphs:
    """Captured decode steps. `body(rows, kv_len)` reads the runner's static inputs and returns
    its outputs (packed [rows, 2 + 2k], log-probs [rows, V]); the graph keeps those output
    tensors, which the caller reads before the next replay of any graph (see `run`)."""

    def __init__(self, body: Body, device: torch.device) -> None:
        self._body = body
        self._device = device
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor]]] = {}
        self._seen: set[tuple[int, int]] = set()
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self.enabled = True
        self.error: str | None = None  # why graphs were switched off
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0

    def invalidate(self) -> None:
        """The static tensors moved (the KV cache grew): every graph is stale."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, rows: int, kv_len: int) -> tuple[Tensor, Tensor]:
        """The step's outputs. Graph outputs are shared memory: a later replay of *another*
        graph may reuse it, so the caller copies what it needs before launching the next step."""
        key = (rows, kv_len)
        hit = self._graphs.get(key)
        if hit is not None:
            hit[0].replay()
            self.replays += 1
            return hit[1]
        if not self.enabled or key not in self._seen:
            self._seen.add(key)  # first call of this shape: eager (autotune, lazy init)
            self.eager_steps += 1
            return self._body(rows, kv_len)
        try:
            graph, outs = self._capture(rows, kv_len)
        except Exception as exc:  # noqa: BLE001 - any capture failure: fall back, loudly
            self.enabled = False
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            logger.error(
                "CUDA graph capture failed for %d rows x %d positions; decoding eagerly from now on: %s",
                rows, kv_len, self.error, exc_info=exc,
            )  # fmt: skip
            with contextlib.suppress(RuntimeError):  # a sticky error: the eager step below raises it
                torch.cuda.synchronize(self._device)
            self.eager_steps += 1
            return self._body(rows, kv_len)
        self._graphs[key] = (graph, outs)
        self.captures += 1
        graph.replay()
        self.replays += 1
        return outs

    def _capture(self, rows: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor]]:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            self._body(rows, kv_len)  # warm-up on the capture stream (idempotent cache writes)
        torch.cuda.current_stream(self._device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # device_lock: no other engine of this process works on the device during the capture;
        # thread_local: the event loop's thread may touch CUDA state (it never should) without breaking us
        with (
            device_lock(self._device),
            torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"),
        ):
            outs = self._body(rows, kv_len)
        return graph, outs
