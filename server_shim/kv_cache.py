"""A static, slot-indexed KV cache that HF attention modules write into through `Cache.update`.

Why through HF's own `Cache` interface: the engine runs the loaded model's own forward (its module
names, the debug hooks, quantized linears, faults and the rounding twin all stay in the path), and
every HF attention module hands its new keys and values to `cache.update` and attends over what
that returns. So one cache class serves Llama-style GQA and DeepSeek's MLA latents alike.

Layout, per layer and for keys and values separately: `[slots + 1, heads, positions + 1, dim]`.
A sequence owns one slot for its whole life; position p of its prompt or output lives at column p.
The extra slot and the extra column are scratch: padding tokens and idle rows write there, and no
read ever covers them, so a captured CUDA graph can write for every row without host branches.

Reads: a decode step's rows are the slots themselves (`rows=None`: a view `[:rows, :, :kv_len]`,
no copy); a prefill chunk names its rows' slots (`read_slots`: a gather). Capacity grows by
doubling (slots and positions) only between forwards; `generation` counts the reallocations so
that captured graphs, which hold the old addresses, are thrown away.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # subclassing HF's Cache keeps any isinstance check in the modeling code happy
    from transformers.cache_utils import Cache as _HFCache
except ImportError:  # pragma: no cover - transformers always ships it
    _HFCache = object  # type: ignore[assignment,misc]

__all__ = ["CachePlan", "SlotKVCache"]


@dataclass
class CachePlan:
    """Where one forward writes and what it reads (tensors on the cache's device).

    write_slots [B, 1] and write_pos [B, T]: the cache cell of every input token (scratch for
    padding). read_slots [B] or None (row i is slot i); kv_len: how many positions each row's
    attention covers (the caller's mask hides the ones past a row's own position)."""

    write_slots: Tensor
    write_pos: Tensor
    read_slots: Tensor | None
    kv_len: int


class SlotKVCache(_HFCache):  # type: ignore[misc,valid-type]
    def __init__(self, device: torch.device, dtype: torch.dtype, slots: int = 1, positions: int = 64) -> None:
        with contextlib.suppress(TypeError):  # an HF Cache that takes no layers: none of it is used
            super().__init__(layers=[])  # type: ignore[call-arg]
        self.device, self.dtype = device, dtype
        self.slots, self.positions = slots, positions  # capacity (scratch excluded)
        self.k: list[Tensor] = []  # per layer [slots + 1, heads, positions + 1, dim]
        self.v: list[Tensor] = []
        self.plan: CachePlan | None = None
        self.generation = 0  # bumped on every reallocation

    # ------------------------------------------------------------------ capacity

    @property
    def scratch_slot(self) -> int:
        return self.slots

    @property
    def scratch_pos(self) -> int:
        return self.positions

    def ensure(self, slots: int, positions: int) -> bool:
        """Grow (doubling) to hold `slots` slots of `positions` positions; True if it reallocated."""
        new_s, new_p = self.slots, self.positions
        while new_s < slots:
            new_s *= 2
        while new_p < positions:
            new_p *= 2
        if (new_s, new_p) == (self.slots, self.positions):
            return False
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                h, d = old.shape[1], old.shape[3]
                new = torch.zeros((new_s + 1, h, new_p + 1, d), dtype=old.dtype, device=old.device)
                new[: self.slots, :, : self.positions] = old[: self.slots, :, : self.positions]
                store[i] = new
        self.slots, self.positions = new_s, new_p
        self.generation += 1
        return True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def _alloc(self, like: Tensor) -> Tensor:
        # zeros, not empty: idle rows attend to a scratch cell, and garbage there must be finite
        shape = (self.slots + 1, like.shape[1], self.positions + 1, like.shape[3])
        return torch.zeros(shape, dtype=like.dtype, device=self.device)

    # ------------------------------------------------------------------ HF Cache interface

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """Write this forward's keys/values [B, heads, T, dim] at the plan's cells; return every
        row's keys/values [B, heads, kv_len, dim] (a view for decode, a gather for prefill)."""
        plan = self.plan
        assert plan is not None, "SlotKVCache used outside a planned forward"
        if layer_idx == len(self.k):  # first forward: shapes come from the model itself
            self.k.append(self._alloc(key_states))
            self.v.append(self._alloc(value_states))
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        kc[plan.write_slots, :, plan.write_pos] = key_states.transpose(1, 2).to(kc.dtype)  # [B, T, H, D]
        vc[plan.write_slots, :, plan.write_pos] = value_states.transpose(1, 2).to(vc.dtype)
        n = plan.kv_len
        if plan.read_slots is None:
            rows = key_states.shape[0]
            return kc[:rows, :, :n], vc[:rows, :, :n]
        return kc[plan.read_slots, :, :n], vc[plan.read_slots, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only asked when position_ids are missing
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return (self.plan.kv_len if self.plan else query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.k)

    def __repr__(self) -> str:
        return f"SlotKVCache(slots={self.slots}, positions={self.positions}, layers={len(self.k)})"


def attention_mask(pos: Tensor, kv_len: int, dtype: torch.dtype | None, arange: Tensor) -> Tensor:
    """[B, 1, T, kv_len]: row b's query t sees positions <= pos[b, t]. dtype None: a boolean mask
    (SDPA takes it as is); else additive (0 or dtype min), for attention code that adds the mask.

    Built on the device from the position tensor, so a captured graph rebuilds it on every replay.
    `arange` is a preallocated arange(>= kv_len) on the device (no allocation from host data)."""
    seen = arange[:kv_len].view(1, 1, kv_len) <= pos.unsqueeze(-1)  # [B, T, kv_len]
    if dtype is None:
        return seen.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=pos.device)
    return torch.where(seen, zero, low).unsqueeze(1)
