"""Which serve options the shim refuses before anything loads, judged from the options alone.

Torch-free, so that difftest's config check runs the same rules on a `[[target]]` table (through
the argv the launcher would give the shim) and names the config line, instead of learning of the
mistake from the server's exit 2 after the other servers have started. The shim runs them too
(at its CLI parse, and serve.build_engine before the model loads): one set of rules, no drift.

    refuse_serve_options(opts)    every rule below, in the order the shim applies them
    refuse_bad_values(opts)       OptionValueError for a value no machine can serve (dtype, device, ...)
    refuse_inert_options(opts)    QuantConfigError for flags that contradict each other or do nothing
    dtype_problem / device_problem / rounding_noise_amplitude   the single-value rules
    model_source(spec)            preset, .gguf file, HF folder, or None (nothing the shim loads)
    parse_fault(text)             `NAME[@GLOB]` -> FaultSpec (the one parser of a fault's text)

Whether a GPU is there (`device = "cuda"` on a CPU-only machine) is a fact of the machine the
server starts on, not of the options: models.resolve_device judges it at load.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server_shim.catalog import FAULTS, SLOT_FAULTS, SLOT_TILE_ROWS
from server_shim.errors import QuantConfigError, ShimError

MODEL_PRESETS = ("smollm2-135m", "tiny-llama", "tiny-moe")  # models.py builds or loads each
# every spelling of a compute dtype the shim loads in -> torch's name of it (models.resolve_dtype)
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip
_DEVICE_RE = re.compile(r"(?:auto|cpu|cuda(?::(?:0|[1-9][0-9]*))?)")  # torch refuses cuda:01


class OptionValueError(ShimError):
    """A serve option's value that no machine can serve; `option` is its name (the config key)."""

    def __init__(self, message: str, *, option: str) -> None:
        super().__init__(message)
        self.option = option


def model_source(spec: str) -> str | None:
    """What the shim loads `spec` as: "preset", "gguf" (a `.gguf` file) or "hf" (a folder holding
    config.json); None where it loads nothing. One rule for the config check and models.load_model:
    the check had taken any existing path, and the shim refused a stray folder after launch."""
    if spec in MODEL_PRESETS:
        return "preset"
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    return None


def dtype_problem(dtype: str) -> str | None:
    """Why `dtype` is no compute dtype of the shim (None: it is one)."""
    if dtype == "auto" or dtype in DTYPE_NAMES:
        return None
    return f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16"


def device_problem(device: str) -> str | None:
    """Why `device` is not spelled as a device the shim serves on: auto, cpu, cuda or cuda:N (None:
    it is). Whether that GPU exists is the load's question (models.resolve_device)."""
    if _DEVICE_RE.fullmatch(device):
        return None
    return f"unknown device {device!r}: use auto, cpu, cuda or cuda:N"


def rounding_noise_amplitude(value: str | float) -> float | None:
    """`--rounding-noise`: `auto` -> None (each module's own tolerance); "" or a number in [0, 1)
    -> that number (0, and "" as the flag's unset value: off). ValueError for anything else."""
    if value == "auto":
        return None
    if value == "":
        return 0.0
    try:
        amplitude = float(value)
    except ValueError:
        amplitude = math.nan
    if not 0.0 <= amplitude < 1.0:
        raise ValueError(f"--rounding-noise must be 'auto' or a number in [0, 1), got {value!r}")
    return amplitude


def refuse_serve_options(opts: Any) -> None:
    """Every rule of this module on `opts` (a ServeOptions, or anything with its fields)."""
    refuse_bad_values(opts)
    refuse_inert_options(opts)


def refuse_bad_values(opts: Any) -> None:
    """Refuse a value the shim would refuse only once it loads its model (after a minute, or after
    every other server of a run has started): an unknown dtype, a misspelt device, a rounding
    noise out of range, a context cap under one token."""
    for option, problem in (("dtype", dtype_problem(opts.dtype)), ("device", device_problem(opts.device))):
        if problem is not None:
            raise OptionValueError(problem, option=option)
    try:
        rounding_noise_amplitude(opts.rounding_noise)
    except ValueError as exc:
        raise OptionValueError(str(exc), option="rounding_noise") from None
    if opts.max_model_len is not None and opts.max_model_len < 1:
        raise OptionValueError(
            f"--max-model-len must be >= 1, got {opts.max_model_len}", option="max_model_len"
        )


@dataclass(frozen=True)
class FaultSpec:
    name: str
    glob: str | None = None


def parse_fault(text: str) -> FaultSpec:
    """`NAME[@GLOB]` -> FaultSpec; an unknown name lists the valid ones. `NAME@` with nothing after
    the @ is refused: it is what `--fault NAME@$MODULE` gives when $MODULE is unset, and read as
    "no glob" it would fault every module where one was meant."""
    name, at, glob = text.strip().partition("@")
    if name not in FAULTS:
        raise QuantConfigError(f"unknown fault {name!r}; valid: {', '.join(FAULTS)}")
    if at and not glob.strip():
        raise QuantConfigError(
            f"fault {text.strip()!r} has an empty glob after '@'; name the modules, or write {name} for all"
        )
    return FaultSpec(name, glob or None)


def refuse_inert_options(opts: Any) -> None:
    """Refuse flags that contradict each other or can do nothing with the others: each would
    otherwise be accepted and ignored, and a run (or a negative control) would claim what it never
    did. `opts`: a ServeOptions (or anything with its fields)."""
    if opts.backend == "vendor" and opts.ck_free:
        raise QuantConfigError("--backend vendor contradicts --ck-free (vendor backends are forbidden)")
    if opts.quant == "none":
        _refuse_backend_without_quant(opts)
    _refuse_inert_slot_faults(opts)


def _refuse_backend_without_quant(opts: Any) -> None:
    """--quant none runs no quantized kernel, so choosing one (or modules to skip) is a mistake. `--backend torch` stays
    allowed: difftest's golden = "auto" launches an unquantized target's golden with it
    (launch_spec.auto_golden), and torch is what an unquantized model runs anyway."""
    if opts.backend in ("triton", "vendor"):
        raise QuantConfigError(
            f"--backend {opts.backend} does nothing with --quant none (no quantized module)"
        )
    if opts.ck_free:
        raise QuantConfigError("--ck-free does nothing with --quant none (no quantized module runs a kernel)")
    if opts.quant_skip:
        raise QuantConfigError("--quant-skip does nothing with --quant none (nothing is quantized)")


def _refuse_inert_slot_faults(opts: Any) -> None:
    """A slot fault acts only on batch rows past slot 0 (slot-tile: past SLOT_TILE_ROWS); with fewer
    rows than that in any forward the faulty server is the correct one, and a negative control built
    on it passes silently. The engine never runs more rows than its slots (one with
    --batch-invariant), neither in decode nor in a prefill chunk."""
    for text in opts.faults:
        name = parse_fault(text).name
        if name not in SLOT_FAULTS:
            continue
        first = SLOT_TILE_ROWS if name == "slot-tile" else 1  # the first batch slot it makes wrong
        if opts.batch_invariant:
            why = "--batch-invariant serves one sequence at a time"
        elif opts.max_batch_size <= first:
            why = f"--max-batch-size {opts.max_batch_size} never fills it; use {first + 1} or more"
        else:
            continue
        raise QuantConfigError(
            f"fault {name} would change nothing: it acts from batch slot {first} on, and {why}"
        )
