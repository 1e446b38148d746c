"""The API key as an Authorization header, one rule for the shim's guard and every client of it
(difftest's, the launcher's health probe): the key travels as its UTF-8 bytes, and a key that no
header can carry is refused where it is read, not met as a 401 or a transport error later."""

from __future__ import annotations


def key_problem(key: str) -> str | None:
    """What stops `key` from travelling in a header (never the key itself), or None. A control
    character (CR, LF, NUL: not a header value) cannot be sent, and HTTP strips whitespace at
    either end: every request would get 401 and read as the clients' fault."""
    bad = [c for c in key if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F]
    if bad:
        return f"the API key holds a control character ({ord(bad[0]):#04x}), which no Authorization header can carry"
    if key != key.strip(" \t"):
        return "the API key has a space or tab at an end, which HTTP strips from a header"
    return None


def bearer(key: str) -> bytes:
    """The header's value: UTF-8 bytes (httpx sends a str header as ASCII only, and the guard
    compares raw bytes). Call `key_problem` first: this does not check."""
    return b"Bearer " + key.encode("utf-8")
