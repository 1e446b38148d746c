"""Scheduling arithmetic of the engine, free of torch and threads: slot allocation, bucket sizes,
and which prompt tokens go into the next prefill chunk.

Continuous batching in one paragraph: a sequence gets the lowest free slot when it is admitted and
keeps it until it finishes; each engine iteration runs at most one prefill chunk (a token budget,
split over the sequences still reading their prompts) and one decode step over every slot that
is generating. A sequence that finishes frees its slot at once, and the next waiting one takes
it before the following step: nobody waits for the longest sequence of "its" batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_BUCKETS",
    "PrefillItem",
    "bucket",
    "default_buckets",
    "lowest_free",
    "plan_prefill",
    "pow2_at_least",
]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    n = max(n, floor, 1)
    return 1 << (n - 1).bit_length()


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """DEFAULT_BUCKETS up to max_rows, plus max_rows itself when it is not one of them."""
    out = [b for b in DEFAULT_BUCKETS if b < max_rows]
    return (*out, max_rows)


def bucket(n: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket >= n (buckets sorted); n itself without buckets or past the largest."""
    if buckets:
        for b in buckets:
            if b >= n:
                return b
    return n


def lowest_free(slots: Sequence[Any]) -> int | None:
    """Index of the first None (lowest free slot: busy slots stay packed at the bottom, so decode
    steps run over the fewest rows)."""
    for i, s in enumerate(slots):
        if s is None:
            return i
    return None


@dataclass(frozen=True)
class PrefillItem:
    seq: Any
    start: int  # first prompt position of this chunk
    length: int  # prompt tokens in this chunk


def plan_prefill(todo: Sequence[Any], budget: int) -> list[PrefillItem]:
    """The next chunk: prompt tokens of `todo` (sequences with `.prompt`, `.cached`, `.solo`,
    `.handle`; in admission order) up to `budget` tokens, earliest sequences first, the last one
    possibly cut. Sequences under suspicion (`solo`: a shared chunk failed) go one request at a time,
    so that a failure names its culprit."""
    solo = next((s for s in todo if s.solo), None)
    if solo is not None:
        todo = [s for s in todo if s.handle is solo.handle]
    items: list[PrefillItem] = []
    left = budget
    for s in todo:
        if left <= 0:
            break
        n = min(len(s.prompt) - s.cached, left)
        if n <= 0:
            continue
        items.append(PrefillItem(s, s.cached, n))
        left -= n
    return items
