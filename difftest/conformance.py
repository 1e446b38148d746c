"""Conformance: what one server can do, and whether two servers can be compared at all.

`probe(client)` asks a server, feature by feature, what the differ relies on, and turns every
missing feature into a visible warning that names what it disables. A *broken* feature is no
missing one: it raises, naming the server —
- InfraError (exit 3) when completions fail on the server's side (5xx, timeouts, resets, bad bodies);
- ConformanceError (exit 2) when they are refused (4xx), or when logprobs are not the text's tokens
  (a block covering part of the generated or echoed text, an empty block beside text, a malformed
  block, NaN, a null past an echo's first position): switching teacher forcing off for such a server judged it on what it chose to show,
  a false PASS (issue 10).
No probe request asks for more tokens than the run will (`probe(max_tokens=)`): a server capping
`max_tokens` below the probe's own 16 could not be compared at all, whatever `--max-tokens` said,
and was said not to serve /v1/completions (tester t21, D3).
An empty generation (a model ending at once after the probe's sentence) is no missing feature
either: logprobs are read from the next probe text that generates a token, and where none does,
logprob support is "unverified", never "no logprobs".
The check that matters most is the last echo check: teacher-forced
metrics read the logprobs a server gives for *echoed* tokens, and real servers have returned echoed
logprobs shifted by a position or computed on another path than generation. So we generate k tokens,
echo prompt + those tokens with `max_tokens=0`, and trust echo only if the two sets of logprobs agree.

Whether two servers can be compared at all is tokenizer_check.py's question; it reads the probe
results and the status words defined here.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from difftest.client import CompletionClient
from difftest.errors import (
    ConformanceError,
    InfraError,
    RequestRejected,
    ResponseTooLarge,
    ServerError,
    UnreadableBody,
)
from difftest.tokens_view import (
    TokensView,
    coverage_problem,
    greedy_not_top1,
    impossible_logprobs,
    parse_choice,
    prompt_tokens,
    trusted_offsets,
)

# Status words of the conformance tables (probe's, and tokenizer_check's pair table).
OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"

DEFAULT_PROBES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",  # plain ASCII: the echo alignment probe
    "1+2+3=",
    "  leading spaces,\ttabs and\nnew lines\n\n",
    "Unicode: café, naïve, 日本語, 🙂",
    "<|im_start|>user\nHello<|im_end|>\n",  # special tokens: parsed or not, on both sides alike
    "def f(x):\n    return x ** 2\n",
)
LOGPROBS_TRIES = (20, 5, 1)
GEN_TOKENS = 16  # the first generation's (and the determinism check's) max_tokens, run's permitting
# the server's words when it refuses a request for its max_tokens (a cap below the probe's)
_NAMES_MAX_TOKENS = re.compile(r"max[_ ]?(completion[_ ]?)?tokens", re.IGNORECASE)
# Prompts a model continues rather than ends (an EOS after a finished sentence is ordinary for an
# instruct model, after an unfinished one rare): tried after the probe texts where those generate
# nothing, so that an empty generation is never taken for "no logprobs".
GENERATING_FALLBACKS: tuple[str, ...] = ("1, 2, 3, 4, 5,", "Once upon a time, there was a")
ECHO_GEN_TOKENS = 8
# Prefill and decode run different kernels: in fp16/bf16 their logprobs differ by ~1e-2 nats.
# The echo bugs this guards against (off-by-one positions, another model path) differ by whole nats.
ECHO_LOGPROB_TOL = 0.25  # median |echo - generation| logprob (nats): noise, not alignment, under this
ECHO_LOGPROB_MAX = 2.0  # and no position off by more than this
_TF_OFF = "teacher-forced metrics disabled"
# Every degraded feature's warning names what it disables (keys are stable for callers and tests).
WARNINGS = {
    "no_models": "no /v1/models: model id unknown; requests carry no model name",
    "several_models": "/v1/models lists {n} models ({ids}): requests ask for the first, {first!r} "
    "(set `model` in the server's table to choose)",
    "nondeterministic": "greedy decoding is not deterministic: token-match metrics include server noise "
    "(measure it with `difftest noise`)",
    "determinism_unknown": "greedy determinism unknown (the repeated request failed)",
    "logprobs_capped": "logprobs capped at {cap}: KL is estimated from top-{cap} with a wider tail bucket",
    "no_logprobs": "no logprobs: teacher-forced metrics and TIE/DRIFT classification disabled",
    "logprobs_unverified": "logprob support unverified (logprobs={k} accepted, but no probe text generated a "
    "token): logprobs are asked for up to {k}, the run's own answers show whether they come",
    "no_token_ids": "no token ids (neither return_tokens_as_token_ids nor /tokenize): tokenizers are compared "
    "by token strings and teacher forcing echoes text (alignment-checked)",
    "no_int_prompts": "prompts as token-id lists rejected: teacher forcing echoes text (alignment-checked)",
    "no_echo": f"no echo: {_TF_OFF}",
    "echo_logprobs_fail": f"echo with logprobs fails ({{err}}): {_TF_OFF}",
    "echo_no_prompt_logprobs": f"echo returns no prompt logprobs: {_TF_OFF}",
    "echo_misaligned": f"echoed tokens do not line up with the prompt: {_TF_OFF}",
    "echo_unverified": f"echoed logprobs unverified ({{why}}): {_TF_OFF}",
    "echo_inconsistent": "echoed logprobs differ from generation by up to {diff:.3g} nats (tolerance {tol}): "
    f"{_TF_OFF} (echo not trusted)",
    "no_tokenizations": "probe texts could not be tokenized: tokenizer compatibility unverifiable",
    "tokenizations_failed": "{n} probe tokenization request(s) failed: tokenizer compatibility checked on fewer texts",
    "no_debug": "no debug protocol: white-box checks (layers, quant audit) disabled",
    "not_top1": "{what}: the server samples or applies a penalty at temperature 0 (a repetition_penalty "
    "from the model's generation_config?): token-match metrics compare what it chose, KL its raw logprobs",
    "extra_choices": "{n} choices answered for one asked (n ignored?): choice index 0 is the one judged",
    "echo_continues": "max_tokens=0 is treated as no limit (echo generates after the prompt): "
    f"{_TF_OFF}; probe tokenizations cut at the prompt's end",
}


@dataclass(frozen=True)
class ProbeTokens:
    text: str
    ids: tuple[int, ...] | None  # from /tokenize, token-id echo or the tokenizer hint
    strings: tuple[str, ...] | None  # from echo (token strings as served)
    source: str  # where `ids` came from: "tokenize" | "echo" | "hint" | "none"
    # usage.prompt_tokens of the text (None: not reported): tokenizer_check's evidence where
    # neither ids nor strings can be compared; evidence about the tokenization, not part of it
    prompt_tokens: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Capabilities:
    name: str
    url: str
    model: str | None
    models: tuple[str, ...] = ()
    # `model` is the first of several ids /v1/models lists, taken because none was configured: a
    # replay of a recording asks as it did (Baseline.replay_model reads this, not the warning's words)
    model_first_of_several: bool = False
    deterministic: bool | None = None
    logprobs_cap: int = 0  # largest `logprobs` accepted (0: none)
    echo: bool = False  # echo with max_tokens=0 works
    echo_logprobs: bool = False  # ... and returns prompt logprobs
    echo_aligned: bool | None = None  # echoed tokens re-form the prompt, first logprob null
    echo_consistent: bool | None = None  # echoed logprobs equal generation's (None: unverified)
    echo_max_abs_diff: float | None = None
    token_id_strings: bool = False  # return_tokens_as_token_ids honoured
    tokenize: bool = False  # POST /tokenize works
    top_logprobs_keys: str = "none"  # "id" | "str" | "none"
    int_prompts: bool | None = None  # prompts as token-id lists accepted
    debug: bool = False  # GET /debug/config answered
    # ... or not answered at all (a timeout, a lost connection, a "not now" status): such a server
    # may well serve the protocol, so requiring it is infrastructure trouble, not a missing flag
    debug_unanswered: bool = False
    vocab_size: int | None = None
    tokenizations: tuple[ProbeTokens, ...] = ()
    checks: tuple[tuple[str, str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    api: str = "completions"  # "chat": generations over /v1/chat/completions (difftest.chat)

    @property
    def teacher_forced(self) -> bool:
        """Echoed logprobs can be trusted for teacher-forced metrics."""
        return (
            self.api == "completions"
            and self.logprobs_cap >= 1
            and self.echo_logprobs
            and self.echo_aligned is not False
            and bool(self.echo_consistent)
        )

    @property
    def token_ids(self) -> str:
        return (
            "return_tokens_as_token_ids" if self.token_id_strings else "tokenize" if self.tokenize else "none"
        )

    def table(self) -> list[tuple[str, str, str]]:
        return list(self.checks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"teacher_forced": self.teacher_forced, "token_ids": self.token_ids}


@dataclass
class _Probe:
    """Mutable scratch state of one probe run; frozen into Capabilities at the end."""

    client: CompletionClient
    max_tokens: int | None = None  # the run's: no request of the probe asks for more
    fields: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    last_error: Exception | None = None  # of the latest `ask` that failed

    @property
    def where(self) -> str:
        return f"{self.client.name} ({self.client.base_url})"

    def tokens(self, n: int) -> int:
        """`n` tokens, or the run's max_tokens where that is fewer: a server capping max_tokens
        below the probe's own numbers serves the run's requests all the same (D3)."""
        return n if self.max_tokens is None else min(n, self.max_tokens)

    def check(self, name: str, status: str, detail: str, warning: str | None = None, **fmt: Any) -> None:
        """One table row; `warning` is a WARNINGS key, formatted with `fmt`."""
        self.checks.append((name, status, detail))
        if warning:
            self.warnings.append(WARNINGS[warning].format(**fmt))

    async def ask(self, payload: dict[str, Any], *, retries: int = 0) -> tuple[dict | None, str]:
        """(response, "") or (None, why): a refused feature is data here, not an exception."""
        if self.fields.get("model"):
            payload = {"model": self.fields["model"]} | payload
        try:
            resp = await self.client.completions(payload, use_cache=False, retries=retries)
        except (RequestRejected, ServerError) as e:
            self.last_error = e
            return None, _why(e)
        if not resp["choices"]:
            self.last_error = ServerError(f"{self.client.name}: /v1/completions answered no choice")
            return None, "answered an empty 'choices' list"
        return resp, ""

    def view(self, resp: dict) -> TokensView:
        """choices[0] of an answer as a TokensView. A malformed logprobs block is not a missing
        feature but a broken one: a ConformanceError that names the server."""
        try:
            return parse_choice(resp["choices"][0], server=self.client.name)
        except ServerError as e:
            raise ConformanceError(f"{self.where}: {str(e).removeprefix(self.client.name + ': ')}") from None


async def probe(
    client: CompletionClient,
    *,
    probe_texts: Sequence[str] = DEFAULT_PROBES,
    tokenizer_hint: Callable[[str], Sequence[int]] | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
) -> Capabilities:
    """`model`: the id the config names for a url server (None: the first /v1/models lists).
    `max_tokens`: the run's, the most any probe request asks for (None: the probe's own numbers,
    16 at most: `difftest probe` knows no run)."""
    if not probe_texts:
        raise ValueError("probe needs at least one probe text")
    p = _Probe(client, max_tokens)
    text0 = probe_texts[0]
    await _probe_models(p, model)
    await _probe_generation(p, text0)
    await _probe_logprobs(p, tuple(dict.fromkeys((*probe_texts, *GENERATING_FALLBACKS))))
    await _probe_token_ids(p, text0)
    await _probe_echo(p, text0)
    await _probe_echo_consistency(p, text0)
    await _probe_tokenizations(p, probe_texts, tokenizer_hint)
    await _probe_debug(p)
    f = p.fields
    return Capabilities(
        name=client.name,
        url=client.base_url,
        checks=tuple(p.checks),
        warnings=tuple(p.warnings),
        **{k: v for k, v in f.items() if not k.startswith("_")},
    )


def choose_model(where: str, models: Sequence[str], wanted: str | None) -> tuple[str | None, str | None]:
    """(the model id requests carry, a warning or None). A configured `model` is the one asked and
    must be served: it was ignored, and every request asked for the first id listed. Without
    one, the first id is asked, named when the server lists several."""
    if wanted is not None:
        if models and wanted not in models:
            raise ConformanceError(
                f"{where}: model {wanted!r} is not served; /v1/models lists {', '.join(map(repr, models))}"
            )
        return wanted, None
    if len(models) > 1:
        ids = ", ".join(models)
        return models[0], WARNINGS["several_models"].format(n=len(models), ids=ids, first=models[0])
    return (models[0] if models else None), None


def several_models(caps: Capabilities) -> str | None:
    """The probe's warning that it picked the first of several served models, if it gave one."""
    head = WARNINGS["several_models"].split("{", 1)[0]
    return next((w for w in caps.warnings if w.startswith(head)), None)


