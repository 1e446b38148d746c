"""Which serve options the shim refuses before anything loads, judged from the options alone.

Torch-free, so that difftest's config check runs the same rules on a `[[target]]` table (through
the argv the launcher would give the shim) and names the config line, instead of learning of the
mistake from the server's exit 2 after the other servers have started.

    parse_fault(text)             `NAME[@GLOB]` -> FaultSpec (the one parser of a fault's text)
    refuse_inert_options(opts)    QuantConfigError for flags that contradict each other or do nothing
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server_shim.catalog import FAULTS, SLOT_FAULTS, SLOT_TILE_ROWS
from server_shim.errors import QuantConfigError


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
