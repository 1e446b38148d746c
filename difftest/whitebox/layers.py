"""The per-layer diff of one (baseline, target) pair: first divergent layer and guilty module.

    diff_layers(baseline, target, prompt, kind=...)
      1. POST /debug/activations on the baseline (the prompt; inputs + logits + decode steps),
         then on the target with the baseline's token ids (and rows), so both see the same
         sequence; in chunks where an answer is over a response cap (activations.py)
      2. per point: cosine, norm ratio, rel / max-abs error, SQNR (activations.py)
         -> flagged points -> the first divergent point (embeddings, a layer's residual stream,
         the final norm or the logits: the first flagged on that path)
      3. replay: every linear / MoE module gets the *baseline's* input through /debug/module on
         both servers, so the difference is the module's own (local) error (replay.py)
      4. the guilty module and its backend, from the target's /debug/config

The audit of the guilty module and the localisation sentence are localise.py's: a run audits a
module once however many diffs blame it.

Two questions, two bounds (docs/design.md "Two references"):
- exactness (vs golden): a correct backend differs from its golden only by accumulation order, so
  the bounds are tight absolute ones and the worst local error names the module.
- accuracy (vs FP16): every quantized module has the scheme's own error, so a module is ranked by
  its local error relative to the median of its siblings (same role in other layers): a faulty
  module stands out from what the scheme costs its kind even when inside the absolute budget.
  Cosine is blind to magnitude (fnuz x0.5 keeps cosine 0.99955), hence the norm-ratio bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from difftest.collect import Endpoint
from difftest.errors import DifftestError, RequestRejected
from difftest.results import SKIPPED_NOTE, Check, LayerDiff, LayerPoint, PartVerdict
from difftest.whitebox.activations import (
    LEAF_KINDS,
    LayerThresholds,
    compare_points,
    fetch_activations,
    finite_or_inf,
    first_divergence,
    judged_as,
    layer_of,
)
from difftest.whitebox.replay import (
    choose_guilty,
    rank_modules,
    replay_all,
    replay_failure_lines,
    replay_failures,
)


def scheme_of(config: Mapping[str, Any]) -> str | None:
    """The scheme most of a /debug/config's modules run (None: nothing is quantized)."""
    schemes = [
        m.get("scheme") for m in config.get("modules", {}).values() if m.get("scheme") not in (None, "none")
    ]
    return max(set(schemes), key=schemes.count) if schemes else None


def _model_mismatch(base: Mapping[str, Any], tgt: Mapping[str, Any]) -> str:
    """Why two /debug/config answers are not one model's (layer count, module names); "" if they are."""
    if base.get("num_layers") != tgt.get("num_layers"):
        return f"{base.get('num_layers')} layers against {tgt.get('num_layers')}"
    a, b = set(base.get("modules", {})), set(tgt.get("modules", {}))
    if a != b:
        only = sorted(a ^ b)
        return f"{len(only)} module(s) only one side has, e.g. {only[0]}"
    return ""


async def diff_layers(
    baseline: Endpoint, target: Endpoint, prompt: str, *, kind: str, decode_steps: int = 2,
    thresholds: LayerThresholds | None = None,
) -> LayerDiff:  # fmt: skip
    """Per-layer diff of `target` against `baseline` on one prompt, down to the guilty module.

    `summary` and `audit_hint` stay empty: localise.py fills them. A side that cannot serve the
    activations gives a diff with a warning and that summary, never an exception."""
    if kind not in ("exactness", "accuracy"):
        raise ValueError(f"kind must be exactness or accuracy, got {kind!r}")
    th = thresholds or LayerThresholds()
    diff = LayerDiff(against=baseline.name, kind=kind)
    try:
        tgt_cfg = await target.client.debug_config()
        base_cfg = await baseline.client.debug_config()
        mismatch = _model_mismatch(base_cfg, tgt_cfg)
        if mismatch:  # a per-module diff of two models would blame some module of the wrong one
            diff.warnings.append(f"the two servers serve different models: {mismatch}")
            diff.summary, diff.not_made = "layer diff not made (different models)", "rejected"
            return diff
        if kind == "exactness":  # a golden is the target's own scheme and dtype on the reference backend
            diff.warnings.extend(
                f"the golden's {key} is {base_cfg.get(key)!r}, the target's {tgt_cfg.get(key)!r}: not a golden of it"
                for key in ("quant", "dtype")
                if base_cfg.get(key) != tgt_cfg.get(key)
            )
        req = {"inputs": True, "logits": True, "decode_steps": decode_steps}
        base = await fetch_activations(baseline, {"prompt": prompt, **req})
        # the target answers the rows the baseline kept (all of them, unless over the memory budget)
        rows = {} if base.positions is None else {"positions": base.positions}
        tgt = await fetch_activations(target, {"tokens": base.token_ids, **req, "inputs": False, **rows})
        diff.warnings.extend(dict.fromkeys(base.notes + tgt.notes))
    except DifftestError as exc:
        diff.warnings.append(f"activations unavailable: {exc}")
        diff.summary = "layer diff not made (activations unavailable)"
        diff.not_made = "rejected" if isinstance(exc, RequestRejected) else "failed"
        return diff
    scheme = scheme_of(tgt_cfg)
    kinds = {n: str(m.get("kind")) for n, m in tgt_cfg.get("modules", {}).items()}
    diff.points, warns = compare_points(base, tgt, kind=kind, scheme=scheme, th=th, config_kinds=kinds)
    diff.warnings.extend(warns)
    diff.first_divergent_layer, diff.first_divergent_point = first_divergence(diff.points)
    await replay_all(baseline, target, base, tgt_cfg, diff, th)
    guilty, _ = choose_guilty(diff, scheme, th)
    diff.guilty_module = guilty
    if guilty and layer_of(guilty) == diff.first_divergent_layer:
        diff.first_divergent_point = guilty
    if guilty:
        diff.guilty_backend = tgt_cfg.get("modules", {}).get(guilty, {}).get("backend")
    return diff


