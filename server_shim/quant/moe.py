"""Quantized routed experts for fused MoE modules (transformers 5.x DeepSeek-V3 and kin).

In transformers 5.x the routed experts are one module (`DeepseekV3Experts`) holding 3-D
parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], called as
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. `QuantMoEExperts` computes
the same thing per expert through the same quantized GEMM as QuantLinear (`quant_matmul`).

routed_scaling_factor: HF multiplies it into the router weights (DeepseekV3TopkRouter). Fused MoE
kernels (vLLM `fused_moe`, SGLang) instead scale the combined expert output, which is where
"forgot routed_scaling_factor" bugs live. The swap moves the factor there (router's factor set to
1.0, experts multiply their summed output by it: the same product, in another order), and the
`routed-scaling-missing` fault skips that multiply.

Batch slots: the parent MoE block flattens hidden [B, T, H] to [B*T, H] before the experts see it,
so the experts module notes the parent's input shape (a forward pre-hook, set only where a slot
fault is on) to know each routed token's slot. Under `slot-variant` / `slot-tile` a routed row
reads the activation scale that its source token (same position in slot 0, or in slot s mod 16:
faults.slot_sources) has in the same expert's GEMM; a source not routed to that expert runs
through it as an extra row, dropped from the output. So a request alone is untouched and a batch
is wrong from slot 1 (or 16) on, as on a dense module: reading the scales of the rows routed to
one expert as slots broke every prompt of more than one token, alone. A direct call (a
/debug/module replay) has no parent: a 2-D input is one request's rows (one slot), a 3-D
[B, T, H] input with [B, T, k] routing is B slots.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from server_shim.errors import QuantConfigError
from server_shim.quant import formats as F
from server_shim.quant.faults import NO_FAULTS, FaultSet, slot_sources
from server_shim.quant.linear import _metadata, _QuantBase, quant_matmul, quantize_for_device


def is_fused_experts(mod: nn.Module) -> bool:
    """A fused experts module: 3-D gate_up_proj and down_proj parameters, no biases."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (
        isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3
        and getattr(mod, "gate_up_proj_bias", None) is None and hasattr(mod, "act_fn")
    )  # fmt: skip


def activation_name(act_fn: nn.Module) -> str:
    """The activation between the experts' GEMMs, by name ("silu", "relu", "gelu", ...): an audit
    that recomputes an expert from its stored tensors must apply the same one."""
    name = type(act_fn).__name__.lower().removesuffix("activation")
    return {"swish": "silu"}.get(name, name)


def _stack(ts: list[Tensor], layout: F.ScaleLayout) -> Tensor:
    """Stack per-expert physical scales so that [e] keeps each one's declared strides."""
    if layout.order == "col-major" and ts[0].dim() == 2:
        return torch.stack([t.t() for t in ts]).transpose(1, 2)
    return torch.stack(ts)


