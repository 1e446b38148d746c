"""`difftest run`: launch, probe, query, score, judge, report — in that order.

    config ─► launch_servers (reference, targets, goldens; side by side)
           ─► conformance: probe every server, check every (baseline, target) pair   [exit 2]
           ─► generate: greedy continuations on every server, all prompts
           ─► force:    each baseline's continuation echoed into baseline and target
           ─► score:    Comparison "exactness" (vs golden) and "accuracy" (vs reference)
           ─► white-box + batch-slot checks where the servers allow them
           ─► verdict per target ─► report folder ─► exit code (0 / 1 / 2 / 3)

Every response goes through the sqlite cache in the output folder as it arrives, so a run that
dies halfway loses nothing: `--resume` relaunches and only asks what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from difftest import aio
from difftest.baseline import Baseline, run_settings
from difftest.cache import ResponseCache
from difftest.chat import probe_endpoint
from difftest.client import REPLAY_URL, CompletionClient
from difftest.collect import Endpoint, Forced, Generation, force_all, generate_all, prompt_token_ids
from difftest.config import RunConfig, TargetConfig, unused_tables
from difftest.conformance import WARNINGS
from difftest.errors import DifftestError, NoiseFloorError, OutputError, UsageError
from difftest.judge import judge_one, layer_thresholds, null_for
from difftest.metrics.aggregate import refused_prompts
from difftest.noise import (
    NoiseFloor,
    identity_mismatch,
    measurement_settings,
    reference_identity,
    settings_mismatch,
)
from difftest.null import MARGIN, NO_NULL, NullModel, tie_margin
from difftest.preflight import check_running
from difftest.progress import Progress
from difftest.prompts import Prompt, load_prompts
from difftest.results import Comparison, LayerDiff, PartVerdict, PromptDiff, RunResult, TargetResult
from difftest.scoring import DepthTally, compared_depths, finish_comparison, score_prompts
from difftest.session import cache_identity, launch_shown, require_debug, url_model
from difftest.signature import run_signature
from difftest.tokenizer_check import check_pair
from difftest.usage_check import PromptCounts
from difftest.whitebox.activations import LayerThresholds, compare_points, fetch_activations
from difftest.whitebox.localise import localise_target
from server_shim.launch import RunningServer, api_key_of, same_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    resume: bool = False
    concurrency: int | None = None
    limit: int | None = None
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise
    baseline: Baseline | None = None  # a recorded reference answers instead of a live one


@dataclass
class _Pair:
    """One (baseline, target) comparison to make."""

    kind: str  # "exactness" | "accuracy" | "null" (a golden against its rounding twin)
    baseline: str
    target: str
    teacher_forced: bool = True
    as_ids: bool = False
    warnings: list[str] = field(default_factory=list)
    counts: PromptCounts = field(default_factory=PromptCounts)  # usage.prompt_tokens, both sides


CHUNK_PROMPTS = 256  # prompts generated, forced and scored together before their raw responses go
FLOOR_PROMPTS = 64  # prompts of the first chunk the goldens' in-run A/A floor is measured on
SLOT_BASELINE_DRAWS = 2  # the baseline's own batch-slot checks a target's slot variance is judged against


def _spend(spent: dict[str, float], name: str, since: float) -> float:
    now = time.monotonic()
    spent[name] += now - since
    return now


def _phase(name: str, since: float) -> float:
    """Log how long a phase took (the progress logger, so it shows without -v); returns now."""
    now = time.monotonic()
    logging.getLogger("difftest.progress").info("%s: %.1f s", name, now - since)
    return now


async def _connect(
    running: Mapping[str, RunningServer],
    cfg: RunConfig,
    cache: ResponseCache,
    concurrency: int,
    baseline: Baseline | None = None,
) -> dict[str, Endpoint]:
    """A client per server, then conformance probes of all of them side by side."""
    clients = {
        name: CompletionClient(
            srv.url,
            name=name,
            api_key=api_key_of(srv.spec),
            timeout_s=cfg.run.request_timeout_s,
            max_retries=cfg.run.max_retries,
            concurrency=concurrency,
            cache=cache,
            cache_identity=cache_identity(srv.spec),
            model=url_model(srv.spec),
        )
        for name, srv in running.items()
    }
    wanted = {name: url_model(srv.spec) for name, srv in running.items()}
    if baseline is not None:  # the recorded reference: same client, answers replayed from the file
        # asking the model the recording asked: the first id listed is another on a server of several
        wanted[cfg.reference.name] = baseline.replay_model()
        clients[cfg.reference.name] = CompletionClient(
            REPLAY_URL, name=cfg.reference.name, concurrency=concurrency, transport=baseline.transport(),
            model=wanted[cfg.reference.name],
        )  # fmt: skip
    caps = await asyncio.gather(
        *(
            probe_endpoint(c, wanted.get(name), cfg.run.endpoint, cfg.run.max_tokens)
            for name, c in clients.items()
        )
    )
    return {n: Endpoint(n, clients[n], cap, cfg.run.seed) for n, cap in zip(clients, caps, strict=True)}


def _probe_notes(eps: Mapping[str, Endpoint]) -> list[str]:
    """What each server's probe found that bears on the numbers -- logprobs capped, greedy decoding
    not deterministic, no echo, several models listed and the first asked -- as run warnings:
    kept in report.json's conformance alone, they reached no report and no terminal. A missing
    debug protocol is left to the white-box part's own skip line."""
    return [f"{name}: {w}" for name, ep in eps.items() for w in ep.caps.warnings if w != WARNINGS["no_debug"]]


