"""The shim's OpenAPI schema (served at /openapi.json, fuzzed by tests/test_fuzz.py).

The routes read their bodies by hand (routes.py), so FastAPI does not see the request models; each
route declares its body with `json_body(Model)` and `install` adds those models (and their nested
definitions) to the schema's components. Every 4xx is declared with the OpenAI error body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server_shim.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"
_BODIES: dict[str, type[BaseModel]] = {}

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in (
        (400, "invalid request (OpenAI error body naming the parameter)"),
        (401, "missing or wrong API key"),
        (404, "unknown model, module or route"),
        (405, "method not allowed"),
        (413, "request body or response over its cap"),
        (415, "a Content-Encoding other than identity (send the body uncompressed)"),
        (429, "queue full: retry after the Retry-After header's seconds"),
    )
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring a required JSON body of `model`."""
    _BODIES[model.__name__] = model
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def binary_body() -> dict[str, Any]:
    schema = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": schema}}}}


def json_or_sse(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """200 is the model as JSON, or an SSE stream of chunks with `stream: true`."""
    ok = {
        "model": model,
        "description": "the response, or with stream=true a text/event-stream of chunks",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return {200: ok, **ERRORS}


def octet(**extra: Any) -> dict[int | str, dict[str, Any]]:
    ok = {
        "description": "a safetensors body",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    return {200: ok, **ERRORS, **extra}


def install(app: FastAPI) -> None:
    """Replace app.openapi with one that adds the hand-parsed request bodies' models."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _BODIES.items():
            js = model.model_json_schema(ref_template=_REF)
            for sub, definition in js.pop("$defs", {}).items():
                components.setdefault(sub, definition)
            components[name] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
