"""The shim's options: one table, from which every other form is derived.

    OPTIONS            the table: name, kind, default, help, argv flag, whether it is a spec key
    ServeOptions       the dataclass `serve` runs with (one field per row, plus the resolved api_key)
    add_arguments      the `serve` argparse flags
    argv_for           the flags the launcher passes for a [reference] / [[target]] table's values
    SPEC_OPTIONS       the rows that are also keys of a config's server table (launch_spec.ServerSpec)

Adding an option is one row here plus the code that uses its value; the config key, the flag, the
launcher's argv, the dataclass field and the help text follow. Torch-free: difftest validates a
config against this table without loading a model (docs/design.md, "Boundaries").
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from server_shim.catalog import BACKENDS, SCHEMES

# Kinds: how a value is typed in TOML (launch_spec.check_type) and parsed from argv.
STRING, BOOLEAN, INTEGER, NUMBER, STRINGS = "string", "boolean", "integer", "number", "strings"
_PY = {STRING: str, BOOLEAN: bool, INTEGER: int, NUMBER: float, STRINGS: tuple}

API_KEY_ENV = "DIFFTEST_SHIM_API_KEY"  # where `serve` reads its key unless --api-key-env names another
LOG_LEVELS = ("debug", "info", "warning", "error")
# torch.manual_seed's range, unsigned: a larger seed crashed the tiny presets' load with a traceback
# (exit 3 from difftest) where the flag's check is a one-line exit 2, and the config check's too
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class Option:
    name: str  # the dataclass field and, when `spec`, the TOML key
    kind: str  # STRING, BOOLEAN, INTEGER, NUMBER or STRINGS (repeatable flag)
    default: Any
    help: str
    spec: bool = False  # also a key of a config's shim server table, passed on by the launcher
    flag: str = ""  # default: --name-with-dashes
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    required: bool = False
    optional: bool = False  # None is a value (no flag given): e.g. no context cap
    minimum: int | None = None  # integers: the smallest accepted value (argparse refuses less, exit 2)
    maximum: int | None = None  # integers: the largest accepted value (likewise)

    @property
    def argv_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("model", STRING, None, "preset (smollm2-135m, tiny-llama, tiny-moe), HF folder or .gguf", required=True),
    Option("host", STRING, "127.0.0.1", "bind address; anything but loopback exposes the server to the network"),
    Option("port", INTEGER, 8000, "TCP port"),
    Option("dtype", STRING, "auto", "auto, float32, bfloat16, float16", spec=True),
    Option("device", STRING, "auto", "auto, cpu, cuda, cuda:N", spec=True),
    Option("quant", STRING, "none", "quantization scheme", spec=True, choices=SCHEMES),
    Option("quant_skip", STRINGS, (), "modules left unquantized (repeatable)", spec=True, metavar="GLOB"),
    Option("backend", STRING, "auto", "kernel backend of quantized modules", spec=True, choices=BACKENDS),
    Option("ck_free", BOOLEAN, False, "forbid vendor kernels (fall back to Triton)", spec=True),
    Option("faults", STRINGS, (), "inject a known bug (repeatable)", spec=True, flag="--fault", metavar="NAME[@GLOB]"),
    Option("batch_invariant", BOOLEAN, False, "serve one sequence at a time: bit-exact", spec=True),
    Option(
        "rounding_noise", STRING, "0",
        "rounding twin: multiply every linear / MoE output by (1 + A*h), h a value hash in [-1, 1); "
        "auto = each module's tolerance max(2u, sqrt(K) u_fp32) (server_shim.tolerance); 0 = off",
        spec=True, metavar="auto|A",
    ),
    Option("debug", BOOLEAN, False, "enable the /debug/* white-box routes", spec=True),
    Option(
        "seed", INTEGER, 0, "seed of the tiny presets' weights and of the rounding twin's hash", spec=True,
        minimum=0, maximum=SEED_MAX,
    ),
    Option(
        "api_key_env", STRING, API_KEY_ENV,
        "environment variable holding the API key; when it is set, every route but /health needs "
        "`Authorization: Bearer KEY` (never a flag: a command line is public in ps)",
        metavar="NAME",
    ),
    Option("max_model_len", INTEGER, None, "cap the context length", optional=True, minimum=1),
    Option("max_tokens_cap", INTEGER, 4096, "largest max_tokens accepted", minimum=1),
    Option("max_n", INTEGER, 16, "largest n accepted", minimum=1),
    Option("max_batch_size", INTEGER, 32, "most sequences decoded together (KV-cache slots)", minimum=1),
    Option(
        "no_cuda_graphs", BOOLEAN, False,
        "decode eagerly on CUDA instead of replaying captured CUDA graphs (also: DIFFTEST_CUDA_GRAPHS=0)",
        spec=True,
    ),
    Option(
        "no_fused_decode", BOOLEAN, False,
        "decode on a GPU through the model's own attention, RMSNorm and rotary instead of one Triton kernel each (also: DIFFTEST_FUSED_DECODE=0)",
        spec=True,
    ),
    Option("max_waiting", INTEGER, 256, "sequences queued behind the running batch before requests get 429", minimum=1),
    Option("max_body_bytes", INTEGER, 8 * 2**20, "largest request body, on every route (413 past it)", minimum=1),
    Option("max_prompt_chars", INTEGER, 2**20, "longest text prompt or message content, in characters", minimum=1),
    Option("max_stop_strings", INTEGER, 16, "most stop strings in one request", minimum=1),
    Option("max_stop_chars", INTEGER, 1024, "longest stop string, in characters", minimum=1),
    Option("log_level", STRING, "info", "log level", choices=LOG_LEVELS),
)  # fmt: skip
BY_NAME = {o.name: o for o in OPTIONS}
SPEC_OPTIONS = tuple(o for o in OPTIONS if o.spec)


def _field(o: Option) -> tuple[str, Any, Any]:
    typ = _PY[o.kind] | None if o.optional or o.required else _PY[o.kind]
    return o.name, typ, dataclasses.field(default=o.default)


_REQUIRED = [(o.name, _PY[o.kind]) for o in OPTIONS if o.required]
ServeOptions = dataclasses.make_dataclass(
    "ServeOptions",
    [*_REQUIRED, *(_field(o) for o in OPTIONS if not o.required), ("api_key", str | None, None)],
    namespace={
        "__doc__": "Everything `serve` runs with: one field per row of OPTIONS, plus `api_key` (read from "
        "the environment variable that `api_key_env` names, never from argv).",
        "__module__": __name__,
    },
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags, one per row."""
    for o in OPTIONS:
        kw: dict[str, Any] = {"help": o.help, "dest": o.name}
        if o.kind == BOOLEAN:
            kw["action"] = "store_true"
        elif o.kind == STRINGS:
            kw.update(action="append", default=[], metavar=o.metavar)
        else:
            bounded = o.minimum is not None or o.maximum is not None
            typ = _bounded(o.minimum, o.maximum, o.argv_flag) if bounded else _PY[o.kind]
            kw.update(type=typ, default=o.default, metavar=o.metavar, choices=o.choices)
            kw["required"] = o.required
        if o.default not in (None, (), False, "") and o.kind != BOOLEAN:
            kw["help"] += f" (default {o.default})"
        parser.add_argument(o.argv_flag, **{k: v for k, v in kw.items() if v is not None})


def _bounded(minimum: int | None, maximum: int | None, flag: str) -> Any:
    def parse(text: str) -> int:
        value = int(text)  # ValueError: argparse reports "invalid ... value"
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{flag} must be <= {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def from_namespace(args: argparse.Namespace, api_key: str | None = None) -> Any:
    """ServeOptions from parsed `serve` flags."""
    values = {o.name: getattr(args, o.name) for o in OPTIONS}
    for o in OPTIONS:
        if o.kind == STRINGS:
            values[o.name] = tuple(values[o.name])
    return ServeOptions(**values, api_key=api_key)


def argv_for(values: Any) -> list[str]:
    """The flags for the spec options of `values` (a ServerSpec), defaults left out."""
    argv: list[str] = []
    for o in SPEC_OPTIONS:
        value = getattr(values, o.name)
        if value == o.default or value is None:
            continue
        if o.kind == BOOLEAN:
            argv.append(o.argv_flag)
        elif o.kind == STRINGS:
            for item in value:
                argv += [o.argv_flag, str(item)]
        else:
            argv += [o.argv_flag, str(value)]
    return argv