def with_model(caps: Capabilities, wanted: str | None) -> Capabilities:
    """`caps` asking for the configured model (chat's probe picks the first listed itself)."""
    if wanted is None:
        return caps
    model, _ = choose_model(f"{caps.name} ({caps.url})", caps.models, wanted)
    picked = several_models(caps)
    warnings = tuple(w for w in caps.warnings if w != picked)
    return replace(caps, model=model, model_first_of_several=False, warnings=warnings)


async def _probe_models(p: _Probe, wanted: str | None = None) -> None:
    try:
        models = await p.client.models()
    except (RequestRejected, ServerError) as e:
        p.fields |= {"model": wanted, "models": ()}
        if wanted is None:
            p.check("models", WARN, _why(e), "no_models")
        else:  # asked for by name, unverified
            p.check("models", WARN, f"{_why(e)}; requests ask for {wanted!r} (unverified)")
        return
    model, warning = choose_model(p.where, models, wanted)
    first = wanted is None and len(models) > 1
    p.fields |= {"model": model, "models": tuple(models), "model_first_of_several": first}
    p.check(
        "models", OK if models else WARN, ", ".join(models) or "empty list", None if models else "no_models"
    )
    if warning:
        p.warnings.append(warning)


async def _probe_generation(p: _Probe, text: str) -> None:
    size = p.tokens(GEN_TOKENS)
    req = {"prompt": text, "max_tokens": size, "temperature": 0}
    first, err = await p.ask(req, retries=p.client.max_retries)
    choice = first["choices"][0] if first else None
    if first is None and isinstance(p.last_error, ServerError):  # 5xx, timeouts, resets, bad bodies
        raise InfraError(f"{p.where} fails /v1/completions: {err}")
    if first is None and _NAMES_MAX_TOKENS.search(err):
        raise ConformanceError(_max_tokens_refused(p, size, err))
    if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
        raise ConformanceError(f"{p.where} cannot serve /v1/completions: {err or 'answer without text'}")
    a = choice["text"]
    p.fields["_counts"] = {text: prompt_tokens(first)}  # spares _probe_tokenizations a request
    p.check("completions", OK, f"{len(a)} chars for max_tokens={size}")
    n = len(first["choices"])
    if n != 1:  # a server that ignores `n` may ignore other parameters: said, never silent
        p.check("one choice", WARN, f"{n} choices for n=1", "extra_choices", n=n)
    second, err = await p.ask(req)
    b = second["choices"][0].get("text") if second and second["choices"] else None
    if not isinstance(b, str):
        p.check("greedy determinism", WARN, err or "no text", "determinism_unknown")
        return
    p.fields["deterministic"] = a == b
    if a == b:
        p.check("greedy determinism", OK, "same request twice -> same text")
    else:
        p.check("greedy determinism", WARN, f"texts differ at char {first_diff(a, b)}", "nondeterministic")


