"""The engine's request-side types: sampling parameters, events, the async handle of a request,
the per-sequence state, and the two errors callers see (EngineBusy -> 429, EngineFailure -> 500).

Split from engine.py so that the scheduling loop reads on its own; everything here is re-exported
by server_shim.engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from server_shim.detok import IncrementalDetokenizer, TokenInfo

__all__ = ["SAMPLING_EPS", "EngineBusy", "EngineFailure", "RequestHandle", "SamplingParams", "SeqEvent"]

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

# Events the model thread sends during one engine iteration, per event loop, delivered with one
# call_soon_threadsafe each at its end (`batched_sends`): one wake-up of the event loop per step
# instead of one per token (each is a syscall, and a GIL hand-off the step pays for).
_OUTBOX = threading.local()


def _send(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: Any) -> None:
    box = getattr(_OUTBOX, "items", None)
    if box is None:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    else:
        box.append((loop, queue, item))


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


@contextlib.contextmanager
def batched_sends() -> Iterator[None]:
    """Within the block, this thread's sends to request handles are held and then delivered in
    order, one callback per event loop (a closed loop's share is dropped: nobody listens)."""
    _OUTBOX.items = []
    try:
        yield
    finally:
        items, _OUTBOX.items = _OUTBOX.items, None
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for loop, queue, item in items:
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(_put_all, batch)


class RequestHandle:
    """The async side of one request: events of all its sequences, in the order they happen."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_seqs: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._remaining = num_seqs
        self.cancelled = False

    def _put(self, item: SeqEvent | BaseException) -> None:  # worker thread
        _send(self._loop, self._queue, item)

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
            _send(self._loop, self._queue, _WAKE)  # after this thread's held sends, in order


class Seq:
    """Mutable per-sequence state; touched only by the worker thread (and read by tests)."""

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
        self.emitted = False  # an event went out
        self.solo = solo  # its prefill failed inside a shared chunk: retried alone to find the culprit
        self.slot: int | None = None  # KV-cache slot while admitted
        self.cached = 0  # prompt tokens already in the KV cache
        self.prompt_logits: list[torch.Tensor] = []  # echo + logprobs: float32 rows, chunk by chunk
        self.arrival = 0  # admission order: earlier sequences prefill first