def _pairs(cfg: RunConfig) -> list[_Pair]:
    out = []
    for t in cfg.targets:
        if t.golden is not None:
            out.append(_Pair("exactness", t.golden.name, t.name))
        out.append(_Pair("accuracy", cfg.reference.name, t.name))
    twins = {t.twin.name: t.golden.name for t in cfg.targets if t.twin is not None and t.golden is not None}
    out.extend(_Pair("null", golden, twin) for twin, golden in twins.items())
    return out


async def _check_pairs(pairs: Sequence[_Pair], eps: Mapping[str, Endpoint]) -> None:
    """Tokenizer / capability agreement per pair; an incompatible pair raises ConformanceError."""
    for pair in pairs:
        b, t = eps[pair.baseline], eps[pair.target]
        pc = await check_pair((b.client, b.caps), (t.client, t.caps))
        pair.teacher_forced = pc.teacher_forced
        pair.as_ids = pc.echo_as_ids
        pair.warnings.extend(pc.warnings)  # names a side whose echo is not trusted (never chat's)


def _require_debug(cfg: RunConfig, eps: Mapping[str, Endpoint]) -> None:
    """`whitebox = "on"` is a requirement: a side without the debug protocol stops the run before
    anything is asked (it ran black-box and PASSed before, the gap only in report.json)."""
    if cfg.run.whitebox == "on":
        sides = [cfg.reference.name]
        for t in cfg.targets:
            sides += [t.name] + ([t.golden.name] if t.golden is not None else [])
        hint = '; whitebox = "auto" runs black-box where it is missing (a recorded baseline never serves it)'
        require_debug(eps, sides, hint)


async def _generate(
    eps: Mapping[str, Endpoint], prompts: Sequence[Prompt], cfg: RunConfig, on_done: Callable[[], None]
) -> dict[str, dict[str, Generation]]:
    results = await asyncio.gather(
        *(
            generate_all(
                ep,
                prompts,
                max_tokens=cfg.run.max_tokens,
                k=cfg.run.logprobs,
                seed=cfg.run.seed,
                on_done=on_done,
            )
            for ep in eps.values()
        )
    )
    return dict(zip(eps, results, strict=True))


def _retokenizer(eps: Mapping[str, Endpoint], pairs: Sequence[_Pair]) -> Any:
    """Who tokenizes the text of servers that return no tokens (difftest.retokenize); noted per pair."""
    from difftest import retokenize

    chosen = retokenize.plan(eps, [(p.baseline, p.target) for p in pairs])
    for pair in pairs:
        for name in (pair.baseline, pair.target):
            if name in chosen:
                pair.warnings.append(retokenize.note(name, chosen[name]))
    return retokenize.Retokenizer(eps, chosen, [(p.baseline, p.target) for p in pairs])


def _forcing_plan(pairs: Sequence[_Pair]) -> dict[tuple[str, str], bool]:
    """(baseline, side) -> echo as token ids; each baseline's own side is forced once, shared."""
    wanted: dict[tuple[str, str], bool] = {}
    for pair in pairs:
        if pair.teacher_forced:
            own = (pair.baseline, pair.baseline)
            wanted[own] = wanted.get(own, False) or pair.as_ids
            wanted[(pair.baseline, pair.target)] = pair.as_ids
    return wanted


async def _force_pairs(
    plan: Mapping[tuple[str, str], bool],
    eps: Mapping[str, Endpoint],
    prompts: Sequence[Prompt],
    gens: Mapping[str, Mapping[str, Generation]],
    k: int,
    on_done: Callable[[], None],
) -> dict[tuple[str, str], dict[str, Forced]]:
    """Teacher forcing: key (baseline, side) -> prompt id -> Forced, for each entry of `plan`."""
    ids_cache: dict[tuple[str, str], list[int] | None] = {}

    def ids_on(baseline: str) -> Callable[[Prompt], Awaitable[list[int] | None]]:
        async def ids_for(p: Prompt) -> list[int] | None:  # the baseline's ids, shared by its sides
            if (baseline, p.id) not in ids_cache:
                ids_cache[(baseline, p.id)] = await prompt_token_ids(eps[baseline], p.prompt)
            return ids_cache[(baseline, p.id)]

        return ids_for

    return {
        (baseline, side): await force_all(
            eps[side],
            prompts,
            gens[baseline],
            k=k,
            as_ids=as_ids,
            prompt_ids=ids_on(baseline),
            on_done=on_done,
            own=side == baseline,
        )
        for (baseline, side), as_ids in plan.items()
    }


@dataclass
class _Scored:
    """One pair's results over the chunks scored so far."""

    diffs: list[PromptDiff] = field(default_factory=list)
    unforced: list[str] = field(default_factory=list)  # prompts whose teacher forcing failed (why)
    depths: DepthTally = field(default_factory=lambda: DepthTally(None))  # what KL compared