def _max_tokens_refused(p: _Probe, n: int, err: str) -> str:
    """The refusal of the probe's first request for its max_tokens: the probe's request of `n`
    tokens was refused, not the route (it used to say "cannot serve /v1/completions" for a server
    that serves a run's smaller requests, D3). Without a run's max_tokens, says how to pass one."""
    hint = "" if p.max_tokens is not None else " (a run probes with at most its --max-tokens)"
    return f"{p.where} refused the conformance probe's request of {n} tokens (max_tokens={n}): {err}{hint}"


async def _probe_logprobs(p: _Probe, texts: Sequence[str]) -> None:
    """The largest `logprobs` served, read from a generation that holds tokens: an empty one (a
    model that ends at once after the probe's sentence) shows nothing about logprob support."""
    refusals: dict[int, str] = {}  # k -> the server's words ("": answered without a block)
    for k in LOGPROBS_TRIES:
        view, why = await _generation_with_logprobs(p, texts, k)
        if view is None:
            refusals[k] = why
            continue
        if not len(view):
            _logprobs_unverified(p, k)
            return
        cap = min(k, view.top_k)  # a server may accept k and silently send fewer
        if cap:
            p.fields |= {"logprobs_cap": cap, "top_logprobs_keys": view.top_keys}
            status, warning = (OK, None) if cap >= 20 else (WARN, "logprobs_capped")
            p.check("logprobs cap", status, f"max accepted: {cap}", warning, cap=cap)
            return
    p.fields["logprobs_cap"] = 0
    p.check("logprobs cap", FAIL, _no_logprobs_detail(refusals), "no_logprobs")


