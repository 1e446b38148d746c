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

A canary vouches only for what it reaches (15 prompt tokens, 8 generated): a server restarted with
a shorter context, or rebuilt with a bug from position 28 on, answers it as before. So where it
matches, a few of the server's own cached requests are asked again (`pick_rechecks`: the longest
echo, the longest generation, a seeded sample) and each answer compared with the cached one under
the same rule and tolerance (`answer_difference`); a refusal or any difference reuses nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difftest.cache import canonical_json
from difftest.errors import ServerError
from difftest.tokens_view import parse_choice

CANARY_PROMPT = "The quick brown fox jumps over the lazy dog. The capital of France is"
CANARY_TOKENS = 8
CANARY_LOGPROBS = 5
LOGPROB_TOLERANCE = 0.05  # nats; the most jitter the canary forgives (a changed scheme moves more)
TOLERANCE_FLOOR = 1e-4  # nats; what a bit-exact server is allowed (float printing, summation order)
JITTER_MULTIPLE = 4.0  # the tolerance over the largest move seen between two asks of the canary
# Before a canary match reuses a server's cached answers, these of its cached requests are asked
# again: the longest echo, the longest generation, and a sample of this many more (seeded: the
# same cache re-asks the same requests, so a resume is repeatable).
RECHECK_SAMPLE = 3
RECHECK_SEED = 0
# A fingerprint key that only makes a fingerprint new (a random value): added where the canary
# matched a stored fingerprint but its re-asked requests did not, so that the answers asked again
# get keys of their own; `changed_parts` ignores it, so the next resume finds them.
REBUILT = "rebuilt"
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
    summary = _choice_summary(choice if isinstance(choice, Mapping) else {})
    # positions without alternatives left out, as stored fingerprints have them
    return summary | {"top_logprobs": [top for top in summary["top_logprobs"] if top is not None]}


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
    return first_difference(old, new, tolerance) is None


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any], tolerance: float) -> str | None:
    """Where two summaries (`canary_summary`, `answer_summaries`) first differ, in words, or None:
    the tokens must match, every logprob (sampled and top-k) be within `tolerance`. A summary's
    top lists may hold None (a position without alternatives: an echo's first)."""
    a_tokens, b_tokens = list(old.get("tokens") or []), list(new.get("tokens") or [])
    if a_tokens != b_tokens:
        i = next((i for i, (x, y) in enumerate(zip(a_tokens, b_tokens, strict=False)) if x != y), None)
        if i is None:
            return f"{len(b_tokens)} tokens where {len(a_tokens)} were cached"
        return f"tokens differ at position {i} ({a_tokens[i]!r} cached, {b_tokens[i]!r} now)"
    if old.get("text") != new.get("text"):
        return "the same tokens spell another text"
    a, b = old.get("token_logprobs") or [], new.get("token_logprobs") or []
    if len(a) != len(b):
        return f"{len(b)} logprobs where {len(a)} were cached"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if not _close(x, y, tolerance):
            return f"the logprob at position {i} moved ({x} cached, {y} now; tolerance {tolerance:.2g} nats)"
    ta, tb = old.get("top_logprobs") or [], new.get("top_logprobs") or []
    if len(ta) != len(tb):
        return f"top logprobs at {len(tb)} positions where {len(ta)} were cached"
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        x, y = x or {}, y or {}
        shared = set(x) & set(y)
        # a near-tie may swap the k-th alternative in and out; the shared ones must agree
        if len(shared) < max(len(x), len(y)) - 1:
            return f"the top logprobs at position {i} name other tokens"
        for k in sorted(shared):
            if not _close(x[k], y[k], tolerance):
                return (
                    f"the top logprob of {k!r} at position {i} moved ({x[k]} cached, {y[k]} now; "
                    f"tolerance {tolerance:.2g} nats)"
                )
    return None


