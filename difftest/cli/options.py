"""The one flag vocabulary every subcommand shares, and the helpers commands print with.

    -o DIR            output folder (always a folder)
    --json            machine-readable result on stdout instead of tables
    -j N              requests in flight per server
    --timeout S       per-request timeout in seconds
    --api-key-env     [SERVER=]VAR: the API key's environment variable (default OPENAI_API_KEY)
    -v / -vv          more logging, before or after the subcommand
    --debug-traceback tracebacks instead of one-line errors

Why one module: the flags mean the same everywhere only if they are defined once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.segment import Segment

from difftest.config import LOGPROBS_WHY, url_problem
from difftest.errors import UsageError
from difftest.textsafe import safe
from server_shim.catalog import SCHEMES
from server_shim.launch_spec import did_you_mean

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
PIPED_WIDTH = 240  # a log file or CI step: wide enough that no table cell is cut to "…"


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad usage is exit 2 with one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.removeprefix("difftest").strip()
        raise UsageError(f"{sub}: {message}" if sub else message)


class _CountVerbose(argparse.Action):
    """`-v` counted wherever it appears: the main parser and each subparser add to one total."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, getattr(namespace, self.dest, 0) + 1)


def add_global(p: argparse.ArgumentParser, *, main: bool = False) -> None:
    """-v and --debug-traceback, on the main parser and on every subcommand."""
    dest = "verbose" if main else "verbose_sub"
    p.add_argument("-v", "--verbose", dest=dest, action=_CountVerbose, help="more logging (-vv: debug)")
    p.add_argument(
        "--debug-traceback",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error instead of one line",
    )


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="print the result as one JSON document on stdout (no tables)"
    )


def out_folder(text: str) -> Path:
    """-o: a folder, existing or to be made (argparse type): a file there, or a folder that cannot
    be made, is refused up front, not after the run's requests when the first write fails."""
    if not text.strip():  # `-o "$OUT"` with OUT unset: Path("") is ".", the report went into the cwd
        raise argparse.ArgumentTypeError("empty path (an unset variable?); give a folder, e.g. -o runs/x")
    path = Path(text)
    why = output_folder_problem(path)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return path


def output_folder_problem(path: Path) -> str | None:
    """Why `path` cannot hold a report (None: it can): a file there, a folder mkdir refuses, or an
    existing folder no file can be created in (read-only, immutable, another user's): refused now,
    not as a traceback when the cache is opened."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    if path.is_dir():
        why = writable_problem(path)
        return None if why is None else f"cannot write into folder {path}: {why}"
    why = folder_problem(path)
    return None if why is None else f"cannot create folder {path}: {why}"


def writable_problem(path: Path) -> str | None:
    """Why no file can be made in the existing folder `path` (None: one can). os.access first (it
    knows read-only mounts and immutable folders, even for root), then a probe file for what it
    does not know (ACLs, network file systems)."""
    if not os.access(path, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        fd, probe = tempfile.mkstemp(prefix=".difftest-probe-", dir=path)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be made a folder (None: it is one, or can be). Tried for real, by making the
    missing folders and removing them again: only mkdir knows (/proc, read-only mounts)."""
    missing: list[Path] = []
    parent = path.absolute()
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def check_folder(flag: str, path: Path) -> None:
    """`output_folder_problem` as a usage error, for output folders from a config, not from -o."""
    why = output_folder_problem(path)
    if why is not None:
        raise UsageError(f"{flag}: {why}")


def http_url(text: str) -> str:
    """A server URL (argparse type): a bad port or host is refused here, not a traceback (or an
    exit 3 "server down") at the first request."""
    why = url_problem(text)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return text


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: bytes that were not UTF-8 in argv or stdin, which
    no request can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prompt_arg(text: str) -> str:
    """--prompt TEXT (argparse type): text that is not UTF-8 is refused before any request."""
    if not is_utf8(text):
        raise argparse.ArgumentTypeError("prompt is not valid UTF-8")
    return text


