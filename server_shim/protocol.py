"""Pydantic models of the HTTP wire: OpenAI completions and chat completions as vLLM serves them,
plus tokenize / detokenize and the error body.

Fields follow the order of the OpenAI API reference; engine extras (vLLM's names) are fenced below
them. Requests are strict (`"5"` is not an int, `true` is not a number) and forbid unknown fields:
a parameter the shim would silently drop is the worst bug class for a differ — two servers that
"agree" only because one ignored `frequency_penalty` produce false diffs or, worse, false passes.
Parameters that the OpenAI API defines but that the shim does not implement are declared so that a
default value is accepted and any other value is rejected with a 400 naming the parameter
(`unsupported_values`). Parameters that cannot change a result (`user`) are accepted and logged.

Internal results are frozen dataclasses in engine.py; these models exist only at the HTTP edge.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from server_shim.errors import InvalidRequestError

# OpenAI caps `logprobs` at 5 for its hosted models; vLLM and the issue allow 20.
MAX_LOGPROBS = 20
# vLLM's bounds: a seed is an int64 (past them 2**64 acted like seed 0, 2**62 like 2**62 % 2**32)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _has_default(field: FieldInfo) -> bool:
    """A field whose default is a value, not None: an explicit null for it means that default."""
    return not field.is_required() and field.default is not None


def _nullable_schema(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """The schema says what `_null_is_default` accepts: null is valid for every such field."""
    props = schema.get("properties", {})
    for name, field in cls.model_fields.items():
        prop = props.get(field.alias or name)
        if prop is None or not _has_default(field):
            continue
        if "anyOf" in prop:
            prop["anyOf"].append({"type": "null"})
            continue
        keep = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
        props[field.alias or name] = {"anyOf": [prop, {"type": "null"}], **keep}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_nullable_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """An explicit null for an optional field is its default, as OpenAI's schema (nullable) and
        vLLM (Optional) take it: `"temperature": null` was a 400. Required fields stay non-null."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if not (v is None and k in fields and _has_default(fields[k]))}


class StreamOptions(_Request):
    include_usage: bool = False


Prompt = str | list[str] | list[int] | list[list[int]]


def _unsupported_common(req: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, str]]:
    """(param, why) for what both endpoints accept but cannot honour: the logit-shaping parameters
    the shim does not implement (each would change the answer, so a non-default value is refused,
    not dropped), and stream_options on a request that does not stream (vLLM refuses it too: the
    usage it asks for would never be sent)."""
    out: list[tuple[str, str]] = []
    if req.frequency_penalty != 0.0:
        out.append(("frequency_penalty", "frequency_penalty is not supported (only 0)"))
    if req.presence_penalty != 0.0:
        out.append(("presence_penalty", "presence_penalty is not supported (only 0)"))
    if req.logit_bias:
        out.append(("logit_bias", "logit_bias is not supported"))
    if req.stream_options is not None and not req.stream:
        out.append(("stream_options", "stream_options can only be set when stream is true"))
    if req.skip_special_tokens:
        out.append(
            (
                "skip_special_tokens",
                "skip_special_tokens=true is not supported: the text keeps special tokens",
            )
        )
    return out


class CompletionRequest(_Request):
    """POST /v1/completions. https://platform.openai.com/docs/api-reference/completions/create"""

    model: str
    prompt: Prompt
    best_of: int | None = Field(default=None, ge=1)
    echo: bool = False
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # None means the OpenAI default (16); 0 is allowed only with echo (teacher forcing).
    max_tokens: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = 0.0
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- engine extras (vLLM names) -------------------------------------------------------
    # Tokens in logprobs as "token_id:N", so that a differ never re-tokenises strings.
    return_tokens_as_token_ids: bool = False
    # -1 / 0 / None: no top-k filter (vLLM uses -1 for "off").
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool = False
    # vLLM's default is true (special tokens dropped from the text); the shim's text keeps them, so
    # only false is accepted, and true is refused rather than ignored
    skip_special_tokens: bool = False

    def unsupported_values(self) -> list[tuple[str, str]]:
        """(param, why) for every parameter set to a value that would change results but is not
        implemented. The app turns the first one into a 400."""
        out: list[tuple[str, str]] = []
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", "best_of other than n is not supported"))
        out += _unsupported_common(self)
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(s == "" for s in stops):
            # An empty stop string matches before the first character: every answer would be "".
            raise InvalidRequestError("stop strings must not be empty", param="stop")
        return stops


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: CompletionLogProbs | None = None
    text: str


class UsageInfo(BaseModel):
    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One SSE `data:` chunk; the last one carries usage when stream_options.include_usage."""

    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: UsageInfo | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "server_shim"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ----------------------------------------------------------------------------- chat completions

CHAT_ROLES = ("system", "developer", "user", "assistant")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message. Tool and function messages are refused (the shim has no tools); `name` is not
    declared, so a request that sets it gets a 400 rather than a prompt that silently lacks it."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        # parts joined by newlines, as vLLM renders a text-only content list
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions. https://platform.openai.com/docs/api-reference/chat/create"""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = 0.0
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # --- engine extras (vLLM names) -------------------------------------------------------
    return_tokens_as_token_ids: bool = False
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool = False
    # vLLM's default is true (special tokens dropped from the text); the shim's text keeps them, so
    # only false is accepted, and true is refused rather than ignored
    skip_special_tokens: bool = False
    add_generation_prompt: bool = True

    def unsupported_values(self) -> list[tuple[str, str]]:
        out = _unsupported_common(self)
        if self.response_format is not None and self.response_format != {"type": "text"}:
            out.append(("response_format", "response_format other than text is not supported"))
        if self.tools:
            out.append(("tools", "tools are not supported"))
        if self.tool_choice not in (None, "none"):
            out.append(("tool_choice", "tool_choice is not supported (no tools)"))
        # parallel_tool_calls is not checked: tools are refused above, and without tools it cannot
        # change an answer (OpenAI's SDK defaults it to true, so refusing it broke such clients)
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            out.append(("max_completion_tokens", "give max_tokens or max_completion_tokens, not both"))
        return out

    def stop_list(self) -> tuple[str, ...]:
        return CompletionRequest.stop_list(self)  # type: ignore[arg-type]


class ChatTopLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProb(ChatTopLogProb):
    top_logprobs: list[ChatTopLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatLogProb] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogProbs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


def usage_requested(req: CompletionRequest | ChatCompletionRequest) -> bool:
    """Whether a streamed request asked for usage (stream_options.include_usage)."""
    return req.stream_options is not None and req.stream_options.include_usage


def sse_event(chunk: CompletionStreamResponse | ChatCompletionStreamResponse, include_usage: bool) -> str:
    """One SSE `data:` event. As OpenAI's API: with stream_options.include_usage every chunk has a
    `usage` key (null but on the last), without it no chunk has one; the other null fields stay."""
    body = chunk.model_dump_json(exclude=None if include_usage else {"usage"})
    return f"data: {body}\n\n"


class HealthResponse(BaseModel):
    status: Literal["ok"]


def error_body(
    message: str, *, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=error_type, param=param, code=code)
    ).model_dump()
