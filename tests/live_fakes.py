"""Fake engines (tests/fakes.py) served for real: uvicorn in a thread on a free 127.0.0.1 port.

The differ's runner talks to servers by URL, so its end-to-end tests need sockets; these come up
in ~0.1 s, where a real shim subprocess takes seconds.
"""

from __future__ import annotations

import contextlib
import socket
import struct
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
    # log_config=None: the server's own errors (a client that hung up) go to `logging`, where pytest
    # keeps them apart from the stderr of the difftest under test
    config = uvicorn.Config(
        app or make_fake_app(behaviour), host="127.0.0.1", port=port, log_level="error", lifespan="off",
        log_config=None,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url + "/health", timeout=1)  # any answer: it listens (a dead fake says 5xx)
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


@contextlib.contextmanager
def raw_server(mode: str) -> Iterator[str]:
    """A TCP listener that breaks HTTP: "reset" reads a request and resets the connection (RST);
    "silent" accepts, reads and never answers (until the test ends). Every route alike."""
    if mode not in ("reset", "silent"):
        raise ValueError(f"unknown raw server mode {mode!r}")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # timeout: look at `stop` again
                continue
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                conn.recv(65536)
            if mode == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in held:
            conn.close()
