"""The OpenAI routes: thin handlers that read the body (wire.py), validate it against its request
model (protocol.py) and hand it to a serving class (serving*.py). Bodies are parsed by hand rather
than by FastAPI's signature binding so that malformed JSON, wrong types and unknown fields all go
through one mapping to OpenAI-shaped 400s instead of FastAPI's `{"detail": ...}` 422s; the request
models are still declared in the OpenAPI schema (`openapi_extra`, see openapi.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server_shim.openapi import ERRORS, json_body, json_or_sse
from server_shim.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server_shim.serving import ServingTokenization
from server_shim.serving_chat import ServingChat
from server_shim.serving_completion import ServingCompletion
from server_shim.wire import parse, read_json


def create_router(
    completion: ServingCompletion, chat: ServingChat, tokenization: ServingTokenization, max_body_bytes: int
) -> APIRouter:
    router = APIRouter()

    async def body(request: Request, model: type) -> Any:
        return parse(model, await read_json(request, max_body_bytes))

    @router.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """Liveness, open without a key: it answers {"status": "ok"} and reveals nothing else (HEAD
        too: load balancers' and curl -I's probes)."""
        return HealthResponse(status="ok")

    # HEAD on its own route, out of the schema: one route for both methods gave the OpenAPI document
    # two operations with one id (FastAPI warns, and client generators reject the duplicate).
    router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @router.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        engine = completion.engine
        name = completion.model_name
        return ModelList(data=[ModelCard(id=name, root=name, max_model_len=engine.context_length)])

    @router.post(
        "/tokenize",
        response_model=TokenizeResponse,
        responses=ERRORS,
        openapi_extra=json_body(TokenizeRequest),
    )
    async def tokenize(request: Request) -> TokenizeResponse:
        return await tokenization.tokenize(await body(request, TokenizeRequest))

    @router.post(
        "/detokenize",
        response_model=DetokenizeResponse,
        responses=ERRORS,
        openapi_extra=json_body(DetokenizeRequest),
    )
    async def detokenize(request: Request) -> DetokenizeResponse:
        return await tokenization.detokenize(await body(request, DetokenizeRequest))

    @router.post(
        "/v1/completions",
        response_class=Response,
        responses=json_or_sse(CompletionResponse),
        openapi_extra=json_body(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        return await completion.create(await body(request, CompletionRequest), request)

    @router.post(
        "/v1/chat/completions",
        response_class=Response,
        responses=json_or_sse(ChatCompletionResponse),
        openapi_extra=json_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Response:
        return await chat.create(await body(request, ChatCompletionRequest), request)

    return router