def _judged(p: LayerPoint) -> bool:
    """A point the accumulated-error check judges: a stream point, as flagging picks them (the
    same points and bound flag and judge, so a point that fails is a divergent one)."""
    return bool(judged_as(p.name, p.kind))


def not_judged(diff: LayerDiff) -> str:
    """Why a diff has no module replay to judge: the real cause (activations over a cap, a replay
    the server failed), which "no module could be replayed" alone used to hide."""
    if diff.not_made:  # the warning that ended the diff is its last
        return f"layer diff not made: {diff.warnings[-1]}" if diff.warnings else diff.summary
    n = sum(replay_failures(diff).values())
    lines = replay_failure_lines(diff)
    if n and lines:
        return f"no module could be replayed ({n} replay(s) failed, e.g. {lines[0]})"
    return "no module could be replayed"


def _unjudged_check(diff: LayerDiff, replayed: int) -> Check | None:
    """Modules whose replay a server failed to answer (or answered damaged), or refused beside
    others it replayed: the part cannot vouch for them, so it cannot PASS (a fault in one of them
    passed before, and with every replay failing the part was merely "skipped": exit 0). A failing
    module still FAILs the part; otherwise it is undecided. A server that refuses every replay
    does not serve /debug/module at all: a gap the part is skipped for, as before."""
    fails = replay_failures(diff)
    n = fails["failed"] + (fails["refused"] if replayed else 0)
    if not n:
        return None
    first = next(iter(replay_failure_lines(diff)), "")
    note = f"{n} module(s) not replayed, so not judged; {first.split(' (and ')[0].replace(';', ',')}"
    return Check("replays_unjudged", float(n), 0.0, "<=", False, True, note, decided=False)


def layer_verdict(
    diff: LayerDiff, thresholds: LayerThresholds | None = None, scheme: str | None = None
) -> PartVerdict:
    """Part "layers": FAIL when a module's local error is out of bounds (exactness), or, against
    FP16, when a module's magnitude is off, its cosine is under the budget, or it is a gross
    outlier among its siblings. Reasons name the module."""
    th = thresholds or LayerThresholds()
    replayed = [p for p in diff.points if p.local_rel_err is not None and p.kind in LEAF_KINDS]
    stream = [p for p in diff.points if _judged(p)]
    unjudged = _unjudged_check(diff, len(replayed))
    if not replayed and not (diff.kind == "exactness" and stream):
        if unjudged is None:
            return PartVerdict("layers", diff.against, skipped=not_judged(diff))
        return PartVerdict("layers", diff.against, (unjudged,))

    def worst(key: Any, pick: Any) -> tuple[float, str]:
        vals = [(key(p), p.name) for p in replayed]
        nan = [v for v in vals if math.isnan(v[0])]
        return nan[0] if nan else pick(vals)

    checks: list[Check] = [] if unjudged is None else [unjudged]

    def add(name: str, value: float, limit: float, op: str, module: str, note: str) -> None:
        ok = (value <= limit) if op == "<=" else (value >= limit)
        checks.append(Check(name, value, limit, op, bool(ok), note=f"{module}; {note}"))

    if diff.kind == "exactness":
        if replayed:
            v, n = worst(lambda p: p.local_rel_err, max)
            add("local_rel_err_max", v, th.exact_local_rel_err, "<=", n, "module replayed on the golden's input")  # fmt: skip
        else:  # the accumulated error needs no replay: it still judges, and this says what is missing
            checks.append(Check("local_rel_err_max", None, th.exact_local_rel_err, "<=", True, False,
                                f"{SKIPPED_NOTE}{not_judged(diff)}", informative=False))  # fmt: skip
        if stream:
            v, n = max((finite_or_inf(p.rel_err), p.name) for p in stream)
            add("point_rel_err_max", v, th.exact_point_rel_err, "<=", n, "accumulated vs golden")
        return PartVerdict("layers", diff.against, tuple(checks))
    lo, hi = th.norm_bounds(scheme)
    v, n = worst(lambda p: p.local_norm_ratio, min)
    add("local_norm_ratio_min", v, lo, ">=", n, "magnitude bound of the scheme")
    v, n = worst(lambda p: p.local_norm_ratio, max)
    add("local_norm_ratio_max", v, hi, "<=", n, "magnitude bound of the scheme")
    v, n = worst(lambda p: p.local_cosine, min)
    add("local_cosine_min", v, th.module_cosine(scheme), ">=", n, f"module budget {scheme or '8-bit'}")
    ranked = rank_modules({p.name: p.local_rel_err for p in replayed}, "accuracy")  # type: ignore[misc]
    if ranked:
        n, v = ranked[0]
        add("local_err_vs_siblings_max", v, th.relative_fail, "<=", n, "local rel err / siblings' median")
    return PartVerdict("layers", diff.against, tuple(checks))
