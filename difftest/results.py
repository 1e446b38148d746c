"""The differ's result model: what the runner fills, the verdict reads and the reports render.

One tree, per run:

    RunResult
    ├── signature             every setting and version that produced the numbers
    ├── noise_floor           the A/A floor the thresholds were set from (or None)
    └── targets: TargetResult
        ├── comparisons: Comparison       "exactness" (vs golden) and "accuracy" (vs reference)
        │   └── prompts: PromptDiff       per prompt first, aggregates after (sacrebleu's habit)
        ├── layers: LayerDiff             white-box per-layer diff, when both sides serve /debug
        ├── audit: list[dict]             quantization audit rows
        └── verdict: TargetVerdict        PASS / FAIL per part, every reason listed

Everything here is plain data (dataclasses of numbers, strings and lists) so that `report.json`
round-trips exactly: `RunResult.from_dict(run.to_dict()) == run`. `difftest report DIR`
re-renders from that file without any server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# The piece of a check's note in which the verdict names an interval that is not the bootstrap's
# 95% CI ("interval: range of the 3 prompts"; difftest.verdict.INTERVAL_NOTE writes it).
INTERVAL_PIECE = "interval: "

# checks of whether the target answered usably, not of what it computed: failed requests leave a
# verdict open, broken answers fail it, and neither makes one PASS on its own
REQUEST_CHECKS = frozenset({"failed_rate", "broken_rate"})

GATE_EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 4, "INFRASTRUCTURE": 3}

SCHEMA_VERSION = 2  # 2: informative / decided checks, INCONCLUSIVE, raw divergence stats, nulls


# ----------------------------------------------------------------------------- verdict pieces


# Limits are inclusive, and a mean of values all at the limit can round past it (six top-1 rates
# of 0.8 average to 0.7999999999999999, which failed "top-1 80.0% < limit 80.0%"): a value within
# this relative distance of the limit is at it. A mean over n values rounds by ~n x 1e-16
# relative, far under 1e-9 even at 20k prompts, and no metric means anything at the 9th digit.
AT_LIMIT_REL = 1e-9


def within(value: float, limit: float, op: str) -> bool:
    """Whether `value` passes an inclusive limit (`op` "<=" or ">="), at it to AT_LIMIT_REL."""
    if math.isclose(value, limit, rel_tol=AT_LIMIT_REL):
        return True
    return value <= limit if op == "<=" else value >= limit


def straddles(ci: Sequence[float], limit: float, op: str) -> bool:
    """Whether the interval holds values on both sides of the limit: its ends judge differently.
    An end at the (inclusive) limit is on the passing side, so [0.02, 0.08] under a KL limit of
    0.08 decides a pass; a point interval never straddles."""
    return within(ci[0], limit, op) != within(ci[1], limit, op)


@dataclass(frozen=True)
class Check:
    """One threshold test. `value=None` means "not measured": it passes only if `required=False`.

    `informative=False`: the limit is so wide that a broken target would pass it too (a noisy
    null widened it); the check is shown but decides nothing. `decided=False`: the value's 95%
    interval straddles the limit, so this sample cannot say which side the target is on;
    `prompts_to_decide` estimates how many prompts would.
    """

    name: str  # metric key, e.g. "kl_mean"
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    passed: bool
    required: bool = True
    note: str = ""  # where the limit came from: "twin p99 x3", "budget fp8-block", ...
    informative: bool = True
    decided: bool = True
    ci: list[float] | None = None  # [low, high] of the value, when it is a mean over prompts
    prompts_to_decide: int | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def fails(self) -> bool:
        """Counts against the target: informative, decided, and on the wrong side -- or NaN or
        infinite, or a required value not measured, which fail whatever the limit (a limit widened past use must
        not turn a broken measurement into a pass)."""
        if self.passed:
            return False
        if self.value is not None and (math.isnan(self.value) or math.isinf(self.value)):
            return True  # not passed and infinite: no limit, however wide, makes that a pass
        if self.value is None and self.required:
            return self.decided  # undecided: nothing was answered to measure (all requests lost)
        return self.informative and self.decided

    @property
    def undecided(self) -> bool:
        return (self.informative or (self.value is None and self.required)) and not self.decided

    @property
    def straddles(self) -> bool:
        """Whether `ci`'s two ends judge differently against the limit: what "straddles the limit"
        says. An undecided check whose interval does not (its prompts were lost) must not say it."""
        return self.ci is not None and self.value is not None and straddles(self.ci, self.limit, self.op)

    @property
    def interval_name(self) -> str:
        """What `ci` is: the bootstrap's "95% CI", or what the verdict's note names instead
        ("range of the 3 prompts", under its MIN_PROMPTS_FOR_CI), so no report calls a range a CI."""
        return next(
            (p.removeprefix(INTERVAL_PIECE) for p in self.note_pieces if p.startswith(INTERVAL_PIECE)),
            "95% CI",
        )

    @property
    def note_pieces(self) -> list[str]:
        """The note's "; "-separated pieces, stripped (the interval's name among them)."""
        return [p.strip() for p in (self.note or "").split(";") if p.strip()]

    def describe(self) -> str:
        if self.value is None:
            return f"{self.name} not measured ({self.note or 'missing'})"
        bad = {"<=": ">", ">=": "<"}[self.op] if not self.passed else self.op
        value, limit = fmt_apart(self.value, self.limit)
        text = f"{self.name} {value} {bad} {limit}"
        if self.straddles and not self.decided:
            text += f", {self.interval_name} [{_fmt(self.ci[0])}, {_fmt(self.ci[1])}] straddles the limit"
            if self.prompts_to_decide is not None:
                text += f" (~{self.prompts_to_decide} prompts would decide)"
        if not self.informative:
            text += " [not informative]"
        note = "; ".join(p for p in self.note_pieces if not p.startswith(INTERVAL_PIECE))
        return text + (f" ({note})" if note else "")


@dataclass(frozen=True)
class PartVerdict:
    """Exactness (vs golden), accuracy (vs FP16 reference) or invariance (batch slot)."""

    part: str
    against: str  # the server name compared with ("" for invariance)
    checks: tuple[Check, ...] = ()
    skipped: str | None = None  # why this part did not run (then it neither passes nor fails)

    @property
    def passed(self) -> bool:
        return not any(c.fails for c in self.checks)

    @property
    def informative(self) -> bool:
        """At least one check here could fail a broken target."""
        return any(c.informative for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def reasons(self) -> list[str]:
        return [f"{self.part}: {c.describe()}" for c in self.checks if c.fails]

    @property
    def open_questions(self) -> list[str]:
        """Undecided informative checks: why a verdict is INCONCLUSIVE."""
        return [f"{self.part}: {c.describe()}" for c in self.checks if c.undecided]


# how a TargetVerdict warning names a group of checks that was not measured ("accuracy:
# teacher-forced checks skipped: no echo"); the terminal picks these out by it
SKIPPED_CHECKS = " checks skipped: "
# how the verdict's warning of a BLEU on fewer than 4 n-gram orders begins, after "part: "
BLEU_ORDERS = ("BLEU of 1- to ", "BLEU has no n-grams")
# how such a check's note begins ("skipped: no echo"): it was not measured, no limit was applied
SKIPPED_NOTE = "skipped: "


@dataclass(frozen=True)
class TargetVerdict:
    target: str
    expect: str  # "pass" | "fail"
    parts: tuple[PartVerdict, ...]
    localisation: str | None = (
        None  # "first divergent layer 3, local error in model.layers.3.mlp.down_proj, ..."
    )
    warnings: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """FAIL: an informative check failed decisively. INCONCLUSIVE: nothing failed, but an
        informative check is undecided or no check informs at all. PASS otherwise."""
        if any(not p.passed for p in self.parts):
            return "FAIL"
        checks = [c for p in self.parts for c in p.checks]
        if not self.numbers_inform or any(c.undecided for c in checks):
            return "INCONCLUSIVE"
        return "PASS"

    @property
    def numbers_inform(self) -> bool:
        """Some informative check judges the target's numbers (not only whether it answered)."""
        return any(c.informative and c.name not in REQUEST_CHECKS for p in self.parts for c in p.checks)

    @property
    def passed(self) -> bool:
        return self.label == "PASS"

    @property
    def inconclusive(self) -> bool:
        return self.label == "INCONCLUSIVE"

    @property
    def meets_expectation(self) -> bool:
        return self.label == ("PASS" if self.expect == "pass" else "FAIL")

    def __bool__(self) -> bool:
        return self.meets_expectation

    @property
    def reasons(self) -> list[str]:
        out: list[str] = []
        for p in self.parts:
            out.extend(p.reasons)
        if self.label == "INCONCLUSIVE":
            for p in self.parts:
                out.extend(f"inconclusive: {q}" for q in p.open_questions)
            if not self.numbers_inform:
                out.append("inconclusive: no informative check could be made")
        return out


