"""One target's white-box pass, and the localisation sentence (its only producer).

    localise_target(target, golden=..., reference=..., prompt=...)
      - diff_layers against the golden (exactness) and the reference (accuracy), where given
      - the audit of every module a diff blamed and of the worst other out-of-bounds module, once
        per module however many diffs name it
        (an audit replays a module's whole identity matrix: the costliest white-box request)
      - each diff's `audit_hint` and `summary` (the sentence below)

    localisation_sentence(diff)   "first divergent layer 5, local error in model.layers.5.mlp.down_proj
                                   (local cos 0.8942, norm ratio 1.17, rel err 0.524), backend torch,
                                   scales look transposed", then "; N other modules out of bounds,
                                   the worst M (local rel err E)" and "; N modules not judged
                                   (replay failed)" where they apply
    localisation_line(diffs)      the sentence of the first diff that localised (a verdict's line)

docs/design.md "White-box localisation" step 6.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difftest.collect import Endpoint
from difftest.errors import DifftestError
from difftest.results import LayerDiff, LayerPoint, fmt_compact
from difftest.whitebox.activations import LEAF_KINDS, LayerThresholds, point_kind
from difftest.whitebox.audit import audit_module
from difftest.whitebox.experts import declared_factor, never_applied
from difftest.whitebox.layers import diff_layers, scheme_of
from difftest.whitebox.replay import (
    out_of_bounds_leaves,
    rank_modules,
    replay_failures,
    routing_flips,
    slot_reach,
)

log = logging.getLogger(__name__)


@dataclass
class TargetLocalisation:
    """What the white-box pass found for one target."""

    diffs: list[LayerDiff] = field(default_factory=list)  # exactness (vs golden) first, then accuracy
    audit: list[dict[str, Any]] = field(default_factory=list)  # one row per blamed quantized module


async def localise_target(
    target: Endpoint,
    *,
    prompt: str,
    golden: Endpoint | None = None,
    reference: Endpoint | None = None,
    thresholds: LayerThresholds | None = None,
    decode_steps: int = 2,
) -> TargetLocalisation:
    """Layer diffs of `target` against its golden and its reference, audits of the blamed modules.

    The audit compares the kernel's weight with the reference's (full precision) where there is
    one, else with the golden's."""
    if golden is None and reference is None:
        raise ValueError("localise_target needs a golden or a reference")
    out = TargetLocalisation()
    for baseline, kind in ((golden, "exactness"), (reference, "accuracy")):
        if baseline is not None:
            diff = await diff_layers(
                baseline, target, prompt, kind=kind, decode_steps=decode_steps, thresholds=thresholds
            )
            out.diffs.append(diff)
    scheme = await _scheme(target) if any(not d.not_made for d in out.diffs) else None
    # the guilty module, then the worst other out-of-bounds one: a second fault gets its own hint
    worst = [other_out_of_bounds(d, scheme, thresholds) for d in out.diffs]
    blamed = list(
        dict.fromkeys(
            [d.guilty_module for d in out.diffs if d.guilty_module] + [p[0].name for p in worst if p]
        )
    )
    modules = (await target.client.debug_config()).get("modules", {}) if blamed else {}
    hints: dict[str, str | None] = {}
    for module in blamed:
        info = modules.get(module, {})
        if info.get("scheme") in (None, "none"):  # nothing stored to audit: a full-precision module
            continue
        try:
            row = await audit_module(target, reference or golden, module, info)
        except DifftestError as exc:
            log.info("audit of %s failed: %s", module, exc)
            row = {"module": module, "scheme": info.get("scheme"), "flagged": True, "hint": None,
                   "notes": [f"audit failed: {exc}"]}  # fmt: skip
        out.audit.append(row)
        hints[module] = row.get("hint") or None
    for diff in out.diffs:
        if diff.guilty_module:
            point = next((p for p in diff.points if p.name == diff.guilty_module), None)
            info = modules.get(diff.guilty_module, {})
            diff.audit_hint = hints.get(diff.guilty_module) or routed_scaling_hint(point, info)
        diff.summary = diff.summary or localisation_sentence(diff, scheme, thresholds, hints)
    return out


# how close a module's output norm ratio must be to 1/f (or f) to read as the factor f
ROUTED_SCALING_TOL = 0.03


