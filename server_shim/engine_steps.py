"""The engine's two kinds of forward step, and how each survives a failure: a prefill chunk
(prompt tokens of the sequences still reading their prompts, up to a token budget) and a decode
step (one token for every generating slot). A mixin of `Engine` (engine.py), which owns the
state these read: slots, runner, stats, and the per-sequence `_decide` / `_fail` / `_release`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from server_shim.detok import IncrementalDetokenizer, decode_prompt
from server_shim.engine_output import accept
from server_shim.engine_types import Seq, SeqEvent
from server_shim.model_runner import DecodeStep
from server_shim.scheduler import bucket, plan_prefill, pow2_at_least

logger = logging.getLogger("server_shim.engine")
T = TypeVar("T")

# Shapes are padded to powers of two (no smaller than these) so that per-shape costs (Triton
# autotuning, graph captures, oneDNN setup) are paid for a handful of shapes, not hundreds.
_MIN_KV = 64
_MIN_CHUNK_COLS = 16
# On a GPU an eager prefill forward costs ~10 ms of kernel launches whatever its size, while a
# replayed decode step costs ~3: prompts that arrive one by one while others decode are gathered
# for up to this many steps (or until half a chunk waits) and prefilled together.
_PREFILL_EVERY = 8

Entry = tuple[Seq, int, float | None, list[tuple[int, float]] | None, str | None]


class EngineSteps:
    """Prefill chunks and decode steps (mixed into Engine)."""

    _slots: list[Seq | None]
    _inflight: Any
    # ------------------------------------------------------------------ prefill

    def _forward(self, ids: torch.Tensor, run: Callable[[torch.Tensor], T]) -> T:
        """Every model call goes through here with its input ids (tests inject failures by id)."""
        return run(ids)

    def _prefill_chunk(self) -> list[Entry]:
        todo = sorted(
            (s for s in self._slots if s is not None and not s.finished and s.cached < len(s.prompt)),
            key=lambda s: s.arrival,
        )
        if not todo or not self._prefill_due(todo):
            return []
        items = plan_prefill(todo, self.prefill_chunk)
        if not items:
            return []
        width = max(it.length for it in items)
        rows = len(items)
        if self._pad_shapes:  # few distinct shapes on a GPU (autotuning, allocator)
            width = min(pow2_at_least(width, _MIN_CHUNK_COLS), max(width, self.prefill_chunk))
            rows = pow2_at_least(rows)
        end = max(it.start + it.length for it in items)
        kv_len = self._kv_len(end)
        runner = self.runner
        runner.ensure(max(it.seq.slot for it in items) + 1, kv_len)
        cache = runner.cache
        ids = torch.full((rows, width), self._pad_id, dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        wpos = torch.full((rows, width), cache.scratch_pos, dtype=torch.long)
        wslot = torch.full((rows,), cache.scratch_slot, dtype=torch.long)
        last = torch.zeros((rows,), dtype=torch.long)
        echo: list[tuple[int, int]] = []
        for r, it in enumerate(items):
            s, a, n = it.seq, it.start, it.length
            ids[r, :n] = torch.tensor(s.prompt[a : a + n])
            pos[r] = torch.arange(a, a + width).clamp(max=a + n - 1)  # padding repeats the last position
            wpos[r, :n] = torch.arange(a, a + n)
            wslot[r], last[r] = s.slot, n - 1
            if s.params.echo and s.params.logprobs is not None:
                echo.append((r, min(a + n, len(s.prompt) - 1) - a))  # position j-1 predicts token j

        def run(x: torch.Tensor):  # noqa: ANN202
            return runner.prefill(x, pos, wslot, wpos, wslot, kv_len, last, echo)

        try:
            packed, lp, extra = self._forward(ids, run)
        except Exception as exc:
            self._prefill_failed(items, exc)
            return []
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += sum(it.length for it in items)
        entries: list[Entry] = []
        done = []
        for r, it in enumerate(items):
            s = it.seq
            s.cached += it.length
            if r in extra:
                s.prompt_logits.append(extra[r])
            if s.cached == len(s.prompt):
                done.append(r)
        sampled = [r for r in done if items[r].seq.generator is not None]
        lp_rows = dict(zip(sampled, lp.index_select(0, torch.tensor(sampled, device=lp.device)).cpu(), strict=True)) if sampled else {}  # fmt: skip
        for r in done:
            s = items[r].seq
            self._finish_prompt(s, s.prompt_logits)
            if not s.finished:
                entry = self._decide(s, packed[r], lp_rows.get(r))
                if entry is not None:
                    entries.append(entry)
        return entries

    def _prefill_due(self, todo: list[Seq]) -> bool:
        """Prefill now, or gather more prompts first (GPU only, and only while others decode)."""
        decoding = any(s is not None and not s.finished and s.out for s in self._slots)
        waiting = sum(len(s.prompt) - s.cached for s in todo)
        if (
            not self._pad_shapes
            or not decoding
            or self._prefill_skips >= _PREFILL_EVERY
            or waiting >= self.prefill_chunk // 2
        ):
            self._prefill_skips = 0
            return True
        self._prefill_skips += 1
        return False

    def _failed_alone(self, seqs: list[Seq], what: str, exc: Exception) -> bool:
        """Log a forward over `seqs` that raised; when they all belong to one request there is no
        neighbour to shield, so that request gets the error here (True)."""
        requests = len({id(s.handle) for s in seqs})
        logger.error(
            "model worker failed on %s of %d sequences (%d requests): %r", what, len(seqs), requests, exc,
            exc_info=exc if requests == 1 else None,
        )  # fmt: skip
        if requests != 1:
            return False
        for s in seqs:
            self._fail(s, exc)
        return True

    def _prefill_failed(self, items: list, exc: Exception) -> None:
        """A chunk failed (a bug, or an input that breaks the model): one request must not fail
        its neighbours. With several requests in the chunk, each one's prefill is redone alone
        (re-writing the same cache cells is harmless); one that fails alone gets the error."""
        if self._failed_alone([it.seq for it in items], "a prefill chunk", exc):
            return
        for it in items:
            it.seq.solo, it.seq.cached, it.seq.prompt_logits = True, 0, []

    def _finish_prompt(self, s: Seq, rows: list[torch.Tensor] | None) -> None:
        """The whole prompt is in the cache (or needs no forward): echo it, start detokenizing."""
        tok = self._decoder
        try:
            if s.params.echo:
                logits = torch.cat(rows) if rows and s.params.logprobs is not None else None
                infos, text = decode_prompt(tok, s.prompt, logits, s.params.logprobs)
                s.emitted = True
                s.handle._put(SeqEvent(s.index, infos, text, prompt=True))
            s.prompt_logits = []
            s.detok = IncrementalDetokenizer(tok, s.prompt)
            if s.params.max_tokens == 0:
                accept(s, None, "length")
        except Exception as exc:  # this sequence's echo only
            self._fail(s, exc)
        if s.finished:
            self._release(s)

    # ------------------------------------------------------------------ decode

    @staticmethod
    def _kv_len(n: int) -> int:
        # Powers of two on every device: CPU (oneDNN) kernels also pay a one-time setup per shape
        # (the first 32-token run was 4x slower with exact lengths); the extra masked keys are cheap.
        return pow2_at_least(n, _MIN_KV)

    def _launch(self) -> list[Entry]:
        """Launch a decode step over every generating slot; returns entries only when a failure
        made it run (and collect) request by request."""
        live = [
            s for s in self._slots if s is not None and not s.finished and s.out and s.cached == len(s.prompt)
        ]
        if not live:
            return []
        try:
            self._inflight = self._decode(live)
        except Exception as exc:
            return self._decode_failed(live, exc)
        return []

    def _decode(self, live: list[Seq]) -> tuple[DecodeStep, list[Seq | None], float]:
        n = bucket(max(s.slot for s in live) + 1, self.buckets)
        kv_len = self._kv_len(max(len(s.prompt) + len(s.out) for s in live))
        runner = self.runner
        runner.ensure(n, kv_len)
        rows: list[Seq | None] = [None] * n
        for s in live:
            rows[s.slot] = s
        ids = [self._pad_id] * n
        pos = [0] * n
        wpos = [runner.cache.scratch_pos] * n  # idle rows write the scratch column
        for s in live:
            ids[s.slot] = s.out[-1]
            pos[s.slot] = wpos[s.slot] = len(s.prompt) + len(s.out) - 1
        k = max((s.params.logprobs or 0) for s in live)
        cols = 2 + 2 * k
        t0 = time.perf_counter()
        step = self._forward(
            torch.tensor(ids), lambda x: runner.decode(x, torch.tensor(pos), torch.tensor(wpos), kv_len, cols)
        )
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(live)
        self.stats.decode_padded_rows += n
        return step, rows, t0

    def _collect(self, step: DecodeStep, rows: list[Seq | None], t0: float) -> list[Entry]:
        try:
            packed = step.packed_rows()
            self.stats.decode_seconds += time.perf_counter() - t0
            sampled = [
                r for r, s in enumerate(rows) if s is not None and s.generator is not None and not s.finished
            ]
            lp_rows = dict(zip(sampled, step.lp_rows(sampled), strict=True)) if sampled else {}
        except Exception as exc:  # an asynchronous device error surfaced here
            return self._decode_failed([s for s in rows if s is not None and not s.finished], exc)
        entries = []
        for r, s in enumerate(rows):
            if s is None or s.finished or s.handle.cancelled:
                continue  # finished by a stop string or cancelled after the launch: row ignored
            entry = self._decide(s, packed[r], lp_rows.get(r))
            if entry is not None:
                entries.append(entry)
        return entries

    def _decode_failed(self, live: list[Seq], exc: Exception) -> list[Entry]:
        """A decode step failed: each request's rows run again alone (a step's cache writes are
        idempotent); a request that fails alone, or that was alone, gets the error."""
        if self._failed_alone(live, "a decode step", exc):
            return []
        entries: list[Entry] = []
        for handle in {id(s.handle): s.handle for s in live}.values():
            mine = [s for s in live if s.handle is handle]
            try:
                step, rows, t0 = self._decode(mine)
                entries += self._collect(step, rows, t0)
            except Exception as alone:  # noqa: BLE001 - this request's own failure
                for s in mine:
                    self._fail(s, alone)
        return entries
