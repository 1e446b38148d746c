"""The A/A noise floor: how far the reference disagrees with *itself*.

`difftest noise` runs the reference against itself (repeated, at another concurrency, after a
restart) and keeps, per metric, the worst value seen, and the worst upper end of its 95%
interval. A correct kernel can legitimately differ from its golden by that much (batch shape and
accumulation order move logits by ~1e-3, which flips near-ties), so exactness limits are set from
the upper ends (`null.exactness_limits`: the null's upper 95% bound, as from the rounding twin)
and the TIE margin of `classify_divergence` is the p90 of the A/A divergence margins, as the
twin's. `run` states which floor it used.

Pure: `floor_from_comparisons` builds a floor from Comparisons (and optionally LayerDiffs);
`to_json` / `from_json` give the file's text, the caller does the writing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from difftest.errors import NoiseFloorError
from difftest.metrics.stats import bootstrap_mean_ci
from difftest.metrics.tokens import top_margin
from difftest.results import Comparison, LayerDiff

SCHEMA = "difftest-noise-floor"
VERSION = 1  # the *_ci_high fields came later: a file without them still loads (`point_values_only`)
TIE_QUANTILE = 90.0  # the TIE margin: this percentile of the null's own divergence margins

# point field -> the field of the upper end of its 95% interval
CI_HIGH = {
    "kl_mean": "kl_mean_ci_high",
    "top1_disagreement": "top1_disagreement_ci_high",
    "token_mismatch": "token_mismatch_ci_high",
}


@dataclass(frozen=True)
class NoiseFloor:
    """Worst A/A value per metric (None: not measured). Larger always means noisier."""

    kl_mean: float | None = None  # max over A/A comparisons of aggregate kl_mean
    kl_p99: float | None = None
    top1_disagreement: float | None = None  # max of 1 - top1_agreement
    token_mismatch: float | None = None  # max of 1 - token_match
    exact_mismatch: float | None = None  # max of 1 - exact_match
    dp_rms: float | None = None
    # the upper ends of 95% bootstrap intervals over prompts, worst over the comparisons: what
    # exactness limits are set from (the point values above are `difftest diff`'s A/A spread)
    kl_mean_ci_high: float | None = None  # max of kl_mean's upper end
    top1_disagreement_ci_high: float | None = None  # max of 1 - top1_agreement's lower end
    token_mismatch_ci_high: float | None = None  # max of 1 - token_match's lower end
    tie_margin: float | None = None  # p90 of the ref's top-1/top-2 logprob margins at A/A divergences
    layer_cosine_deficit: float | None = None  # max of 1 - cosine over A/A layer points
    layer_rel_err: float | None = None
    layer_norm_dev: float | None = None  # max |norm_ratio - 1|
    n_comparisons: int = 0
    n_prompts: int = 0
    failed_requests: int = 0
    divergences: int = 0  # A/A prompts whose generations diverged at all
    reference: str = ""  # the server measured against itself
    # what identifies that server (reference_identity); a key left out is unknown (older files)
    identity: dict[str, str] = field(default_factory=dict)
    # how it was measured (measurement_settings); a key left out is unknown (older files)
    settings: dict[str, str] = field(default_factory=dict)
    how: tuple[str, ...] = ()  # e.g. ("repeat", "concurrency 1 vs 8", "after restart")
    created_at: str = ""

    def point_values_only(self) -> tuple[str, ...]:
        """The metrics stored as a point value without the upper end of its interval: a file from
        an older `difftest noise` (which also stored the *largest* A/A margin as tie_margin). A
        new floor stores both wherever it stores the point (the point where no interval was)."""
        return tuple(
            name
            for name in CI_HIGH
            if getattr(self, name) is not None and getattr(self, CI_HIGH[name]) is None
        )

    def describe(self) -> str:
        """One line for the report: which floor the thresholds came from."""
        ways = ", ".join(self.how) or "unspecified"
        return (
            f"noise floor of {self.reference or 'the reference'} from {self.n_comparisons} A/A "
            f"comparison(s) over {self.n_prompts} prompts ({ways})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = {k: _enc(v) for k, v in dataclasses.asdict(self).items()}
        data["how"] = list(self.how)
        return {"schema": SCHEMA, "version": VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseFloor:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise NoiseFloorError("not a difftest noise-floor file (missing schema 'difftest-noise-floor')")
        if data.get("version") != VERSION:
            raise NoiseFloorError(f"noise-floor file version {data.get('version')!r}, expected {VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"schema", "version"})
        if unknown:
            raise NoiseFloorError(f"unknown key(s) in noise-floor file: {', '.join(unknown)}")
        kwargs = {k: _dec(v) for k, v in data.items() if k in names}
        nans = sorted(k for k, v in kwargs.items() if isinstance(v, float) and math.isnan(v))
        if nans:
            raise NoiseFloorError(f"noise-floor file has NaN for {', '.join(nans)}: no usable floor")
        for f in dataclasses.fields(cls):
            if f.name in kwargs:
                _check_field(f.name, kwargs[f.name], f.type)
        if "how" in kwargs:
            kwargs["how"] = tuple(kwargs["how"])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - names are checked above
            raise NoiseFloorError(f"bad noise-floor file: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> NoiseFloor:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NoiseFloorError(f"noise-floor file is not JSON: {exc}") from exc
        return cls.from_dict(data)


def _enc(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _check_field(name: str, value: Any, hint: Any) -> None:
    """A value of the field's kind: a string where a number belongs ("0.001") loaded, and the
    run crashed at judge time, after every server had answered. Floors and counts are never
    negative (a negative floor would make a limit no correct target can meet)."""
    hint = str(hint)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint.startswith("float"):
        ok = (value is None and "None" in hint) or (number and value >= 0)
        kind = "a number >= 0" + (" or null" if "None" in hint else "")
    elif hint == "int":
        ok, kind = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0"
    elif hint == "str":
        ok, kind = isinstance(value, str), "a string"
    elif hint.startswith("dict"):  # identity: strings by name
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        kind = "an object of strings"
    else:  # how: a list of strings
        ok, kind = isinstance(value, list) and all(isinstance(x, str) for x in value), "a list of strings"
    if not ok:
        raise NoiseFloorError(f"noise-floor file: {name} is {json.dumps(value)}, not {kind}")


IDENTITY_KEYS = ("served_model", "model", "dtype", "device", "quant", "version", "server_config")


def reference_identity(
    spec: Any, served_model: str | None, fingerprint: Mapping[str, Any] | None
) -> dict[str, str]:
    """What tells one reference from another, for a floor file: the model id it serves, what the
    config set (a built-in shim's model / dtype / device / quant; a url or command server's
    `model` only: the shim's defaults do not apply to it), and the parts of the fingerprint
    `--resume` identifies servers by that do not depend on the launch: its /version and a digest
    of its /debug/config. Kept apart, so that a server started once with /debug and once without
    is unknown there, not different. A value that is not known is left out."""
    out: dict[str, str] = {}
    if served_model:
        out["served_model"] = served_model
    keys = ("model", "dtype", "device", "quant") if spec.kind == "shim" else ("model",)
    for key in keys:
        value = getattr(spec, key, None)
        if value is not None:
            out[key] = str(value)
    fp = fingerprint or {}
    if fp.get("version") is not None:
        out["version"] = str(fp["version"])
    if fp.get("debug_config_sha256"):
        out["server_config"] = str(fp["debug_config_sha256"])[:16]
    return out


def identity_mismatch(floor: NoiseFloor, name: str, identity: Mapping[str, str]) -> str | None:
    """Why `floor` may be another reference's than `name` with `identity`: each recorded field
    that differs (a field either side does not know is not compared). None: nothing differs."""
    there = {"name": floor.reference, **floor.identity} if floor.reference else dict(floor.identity)
    here = {"name": name, **identity}
    differ = [f"{k} {there[k]!r} there, {here[k]!r} here" for k in ("name", *IDENTITY_KEYS)
              if there.get(k) and here.get(k) and there[k] != here[k]]  # fmt: skip
    if not differ:
        return None
    unknown = "" if floor.identity else " (the file records only the name: an older `difftest noise`)"
    return (
        f"the noise floor was measured on another reference: {'; '.join(differ)}{unknown}; "
        "limits from it may not fit this one (measure it again with `difftest noise CONFIG`)"
    )


def measurement_settings(
    *, max_tokens: int, logprobs: int, endpoint: str, prompts: Sequence[Any]
) -> dict[str, str]:
    """What a floor's values depend on besides the server, as the file records them: one server's
    token-mismatch floor was 0.25 at max_tokens 1 and 0.66 at 16, so a floor measured one way and
    used another moves every exactness limit. `prompts` are `difftest.prompts.Prompt`s; their
    digest covers ids, texts, conversations and per-prompt max_tokens."""
    rows = [[p.id, p.prompt, list(p.messages), p.max_tokens] for p in prompts]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "max_tokens": str(max_tokens),
        "logprobs": str(logprobs),
        "endpoint": endpoint,
        "prompts": f"{len(prompts)} prompts, sha256 {digest}",
    }


def settings_mismatch(floor: NoiseFloor, here: Mapping[str, str]) -> str | None:
    """Why `floor` was measured otherwise than this run asks (each setting both sides know that
    differs), or None."""
    differ = [f"{k} {floor.settings[k]!r} there, {here[k]!r} here" for k in here
              if floor.settings.get(k) and floor.settings[k] != here[k]]  # fmt: skip
    if not differ:
        return None
    return (
        f"the noise floor was measured with other settings: {'; '.join(differ)}; limits from it may not "
        "fit this run (measure it again with `difftest noise CONFIG`)"
    )


def _dec(v: Any) -> Any:
    return float(v) if v in ("nan", "inf", "-inf") else v


def _worst(values: list[float]) -> float | None:
    return max(values) if values else None


def interval_high(comp: Comparison, key: str) -> float | None:
    """The upper end of a 'bigger is noisier' aggregate's 95% interval (the value without one)."""
    if key in comp.ci:
        return float(comp.ci[key][1])
    return float(comp.aggregate[key]) if key in comp.aggregate else None


def complement_high(comp: Comparison, key: str) -> float | None:
    """1 - the lower end of an agreement's interval: the worst disagreement the sample allows."""
    if key in comp.ci:
        return 1.0 - float(comp.ci[key][0])
    return 1.0 - float(comp.aggregate[key]) if key in comp.aggregate else None


def tie_margin_of(margins: Sequence[float]) -> float | None:
    """The TIE margin a null's own divergence margins give: their p90, for the twin and an A/A
    floor alike (docs/design.md; a floor once kept the largest, so one outlying near-tie of the
    reference set the TIE margin of every verdict judged with it)."""
    return float(np.percentile(np.asarray(margins, dtype=np.float64), TIE_QUANTILE)) if margins else None


# aggregates that count a failed prompt as a full mismatch -> the per-prompt field they average
# (top-1 agreement is teacher-forced: over answered prompts already)
_COUNTS_FAILED_AS_MISMATCH = {"token_match": "match_rate", "exact_match": "exact"}


def _answered_only(comp: Comparison, key: str) -> list[float] | None:
    """Per-prompt values of a mismatch-counting agreement over the answered prompts, where some
    failed (None: none failed, or the values are not stored: the aggregate then stands)."""
    attr = _COUNTS_FAILED_AS_MISMATCH.get(key)
    answered = [p for p in comp.prompts if p.error is None]
    values = [getattr(p, attr) for p in answered] if attr else []
    if key not in comp.aggregate or not values or len(answered) == len(comp.prompts) or None in values:
        return None
    return [float(v) for v in values]


def _disagreement(comp: Comparison, key: str) -> tuple[float, float | None] | None:
    """1 - an agreement (point, upper end of its 95% interval), over the answered prompts: the
    aggregate counts a failed request as a full mismatch, which is a lost answer, not noise (a 500
    on 1 prompt in 6 made token_mismatch 0.17). None: not measured."""
    values = _answered_only(comp, key)
    if values is not None:
        low = bootstrap_mean_ci(values)[0]
        return 1.0 - sum(values) / len(values), 1.0 - low
    if key not in comp.aggregate:
        return None
    return 1.0 - float(comp.aggregate[key]), complement_high(comp, key)


def floor_from_comparisons(
    comparisons: Sequence[Comparison],
    layers: Sequence[LayerDiff] = (),
    *,
    reference: str = "",
    how: Sequence[str] = (),
    created_at: str = "",
) -> NoiseFloor:
    """The worst A/A value per metric over `comparisons` (the reference against itself).

    Each comparison must already be aggregated (`aggregate_prompts`). A NaN anywhere raises
    NoiseFloorError: a reference that disagrees with itself by NaN has no floor to set limits
    from. Each of kl_mean, top-1 and token disagreement is kept twice: the worst point value (the
    A/A spread `difftest diff` reads) and the worst upper end of its 95% interval over prompts
    (what exactness limits rest on, as the twin's do: with 10 prompts the point sits well under
    it, and a limit from the point was half as wide). `tie_margin` is the p90 of the reference's
    top-1/top-2 logprob margins at positions where two of its own runs diverged, as the twin's.
    """
    if not comparisons:
        raise NoiseFloorError("no A/A comparison to measure a noise floor from")
    direct = {"kl_mean": "kl_mean", "kl_p99": "kl_p99", "dp_rms": "dp_rms"}
    complement = {
        "top1_disagreement": "top1_agreement",
        "token_mismatch": "token_match",
        "exact_mismatch": "exact_match",
    }
    seen: dict[str, list[float]] = {k: [] for k in [*direct, *complement, *CI_HIGH.values()]}
    margins: list[float] = []
    n_prompts = failed = divergences = 0
    for comp in comparisons:
        agg = comp.aggregate
        for key, value in agg.items():
            if isinstance(value, float) and math.isnan(value):
                raise NoiseFloorError(f"A/A comparison {comp.target!r} has NaN {key}: no usable floor")
        for name, key in direct.items():
            if key in agg:
                seen[name].append(float(agg[key]))
        if "kl_mean" in agg:
            seen[CI_HIGH["kl_mean"]].append(interval_high(comp, "kl_mean"))  # type: ignore[arg-type]
        for name, key in complement.items():
            measured = _disagreement(comp, key)
            if measured is None:
                continue
            seen[name].append(measured[0])
            if name in CI_HIGH and measured[1] is not None:
                seen[CI_HIGH[name]].append(measured[1])
        n_prompts += len(comp.prompts)
        failed += int(agg.get("failed_requests", sum(p.error is not None for p in comp.prompts)))
        for p in comp.prompts:
            if p.error is None and p.first_divergence is not None:
                divergences += 1
                if len(p.ref_alternatives) >= 2:
                    margins.append(top_margin(p.ref_alternatives))

    cos_def: list[float] = []
    rel: list[float] = []
    norm_dev: list[float] = []
    for diff in layers:
        for pt in diff.points:
            vals = (pt.cosine, pt.rel_err, pt.norm_ratio)
            if any(math.isnan(v) for v in vals):
                raise NoiseFloorError(f"A/A layer point {pt.name} is NaN: no usable floor")
            cos_def.append(1.0 - pt.cosine)
            rel.append(pt.rel_err)
            norm_dev.append(abs(pt.norm_ratio - 1.0))

    return NoiseFloor(
        **{name: _worst(vals) for name, vals in seen.items()},
        tie_margin=tie_margin_of(margins),
        layer_cosine_deficit=_worst(cos_def),
        layer_rel_err=_worst(rel),
        layer_norm_dev=_worst(norm_dev),
        n_comparisons=len(comparisons),
        n_prompts=n_prompts,
        failed_requests=failed,
        divergences=divergences,
        reference=reference,
        how=tuple(how),
        created_at=created_at,
    )
