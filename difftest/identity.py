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
LOGPROB_TOLERANCE = 0.05  # nats; far above batch jitter, far below a changed scheme


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


def _close(a: float | str | None, b: float | str | None) -> bool:
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return False
    return abs(a - b) <= LOGPROB_TOLERANCE


def vouches(summary: Mapping[str, Any] | None) -> bool:
    """Whether a canary answer can tell two builds apart: answered, with a finite logprob for
    every token (a NaN canary says the server is broken, not which build it is)."""
    if summary is None or "error" in summary:
        return False
    logprobs = summary.get("token_logprobs") or []
    return bool(logprobs) and all(isinstance(v, int | float) for v in logprobs)


def same_behaviour(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    """Same canary tokens, and every logprob (sampled and top-k) within LOGPROB_TOLERANCE; never
    for a canary that does not vouch (no answer, or no logprobs: same text proves nothing)."""
    if old is None and new is None:
        return True
    if not (vouches(old) and vouches(new)):
        return False
    assert old is not None and new is not None  # vouches() said so
    if old.get("text") != new.get("text") or old.get("tokens") != new.get("tokens"):
        return False
    a, b = old.get("token_logprobs") or [], new.get("token_logprobs") or []
    if len(a) != len(b) or not all(_close(x, y) for x, y in zip(a, b, strict=True)):
        return False
    ta, tb = old.get("top_logprobs") or [], new.get("top_logprobs") or []
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb, strict=True):
        shared = set(x) & set(y)
        # a near-tie may swap the k-th alternative in and out; the shared ones must agree
        if len(shared) < max(len(x), len(y)) - 1 or not all(_close(x[k], y[k]) for k in shared):
            return False
    return True


def changed_parts(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Which fingerprint fields differ (canonical JSON, so a list read back from JSON equals the
    tuple it was built from); the canary compared with `same_behaviour`."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "behaviour":
            if not vouches(new.get(key)) or not vouches(old.get(key)):
                out.append("behaviour (the canary has no logprobs to compare: same text proves nothing)")
            elif not same_behaviour(old.get(key), new.get(key)):
                out.append("behaviour (canary prompt answered differently)")
        elif canonical_json(old.get(key)) != canonical_json(new.get(key)):
            out.append(key)
    return out
