"""Judge a measured run: every classification and limit derived from stored statistics.

The runner measures (per-prompt statistics, the goldens' twins, layer diffs) and stores them in
the RunResult; this module turns them into verdicts. It reads nothing but the RunResult and the
thresholds, so `difftest report DIR --thresholds FILE` re-classifies and re-judges offline with
exactly the code the run used.

Per target:
1. the null model: its golden's twin (difftest.null), else the floor file, else the in-run A/A;
2. TIE / DRIFT / WRONG at every divergence, with the null's TIE margin (exactness) or the floor's
   (accuracy);
3. black-box parts (difftest.verdict.judge_target), white-box layer parts with the replay bound
   from the compute dtype and the accumulated-error bound from the twin's own layer diff;
4. checks a broken target would pass are marked not informative.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from difftest.invariance import NOT_STRICT
from difftest.metrics.aggregate import classify_prompts
from difftest.noise import NoiseFloor
from difftest.null import (
    MARGIN,
    NO_NULL,
    UNINFORMATIVE_NOTE,
    NullModel,
    exactness_limits,
    informative,
    pick_null,
    replay_bound,
    tie_margin,
)
from difftest.results import SKIPPED_NOTE, PartVerdict, RunResult, TargetResult, TargetVerdict
from difftest.verdict import budget_for, judge_target
from difftest.whitebox.activations import LayerThresholds
from difftest.whitebox.layers import layer_verdict
from difftest.whitebox.localise import localisation_line

CARRIED_PARTS = ("invariance", "white-box")  # judged (or skipped) when measured, carried on re-judge


def null_for(
    run: RunResult, target: TargetResult, floor: NoiseFloor | None, in_run: NoiseFloor | None = None
) -> NullModel:
    """The null model `target`'s exactness is judged with."""
    if target.golden is None:
        return NO_NULL
    twin = next((c for c in run.nulls if c.baseline == target.golden), None)
    layers = next((d for d in run.null_layers if d.against == target.golden), None)
    return pick_null((twin, layers, twin.module_noise) if twin is not None else None, floor, in_run)


def layer_thresholds(dtype: str | None, null: NullModel, margin: float) -> LayerThresholds:
    """A target's white-box bounds: its compute dtype's replay bound (a module on the golden's
    input), and the null's accumulated-error limit, the one point_rel_err_max judges. The run flags
    residual points with these too (runner._whitebox): flagging under max(0.05, limit) while judging
    under the limit failed points 0.03..0.05 that no localisation called divergent."""
    point = exactness_limits(null, margin)["point_rel_err_max"]
    return LayerThresholds(
        exact_local_rel_err=replay_bound(dtype)[0], exact_point_rel_err=float(point.value or 0.0)
    )


def _layer_parts(
    target: TargetResult, null: NullModel, scheme: str | None, margin: float
) -> list[PartVerdict]:
    _, bound_note = replay_bound(target.dtype)
    point = exactness_limits(null, margin)["point_rel_err_max"]
    th = layer_thresholds(target.dtype, null, margin)
    parts = []
    for diff in target.layers:
        verdict = layer_verdict(diff, th, scheme=scheme)
        checks = []
        for c in verdict.checks:
            if c.name == "local_rel_err_max":
                c = dataclasses.replace(c, note=f"{c.note}; {bound_note}")
            elif c.name == "point_rel_err_max":
                c = dataclasses.replace(c, note=f"{c.note}; {point.note}", informative=point.informative)
            checks.append(c)
        parts.append(dataclasses.replace(verdict, part=f"layers-{diff.kind}", checks=tuple(checks)))
    return parts


def _mark_informative(part: PartVerdict) -> PartVerdict:
    """A carried part's limits (e.g. 3x the golden's slot variance) can be widened past use too (a
    `tie_margin` override past use: `invariance.TIE_MARGIN_GUARD`, judged where the flips are)."""
    checks = tuple(
        c if informative(c.name, c.limit)
        else dataclasses.replace(c, informative=False, note=c.note + UNINFORMATIVE_NOTE)
        for c in part.checks
    )  # fmt: skip
    return dataclasses.replace(part, checks=checks)


SLOT_NOT_REPLAYED = (
    "not localised: the batch-slot check failed, and the per-layer replay puts a module's input in "
    "batch slots 0 and 1 only; a fault that acts from a later slot (slot-tile: slot 16 on) does not "
    "show there"
)


def slot_not_localised(invariance: Mapping[str, Any] | None) -> str:
    """Why a failed batch-slot check has no module to blame. Where a slot of the first, 4-prompt batch
    already moved against its slot 0 (slot 1 or 3), a fault from a later
    slot explains nothing: the replayed modules (each in slots 0 and 1) do not depend on their slot,
    so the dependence lies outside them."""
    inv = invariance or {}
    tolerance = float(inv.get("tolerance") or 0.0)
    early = [
        str(s.get("placement"))
        for s in inv.get("slots", [])
        if isinstance(s, Mapping)  # an older report's slots may be bare numbers
        # strict placements only: against the probe alone a correct quantized kernel moves anyway
        # (bfloat16 fp8-block on an H100: slot 0 and both concurrent requests past the tolerance
        # under slot-tile, whose fault acts from slot 16)
        and not s.get("wide") and not any(s.get(flag) for flag in NOT_STRICT)
        and s.get("error") is None
        and (not s.get("same_tokens", True) or float(s.get("max_logprob_diff") or 0.0) > tolerance)
    ]  # fmt: skip
    if not early:
        return SLOT_NOT_REPLAYED
    return (
        f"not localised: the batch-slot check moved already in the first batch ({', '.join(early[:3])}), "
        "and no replayed module's output depends on its batch slot (slots 0 and 1): the dependence lies "
        "outside the replayed modules (attention or its KV cache, sampling, the batcher?)"
    )


