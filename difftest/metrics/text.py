"""Text metrics of the target's outputs against the reference's: sacreBLEU BLEU and chrF.

sacrebleu's own implementation, never a re-implementation, so that numbers are comparable with
anything else that quotes BLEU; every score carries sacrebleu's signature string (tokenizer,
smoothing, version). Per segment first (sentence scores, with effective n-gram order as
sacrebleu recommends for single sentences), corpus after (corpus statistics, not the mean of
sentence scores).

Corpus BLEU uses sacrebleu's effective order too: a corpus whose continuations are all shorter
than 4 tokens has no 4-grams, and plain BLEU is then 0 however well they agree (two identical
3-token continuations scored 0 and failed `bleu_min`). Effective order stops at the highest
n-gram order the hypotheses have; with any 4-gram in the corpus it is plain BLEU exactly.
`TextScores.bleu_order` says which order was reached, so that the verdict can say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.bleu import MAX_NGRAM_ORDER

# "13a" is sacrebleu's default (WMT standard). It does not split CJK, so for Chinese outputs BLEU
# runs on whitespace chunks; chrF (character n-grams) is the fairer metric there.
DEFAULT_TOKENIZE = "13a"
MAX_ORDER = MAX_NGRAM_ORDER  # BLEU's n-gram order, 4


@dataclass(frozen=True)
class TextScores:
    bleu: float  # corpus BLEU, 0..100
    chrf: float  # corpus chrF2, 0..100
    segment_bleu: list[float]  # sentence BLEU per segment, 0..100
    segment_chrf: list[float]
    bleu_signature: str
    chrf_signature: str
    # highest n-gram order corpus BLEU rests on: 4 (BLEU's own), less where no hypothesis is that
    # long, 0 where every hypothesis is empty
    bleu_order: int = MAX_ORDER


def text_scores(
    hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = DEFAULT_TOKENIZE
) -> TextScores:
    """BLEU and chrF of `hypotheses` (target outputs) against `references` (one per segment).

    One pass: sacrebleu's per-segment statistics are extracted once, and both the corpus score
    (statistics summed) and every sentence score (each segment's own) are computed from them —
    the same `_extract_corpus_statistics` / `_aggregate_and_compute` path that sacrebleu's
    `corpus_score` and `sentence_score` take (tests pin the equality against its public API).
    Extraction dominates the cost (chrF's character n-grams), so doing it once matters at 20k
    prompts.

    A failed request should be passed as "" (scores 0 against a non-empty reference) so that it
    stays in the corpus denominator. One deviation from sacrebleu at segment level: a hypothesis
    identical to its reference scores 100 even when both are empty (sacrebleu says 0 for empty
    strings, which would read as "garbage" for two servers that both stopped at once). Corpus
    scores are sacrebleu's own (BLEU with effective order, see the module docstring), with the
    same rule: a corpus whose every hypothesis is identical to its reference scores 100, where
    sacrebleu says 0 for one of empty strings only. An empty corpus scores NaN.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    hyps, refs = list(hypotheses), list(references)
    bleu = BLEU(tokenize=tokenize, effective_order=True)  # also for single sentences, as recommended
    chrf = CHRF()
    if not hyps:
        _prime(bleu, chrf)
        nan = float("nan")
        return TextScores(nan, nan, [], [], str(bleu.get_signature()), str(chrf.get_signature()))
    b_stats = _segment_stats(bleu, hyps, refs)
    c_stats = _segment_stats(chrf, hyps, refs)
    same = [h == r for h, r in zip(hyps, refs, strict=True)]
    identical = all(same)
    return TextScores(
        bleu=100.0 if identical else float(bleu._aggregate_and_compute(b_stats).score),
        chrf=100.0 if identical else float(chrf._aggregate_and_compute(c_stats).score),
        segment_bleu=[
            100.0 if eq else float(bleu._aggregate_and_compute([st]).score)
            for eq, st in zip(same, b_stats, strict=True)
        ],
        segment_chrf=[
            100.0 if eq else float(chrf._aggregate_and_compute([st]).score)
            for eq, st in zip(same, c_stats, strict=True)
        ],
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        bleu_order=_ngram_order(b_stats),
    )


def _ngram_order(stats: list) -> int:
    """The highest n-gram order any hypothesis has: sacrebleu's segment statistics are
    [sys_len, ref_len, correct 1..4, total 1..4], totals counting the hypothesis' n-grams."""
    totals = [sum(int(st[2 + MAX_ORDER + i]) for st in stats) for i in range(MAX_ORDER)]
    return max((i + 1 for i, t in enumerate(totals) if t > 0), default=0)


# sacrebleu caches every reference's n-gram counters for the whole call (chrF's character 6-grams:
# tens of KiB a segment); statistics are per segment, so extracting them in slices gives the same
# numbers with one slice's cache alive at a time.
STATS_SLICE = 1024


def _segment_stats(metric: BLEU | CHRF, hyps: list[str], refs: list[str]) -> list:
    stats: list = []
    for i in range(0, len(hyps), STATS_SLICE):
        stats.extend(
            metric._extract_corpus_statistics(hyps[i : i + STATS_SLICE], [refs[i : i + STATS_SLICE]])
        )
    return stats


def sentence_bleu(hypothesis: str, reference: str, *, tokenize: str = DEFAULT_TOKENIZE) -> float:
    """Sentence BLEU (effective order), 0..100; identical strings score 100."""
    if hypothesis == reference:
        return 100.0
    return float(BLEU(tokenize=tokenize, effective_order=True).sentence_score(hypothesis, [reference]).score)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF2, 0..100; identical strings score 100."""
    if hypothesis == reference:
        return 100.0
    return float(CHRF().sentence_score(hypothesis, [reference]).score)


def _prime(*metrics: BLEU | CHRF) -> None:
    """sacrebleu learns the reference count (part of the signature) from a scoring call."""
    for m in metrics:
        m.corpus_score([""], [[""]])


def signatures(*, tokenize: str = DEFAULT_TOKENIZE) -> dict[str, str]:
    """sacrebleu's signature strings for the corpus scores, for the run's signature block."""
    bleu, chrf = BLEU(tokenize=tokenize, effective_order=True), CHRF()
    _prime(bleu, chrf)
    return {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}
