"""What every OpenAI route shares, vLLM style: `OpenAIServing` holds the engine, the options and the
tokenizer threads, and checks, submits and collects; serving_completion.py and serving_chat.py turn
requests and engine events into their own wire shapes.

Why tokenizer threads: tokenizing a 7 MB prompt takes seconds; on the event loop it froze every
route, /health included. `TokenizerPool` runs it on a few threads, each with its own tokenizer copy
(a fast tokenizer is not safe to share between threads while one of them encodes; the model
thread decodes with the engine's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from server_shim.detok import TokenInfo
from server_shim.engine import RequestHandle, SamplingParams, SeqEvent
from server_shim.errors import InvalidRequestError, clip
from server_shim.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
)

if TYPE_CHECKING:
    from fastapi import Request

    from server_shim.engine import Engine

logger = logging.getLogger(__name__)
T = TypeVar("T")


class TokenizerPool:
    """Tokenizing off the event loop: a few threads, each with its own tokenizer copy."""

    def __init__(self, tokenizer: Any, workers: int = 2) -> None:
        self._template = tokenizer
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenizer")

    def _call(self, fn: Callable[[Any], T]) -> T:
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = copy.deepcopy(self._template)
        return fn(tok)

    async def run(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)


@dataclass
class Collected:
    """A non-streamed request's events gathered per choice index."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    infos: dict[int, list[TokenInfo]] = field(default_factory=dict)
    reasons: dict[int, str | None] = field(default_factory=dict)
    completion_tokens: int = 0
    client_gone: bool = False


class OpenAIServing:
    """Checks and engine access shared by the OpenAI routes."""

    def __init__(self, engine: Engine, opts: Any, pool: TokenizerPool) -> None:
        self.engine = engine
        self.opts = opts
        self.pool = pool
        self.model_name = engine.loaded.name

    # ------------------------------------------------------------------ checks (400 / 404)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise InvalidRequestError(
                f"The model `{clip(name)}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
                status_code=404,
                error_type="NotFoundError",
            )

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {self.engine.vocab_size})", param=param
            )

    def check_chars(self, text: str, param: str = "prompt") -> None:
        """Refuse text no context could hold before spending seconds tokenizing it."""
        self._check_size(len(text), param, "characters")

    def check_texts(self, texts: Sequence[str], param: str, item: Callable[[int], str]) -> None:
        """Each text (`item(i)` names it) and their total within --max-prompt-chars: many texts each
        under the cap would otherwise all be tokenized, for seconds, before anything refused them."""
        for i, text in enumerate(texts):
            self.check_chars(text, param=item(i))
        self._check_size(sum(len(t) for t in texts), param, "characters in all")

    def _check_size(self, size: int, param: str, what: str) -> None:
        if size > self.opts.max_prompt_chars:
            raise InvalidRequestError(
                f"{param} has {size} {what}; this server takes at most {self.opts.max_prompt_chars} "
                "(--max-prompt-chars)",
                param=param,
                code="prompt_too_long",
            )

    def check_stops(self, stops: tuple[str, ...]) -> None:
        """Stop matching runs on the model thread for every token: bounded work per token."""
        if len(stops) > self.opts.max_stop_strings:
            raise InvalidRequestError(
                f"at most {self.opts.max_stop_strings} stop strings (--max-stop-strings); got {len(stops)}",
                param="stop",
            )
        longest = max((len(x) for x in stops), default=0)
        if longest > self.opts.max_stop_chars:
            raise InvalidRequestError(
                f"stop strings are at most {self.opts.max_stop_chars} characters (--max-stop-chars); got {longest}",
                param="stop",
            )

    def check_unsupported(self, req: Any) -> None:
        for param, why in req.unsupported_values():
            raise InvalidRequestError(why, param=param, code="unsupported_parameter")
        if req.user is not None:
            logger.debug("ignoring `user` (it changes no result)")

    def check_n(self, n: int) -> None:
        if n > self.opts.max_n:
            raise InvalidRequestError(f"n must be <= {self.opts.max_n}", param="n")

    def check_fits_queue(self, prompts: int, n: int) -> None:
        """A request of more sequences than the queue holds can never be admitted: a 400 naming
        why, not the 429 "retry later" that a client honouring Retry-After would loop on."""
        if prompts * n > self.engine.max_waiting:
            raise InvalidRequestError(
                f"this request needs {prompts} prompt(s) x n={n} = {prompts * n} sequences; the server "
                f"queues at most {self.engine.max_waiting} (--max-waiting): send fewer prompts or a smaller n",
                param="n" if prompts == 1 else "prompt",
            )

    def check_max_tokens(self, max_tokens: int, param: str = "max_tokens") -> None:
        if max_tokens > self.opts.max_tokens_cap:
            raise InvalidRequestError(f"{param} must be <= {self.opts.max_tokens_cap}", param=param)

    def check_context(self, ids: list[int], max_tokens: int, param: str = "prompt") -> None:
        ctx = self.engine.context_length
        if len(ids) + max_tokens > ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the completion). "
                "Please reduce the prompt or max_tokens.",
                param=param,
                code="context_length_exceeded",
            )

    # ------------------------------------------------------------------ engine

    def sampling_params(self, req: Any, max_tokens: int, stops: tuple[str, ...], logprobs: int | None,
                        echo: bool = False) -> SamplingParams:  # fmt: skip
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k or 0, 0),
            seed=req.seed,
            stop=stops,
            logprobs=logprobs,
            echo=echo,
            ignore_eos=req.ignore_eos,
        )

    async def collect(self, request: Request, handle: RequestHandle) -> Collected:
        """Every event of a non-streamed request; a client that disconnects cancels it."""
        out = Collected()
        async with _CancelOnDisconnect(request, handle) as watch:
            async for ev in handle.events():
                out.texts.setdefault(ev.index, []).append(ev.text)
                out.infos.setdefault(ev.index, []).extend(ev.tokens)
                out.completion_tokens += 0 if ev.prompt else len(ev.tokens)
                out.reasons[ev.index] = ev.finish_reason
        out.client_gone = watch.gone
        return out

    @staticmethod
    async def events(handle: RequestHandle) -> AsyncIterator[SeqEvent]:
        """A streamed request's events; the caller's `finally` cancels (also on a client gone)."""
        events = handle.events()
        try:
            async for ev in events:
                yield ev
        finally:
            handle.cancel()
            await events.aclose()

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _CancelOnDisconnect:
    """Non-streamed requests: watch the connection while the engine works and cancel the request's
    sequences when the client goes away (an abandoned request must not keep a batch slot)."""

    def __init__(self, request: Request, handle: RequestHandle) -> None:
        self.request, self.handle = request, handle
        self.task: asyncio.Task | None = None
        self.gone = False

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                logger.info("client went away; cancelling its generation")
                self.gone = True
                self.handle.cancel()
                return

    async def __aenter__(self) -> _CancelOnDisconnect:
        self.task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class ServingTokenization(OpenAIServing):
    """POST /tokenize and /detokenize (vLLM's shapes)."""

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        self.check_chars(req.prompt)

        def work(tok: Any) -> tuple[list[int], list[str] | None]:
            ids = tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
            return ids, (tok.convert_ids_to_tokens(ids) if req.return_token_strs else None)

        ids, strs = await self.pool.run(work)
        return TokenizeResponse(
            count=len(ids), max_model_len=self.engine.context_length, tokens=ids, token_strs=strs
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        self.check_ids(req.tokens, "tokens")
        text = await self.pool.run(lambda tok: tok.decode(req.tokens, clean_up_tokenization_spaces=False))
        return DetokenizeResponse(prompt=text)
