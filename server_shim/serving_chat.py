"""POST /v1/chat/completions: messages -> prompt through the tokenizer's chat template -> engine ->
OpenAI chat.completion (JSON or SSE), logprobs shaped as vLLM and OpenAI serve them:
`choices[].logprobs.content[]` with token, logprob, bytes and `top_logprobs`.

A tokenizer without a chat template (a bare HF folder, some GGUFs) gets a documented fallback
(`FALLBACK_TEMPLATE`): one "role: content" line per message, then "assistant:" when a generation
prompt is asked for. It is plain text with no special tokens, so it works with any vocabulary; it
is not what the model was trained on, so compare two servers on the same fallback only.

Sampling, stop strings, n, seed and the caps are those of /v1/completions; the default max_tokens
is what is left of the context (OpenAI's and vLLM's default), within --max-tokens-cap.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server_shim.detok import TokenInfo, label_bytes
from server_shim.engine import RequestHandle
from server_shim.errors import InvalidRequestError
from server_shim.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatLogProb,
    ChatLogProbs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTopLogProb,
    chat_completion_id,
    sse_event,
    usage_requested,
)
from server_shim.serving import OpenAIServing
from server_shim.serving_completion import stream_error

FALLBACK_TEMPLATE = "{role}: {content}\n"  # per message; then "assistant:" as the generation prompt
FALLBACK_GENERATION_PROMPT = "assistant:"


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Token ids of the conversation: the tokenizer's own template, or the fallback."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises on conversations a template refuses (e.g. role order)
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidRequestError(
                f"the chat template refused these messages: {msg}", param="messages"
            ) from None
        # The template writes its special tokens (BOS included) itself: add none.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    if add_generation_prompt:
        text += FALLBACK_GENERATION_PROMPT
    return tokenizer(text)["input_ids"]


class ServingChat(OpenAIServing):
    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        self.check_unsupported(req)
        self.check_n(req.n)
        self.check_fits_queue(1, req.n)
        stops = req.stop_list()
        self.check_stops(stops)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self.check_texts([m["content"] for m in messages], "messages", lambda i: f"messages.{i}.content")
        ids = await self.pool.run(lambda tok: render_chat(tok, messages, req.add_generation_prompt))
        if not ids:
            raise InvalidRequestError("the messages render to an empty prompt", param="messages")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if asked is None:
            max_tokens = min(self.opts.max_tokens_cap, self.engine.context_length - len(ids))
            if max_tokens < 1:
                self.check_context(ids, 1, param="messages")
        else:
            max_tokens = asked
            self.check_max_tokens(max_tokens, param)
        self.check_context(ids, max_tokens, param="messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        handle = self.engine.submit([ids], self.sampling_params(req, max_tokens, stops, k), req.n)
        fmt = ChatLogprobsFormatter(req.logprobs, req.return_tokens_as_token_ids)
        if req.stream:
            return StreamingResponse(self._stream(handle, fmt, req, len(ids)), media_type="text/event-stream")
        got = await self.collect(request, handle)
        if got.client_gone:
            return Response(status_code=499)
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content="".join(got.texts[i])),
                logprobs=fmt.logprobs(got.infos[i]),
                finish_reason=got.reasons[i],
            )
            for i in sorted(got.texts)
        ]
        usage = self.usage(len(ids), got.completion_tokens)
        body = ChatCompletionResponse(choices=choices, model=self.model_name, usage=usage)
        return JSONResponse(body.model_dump())

    async def _stream(
        self,
        handle: RequestHandle,
        fmt: ChatLogprobsFormatter,
        req: ChatCompletionRequest,
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        cid, created, completion_tokens = chat_completion_id(), int(time.time()), 0
        include_usage = usage_requested(req)

        def chunk(choices: list[ChatStreamChoice], **kw: Any) -> str:
            body = ChatCompletionStreamResponse(
                id=cid, created=created, model=self.model_name, choices=choices, **kw
            )
            return sse_event(body, include_usage)

        try:
            # OpenAI and vLLM open every choice with its role, content "", one chunk a choice (clients
            # key on it; a client reading choices[0] alone missed the role of every choice but one)
            for i in range(req.n):
                yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for ev in self.events(handle):
                completion_tokens += len(ev.tokens)
                choice = ChatStreamChoice(
                    index=ev.index,
                    delta=ChatDelta(content=ev.text),
                    logprobs=fmt.logprobs(ev.tokens),
                    finish_reason=ev.finish_reason,
                )
                yield chunk([choice])
            if include_usage:
                yield chunk([], usage=self.usage(prompt_tokens, completion_tokens))
        except Exception as exc:
            yield stream_error(exc)
        yield "data: [DONE]\n\n"


class ChatLogprobsFormatter:
    """Chat logprobs: one entry per generated token with its UTF-8 bytes and the top k alternatives
    (best first, as the engine ranked them; unlike completions the chosen token is not added)."""

    def __init__(self, enabled: bool, as_ids: bool) -> None:
        self.enabled = enabled
        self.as_ids = as_ids

    def _token(self, token_id: int, piece: str) -> str:
        return f"token_id:{token_id}" if self.as_ids else piece

    def logprobs(self, infos: list[TokenInfo] | tuple[TokenInfo, ...]) -> ChatLogProbs | None:
        if not self.enabled:
            return None
        content = []
        for info in infos:
            if info.logprob is None:
                continue
            top = [
                ChatTopLogProb(token=self._token(tid, label), logprob=lp, bytes=label_bytes(label))
                for tid, label, lp in info.top or ()
            ]
            content.append(
                ChatLogProb(
                    token=self._token(info.token_id, info.text),
                    logprob=info.logprob,
                    bytes=list(info.text.encode()),
                    top_logprobs=top,
                )
            )
        return ChatLogProbs(content=content)
