"""Replay: local versus inherited error over POST /debug/module, and ranking the modules.

Steps 3-4 of docs/design.md "White-box localisation". Every linear / MoE module gets the
*baseline's* input on both servers: same input on both sides, so the difference is the module's
own (local) error, not what it inherited from upstream layers. Replay doubles linear and MoE
experts inputs into two batch slots, slot 1 holding the tokens rolled by one position (an experts
module's routing rolled with its tokens): a slot-variant bug (slot 1 reads slot 0's scale rows)
then shows as local error, while a plain duplicate would read identical scales and hide it.
Ranking (pure) then names the module to blame.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from difftest.collect import Endpoint
from difftest.errors import INFRA, DifftestError, RequestRejected, UnreadableBody
from difftest.metrics.tensors import TensorDiff, tensor_diff
from difftest.results import LayerDiff, LayerPoint, RoutingFlips
from difftest.whitebox.activations import (
    LEAF_KINDS,
    Activations,
    LayerThresholds,
    fetch_activations,
    finite_or_inf,
    layer_of,
    local_out_of_bounds,
    sibling_key,
)
from difftest.whitebox.safetensors import SafeTensors, read_safetensors, write_safetensors
from server_shim import debug_protocol as P

T = TypeVar("T")
# scores this close (relative) are one score: fp noise (3e-10 apart) must not pick among modules
# that share one fault; the first in execution order is where the fault first acts
NEAR_TIE = 1e-6


async def replay(ep: Endpoint, module: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """POST /debug/module: `tensors` holds `input` (+ extras such as top_k_index)."""
    body = write_safetensors(dict(tensors), {P.META_MODULE: module})
    raw = await ep.client.post_bytes(P.MODULE, body)
    try:
        out = read_safetensors(raw)
        return np.asarray(out.value(P.OUTPUT), dtype=np.float64)
    except UnreadableBody as exc:  # the reader knows bytes, not whose: name the server that sent them
        raise UnreadableBody(f"{ep.name}: /debug/module answered {exc}", server=ep.name) from exc


# ---------------------------------------------------------------- ranking (pure)


def rank_modules(local: Mapping[str, float], kind: str) -> list[tuple[str, float]]:
    """Worst first. Exactness: the local rel_err itself. Accuracy: local rel_err divided by the
    median of its siblings (same role, other layers; all modules when fewer than 3 siblings),
    i.e. relative to what the scheme costs a module like it. NaN ranks first."""
    vals = {n: finite_or_inf(v) for n, v in local.items()}
    if kind == "exactness":
        scores = dict(vals)
    else:
        groups: dict[str, list[float]] = {}
        for n, v in vals.items():
            groups.setdefault(sibling_key(n), []).append(v)
        everyone = [v for v in vals.values() if math.isfinite(v)]
        scores = {}
        for n, v in vals.items():
            peers = [x for x in groups[sibling_key(n)] if math.isfinite(x)]
            peers = peers if len(peers) >= 3 else everyone
            med = statistics.median(peers) if peers else 0.0
            scores[n] = v / med if med > 0 else (math.inf if v > 0 else 0.0)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def choose_guilty(
    diff: LayerDiff, scheme: str | None, th: LayerThresholds
) -> tuple[str | None, float | None]:
    """The module to blame and its rank score: an out-of-bounds leaf (linear / MoE experts) of the
    first divergent layer if it has one (a second fault downstream is worse but came later), else the
    worst out-of-bounds leaf; near-ties go to the first in execution order (a fault in every module
    is blamed where it first acts, not where fp noise puts the top score). A composite (MoE mlp)
    only when no leaf is out of bounds. Accuracy also names a leaf within budget when it is a clear
    outlier among its siblings."""
    replayed = [p for p in diff.points if p.local_rel_err is not None]
    if not replayed:
        return None, None
    ranked = _ranked(diff)
    order = {id(p): i for i, p in enumerate(diff.points)}
    bad = out_of_bounds_leaves(diff, scheme, th)
    if bad:
        top = _pick(bad, lambda p: ranked.get(p.name, 0.0), order, diff.first_divergent_layer)
        return top.name, ranked.get(top.name)
    leaves = [p for p in replayed if p.kind in LEAF_KINDS]
    if diff.kind == "accuracy" and ranked:
        top = _pick(leaves, lambda p: ranked.get(p.name, 0.0), order, None)
        if ranked[top.name] >= th.relative_outlier:
            return top.name, ranked[top.name]
    composite = [p for p in replayed if p.kind not in LEAF_KINDS and _oob(p, diff.kind, scheme, th)]
    if not composite:
        return None, None
    worst = lambda p: finite_or_inf(p.local_rel_err or 0.0)  # noqa: E731
    return _pick(composite, worst, order, diff.first_divergent_layer).name, None


def out_of_bounds_leaves(diff: LayerDiff, scheme: str | None, th: LayerThresholds) -> list[LayerPoint]:
    """Every replayed leaf whose local error is out of bounds, worst rank score first (pure): the
    guilty module is one of them, and the others are a second fault that must not go unsaid."""
    ranked = _ranked(diff)
    measured = (p for p in diff.points if p.kind in LEAF_KINDS and p.local_rel_err is not None)
    bad = [p for p in measured if p.local_cosine is not None and _oob(p, diff.kind, scheme, th)]
    return sorted(bad, key=lambda p: -ranked.get(p.name, 0.0))  # stable: execution order on ties


def _ranked(diff: LayerDiff) -> dict[str, float]:
    leaves = {
        p.name: p.local_rel_err for p in diff.points if p.local_rel_err is not None and p.kind in LEAF_KINDS
    }
    return dict(rank_modules(leaves, diff.kind))  # type: ignore[arg-type]


def _oob(p: LayerPoint, kind: str, scheme: str | None, th: LayerThresholds) -> bool:
    d = TensorDiff(p.local_cosine, p.local_norm_ratio, math.nan, p.local_rel_err,  # type: ignore[arg-type]
                   math.nan, _finite(p), 0)  # fmt: skip
    return local_out_of_bounds(d, kind, scheme, th)


def near_tie(a: float, b: float) -> bool:
    """Equal within NEAR_TIE relative (pure); two infinities of one sign tie, NaN ties nothing."""
    if a == b:
        return True
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= NEAR_TIE * max(abs(a), abs(b))


def _pick(
    cands: Sequence[LayerPoint], score: Any, order: Mapping[int, int], first_layer: int | None
) -> LayerPoint:
    """The candidate to blame (pure): within the first divergent layer when any candidate is there,
    the top score, and among scores that near-tie it the first in execution order (layer, then
    capture order: /debug/activations lists points as the forward runs)."""
    there = [p for p in cands if first_layer is not None and p.layer == first_layer]
    pool = there or list(cands)
    top = max(score(p) for p in pool)
    ties = [p for p in pool if near_tie(score(p), top)]
    return min(ties, key=lambda p: (math.inf if p.layer is None else p.layer, order.get(id(p), 0)))


def _finite(p: LayerPoint) -> bool:
    vals = (p.local_cosine, p.local_norm_ratio, p.local_rel_err)
    return all(v is not None and math.isfinite(v) for v in vals)


# ---------------------------------------------------------------- replay


def replay_plan(base: Activations, config: Mapping[str, Any]) -> list[str]:
    """Modules to replay: linears and MoE experts with a captured input, plus MoE mlps."""
    mods = config.get("modules", {})
    out = []
    for name, info in mods.items():
        k = info.get("kind")
        if f"{name}{P.INPUT_SUFFIX}" not in base.st.tensors:
            continue
        if k in LEAF_KINDS or (k == "mlp" and info.get("moe")):
            out.append(name)
    return out


def _extras(st: SafeTensors, name: str) -> dict[str, np.ndarray]:
    pre = name + ":"
    return {k[len(pre) :]: st.value(k) for k in st.tensors if k.startswith(pre) and k != pre + P.INPUT}


def routing_rescale(base_w: np.ndarray, tgt_w: np.ndarray) -> float:
    """Ratio of the target's to the baseline's per-token routing-weight sums, when the two sides
    put routed_scaling_factor in different places (router vs expert combine: both correct, but the
    experts of one side expect weights without the factor). 1.0 when they agree."""
    sa, sb = np.asarray(base_w, np.float64).sum(-1), np.asarray(tgt_w, np.float64).sum(-1)
    ok = np.abs(sa) > 1e-12
    if not ok.any():
        return 1.0
    r = float(np.median(sb[ok] / sa[ok]))
    return r if math.isfinite(r) and abs(math.log(max(r, 1e-12))) > 0.05 else 1.0


def routing_rescales(base: SafeTensors, tgt: SafeTensors, experts: Sequence[str]) -> dict[str, float]:
    """`routing_rescale` per experts module (pure): a side may move the factor in some layers only
    (the shim moves it into the combine of the experts it quantizes; a `quant_skip`ped layer keeps
    it in the router), so one layer's ratio applied to all replayed the others x2.5 off. A module
    without weights on either side is left out (replayed unscaled)."""
    key = ":top_k_weights"
    return {n: routing_rescale(base.value(n + key), tgt.value(n + key))
            for n in experts if n + key in base.tensors and n + key in tgt.tensors}  # fmt: skip


def rescale_note(rescales: Mapping[str, float]) -> str | None:
    """The warning for the experts modules replayed with rescaled routing weights (pure), or None."""
    moved = {n: r for n, r in rescales.items() if r != 1.0}
    if not moved:
        return None
    by_ratio: dict[str, list[str]] = {}
    for n, r in moved.items():
        by_ratio.setdefault(f"{r:.3g}", []).append(n)
    where = "; ".join(f"x{r} in {', '.join(ns)}" for r, ns in by_ratio.items())
    return (
        f"the sides apply routed_scaling_factor in different places in {len(moved)} of {len(rescales)} "
        f"experts modules (routing weights on the target {where}): those replays get the baseline's "
        "weights rescaled to the target's convention"
    )


# ---------------------------------------------------------------- MoE routing (pure)


def routing_differences(base_idx: np.ndarray, tgt_idx: np.ndarray) -> int:
    """Tokens whose set of routed experts differs between the sides (pure; order within top-k is
    the router's sort, not a difference)."""
    a, b = np.sort(np.asarray(base_idx), -1), np.sort(np.asarray(tgt_idx), -1)
    return int((a != b).reshape(a.shape[0], -1).any(-1).sum())


def routing_counts(base: SafeTensors, tgt: SafeTensors, experts: Sequence[str]) -> list[RoutingFlips]:
    """Per MoE layer where it happens, how many tokens the target's router sends to other experts
    than the baseline's (pure; layers where none differ, or routing was not captured, are left
    out). A correct quantized target flips near-tie routings on its slightly different input, and
    each flip moves that token's MoE output by a whole expert: the residual stream drifts there
    while every module replays within bounds, and without this count the sentence blamed
    "attention core, norm or rotary?"."""
    key = ":top_k_index"
    out = []
    for n in experts:
        layer = layer_of(n)
        if n + key not in base.tensors or n + key not in tgt.tensors or layer is None:
            continue
        a, b = base.value(n + key), tgt.value(n + key)
        if a.shape != b.shape or a.ndim != 2:
            continue
        if flipped := routing_differences(a, b):
            out.append(RoutingFlips(layer, flipped, a.shape[0]))
    return out


def routing_note(flips: Sequence[RoutingFlips], against: str) -> str | None:
    """The warning giving `flips` to a human, or None where there are none (pure). The counts
    themselves are `LayerDiff.routing_flips`: nothing reads them back from this text."""
    if not flips:
        return None
    counts = ", ".join(f"{f.flipped} of {f.tokens} tokens in layer {f.layer}" for f in flips)
    return f"router top-k differs from {against}'s (tokens sent to other experts) at {counts}"


def routing_flips(diff: LayerDiff) -> dict[int, tuple[int, int]]:
    """{layer: (tokens routed to other experts, tokens)} from the diff's `routing_flips` field
    (pure; the layers where none differ, or where routing was not captured, are absent)."""
    return {f.layer: (f.flipped, f.tokens) for f in diff.routing_flips}


# ---------------------------------------------------------------- replay


def _two_slots(v: np.ndarray) -> np.ndarray:
    """[2, T, ...]: slot 0 as captured, slot 1 its tokens rolled by one position."""
    return np.stack([v, np.roll(v, 1, axis=0)])


async def _replay_in_slots(
    ep: Endpoint, name: str, body: Mapping[str, np.ndarray], kind: str
) -> tuple[np.ndarray, bool]:
    """(output [2, T, N], whether the server ran the two slots as such). An experts module whose
    server refuses a 3-D body (transformers' own experts take [T, H] only) gets the two slots as
    one stack of rows [2T, H]: the same tokens and routing, so its output still compares, but it
    proves nothing about the slots."""
    try:
        return await replay(ep, name, body), True
    except RequestRejected:
        if kind != "moe":
            raise
    lead = body[P.INPUT].shape[:2]
    flat = {k: v.reshape(-1, *v.shape[2:]) if v.shape[:2] == lead else v for k, v in body.items()}
    out = await replay(ep, name, flat)
    if out.ndim != 2 or out.shape[0] != lead[0] * lead[1]:
        raise UnreadableBody(
            f"{ep.name} answered an output of shape {list(out.shape)} for {lead[0] * lead[1]} rows",
            server=ep.name,
        )
    return out.reshape(*lead, out.shape[-1]), False


async def replay_module(
    baseline: Endpoint, target: Endpoint, name: str, kind: str, base: Activations, rescale: float = 1.0
) -> tuple[TensorDiff, float | None]:
    """(local diff target vs baseline on the baseline's input, slot-1 vs slot-0 rel_err or None)."""
    x = base.st.value(f"{name}{P.INPUT_SUFFIX}").astype(np.float32)
    extras = _extras(base.st, name)
    slot = kind in LEAF_KINDS and x.ndim == 2 and x.shape[0] > 1
    if slot:  # [2, T, K]: slot 1 = the tokens rolled by one, an expert's routing with its token
        x = _two_slots(x)
        extras = {k: _two_slots(v) if v.shape[:1] == x.shape[1:2] else v for k, v in extras.items()}
    body = {P.INPUT: x, **extras}
    tbody = dict(body)
    if "top_k_weights" in extras and rescale != 1.0:  # the target's convention, the baseline keeps its own
        tbody["top_k_weights"] = (extras["top_k_weights"] * rescale).astype(np.float32)
    if slot:
        (a, _), (b, slotted) = await gather_or_cancel(
            _replay_in_slots(baseline, name, body, kind), _replay_in_slots(target, name, tbody, kind)
        )
    else:
        a, b = await gather_or_cancel(replay(baseline, name, body), replay(target, name, tbody))
        slotted = False
    if a.shape != b.shape:  # a server answering another shape than its partner's: unreadable, named
        raise UnreadableBody(
            f"{target.name} answered an output of shape {list(b.shape)}, {baseline.name} {list(a.shape)}"
        )
    d = tensor_diff(a, b)
    slot_err = None
    if slotted and b.shape[0] == 2:
        slot_err = tensor_diff(np.roll(b[0], 1, axis=0), b[1]).rel_err
        if math.isnan(slot_err) and bool(np.isfinite(b[0]).all()) != bool(np.isfinite(b[1]).all()):
            slot_err = math.inf  # one slot finite, the other not: that is a slot dependence
    return d, slot_err


async def replay_all(
    baseline: Endpoint, target: Endpoint, base: Activations, tgt_cfg: Mapping[str, Any], diff: LayerDiff,
    th: LayerThresholds,
) -> None:  # fmt: skip
    plan = replay_plan(base, tgt_cfg)
    kinds = {n: tgt_cfg["modules"][n]["kind"] for n in plan}
    rescales: dict[str, float] = {}
    experts = [n for n in plan if kinds[n] == "moe"]
    if experts:
        try:
            rows = {} if base.positions is None else {"positions": base.positions}  # the baseline's kept rows
            t_in = await fetch_activations(
                target, {"tokens": base.token_ids, "layers": experts, "inputs": True, **rows}
            )
        except DifftestError as exc:
            diff.warnings.append(f"MoE routing weights of the target unavailable ({exc}); replayed unscaled")
        else:
            rescales = routing_rescales(base.st, t_in.st, experts)
            if missing := [n for n in experts if n not in rescales]:
                diff.warnings.append(
                    f"MoE routing weights unavailable for {len(missing)} experts module(s), e.g. {missing[0]}; "
                    "replayed unscaled"
                )
            diff.routing_flips = routing_counts(base.st, t_in.st, experts)
            notes = (rescale_note(rescales), routing_note(diff.routing_flips, baseline.name))
            diff.warnings.extend(w for w in notes if w)

    async def one(name: str) -> tuple[str, TensorDiff | DifftestError, float | None]:
        try:
            d, slot = await replay_module(baseline, target, name, kinds[name], base, rescales.get(name, 1.0))
        except DifftestError as exc:
            return name, exc, None
        return name, d, slot

    by_name = {p.name: p for p in diff.points}
    failed: list[tuple[str, DifftestError]] = []
    for name, d, slot in await gather_or_cancel(*(one(n) for n in plan)):
        if isinstance(d, DifftestError):
            failed.append((name, d))
            continue
        p = by_name.get(name)
        if p is None:  # the target served no such point: its metrics say "not compared" (NaN)
            p = LayerPoint(
                name, layer_of(name), kinds[name], math.nan, math.nan, math.nan, math.nan, math.nan
            )
            diff.points.append(p)
        p.local_cosine, p.local_norm_ratio, p.local_rel_err = d.cosine, d.norm_ratio, d.rel_err
        p.slot_rel_err = slot
        p.slot_dependent = slot_dependent(slot, th)
    diff.warnings.extend(replay_failure_warnings(failed, len(plan)))
    diff.replays_unjudged = {how: n for how, n in _failure_counts(failed).items() if n}
    note = slot_note(diff)
    if note:
        diff.warnings.append(note)


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """asyncio.gather that cancels (and awaits) the others when one fails: a baseline replay left
    running after the target's failed outlived the session and died at shutdown on a closed client
    ("unhandled exception during asyncio.run() shutdown")."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _by_failure(failed: Sequence[tuple[str, DifftestError]]) -> dict[str, list[tuple[str, DifftestError]]]:
    """Replays a server failed to answer or answered damaged (5xx, timeout, unreadable body: exit 3,
    "failed") apart from those it refused (4xx: "refused")."""
    return {
        "failed": [f for f in failed if f[1].exit_code == INFRA],
        "refused": [f for f in failed if f[1].exit_code != INFRA],
    }


def _failure_counts(failed: Sequence[tuple[str, DifftestError]]) -> dict[str, int]:
    return {how: len(group) for how, group in _by_failure(failed).items()}


def replay_failure_warnings(failed: Sequence[tuple[str, DifftestError]], planned: int) -> list[str]:
    """At most two warnings (pure), one per kind of failure (28 lines said one thing); each names
    its first module and counts the rest."""
    out = []
    for how, group in _by_failure(failed).items():
        if group:
            (name, exc), more = group[0], len(group) - 1
            tail = f" (and {more} more of {planned} modules)" if more else ""
            out.append(f"replay of {name} {how}: {exc}{tail}")
    return out


def replay_failure_lines(diff: LayerDiff) -> list[str]:
    """The diff's warnings that `replay_failure_warnings` wrote (at most one per kind of failure)."""
    return [w for w in diff.warnings if w.startswith("replay of ")]


def replay_failures(diff: LayerDiff) -> dict[str, int]:
    """{"failed": n, "refused": m}: modules whose replay a server failed to answer (or answered
    damaged) and modules whose replay it refused (pure). The diff vouches for none of them."""
    return {"failed": 0, "refused": 0} | dict(diff.replays_unjudged)


def slot_dependent(slot_rel_err: float | None, th: LayerThresholds) -> bool:
    """Slot 1 against slot 0 out of bounds (pure). NaN -- non-finite outputs in both slots, which the
    module's local error already reports -- says nothing about the slot: not dependent. +inf (one
    slot finite and the other not, or slot 0 all zeros and slot 1 not) is."""
    return slot_rel_err is not None and not math.isnan(slot_rel_err) and slot_rel_err > th.slot_rel_err


def slot_note(diff: LayerDiff, named: int = 3) -> str | None:
    """One line for every module whose replayed output depends on its batch slot (pure): a
    slot-variant kernel is usually in every module of a scheme, and one warning per module buried
    the report in 210 identical lines."""
    bad = [p for p in diff.points if p.slot_dependent]
    if not bad:
        return None
    worst = max(bad, key=lambda p: p.slot_rel_err or 0.0)  # slot-dependent: measured, never NaN
    names = ", ".join(p.name for p in bad[:named]) + (
        f" and {len(bad) - named} more" if len(bad) > named else ""
    )
    return (
        f"output depends on the batch slot in {slot_reach(diff)} ({names}; "
        f"worst slot 1 vs slot 0 rel err {worst.slot_rel_err:.3g} in {worst.name})"
    )


def slot_reach(diff: LayerDiff) -> str:
    """'N of M linears (and K of L MoE experts) replayed in two slots': how many of the modules
    replayed in two batch slots depend on the slot, per kind (pure; the warning and the
    localisation sentence both say it). An experts module counts apart: "3 of 35 linears" beside a
    slot-dependent experts module said the experts were never tried."""
    tried = [p for p in diff.points if p.slot_rel_err is not None]
    experts = [p for p in tried if p.kind == "moe"]

    def count(ps: Sequence[LayerPoint], noun: str) -> str:
        return f"{sum(p.slot_dependent for p in ps)} of {len(ps)} {noun}"

    linears = count([p for p in tried if p.kind != "moe"], "linears")
    return linears + (f" and {count(experts, 'MoE experts')}" if experts else "") + " replayed in two slots"