# ----------------------------------------------------------------------------- black-box results


@dataclass
class PromptDiff:
    """One prompt, one target against one baseline (reference or golden)."""

    prompt_id: str
    prompt: str
    error: str | None = None  # a failed request: counted, shown, never dropped from denominators
    # the error is the target's answer itself (NaN, malformed): a bug, not a lost request
    broken: bool = False
    tags: list[str] = field(default_factory=list)  # the prompt file's `tags` (per-tag breakdown)
    # free-running greedy generation
    ref_text: str | None = None
    tgt_text: str | None = None
    ref_tokens: list[str] = field(default_factory=list)  # display strings of generated tokens
    tgt_tokens: list[str] = field(default_factory=list)
    ref_token_ids: list[int] | None = None
    tgt_token_ids: list[int] | None = None
    match_rate: float | None = None
    exact: bool | None = None
    common_prefix: int | None = None
    first_divergence: int | None = None  # token index, None when none
    divergence_kind: str | None = None  # "TIE" | "DRIFT" | "WRONG" | "LENGTH": derived at judge time
    # raw statistics at the first divergence, measured once (the TIE margin is applied when judging):
    divergence_margin: float | None = None  # reference's top-1 minus top-2 logprob, nats
    divergence_gap: float | None = None  # reference's top-1 minus its logprob of the target's token
    # (None: the target's token is not in the reference's top-k)
    ref_alternatives: dict[str, float] = field(default_factory=dict)  # top logprobs at the divergence
    tgt_alternatives: dict[str, float] = field(default_factory=dict)
    garbled: bool | None = None
    bleu: float | None = None
    chrf: float | None = None
    # teacher-forced (reference continuation echoed into the target)
    position_kl: list[float] | None = None  # per generated position, nats
    kl_mean: float | None = None
    kl_lower: float | None = None
    kl_upper: float | None = None
    top1_agreement: float | None = None
    dp_mean: float | None = None
    dp_rms: float | None = None


