"""sqlite response cache: what makes `--resume` possible (an offline `difftest report DIR` needs
report.json alone).

A response is keyed by sha256 over (the server's fingerprint, the full request), both as canonical
JSON, so a cached answer is reused only for the same request to the same server build. Only
successful responses are stored: a failed request is retried on resume, never replayed.

Every `put` commits at once (WAL journal): a run killed halfway — SIGKILL included — keeps every
answer it got, and the file opens cleanly afterwards (sqlite replays the committed part of the WAL
and drops a torn last write). `synchronous=NORMAL` is safe against a killed process; only a power
loss could cost the last commits, which a resume re-asks. One connection shared under a lock makes
the cache safe from threads; async callers call it directly (each operation is a single indexed
statement, well under a millisecond).

A file that is not such a cache (random bytes, a truncated copy, another program's sqlite with a
`responses` table of other columns) is set aside as `cache.sqlite.corrupt-<time>` and a new one
started (`ResponseCache.set_aside` says so): a cache only saves asking again, so asking again is
the cure, and the old file is kept for whoever wants to look at it. A single row that does not
read back as a JSON object is a miss (asked again, and overwritten). A write that fails (disk
full) is an OutputError naming the file (exit 2): the report beside it would fail the same way.

The file is created owner-only (0600; sqlite gives its -wal and -shm files the same mode): cached
answers hold prompts and model output, which are nobody else's business on a shared machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from difftest.errors import UnreadableCache, output_error

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
CREATE TABLE IF NOT EXISTS server_history (
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (name, fingerprint)
);
"""
# the columns each table must have: a foreign `responses` table failed only at the first lookup,
# after the servers had started
_COLUMNS = {
    "responses": ("key", "fingerprint", "request", "response", "created"),
    "servers": ("name", "fingerprint"),
    "server_history": ("name", "fingerprint", "seen"),
}


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, integral floats as ints (`temperature: 0` == `temperature: 0.0`)."""
    return json.dumps(_canon(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(fingerprint: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    blob = canonical_json({"fingerprint": fingerprint, "request": request})
    return hashlib.sha256(blob.encode()).hexdigest()


COMPLETIONS_PATH = "/v1/completions"


def stored_request(path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a request is cached as: a completions payload as it is (the keys of every cache so
    far), any other route's wrapped with its path (the same body to /v1/chat/completions is
    another request)."""
    return dict(payload) if path == COMPLETIONS_PATH else {"path": path, "body": dict(payload)}