def _score_chunk(
    pairs: Sequence[_Pair],
    chunk: Sequence[Prompt],
    gens: Mapping[str, Mapping[str, Generation]],
    forced: Mapping[tuple[str, str], Mapping[str, Forced]],
    cfg: RunConfig,
    scored: dict[tuple[str, str], _Scored],
    retok: Any = None,
) -> None:
    """Score one chunk of prompts for every pair into `scored[(kind, target)]`.
    Measurement only: divergences are classified when judging (difftest.judge)."""
    for pair in pairs:
        ref_f = forced.get((pair.baseline, pair.baseline)) if pair.teacher_forced else None
        tgt_f = forced.get((pair.baseline, pair.target)) if pair.teacher_forced else None
        pair.counts.add(gens[pair.baseline], gens[pair.target])
        base_g, tgt_g = (
            retok.for_pair(gens, pair.baseline, pair.target)
            if retok
            else (gens[pair.baseline], gens[pair.target])
        )
        diffs, unforced = score_prompts(
            chunk,
            base_g,
            tgt_g,
            ref_forced=ref_f,
            tgt_forced=tgt_f,
            k=cfg.run.logprobs,
        )
        acc = scored.setdefault((pair.kind, pair.target), _Scored(depths=DepthTally(cfg.run.logprobs)))
        acc.diffs.extend(diffs)
        acc.unforced.extend(unforced)
        acc.depths.merge(compared_depths(diffs, ref_f, tgt_f, k=cfg.run.logprobs))


async def _floors(
    cfg: RunConfig,
    floor: NoiseFloor | None,
    eps: Mapping[str, Endpoint],
    prompts: Sequence[Prompt],
    gens: Mapping[str, Mapping[str, Generation]],
    forced: Mapping[tuple[str, str], Mapping[str, Forced]],
    concurrency: int,
    progress: Progress,
) -> dict[str, NoiseFloor]:
    """Golden name -> in-run A/A floor, for goldens judged without a twin under `null = "aa"`
    (a floor file, or a twin, makes this pass unnecessary)."""
    if floor is not None or cfg.run.null != "aa":
        return {}
    from difftest.autofloor import golden_floor

    names = sorted({t.golden.name for t in cfg.targets if t.golden is not None and t.twin is None})
    floors = await asyncio.gather(  # each golden is its own server: measure them side by side
        *(
            golden_floor(
                eps[name],
                prompts,
                gens[name],
                forced.get((name, name)),
                max_tokens=cfg.run.max_tokens,
                k=cfg.run.logprobs,
                seed=cfg.run.seed,
                concurrency=concurrency,
                progress=progress,
            )  # fmt: skip
            for name in names
        )
    )
    return dict(zip(names, floors, strict=True))


def _null_signature(cfg: RunConfig, floor: NoiseFloor | None) -> str:
    """One line for the signature: which null model the exactness limits come from."""
    if any(t.twin is not None for t in cfg.targets):
        return "rounding twin of each built-in golden (module tolerance of its dtype)" + (
            "; floor file for the others" if floor is not None else ""
        )
    if floor is not None:
        return "floor file (difftest noise)"
    return "in-run A/A of each golden (concurrency 1 vs batched)" if cfg.run.null == "aa" else "none"


def _floor_record(floor: NoiseFloor | None, floors: Mapping[str, NoiseFloor]) -> dict[str, Any] | None:
    """report.json's noise_floor: the file's floor, or {"in_run": {golden: floor}}."""
    if floor is not None:
        return floor.to_dict()
    return {"in_run": {name: f.to_dict() for name, f in floors.items()}} if floors else None


async def _floor_note(
    cfg: RunConfig, floor: NoiseFloor | None, ref: Endpoint, recorded: bool, prompts: Sequence[Prompt]
) -> list[str]:
    """Warnings when the floor file was measured on another reference than this run's (it
    recorded only the name, and a floor of smollm2 on an H100 set tiny-llama's limits silently),
    or with other settings (max_tokens, logprobs, endpoint, prompts). A recorded baseline is
    compared by what it recorded (the replayed fingerprint is not the live server's)."""
    if floor is None:
        return []
    fp = None
    if not recorded:
        with contextlib.suppress(DifftestError):
            fp = await ref.client.fingerprint()
    here = measurement_settings(
        max_tokens=cfg.run.max_tokens, logprobs=cfg.run.logprobs, endpoint=cfg.run.endpoint, prompts=prompts
    )
    whys = (
        identity_mismatch(floor, cfg.reference.name, reference_identity(cfg.reference, ref.caps.model, fp)),
        settings_mismatch(floor, here),
    )
    return [f"{cfg.run.noise_floor}: {why}" for why in whys if why]


# a null model a floor file overrules without a word: which one was meant is the user's to say
_NULLS_A_FLOOR_CONTRADICTS = {
    "none": "absolute minimums only",
    "aa": "each golden's in-run A/A, which a floor file replaces",
}


