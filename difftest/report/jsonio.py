"""report.json: every number of a run, schema-versioned, written atomically.

`difftest report DIR` re-renders from this file without a server, so a half-written file (Ctrl-C,
disk full, a CI job killed mid-write) must never replace a good one: write a temporary file in
the same folder, fsync, then `os.replace` — atomic on POSIX and Windows. Report files are mode
0644 (readable by the CI user's group and a web server; mkstemp alone would leave them 0600).

Schema: `schema_version` changes when a field changes meaning or goes away; fields added with a
default (e.g. PromptDiff.tags) keep the version, since older files still load (missing -> default).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from difftest.errors import UsageError, first_invalid, output_error
from difftest.results import SCHEMA_VERSION, RunResult, finite_for_json

REPORT_MODE = 0o644  # group-readable, never world-writable


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` so that readers see the old file or the new one, never half.
    A lone surrogate (from a hand-edited report.json: servers' are replaced as they are read) is
    written as "?" rather than losing the whole file to a UnicodeEncodeError.

    Raises OutputError naming `path` when it cannot be written (disk full, a folder in its place,
    a file where its folder goes): one line and exit 2, not a traceback after the whole run."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, REPORT_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from exc
        raise
    return path


def strict_json(
    data: Any, indent: int = 1, fallback: Callable[[Any], Any] | None = None, ascii_only: bool = False
) -> str:
    """A result file or --json document as strict JSON: NaN / inf as the strings report.json
    stores ("nan", "inf", "-inf"), paths as text, sets and tuples as lists, objects through their
    `to_dict`, anything else through `fallback` (else a TypeError). Python's default writes a
    bare NaN, which strict readers (jq, a browser's JSON.parse) reject: a layer diff with a point
    not compared made layers.json unreadable to them. `ascii_only` for a stdout whose encoding is
    not known to be UTF-8."""
    text = json.dumps(_plain(data, fallback), indent=indent, ensure_ascii=ascii_only, allow_nan=False)
    return text + "\n"


def _plain(obj: Any, fallback: Callable[[Any], Any] | None) -> Any:
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {k: _plain(v, fallback) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(v, fallback) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return finite_for_json(obj)
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if fallback is not None:
        return _plain(fallback(obj), None)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def run_to_json(run: RunResult) -> str:
    data: dict[str, Any] = run.to_dict()
    data["schema_version"] = SCHEMA_VERSION
    # allow_nan=False: to_dict already stores NaN / inf as strings; a bare NaN would be invalid JSON
    return json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def load_run(path: Path | str) -> RunResult:
    """Read a report.json (or a folder holding one) back into a RunResult.

    Raises UsageError naming the file for a missing file, bad JSON, another schema version, or a
    tree that does not fit the result model. A target's `expect` is the one its verdict is held to
    (see _held_to_expect).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UsageError(f"{path}: no such report (expected a report.json written by `difftest run`)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid report.json ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: not a valid report.json (top level is {type(data).__name__}, not an object)"
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{path}: report schema_version {version!r}, but this difftest reads version {SCHEMA_VERSION}; "
            "re-render it with the difftest version that wrote it, or re-run"
        )
    try:
        run = RunResult.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"{path}: report.json does not fit the result model ({e})") from e
    try:  # from_dict takes fields as they come: a null name or aggregate crashed the renderers later
        _result_types().validate_python(dataclasses.asdict(run))
    except ValidationError as e:
        raise UsageError(f"{path}: report.json does not fit the result model ({first_invalid(e)})") from None
    _held_to_expect(run, path)
    return run


def _held_to_expect(run: RunResult, path: Path) -> None:
    """Each verdict judged against its target's `expect` (the config's key, stored beside it). The
    verdict keeps a copy that decides the gate; a report.json edited in one place only gave
    "FAIL (expected PASS: as expected)" and a PASS gate. An expect other than pass / fail is refused."""
    for i, t in enumerate(run.targets):
        if t.expect not in ("pass", "fail"):
            raise UsageError(f'{path}: targets[{i}].expect is {t.expect!r}, not "pass" or "fail"')
        if t.verdict is not None and t.verdict.expect != t.expect:
            t.verdict = dataclasses.replace(t.verdict, expect=t.expect)


@functools.cache
def _result_types() -> TypeAdapter:
    """The result dataclasses' own type hints, checked by pydantic (built once: ~80 ms)."""
    return TypeAdapter(RunResult)
