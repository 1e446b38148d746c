"""POST /v1/completions: prompts -> engine -> OpenAI text_completion (JSON or SSE), logprobs as vLLM
reports them (`text_offset`, the chosen token first in `top_logprobs`, "token_id:N" on request)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server_shim.detok import TokenInfo
from server_shim.engine import EngineFailure, RequestHandle
from server_shim.errors import InvalidRequestError
from server_shim.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    completion_id,
    error_body,
    sse_event,
    usage_requested,
)
from server_shim.serving import OpenAIServing

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


class ServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        self.check_unsupported(req)
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise InvalidRequestError("max_tokens=0 is only allowed with echo=true", param="max_tokens")
        self.check_max_tokens(max_tokens)
        self.check_n(req.n)
        stops = req.stop_list()
        self.check_stops(stops)
        # Sized before tokenizing: 1.2M one-character prompts took 29 s of the tokenizer threads
        # (stalling every other request) only to be refused by the queue check after.
        self.check_fits_queue(prompt_count(req.prompt), req.n)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        self.check_texts([t for t in texts if isinstance(t, str)], "prompt", lambda _: "prompt")
        prompts = await self.pool.run(lambda tok: prompt_ids(req.prompt, tok))
        for ids in prompts:
            self.check_ids(ids, "prompt")
            self.check_context(ids, max_tokens)
        params = self.sampling_params(req, max_tokens, stops, req.logprobs, echo=req.echo)
        handle = self.engine.submit(prompts, params, req.n)
        fmt = LogprobsFormatter(req.logprobs is not None, req.return_tokens_as_token_ids)
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return StreamingResponse(
                self._stream(handle, fmt, req, prompt_tokens), media_type="text/event-stream"
            )
        got = await self.collect(request, handle)
        if got.client_gone:  # nobody reads this (nginx's "client closed request")
            return Response(status_code=499)
        choices = [
            CompletionChoice(
                finish_reason=got.reasons[i],
                index=i,
                logprobs=fmt.logprobs(i, got.infos[i]),
                text="".join(got.texts[i]),
            )
            for i in sorted(got.texts)
        ]
        usage = self.usage(prompt_tokens, got.completion_tokens)
        return JSONResponse(
            CompletionResponse(choices=choices, model=self.model_name, usage=usage).model_dump()
        )

    async def _stream(
        self, handle: RequestHandle, fmt: LogprobsFormatter, req: CompletionRequest, prompt_tokens: int
    ) -> AsyncIterator[str]:
        cid, created, completion_tokens = completion_id(), int(time.time()), 0
        include_usage = usage_requested(req)
        try:
            async for ev in self.events(handle):
                completion_tokens += 0 if ev.prompt else len(ev.tokens)
                choice = CompletionChoice(
                    finish_reason=ev.finish_reason,
                    index=ev.index,
                    logprobs=fmt.logprobs(ev.index, ev.tokens),
                    text=ev.text,
                )
                chunk = CompletionStreamResponse(
                    id=cid, choices=[choice], created=created, model=self.model_name
                )
                yield sse_event(chunk, include_usage)
            if include_usage:
                usage: UsageInfo = self.usage(prompt_tokens, completion_tokens)
                chunk = CompletionStreamResponse(
                    id=cid, choices=[], created=created, model=self.model_name, usage=usage
                )
                yield sse_event(chunk, include_usage)
        except Exception as exc:  # headers are gone: the error travels as a data event (vLLM does the same)
            yield stream_error(exc)
        yield "data: [DONE]\n\n"


def stream_error(exc: Exception) -> str:
    logger.exception("streamed request failed")
    kind = "EngineFailure" if isinstance(exc, EngineFailure) else type(exc).__name__
    return f"data: {json.dumps(error_body(f'{kind}: {exc}', error_type='server_error'))}\n\n"


class LogprobsFormatter:
    """OpenAI completions logprobs blocks; text_offset continues across a choice's stream chunks."""

    def __init__(self, enabled: bool, as_ids: bool) -> None:
        self.enabled = enabled
        self.as_ids = as_ids
        self.offsets: dict[int, int] = {}

    def key(self, token_id: int, piece: str) -> str:
        return f"token_id:{token_id}" if self.as_ids else piece

    def logprobs(
        self, index: int, infos: list[TokenInfo] | tuple[TokenInfo, ...]
    ) -> CompletionLogProbs | None:
        if not self.enabled:
            return None
        out = CompletionLogProbs()
        offset = self.offsets.get(index, 0)
        for info in infos:
            out.text_offset.append(offset)
            offset += len(info.text)
            out.tokens.append(self.key(info.token_id, info.text))
            out.token_logprobs.append(info.logprob)
            if info.logprob is None or info.top is None:
                out.top_logprobs.append(None)
                continue
            # The chosen token first (vLLM includes it even outside the top k). Alternatives that are
            # parts of a character are labelled by their bytes (detok.TokenInfo); two other ids with
            # one label (rare: the same text) keep their own entries, the second by its id -- an
            # entry dropped on a key collision would be k alternatives asked, fewer given.
            top = {self.key(info.token_id, info.text): info.logprob}
            owner = {self.key(info.token_id, info.text): info.token_id}
            for tid, piece, lp in info.top:
                key = self.key(tid, piece)
                if owner.setdefault(key, tid) != tid:
                    key = f"token_id:{tid}"
                top.setdefault(key, lp)
            out.top_logprobs.append(top)
        self.offsets[index] = offset
        return out


def prompt_count(prompt: Any) -> int:
    """How many prompts `prompt_ids` will make of `prompt`, without tokenizing anything."""
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return 1
    return len(prompt)


def prompt_ids(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """The four prompt shapes of the API, as lists of token ids; empty prompts are refused (nothing
    predicts the first token, so there is no distribution to sample)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    out = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        out.append(ids)
    return out