def load_floor(cfg: RunConfig) -> NoiseFloor | None:
    """The floor file, checked before any server starts. `null = "none"` or `"aa"` beside a floor
    file was judged on the floor without a word, so the pair is refused (exit 2)."""
    from difftest.errors import ConfigError

    if cfg.run.noise_floor is None:
        return None
    if cfg.run.null in _NULLS_A_FLOOR_CONTRADICTS:
        where = f"{cfg.source}: " if cfg.source else ""
        raise ConfigError(
            f'{where}[run] null = "{cfg.run.null}" ({_NULLS_A_FLOOR_CONTRADICTS[cfg.run.null]}) contradicts '
            f'noise_floor = "{cfg.run.noise_floor}" (limits from that file): remove one',
            path=cfg.source, key="null",
        )  # fmt: skip
    path = Path(cfg.run.noise_floor)
    if not path.exists():
        raise ConfigError(f"noise floor file {path} does not exist (make it with `difftest noise CONFIG`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # a folder there (`noise -o DIR` makes DIR/noise-floor.json)
        raise ConfigError(
            f"noise floor file {path}: cannot read it: {_unreadable(path, exc)}",
            path=cfg.source,
            key="noise_floor",
        ) from None
    try:
        return NoiseFloor.from_json(text)
    except NoiseFloorError as exc:  # which file: a config may name one of several floors
        raise NoiseFloorError(f"{path}: {exc}") from None


def _unreadable(path: Path, exc: Exception) -> str:
    """Why a file could not be read, in words: errno's "Is a directory" leaves the user guessing
    which path, and a decode error's repr is a paragraph."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text (not a noise-floor file)"
    if path.is_dir():
        return "a folder, not a file"
    return getattr(exc, "strerror", None) or str(exc)


def _skipped(pairs: Sequence[_Pair], target: str, endpoint: str = "completions") -> dict[str, str]:
    """Groups conformance ruled out for this target, with the visible reason."""
    from difftest.chat import NO_TEACHER_FORCING

    why = (
        NO_TEACHER_FORCING
        if endpoint == "chat"
        else "echo with logprobs not supported or not trusted on this pair"
    )
    return {f"{p.kind}.teacher_forced": why for p in pairs if p.target == target and not p.teacher_forced}


async def _whitebox(
    cfg: RunConfig,
    tcfg: TargetConfig,
    eps: Mapping[str, Endpoint],
    prompts: Sequence[Prompt],
    result: TargetResult,
    slot_baselines: dict[str, Any],
    null: NullModel = NO_NULL,
    reference_draws: int = SLOT_BASELINE_DRAWS,
) -> list[PartVerdict]:
    """Per-layer diff, localisation, quant audit and batch-slot invariance, where served. `null`
    is the golden's twin null (judge.null_for without floors): it sets the TIE margin of slot
    flips and the bound of residual-stream flags, with the config's overrides, as judging does.
    `reference_draws`: the reference's own slot-variance draws (a recorded baseline holds only as
    many as it recorded; replaying one draw twice is no second draw)."""
    parts: list[PartVerdict] = []
    overrides = cfg.thresholds_for(result.scheme)
    tgt = eps[tcfg.name]
    if cfg.run.batch_slot_check and cfg.run.endpoint == "chat":  # a skipped part: every report says so
        from difftest.chat import NO_BATCH_SLOTS

        parts.append(PartVerdict("invariance", "", skipped=NO_BATCH_SLOTS))
    elif cfg.run.batch_slot_check:
        from difftest.invariance import check_batch_slots, slot_check_skip, twin_difference, with_twin

        base_name = tcfg.golden.name if tcfg.golden is not None else cfg.reference.name
        slot_args = {"max_tokens": min(cfg.run.max_tokens, 16), "k": cfg.run.logprobs}
        # a target that cannot be checked (no logprobs) costs its baseline no draws
        checkable = slot_check_skip(tgt, prompts) is None
        if checkable and base_name not in slot_baselines:  # shared by one baseline's targets, measured once
            twin = eps[tcfg.twin.name] if tcfg.twin is not None and tcfg.golden is not None else None

            async def measure(base: Endpoint = eps[base_name], twin: Endpoint | None = twin) -> tuple:
                # the baseline's own slot variance, drawn twice (one after the other: each draw's
                # placements are the other's batch neighbours otherwise) and once on its twin
                draws = reference_draws if base.name == cfg.reference.name else SLOT_BASELINE_DRAWS
                own = [await check_batch_slots(base, prompts, **slot_args) for _ in range(draws)]
                if twin is not None:
                    own.append(await check_batch_slots(twin, prompts, **slot_args))
                twin_slots = await twin_difference(base, twin, prompts, **slot_args) if twin else None
                return own, twin_slots

            slot_baselines[base_name] = asyncio.ensure_future(measure())
        inv = await check_batch_slots(tgt, prompts, **slot_args)
        if checkable:
            own, twin_slots = await slot_baselines[base_name]
            margin = tie_margin(null, overrides)[0] if twin_slots else None
            with_twin(inv, twin_slots, margin).relative_to(base_name, *own)  # draws' flips by the TIE margin
            if tcfg.golden is None:
                inv.loose_unjudged = await _no_scheme_baseline(result.scheme, eps[base_name])
        result.invariance = inv.to_dict()
        parts.append(inv.verdict())
    if cfg.run.whitebox == "off":
        return parts
    ref = eps[cfg.reference.name]
    gold = eps[tcfg.golden.name] if tcfg.golden is not None else None
    why = _no_debug(cfg, tgt, ref, gold)
    if why:
        result.conformance.setdefault("warnings", []).append(why)
        parts.append(PartVerdict("white-box", "", skipped=why))
        return parts
    # the bounds judging applies (the dtype's replay bound, the null's point limit: 16-bit twins
    # reach 0.07-0.09 over smollm2's 30 layers), so a point flagged divergent is one that fails
    th = layer_thresholds(result.dtype, null, float(overrides.get("margin", MARGIN)))
    # layer diffs vs golden and reference; each module they blame is audited once
    found = await localise_target(tgt, prompt=prompts[0].prompt, golden=gold, reference=ref, thresholds=th)
    result.layers.extend(found.diffs)  # judged with the rest (difftest.judge)
    result.audit.extend(found.audit)
    return parts


def _no_debug(cfg: RunConfig, tgt: Endpoint, ref: Endpoint, gold: Endpoint | None) -> str | None:
    """Why the layer checks cannot run, or None. "auto" dropped them -- the ones that catch subtle
    faults -- without a word: said where the verdict is read (a skipped part: terminal, report.md,
    junit) and in report.json. A recorded baseline is named as one: it read "no /debug on
    reference reference ... a built-in shim serves /debug", advice that cannot apply to a file."""
    recorded = ref.client.from_baseline
    sides = (("target", tgt), ("reference", None if recorded else ref), ("golden", gold))
    lacking = [f"{role} {ep.name}" for role, ep in sides if ep is not None and not ep.caps.debug]
    said = [f"no /debug on {', '.join(lacking)}"] if lacking else []
    if recorded:
        said.append(f"the reference ({ref.name}) is a recorded baseline: a recording has no /debug")
    if not said:
        return None
    fix = "a built-in shim serves /debug with debug = true" if lacking else "a live reference can serve it"
    return (
        f"{'; '.join(said)}: per-layer diff, localisation and quant audit not run "
        f'(whitebox = "{cfg.run.whitebox}"; {fix})'
    )