def _no_logprobs_detail(refusals: Mapping[int, str]) -> str:
    """Why no `logprobs` was served: refused (the server's words) or ignored (HTTP 200 without a
    logprobs block). Both used to read "no logprobs request accepted", untrue for a server that
    accepted every request and dropped the parameter (D8)."""
    if not any(refusals.values()):
        return "logprobs ignored: every request answered without a logprobs block"
    if all(refusals.values()):
        return f"every logprobs request refused: {refusals[min(refusals)]}"
    return "; ".join(f"logprobs={k} {f'refused: {why}' if why else 'ignored'}" for k, why in refusals.items())


async def _generation_with_logprobs(p: _Probe, texts: Sequence[str], k: int) -> tuple[TokensView | None, str]:
    """(the first greedy generation with `logprobs=k` of one of `texts` that holds a token, "") (its
    text kept as `_gen_text` for the probes that need generated tokens); an empty view where every
    text generated nothing; (None, why) where the first text's request is refused (why: the
    server's words) or its `logprobs` ignored (no block; why: ""): `k` is not served. Every block
    sent must be its text's tokens."""
    empty: TokensView | None = None
    n = p.tokens(ECHO_GEN_TOKENS)
    for text in texts:
        req = {"prompt": text, "max_tokens": n, "temperature": 0, "logprobs": k}
        resp, err = await p.ask(req)
        if resp is None or resp["choices"][0].get("logprobs") is None:  # refused, or the parameter ignored
            if empty is None:
                return None, err
            continue
        view = p.view(resp)
        # a block was sent: it must be the text's tokens (an empty one is not a polite "no")
        _check_logprobs_are_the_text(p, view, resp["choices"][0].get("finish_reason"), n)
        not_top1 = greedy_not_top1(view)
        if not_top1:  # said, not refused: a penalty picks alike on both sides (greedy_not_top1)
            p.check("greedy = top-1", WARN, not_top1, "not_top1", what=not_top1)
        if len(view):
            p.fields["_gen_text"] = text
            return view, ""
        empty = view
    return empty, ""


