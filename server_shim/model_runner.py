"""The model's forward for the engine: prefill chunks and decode steps over a SlotKVCache, with the
output head (log-softmax, argmax, top-k) on the device.

What runs is the loaded model's own base model and `lm_head` modules (`model.model`,
`get_output_embeddings()`), called as modules: HF's attention, norms, MLP / MoE, quantized linears
with their faults, the rounding twin's hooks all act as they do in `model(...)`. What this adds is
where keys and values live (kv_cache.py) and a 4-D additive mask built from each row's positions,
so rows of one forward can be different sequences at different lengths.

Only small tensors leave the device per row: `packed` = [argmax id, its log-prob, then top-k
(log-prob, id) pairs] as float32 (ids below 2**24 are exact in float32), one copy per step. The
full log-prob row is fetched only for rows that sample on the CPU with their own seed.

Decode steps take `rows` = a bucket size and read the cache rows 0..rows-1 as the slots
themselves; `kv_len` = a bucket of the longest position. With the same rows and kv_len, the
eager body and its captured graph launch the same kernels on the same shapes, so their greedy
tokens are the same (checked on a GPU by bench/engine_gpu_check.py).

With `fused` (on by default on a GPU), the decode body runs inside `fused_decode.decode_context`: the
attention modules' registered function takes one Triton kernel that reads each row's position
from the static input, RMSNorm modules one kernel each, and the modeling file's rotate-half
`apply_rotary_pos_emb` one kernel for q and k; prefill stays on HF's attention and rotary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from server_shim import fused_decode, row_attention
from server_shim.cuda_graphs import DecodeGraphs
from server_shim.kv_cache import CachePlan, SlotKVCache, attention_mask
from server_shim.models import cache_keyword

logger = logging.getLogger(__name__)

__all__ = ["TOP_K", "DecodeStep", "ModelRunner"]

TOP_K = 20  # the most alternatives OpenAI's `logprobs` / `top_logprobs` can ask for


@dataclass
class DecodeStep:
    """A launched decode step. On CUDA the D2H copy of `packed` is in flight until `packed_rows`."""

    rows: int
    packed: Tensor  # [rows, 2 + 2k] on the device
    lp: Tensor  # [rows, V] float32 on the device
    host: Tensor  # [rows, cols] (pinned on CUDA)
    event: torch.cuda.Event | None

    def packed_rows(self) -> list[list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def lp_rows(self, rows: list[int]) -> Tensor:
        """Full float32 log-prob rows [len(rows), V] on the CPU (for rows that sample)."""
        idx = torch.tensor(rows, device=self.lp.device)
        return self.lp.index_select(0, idx).cpu()


class ModelRunner:
    def __init__(self, loaded, *, max_rows: int, cuda_graphs: bool, fused: bool = False) -> None:  # noqa: ANN001
        """fused: decode steps run attention, RMSNorm and rotary through fused_decode.py's kernels (the caller
        asked `fused_decode.fused_wanted`); a failed self-check on the device leaves them plain, loudly."""
        model = loaded.model
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.lm_head = model.get_output_embeddings()
        self.device: torch.device = loaded.device
        self.dtype: torch.dtype = loaded.dtype
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        self.k = min(TOP_K, self.vocab)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # SDPA takes a boolean mask as is; an additive float mask over the cache's strided views hit a
        # slow CPU path (8 ms instead of 30 us per call, torch 2.13). Eager attention adds the mask.
        # as loaded, whether fused or slot-invariant (row_attention) since
        sdpa = row_attention.underlying(fused_decode.base_implementation(model.config)) == "sdpa"
        self._mask_dtype = None if sdpa else self.dtype
        self._cache_kw = cache_keyword(self.base)
        # On a GPU, room for every row up front (growing re-captures graphs); on the CPU, memory
        # follows use (several shims of a `make run` share one machine).
        slots, positions = (max_rows, 256) if self.device.type == "cuda" else (1, 64)
        self.cache = SlotKVCache(self.device, self.dtype, slots, positions)
        self.max_rows = max_rows
        dev = self.device
        # row r: (input id, position, cache column written); [rows, 3] so a prefix of rows is contiguous
        self._in = torch.zeros((max_rows, 3), dtype=torch.long, device=dev)
        self._rows = torch.arange(max_rows, device=dev).view(-1, 1)
        self._arange = torch.arange(self.cache.positions + 1, device=dev)
        pin = dev.type == "cuda"
        self._host_in = torch.zeros((max_rows, 3), dtype=torch.long, pin_memory=pin)
        self._host_out = torch.zeros(max_rows * (2 + 2 * self.k), dtype=torch.float32, pin_memory=pin)
        self.graphs = DecodeGraphs(self._decode_body, dev) if cuda_graphs and dev.type == "cuda" else None
        self.fused_error: str | None = None  # why fused decode was asked for and is not used
        norms = fused and fused_decode.norms_wanted()
        rope = fused and fused_decode.rope_wanted()
        # torch's CPU SDPA is not batch-slot invariant across threads: row_attention's there
        if row_attention.wanted(self.device) and not fused:
            row_attention.install(model)
        else:
            row_attention.uninstall(model)
        if fused:  # a compile error or a wrong number on this device: plain decode, said loudly
            self.fused_error = fused_decode.self_check(dev, self.dtype, norms, rope)
        if fused and self.fused_error is None and not fused_decode.install(model):
            self.fused_error = "the model's attention is neither sdpa nor eager"
        if self.fused_error is not None:
            logger.error("fused decode switched off, decoding plainly: %s", self.fused_error)
        self.fused = fused and self.fused_error is None
        self.fused_norms = fused_decode.install_norms(model) if self.fused and norms else 0
        # modeling files whose apply_rotary_pos_emb now takes the rotary kernel in decode steps
        self.fused_rope = fused_decode.install_rope(model) if self.fused and rope else 0
        if self.fused:
            logger.info(
                "fused decode on: decode attention in one kernel, %d RMSNorm modules fused, rotary %s",
                self.fused_norms,
                "fused" if self.fused_rope else "HF's",
            )
        self.fused_calls = 0  # decode-attention launches from Python (graph replays not counted)
        self.fused_rope_calls = 0  # rotary launches from Python, likewise

    # ------------------------------------------------------------------ capacity

    def ensure(self, slots: int, positions: int) -> None:
        """Room for `slots` slots and `positions` positions; stale graphs go when the cache moved."""
        if self.cache.ensure(slots, positions):
            self._arange = torch.arange(self.cache.positions + 1, device=self.device)
            if self.graphs is not None:
                self.graphs.invalidate()
            logger.debug("KV cache grown to %s (%.1f MiB)", self.cache, self.cache.nbytes() / 2**20)

    # ------------------------------------------------------------------ pieces

    def _hidden(self, ids: Tensor, pos: Tensor, plan: CachePlan) -> Tensor:
        self.cache.plan = plan
        mask = attention_mask(pos, plan.kv_len, self._mask_dtype, self._arange)
        out = self.base(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: self.cache},
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]

    def logits(self, hidden: Tensor) -> Tensor:
        """[N, H] -> float32 [N, V] through the model's own lm_head module."""
        out = self.lm_head(hidden).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def head(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """[N, H] -> (packed [N, 2 + 2k], log-probs [N, V]); greedy = argmax (ties: lowest id)."""
        lp = torch.log_softmax(self.logits(hidden), dim=-1)
        best = lp.argmax(dim=-1, keepdim=True)  # the first maximum: lowest id among ties
        top_v, top_i = lp.topk(self.k, dim=-1)
        pairs = torch.stack((top_v, top_i.float()), dim=-1).flatten(1)
        return torch.cat((best.float(), lp.gather(1, best), pairs), dim=1), lp

    # ------------------------------------------------------------------ prefill (eager)

    def prefill(
        self, ids: Tensor, pos: Tensor, write_slots: Tensor, write_pos: Tensor, read_slots: Tensor,
        kv_len: int, last: Tensor, echo: list[tuple[int, int]],
    ) -> tuple[list[list[float]], Tensor, dict[int, Tensor]]:  # fmt: skip
        """One chunk: ids/pos/write_pos [P, T], slots [P], last [P] (column of each row's last real
        token). Returns packed rows (host), log-probs [P, V] (device) and, for each (row, n) of
        `echo`, the float32 logits of that row's first n columns on the CPU."""
        dev = self.device
        ids, pos, write_pos = ids.to(dev), pos.to(dev), write_pos.to(dev)
        plan = CachePlan(write_slots.to(dev).view(-1, 1), write_pos, read_slots.to(dev), kv_len)
        hidden = self._hidden(ids, pos, plan)
        rows = torch.arange(ids.shape[0], device=dev)
        packed, lp = self.head(hidden[rows, last.to(dev)])
        extra = {r: self.logits(hidden[r, :n]).cpu() for r, n in echo if n > 0}
        return packed.cpu().tolist(), lp, extra

    # ------------------------------------------------------------------ decode (eager or graph)

    def _decode_body(self, rows: int, kv_len: int) -> tuple[Tensor, Tensor]:
        ids, pos, write = self._in[:rows, 0:1], self._in[:rows, 1:2], self._in[:rows, 2:3]  # [rows, 1]
        plan = CachePlan(self._rows[:rows], write, None, kv_len)
        if not self.fused:
            return self.head(self._hidden(ids, pos, plan)[:, -1])
        with fused_decode.decode_context(rows, kv_len, self._in[:rows, 1], rope=self.fused_rope > 0) as ctx:
            hidden = self._hidden(ids, pos, plan)
        self.fused_calls += ctx.calls
        self.fused_rope_calls += ctx.rope_calls
        return self.head(hidden[:, -1])

    def decode(self, ids: Tensor, pos: Tensor, write_pos: Tensor, kv_len: int, cols: int) -> DecodeStep:
        """Launch one step for rows 0..len(ids)-1 (row = slot); `cols` packed columns come back."""
        n = ids.shape[0]
        host = self._host_in[:n]
        host[:, 0], host[:, 1], host[:, 2] = ids, pos, write_pos
        self._in[:n].copy_(host, non_blocking=True)
        if self.graphs is not None:
            packed, lp = self.graphs.run(n, kv_len)
        else:
            packed, lp = self._decode_body(n, kv_len)
        out = self._host_out[: n * cols].view(n, cols)  # contiguous, pinned: a true async copy
        event = None
        if self.device.type == "cuda":
            out.copy_(packed[:, :cols], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            out.copy_(packed[:, :cols])
        return DecodeStep(n, packed, lp, out, event)