def routed_scaling_hint(point: LayerPoint | None, info: Mapping[str, Any]) -> str | None:
    """An MoE module whose output is off by its own routed_scaling_factor f (norm ratio 1/f: the
    factor never applied; f: applied twice), where /debug/config declares f (pure). The factor is
    in the expert combine, not in a stored tensor (the audit sees it only by recomputing the
    experts), and a bare "norm ratio 0.40" did not say it was 1/2.5."""
    f = declared_factor(info.get("routed_scaling_factor"))
    r = point.local_norm_ratio if point is not None else None
    if f is None or f <= 0 or f == 1:
        return None
    if r is None or not math.isfinite(r) or r <= 0:
        return None
    if abs(r * f - 1) <= ROUTED_SCALING_TOL:
        return never_applied(r, f)
    if abs(r / f - 1) <= ROUTED_SCALING_TOL:
        return f"output x{r:.3g} = routed_scaling_factor {f:g}: the factor looks applied twice"
    return None


async def _scheme(target: Endpoint) -> str | None:
    """The target's scheme, for the sentence's out-of-bounds count (the bounds depend on it); the
    config is cached from the diff, and a diff that got this far had it."""
    try:
        return scheme_of(await target.client.debug_config())
    except DifftestError:
        return None


def localisation_sentence(
    diff: LayerDiff,
    scheme: str | None = None,
    thresholds: LayerThresholds | None = None,
    hints: Mapping[str, str | None] | None = None,
) -> str:
    """Where `diff` says the target goes wrong, in one sentence (pure). `scheme` and `thresholds`
    (the diff's own) size the count of other out-of-bounds modules; `hints`, the audits' layout
    hints per module, name what the worst of those looks like."""
    bits = []
    if diff.first_divergent_layer is not None:
        bits.append(f"first divergent layer {diff.first_divergent_layer}")
    elif diff.first_divergent_point:
        bits.append(f"first divergent point {diff.first_divergent_point}")
    leaves = {
        p.name: p.local_rel_err for p in diff.points if p.local_rel_err is not None and p.kind in LEAF_KINDS
    }
    replayed = any(p.local_rel_err is not None for p in diff.points)
    if diff.guilty_module:
        p = next((q for q in diff.points if q.name == diff.guilty_module), None)
        detail = ""
        if p is not None and p.local_cosine is not None:
            detail = (
                f" (local cos {p.local_cosine:.4g}, norm ratio {fmt_compact(p.local_norm_ratio, '.2f')}, "
                f"rel err {p.local_rel_err:.3g}"
            )
            score = (
                dict(rank_modules(leaves, "accuracy")).get(diff.guilty_module)
                if diff.kind == "accuracy"
                else None
            )
            detail += f", {fmt_compact(score, '.1f')}x its siblings' median)" if score else ")"
        bits.append(f"local error in {diff.guilty_module}{detail}")
        if diff.guilty_backend:
            bits.append(f"backend {diff.guilty_backend}")
        if diff.audit_hint:
            bits.append(diff.audit_hint)
        if p is not None and p.slot_dependent:
            bits.append(_slot_clause(diff, p))
    elif bits and not replayed:  # "no replayed module shows ..." claimed a replay that never ran
        bits.append("no module could be replayed to localise it")
    elif bits:
        bits.append(f"no replayed module shows local error ({_suspects(diff)})")
    if not diff.guilty_module and diff.kind == "accuracy" and any(v for v in leaves.values()):
        # (every local error 0: two servers that compute alike -- "no divergence", not "0.00x")
        top, s = rank_modules(leaves, "accuracy")[0]  # type: ignore[arg-type]
        bits.append(
            f"largest local error relative to its siblings: {top} ({s:.2f}x their median, within budget)"
        )
    text = ", ".join(bits) if bits else f"no divergence vs {diff.against}"
    return text + _others_clause(diff, scheme, thresholds, hints or {}) + _unreplayed_clause(diff)