def stdin_text() -> str:
    """`--prompt -`: stdin's text less one final line break, as the shell's `$(...)` reads it
    (`echo TEXT | difftest compare --prompt -` had asked for "TEXT\n", another continuation than
    `--prompt TEXT`); bytes that are not UTF-8 (a decode error, or surrogates where stdin escapes
    them) are a usage error, not a traceback when the request is encoded."""
    bad = UsageError("--prompt -: prompt is not valid UTF-8")
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError:
        raise bad from None
    if not is_utf8(text):
        raise bad
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


def add_out(p: argparse.ArgumentParser, what: str, default: Path | None = None) -> None:
    p.add_argument(
        "-o", "--out", type=out_folder, default=default, metavar="DIR", help=f"output folder: {what}"
    )


def describe_out(p: argparse.ArgumentParser, what: str) -> None:
    """Reword an -o a shared helper added, for a command whose folder holds something else (its
    help must say what lands there, and when)."""
    for action in p._actions:
        if "--out" in action.option_strings:
            action.help = f"output folder: {what}"
            return
    raise ValueError(f"{p.prog} has no -o/--out to describe")


def result_out_help(result_file: str, logs_default: Path) -> str:
    """-o of `quant` / `layers`: their JSON result is written only where -o names a folder (the
    shared help said it defaulted to runs/whitebox, where only launched servers' logs go)."""
    return (
        f"DIR/{result_file}, written only when -o is given; launched servers' logs go to DIR/logs "
        f"(default: {logs_default})"
    )


def add_jobs(p: argparse.ArgumentParser, default: int | None = None, shown: str = "") -> None:
    shown = (
        f" (default: {shown or default})" if shown or default else " (default: the config's run.concurrency)"
    )
    p.add_argument(
        "-j",
        "--concurrency",
        type=int,
        default=default,
        metavar="N",
        help="requests in flight per server" + shown,
    )


