"""Fake engines (tests/fakes.py) served for real: uvicorn in a thread on a free 127.0.0.1 port.

The differ's runner talks to servers by URL, so its end-to-end tests need sockets; these come up
in ~0.1 s, where a real shim subprocess takes seconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from fakes import FakeBehaviour, make_fake_app
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_fake(
    behaviour: FakeBehaviour | None = None, *, port: int | None = None, app: FastAPI | None = None
) -> Iterator[str]:
    """Serve a fake (or `app`, e.g. `make_fake_app(...)` kept to read `app.state.fake.requests`)."""
    port = port or free_port()
    config = uvicorn.Config(
        app or make_fake_app(behaviour), host="127.0.0.1", port=port, log_level="error", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
