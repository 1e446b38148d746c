"""`python -m server_shim serve ...` (one OpenAI-compatible server) and `pair CONFIG.toml`.

User errors (bad flags, a model that cannot load, an impossible quant config) print one line on
stderr and exit 2, never a traceback; tracebacks are for our bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

# Before torch loads libgomp: OpenMP threads that spin-wait (the default) lose their core to any
# other busy process and every parallel region then waits out a scheduler slice. Measured on 2
# cores with one other busy process: configs/external.toml took 457 s spinning, 47 s passive;
# on an idle machine the two are within noise (5 x 96-token requests: 25-27 s vs 27-28 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from server_shim import options  # noqa: E402
from server_shim.errors import ShimError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_LEVELS = options.LOG_LEVELS


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # no prefixes: `--api-key` must not mean `--api-key-env`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m server_shim", description="OpenAI-compatible completions server for difftest"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="serve one model")
    options.add_arguments(s)  # one flag per row of the option table

    w = sub.add_parser("prepare", help="build a model's on-disk cache once (before starting several servers)")
    w.add_argument("--model", required=True, help="preset, HF model folder or .gguf path")
    w.add_argument("--log-level", default="warning", choices=_LEVELS)

    p = sub.add_parser("pair", help="start a reference and its targets from a difftest config")
    p.add_argument("config", help="CONFIG.toml")
    p.add_argument("--log-level", default="info", choices=_LEVELS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "prepare":
        from server_shim.models import prepare_model

        try:
            prepare_model(args.model)
        except ShimError as exc:
            print(f"server_shim: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "pair":
        from server_shim.launch import main_pair

        return main_pair(args.config)

    if not 0 <= args.port <= 65535:
        print(f"server_shim: error: --port {args.port} is not a TCP port", file=sys.stderr)
        return 2
    from server_shim.serve import run_server

    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None and args.api_key_env != options.API_KEY_ENV:
        # named on purpose and empty: serving every route open would be a silent downgrade
        print(
            f"server_shim: error: --api-key-env {args.api_key_env}: that environment variable is not set "
            "(or empty); set it, or leave --api-key-env out to serve without a key",
            file=sys.stderr,
        )
        return 2
    if api_key is not None:
        from server_shim.middleware import check_api_key

        try:
            check_api_key(api_key)  # before the model loads: a key no client can send
        except ShimError as exc:
            print(f"server_shim: error: ${args.api_key_env}: {exc}", file=sys.stderr)
            return 2
    if args.debug and args.host not in _LOOPBACK and api_key is None:
        print(
            f"server_shim: error: --debug on --host {args.host} exposes the model's weights and activations "
            f"to the network; set an API key in ${args.api_key_env} or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if api_key is None and args.host not in _LOOPBACK:
        logging.getLogger("server_shim").warning(
            "no API key ($%s is not set): every route is open to whoever can reach %s",
            args.api_key_env,
            args.host,
        )
    from server_shim.option_rules import refuse_serve_options

    try:  # the rules difftest's config check runs, before any model loads (after the key's own)
        refuse_serve_options(options.from_namespace(args))
    except ShimError as exc:
        print(f"server_shim: error: {exc}", file=sys.stderr)
        return 2
    opts = options.from_namespace(args, api_key=api_key)
    try:
        run_server(opts)
    except ShimError as exc:
        print(f"server_shim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
