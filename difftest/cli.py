"""`difftest` command line. `main() -> int` returns the exit code (Polygraphy's habit):

    0  every target's verdict is what its `expect` says
    1  a verdict failed (the kernel / build regressed)
    2  usage, config, prompts or conformance error (nothing was judged)
    3  infrastructure: a server died or failed to start, or the error rate passed the limit
    4  inconclusive: nothing failed, but a check could not decide (its interval straddles the
       limit, the sample is too small) or no informative check was left

Every error is one line on stderr, never a traceback (`--debug-traceback` shows it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from difftest.errors import UsageError, exit_code_for

log = logging.getLogger("difftest")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad usage is exit 2 with one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="difftest", description="Differential tester for OpenAI-compatible LLM servers.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--debug-traceback", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a config: launch servers, compare, judge, report")
    r.add_argument("config", type=Path)
    r.add_argument("-o", "--out", type=Path, help="report folder (default: run.output_dir of the config)")
    r.add_argument(
        "--resume", action="store_true", help="reuse the folder's response cache: ask only what is missing"
    )
    r.add_argument("-j", "--concurrency", type=int, help="requests in flight per server")
    r.add_argument("--limit", type=int, help="only the first N prompts")

    c = sub.add_parser("compare", help="compare two running servers without a config")
    c.add_argument("--ref", required=True, help="reference server URL")
    c.add_argument("--target", required=True, action="append", help="target server URL (repeatable)")
    c.add_argument("--golden", help="golden server URL (exactness); default: none")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, action="append", help="prompts .jsonl file (repeatable)")
    src.add_argument(
        "--prompt", action="append", help="a prompt text (repeatable; '-' reads stdin): side-by-side view"
    )
    c.add_argument("--scheme", help="budget to judge accuracy with (e.g. fp8-block)")
    c.add_argument("--max-tokens", type=int, default=32)
    c.add_argument("--logprobs", type=int, default=5)
    c.add_argument("-j", "--concurrency", type=int, default=8)
    c.add_argument("-o", "--out", type=Path, default=Path("runs/compare"))
    c.add_argument("--api-key-env", help="environment variable holding the servers' API key")
    c.add_argument("--limit", type=int)

    pr = sub.add_parser("probe", help="conformance / capability table of one server")
    pr.add_argument("url")
    pr.add_argument("--api-key-env")

    n = sub.add_parser("noise", help="measure the reference's A/A noise floor and write it to a file")
    n.add_argument("config", type=Path)
    n.add_argument(
        "-o", "--out", type=Path, help="floor file (default: run.noise_floor or OUTPUT_DIR/noise-floor.json)"
    )
    n.add_argument("--limit", type=int)
    n.add_argument("--no-restart", action="store_true", help="skip the after-restart repetition")

    rp = sub.add_parser("report", help="re-score and re-render a report folder offline (no servers)")
    rp.add_argument("dir", type=Path)
    rp.add_argument("--thresholds", type=Path, help="TOML file with a [thresholds] table to re-judge with")

    ly = sub.add_parser("layers", help="white-box per-layer diff and localisation")
    ly.add_argument("config", nargs="?", type=Path)
    ly.add_argument("--ref")
    ly.add_argument("--target")
    ly.add_argument("--golden")
    ly.add_argument("--prompt", default="The capital of France is Paris. The capital of Germany is")
    ly.add_argument("--api-key-env")

    q = sub.add_parser("quant", help="quantization audit of each target (scale layouts, backends)")
    q.add_argument("config", nargs="?", type=Path)
    q.add_argument("--ref")
    q.add_argument("--target")
    q.add_argument("--api-key-env")
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # progress lines are the one INFO stream shown by default when not on a terminal
    logging.getLogger("difftest.progress").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    traceback = "--debug-traceback" in (argv if argv is not None else sys.argv[1:])
    try:
        args = parser.parse_args(argv)
        _setup_logging(args.verbose)
        from difftest import commands

        handler = getattr(commands, f"cmd_{args.command}")
        return int(handler(args))
    except KeyboardInterrupt:
        print("difftest: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # ours, or the launcher's (server_shim.launch): errors.exit_code_for
        code = exit_code_for(exc)
        if code is None or traceback:
            raise
        print(f"difftest: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
