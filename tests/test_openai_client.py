"""The official `openai` client against the shim on a real socket (uvicorn in a thread, 127.0.0.1)."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import uvicorn

from server_shim.app import create_app
from server_shim.engine import Engine
from server_shim.serve import ServeOptions

KEY = "sk-local"


@pytest.fixture(scope="module")
def base_url(tiny_llama):
    engine = Engine(tiny_llama)
    app = create_app(engine, ServeOptions(model="tiny-llama", api_key=KEY))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; handing uvicorn the socket avoids a race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.close()


def test_plain_and_streaming(base_url):
    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    out = client.completions.create(
        model="tiny-llama", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == 6
    assert "".join(choice.logprobs.tokens) == choice.text
    assert out.usage.completion_tokens == 6
    stream = client.completions.create(
        model="tiny-llama", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_async_client_and_errors(base_url):
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    out = await client.completions.create(
        model="tiny-llama", prompt=[1, 2, 3], max_tokens=0, echo=True, logprobs=1
    )
    assert out.choices[0].logprobs.token_logprobs[0] is None and len(out.choices[0].logprobs.tokens) == 3
    with pytest.raises(openai.BadRequestError) as exc:
        await client.completions.create(model="tiny-llama", prompt="x", logprobs=21)
    assert exc.value.body["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="other", prompt="x")
    bad = openai.AsyncOpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.completions.create(model="tiny-llama", prompt="x")
    await client.close()
    await bad.close()
