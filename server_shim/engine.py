"""The engine: one model thread that admits requests into KV-cache slots, prefills their prompts in
chunks and decodes every generating slot together, step after step (continuous batching).

Why one thread: torch calls release the GIL, so the event loop stays responsive while the model
runs, and a single owner of the model means no locks around the KV cache or the hooks that the
debug routes install (`run_exclusive` runs them between steps, with no step in flight).

One iteration of the loop (README.md, "The engine"; the modules it names: docs/design.md, "The server"):
  1. collect the decode step launched last time (one small D2H copy) and pick each row's token:
     argmax on the device, or the sequence's own seeded sampler on the CPU;
  2. admit waiting sequences into free slots, run one prefill chunk (a token budget shared by the
     sequences still reading their prompts); a prompt that completes yields its first token;
  3. launch the next decode step over every generating slot: eagerly, or as a CUDA graph replay
     (model_runner.py, cuda_graphs.py);
  4. while the device works, detokenize and stop-match the tokens of steps 1-2 and send events.
A finished sequence frees its slot at once; the next waiting one takes it before the next step.

Batched matmuls round differently from single-row ones, so batched results can differ from
serial ones in the last bits; `batch_invariant=True` serves one sequence at a time (one slot),
bit-exact. Logprobs are float32 `log_softmax` of the raw logits (before temperature / top-p), as
vLLM reports them; greedy ties go to the lowest token id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from server_shim.cuda_graphs import device_lock, graphs_wanted
from server_shim.engine_output import accept, stop_overlap
from server_shim.engine_steps import EngineSteps, Entry
from server_shim.engine_types import (
    SAMPLING_EPS,
    EngineBusy,
    EngineFailure,
    RequestHandle,
    SamplingParams,
    Seq,
    SeqEvent,
    batched_sends,
)
from server_shim.fast_decode import backend_decoder
from server_shim.fused_decode import fused_wanted
from server_shim.model_runner import DecodeStep, ModelRunner
from server_shim.scheduler import default_buckets, lowest_free

if TYPE_CHECKING:
    from server_shim.models import LoadedModel

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "SAMPLING_EPS", "Engine", "EngineBusy", "EngineFailure", "EngineStats", "RequestHandle", "SamplingParams",
    "SeqEvent", "stop_overlap",
]  # fmt: skip

_Seq = Seq  # the old private name, kept for callers that built retries by hand

# How long an idle worker waits for a burst of requests to finish arriving before it starts: the
# burst then shares its first prefill chunk, and its sequences take neighbouring slots.
_BATCH_WINDOW_S = 0.002


MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def mix_seed(seed: int) -> int:
    """The generator seed of a request seed. torch's CPU generator keeps only the low 32 bits of
    its seed, so seeds 1 and 2**32 + 1 drew the same samples: a seed outside [0, 2**32) is hashed
    (splitmix64) so that its high bits count too; one inside is kept as is (recorded baselines)."""
    if 0 <= seed < 2**32:
        return seed
    z = (seed + 0x9E37_79B9_7F4A_7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & MASK64
    return z ^ (z >> 31)


@dataclass
class EngineStats:
    """Counters since start (read by the benches; no effect on serving)."""

    prefill_chunks: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # real sequences summed over steps (padding rows not counted)
    decode_padded_rows: int = 0  # rows launched, padding included
    decode_seconds: float = 0.0  # wall time from a step's launch to its collection

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Engine(EngineSteps):
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        batch_invariant: bool = False,
        max_batch_size: int = 32,
        max_waiting: int = 256,
        cuda_graphs: bool | None = None,
        buckets: Sequence[int] | None = None,
        prefill_chunk: int | None = None,
        fused_decode: bool | None = None,
    ) -> None:
        """cuda_graphs: None = on for CUDA unless DIFFTEST_CUDA_GRAPHS=0. buckets: decode row
        counts (default 1, 2, 4, ... on CUDA, exact counts on the CPU). prefill_chunk: prompt
        tokens per prefill forward (default 2048 on CUDA, 512 on the CPU). fused_decode: None =
        on for CUDA unless DIFFTEST_FUSED_DECODE=0 (fused_decode.py: decode attention, norms and rotary
        in one Triton kernel each)."""
        self.loaded = loaded
        self.batch_invariant = batch_invariant
        self.max_batch_size = 1 if batch_invariant else max_batch_size
        # Backpressure: sequences queued beyond the running ones. Past it `submit` raises
        # EngineBusy (HTTP 429 + Retry-After) instead of growing memory and everyone's latency.
        self.max_waiting = max_waiting
        self.context_length = loaded.context_length
        self.vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        self._eos = set(loaded.eos_token_ids)
        pad = loaded.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        self._decoder = backend_decoder(loaded.tokenizer)  # detokenizing, without transformers' overhead
        cuda = loaded.device.type == "cuda"
        self._pad_shapes = cuda
        if buckets is None and cuda:
            buckets = default_buckets(self.max_batch_size)
        self.buckets = tuple(sorted({b for b in buckets if b >= 1})) if buckets else None
        if self.buckets and self.buckets[-1] < self.max_batch_size:
            self.buckets = (*self.buckets, self.max_batch_size)
        self.prefill_chunk = max(1, prefill_chunk or (2048 if cuda else 512))
        max_rows = max(self.max_batch_size, self.buckets[-1] if self.buckets else 1)
        self.runner = ModelRunner(
            loaded,
            max_rows=max_rows,
            cuda_graphs=graphs_wanted(loaded.device, cuda_graphs),
            fused=fused_wanted(loaded.device, fused_decode),
        )
        self.stats = EngineStats()
        self._slots: list[Seq | None] = [None] * self.max_batch_size
        self._arrivals = 0
        self._prefill_skips = 0  # decode steps run since prompts started waiting for a prefill
        self._inflight: tuple[DecodeStep, list[Seq | None], float] | None = None
        self._cond = threading.Condition()
        self._pending: deque[Seq] = deque()
        self._exclusive: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._closed = False
        self._rng = random.SystemRandom()
        self._thread = threading.Thread(target=self._worker, name="model-worker", daemon=True)
        self._thread.start()

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps are (still) replayed as CUDA graphs."""
        return self.runner.graphs is not None and self.runner.graphs.enabled

    # ------------------------------------------------------------------ async API (event loop)

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams, n: int = 1) -> RequestHandle:
        """Queue n sequences per prompt; choice index = prompt_index * n + j (OpenAI's order).
        A seeded request seeds choice j with mix_seed(seed) + j, so a choice's sample does not
        depend on what else is in the batch."""
        handle = RequestHandle(asyncio.get_running_loop(), len(prompts) * n)
        seqs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                seq = Seq(p * n + j, list(prompt), params, handle)
                if params.temperature >= SAMPLING_EPS:
                    seed = mix_seed(params.seed) if params.seed is not None else self._rng.getrandbits(63)
                    seq.generator = torch.Generator().manual_seed((seed + j) & MASK64)
                seqs.append(seq)
        with self._cond:
            if self._closed:
                raise EngineFailure("the engine is shut down")
            waiting = sum(1 for s in self._pending if not s.handle.cancelled)
            if waiting + len(seqs) > self.max_waiting:
                raise EngineBusy(
                    f"{waiting} sequences are waiting (the server's --max-waiting is {self.max_waiting}); "
                    "retry later"
                )
            self._pending.extend(seqs)
            self._cond.notify()
        return handle

    @property
    def waiting(self) -> int:
        """Live sequences queued and not yet admitted (a snapshot, for reporting and tests). A
        cancelled one still in the deque is not waiting: the worker drops it unrun."""
        with self._cond:
            return sum(1 for s in self._pending if not s.handle.cancelled)

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run fn on the model thread between steps (no step is in flight while it runs). Cancelled
        before the thread takes it, fn never runs."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        job = (fn, fut, loop)
        with self._cond:
            if self._closed:
                raise EngineFailure("the engine is shut down")
            self._exclusive.append(job)
            self._cond.notify()
        try:
            return await fut
        except asyncio.CancelledError:  # its caller left (a debug client hung up): a queued job never runs
            with self._cond:
                if job in self._exclusive:  # else it is running or done, and its answer is dropped
                    self._exclusive.remove(job)
            raise

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker thread

    def _worker(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # never leave callers waiting on a dead thread
            logger.exception("model worker died")
            self._abandon(exc)
        else:
            self._abandon(EngineFailure("the engine is shut down"))

    def _abandon(self, exc: BaseException) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
        live = [s for s in self._slots if s is not None and not s.finished]
        for handle in {id(s.handle): s.handle for s in pending + live}.values():
            handle._put(exc)

    def _busy(self) -> bool:
        return self._inflight is not None or any(s is not None for s in self._slots)

    def _loop_forever(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = None
            admitted: list[Seq] = []
            with self._cond:
                while not self._closed and not self._pending and not self._exclusive and not self._busy():
                    self._cond.wait()
                if self._closed:
                    return
                if self._exclusive and self._inflight is None:
                    job = self._exclusive.popleft()
                else:
                    if (
                        not self._busy()
                        and self.max_batch_size > 1
                        and len(self._pending) < self.max_batch_size
                    ):
                        self._cond.wait(timeout=_BATCH_WINDOW_S)  # let a burst finish arriving
                    admitted = self._admit()
            if job is not None:
                with device_lock(self.loaded.device):
                    self._run_job(*job)
                continue
            with device_lock(self.loaded.device), torch.inference_mode(), batched_sends():
                self._iteration(admitted)

    def _admit(self) -> list[Seq]:
        """Waiting sequences into free slots, in arrival order (lock held). A request with
        max_tokens 0 and no prompt logprobs needs no forward and takes no slot."""
        out: list[Seq] = []
        while self._pending:
            s = self._pending[0]
            if s.handle.cancelled:
                self._pending.popleft()
                continue
            if s.params.max_tokens == 0 and not (s.params.echo and s.params.logprobs is not None):
                out.append(self._pending.popleft())
                continue
            slot = lowest_free(self._slots)
            if slot is None:
                break
            self._pending.popleft()
            s.slot, s.arrival = slot, self._arrivals
            self._arrivals += 1
            self._slots[slot] = s
            out.append(s)
        return out

    def _iteration(self, admitted: list[Seq]) -> None:
        entries: list[Entry] = []
        for s in admitted:
            if s.slot is None:  # max_tokens 0, nothing to compute: echo and finish
                self._finish_prompt(s, None)
        if self._inflight is not None:
            step, rows, t0 = self._inflight
            self._inflight = None
            entries += self._collect(step, rows, t0)
        for s in self._slots:  # a client that went away: its slot is free for the next one
            if s is not None and s.handle.cancelled:
                s.finished = True
                self._release(s)
        entries += self._prefill_chunk()
        if not self._exclusive:  # a debug job waits: leave no step in flight
            entries += self._launch()
        for entry in entries:
            self._deliver(*entry)

    # ------------------------------------------------------------------ tokens -> events

    def _decide(self, s: Seq, row: list[float], lp_row: torch.Tensor | None) -> Entry | None:
        """Pick the token of one row (argmax, or the sequence's seeded sampler) and decide whether
        it ends the sequence; the event goes out later (`_deliver`)."""
        p = s.params
        if s.generator is not None:
            try:
                t = self._sample(lp_row, p, s.generator)
                logprob = float(lp_row[t])
            except Exception as exc:  # this sequence's sampler only: its neighbours go on
                self._fail(s, exc)
                return None
        else:
            t, logprob = int(row[0]), row[1]
        alts = None
        if p.logprobs is not None:
            alts = [(int(row[3 + 2 * j]), row[2 + 2 * j]) for j in range(p.logprobs)]
        s.out.append(t)
        reason = None
        if t in self._eos and not p.ignore_eos:
            reason = "eos"
        elif len(s.out) >= p.max_tokens or len(s.prompt) + len(s.out) >= self.context_length:
            reason = "length"
        if reason is not None:
            s.finished = True  # no further step; its event still goes out
            self._release(s)
        return s, t, (logprob if p.logprobs is not None else None), alts, reason

    def _deliver(self, s: Seq, t: int, logprob: float | None, alts: Any, reason: str | None) -> None:
        if s.handle.cancelled and reason is None:
            s.finished = True
            self._release(s)
            return
        try:
            if reason == "eos":
                # the EOS piece is not part of the text; bytes held back for a character it will
                # never complete are, as a finish by length releases them
                held = s.detok.flush()
                accept(s, s.detok.push(t, logprob, alts), "stop", add_text=False, tail=held)
            else:
                accept(s, s.detok.push(t, logprob, alts), reason)
        except Exception as exc:  # detokenizing / stop matching of one sequence: fail it alone
            self._fail(s, exc)
        if s.finished:
            self._release(s)

    def _release(self, s: Seq) -> None:
        if s.slot is not None and self._slots[s.slot] is s:
            self._slots[s.slot] = None
        s.slot = None

    def _fail(self, s: Seq, exc: Exception) -> None:
        """One sequence failed: its request gets the error (HTTP 500), the others go on."""
        logger.error("sequence %d failed: %r", s.index, exc, exc_info=exc)
        s.finished = True
        s.emitted = True
        self._release(s)
        s.handle._put(exc)  # before cancel's wake-up, so that `events` raises it
        s.handle.cancel()  # the request's other sequences stop at the next step

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        """Temperature, then top-k, then top-p (nucleus: the smallest set whose mass reaches top_p),
        sampled on the CPU with the sequence's own generator so a seed means the same draw anywhere.
        `logits` may be log-probs: softmax is shift-invariant."""
        x = (logits.float() / p.temperature).cpu()
        if 0 < p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            drop = sp.cumsum(-1) - sp >= p.top_p  # mass before this token already reached top_p
            drop[0] = False  # the likeliest token always stays (top_p 1e-46 is 0.0 in float32)
            probs = torch.zeros_like(probs).scatter_(0, si, sp.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=gen).item())

    # ------------------------------------------------------------------ exclusive jobs

    @staticmethod
    def _run_job(fn: Callable[[], Any], fut: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        try:
            result = fn()
        except BaseException as exc:  # delivered to the awaiting caller, which decides
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)