@dataclass
class Comparison:
    """A target against one baseline, over all prompts."""

    kind: str  # "exactness" | "accuracy"
    baseline: str  # server name: the golden or the reference
    target: str
    prompts: list[PromptDiff] = field(default_factory=list)
    aggregate: dict[str, float] = field(default_factory=dict)  # see difftest.metrics.aggregate
    ci: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high] (bootstrap 95%)
    warnings: list[str] = field(default_factory=list)
    module_noise: float | None = None  # kind "null": the twin's per-module noise amplitude


# ----------------------------------------------------------------------------- white-box results


@dataclass
class LayerPoint:
    """One activation point (residual after a block, attn / mlp output, a linear's output)."""

    name: str  # e.g. "model.layers.3.mlp.down_proj" or "model.layers.3" (residual)
    layer: int | None
    kind: str  # "residual" | "attn" | "mlp" | "linear" | "logits"
    cosine: float
    norm_ratio: float
    rel_err: float
    max_abs: float
    sqnr_db: float
    flagged: bool = False
    local_cosine: float | None = None  # replayed on the baseline's input (local error)
    local_norm_ratio: float | None = None
    local_rel_err: float | None = None
    # replay of a linear in two batch slots: the target's slot 1 (tokens rolled by one) against its
    # own slot 0, rolled back; above LayerThresholds.slot_rel_err the output depends on the slot
    slot_rel_err: float | None = None
    slot_dependent: bool = False


@dataclass
class RoutingFlips:
    """One MoE layer where the target's router sent tokens to other experts than the baseline's.
    Kept as numbers, not only in the warning's prose: the localisation sentence reads them, and so
    can a reader of layers.json / report.json, whatever the warning's wording."""

    layer: int
    flipped: int  # tokens whose set of routed experts differs between the sides
    tokens: int  # tokens compared


@dataclass
class LayerDiff:
    against: str  # "golden" or "reference" server name
    kind: str  # "exactness" | "accuracy"
    points: list[LayerPoint] = field(default_factory=list)
    first_divergent_layer: int | None = None
    first_divergent_point: str | None = None
    guilty_module: str | None = None  # local error named by replay
    guilty_backend: str | None = None
    audit_hint: str | None = None  # e.g. "scales look transposed"
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    # why no diff was made: "" made; "rejected" a side refused the request (HTTP 4xx); "failed" a
    # side's debug answer failed or was unreadable
    not_made: str = ""
    # module replays the diff cannot vouch for: a server failed to answer them or answered them
    # damaged ("failed": exit 3 in `layers`), or refused them (HTTP 4xx: "refused")
    replays_unjudged: dict[str, int] = field(default_factory=dict)
    # MoE layers whose router top-k differs between the sides, in layer order (a file written before
    # this field: none; its stored summary still names them)
    routing_flips: list[RoutingFlips] = field(default_factory=list)


# ----------------------------------------------------------------------------- per target / run


@dataclass
class TargetResult:
    name: str
    scheme: str | None
    expect: str
    url: str = ""
    golden: str | None = None  # server name of the golden, if any
    dtype: str | None = None  # compute dtype (from /debug/config): sizes the module replay bound
    comparisons: list[Comparison] = field(default_factory=list)
    layers: list[LayerDiff] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    invariance: dict[str, Any] = field(default_factory=dict)
    conformance: dict[str, Any] = field(default_factory=dict)
    verdict: TargetVerdict | None = None
    failed_requests: int = 0
    total_requests: int = 0

    def comparison(self, kind: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.kind == kind), None)