async def _null_layers(gold: Endpoint, twin: Endpoint, prompt: str) -> LayerDiff | None:
    """The twin's per-point error against its golden on the white-box prompt: what accumulated
    residual-stream error a correct kernel's worth of noise reaches (no replay needed)."""
    if not (gold.caps.debug and twin.caps.debug):
        return None
    req = {"logits": True, "decode_steps": 2}
    try:
        base = await fetch_activations(gold, {"prompt": prompt, **req})
        other = await fetch_activations(twin, {"tokens": base.token_ids, **req})
    except DifftestError as exc:
        log.warning("%s: twin layer diff not made: %s", gold.name, exc)
        return None
    points, warns = compare_points(base, other, kind="exactness", scheme=None, th=LayerThresholds())
    return LayerDiff(against=gold.name, kind="null", points=points, warnings=warns)


async def _served(ep: Endpoint, key: str) -> Any:
    """One value a server reports in /debug/config (its fingerprint keeps them: no second GET);
    None where it serves no debug protocol or does not say."""
    try:
        fp = await ep.client.fingerprint()
    except DifftestError:
        return None
    return (fp.get("debug_config") or {}).get(key)


async def _no_scheme_baseline(scheme: str | None, baseline: Endpoint) -> str | None:
    """Why a target's batched-vs-alone moves cannot be judged against `baseline` (None: they can):
    a quantized target against a baseline of another scheme measures what quantizing the batch
    shape's fp32 noise moves, which only a baseline of its own scheme (a golden) has measured."""
    if scheme in (None, "none"):
        return None
    theirs = await _served_scheme(baseline) or "none"
    if theirs == scheme:
        return None
    return (
        f"no baseline of scheme {scheme} ({baseline.name} runs {theirs}; a golden would be one): "
        "quantizing activations turns the batch shape's rounding into whole code steps"
    )


async def _served_scheme(ep: Endpoint) -> str | None:
    """The quantization scheme a server reports, when it is a known one."""
    from difftest.verdict import DEFAULT_BUDGETS

    scheme = await _served(ep, "scheme") or await _served(ep, "quant")
    return scheme if scheme in DEFAULT_BUDGETS else None


def _depth_note(pair: _Pair, eps: Mapping[str, Endpoint], k: int) -> list[str]:
    """Say so when the probe found the two sides' logprobs capped at different depths and there is
    no teacher forcing (chat: no echo, no KL): the generations' top lists classify divergences at
    the shorter depth. With teacher forcing the depths KL actually compared, echo by echo, are
    what the comparison says (scoring.depth_notes): a probe's cap, read from one generation, said
    nothing of an echo listing 1 alternative of the 5 asked."""
    depths = {name: min(k, eps[name].caps.logprobs_cap) for name in (pair.baseline, pair.target)}
    shallow = min(depths.values())
    if pair.teacher_forced or len(set(depths.values())) < 2 or shallow == 0:
        return []
    capped = ", ".join(f"{n} top-{d}" for n, d in depths.items())
    return [
        f"logprobs listed to different depths ({capped}): divergences are classified from the "
        f"top-{shallow} of both sides"
    ]