def changed_parts(
    old: Mapping[str, Any], new: Mapping[str, Any], tolerance: float = LOGPROB_TOLERANCE
) -> list[str]:
    """Which fingerprint fields differ (canonical JSON, so a list read back from JSON equals the
    tuple it was built from); the canaries compared with `same_behaviour` at `tolerance`, the
    jitter measured with them not at all (it is how noisy the server is, not what it is)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in ("canary_jitter", REBUILT):
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


# ---------------------------------------------------------------- re-asking cached requests


@dataclass(frozen=True)
class CachedRequest:
    """A cached request as the recheck ranks it: its cache key, reach and kind."""

    key: str
    reach: int  # prompt tokens + max_tokens: the furthest position its answer depends on
    echo: bool  # teacher forcing (an echoed prompt) rather than a generation


def reach(request: Mapping[str, Any], response: Mapping[str, Any]) -> int:
    """How far into a context `request` reaches: its prompt's tokens plus `max_tokens`. The
    prompt's tokens as the server counted them (`usage.prompt_tokens`, one prompt), else a token-id
    prompt's length, else a text's characters / 4 (a rough count: it only ranks requests)."""
    max_tokens = request.get("max_tokens", 16)
    generated = max_tokens if isinstance(max_tokens, int) and max_tokens >= 0 else 16
    return _prompt_tokens(request, response) + generated


def _prompt_tokens(request: Mapping[str, Any], response: Mapping[str, Any]) -> int:
    prompt = request.get("prompt")
    if "messages" in request and prompt is None:
        prompt = " ".join(str(m.get("content", "")) for m in request["messages"] if isinstance(m, Mapping))
    several = isinstance(prompt, list) and bool(prompt) and not all(isinstance(t, int) for t in prompt)
    usage = response.get("usage")
    counted = usage.get("prompt_tokens") if isinstance(usage, Mapping) else None
    if isinstance(counted, int) and counted >= 0 and not several:
        return counted
    return max((_rough_tokens(p) for p in prompt), default=0) if several else _rough_tokens(prompt)  # type: ignore[union-attr]


def _rough_tokens(prompt: Any) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return -(-len(prompt) // 4) if isinstance(prompt, str) else 0


def pick_rechecks(
    cached: Sequence[CachedRequest], sample: int = RECHECK_SAMPLE, seed: int = RECHECK_SEED
) -> list[CachedRequest]:
    """The cached requests to ask again: the longest echo and the longest generation (a change
    past the canary's reach, a context cap, shows there first), and a seeded sample of the rest
    (a change the canary's prompt does not meet)."""
    ordered = sorted(cached, key=lambda c: c.key)
    picked = [
        max(group, key=lambda c: c.reach)
        for group in ([c for c in ordered if c.echo], [c for c in ordered if not c.echo])
        if group
    ]
    rest = [c for c in ordered if c not in picked]
    return picked + random.Random(seed).sample(rest, min(sample, len(rest)))


def answer_summaries(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every choice of an answer (by index) as `first_difference` compares them: text, tokens,
    logprobs, and top logprobs position by position (None where a position has none)."""
    choices = response.get("choices")
    choices = choices if isinstance(choices, list) else []
    if all(isinstance(c, Mapping) and isinstance(c.get("index"), int) for c in choices):
        choices = sorted(choices, key=lambda c: c["index"])
    return [_choice_summary(c) for c in choices]


def _choice_summary(choice: Any) -> dict[str, Any]:
    view = parse_choice(choice)
    text = choice.get("text")
    if text is None and isinstance(choice.get("message"), Mapping):  # a chat answer
        text = choice["message"].get("content")
    return {
        "text": text,
        "tokens": list(view.tokens),
        "token_logprobs": [_value(p.logprob) for p in view.positions],
        "top_logprobs": [
            {str(k): _value(v) for k, v in p.top.items()} if p.top else None for p in view.positions
        ],
    }


def answer_difference(old: Mapping[str, Any], new: Mapping[str, Any], tolerance: float) -> str | None:
    """How a fresh answer to a cached request differs from the cached one, in words, or None
    (the canary's rule: same tokens, logprobs within `tolerance`)."""
    try:
        a, b = answer_summaries(old), answer_summaries(new)
    except (ServerError, ValueError, TypeError) as exc:  # a malformed block (UnreadableBody)
        return f"the answer cannot be read ({exc})"
    if len(a) != len(b):
        return f"{len(b)} choices where {len(a)} were cached"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        why = first_difference(x, y, tolerance)
        if why:
            return why if len(a) == 1 else f"choice {i}: {why}"
    return None
