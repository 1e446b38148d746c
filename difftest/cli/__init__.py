"""`difftest` command line: one module per subcommand, one flag vocabulary (difftest.cli.options).

`main() -> int` returns the exit code:

    0  every target's verdict is what its `expect` says (probe: no check FAIL)
    1  a verdict failed (the kernel / build regressed), or a probe check FAILed
    2  usage, config, prompts, baseline or conformance error (nothing was judged), or an output
       file that cannot be written (disk full, a folder in its place: errors.OutputError)
    3  infrastructure: a server died or failed to start, or the error rate passed the limit
    4  inconclusive: nothing failed, but a check could not decide (its interval straddles the
       limit, the sample is too small) or no informative check was left

Every error is one line on stderr ("difftest: error: ..."), never a traceback
(`--debug-traceback` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from difftest.cli import options as o
from difftest.errors import exit_code_for

log = logging.getLogger("difftest")

# subcommand -> module under difftest.cli (each has HELP, add_arguments(parser), run(args) -> int)
COMMANDS = ("run", "compare", "record", "diff", "probe", "noise", "report", "layers", "quant")


def _version() -> str:
    try:
        return version("difftest")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = o.Parser(prog="difftest", description="Differential tester for OpenAI-compatible LLM servers.")
    p.add_argument("--version", action="version", version=f"difftest {_version()}", help="print the version")
    o.add_global(p, main=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=o.Parser, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"difftest.cli.{name}")
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
        o.add_global(sp)
    return p


class _SafeFormatter(logging.Formatter):
    """Log lines carry servers' words (error bodies, names): their control characters shown
    escaped, as the console shows them, never sent to the terminal raw."""

    def format(self, record: logging.LogRecord) -> str:
        from difftest.textsafe import safe

        return safe(super().format(record))


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    # as before, nothing where the root logger has handlers already (an embedding app, pytest):
    # their formatters are theirs
    logging.basicConfig(level=level, handlers=[handler])
    # progress lines are the one INFO stream shown by default when not on a terminal
    logging.getLogger("difftest.progress").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--debug-traceback" in argv
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help and --version: printed, nothing else to do
            return int(done.code or 0)
        _setup_logging(getattr(args, "verbose", 0) + getattr(args, "verbose_sub", 0))
        module = importlib.import_module(f"difftest.cli.{args.command}")
        return int(module.run(args))
    except KeyboardInterrupt:
        print("difftest: interrupted", file=sys.stderr)
        return 130
    except SystemExit as done:  # the launcher's Terminated: SIGTERM / SIGHUP, servers torn down
        signum = getattr(done, "signum", None)
        if signum is None:
            raise
        print(f"difftest: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return int(done.code or 0)
    except Exception as exc:  # ours, or the launcher's (server_shim.launch): errors.exit_code_for
        code = exit_code_for(exc)
        if code is None:
            raise
        if show_traceback:  # shown, and the exit code kept: a 2 or 3 re-raised became 1, "regressed"
            import traceback

            traceback.print_exc()
        from difftest.textsafe import safe

        message = safe(one_line(str(exc)))  # no raw control characters
        print(f"difftest: error: {message}", file=sys.stderr)
        return code


def one_line(text: str) -> str:
    """`text` on one line: its lines joined by one space, each stripped, the spaces inside a line
    kept. Collapsing every run of whitespace had quoted a prompt of three spaces as ' '."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
