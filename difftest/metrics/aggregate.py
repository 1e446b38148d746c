"""Per-prompt results -> one comparison's aggregate numbers and bootstrap intervals.

`aggregate_prompts(prompts)` fills `Comparison.aggregate` and `Comparison.ci`. Keys (a key is
*absent*, never NaN-by-default, when nothing it needs was measured; the verdict then reports
it "not measured"):

| key | meaning |
|---|---|
| n_prompts | prompts in the comparison, failed ones included |
| failed_requests | prompts with no usable answer (`PromptDiff.error` set): lost requests and broken answers |
| broken_answers, broken_rate | of those, prompts where the target's answer itself was impossible (NaN logprobs, a malformed logprobs block, an echo of other token ids): a target bug, not a lost request; / n_prompts |
| failed_rate | the others, requests lost after their retries: (failed_requests - broken_answers) / n_prompts. A broken answer is judged by broken_rate alone: counted here too, an allowed impossible answer left the verdict open as a prompt `--resume` would ask again |
| token_match | mean over prompts of the positional match rate (matches / longer length); a failed prompt counts as 0 |
| exact_match | fraction of prompts whose generated tokens are identical; failed -> not exact |
| garbled_rate | fraction of prompts with match rate < 0.5; failed -> garbled |
| median_first_divergence | median over prompts of the first differing token index; a prompt with no divergence counts as its length, a failed prompt as 0 |
| tie, drift, wrong | how many prompts' first divergence was classified TIE / DRIFT / WRONG |
| tf_prompts | prompts with teacher-forced data (the KL / top-1 / dp keys average over these) |
| kl_mean | mean over prompts of the per-prompt mean KL(ref‖target) estimate, nats |
| kl_lower_mean, kl_upper_mean | the same for the KL lower / upper bounds (see `topk_kl`) |
| kl_p99 | 99th percentile of the per-position KL estimates, pooled over all prompts |
| top1_agreement | mean over prompts of the fraction of positions whose top-1 tokens agree |
| dp_mean | mean over prompts of mean(p_ref - p_target) of the reference token |
| dp_rms | sqrt(mean over prompts of dp_rms²) |
| bleu, chrf | sacreBLEU corpus BLEU (effective order) / chrF2 of target texts against reference texts (0..100); a failed prompt's text is "" |
| bleu_order | the highest n-gram order BLEU rests on: 4, less where every target continuation is shorter (0: all empty) |
| kl_depth_min, kl_depth_cut_rate | set by `scoring.finish_comparison`, not here: the fewest alternatives KL compared at any teacher-forced position, and the share of positions compared below `[run] logprobs` (a side's echo listed fewer) |

Failed prompts are never dropped from the token-level or text denominators (they count as the
worst value). The teacher-forced keys average over the prompts that have them: a failed
request has no KL, and counting it as 0 would flatter the target; `failed_rate` carries it.

`ci[key] = [low, high]`: seeded percentile-bootstrap 95% intervals over prompts, for
token_match, exact_match, kl_mean, kl_upper_mean, top1_agreement and dp_mean.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np

from difftest.metrics.logprobs import TeacherForcedStats
from difftest.metrics.stats import DEFAULT_RESAMPLES, bootstrap_mean_ci, p99
from difftest.metrics.text import DEFAULT_TOKENIZE, text_scores
from difftest.metrics.tokens import classify_from_stats, divergence_stats, is_garbled, token_match
from difftest.results import PromptDiff

# aggregate key -> PromptDiff attribute of the means over the teacher-forced prompts (tf_prompts)
TEACHER_FORCED_MEANS = (
    ("kl_mean", "kl_mean"),
    ("kl_lower_mean", "kl_lower"),
    ("kl_upper_mean", "kl_upper"),
    ("top1_agreement", "top1_agreement"),
    ("dp_mean", "dp_mean"),
)
# every key that rests on the teacher-forced prompts alone (rundiff counts its prompts so)
TEACHER_FORCED_KEYS = frozenset({k for k, _ in TEACHER_FORCED_MEANS} | {"dp_rms", "kl_p99"})
CI_KEYS = ("token_match", "exact_match", "kl_mean", "kl_upper_mean", "top1_agreement", "dp_mean")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic GC around a scoring pass (re-enabled after, if it was on).

    Why: a full collection walks every live container, and one is triggered each time the
    objects surviving collections grow by 25%. Scoring allocates millions of small acyclic
    containers (dicts, lists, sacrebleu Counters) while the run's parsed responses (~130
    positions with their top-k dicts per prompt) are live, so those passes went quadratic-ish:
    bench/differ.py measured build_comparison at 20k prompts 78 s with the GC on, 23 s paused.
    Nothing here builds reference cycles, so refcounting frees all of it; results are identical.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def fill_generation(
    prompt: PromptDiff,
    ref_ids: Sequence[Hashable],
    tgt_ids: Sequence[Hashable],
    *,
    ref_top_logprobs: Sequence[Mapping[Hashable, float]] | None,
    tgt_top_logprobs: Sequence[Mapping[Hashable, float]] | None = None,
    tie_margin: float | None = None,
) -> None:
    """Fill `prompt`'s free-running fields from the two generated sequences (in place).

    `ref_top_logprobs[i]` / `tgt_top_logprobs[i]`: each side's top logprobs at generated position
    i, keyed like the ids. Without the reference's, the divergence is left unclassified (None)
    rather than guessed. The raw divergence statistics (margin, gap) are always stored; the
    TIE / DRIFT / WRONG label only when `tie_margin` is given — the runner classifies at judge
    time (`classify_prompts`), so a re-judge with other thresholds re-classifies. Sentence BLEU / chrF are filled by `aggregate_prompts`, from the same
    sacrebleu statistics as the corpus scores.
    """
    tm = token_match(ref_ids, tgt_ids)
    prompt.match_rate = tm.match_rate
    prompt.exact = tm.exact
    prompt.common_prefix = tm.common_prefix
    prompt.first_divergence = tm.first_divergence
    prompt.garbled = is_garbled(tm.match_rate)
    d = tm.first_divergence
    if d is not None and d < len(ref_ids) and d < len(tgt_ids):
        ref_top = ref_top_logprobs[d] if ref_top_logprobs and d < len(ref_top_logprobs) else None
        if ref_top:
            prompt.divergence_margin, prompt.divergence_gap = divergence_stats(ref_top, tgt_ids[d])
            if tie_margin is not None:
                prompt.divergence_kind = classify_from_stats(
                    prompt.divergence_margin, prompt.divergence_gap, tie_margin
                )
            prompt.ref_alternatives = {str(k): float(v) for k, v in ref_top.items()}
        if tgt_top_logprobs and d < len(tgt_top_logprobs) and tgt_top_logprobs[d]:
            prompt.tgt_alternatives = {str(k): float(v) for k, v in tgt_top_logprobs[d].items()}


def classify_prompts(prompts: Sequence[PromptDiff], tie_margin: float) -> dict[str, float]:
    """Label every measured divergence TIE / DRIFT / WRONG with `tie_margin` (in place; LENGTH
    stays); returns the aggregate counts {"tie", "drift", "wrong"}."""
    counts = {"tie": 0.0, "drift": 0.0, "wrong": 0.0}
    for p in prompts:
        if p.error is None and p.divergence_margin is not None and p.divergence_kind != "LENGTH":
            p.divergence_kind = classify_from_stats(p.divergence_margin, p.divergence_gap, tie_margin)
        if p.error is None and p.divergence_kind in ("TIE", "DRIFT", "WRONG"):
            counts[p.divergence_kind.lower()] += 1
    return counts


def fill_teacher_forced(prompt: PromptDiff, stats: TeacherForcedStats | None) -> None:
    """Copy one prompt's teacher-forced summary into its PromptDiff (None leaves it unmeasured)."""
    if stats is None:
        return
    prompt.position_kl = list(stats.position_kl)
    prompt.kl_mean = stats.kl_mean
    prompt.kl_lower = stats.kl_lower_mean
    prompt.kl_upper = stats.kl_upper_mean
    prompt.top1_agreement = stats.top1_agreement
    prompt.dp_mean = stats.dp_mean
    prompt.dp_rms = stats.dp_rms


