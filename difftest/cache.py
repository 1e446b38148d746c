"""sqlite response cache: what makes `--resume` and offline `difftest report DIR` possible.

A response is keyed by sha256 over (the server's fingerprint, the full request), both as canonical
JSON, so a cached answer is reused only for the same request to the same server build. Only
successful responses are stored: a failed request is retried on resume, never replayed.

Every `put` commits at once (WAL journal): a run killed halfway — SIGKILL included — keeps every
answer it got, and the file opens cleanly afterwards (sqlite replays the committed part of the WAL
and drops a torn last write). `synchronous=NORMAL` is safe against a killed process; only a power
loss could cost the last commits, which a resume re-asks. One connection shared under a lock makes
the cache safe from threads; async callers call it directly (each operation is a single indexed
statement, well under a millisecond).

The file is created owner-only (0600; sqlite gives its -wal and -shm files the same mode): cached
answers hold prompts and model output, which are nobody else's business on a shared machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL
);
"""


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, integral floats as ints (`temperature: 0` == `temperature: 0.0`)."""
    return json.dumps(_canon(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(fingerprint: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    blob = canonical_json({"fingerprint": fingerprint, "request": request})
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if str(path) != ":memory:":
            _create_private(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._hits = self._misses = self._puts = 0

    def get(self, fingerprint: Mapping[str, Any], request: Mapping[str, Any]) -> dict | None:
        key = cache_key(fingerprint, request)
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._misses += 1
                return None
            self._hits += 1
        return json.loads(row[0])

    def put(
        self, fingerprint: Mapping[str, Any], request: Mapping[str, Any], response: Mapping[str, Any]
    ) -> None:
        if not isinstance(response, Mapping) or "error" in response:
            raise ValueError("only successful responses (JSON objects without an 'error') are cached")
        key = cache_key(fingerprint, request)
        row = (key, canonical_json(fingerprint), canonical_json(request), json.dumps(response), time.time())
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)
            self._puts += 1

    def remember_server(self, name: str, fingerprint: Mapping[str, Any]) -> None:
        """Record the fingerprint a named server had, so an offline client can find its entries."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO servers VALUES (?, ?)", (name, canonical_json(fingerprint))
            )

    def server_fingerprint(self, name: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT fingerprint FROM servers WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            servers = [r[0] for r in self._db.execute("SELECT name FROM servers ORDER BY name")]
            entries = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            return {
                "path": str(self.path),
                "entries": entries,
                "servers": servers,
                "hits": self._hits,
                "misses": self._misses,
                "puts": self._puts,
            }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_private(path: Path) -> None:
    """Create the file 0600 before sqlite does (sqlite would use the umask, often 0644 or 0664),
    and take away group/other write from an existing one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o022:
            os.fchmod(fd, mode & ~0o022)
    finally:
        os.close(fd)


def _canon(obj: Any) -> Any:
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): _canon(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canon(v) for v in obj]
    return obj