def _with_sources(tokens: Tensor, src_of: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, src): the routed `tokens` followed by the source tokens (src_of[t]) not among them,
    and for each of those rows the index of its source's row. A source is its own source (slot 0,
    or a slot below the tile), so the extra rows read their own scales: the correct values."""
    want = src_of[tokens]
    extra = torch.unique(want[~torch.isin(want, tokens)])
    rows = torch.cat((tokens, extra))
    where = torch.full((src_of.shape[0],), -1, dtype=torch.long, device=tokens.device)
    where[rows] = torch.arange(rows.shape[0], device=tokens.device)
    return rows, where[src_of[rows]]


class QuantMoEExperts(_QuantBase):
    kind = "moe"

    def __init__(self, gate_up: list[F.QuantizedWeight], down: list[F.QuantizedWeight], act_fn: nn.Module, *,
                 routed_scaling_factor: float, backend: str, fallback_reason: str = "",
                 faults: FaultSet = NO_FAULTS, ck_free: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.num_experts = len(gate_up)
        self.act_fn = act_fn
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.layout, self.fp8_dtype = gate_up[0].layout, gate_up[0].fp8_dtype
        self.gate_up_shape, self.down_shape = gate_up[0].shape, down[0].shape
        for tag, qws in (("gate_up", gate_up), ("down", down)):
            self.register_buffer(f"{tag}_data", torch.stack([q.data for q in qws]))
            self.register_buffer(f"{tag}_scales", _stack([q.scales for q in qws], self.layout))
            zs = [q.zeros for q in qws]
            self.register_buffer(f"{tag}_zeros", None if zs[0] is None else torch.stack(zs))
        self._init_common(gate_up[0].scheme, backend, fallback_reason, faults, ck_free)
        self._lead: tuple[int, ...] | None = None  # the parent's last input shape, less H (slot faults)

    @classmethod
    def from_experts(cls, experts: nn.Module, parent: nn.Module, *, scheme: str, backend: str,
                     fallback_reason: str, faults: FaultSet, ck_free: bool, layout: F.ScaleLayout,
                     device: torch.device) -> QuantMoEExperts:  # fmt: skip
        gate = getattr(parent, "gate", None)
        factor = float(getattr(gate, "routed_scaling_factor", 1.0) or 1.0)
        if faults.routed_scaling_missing and factor == 1.0:
            raise QuantConfigError("fault routed-scaling-missing: this MoE has no routed_scaling_factor")
        gu = [quantize_for_device(w, scheme, device, layout) for w in experts.gate_up_proj.detach()]
        dn = [quantize_for_device(w, scheme, device, layout) for w in experts.down_proj.detach()]
        new = cls(gu, dn, experts.act_fn, routed_scaling_factor=factor, backend=backend,
                  fallback_reason=fallback_reason, faults=faults, ck_free=ck_free)  # fmt: skip
        if gate is not None and hasattr(gate, "routed_scaling_factor"):
            gate.routed_scaling_factor = 1.0  # now applied on the experts' output (see module doc)
        if faults.slot_variant or faults.slot_tile:
            parent.register_forward_pre_hook(new._note_lead, with_kwargs=True)
        return new

    def _note_lead(self, _parent: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep the batch shape of the parent's input: the experts get it flattened (module doc)."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, Tensor):  # a 2-D parent input is one request's rows (a /debug/module
            # replay of the MoE block): one slot, as `_take_lead` takes a direct call's
            self._lead = tuple(hidden.shape[:-1]) if hidden.dim() > 2 else (1, hidden.shape[0])

    def _take_lead(self, rows: int) -> tuple[int, ...]:
        """The batch shape of this call's `rows` tokens; without the parent's (a direct call, e.g. a
        /debug/module replay of one request's routed rows) they are one slot: a request alone is
        untouched by a slot fault in the model, so its replay must be too (rows as slots made the
        replay slot-dependent where the served output was not)."""
        lead, self._lead = self._lead, None
        return lead if lead is not None and math.prod(lead) == rows else (1, rows)

    def expert_weight(self, tag: str, e: int) -> F.QuantizedWeight:
        z = getattr(self, f"{tag}_zeros")
        shape = self.gate_up_shape if tag == "gate_up" else self.down_shape
        return F.QuantizedWeight(self.scheme, getattr(self, f"{tag}_data")[e], getattr(self, f"{tag}_scales")[e],
                                 None if z is None else z[e], shape, self.layout, self.fp8_dtype)  # fmt: skip

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if hidden_states.dim() > 2:  # a direct call of [B, T, H] with [B, T, k] routing: B slots
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            idx, w = top_k_index.reshape(flat.shape[0], -1), top_k_weights.reshape(flat.shape[0], -1)
            lead = tuple(hidden_states.shape[:-1])
            return self._run(flat, idx, w, self.backend, lead).reshape(hidden_states.shape)
        lead = self._take_lead(hidden_states.shape[0])
        return self._run(hidden_states, top_k_index, top_k_weights, self.backend, lead)

    def forward_with_backend(self, x: Tensor, backend: str, top_k_index: Tensor | None = None,
                             top_k_weights: Tensor | None = None) -> Tensor:  # fmt: skip
        """Replay with another backend. Without routing, every token goes to every expert with
        weight 1/E (a fixed, routing-free probe of all experts)."""
        flat = x.reshape(-1, x.shape[-1])
        if top_k_index is None or top_k_weights is None:
            e = self.num_experts
            top_k_index = torch.arange(e, device=x.device).expand(flat.shape[0], e)
            top_k_weights = torch.full((flat.shape[0], e), 1.0 / e, device=x.device, dtype=torch.float32)
        top_k_index = top_k_index.reshape(flat.shape[0], -1)  # [B, T, k] routing of a [B, T, H] call
        top_k_weights = top_k_weights.reshape(flat.shape[0], -1)
        # as `forward`: [B, T, H] is B slots, a 2-D call one request's rows (one slot)
        lead = tuple(x.shape[:-1]) if x.dim() > 2 else (1, flat.shape[0])
        out = self._run(flat, top_k_index, top_k_weights, self._resolve(backend, x.device), lead)
        return out.reshape(x.shape)

    def _run(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, backend: str,
             lead: tuple[int, ...]) -> Tensor:  # fmt: skip
        final = torch.zeros_like(hidden)  # [T, H]
        fs = self._faults
        src_of = None
        if fs.slot_variant or fs.slot_tile:
            src_of = slot_sources(torch.arange(hidden.shape[0], device=hidden.device), lead, fs)
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            token_idx, pos = torch.where(top_k_index == e)
            rows, src = (token_idx, None) if src_of is None else _with_sources(token_idx, src_of)
            gate, up = quant_matmul(hidden[rows], self.expert_weight("gate_up", e), None, backend, fs,
                                    slot_src=src).chunk(2, dim=-1)  # fmt: skip
            y = quant_matmul(self.act_fn(gate) * up, self.expert_weight("down", e), None, backend, fs,
                             slot_src=src)[: token_idx.numel()]  # fmt: skip
            y = y * top_k_weights[token_idx, pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        if not self._faults.routed_scaling_missing:
            final = final * self.routed_scaling_factor
        return final

    def debug_info(self) -> dict:
        """Like a linear's, for gate_up_proj (stored shape: packed for 4-bit; in/out_features: the
        logical [N, K]), with down_proj's under `down`: what the audit checks both GEMMs against.
        `combine_scale`: the factor the combined output is multiplied by (the model's
        routed_scaling_factor, moved here off the router: module doc); `activation`: between them."""
        e = self.num_experts

        def gemm(tag: str) -> dict[str, Any]:
            data, scales = getattr(self, f"{tag}_data"), getattr(self, f"{tag}_scales")
            n, k = self.gate_up_shape if tag == "gate_up" else self.down_shape
            return {
                "weight_dtype": str(data.dtype).removeprefix("torch."), "weight_shape": list(data.shape),
                "scale_shape": list(scales.shape), "scale_stride": list(scales.stride()),
                "in_features": k, "out_features": n,
            }  # fmt: skip

        return {
            "kind": "moe", "scheme": self.scheme, "backend": self.backend, "fallback_reason": self.fallback_reason,
            **gemm("gate_up"), "scale_layout": self.layout.to_dict(), "num_experts": e, "down": gemm("down"),
            "activation": activation_name(self.act_fn), "combine_scale": self.routed_scaling_factor,
            # the model's factor, as its config declares it (a fault leaves the config alone): a
            # differ tells an output off by exactly this factor from other magnitude bugs
            "routed_scaling_factor": self.routed_scaling_factor,
        }  # fmt: skip

    def stored_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for tag in ("gate_up", "down"):
            out[f"{tag}_proj.weight"] = getattr(self, f"{tag}_data")
            out[f"{tag}_proj.weight_scale"] = getattr(self, f"{tag}_scales")
            z = getattr(self, f"{tag}_zeros")
            if z is not None:
                out[f"{tag}_proj.weight_zero"] = z
        return out

    def stored_metadata(self) -> dict[str, str]:
        meta = _metadata(
            self.scheme, self.layout, self.gate_up_scales[0], (self.num_experts, *self.gate_up_shape)
        )
        meta["num_experts"] = str(self.num_experts)
        return meta
