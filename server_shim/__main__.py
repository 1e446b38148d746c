"""`python -m server_shim serve ...` (one OpenAI-compatible server) and `pair CONFIG.toml`.

User errors (bad flags, a model that cannot load, an impossible quant config) print one line on
stderr and exit 2, never a traceback; tracebacks are for our bugs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from server_shim.errors import ShimError

_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m server_shim", description="OpenAI-compatible completions server for difftest"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="serve one model")
    s.add_argument(
        "--model", required=True, help="preset (smollm2-135m, tiny-llama, tiny-moe), HF folder or .gguf"
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--batch-invariant", action="store_true", help="serve one sequence at a time: bit-exact")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route")
    s.add_argument("--debug", action="store_true", help="enable the /debug/* white-box routes")
    s.add_argument(
        "--quant", default="none", help="none, fp8-tensor, fp8-token, fp8-block, int8, int4-g128, mxfp4"
    )
    s.add_argument(
        "--quant-skip", action="append", default=[], metavar="GLOB", help="modules left unquantized"
    )
    s.add_argument("--backend", default="auto", help="auto, torch, triton, vendor")
    s.add_argument("--ck-free", action="store_true", help="forbid vendor kernels (fall back to Triton)")
    s.add_argument("--fault", action="append", default=[], metavar="NAME[@GLOB]", help="inject a known bug")
    s.add_argument(
        "--rounding-noise",
        default="0",
        metavar="auto|A",
        help="rounding twin: multiply every linear / MoE output by (1 + A*h), h a value hash in [-1, 1); "
        "auto = the compute dtype's module tolerance (server_shim.tolerance); 0 = off",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the tiny presets' weights")
    s.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    s.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted")
    s.add_argument("--max-n", type=int, default=16, help="largest n accepted")
    s.add_argument("--max-batch-size", type=int, default=32)
    s.add_argument("--log-level", default="info", choices=_LEVELS)

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
    from server_shim.serve import ServeOptions, run_server

    opts = ServeOptions(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        batch_invariant=args.batch_invariant,
        rounding_noise=args.rounding_noise,
        api_key=args.api_key,
        debug=args.debug,
        quant=args.quant,
        quant_skip=tuple(args.quant_skip),
        backend=args.backend,
        ck_free=args.ck_free,
        faults=tuple(args.fault),
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_tokens_cap=args.max_tokens_cap,
        max_n=args.max_n,
        max_batch_size=args.max_batch_size,
        host=args.host,
        port=args.port,
    )
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