async def run_async(
    cfg: RunConfig,
    running: Mapping[str, RunningServer],
    prompts: Sequence[Prompt],
    opts: RunOptions,
    cache: ResponseCache,
    floor: NoiseFloor | None = None,
) -> RunResult:
    """`floor`: the config's noise-floor file, loaded by `execute` before any server started."""
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")  # when the run began, not ended
    concurrency = opts.concurrency or cfg.run.concurrency
    eps = await _connect(running, cfg, cache, concurrency, opts.baseline)
    try:
        pairs = _pairs(cfg)
        await _check_pairs(pairs, eps)
        _require_debug(cfg, eps)
        _phase("conformance", started)
        retok = _retokenizer(eps, pairs)
        plan = _forcing_plan(pairs)
        scored: dict[tuple[str, str], _Scored] = {}
        floors: dict[str, NoiseFloor] | None = None
        spent = dict.fromkeys(("greedy generation", "teacher forcing", "noise floor", "scoring"), 0.0)
        with Progress(enabled=opts.progress) as progress:
            gen_task = progress.add("generate", total=len(eps) * len(prompts))
            tf_task = progress.add("teacher-forced", total=len(plan) * len(prompts))
            # Chunks keep memory bounded: a chunk's raw responses are dropped once it is scored,
            # only the compact per-prompt results stay (bench/differ.py: ~155 KiB per prompt of
            # parsed responses otherwise, 3.1 GB at 20k prompts).
            for start in range(0, len(prompts), CHUNK_PROMPTS):
                chunk = prompts[start : start + CHUNK_PROMPTS]
                t = time.monotonic()
                gens = await _generate(eps, chunk, cfg, lambda: progress.advance(gen_task))
                await retok.fill(gens)  # token-less servers (no logprobs): tokenized afterwards
                t = _spend(spent, "greedy generation", t)
                forced = await _force_pairs(
                    plan, eps, chunk, gens, cfg.run.logprobs, lambda: progress.advance(tf_task)
                )
                t = _spend(spent, "teacher forcing", t)
                if floors is None:  # the goldens' A/A on the first prompts
                    floors = await _floors(
                        cfg, floor, eps, chunk[:FLOOR_PROMPTS], gens, forced, concurrency, progress
                    )
                    t = _spend(spent, "noise floor", t)
                _score_chunk(pairs, chunk, gens, forced, cfg, scored, retok)
                _spend(spent, "scoring", t)
                del gens, forced
        for name, seconds in spent.items():
            logging.getLogger("difftest.progress").info("%s: %.1f s", name, seconds)
        floors = floors or {}
        comps = {}
        for pair in pairs:
            unverified = any("could not be compared" in w for w in pair.warnings)
            pair.warnings.extend(pair.counts.notes(pair.baseline, pair.target, unverified=unverified))
            pair.warnings.extend(retok.notes(pair.baseline, pair.target))  # pairs compared by words
            pair.warnings.extend(_depth_note(pair, eps, cfg.run.logprobs))
            got = scored.get((pair.kind, pair.target), _Scored())
            comps[(pair.kind, pair.target)] = finish_comparison(
                pair.kind, pair.baseline, pair.target, got.diffs,
                unforced=got.unforced, seed=cfg.run.seed, warnings=pair.warnings, depths=got.depths,
            )  # fmt: skip
        run = RunResult(
            reference=cfg.reference.name,
            signature=run_signature(cfg, eps, prompts, floor, out_dir=opts.out_dir),
            noise_floor=_floor_record(floor, floors),
            started_at=started_at,
        )
        run.signature["null"] = _null_signature(cfg, floor)
        run.warnings.extend(_probe_notes(eps))
        run.warnings.extend(
            await _floor_note(cfg, floor, eps[cfg.reference.name], opts.baseline is not None, prompts)
        )
        twins = {
            t.twin.name: t.golden.name for t in cfg.targets if t.twin is not None and t.golden is not None
        }
        for twin in twins:
            null = comps[("null", twin)]
            noise = await _served(eps[twin], "rounding_noise")  # the twin's largest amplitude
            null.module_noise = float(noise) if isinstance(noise, int | float) else None
            run.nulls.append(null)
        if cfg.run.whitebox != "off" and prompts:
            found = await asyncio.gather(
                *(_null_layers(eps[g], eps[t], prompts[0].prompt) for t, g in twins.items())
            )
            run.null_layers = [d for d in found if d is not None]
        # baseline name -> future of (its own batch-slot variance, its twin's difference on the probe)
        slot_baselines: dict[str, Any] = {}
        carried: dict[str, list[PartVerdict]] = {}

        async def one_target(tcfg: TargetConfig) -> TargetResult:
            tr = TargetResult(
                name=tcfg.name,
                scheme=tcfg.scheme,
                expect=tcfg.expect,
                url=running[tcfg.name].url,
                golden=tcfg.golden.name if tcfg.golden is not None else None,
            )
            tr.dtype = await _served(
                eps[tcfg.golden.name] if tcfg.golden is not None else eps[tcfg.name], "dtype"
            )
            if tr.scheme is None:  # no scheme given: the target's own /debug/config may say it
                tr.scheme = await _served_scheme(eps[tcfg.name])
                source = "from the target's /debug/config" if tr.scheme else "none given or served"
                run.warnings.append(
                    f"{tcfg.name}: accuracy judged with the {tr.scheme or 'none'} budget ({source})"
                )
            url = eps[tcfg.name].client.base_url
            for side in [cfg.reference.name] + ([tcfg.golden.name] if tcfg.golden is not None else []):
                if same_server(eps[side].client.base_url, url):  # a copy-paste slip passes every check
                    run.warnings.append(
                        f"{tcfg.name} and {side} are one server ({url}): compared with itself"
                    )
            golden = tcfg.golden.name if tcfg.golden is not None else None
            if golden is not None and same_server(
                eps[golden].client.base_url, eps[cfg.reference.name].client.base_url
            ):
                # exactness would then hold a quantized target to the reference at exactness limits:
                # a correct kernel fails as if it were broken
                run.warnings.append(
                    f"{tcfg.name}: golden {golden} and reference {cfg.reference.name} are one server "
                    f"({eps[golden].client.base_url}): exactness compares the target with the reference itself"
                )
            caps = eps[tcfg.name].caps
            tr.conformance = {"checks": [list(c) for c in caps.checks], "warnings": list(caps.warnings)}
            tr.comparisons = [
                comps[(kind, tcfg.name)] for kind in ("exactness", "accuracy") if (kind, tcfg.name) in comps
            ]
            tr.total_requests = len(prompts)
            tr.failed_requests = failed_prompts(tr.comparisons)
            t = time.monotonic()
            try:
                carried[tcfg.name] = await _whitebox(
                    cfg, tcfg, eps, prompts, tr, slot_baselines, null_for(run, tr, None),
                    reference_draws=(
                        min(SLOT_BASELINE_DRAWS, opts.baseline.slot_draws) if opts.baseline else SLOT_BASELINE_DRAWS
                    ),
                )  # fmt: skip
            except DifftestError as exc:  # the black-box verdict stands without the white-box part
                carried[tcfg.name] = []
                tr.conformance.setdefault("warnings", []).append(f"white-box diff failed: {exc}")
                run.warnings.append(f"{tcfg.name}: white-box diff failed: {exc}")
            _phase(f"white-box + batch slots: {tcfg.name}", t)
            return tr

        # targets are separate servers: their white-box diffs run side by side
        run.targets = list(await asyncio.gather(*(one_target(t) for t in cfg.targets)))
        for tr in run.targets:  # measure first, judge after: every limit from stored statistics
            judge_one(
                run, tr, cfg.thresholds_for(tr.scheme), floor=floor,
                in_run=floors.get(tr.golden) if tr.golden else None,
                carried=carried[tr.name], skipped=_skipped(pairs, tr.name, cfg.run.endpoint),
            )  # fmt: skip
        run.warnings.extend(unused_tables(cfg.thresholds, [t.scheme for t in run.targets], ""))
        if opts.resume:
            run.warnings.extend(_resume_notes(eps))
        run.elapsed_s = time.monotonic() - started
        return run
    finally:
        await asyncio.gather(*(ep.client.aclose() for ep in eps.values()))


