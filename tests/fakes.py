"""In-process fake OpenAI completions servers that behave like real engines, quirks included.

A fake is a deterministic toy engine: a small vocabulary (4 special tokens, printable ASCII, a few
word pieces, 128 byte-fallback tokens), a greedy longest-match tokenizer, and a "model" whose
logits at each position are a seeded function of the last two token ids. It serves
`/v1/completions` (string / list / token-id prompts, `max_tokens` 0 with echo, `logprobs` top-k,
`echo`, `return_tokens_as_token_ids`, `stop`), `/tokenize`, `/detokenize`, `/v1/models`,
`/health`, `/version` and, with `debug=True`, `GET /debug/config`. Decoding is always greedy
(`temperature`, `top_p`, `seed` are accepted and ignored); `stream` and `n > 1` are refused (400).

Use it through httpx, no sockets:

    server = FakeServer(FakeBehaviour(max_logprobs=5))
    async with server.client(name="ref") as client:        # a difftest CompletionClient
        await client.completions({"prompt": "1+2=", "max_tokens": 4})
    httpx.AsyncClient(transport=server.transport(), base_url=FAKE_URL)   # any other httpx user

`make_fake_app(behaviour)` gives the bare FastAPI app (`app.state.fake` is its `FakeServer`), e.g.
to serve it with uvicorn. `QUIRKS` names behaviours that imitate real engines' gaps; the
`perturb_noise` / `flip_every` knobs make a *wrong but deterministic* target for differ tests.
`FakeServer.expected_greedy(...)` / `.expected_logprobs(...)` give the numbers a test can expect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from difftest.client import CompletionClient

FAKE_URL = "http://fake.invalid"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>")
BOS = 3
_WORDS = (" the", "the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", "ing", "er",
          " a", " is", " of", "  ", "    ", "\n\n", "def", " return", "1+", "2+")  # fmt: skip


@dataclass(frozen=True)
class FakeBehaviour:
    """Every switch defaults to a well-behaved vLLM-like server."""

    seed: int = 0
    model: str = "fake-model"
    tokenizer: str = "default"  # "default" | "alt" (other pieces, other ids) | "bos" (default + BOS)
    max_logprobs: int = 20  # `logprobs` above this -> 400 (vLLM's --max-logprobs); 0 = no logprobs at all
    max_tokens_cap: int | None = None  # `max_tokens` above this -> 400 (the shim's --max-tokens-cap)
    echo: bool = True  # False: `echo` -> 400
    echo_prompt_logprobs: bool = True  # False: echo returns logprobs for generated tokens only
    echo_logprobs_500: bool = False  # echo together with logprobs -> 500
    echo_logprob_shift: int = 0  # >0: echoed prompt logprobs are reported that many positions late
    token_ids: bool = True  # honour return_tokens_as_token_ids (else top_logprobs keyed by strings only)
    tokenize: bool = True  # serve /tokenize and /detokenize
    int_prompts: bool = True  # accept prompts as token-id lists
    nondeterministic: bool = False  # every other request's first greedy token is the runner-up
    api_key: str | None = None  # required as Bearer when set (401 otherwise)
    delay_s: float = 0.0  # sleep before answering each completions request
    die_after: int | None = None  # after this many completions requests the server is dead ...
    die_mode: str = "503"  # ... answering "503" (or "500") to everything, "connect" (httpx.ConnectError)
    # or "sigkill" (the process SIGKILLs itself: only for a fake served in a subprocess)
    fault: str | None = None  # a broken completions route, one of FAULTS (the differ's fault tests)
    fault_after: int = 0  # completions requests answered well before the fault starts
    fault_match: str | None = None  # only requests whose prompt text contains this (None: all)
    fault_echo_only: bool = False  # only echo requests (teacher forcing, conformance's echo checks)
    perturb_noise: float = 0.0  # std of a deterministic per-context noise added to the logits
    flip_every: int = 0  # after every context of a length divisible by k the runner-up is the argmax
    debug: bool = False  # serve GET /debug/config
    version: str | None = "fake-0.1"  # GET /version (None -> 404)
    models_route: str = "ok"  # GET /v1/models: "ok" | "404" | "list" (a bare JSON list, no 'data')
    logprobs_shape: str = "vllm"  # "llamacpp": llama-server's {"content": [{id, token, bytes, ...}]}
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULTS)}")

    def replace(self, **changes: Any) -> FakeBehaviour:
        return dataclasses.replace(self, **changes)


# Broken answers of /v1/completions (`FakeBehaviour.fault`): what servers have really sent.
FAULTS = {
    "http-500": "HTTP 500 with an OpenAI error body",
    "invalid-json": "HTTP 200 whose body is not JSON",
    "no-choices": "HTTP 200 JSON without a 'choices' list",
    "half-logprobs": "logprobs cover only the first half of the generated text",
    "no-logprob-tokens": "a logprobs block with no tokens although the text is not empty",
    "short-logprobs": "fewer token_logprobs than tokens",
    "nan-logprobs": "NaN for every logprob (the JSON literal NaN)",
    "null-logprobs": "null for every generated logprob and alternative (NaN through orjson / pydantic v2)",
    "probability-logprobs": "probabilities in the logprob slots (exp of every value)",
    "error-200": "HTTP 200 whose body is an OpenAI error object",
    "garbled-text": "the text's first character replaced by U+FFFD, token ids as generated (a detokenizer bug)",
    "truncated-sse": "an SSE stream cut mid-event, without data: [DONE]",
    "chosen-logprob-shift": "every chosen token's logprob 1 nat below its own top_logprobs entry (two paths)",
    "two-choices": "every answer holds its choice twice (index 0 and 1): a server ignoring n",
    "not-argmax": "every chosen token set below its position's lowest alternative, in both slots (sampling)",
    "reset": "the connection reset by the peer (in-process transport only; live: see live_fakes)",
    "zero-chosen": "every chosen token's logprob -Infinity and dropped from its top list (probability 0)",
}

# Behaviours that imitate gaps of real engines (issue 5's list), for parametrized tests.
QUIRKS: dict[str, FakeBehaviour] = {
    "good": FakeBehaviour(),
    "no_echo": FakeBehaviour(echo=False),
    "echo_no_prompt_logprobs": FakeBehaviour(echo_prompt_logprobs=False),
    "string_keyed_no_ids": FakeBehaviour(token_ids=False, tokenize=False),
    "logprobs_cap_5": FakeBehaviour(max_logprobs=5),
    "no_logprobs": FakeBehaviour(max_logprobs=0),
    "echo_logprobs_500": FakeBehaviour(echo_logprobs_500=True),
    "misaligned_echo": FakeBehaviour(echo_logprob_shift=1),
    "nondeterministic": FakeBehaviour(nondeterministic=True),
    "no_int_prompts": FakeBehaviour(int_prompts=False),
    "debug": FakeBehaviour(debug=True),
}


class FakeTokenizer:
    """Greedy longest match over specials, ASCII characters and word pieces; UTF-8 byte fallback."""

    def __init__(self, kind: str = "default") -> None:
        if kind not in ("default", "alt", "bos"):
            raise ValueError(f"unknown fake tokenizer {kind!r}")
        chars = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
        pieces = list(_WORDS) if kind != "alt" else [" qu", "ick", " fo", "x"]
        table = list(SPECIALS) + (chars + pieces if kind != "alt" else pieces + chars)
        self.kind = kind
        self.add_bos = kind == "bos"
        self.strings = table + [f"<0x{b:02X}>" for b in range(128, 256)]
        self._byte0 = len(table)
        self._ids = {s: i for i, s in enumerate(table)}
        self._maxlen = max(len(s) for s in table)

    @property
    def vocab_size(self) -> int:
        return len(self.strings)

    def is_generatable(self, tid: int) -> bool:
        return len(SPECIALS) <= tid < self._byte0

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if self.add_bos and add_special_tokens else []
        i = 0
        while i < len(text):
            for n in range(min(self._maxlen, len(text) - i), 0, -1):
                tid = self._ids.get(text[i : i + n])
                if tid is not None:
                    ids.append(tid)
                    i += n
                    break
            else:  # not in the table: UTF-8 bytes (all >= 128 since ASCII is in the table)
                ids.extend(self._byte0 + b - 128 for b in text[i].encode())
                i += 1
        return ids

    def decode(self, ids: Sequence[int], *, skip_bos: bool = True) -> str:
        out = bytearray()
        for tid in ids:
            if tid >= self._byte0:
                out.append(tid - self._byte0 + 128)
            elif not (skip_bos and tid == BOS):
                out += self.strings[tid].encode()
        return out.decode("utf-8", "replace")


class FakeModel:
    """Logits = seeded noise of (seed, last two ids); specials and bytes pushed far down."""

    def __init__(self, tokenizer: FakeTokenizer, seed: int, perturb_noise: float = 0.0) -> None:
        self.tok = tokenizer
        self.seed = seed
        self.noise = perturb_noise
        self._penalty = np.array(
            [0.0 if tokenizer.is_generatable(i) else -20.0 for i in range(tokenizer.vocab_size)]
        )
        self._cached = lru_cache(maxsize=65536)(self._logprobs)

    def logprobs(self, context: Sequence[int]) -> np.ndarray:  # [vocab] float64, log-softmax
        a = context[-1] if context else -1
        b = context[-2] if len(context) > 1 else -1
        return self._cached(a, b)

    def _logprobs(self, a: int, b: int) -> np.ndarray:
        z = np.random.default_rng([self.seed, a + 2, b + 2]).standard_normal(self.tok.vocab_size) * 2.0
        if self.noise:
            z = (
                z
                + np.random.default_rng([self.seed + 7919, a + 2, b + 2]).standard_normal(z.size) * self.noise
            )
        z = z + self._penalty
        z = z - z.max()
        return z - np.log(np.exp(z).sum())


class _Reject(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class FakeServer:
    def __init__(self, behaviour: FakeBehaviour | None = None, **changes: Any) -> None:
        self.behaviour = (behaviour or FakeBehaviour()).replace(**changes)
        self.tokenizer = FakeTokenizer(self.behaviour.tokenizer)
        self.model = FakeModel(self.tokenizer, self.behaviour.seed, self.behaviour.perturb_noise)
        self.completions_served = 0  # completions requests received (counts toward die_after)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.app = _build_app(self)

    @property
    def dead(self) -> bool:
        n = self.behaviour.die_after
        return n is not None and self.completions_served >= n

    def faulty(self, req: Any) -> bool:
        """Whether this completions request (already counted) gets the behaviour's fault."""
        b = self.behaviour
        if b.fault is None or self.completions_served <= b.fault_after:
            return False
        if b.fault_echo_only and not (isinstance(req, dict) and req.get("echo")):
            return False
        if b.fault_match is None:
            return True
        prompt = req.get("prompt") if isinstance(req, dict) else None
        try:
            texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in _prompts(prompt)]
        except (_Reject, TypeError, IndexError):
            return False
        return any(b.fault_match in t for t in texts)

    def transport(self) -> httpx.AsyncBaseTransport:
        return _FakeTransport(self)

    def client(self, name: str = "fake", **kwargs: Any) -> CompletionClient:
        """A CompletionClient wired to this fake (fast retries unless told otherwise)."""
        kwargs.setdefault("backoff_base_s", 0.001)
        kwargs.setdefault("backoff_max_s", 0.01)
        return CompletionClient(FAKE_URL, name=name, transport=self.transport(), **kwargs)

    # ---------------------------------------------------------------- expectations for tests
    def expected_greedy(
        self, prompt: str | Sequence[int], max_tokens: int, *, request_index: int = 0
    ) -> list[int]:
        return self._generate(self._ids(prompt), max_tokens, request_index)

    def expected_logprobs(self, prompt: str | Sequence[int]) -> list[float | None]:
        """True logprob of each prompt token given the tokens before it (None for the first)."""
        ids = self._ids(prompt)
        return [None] + [float(self._logprobs(ids[:i])[ids[i]]) for i in range(1, len(ids))]

    # ---------------------------------------------------------------- engine
    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _generate(self, ids: list[int], max_tokens: int, request_index: int) -> list[int]:
        b, ctx, out = self.behaviour, list(ids), []
        for j in range(max_tokens):
            lp = self._logprobs(ctx)
            first, second = (int(t) for t in np.argsort(-lp, kind="stable")[:2])
            flip = b.nondeterministic and j == 0 and request_index % 2
            tok = second if flip else first
            out.append(tok)
            ctx.append(tok)
        return out

    def _position(
        self, ctx: list[int], tok: int, k: int | None, as_ids: bool, *, generated: bool = False
    ) -> tuple[float, dict | None]:
        lp = self._reported(ctx, tok, generated)
        if k is None:
            return float(lp[tok]), None
        top = [int(t) for t in np.argsort(-lp, kind="stable")[:k]]
        if tok not in top:  # vLLM also lists the chosen token
            top.append(tok)
        return float(lp[tok]), {self._tok_str(t, as_ids): float(lp[t]) for t in top}

    def _logprobs(self, ctx: list[int]) -> np.ndarray:
        """The model's logprobs after a context; `flip_every` k swaps the top two after every
        context whose length is a multiple of k: a wrong model, the same on every path (generation,
        echo), as a kernel bug is."""
        lp = self.model.logprobs(ctx)
        k = self.behaviour.flip_every
        if k and len(ctx) % k == 0:
            first, second = (int(t) for t in np.argsort(-lp, kind="stable")[:2])
            lp = lp.copy()
            lp[[first, second]] = lp[[second, first]]
        return lp

    def _reported(self, ctx: list[int], tok: int, generated: bool) -> np.ndarray:
        """The logprobs shown at a position. A greedy token that is not the argmax (the
        nondeterministic knob's runner-up) ranks first there, as the logits of a real server that
        picked it would (a greedy token below its own top-1 is what a sampling server sends, which
        the probe names)."""
        lp = self._logprobs(ctx)
        best = int(np.argmax(lp))
        if generated and tok != best:
            lp = lp.copy()
            lp[[tok, best]] = lp[[best, tok]]
        return lp

    def _tok_str(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tokenizer.strings[tid]

    def _choice(self, index: int, prompt: str | list[int], req: dict) -> dict:
        b = self.behaviour
        ids = self._ids(prompt)
        echo, k = bool(req.get("echo")), req.get("logprobs")
        as_ids = bool(req.get("return_tokens_as_token_ids")) and b.token_ids
        gen = self._generate(ids, int(req.get("max_tokens", 16)), self.completions_served - 1)
        gen_text, finish = self.tokenizer.decode(gen), "length"
        for stop in _stops(req.get("stop")):
            if stop in gen_text:
                gen_text, finish = gen_text[: gen_text.index(stop)], "stop"
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        text = (prompt_text + gen_text) if echo else gen_text
        block = None
        if k is not None:
            toks, lps, tops, offs = [], [], [], []
            shown = (ids if echo and b.echo_prompt_logprobs else []) + gen
            base = len(ids) if not (echo and b.echo_prompt_logprobs) else 0
            for i, tok in enumerate(shown):
                full_i = base + i
                ctx = (ids + gen)[:full_i]
                lp, top = (
                    self._position(ctx, tok, k, as_ids, generated=full_i >= len(ids))
                    if full_i > 0
                    else (None, None)
                )
                toks.append(self._tok_str(tok, as_ids))
                lps.append(lp)
                tops.append(top)
                prefix = (
                    self.tokenizer.decode((ids + gen)[:full_i]) if echo else self.tokenizer.decode(gen[:i])
                )
                offs.append(len(prefix.replace("\ufffd", "")))
            if echo and b.echo_prompt_logprobs and b.echo_logprob_shift:  # the off-by-k echo bug:
                s, n = b.echo_logprob_shift, len(ids)  # position i reports position i+s (last ones repeat)
                lps[1:n] = (lps[1 + s : n] + lps[n - s : n])[: n - 1]
                tops[1:n] = (tops[1 + s : n] + tops[n - s : n])[: n - 1]
            block = {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
            if b.logprobs_shape == "llamacpp":
                block = {"content": [self._content_entry(ids + gen[:i], t, k) for i, t in enumerate(gen)]}
        return {"index": index, "text": text, "logprobs": block, "finish_reason": finish}

    def _content_entry(self, ctx: list[int], tok: int, k: int) -> dict:
        """One generated token as llama-server writes it: id, UTF-8-valid token text, raw bytes."""
        lp = self._reported(ctx, tok, generated=True)

        def entry(tid: int) -> dict:
            raw = (
                self.tokenizer.decode([tid]).encode()
                if tid < self.tokenizer._byte0
                else bytes([tid - self.tokenizer._byte0 + 128])
            )
            text = raw.decode("utf-8", errors="ignore")
            return {"id": tid, "token": text, "bytes": list(raw), "logprob": float(lp[tid])}

        top = [int(t) for t in np.argsort(-lp, kind="stable")[:k]]
        return entry(tok) | {"top_logprobs": [entry(t) for t in top]}

    def completions(self, req: dict) -> dict:
        b = self.behaviour
        if not isinstance(req, dict):
            raise _Reject(400, "request body must be a JSON object")
        if req.get("model") not in (None, b.model):
            raise _Reject(404, f"The model `{req.get('model')}` does not exist.", "model")
        if req.get("stream"):
            raise _Reject(400, "stream is not supported by this fake", "stream")
        if req.get("n", 1) != 1 or req.get("best_of", 1) != 1:  # refused, never silently ignored
            raise _Reject(400, "n > 1 is not supported by this fake", "n")
        k = req.get("logprobs")
        if k is not None and (not isinstance(k, int) or k < 0 or k > b.max_logprobs or b.max_logprobs == 0):
            raise _Reject(400, f"logprobs must be between 0 and {b.max_logprobs}, got {k}", "logprobs")
        echo = bool(req.get("echo"))
        if echo and not b.echo:
            raise _Reject(400, "echo is not supported", "echo")
        mt = req.get("max_tokens", 16)
        if not isinstance(mt, int) or mt < 0 or (mt == 0 and not echo):
            raise _Reject(400, f"max_tokens must be >= 1 (0 only with echo), got {mt}", "max_tokens")
        if b.max_tokens_cap is not None and mt > b.max_tokens_cap:
            raise _Reject(400, f"max_tokens must be <= {b.max_tokens_cap}", "max_tokens")
        if echo and k is not None and b.echo_logprobs_500:
            raise _Reject(500, "Internal Server Error: index out of range in prompt_logprobs")
        prompts = _prompts(req.get("prompt"))
        for p in prompts:
            if not isinstance(p, str):
                if not b.int_prompts:
                    raise _Reject(400, "prompt must be a string or a list of strings", "prompt")
                if any(not isinstance(t, int) or not 0 <= t < self.tokenizer.vocab_size for t in p):
                    raise _Reject(400, "prompt token id out of range", "prompt")
            if len(self._ids(p)) + mt > b.max_model_len:
                raise _Reject(400, f"prompt + max_tokens exceeds max_model_len {b.max_model_len}", "prompt")
        choices = [self._choice(i, p, req) for i, p in enumerate(prompts)]
        n_prompt = sum(len(self._ids(p)) for p in prompts)
        n_gen = len(prompts) * mt
        return {
            "id": f"cmpl-fake-{self.completions_served}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": b.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_gen,
                "total_tokens": n_prompt + n_gen,
            },
        }


def make_fake_app(behaviour: FakeBehaviour | None = None) -> FastAPI:
    """The fake's FastAPI app; `app.state.fake` is the `FakeServer` behind it."""
    return FakeServer(behaviour).app


def rewritten_completions(
    app: FastAPI, server: FakeServer, rewrite: Callable[[dict[str, Any], dict[str, Any]], None]
) -> None:
    """Route /v1/completions on `app` to `server`, each answer passed through `rewrite(request,
    answer)` first (a server quirk: offsets counted otherwise, say). Mount `server.app` at "/"
    after any other route of the caller's: it answers the rest."""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await request.json()
        server.completions_served += 1
        try:
            out = server.completions(req)
        except _Reject as e:
            return _error(e.status, e.message, param=e.param)
        rewrite(req, out)
        return out


def _build_app(server: FakeServer) -> FastAPI:
    b = server.behaviour
    app = FastAPI()
    app.state.fake = server

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Any:
        server.requests.append((request.method, request.url.path))
        if server.dead:
            if b.die_mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if b.die_mode == "500":
                return _error(500, "Internal Server Error")
            return _error(503, "server is shutting down")
        authorised = request.headers.get("authorization") == f"Bearer {b.api_key}"
        if b.api_key and request.url.path != "/health" and not authorised:
            # servers do echo the credential they refused: the differ must scrub it from errors
            got = request.headers.get("authorization", "(none)")
            return _error(401, f"Invalid API key: {got}", code="invalid_api_key", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/version")
    async def version() -> Any:
        return {"version": b.version} if b.version else _error(404, "Not Found")

    @app.get("/v1/models")
    async def models() -> Any:
        card = {"id": b.model, "object": "model", "owned_by": "fake", "max_model_len": b.max_model_len}
        if b.models_route == "404":
            return _error(404, "Not Found")
        return [card] if b.models_route == "list" else {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        server.completions_served += 1
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        try:
            req = await request.json()
            answer = server.completions(req)
        except _Reject as e:
            return _error(e.status, e.message, param=e.param)
        except ValueError:
            return _error(400, "body is not valid JSON")
        return _broken(answer, b.fault) if server.faulty(req) and b.fault else answer

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        if not b.tokenize:
            return _error(404, "Not Found")
        body = await request.json()
        text = body.get("prompt", body.get("content"))
        if not isinstance(text, str):
            return _error(400, "prompt must be a string", param="prompt")
        ids = server.tokenizer.encode(text, add_special_tokens=body.get("add_special_tokens", True))
        return {"tokens": ids, "count": len(ids), "max_model_len": b.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Any:
        if not b.tokenize:
            return _error(404, "Not Found")
        return {"prompt": server.tokenizer.decode((await request.json()).get("tokens", []))}

    @app.get("/debug/config")
    async def debug_config() -> Any:
        if not b.debug:
            return _error(404, "Not Found")
        return {"model": b.model, "dtype": "float32", "device": "cpu", "vocab_size": server.tokenizer.vocab_size,
                "modules": {}}  # fmt: skip

    return app


class _FakeTransport(httpx.AsyncBaseTransport):
    """ASGITransport plus the one failure an ASGI app cannot produce: a refused connection."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self._inner = httpx.ASGITransport(app=server.app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.server.dead and self.server.behaviour.die_mode == "connect":
            raise httpx.ConnectError("[fake] connection refused", request=request)
        if self.server.behaviour.fault == "reset" and request.url.path == "/v1/completions":
            body = json.loads(await request.aread() or b"null")
            self.server.completions_served += 1
            if self.server.faulty(body):
                raise httpx.ReadError("[fake] connection reset by peer", request=request)
            self.server.completions_served -= 1  # the app counts it again
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:  # fmt: skip
    kind = "server_error" if status >= 500 else kind
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status)


def _broken(answer: dict, fault: str) -> Any:
    """`answer` as `fault` breaks it."""
    choice = answer["choices"][0]
    block = choice.get("logprobs") or {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    if fault == "http-500":
        return _error(500, "Internal Server Error: CUDA error: an illegal memory access was encountered")
    if fault == "invalid-json":
        return Response(b'{"id": "cmpl-1", "choices": [{"text": "oops', media_type="application/json")
    if fault == "no-choices":
        return {k: v for k, v in answer.items() if k != "choices"}
    if fault == "error-200":
        return {
            "error": {"message": "CUDA out of memory. Tried to allocate 2.00 GiB", "type": "server_error"}
        }
    if fault == "truncated-sse":
        event = json.dumps(answer)
        return Response(f"data: {event[: len(event) // 2]}".encode(), media_type="text/event-stream")
    if fault == "half-logprobs":
        half = max(1, len(block["tokens"]) // 2)
        choice["logprobs"] = {key: value[:half] for key, value in block.items()}
    elif fault == "no-logprob-tokens":
        choice["logprobs"] = {key: [] for key in block}
    elif fault == "short-logprobs":
        choice["logprobs"] = dict(block, token_logprobs=block["token_logprobs"][:-1])
    elif fault == "nan-logprobs":
        choice["logprobs"] = dict(
            block,
            token_logprobs=[None if lp is None else math.nan for lp in block["token_logprobs"]],
            top_logprobs=[None if t is None else dict.fromkeys(t, math.nan) for t in block["top_logprobs"]],
        )
    elif fault == "garbled-text":
        choice["text"] = "\ufffd" + choice["text"][1:]
    elif fault == "null-logprobs":  # the echo's first null stays: it is the one legitimate null
        choice["logprobs"] = dict(
            block,
            token_logprobs=[None for _ in block["token_logprobs"]],
            top_logprobs=[None if t is None else dict.fromkeys(t) for t in block["top_logprobs"]],
        )
    elif fault == "probability-logprobs":
        choice["logprobs"] = dict(
            block,
            token_logprobs=[None if lp is None else math.exp(lp) for lp in block["token_logprobs"]],
            top_logprobs=[
                None if t is None else {k: math.exp(v) for k, v in t.items()} for t in block["top_logprobs"]
            ],
        )
    elif fault == "two-choices":
        answer["choices"] = [choice, dict(choice, index=1)]
    elif fault in ("chosen-logprob-shift", "not-argmax", "zero-chosen"):
        choice["logprobs"] = dict(block, **_chosen_moved(block, fault))
    # NaN is not JSON, but Python servers send the literal NaN (json.dumps' default)
    return Response(json.dumps(answer).encode(), media_type="application/json")


def _chosen_moved(block: dict, fault: str) -> dict:
    """token_logprobs / top_logprobs with each chosen token's value moved as `fault` says."""
    lps, tops = list(block["token_logprobs"]), [dict(t) if t else t for t in block["top_logprobs"]]
    for i, (tok, lp) in enumerate(zip(block["tokens"], lps, strict=True)):
        if lp is None or not tops[i]:
            continue
        if fault == "chosen-logprob-shift":
            lps[i] = lp - 1.0
        elif fault == "zero-chosen":
            lps[i] = -math.inf
            tops[i].pop(tok, None)
        else:
            lps[i] = min(tops[i].values()) - 1.0
            tops[i][tok] = lps[i]
    return {"token_logprobs": lps, "top_logprobs": tops}


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return list(prompt)
    raise _Reject(
        400, "prompt must be a string, a list of strings, token ids or lists of token ids", "prompt"
    )


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