def route_of(request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(path, payload) of a request as `stored_request` cached it."""
    if set(request) == {"path", "body"} and isinstance(request["body"], Mapping):
        return str(request["path"]), dict(request["body"])
    return COMPLETIONS_PATH, dict(request)


class ResponseCache:
    def __init__(self, path: str | Path, *, set_aside_unreadable: bool = True) -> None:
        """Open (or create) the cache at `path`. An unreadable file is renamed aside and replaced
        by an empty cache (`set_aside` names it), or, with `set_aside_unreadable=False`, raised as
        `UnreadableCache`. Errors of the folder itself (no permission) are raised as they come."""
        self.path = Path(path)
        self.set_aside: Path | None = None  # where an unreadable file went
        self.unreadable: str | None = None  # and why it was
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._hits = self._misses = self._puts = 0
        try:
            self._db = self._open()
        except UnreadableCache as exc:
            if not set_aside_unreadable or str(path) == ":memory:":
                raise
            self.unreadable = str(exc)
            self.set_aside = self._move_aside()
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        if str(self.path) != ":memory:":
            _create_private(self.path)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:  # checked before anything is written: a foreign file is set aside as it was
            ok = db.execute("PRAGMA quick_check").fetchone()
            if ok is None or ok[0] != "ok":
                raise UnreadableCache(f"sqlite's quick_check: {ok[0] if ok else 'no answer'}")
            for table, wanted in _COLUMNS.items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if have and not set(wanted) <= have:
                    raise UnreadableCache(f"its table {table} has other columns ({', '.join(sorted(have))})")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            if _is_damage(exc):
                db.close()
                raise UnreadableCache(str(exc)) from exc
            db.close()
            raise  # "unable to open database file", "readonly database": the folder, not the file
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            db.close()
            raise UnreadableCache(str(exc)) from exc
        except UnreadableCache:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        """Rename the unreadable file (and its -wal / -shm) to `<name>.corrupt-<UTC time>`."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        for extra in ("-wal", "-shm"):
            side = Path(str(self.path) + extra)
            if side.exists():
                os.replace(side, Path(str(target) + extra))
        return target

    def get(self, fingerprint: Mapping[str, Any], request: Mapping[str, Any]) -> dict | None:
        """The stored answer, or None: not stored, or a row that does not read back as a JSON
        object (a damaged row is a miss: asked again, and overwritten by the new answer)."""
        key = cache_key(fingerprint, request)
        with self._lock:
            try:
                row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
                value = json.loads(row[0]) if row is not None else None
            except (sqlite3.DatabaseError, ValueError, TypeError):
                value = None
            if not isinstance(value, dict):
                self._misses += 1
                return None
            self._hits += 1
        return value

    def put(
        self, fingerprint: Mapping[str, Any], request: Mapping[str, Any], response: Mapping[str, Any]
    ) -> None:
        if not isinstance(response, Mapping) or "error" in response:
            raise ValueError("only successful responses (JSON objects without an 'error') are cached")
        key = cache_key(fingerprint, request)
        row = (key, canonical_json(fingerprint), canonical_json(request), json.dumps(response), time.time())
        with self._lock, self._writing():
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)
            self._puts += 1

    def keys_of(self, fingerprint: Mapping[str, Any]) -> list[str]:
        """The keys of every answer stored for this server fingerprint (for the identity recheck,
        which picks a few of them to ask again; `entry` reads one)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM responses WHERE fingerprint = ? ORDER BY key", (canonical_json(fingerprint),)
            ).fetchall()
        return [key for (key,) in rows]

    def entry(self, key: str) -> tuple[dict, dict] | None:
        """The (request, response) stored under `key`, or None (gone, or unreadable). Read one at
        a time: a run's answers together may not fit in memory. Counts no hit or miss."""
        with self._lock:
            row = self._db.execute("SELECT request, response FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        request, response = _object(row[0]), _object(row[1])
        return None if request is None or response is None else (request, response)

    def remember_server(self, name: str, fingerprint: Mapping[str, Any]) -> None:
        """Record the fingerprint a named server had, so an offline client can find its entries,
        and keep every one it ever had: keys are content-addressed, so a server back in an earlier
        state finds that state's answers again (`server_fingerprints`)."""
        blob = canonical_json(fingerprint)
        with self._lock, self._writing():
            self._db.execute("INSERT OR REPLACE INTO servers VALUES (?, ?)", (name, blob))
            self._db.execute(
                "INSERT OR REPLACE INTO server_history VALUES (?, ?, ?)", (name, blob, time.time())
            )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write sqlite refuses ("database or disk is full", "disk I/O error", "attempt to write a
        readonly database") as an OutputError naming the file: one line and exit 2, where the bare
        sqlite3.OperationalError was a traceback and exit 1, the regression code."""
        try:
            yield
        except sqlite3.Error as exc:
            raise output_error(self.path, exc) from exc

    def server_fingerprint(self, name: str) -> dict | None:
        """The fingerprint the named server had last (None: never seen, or unreadable)."""
        with self._lock:
            row = self._db.execute("SELECT fingerprint FROM servers WHERE name = ?", (name,)).fetchone()
        return None if row is None else _object(row[0])

    def server_fingerprints(self, name: str) -> list[dict]:
        """Every fingerprint the named server had, the last one first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT fingerprint FROM server_history WHERE name = ? ORDER BY seen DESC", (name,)
            ).fetchall()
        last = self.server_fingerprint(name)
        out = [last] if last is not None else []
        for (blob,) in rows:
            fp = _object(blob)
            if fp is not None and fp not in out:
                out.append(fp)
        return out

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


def _object(blob: Any) -> dict | None:
    try:
        value = json.loads(blob)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _is_damage(exc: sqlite3.OperationalError) -> bool:
    """An OperationalError that says the file is not our cache (vs. one about the folder)."""
    text = str(exc).lower()
    return any(s in text for s in ("no such column", "malformed", "not a database", "no such table"))


def _create_private(path: Path) -> None:
    """Create the file 0600 before sqlite does (sqlite would use the umask, often 0644 or 0664),
    and take away group/other write from an existing one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o022:
            with contextlib.suppress(PermissionError):  # someone else's file: sqlite will say so
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