def seconds(text: str) -> float:
    """A finite number of seconds over 0 (argparse type): nan and inf are floats, not timeouts."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def scheme(text: str) -> str:
    """A quantization scheme whose budget judges accuracy (argparse type): refused before any
    request is sent, not after every answer is in."""
    if text not in SCHEMES:
        raise argparse.ArgumentTypeError(
            f"unknown scheme {text!r} (known: {', '.join(SCHEMES)}){did_you_mean(text, SCHEMES)}"
        )
    return text


def add_timeout(p: argparse.ArgumentParser, default_text: str) -> None:
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help=f"timeout of one request in seconds (default: {default_text})",
    )


def add_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        help="compare over /v1/completions or /v1/chat/completions (chat: no teacher forcing) "
        "(default: completions, or the baseline's / config's)",
    )


def add_generation(p: argparse.ArgumentParser, *, defaults_from: str) -> None:
    """--max-tokens, --logprobs, --seed: unset ones come from `defaults_from` (a config, a baseline)."""
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help=f"tokens generated per prompt (default: 32, or the {defaults_from}'s)",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="K",
        help=f"top-k logprobs per position, 1..20 (default: 5, or the {defaults_from}'s)",
    )
    p.add_argument(
        "--seed", type=int, metavar="N", help=f"request seed (default: 0, or the {defaults_from}'s)"
    )


def add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N prompts")


def add_keys(p: argparse.ArgumentParser, scope: str = "") -> None:
    p.add_argument(
        "--api-key-env",
        action="append",
        default=[],
        metavar="[SERVER=]VAR",
        help="environment variable holding the API key; VAR for every server, SERVER=VAR for one "
        f"(reference, target, golden, ...); repeatable (default: {DEFAULT_KEY_ENV} when set)"
        + (f"; {scope}" if scope else ""),
    )


# ----------------------------------------------------------------------------- checks


def check_generation(args: argparse.Namespace) -> None:
    """The ranges of `add_generation`'s flags. The seed also seeds the bootstrap intervals
    (numpy takes no negative seed): caught here, not after minutes of requests."""
    positive("--max-tokens", args.max_tokens)
    if args.logprobs is not None and not 1 <= args.logprobs <= 20:
        raise UsageError(f"--logprobs must be in 1..20 ({LOGPROBS_WHY}), got {args.logprobs}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be > 0, got {value}")


def check_url(flag: str, url: str | None) -> None:
    why = None if url is None else url_problem(url)
    if why is not None:
        raise UsageError(f"{flag}: {why}")


def key_envs(values: Sequence[str]) -> dict[str, str]:
    """--api-key-env values -> {server name or "*": variable}; every variable must be set."""
    out: dict[str, str] = {}
    for v in values:
        server, _, var = v.rpartition("=")
        if not var:
            raise UsageError(f"--api-key-env {v!r}: give VAR or SERVER=VAR")
        if var not in os.environ:
            raise UsageError(f"--api-key-env {v}: environment variable {var} is not set")
        out[server or "*"] = var
    return out


_NUMBERED = re.compile(r"(.+?)\d+")  # compare's targets with several --target: target1, target2, ...


def check_key_servers(envs: dict[str, str], servers: Sequence[str]) -> None:
    """Every SERVER of --api-key-env SERVER=VAR must be a server of this command (a typo, or
    `target` with several targets, used to give no server a key, silently)."""
    families = {m.group(1) for name in servers if (m := _NUMBERED.fullmatch(name))}
    for name in envs:
        if name != "*" and name not in servers and name not in families:
            raise UsageError(
                f"--api-key-env {name}={envs[name]}: no server is named {name!r} here "
                f"(servers: {', '.join(servers)})"
            )


def check_key_takers(envs: dict[str, str], refusals: Mapping[str, str | None]) -> None:
    """Every SERVER of --api-key-env SERVER=VAR must be one the flag gives a key to: `refusals`
    maps each server to why it takes none (None: it takes one). A launched shim named there was
    accepted and given nothing, silently. A family (`target` for target1, target2) is refused
    only when none of its servers takes the key."""
    for name, var in envs.items():
        if name == "*":
            continue
        members = [name] if name in refusals else [s for s in refusals if _family(s) == name]
        whys = [refusals[s] for s in members]
        if members and all(why is not None for why in whys):
            raise UsageError(
                f"--api-key-env {name}={var}: server {members[0]!r} takes no key from this flag: {whys[0]}"
            )


def _family(server: str) -> str | None:
    numbered = _NUMBERED.fullmatch(server)
    return numbered.group(1) if numbered else None


def key_env_for(envs: dict[str, str], server: str) -> str | None:
    """The variable to read `server`'s key from: its own, its family's (`target` for target1,
    target2, ...), the common one, else OPENAI_API_KEY if set."""
    if server in envs:
        return envs[server]
    numbered = _NUMBERED.fullmatch(server)
    if numbered and numbered.group(1) in envs:
        return envs[numbered.group(1)]
    if "*" in envs:
        return envs["*"]
    return DEFAULT_KEY_ENV if os.environ.get(DEFAULT_KEY_ENV) else None


def key_for(envs: dict[str, str], server: str) -> str | None:
    var = key_env_for(envs, server)
    return os.environ.get(var) if var else None


# ----------------------------------------------------------------------------- output


class TerminalConsole(Console):
    """A console that prints servers' text as text: no markup or emoji codes read from it (a model
    named "llama[/]" was a MarkupError traceback), and control characters in any printed text
    (ESC sequences that clear the screen or retitle the window, C1, bidi overrides) shown escaped."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, **kwargs)

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # the last step before the stream: every text segment (tables, Text, str) passes here;
        # rich's own control segments (cursor moves) do not carry text
        return super()._render_buffer(
            Segment(safe(seg.text), seg.style) if seg.control is None else seg for seg in buffer
        )


def console() -> Console:
    """A terminal keeps its width; a pipe, log file or CI step gets wide lines (no cut cells)."""
    if sys.stdout.isatty():
        return TerminalConsole()
    cols = os.environ.get("COLUMNS", "")
    return TerminalConsole(width=max(PIPED_WIDTH, int(cols) if cols.isdigit() else 0))


def emit_json(data: Any) -> None:
    """The --json result: one document on stdout (progress and logs stay on stderr)."""
    from difftest.report.jsonio import strict_json

    sys.stdout.write(strict_json(data, indent=2, ascii_only=True))
    sys.stdout.flush()
