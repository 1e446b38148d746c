"""Is this the server whose answers the cache holds? Identity by configuration *and* behaviour.

A URL, a model id and a version string do not identify a build: a target restarted as int4 behind
the same URL, with the same model name, answers the same `/v1/models`. `--resume` must never judge
it on the int8 answers it stored. So besides what the server says about itself (`/version`,
`/debug/config` where served), the fingerprint carries what it *does*: the greedy tokens and top
logprobs of a fixed canary prompt, asked fresh on every resume before anything is reused.

`same_behaviour` tolerates logprob jitter (a batched GPU server moves logprobs by ~1e-3 between
identical requests) but not a different token: a swapped quantization scheme changes the canary's
logprobs by 1e-2..1 nats on smollm2 and usually its tokens. Greedy text alone proves nothing: a
fault in one module (scale-transposed in one of 30 layers of smollm2) leaves the canary's 8 greedy
tokens as they were and moves only their logprobs. So a canary answered without per-token
logprobs, or not answered at all, never vouches for a server, and its cached answers are re-asked.

A canary sent alone runs at batch slot 0, where a slot-dependent bug (a scale or KV row read from
the wrong slot: the shim's `slot-variant`, `slot-tile`) does nothing, yet a run's answers come from
concurrent requests the server batches. So the canary is also sent inside a prompt list
(`canary_batch_request`: fillers at slot 0 and in the slots its copies would read by mistake,
copies at `CANARY_SLOTS`), and every copy is compared. A server that refuses prompt lists cannot
vouch for batched behaviour, so its answers are re-asked too.

The tolerance is measured, not assumed: the canary is asked twice now, and the old and new answers
may differ by `JITTER_MULTIPLE` x the larger of the jitter seen now and at the cached run, at least
`TOLERANCE_FLOOR`, at most `LOGPROB_TOLERANCE`. A fixed 0.05 nats let the shim's `slot-variant`
(KL ~0.006) through; a deterministic server (the shim on a CPU is bit-exact) has no jitter, and a
tolerance too tight for a server costs only re-asking, never a verdict on stale answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from difftest.cache import canonical_json
from difftest.tokens_view import parse_choice

CANARY_PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is"
CANARY_TOKENS = 8
CANARY_LOGPROBS = 5
LOGPROB_TOLERANCE = 0.05  # nats; the most jitter the canary forgives (a changed scheme moves more)
TOLERANCE_FLOOR = 1e-4  # nats; what a bit-exact server is allowed (float printing, summation order)
JITTER_MULTIPLE = 4.0  # the tolerance over the largest move seen between two asks of the canary
# The batched canary: fixed forever (changing it changes every server's identity, so every cache is
# re-asked once). Slot 0 and the slots a wrong tile offset reads instead (18 mod 16 and mod 8 = 2)
# hold fillers, so a slot reading another slot's rows reads a different prompt's.
CANARY_BATCH = 20
CANARY_SLOTS = (1, 18)
CANARY_FILLERS = (
    "A completely different request that shares the batch:",
    "def unrelated_function(x):\n    return",
    "Numbers: 17, 42, 99, and",
)


def canary_request(model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": CANARY_PROMPT,
        "max_tokens": CANARY_TOKENS,
        "temperature": 0,
        "logprobs": CANARY_LOGPROBS,
        "seed": 0,
    }
    if model:
        body["model"] = model
    return body


def canary_batch_prompts() -> list[str]:
    """`CANARY_BATCH` prompts: the canary at `CANARY_SLOTS`, fillers (cycled) everywhere else."""
    fillers = (CANARY_FILLERS[i % len(CANARY_FILLERS)] for i in range(CANARY_BATCH))
    return [CANARY_PROMPT if i in CANARY_SLOTS else next(fillers) for i in range(CANARY_BATCH)]


def canary_batch_request(single: Mapping[str, Any]) -> dict[str, Any]:
    """`single` (the canary request as answered alone) with the prompt list instead."""
    return dict(single) | {"prompt": canary_batch_prompts()}


def batch_summaries(response: Mapping[str, Any]) -> list[dict[str, Any]] | str:
    """The summaries of the canary's copies in a batched answer (in `CANARY_SLOTS` order), or why
    there are none (a server that answers a prompt list with one choice, say)."""
    choices = response.get("choices")
    if not isinstance(choices, list) or len(choices) != CANARY_BATCH:
        n = len(choices) if isinstance(choices, list) else 0
        return f"a list of {CANARY_BATCH} prompts answered with {n} choices"
    by_index = {c.get("index"): c for c in choices if isinstance(c, Mapping)}
    if set(by_index) != set(range(CANARY_BATCH)):
        by_index = dict(enumerate(choices))  # no usable indices: the order they came in
    return [canary_summary({"choices": [by_index[slot]]}) for slot in CANARY_SLOTS]


def canary_summary(response: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a canary answer that identify behaviour: text, tokens, their logprobs, top-k.

    Read through `tokens_view` (every logprobs shape difftest reads). A value that is no finite
    number (NaN, an infinity, a null: a broken answer) is kept as its name, so that the summary
    is JSON and such a canary never vouches."""
    choices = response.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    view = parse_choice(choice) if isinstance(choice, Mapping) else parse_choice({})
    return {
        "text": choice.get("text") if isinstance(choice, Mapping) else None,
        "tokens": list(view.tokens),
        "token_logprobs": [_value(p.logprob) for p in view.positions],
        "top_logprobs": [{str(k): _value(v) for k, v in p.top.items()} for p in view.positions if p.top],
    }


