"""The API key on the wire: a key beyond ASCII goes out as its UTF-8 bytes (httpx sends a str header
as ASCII only: `--api-key-env` with such a key was a UnicodeEncodeError traceback), and a key no
header can carry is a one-line usage error, not a request that fails in the transport."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from difftest.client import CompletionClient, bearer
from difftest.errors import UsageError, exit_code_for


def test_a_key_beyond_ascii_goes_out_as_utf8_bytes() -> None:
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(
            request.headers.raw[[k.lower() for k, _ in request.headers.raw].index(b"authorization")][1]
        )
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def ask() -> list[str]:
        client = CompletionClient(
            "http://127.0.0.1:9", name="s", api_key="密码密码", transport=httpx.MockTransport(answer)
        )
        try:
            return await client.models()
        finally:
            await client.aclose()

    assert asyncio.run(ask()) == ["m"]
    assert seen == ["Bearer 密码密码".encode()]  # the shim's guard compares these bytes


@pytest.mark.parametrize(
    ("key", "why"), [("sekrit\n", "control character \\(0x0a\\)"), (" sekrit", "a space or tab at an end")]
)
def test_a_key_no_header_can_carry_is_a_usage_error(key: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as caught:
        bearer(key)
    assert exit_code_for(caught.value) == 2 and "sekrit" not in str(caught.value)  # never the key


def test_the_launcher_refuses_such_a_key_where_it_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The health probe of a url server built the header itself: a key beyond ASCII was a
    UnicodeEncodeError traceback before any request, one with a newline a transport error."""
    from server_shim.launch import api_key_of
    from server_shim.launch_spec import ServerSpec, SpecError

    spec = ServerSpec(name="s", url="http://127.0.0.1:9", api_key_env="MYKEY")
    monkeypatch.setenv("MYKEY", "sekrit\n")
    with pytest.raises(SpecError, match="control character") as caught:
        api_key_of(spec)
    assert "sekrit" not in str(caught.value)
    monkeypatch.setenv("MYKEY", "密码")
    assert api_key_of(spec) == "密码" and bearer("密码") == "Bearer 密码".encode()
