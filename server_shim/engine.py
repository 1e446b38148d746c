"""Model runner: one worker thread that batches requests, prefills, decodes with a KV cache, samples.

Why one thread: torch calls release the GIL, so the event loop stays responsive while the model
runs, and a single owner of the model means no locks around the KV cache or the hooks that the
debug routes install (`run_exclusive` runs them between batches).

Batching is static: the worker takes every pending sequence (up to `max_batch_size`), left-pads
them into one batch (attention mask + position ids from the mask, so padding changes no real
token's position) and decodes until all of them finish; finished rows are dropped from the cache.
Batched matmuls round differently from single-row ones, so results can differ from serial ones
in the last bits; `batch_invariant=True` serves one sequence at a time for bit-exact answers.

Logprobs are float32 `log_softmax` of the raw logits (before temperature / top-p), as vLLM
reports them. Text is built from per-token pieces (IncrementalDetokenizer, detok.py) that
concatenate exactly to it, so `text_offset` and streamed chunks line up with the text.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from server_shim.detok import IncrementalDetokenizer, TokenInfo, decode_prompt

if TYPE_CHECKING:
    from server_shim.models import LoadedModel

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Engine", "EngineBusy", "EngineFailure", "RequestHandle", "SamplingParams", "SeqEvent"]

# How long the worker waits for a burst of requests to finish arriving before it closes a batch.
_BATCH_WINDOW_S = 0.002
# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): logits / 1e-39 overflow float32
# to inf and the softmax to NaN, so a "nearly greedy" request would otherwise fail its sampler.
SAMPLING_EPS = 1e-5


class EngineFailure(RuntimeError):
    """The model worker failed on a batch (a server bug, not a caller error): becomes a 500."""


class EngineBusy(RuntimeError):
    """More sequences are waiting than `max_waiting`: the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy (argmax; ties go to the lowest token id)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # number of alternatives; None = no logprobs
    echo: bool = False
    ignore_eos: bool = False


@dataclass(frozen=True)
class SeqEvent:
    """What one sequence (one choice) produced in one step. `text` is the text released by this step:
    stop strings cut it, and a suffix that might still become a stop string is held back."""

    index: int
    tokens: tuple[TokenInfo, ...]
    text: str
    finish_reason: str | None = None
    prompt: bool = False  # the echo event: tokens are the prompt's


_WAKE: Any = object()  # queued by cancel(): lets a waiting `events` see the cancellation


class RequestHandle:
    """The async side of one request: events of all its sequences, in the order they happen."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_seqs: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._remaining = num_seqs
        self.cancelled = False

    def _put(self, item: SeqEvent | BaseException) -> None:  # worker thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def events(self) -> AsyncIterator[SeqEvent]:
        """Events until every sequence finished; ends early (without error) once cancelled."""
        try:
            while self._remaining:
                item = await self._queue.get()
                if item is _WAKE:
                    if self._queue.empty():  # cancelled, and whatever was sent before is consumed
                        return
                    continue
                if isinstance(item, BaseException):
                    raise EngineFailure(f"model worker failed: {item!r}") from item
                if item.finish_reason is not None:
                    self._remaining -= 1
                yield item
        finally:
            # A client that went away (or an error) stops its sequences at the next step.
            self.cancel()

    def cancel(self) -> None:
        """Stop this request's sequences at their next step (any thread); wakes `events`."""
        if not self.cancelled:
            self.cancelled = True
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _WAKE)