def _slot_check_failed(verdict: TargetVerdict) -> bool:
    """The batch-slot part failed: the one failure the two-slot replay may be blind to."""
    return any(p.part == "invariance" and not p.passed for p in verdict.parts)


def judge_one(
    run: RunResult,
    target: TargetResult,
    overrides: Mapping[str, float],
    *,
    floor: NoiseFloor | None = None,
    in_run: NoiseFloor | None = None,
    carried: Sequence[PartVerdict] = (),
    skipped: Mapping[str, str] = {},
) -> None:
    """Classify and judge one target in place (sets `target.verdict`). Only a target that did not
    pass carries a localisation: a PASS's first divergent layer is per-layer data (report.json's
    `layers`), and a stored PASS's old sentence is dropped on re-judge."""
    margin = float(overrides.get("margin", MARGIN))
    null = null_for(run, target, floor, in_run)
    acc_null = pick_null(None, floor)  # the reference's own noise, where a floor file gives it
    for comp in target.comparisons:
        tm = tie_margin(null if comp.kind == "exactness" else acc_null, overrides)[0]
        comp.aggregate.update(classify_prompts(comp.prompts, tm))
    acc = target.comparison("accuracy")
    if acc is None:
        raise ValueError(f"{target.name}: no accuracy comparison to judge")
    extra = _layer_parts(target, null, target.scheme, margin) + [_mark_informative(p) for p in carried]
    old = target.verdict
    target.verdict = judge_target(
        target.name,
        target.expect,
        target.comparison("exactness"),
        acc,
        budget_for(target.scheme, overrides),
        null,
        extra,
        overrides,
        skipped=skipped,
    )
    if target.verdict.passed:
        return  # its layer diffs stayed within the bounds it was judged by: a sentence reads as a finding
    localisation = localisation_line(target.layers)
    if localisation is None and old is not None:
        localisation = old.localisation
    if localisation is None and target.layers and _slot_check_failed(target.verdict):
        localisation = slot_not_localised(target.invariance)
    if localisation:
        target.verdict = dataclasses.replace(target.verdict, localisation=localisation)


def floor_for_target(record: Mapping[str, Any] | None, golden: str | None) -> NoiseFloor | None:
    """The floor file, or `golden`'s in-run A/A, that report.json's `noise_floor` records."""
    if not record:
        return None
    if "in_run" in record:
        data = record["in_run"].get(golden) if golden else None
        return NoiseFloor.from_dict(data) if data else None
    return NoiseFloor.from_dict(dict(record))


def rejudge(
    run: RunResult, thresholds_for: Mapping[str | None, Mapping[str, float]] | None = None
) -> list[str]:
    """Re-judge every target of a stored run (`report DIR`, with or without --thresholds) with the
    nulls the run used (twins, floor file, in-run A/A, all from report.json); carried parts and
    skipped groups kept from the stored verdict. Returns what could not be re-judged offline, in
    words (`slot_margin_note`), so that a caller says so rather than ignore an override."""
    in_run = bool(run.noise_floor) and "in_run" in run.noise_floor  # type: ignore[operator]
    floor = None if in_run else floor_for_target(run.noise_floor, None)
    notes: list[str] = []
    for t in run.targets:
        # a FAIL verdict is falsy (TargetVerdict.__bool__): `if old` dropped a failing target's
        # batch-slot and white-box parts, and a re-judge turned its FAIL into PASS
        old_parts = t.verdict.parts if t.verdict is not None else ()
        carried = [p for p in old_parts if p.part in CARRIED_PARTS]
        skipped = {
            f"{p.part}.{g}": c.note.removeprefix(SKIPPED_NOTE)
            for p in old_parts
            for c in p.checks
            if c.note.startswith(SKIPPED_NOTE)
            for g in [_group_of(c.name)]
        }
        overrides = (thresholds_for or {}).get(t.scheme, {})
        golden_floor = floor_for_target(run.noise_floor, t.golden) if in_run else None
        judge_one(run, t, overrides, floor=floor, in_run=golden_floor, carried=carried, skipped=skipped)
        note = slot_margin_note(run, t, overrides)
        if note:
            notes.append(note)
    return notes


def slot_margin_note(run: RunResult, target: TargetResult, overrides: Mapping[str, float]) -> str | None:
    """Why the batch-slot part keeps the run's TIE margin where `overrides` give it another (None:
    they do not). The run counted both the target's slot flips and its baseline's draws' flips with
    that margin (runner._whitebox: `tie_margin(null, overrides)` of the twin null); report.json
    keeps the target's placements but only the draws' flip counts, so no other margin can be
    applied to them offline -- the part is carried as measured, and this says so."""
    stored = target.invariance.get("tie_margin") if target.invariance else None
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        return None  # no twin on the probe: the run applied no TIE margin there, nor would a rerun
    margin, source = tie_margin(null_for(run, target, None), overrides)
    if math.isclose(margin, stored, rel_tol=1e-9, abs_tol=0.0):
        return None
    return (
        f"{target.name}: batch-slot part not re-judged offline: kept at the run's TIE margin "
        f"{stored:.4g} nats, not {margin:.4g} ({source}); report.json holds the baseline draws' "
        "flip counts, not their flips"
    )


def _group_of(check: str) -> str:
    from difftest.verdict import _CHECKS

    return _CHECKS.get(check, ("", check))[1]