def _length(p: PromptDiff) -> int:
    ref = p.ref_token_ids if p.ref_token_ids is not None else p.ref_tokens
    tgt = p.tgt_token_ids if p.tgt_token_ids is not None else p.tgt_tokens
    return max(len(ref), len(tgt))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def aggregate_prompts(
    prompts: Sequence[PromptDiff],
    *,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
    tokenize: str = DEFAULT_TOKENIZE,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Aggregate one comparison's prompts; returns (Comparison.aggregate, Comparison.ci).

    Side effect, on purpose: each answered prompt's `bleu` / `chrf` (sentence scores) is set
    from the same sacrebleu statistics pass as the corpus scores, so per-prompt and corpus text
    scores can never disagree in settings (and the costly extraction runs once).

    See the module docstring for every key. NaN in a per-prompt value propagates into its mean
    (and its CI) on purpose: NaN must fail the verdict, not vanish in an average.
    """
    with gc_paused():
        return _aggregate(prompts, seed=seed, n_resamples=n_resamples, tokenize=tokenize)


def broken_answers(prompts: Sequence[PromptDiff]) -> int:
    """Prompts whose error is the target's own impossible answer (PromptDiff.broken), not a lost
    request: a flag on an answered prompt counts nothing."""
    return sum(p.error is not None and p.broken for p in prompts)


def lost_requests(prompts: Sequence[PromptDiff]) -> int:
    """Prompts whose request got no answer after its retries (an error that is not the target's
    impossible answer): what failed_rate counts, exit 3 weighs and `--resume` asks again."""
    return sum(p.error is not None and not p.broken for p in prompts)


def refused_prompts(prompts: Sequence[PromptDiff]) -> list[PromptDiff]:
    """Failed prompts the server refused as invalid (HTTP 4xx: a prompt over its context, max_tokens
    over its cap): asked again, they get the same answer."""
    return [p for p in prompts if p.error and not p.broken and "RequestRejected:" in p.error]


def _aggregate(
    prompts: Sequence[PromptDiff], *, seed: int, n_resamples: int, tokenize: str
) -> tuple[dict[str, float], dict[str, list[float]]]:
    n = len(prompts)
    agg: dict[str, float] = {"n_prompts": float(n)}
    series: dict[str, list[float]] = {}
    if n == 0:
        return agg, {}
    failed = [p.error is not None for p in prompts]
    n_failed = sum(failed)
    agg["failed_requests"] = float(n_failed)
    agg["failed_rate"] = lost_requests(prompts) / n  # broken answers are broken_rate's alone
    n_broken = broken_answers(prompts)
    agg["broken_answers"] = float(n_broken)
    agg["broken_rate"] = n_broken / n

    # --- free-running tokens: failed (or unscored) prompts count as the worst value
    ok = [p for p, f in zip(prompts, failed, strict=True) if not f]
    if n_failed or any(p.match_rate is not None for p in ok):
        good = [not f and p.match_rate is not None for p, f in zip(prompts, failed, strict=True)]
        series["token_match"] = [p.match_rate if g else 0.0 for p, g in zip(prompts, good, strict=True)]
        series["exact_match"] = [1.0 if g and p.exact else 0.0 for p, g in zip(prompts, good, strict=True)]
        agg["token_match"] = _mean(series["token_match"])
        agg["exact_match"] = _mean(series["exact_match"])
        agg["garbled_rate"] = _mean(
            [0.0 if g and not is_garbled(p.match_rate) else 1.0 for p, g in zip(prompts, good, strict=True)]
        )  # type: ignore[arg-type]
        first = [
            (float(_length(p)) if p.first_divergence is None else float(p.first_divergence)) if g else 0.0
            for p, g in zip(prompts, good, strict=True)
        ]
        agg["median_first_divergence"] = float(np.median(first))
        for kind in ("TIE", "DRIFT", "WRONG"):
            agg[kind.lower()] = float(sum(p.divergence_kind == kind for p in ok))

    # --- teacher-forced: over the prompts that have it
    tf = [p for p in ok if p.kl_mean is not None]
    if tf:
        agg["tf_prompts"] = float(len(tf))
        for key, attr in TEACHER_FORCED_MEANS:
            vals = [getattr(p, attr) for p in tf]
            if all(v is not None for v in vals):
                series[key] = [float(v) for v in vals]
                agg[key] = _mean(series[key])
        rms = [p.dp_rms for p in tf]
        if all(v is not None for v in rms):
            agg["dp_rms"] = math.sqrt(_mean([v * v for v in rms]))  # type: ignore[operator]
        pooled = [v for p in tf for v in (p.position_kl or [])]
        if pooled:
            agg["kl_p99"] = p99(pooled)

    # --- text: corpus scores, failed prompts as empty hypotheses
    if any(p.ref_text is not None or p.tgt_text is not None for p in prompts):
        hyps = ["" if f or p.tgt_text is None else p.tgt_text for p, f in zip(prompts, failed, strict=True)]
        refs = [p.ref_text or "" for p in prompts]
        scores = text_scores(hyps, refs, tokenize=tokenize)
        agg["bleu"] = scores.bleu
        agg["chrf"] = scores.chrf
        agg["bleu_order"] = float(scores.bleu_order)
        for p, f, sb, sc in zip(prompts, failed, scores.segment_bleu, scores.segment_chrf, strict=True):
            if not f and p.ref_text is not None and p.tgt_text is not None:
                p.bleu, p.chrf = sb, sc

    ci = {
        key: list(bootstrap_mean_ci(series[key], n_resamples=n_resamples, seed=seed))
        for key in CI_KEYS
        if key in series
    }
    return agg, ci