def failed_prompts(comparisons: Sequence[Comparison]) -> int:
    """Prompts lost on either side in any phase (generation or teacher forcing; the golden's, the
    reference's or the target's request): what each comparison's failed_requests counts, the
    number exit 3 names. The target's own generation errors alone read "failed 0/2" beside
    "2 of 2 prompts failed" when the reference died or forcing timed out."""
    return len({p.prompt_id for c in comparisons for p in c.prompts if p.error is not None})


def infra_problems(run: RunResult, cfg: RunConfig, running: Mapping[str, RunningServer]) -> list[str]:
    """Reasons for exit 3: a server that died, or a target whose error rate passed the limit."""
    problems = [
        f"server {name} exited with code {srv.exit_code()} during the run (log: {srv.log_path})"
        for name, srv in running.items()
        if srv.exit_code() is not None
    ]
    for t in run.targets:
        for c in t.comparisons:
            # a broken answer (NaN logprobs, a malformed block) is the target's bug, judged FAIL
            # (exit 1): only requests lost after their retries are infrastructure
            n = int(c.aggregate.get("n_prompts", 0))
            lost = int(c.aggregate.get("failed_requests", 0) - c.aggregate.get("broken_answers", 0))
            problem = lost_past_limit(t.name, c.baseline, lost, n, cfg.run.error_rate_limit)
            if problem is not None:
                problems.append(problem + refused_note(c))
    return problems


def lost_past_limit(target: str, baseline: str, lost: int, n: int, limit: float) -> str | None:
    """Exit 3's reason when more than `limit` of a pair's `n` prompts were lost (requests failed
    after their retries), else None: the run and the quick look both ask."""
    if not n or lost / n <= limit:
        return None
    return f"{target} vs {baseline}: {lost} of {n} prompts failed ({lost / n:.0%} > {limit:.0%} limit)"


def refused_note(c: Comparison) -> str:
    """How many of a comparison's failed prompts the server refused as invalid (HTTP 4xx: a prompt
    over its context, max_tokens over its cap): asking them again (--resume) gets the same answer."""
    refused = refused_prompts(c.prompts)
    if not refused:
        return ""
    said = " ".join(refused[0].error.split())  # type: ignore[union-attr]
    first = said if len(said) <= 240 else said[:239] + "…"
    return (
        f"; {len(refused)} of them refused as invalid, which --resume would ask again in vain: "
        f"shorten those prompts or raise the server's limits (first: {refused[0].prompt_id}: {first})"
    )


def refused_all(errors: Sequence[str | None], nothing: str) -> str | None:
    """Why nothing was `nothing` ("judged", "compared") when every request failed as one the server
    refused as invalid (HTTP 4xx: max_tokens over its cap, a prompt over the context, an unknown
    model, ...): a usage error (exit 2), not a server that is up but broken (exit 3). `errors`: one
    per prompt (None: it was answered); the run and the quick look both ask."""
    if not errors or not all(e and "RequestRejected:" in e for e in errors):
        return None
    return f"every request was refused as invalid, nothing was {nothing}; the first: {errors[0]}"


def refused_everything(run: RunResult) -> str | None:
    return refused_all([p.error for t in run.targets for c in t.comparisons for p in c.prompts], "judged")