@dataclass
class RunResult:
    reference: str
    targets: list[TargetResult] = field(default_factory=list)
    signature: dict[str, Any] = field(default_factory=dict)
    noise_floor: dict[str, Any] | None = None
    # the null model: each golden against its rounding twin (black-box and per-layer), from which
    # exactness limits are derived at judge time (difftest.null)
    nulls: list[Comparison] = field(default_factory=list)
    null_layers: list[LayerDiff] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # why the run is exit 3 (a server died, failed requests past error_rate_limit): kept in
    # report.json, so a re-rendered or re-judged report still says its answers are incomplete
    infrastructure: list[str] = field(default_factory=list)
    started_at: str = ""
    elapsed_s: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def gate_passed(self) -> bool:
        """Every verdict as expected, on complete answers (an exit-3 run passes no gate)."""
        return not self.infrastructure and all(
            t.verdict is not None and t.verdict.meets_expectation for t in self.targets
        )

    @property
    def gate(self) -> str:
        """INFRASTRUCTURE when a server or its requests failed (the verdicts rest on incomplete
        answers), else FAIL when a verdict contradicts its expectation decisively, else
        INCONCLUSIVE when one is undecided, else PASS: exit codes 3 / 1 / 4 / 0. One gate for
        report.json, `--json` and the rendered reports: report.json said PASS for an exit-3 run
        that report.md called INFRASTRUCTURE, and a CI job reading `.gate` took it (tester t22)."""
        if self.infrastructure:
            return "INFRASTRUCTURE"
        verdicts = [t.verdict for t in self.targets]
        if any(v is None or (not v.meets_expectation and not v.inconclusive) for v in verdicts):
            return "FAIL"
        return "INCONCLUSIVE" if any(v is not None and v.inconclusive for v in verdicts) else "PASS"

    @property
    def exit_code(self) -> int:
        """The gate's: 3 INFRASTRUCTURE, 1 FAIL, 4 INCONCLUSIVE, 0 PASS (README "Exit codes")."""
        return GATE_EXIT[self.gate]

    def to_dict(self) -> dict[str, Any]:
        """The stored tree, plus what is derived from it (gate, exit code, each verdict's label), so
        a reader of report.json need not re-implement the rules; derived keys are ignored on load."""
        out = dataclasses.asdict(self)
        out["gate"], out["exit_code"] = self.gate, self.exit_code
        for t, stored in zip(self.targets, out["targets"], strict=True):
            if t.verdict is not None:
                stored["verdict"]["label"] = t.verdict.label
                stored["verdict"]["meets_expectation"] = t.verdict.meets_expectation
        return finite_for_json(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"report.json schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}"
            )
        return _build(cls, data)


# ----------------------------------------------------------------------------- (de)serialisation


def _fmt(x: float, digits: int = 4) -> str:
    if x == 0 or (1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def fmt_compact(x: float | None, fixed: str) -> str:
    """`x` in the `fixed` format inside [1e-3, 1e4), else 3 significant digits, scientific: a
    skipped scale's norm ratio of 1611404929.3622 was a column of noise digits next to 1.61e+09 in
    the layer table, and the localisation sentence read "norm ratio 169265238.60, 8256539346.4x its
    siblings' median" (tester t23)."""
    if x is None:
        return "-"
    if x == 0 or (math.isfinite(x) and 1e-3 <= abs(x) < 1e4):
        return format(x, fixed)
    return format(x, ".3g")


def fmt_apart(value: float, limit: float, fmt: Callable[[float, int], str] = _fmt) -> tuple[str, str]:
    """`fmt(x, significant digits)` of a check's value and its limit, 4 digits, more where the two
    would read alike though they differ past AT_LIMIT_REL: "p99 KL 0.03417 > limit 0.03417" (value
    0.0341650, limit 0.034165) was a failing check that contradicted itself."""
    digits = 4
    while True:
        a, b = fmt(value, digits), fmt(limit, digits)
        if a != b or digits >= 17 or not (math.isfinite(value) and math.isfinite(limit)):
            return a, b
        if math.isclose(value, limit, rel_tol=AT_LIMIT_REL):
            return a, b
        digits += 1


def finite_for_json(obj: Any) -> Any:
    """JSON has no NaN / inf: store them as strings so that nothing is silently turned into null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite_for_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_for_json(v) for v in obj]
    return obj


def _unclean(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    return obj


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a dataclass tree from `asdict` output, using the field annotations above."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name])
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    import typing

    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value)
    if origin in (list, tuple):
        item = args[0] if args else Any
        items = [_coerce(item, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v) for k, v in value.items()}
    if tp is float:
        return float(_unclean(value))
    # Only float-typed fields turn "nan"/"inf" back into numbers: "inf" is also a real token.
    return value