def _logprobs_unverified(p: _Probe, k: int) -> None:
    """`logprobs=k` accepted with a block, but no text generated a token to show one: neither "no
    logprobs" (teacher forcing and TIE/DRIFT dropped for a server that serves them) nor a cap.
    The run asks for them; whatever its answers lack is judged there, prompt by prompt."""
    p.fields["logprobs_cap"] = k
    detail = f"logprobs={k} accepted; no probe text generated a token to show them"
    p.check("logprobs cap", WARN, detail, "logprobs_unverified", k=k)


async def _probe_token_ids(p: _Probe, text: str) -> None:
    f = p.fields
    f["token_id_strings"] = False
    if f["logprobs_cap"] >= 1:
        req = {
            "prompt": f.get("_gen_text", text),
            "max_tokens": p.tokens(2),
            "temperature": 0,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        resp, err = await p.ask(req)
        view = p.view(resp) if resp else None
        if view is not None and len(view) and view.has_ids:
            f |= {
                "token_id_strings": True,
                "top_logprobs_keys": view.top_keys,
                "_gen_ids": list(view.token_ids or ()),
            }
            p.check("token ids in responses", OK, "tokens as token_id:N")
        else:
            ignored = "flag ignored" if view is None or len(view) else "unverified: no token generated"
            p.check("token ids in responses", WARN, err or ignored)
    else:
        p.check("token ids in responses", NA, "needs logprobs")
    ids, err = await _tokenize(p.client, text)
    f |= {"tokenize": ids is not None, "_ids0": ids}
    p.check("/tokenize", WARN if ids is None else OK, err if ids is None else f"{len(ids)} tokens")
    if not f["token_id_strings"] and ids is None:
        p.warnings.append(WARNINGS["no_token_ids"])
    known = ids or f.get("_gen_ids")
    if not known:
        f["int_prompts"] = None
        p.check("token-id prompts", NA, "no token ids known to send")
        return
    resp, err = await p.ask({"prompt": list(known), "max_tokens": 1, "temperature": 0})
    f["int_prompts"] = resp is not None
    p.check("token-id prompts", OK if resp else WARN, err or "accepted", None if resp else "no_int_prompts")


async def _probe_echo(p: _Probe, text: str) -> None:
    k = min(p.fields["logprobs_cap"], 5)
    req: dict[str, Any] = {"prompt": text, "max_tokens": 0, "echo": True, "temperature": 0}
    resp, err = await p.ask(req | ({"logprobs": k} if k else {}))
    if resp is None and k:
        plain, _ = await p.ask(req)
        if plain is not None and _not_an_echo(plain, text) is None:
            p.fields |= {"echo": True, "echo_logprobs": False}
            p.check("echo", WARN, f"echo works, echo+logprobs fails ({err})", "echo_logprobs_fail", err=err)
            return
    why = err if resp is None else _not_an_echo(resp, text)
    if why is not None:
        p.fields["echo"] = False
        p.check("echo", FAIL, why, "no_echo")
        return
    p.fields["echo"] = True
    choice = resp["choices"][0]
    echoed = choice.get("text")
    view = p.view(resp)
    if isinstance(echoed, str) and echoed.startswith(text) and len(echoed) > len(text):
        # a server that reads max_tokens=0 as "no limit": not a tokenizer difference, a quirk
        p.fields |= {"_echo_continues": True, "echo_aligned": False}
        extra = len(echoed) - len(text)
        p.check("echo", WARN, f"max_tokens=0 generated {extra} more chars (no limit)", "echo_continues")
        return
    if not k:
        p.check("echo", OK, "echo works (logprobs not available)")
        return
    _check_no_nan(p, view, "echo")  # first: alternatives listed with null values are NaN, not a gap
    if all(lp is None for lp in view.logprobs):
        p.fields["echo_logprobs"] = False
        p.check(
            "echo", WARN, f"echo returns {len(view)} tokens, none with a logprob", "echo_no_prompt_logprobs"
        )
        return
    _check_echo_nulls(p, view)
    joined = "".join(view.tokens)
    if not view.has_ids and len(joined) < len(text) and text.startswith(joined):  # a part, not a shift
        raise ConformanceError(
            f"{p.where}: echoed text and logprobs disagree: the {len(view)} logprob tokens cover "
            f"{len(joined)} of the {len(text)} characters of the prompt"
        )
    p.fields["echo_logprobs"] = True
    p.check("echo", OK, f"max_tokens=0 echo, {len(view)} prompt tokens with logprobs")
    problems = _alignment_problems(view, text, choice.get("text"), p.fields.get("_ids0"))
    p.fields["echo_aligned"] = not problems
    if problems:
        p.check("echo aligned", WARN, "; ".join(problems), "echo_misaligned")
    else:
        p.check("echo aligned", OK, "tokens re-form the prompt")


def _not_an_echo(resp: dict, text: str) -> str | None:
    """Why an answer to `echo` is no echo of `text` (None: it is one): its text does not hold the
    prompt, a server that ignores the parameter (D2: with no logprobs to check, any 200 answer was
    "echo works", and teacher forcing was tried on it). Text before the prompt (a BOS written out)
    is still an echo, which the alignment check names; an answer without text is the logprobs
    view's to judge."""
    echoed = resp["choices"][0].get("text")
    if not isinstance(echoed, str) or text in echoed:
        return None
    return f"echo ignored: the answer {short(echoed, 40)!r} does not hold the prompt"


def _check_logprobs_are_the_text(p: _Probe, view: TokensView, finish_reason: Any, max_tokens: int) -> None:
    """Logprobs that are not the generated text's tokens, or NaN, stop the run (exit 2): judging
    what a server chose to show, or switching teacher forcing off for it, is a false PASS."""
    problem = coverage_problem(view, max_tokens=max_tokens, finish_reason=finish_reason)
    if problem is not None:
        raise ConformanceError(f"{p.where}: text and logprobs disagree: {problem}")
    _check_no_nan(p, view, "generation")


def _check_no_nan(p: _Probe, view: TokensView, what: str) -> None:
    """NaN, a logprob above 0, top probabilities over 1: nothing such a server serves can be judged."""
    problem = impossible_logprobs(view, greedy=what == "generation")
    if problem:
        raise ConformanceError(f"{p.where}: {problem} in its {what}: nothing it serves can be judged")


def _echo_null_positions(view: TokensView) -> list[int]:
    """Positions after the first whose logprob is null, in an echo that gives logprobs at all: only
    the first token has nothing to condition on, and orjson / pydantic v2 write NaN as null."""
    lps = view.logprobs
    if all(lp is None for lp in lps):
        return []
    return [i for i, lp in enumerate(lps) if i and lp is None]


def _check_echo_nulls(p: _Probe, view: TokensView) -> None:
    """A null echoed logprob is NaN (exit 2), not a misalignment: switching teacher forcing off
    for it judged the server on token match alone, a false PASS."""
    nulls = _echo_null_positions(view)
    if nulls:
        problem = f"null logprobs at positions {nulls[:8]} (NaN written as null?)"
        raise ConformanceError(f"{p.where}: {problem} in its echo: nothing it serves can be judged")


def _check_echo_logprobs(p: _Probe, view: TokensView) -> None:
    """An echo's numbers must be log-probabilities: no NaN, nothing impossible, no null past the first."""
    _check_no_nan(p, view, "echo")
    _check_echo_nulls(p, view)


def _alignment_problems(view: TokensView, text: str, echoed_text: Any, ids: list[int] | None) -> list[str]:
    problems = []
    tokens = list(view.tokens)
    # a BOS the tokenizer adds is echoed as a token of its own (vLLM): allow leading specials
    while "".join(tokens) != text and tokens and tokens[0].startswith("<") and tokens[0].endswith(">"):
        tokens.pop(0)
    if "".join(tokens) != text:
        problems.append(f"tokens join to {short(''.join(tokens), 40)!r}, not the prompt")
    if view.logprobs and view.logprobs[0] is not None:
        problems.append("first echoed logprob is not null")
    if ids is not None and len(ids) != len(view):
        problems.append(f"{len(view)} echoed tokens vs {len(ids)} from /tokenize")
    if isinstance(echoed_text, str) and not echoed_text.startswith(text):
        problems.append("echoed text does not start with the prompt")
    return problems


def _prompt_part(view: TokensView, text: str, count: int | None = None) -> TokensView | None:
    """The echoed positions that cover `text` (the rest was generated), or None when they cannot be
    told apart. Cut by offsets only where `trusted_offsets` vouches for them: a server counting
    them from the prompt's start on top of the echo (OpenAI's legacy convention), or by
    "token_id:N" labels (vLLM), was cut at a made-up place, and the prompt's tokenization came out
    empty or short for tokenizer_check to compare. Else by token strings that spell the text, else
    by `count`, the server's own count of the prompt's tokens (usage.prompt_tokens, /tokenize).
    An echo whose first position has a logprob holds no prompt positions to cut (its first token
    would have nothing to condition on)."""
    if not len(view) or view.positions[0].logprob is not None:
        return None
    for n in (_cut_by_offsets(view, text), _cut_by_strings(view, text)):
        if n is not None:
            return view[:n]
    return view[:count] if count is not None and 0 < count < len(view) else None


def _cut_by_offsets(view: TokensView, text: str) -> int | None:
    """How many positions start before the prompt's end, where trusted offsets place a token's
    start right at it (a token over the boundary, or none after it, places nothing)."""
    offs = trusted_offsets(view)
    if not offs:
        return None
    n = sum(1 for o in offs if o < len(text))
    return n if n < len(offs) and offs[n] == len(text) else None


def _cut_by_strings(view: TokensView, text: str) -> int | None:
    """How many token strings join to exactly `text`; None for "token_id:N" labels (they say
    nothing about the text) and for strings that are not it (byte pieces, a "<s>" whose length
    matched the prompt's first characters cut one token short)."""
    if view.has_ids:
        return None
    joined = ""
    for i, tok in enumerate(view.tokens):
        if len(joined) >= len(text):
            return i if joined == text else None
        joined += tok
    return len(view) if joined == text else None


def _median_gap(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Median |a_i - b_i| over positions where both are known; None when there are none."""
    gaps = [abs(x - y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return statistics.median(gaps) if gaps else None


async def _probe_echo_consistency(p: _Probe, probe_text0: str) -> None:
    """Generate k tokens, echo prompt + them with max_tokens=0, compare the k logprobs. The prompt
    is the text _probe_logprobs saw generate (the first probe text unless that one generated
    nothing)."""
    f, name = p.fields, "echo = generation logprobs"
    if not (f.get("echo_logprobs") and f.get("echo_aligned")):
        p.check(name, NA, "needs echo with aligned prompt logprobs")
        return
    as_ids = {"return_tokens_as_token_ids": True} if f["token_id_strings"] else {}
    echo_req = {"max_tokens": 0, "echo": True, "logprobs": 1} | as_ids
    text = f.get("_gen_text", probe_text0)  # a text that generates tokens (_probe_logprobs)
    gen, err = await p.ask(
        {"prompt": text, "max_tokens": p.tokens(ECHO_GEN_TOKENS), "temperature": 0, "logprobs": 1} | as_ids
    )
    if gen is None:
        p.check(name, WARN, err, "echo_unverified", why="generation with logprobs failed")
        return
    g = p.view(gen)
    _check_no_nan(p, g, "generation")
    if not len(g):
        detail = "no probe text generated a token to echo"
        p.check(name, WARN, detail, "echo_unverified", why="nothing generated to compare")
        return
    prompt_ids = f.get("_ids0") if text == probe_text0 else await _ids_if_tokenized(p, text)
    if prompt_ids is None and f["token_id_strings"]:
        echo0, _ = await p.ask({"prompt": text} | echo_req)
        prompt_ids = list(p.view(echo0).token_ids or ()) if echo0 else None
    if f.get("int_prompts") and prompt_ids and g.has_ids:
        prompt: Any = list(prompt_ids) + list(g.token_ids or ())
        how = "token ids"
    else:
        prompt, how = text + gen["choices"][0]["text"], "text"
    echo, err = await p.ask({"prompt": prompt} | echo_req)
    if echo is None:
        p.check(name, WARN, err, "echo_unverified", why="echo of the continuation failed")
        return
    whole = p.view(echo)
    _check_echo_logprobs(p, whole)
    e = whole[-len(g) :]
    same = e.token_ids == g.token_ids if (e.has_ids and g.has_ids) else e.tokens == g.tokens
    if not same:
        detail = f"echoed {how} does not re-form the generated tokens"
        p.check(name, WARN, detail, "echo_unverified", why="the continuation re-tokenises differently")
        return
    el, gl = list(e.logprobs), list(g.logprobs)
    diffs = [abs(a - b) if a is not None and b is not None else math.inf for a, b in zip(el, gl, strict=True)]
    diff = max(diffs)
    typical = statistics.median(diffs)
    # Aligned, not equal: a misaligned echo (logprobs reported one position late / early) lines up
    # better with the generation shifted by one than unshifted; a correct quantized server only
    # adds noise (dynamic fp8 activation rounding makes prefill and decode differ: median 0.064
    # nats for a correct fp8-block golden on CPU fp32, 0.36 max on an H100). So the unshifted
    # comparison must beat both shifted ones, and its median must stay under a generous bound.
    shifted = [m for m in (_median_gap(el[1:], gl[:-1]), _median_gap(el[:-1], gl[1:])) if m is not None]
    ok = typical <= ECHO_LOGPROB_TOL and diff <= ECHO_LOGPROB_MAX and all(typical < x for x in shifted)
    f |= {"echo_consistent": ok, "echo_max_abs_diff": diff}
    best_shift = f", shifted by one {min(shifted):.3g}" if shifted else ""
    detail = f"median |diff| {typical:.3g}{best_shift}, max {diff:.3g} over {len(g)} tokens (via {how})"
    p.check(
        name, OK if ok else FAIL, detail, None if ok else "echo_inconsistent", diff=diff, tol=ECHO_LOGPROB_TOL
    )


async def _ids_if_tokenized(p: _Probe, text: str) -> list[int] | None:
    """`text`'s ids from the server's /tokenize, where the probe found one (no request otherwise)."""
    return (await _tokenize(p.client, text))[0] if p.fields["tokenize"] else None


async def _probe_tokenizations(
    p: _Probe, texts: Sequence[str], hint: Callable[[str], Sequence[int]] | None
) -> None:
    f, out, failed = p.fields, [], []
    # a server whose answers carry no usage (the first generation's, an echo's) is asked no counts
    asking = None not in f.get("_counts", {}).values()
    for text in texts:
        ids, source, strings, count = None, "tokenize", None, None
        if f["tokenize"]:
            ids, err = await _tokenize(p.client, text)
            failed += [err] if ids is None else []
        # an echo that continues past the prompt is cut at its end (the warning says so)
        if f.get("echo_logprobs") or (f.get("_echo_continues") and f["logprobs_cap"]):
            as_ids = {"return_tokens_as_token_ids": True} if f["token_id_strings"] and ids is None else {}
            resp, err = await p.ask({"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1} | as_ids)
            count = prompt_tokens(resp)
            asking = asking and (resp is None or count is not None)
            view = p.view(resp) if resp else None
            if view is not None and f.get("_echo_continues"):
                known = count if count is not None else None if ids is None else len(ids)
                view = _prompt_part(view, text, known)
            if view is None:
                failed.append(err or "echo went past the prompt and could not be cut at its end")
            elif as_ids and view.has_ids:
                ids, source = list(view.token_ids or ()), "echo"
            elif not view.has_ids:
                strings = tuple(view.tokens)
        if count is None:
            count = f.get("_counts", {}).get(text)
        if count is None and asking:
            count = await _prompt_count(p, text)
            asking = count is not None
        if ids is None and hint is not None:
            ids, source = list(hint(text)), "hint"
        tokens = None if ids is None else tuple(ids)
        out.append(ProbeTokens(text, tokens, strings, "none" if ids is None else source, count))
    f["tokenizations"] = tuple(out)
    n_ids = sum(t.ids is not None for t in out)
    n_str = sum(t.strings is not None for t in out)
    n_cnt = sum(t.prompt_tokens is not None for t in out)
    detail = f"{n_ids} as ids, {n_str} as strings, {n_cnt} counted of {len(out)}" + (
        f"; {len(failed)} failed: {failed[0]}" if failed else ""
    )
    if not (n_ids or n_str):
        p.check("probe tokenizations", WARN, detail, "no_tokenizations")
    else:
        p.check(
            "probe tokenizations",
            WARN if failed else OK,
            detail,
            "tokenizations_failed" if failed else None,
            n=len(failed),
        )


async def _prompt_count(p: _Probe, text: str) -> int | None:
    """usage.prompt_tokens of `text` from the cheapest completion there is (max_tokens 1).

    Asked only where no request the probe makes anyway (the echo, the first generation) gave the
    count: a partner with neither token ids nor echo can be compared by counts alone, and the
    probe of one server cannot know its partner, so every text needs its count. A server with echo
    (vLLM, SGLang, the shim) pays nothing; one without pays a request of one token per text."""
    resp, _ = await p.ask({"prompt": text, "max_tokens": 1, "temperature": 0})
    return prompt_tokens(resp)


# "not now" and a gateway that lost its server; a 500 stays "no debug protocol": some servers
# (transformers serve) answer a route they lack with one
_NOT_NOW = (408, 429, 502, 503, 504)


async def probe_debug(
    client: CompletionClient,
) -> tuple[dict[str, Any], Mapping[str, Any], RequestRejected | ServerError | None]:
    """GET /debug/config for both probes (completions and chat): (Capabilities fields, the config
    ({} on an error), the error or None). An error that is no answer at all (no status: a timeout, a lost
    connection; or a "not now" status) sets `debug_unanswered`; an answer that the route is missing
    (404, 500, 501) or a body that is no config does not."""
    try:  # one retry: some servers (transformers serve) drop the keep-alive connection after a 500
        cfg = await client.debug_config(retries=1)
    except (RequestRejected, ServerError) as e:
        silent = e.status_code is None and not isinstance(e, UnreadableBody | ResponseTooLarge)
        unanswered = e.status_code in _NOT_NOW if e.status_code is not None else silent
        return {"debug": False, "vocab_size": None, "debug_unanswered": unanswered}, {}, e
    vocab = cfg.get("vocab_size")
    return {"debug": True, "vocab_size": vocab if isinstance(vocab, int) else None}, cfg, None


async def _probe_debug(p: _Probe) -> None:
    fields, cfg, err = await probe_debug(p.client)
    p.fields |= fields
    if err is not None:
        p.check("debug protocol", WARN, _why(err), "no_debug")
        return
    detail = ", ".join(f"{k}={cfg[k]}" for k in ("model", "dtype", "device") if k in cfg)
    p.check("debug protocol", OK, detail or "GET /debug/config 200")


async def _tokenize(client: CompletionClient, text: str) -> tuple[list[int] | None, str]:
    err = "no token list"
    for body in ({"prompt": text}, {"content": text}):  # vLLM / SGLang, then llama.cpp
        try:
            data = await client.post_json("/tokenize", body, retries=0)
        except (RequestRejected, ServerError) as e:
            err = _why(e)
            continue
        toks = data.get("tokens") if isinstance(data, dict) else None
        if isinstance(toks, list) and all(isinstance(t, int) for t in toks):
            return toks, ""
    return None, err


def _why(e: RequestRejected | ServerError) -> str:
    """The server's own words ("HTTP 400: echo is not supported"), without the client's prefix."""
    return short(e.reason)


def first_diff(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Index of the first differing element; the shorter length when one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