def _value(v: float | None) -> float | str | None:
    return v if v is None or math.isfinite(v) else str(v)


def _close(a: float | str | None, b: float | str | None, tolerance: float) -> bool:
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) <= tolerance


def jitter(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> float:
    """The largest logprob move (sampled and shared top-k) between two asks of the canary; other
    tokens, or a canary that does not vouch, count as `LOGPROB_TOLERANCE` (as noisy as forgiven)."""
    if not (vouches(a) and vouches(b)) or a.get("tokens") != b.get("tokens"):  # type: ignore[union-attr]
        return LOGPROB_TOLERANCE
    assert a is not None and b is not None
    pairs = list(zip(a.get("token_logprobs") or [], b.get("token_logprobs") or [], strict=False))
    for x, y in zip(a.get("top_logprobs") or [], b.get("top_logprobs") or [], strict=False):
        pairs += [(x[k], y[k]) for k in set(x) & set(y)]
    moves = [abs(p - q) for p, q in pairs if isinstance(p, int | float) and isinstance(q, int | float)]
    return min(LOGPROB_TOLERANCE, max(moves, default=0.0))


def tolerance_for(*jitters: float | None) -> float:
    """How far a stored canary may be from today's: `JITTER_MULTIPLE` x the jitter seen (now, and
    at the cached run), within [`TOLERANCE_FLOOR`, `LOGPROB_TOLERANCE`]."""
    seen = max((j for j in jitters if isinstance(j, int | float) and math.isfinite(j)), default=0.0)
    return min(LOGPROB_TOLERANCE, max(TOLERANCE_FLOOR, JITTER_MULTIPLE * seen))


def vouches(summary: Mapping[str, Any] | None) -> bool:
    """Whether a canary answer can tell two builds apart: answered, with a finite logprob for
    every token (a NaN canary says the server is broken, not which build it is)."""
    if summary is None or "error" in summary:
        return False
    logprobs = summary.get("token_logprobs") or []
    return bool(logprobs) and all(isinstance(v, int | float) for v in logprobs)


def same_behaviour(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, tolerance: float = LOGPROB_TOLERANCE
) -> bool:
    """Same canary tokens, and every logprob (sampled and top-k) within `tolerance`; never for a
    canary that does not vouch (no answer, or no logprobs: same text proves nothing)."""
    if old is None and new is None:
        return True
    if not (vouches(old) and vouches(new)):
        return False
    assert old is not None and new is not None  # vouches() said so
    if old.get("text") != new.get("text") or old.get("tokens") != new.get("tokens"):
        return False
    a, b = old.get("token_logprobs") or [], new.get("token_logprobs") or []
    if len(a) != len(b) or not all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True)):
        return False
    ta, tb = old.get("top_logprobs") or [], new.get("top_logprobs") or []
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb, strict=True):
        shared = set(x) & set(y)
        # a near-tie may swap the k-th alternative in and out; the shared ones must agree
        if len(shared) < max(len(x), len(y)) - 1 or not all(_close(x[k], y[k], tolerance) for k in shared):
            return False
    return True


def changed_parts(
    old: Mapping[str, Any], new: Mapping[str, Any], tolerance: float = LOGPROB_TOLERANCE
) -> list[str]:
    """Which fingerprint fields differ (canonical JSON, so a list read back from JSON equals the
    tuple it was built from); the canaries compared with `same_behaviour` at `tolerance`, the
    jitter measured with them not at all (it is how noisy the server is, not what it is)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "canary_jitter":
            continue
        if key == "behaviour":
            if not vouches(new.get(key)) or not vouches(old.get(key)):
                out.append("behaviour (the canary has no logprobs to compare: same text proves nothing)")
            elif not same_behaviour(old.get(key), new.get(key), tolerance):
                out.append("behaviour (canary prompt answered differently)")
        elif key == "behaviour_batched":
            why = _batched_change(old.get(key), new.get(key), tolerance)
            if why:
                out.append(f"batched behaviour ({why})")
        elif canonical_json(old.get(key)) != canonical_json(new.get(key)):
            out.append(key)
    return out


def _batched_change(old: Any, new: Any, tolerance: float) -> str | None:
    if not isinstance(old, Mapping):
        return "not recorded by the cached run"
    if not isinstance(new, Mapping) or not isinstance(new.get("answers"), list):
        refused = new.get("refused") if isinstance(new, Mapping) else None
        return f"the canary could not be sent in a batch: {refused or 'no answer'}"
    if not isinstance(old.get("answers"), list) or old.get("slots") != new.get("slots"):
        return "the cached run's batched canary is not comparable"
    for slot, a, b in zip(new["slots"], old["answers"], new["answers"], strict=False):
        if not same_behaviour(a, b, tolerance):
            return f"canary answered differently at batch slot {slot} of {new.get('batch')}"
    return None