def _resume_notes(eps: Mapping[str, Endpoint]) -> list[str]:
    """What a resume reused, per server: the report must say its numbers come from answers an
    earlier run stored, and when a changed server was asked again."""
    notes = []
    for name, ep in eps.items():
        client = ep.client
        if client.cache is None:  # a recorded baseline: replayed, never cached
            continue
        if client.identity_note:
            notes.append(f"{name}: {client.identity_note}")
        stats = client.stats()
        checks = f" and {stats.identity_checks} identity checks" if stats.identity_checks else ""
        notes.append(
            f"{name}: reused {stats.cache_hits} cached answers, asked {stats.cache_misses}{checks} (--resume)"
        )
    return notes


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold `out/.lock` (flock, released by the kernel however the run ends) for the run: a second
    run into the same folder deleted the first one's cache while it was writing. The file is left
    behind: removing it would let a third run lock a file nobody else sees."""
    path = out / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write into {out}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UsageError(f"{out} is in use by another difftest run (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _open_cache(cache_path: Path, resume: bool) -> tuple[ResponseCache, list[str]]:
    """The run's response cache (emptied unless resuming) and what to say about it. A folder that
    refuses the file is a usage error (exit 2) before any server starts; a file that is no cache
    is set aside and everything asked again (difftest.cache)."""
    notes = []
    try:
        existed = cache_path.exists()
        if not resume and existed:
            cache_path.unlink()
            for extra in ("-wal", "-shm"):
                Path(str(cache_path) + extra).unlink(missing_ok=True)
        cache = ResponseCache(cache_path)
    except (OSError, sqlite3.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot write the response cache {cache_path}: {why}") from exc
    if cache.set_aside is not None:
        notes.append(
            f"{cache_path} was no readable response cache ({cache.unreadable}): set aside as "
            f"{cache.set_aside.name}, everything asked again"
        )
    elif resume and not existed:
        notes.append(f"--resume: {cache_path.parent} held no cache yet, everything asked")
    for note in notes:
        log.warning("%s", note)
    return cache, notes


PREVIOUS = "previous"  # DIR/previous/: the last run that wrote a report, until this one writes its own
REPORT_FILES = ("report.json", "report.md", "report.html", "junit.xml", "plots")
CACHE_FILES = ("cache.sqlite", "cache.sqlite-wal", "cache.sqlite-shm")


def _set_aside_earlier(out: Path, resume: bool) -> Path | None:
    """Move the earlier run's report (and, unless resuming, the cache its numbers came from) into
    `out/previous/` before anything is asked. A run that then fails at launch, is interrupted or
    stops on a conformance error writes no report: the earlier PASS stood next to an emptied cache,
    read by CI as this run's result. Only a folder holding a report is set aside, so previous/
    keeps the last run that wrote one. Returns previous/, or None when there was nothing to move."""
    found = [out / name for name in REPORT_FILES if (out / name).exists()]
    for path in found:  # something else in a report file's place is the user's: never moved, never deleted
        if path.is_dir() != (path.name == "plots") or path.is_symlink():
            kind = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
            raise OutputError(path, f"{kind} stands where the report writes; move it away")
    if not found:
        return None
    prev = out / PREVIOUS
    moving = found + ([] if resume else [out / name for name in CACHE_FILES if (out / name).exists()])
    try:
        _remove(prev)
        prev.mkdir()
        for path in moving:
            path.rename(prev / path.name)
    except OSError as exc:
        raise UsageError(f"cannot set the earlier report aside in {prev}: {exc.strerror or exc}") from exc
    return prev


def drop_previous(out: Path) -> None:
    """After this run's report is written (not before: a report that cannot be written leaves the
    earlier one in previous/ as the folder's only report), previous/ has served its turn."""
    _remove(out / PREVIOUS)


def _remove(path: Path) -> None:
    """Delete a file or folder tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def executed(cfg: RunConfig, opts: RunOptions) -> Iterator[tuple[RunResult, list[str]]]:
    """Run end to end; yields the result and the infrastructure problems (exit 3 if any) with the
    folder's lock still held, so that the caller writes the report and drops `previous/` under it:
    released before that, a second run could take the folder in between, delete this run's cache,
    and, interrupted, leave this run's report at the top as its own."""
    out = opts.out_dir
    limit = opts.limit if opts.limit is not None else cfg.run.limit
    specs = cfg.servers()
    if cfg.baseline is not None:  # a recorded reference: checked before any server starts
        opts = dataclasses.replace(opts, baseline=opts.baseline or Baseline.read(cfg.baseline))
        specs = tuple(s for s in specs if s.name != cfg.reference.name)
    if opts.baseline is not None and not cfg.run.prompts:
        prompts = opts.baseline.prompt_list()[:limit]
    else:
        prompts = load_prompts(cfg.run.prompts, limit=limit, endpoint=cfg.run.endpoint)
    if opts.baseline is not None:
        opts.baseline.check(run_settings(cfg.run), prompts)
    floor = load_floor(cfg)  # a damaged noise-floor file is refused now, not after every server answered
    check_running(specs, request_timeout_s=cfg.run.request_timeout_s)  # seconds, not 600 s
    # the folder is touched only now: a run refused above (bad prompts, a baseline that does not
    # match, a port taken) leaves an earlier run's cache and report as they were
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        prev = _set_aside_earlier(out, opts.resume)
        try:
            cache, notes = _open_cache(out / "cache.sqlite", opts.resume)
            try:
                with launch_shown(specs, log_dir=out / "logs") as running:
                    run = aio.run(run_async(cfg, running, prompts, opts, cache, floor))
                    problems = infra_problems(run, cfg, running)
            finally:
                cache.close()
            refused = refused_everything(run)
            if refused is not None:
                raise UsageError(refused)
        except BaseException:  # exit 2 / 3, SIGINT, SIGTERM: no report will be written
            if prev is not None:
                what = "report is" if opts.resume else "report and cache are"
                log.warning("this run wrote no report: the earlier run's %s in %s/", what, prev)
            raise
        run.warnings[:0] = notes
        run.warnings.extend(problems)
        if opts.baseline is not None:  # where the reference's answers came from
            run.signature["baseline"] = opts.baseline.provenance()
            run.warnings.extend(opts.baseline.replay_notes(cfg.reference.name))  # what it could not answer
        yield run, problems