def _suspects(diff: LayerDiff) -> str:
    """What is left to suspect where no replayed module shows local error: beside a divergence
    first seen at the embeddings or the final norm, "attention core, norm or rotary?" pointed away
    from what the point names; in an MoE layer whose router sent tokens to other experts than the
    baseline's, those flips (a correct fp8 tiny-moe: 3 of 12 tokens where the stream diverged)."""
    where = diff.first_divergent_point if diff.first_divergent_layer is None else None
    kind = point_kind(where) if where else None
    if kind == "embedding":
        return "the embedding table or its lookup?"
    if kind == "norm":
        return "the final norm's weight or kernel?"
    return routing_suspect(diff) or "attention core, norm or rotary?"


def routing_suspect(diff: LayerDiff, named: int = 2) -> str | None:
    """The router top-k flips of the first divergent layer (and, briefly, of the layers after it),
    where it has any (pure). What it proves: those tokens went to other experts, which moves the
    stream by a whole expert's output per token; where the layer's MoE block replays within bounds
    on the baseline's input (router included), the router and experts compute alike, so the flips
    come from the input's inherited error: near-tie routing, not a module fault."""
    layer = diff.first_divergent_layer
    flips = routing_flips(diff)
    if layer is None or layer not in flips:
        return None
    n, t = flips[layer]
    later = [f"{flips[k][0]} of {flips[k][1]} in layer {k}" for k in sorted(flips) if k > layer]
    more = f", {len(later) - named} more layers" if len(later) > named else ""
    text = ", ".join([f"router top-k differs at {n} of {t} tokens in layer {layer}", *later[:named]]) + more
    if any(p.kind == "mlp" and p.layer == layer and p.local_rel_err is not None for p in diff.points):
        return (
            f"{text}: tokens sent to other experts, while the MoE block replays within bounds on the "
            "baseline's input, so near-tie routing flips on inherited error rather than a router or expert fault"
        )
    return (
        f"{text}: tokens sent to other experts, likely near-tie routing flips; the MoE block was not replayed"
    )


def other_out_of_bounds(diff: LayerDiff, scheme: str | None, th: LayerThresholds | None) -> list[LayerPoint]:
    """The out-of-bounds modules besides the guilty one, worst first (pure): a second fault (or the
    same fault in every module) that would be invisible behind the one module the sentence names.
    Beside a slot-dependent guilty module the slot clause already counts the slot-dependent ones."""
    guilty = next((p for p in diff.points if p.name == diff.guilty_module), None)
    slot = guilty is not None and guilty.slot_dependent
    return [
        p
        for p in out_of_bounds_leaves(diff, scheme, th or LayerThresholds())
        if p.name != diff.guilty_module and not (slot and p.slot_dependent)
    ]


def _others_clause(
    diff: LayerDiff, scheme: str | None, th: LayerThresholds | None, hints: Mapping[str, str | None]
) -> str:
    """'; N other modules out of bounds, the worst M (local rel err E, its audit's hint)'."""
    others = other_out_of_bounds(diff, scheme, th)
    if not others:
        return ""
    worst = others[0]
    plural = "module" if len(others) == 1 else "modules"
    hint = f", {hints[worst.name]}" if hints.get(worst.name) else ""
    return (
        f"; {len(others)} other {plural} out of bounds, the worst {worst.name} "
        f"(local rel err {worst.local_rel_err:.3g}{hint})"
    )


def _unreplayed_clause(diff: LayerDiff) -> str:
    """'; 1 module not judged (its replay failed)': the diff vouches for no module it could not replay."""
    n = sum(replay_failures(diff).values())
    if not n or not any(p.local_rel_err is not None for p in diff.points):
        return ""  # none replayed: the sentence already says so
    return f"; {n} {'module' if n == 1 else 'modules'} not judged (replay failed)"


def _slot_clause(diff: LayerDiff, p: LayerPoint) -> str:
    """The guilty module's batch-slot dependence, and how far it reaches: a kernel that reads slot 0's
    scale rows for the other slots is usually wrong in every module of its scheme."""
    return (
        f"its output depends on the batch slot (slot 1 vs slot 0 rel err {p.slot_rel_err:.3g}; "
        f"so do {slot_reach(diff)})"
    )


def localisation_line(diffs: Sequence[LayerDiff]) -> str | None:
    """The sentence of the first diff that found a divergent layer or a guilty module, else None."""
    for diff in diffs:
        if diff.guilty_module or diff.first_divergent_layer is not None:
            return diff.summary or localisation_sentence(diff)
    return None