class _Seq:
    """Mutable per-sequence state; touched only by the worker thread."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        handle: RequestHandle,
        generator: torch.Generator | None = None,
        *,
        solo: bool = False,
    ) -> None:
        self.index = index
        self.prompt = prompt
        self.params = params
        self.handle = handle
        self.generator = generator
        self.out: list[int] = []
        self.detok: IncrementalDetokenizer | None = None
        self.text = ""  # generated text so far, cut at a stop string
        self.released = 0  # chars of self.text already sent
        self.finished = False
        self.emitted = False  # an event went out: the sequence cannot be re-run from scratch
        self.solo = solo  # failed inside a shared batch: retried alone to find the culprit


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        batch_invariant: bool = False,
        max_batch_size: int = 32,
        max_waiting: int = 256,
    ) -> None:
        self.loaded = loaded
        self.batch_invariant = batch_invariant
        self.max_batch_size = 1 if batch_invariant else max_batch_size
        # Backpressure: sequences queued beyond the running batch. Past it `submit` raises
        # EngineBusy (HTTP 429 + Retry-After) instead of growing memory and everyone's latency.
        self.max_waiting = max_waiting
        self.context_length = loaded.context_length
        emb = loaded.model.get_input_embeddings()
        self.vocab_size = int(emb.num_embeddings)
        self._eos = set(loaded.eos_token_ids)
        pad = loaded.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None and 0 <= pad < self.vocab_size else 0
        self._cond = threading.Condition()
        self._pending: deque[_Seq] = deque()
        self._exclusive: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._closed = False
        self._rng = random.SystemRandom()
        self._thread = threading.Thread(target=self._worker, name="model-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ async API (event loop)

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams, n: int = 1) -> RequestHandle:
        """Queue n sequences per prompt; choice index = prompt_index * n + j (OpenAI's order).
        A seeded request seeds choice j with seed + j, so a choice's sample does not depend on
        what else is in the batch."""
        handle = RequestHandle(asyncio.get_running_loop(), len(prompts) * n)
        seqs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                seq = _Seq(p * n + j, list(prompt), params, handle)
                if params.temperature >= SAMPLING_EPS:
                    seed = (params.seed + j) if params.seed is not None else self._rng.getrandbits(63)
                    seq.generator = torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
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
        """Live sequences queued and not yet in a batch (a snapshot, for reporting and tests). A
        cancelled one still in the deque is not waiting: the worker drops it unrun."""
        with self._cond:
            return sum(1 for s in self._pending if not s.handle.cancelled)

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run fn on the model thread between batches (no batch is in flight while it runs)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._cond:
            if self._closed:
                raise EngineFailure("the engine is shut down")
            self._exclusive.append((fn, fut, loop))
            self._cond.notify()
        return await fut

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
            with self._cond:
                self._closed = True
                pending, self._pending = list(self._pending), deque()
            for seq in pending:
                seq.handle._put(exc)

    def _loop_forever(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = None
            batch: list[_Seq] = []
            with self._cond:
                while not self._closed and not self._pending and not self._exclusive:
                    self._cond.wait()
                if self._closed:
                    return
                if self._exclusive:
                    job = self._exclusive.popleft()
                else:
                    # Requests that arrive together (a client's burst) should share one batch: the
                    # first one wakes us, so give the rest a moment before the batch is closed.
                    if self.max_batch_size > 1 and len(self._pending) < self.max_batch_size:
                        self._cond.wait(timeout=_BATCH_WINDOW_S)
                    batch = self._take_batch()
            if job is not None:
                self._run_job(*job)
            elif batch:
                try:
                    with torch.inference_mode():
                        self._run_batch(batch)
                except Exception as exc:
                    self._isolate_failure(batch, exc)

    def _take_batch(self) -> list[_Seq]:
        """Up to max_batch_size live sequences, in arrival order; a `solo` one (under suspicion
        after a shared batch failed) runs alone. Called with the lock held."""
        batch: list[_Seq] = []
        while self._pending and len(batch) < self.max_batch_size:
            seq = self._pending[0]
            if seq.handle.cancelled:
                self._pending.popleft()
                continue
            if seq.solo and batch and batch[0].handle is not seq.handle:
                break
            if batch and batch[0].solo and batch[0].handle is not seq.handle:
                break
            batch.append(self._pending.popleft())
        return batch

    def _isolate_failure(self, batch: list[_Seq], exc: Exception) -> None:
        """A batch failed (a bug, or an input that breaks the model): one request must not fail its
        neighbours. With several requests in the batch, every request that has not emitted anything
        yet is queued again, alone; one that fails alone gets the error (HTTP 500), and one that had
        already streamed events cannot be replayed and gets it too."""
        handles = {id(s.handle): s.handle for s in batch}
        logger.error(
            "model worker failed on a batch of %d sequences (%d requests): %r", len(batch), len(handles), exc,
            exc_info=exc if len(handles) == 1 else None,
        )  # fmt: skip
        retry: list[_Seq] = []
        for handle in handles.values():
            seqs = [s for s in batch if s.handle is handle]
            if len(handles) > 1 and not any(s.emitted for s in seqs):
                retry.extend(_Seq(s.index, s.prompt, s.params, handle, s.generator, solo=True) for s in seqs)
            else:
                handle._put(exc)
        if retry:
            with self._cond:
                self._pending.extendleft(reversed(retry))

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

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, keep: int):
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits, out.past_key_values

    def _run_batch(self, seqs: list[_Seq]) -> None:
        dev = self.loaded.device
        tok = self.loaded.tokenizer
        lens = [len(s.prompt) for s in seqs]
        width = max(lens)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every row's last prompt token is at column -1
            ids[i, width - lens[i] :] = torch.tensor(s.prompt)
            mask[i, width - lens[i] :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt_lp = any(s.params.echo and s.params.logprobs is not None for s in seqs)
        logits, cache = self._forward(ids, mask, pos, None, 0 if prompt_lp else 1)  # [B, width|1, V]

        for i, s in enumerate(seqs):
            if s.params.echo:
                rows = logits[i, width - lens[i] : -1] if s.params.logprobs is not None else None
                infos, text = decode_prompt(tok, s.prompt, rows, s.params.logprobs)
                s.emitted = True
                s.handle._put(SeqEvent(s.index, infos, text, prompt=True))
            s.detok = IncrementalDetokenizer(tok, s.prompt)
            if s.params.max_tokens == 0:
                self._accept(s, None, "length")

        last = logits[:, -1, :]  # [B, V]
        alive = [i for i, s in enumerate(seqs) if not s.finished]
        next_pos = pos[:, -1]
        while True:
            if len(alive) < len(seqs) or any(s.handle.cancelled for s in seqs):
                keep = [i for i in alive if not seqs[i].handle.cancelled]
                if not keep:
                    return
                if len(keep) < len(seqs):
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    last, mask, next_pos = last[idx], mask[idx], next_pos[idx]
                    seqs = [seqs[i] for i in keep]
            chosen = self._step(seqs, last)
            alive = [i for i, s in enumerate(seqs) if not s.finished]
            if not alive:
                return
            next_pos = next_pos + 1
            mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], dim=1)
            step_ids = torch.tensor(chosen, dtype=torch.long, device=dev).unsqueeze(1)
            logits, cache = self._forward(step_ids, mask, next_pos.unsqueeze(1), cache, 1)
            last = logits[:, -1, :]

    def _step(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Pick one token per row of logits [B, V], emit its event; returns the chosen ids."""
        lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V] float32
        chosen = torch.argmax(lp, dim=-1).tolist()
        for i, s in enumerate(seqs):
            if s.generator is not None and not s.finished:
                try:
                    chosen[i] = self._sample(logits[i].float(), s.params, s.generator)
                except Exception as exc:  # this sequence's sampler only: its neighbours go on
                    self._fail(s, exc)
        k = max((s.params.logprobs or 0) for s in seqs)
        top_v = top_i = None
        if k > 0:
            top_v, top_i = (t.tolist() for t in torch.topk(lp, k, dim=-1))
        wanted = [s.params.logprobs is not None for s in seqs]
        chosen_lp = (
            lp.gather(1, torch.tensor(chosen, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
            if any(wanted)
            else None
        )
        for i, s in enumerate(seqs):
            if s.finished:
                continue
            try:
                self._emit(s, chosen[i], chosen_lp[i] if chosen_lp else None, top_i, top_v, i)
            except Exception as exc:  # detokenizing / stop matching of one sequence: fail it alone
                self._fail(s, exc)
        return chosen

    def _emit(self, s: _Seq, t: int, logprob: float | None, top_i: Any, top_v: Any, row: int) -> None:
        s.out.append(t)
        if s.params.logprobs is not None:
            kk = s.params.logprobs
            alts = list(zip(top_i[row][:kk], top_v[row][:kk], strict=True)) if kk else []
            info = s.detok.push(t, logprob, alts)
        else:
            info = s.detok.push(t, None, None)
        if t in self._eos and not s.params.ignore_eos:
            self._accept(s, info, "stop", add_text=False)  # the EOS piece is not part of the text
        elif len(s.out) >= s.params.max_tokens or len(s.prompt) + len(s.out) >= self.context_length:
            self._accept(s, info, "length")
        else:
            self._accept(s, info, None)

    @staticmethod
    def _fail(s: _Seq, exc: Exception) -> None:
        """One sequence failed: its request gets the error (HTTP 500), the batch goes on without it."""
        logger.error("sequence %d failed: %r", s.index, exc, exc_info=exc)
        s.finished = True
        s.emitted = True
        s.handle._put(exc)  # before cancel's wake-up, so that `events` raises it
        s.handle.cancel()  # the request's other sequences stop at the next step

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        """Temperature, then top-k, then top-p (nucleus: the smallest set whose mass reaches top_p),
        sampled on the CPU with the sequence's own generator so a seed means the same draw anywhere."""
        x = (logits / p.temperature).cpu()
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

    @staticmethod
    def _accept(s: _Seq, info: TokenInfo | None, reason: str | None, add_text: bool = True) -> None:
        """Add a token's piece to the text, cut at the first stop string, emit the event."""
        if reason is not None and info is not None and add_text:
            rest = s.detok.flush()
            if rest:
                info = TokenInfo(info.token_id, info.text + rest, info.logprob, info.top)
        end = None
        if info is not None and add_text:
            before = len(s.text)
            s.text += info.text
            stops = s.params.stop
            if stops:
                start = max(0, before - max(len(x) for x in stops) + 1)
                hits = [h for h in (s.text.find(x, start) for x in stops) if h >= 0]
                if hits:
                    s.text, reason = s.text[: min(hits)], "stop"
                elif reason is None:  # hold back a suffix that may still grow into a stop string
                    end = len(s.text) - max(stop_overlap(s.text, x) for x in stops)
        end = len(s.text) if end is None else end
        text = s.text[s.released : end]
        s.released = max(s.released, end)
        s.finished = reason is not None
        s.emitted = True
        s.handle._put(SeqEvent(s.index, (info,) if info is not None else (), text, reason))


def stop_overlap(text: str, stop: str) -> int:
    """The longest k < len(stop) with text ending in stop[:k]: how much text to hold back.

    Only positions where stop holds text's last character can end such a prefix, so this tries
    those (str.find, in C) instead of every k — a few candidates instead of len(stop) slices per
    token, which with the caps on stop strings keeps matching cheap on the model thread."""
    if not text:
        return 0
    last, best = text[-1], 0
    i = stop.find(last, 0, len(stop) - 1)
    while i >= 0:
        if text.endswith(stop[: i + 1]):
            best = i + 1
        i = stop.find(last, i + 1, len(stop) - 1)
    return best
