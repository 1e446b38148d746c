"""Schema fuzzing: schemathesis generates requests from the shim's own /openapi.json (every route,
/debug/* included) and checks that none gets a 5xx, every status and content type is declared, and
every JSON body matches its schema. Bounded: FUZZ_EXAMPLES per operation (positive and negative
data), small caps so that no generated request runs long, and a deadline per request.

The figures in the README (requests tried, 5xx found) are what this module prints with `-s`.
"""

from __future__ import annotations

import os

# before the model loads at collection (it imports triton): compiled, triton would break every
# interpreter test collected after this file (tests/conftest.py names such a module)
os.environ["TRITON_INTERPRET"] = "1"

import atexit  # noqa: E402

import pytest  # noqa: E402

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from server_shim.app import create_app  # noqa: E402
from server_shim.engine import Engine  # noqa: E402
from server_shim.models import load_model  # noqa: E402
from server_shim.options import ServeOptions  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("DIFFTEST_FUZZ_EXAMPLES", "25"))
TALLY = {"requests": 0, "5xx": 0}


def _build_app():
    loaded = load_model("tiny-llama", dtype="float32", device="cpu")
    engine = Engine(loaded, max_waiting=64)
    atexit.register(engine.close)
    opts = ServeOptions(
        model="tiny-llama", debug=True, max_tokens_cap=8, max_n=2, max_prompt_chars=4000,
        max_body_bytes=256 * 1024, max_stop_strings=4, max_stop_chars=64,
    )  # fmt: skip
    return create_app(engine, opts)


APP = _build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same requests on every run: a CI failure reproduces locally
    database=None,
)
def test_fuzz_every_route(case):
    response = case.call()
    TALLY["requests"] += 1
    TALLY["5xx"] += response.status_code >= 500
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


def test_schema_lists_every_route():
    paths = set(schema.raw_schema["paths"])
    assert {
        "/health", "/v1/models", "/tokenize", "/detokenize", "/v1/completions", "/v1/chat/completions",
        "/debug/config", "/debug/activations", "/debug/module", "/debug/quant/{name}",
    } <= paths  # fmt: skip
    body = schema.raw_schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }


def teardown_module() -> None:
    print(f"\nfuzz: {TALLY['requests']} requests, {TALLY['5xx']} answered 5xx")
