"""Request bodies off the wire: read with a size cap, parse as JSON that cannot hurt the server, map
pydantic errors to one OpenAI-shaped 400.

Every JSON route (the OpenAI ones and /debug/activations) goes through `read_json`, so a body that
Python's json module chokes on is the caller's 400 wherever it arrives:

- a Content-Type other than JSON -> 400, not a form body parsed as JSON;
- a Content-Encoding other than identity (gzip, ...) -> 415, not "malformed JSON" (every body);
- nesting deeper than `MAX_DEPTH` (json.loads raises RecursionError at ~1000 levels; pydantic and
  the tokenizer have their own limits below that) -> 400;
- an integer literal over Python's 4 300-digit limit (ValueError) -> 400;
- `NaN`, `Infinity` and floats that overflow to inf (`1e400`) -> 400: a temperature of inf makes
  NaN probabilities, and no OpenAI parameter has a use for them;
- a lone UTF-16 surrogate (`"\\ud800"`) in any string -> 400: the Rust tokenizer cannot take it
  and it has no UTF-8 form to echo back.

Torch-free: the debug routes and the OpenAI routes share it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from server_shim.errors import InvalidRequestError, clip

MAX_DEPTH = 32  # no request model nests deeper than 4; headroom for chat message content parts


def too_large(limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"request body exceeds {limit} bytes (the server's --max-body-bytes)",
        code="request_too_large",
        status_code=413,
    )


def check_encoding(content_encoding: str | None) -> None:
    """A compressed body is refused (415), not parsed as if it were plain: a gzip body got a
    misleading "malformed JSON". Nothing is decompressed: a small bomb would pass the size cap."""
    coding = (content_encoding or "identity").strip().lower()
    if coding not in ("", "identity"):
        raise InvalidRequestError(
            f"Content-Encoding {clip(content_encoding or '', 80)} is not supported; send the body uncompressed",
            code="unsupported_content_encoding",
            status_code=415,
        )


async def read_body(request: Any, limit: int) -> bytes:
    """The whole body, refused with a 413 naming the cap as soon as it passes `limit` bytes — also
    when the client sends it chunked without a Content-Length (the middleware checks that header)."""
    check_encoding(request.headers.get("content-encoding"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number here")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads(raw: bytes) -> Any:
    """json.loads with every failure mode a 400 (see the module docstring)."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise InvalidRequestError(
            f"malformed JSON body: nested deeper than {MAX_DEPTH} levels", code="invalid_json"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, the int digit limit, _finite
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InvalidRequestError(f"malformed JSON body: {msg}", code="invalid_json") from None
    check_tree(data)
    return data


def check_tree(data: Any) -> None:
    """Depth and string check without recursion (the body may be as deep as json.loads allows)."""
    stack: list[tuple[Any, int, str | None]] = [(data, 0, None)]
    while stack:
        node, depth, param = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequestError(
                f"malformed JSON body: nested deeper than {MAX_DEPTH} levels",
                param=param,
                code="invalid_json",
            )
        if isinstance(node, str):
            _check_text(node, param)
        elif isinstance(node, dict):
            for key, value in node.items():
                _check_text(key, param)
                stack.append((value, depth + 1, key if depth == 0 else param))
        elif isinstance(node, list):
            stack.extend((value, depth + 1, param) for value in node)


def _check_text(text: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"string contains a lone UTF-16 surrogate at character {exc.start} (not valid Unicode text)",
            param=param,
            code="invalid_unicode",
        ) from None


# Bodies above this are parsed on a worker thread: json.loads and the tree walk of an 8 MB body take
# tens of milliseconds that every other request (and /health) would otherwise wait for.
THREAD_PARSE_BYTES = 256 * 1024


def check_json_type(content_type: str | None) -> None:
    """A body declared as something other than JSON is refused (400) before it is read as JSON: a
    form post (`curl -d` without a JSON header) or text/plain would otherwise be parsed as if JSON had
    been sent. No header at all is taken as JSON, as FastAPI and vLLM take it."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    if kind != "application" or not (sub == "json" or sub.endswith("+json")):
        raise InvalidRequestError(
            f"Content-Type must be application/json, got {content_type[:80]!r}",
            code="invalid_content_type",
        )


async def read_json(request: Any, limit: int) -> Any:
    check_json_type(request.headers.get("content-type"))
    raw = await read_body(request, limit)
    if len(raw) > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(loads, raw)
    return loads(raw)


# a union member's tag in an error location ("str", "list[TextPart]"): the branch, not a field
_UNION_TAG = re.compile(r"(str|int|float|bool|[a-z-]+\[.+\])")


def _telling(errors: list[Any]) -> Any:
    """The error that says what is wrong: in a union (content: str | list[parts]) every branch
    fails, and the first, "should be a valid string", hid the real one (an unknown key in a part)."""
    return next((e for e in errors if not e["type"].endswith("_type")), errors[0])


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a parsed body against a request model; the first problem becomes a 400 naming its
    parameter (FastAPI's own binding would answer 422 with `{"detail": ...}`)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = _telling(exc.errors())
        loc = [clip(str(x)) for x in err["loc"] if not _UNION_TAG.fullmatch(str(x))]
        param = loc[0] if loc else None
        if err["type"] == "extra_forbidden":
            msg = f"unsupported parameter `{'.'.join(loc)}`"
        elif err["type"] == "missing":
            msg = f"`{'.'.join(loc)}` is required"
        elif param == "prompt" and len(exc.errors()) > 1:
            msg = (
                "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
            )
        else:
            msg = f"`{'.'.join(loc)}`: {err['msg']}"
        raise InvalidRequestError(msg, param=param) from None
