"""`difftest record --ref URL|CONFIG -o DIR`: store the reference's answers in DIR/baseline.json.gz,
to judge targets against later (`compare --baseline DIR`, `[reference] baseline = "DIR"`) without
running the reference again."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftest.cli import options as o
from difftest.errors import UsageError

if TYPE_CHECKING:
    from difftest.baseline import Baseline
    from difftest.config import ServerSpec
    from difftest.prompts import Prompt

HELP = "record the reference's answers once, to judge targets against later without it"
FILE = "baseline.json.gz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ref",
        required=True,
        metavar="URL|CONFIG",
        help="reference server URL, or a run config (its reference)",
    )
    o.add_out(p, f"{FILE} goes there (default: runs/baseline)", default=Path("runs/baseline"))
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace a {FILE} already in DIR (default: refuse, exit 2)"
    )
    p.add_argument(
        "--prompts",
        type=Path,
        action="append",
        metavar="FILE",
        help="prompts .jsonl (repeatable; with a URL)",
    )
    o.add_generation(p, defaults_from="config")
    p.add_argument(
        "--no-batch-slot-check", action="store_true", help="do not record the batch-slot check's answers"
    )
    o.add_endpoint(p)
    o.add_jobs(p, shown="8, or the config's run.concurrency")
    o.add_limit(p)
    o.add_keys(p)
    o.add_timeout(p, "120, or the config's run.request_timeout_s")
    o.add_json(p)


def run(args: argparse.Namespace) -> int:
    from difftest.prompts import load_prompts
    from difftest.runner import folder_lock

    for flag in ("concurrency", "limit", "timeout"):
        o.positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    o.check_generation(args)
    envs = o.key_envs(args.api_key_env)
    is_url = args.ref.startswith(("http://", "https://"))
    if is_url:
        o.check_url("--ref", args.ref)
        if not args.prompts:
            raise UsageError("--prompts FILE is needed with a reference URL")
        from difftest.config import RunSettings

        run_cfg = RunSettings(prompts=tuple(args.prompts))
        spec = None
        name = "reference"
        o.check_key_servers(envs, [name])
    else:
        from difftest.cli.run import with_overrides
        from difftest.config import load_config

        cfg = with_overrides(load_config(args.ref), args, reference_only=True)
        if cfg.baseline is not None:
            raise UsageError(f"{args.ref}: its reference is already a baseline ({cfg.baseline})")
        run_cfg, spec, name = cfg.run, cfg.reference, cfg.reference.name
    settings = {
        "max_tokens": args.max_tokens or run_cfg.max_tokens,
        "logprobs": run_cfg.logprobs if args.logprobs is None else args.logprobs,
        "seed": run_cfg.seed if args.seed is None else args.seed,
        "endpoint": args.endpoint or run_cfg.endpoint,
    }
    prompts = load_prompts(
        args.prompts or run_cfg.prompts, limit=args.limit or run_cfg.limit, endpoint=settings["endpoint"]
    )
    kw = {
        "timeout_s": args.timeout or run_cfg.request_timeout_s,
        "max_retries": run_cfg.max_retries,
        "concurrency": args.concurrency or run_cfg.concurrency,
        "batch_slot_check": run_cfg.batch_slot_check and not args.no_batch_slot_check,
    }
    out = Path(args.out) / FILE
    _check_writable(out)
    with folder_lock(_made_folder(out.parent)):  # a second record or run into DIR: exit 2, nothing asked
        if out.exists() and not args.overwrite:  # it may be the only copy: the reference can be gone
            raise UsageError(f"{out} already holds a recorded baseline; give another -o DIR, or --overwrite")
        base = _ask_reference(args, spec, name, envs, prompts, settings, kw)
        base.write(out, overwrite=args.overwrite)  # one that appeared meanwhile is kept all the same
    failed = base.reference.get("failed_generations", 0)
    # past the run's error_rate_limit every judgement replayed from this recording is exit 3: say so
    # now (exit 3, kept on disk) rather than at each later compare
    too_many = failed > run_cfg.error_rate_limit * len(prompts)
    summary = {
        "exit_code": 3 if too_many else 0,
        "baseline": str(out),
        "prompts": len(prompts),
        "failed_generations": failed,
        "exchanges": sum(len(r) for r in base.exchanges.table.values()),
        "settings": settings,
        "reference": base.reference,
        "warnings": recording_warnings(base.capabilities.get("warnings", [])),
        "note": BLACK_BOX,
    }
    if args.json:
        o.emit_json(summary)
    else:
        con = o.console()
        con.print(f"recorded {len(prompts)} prompts of {name} ({base.reference.get('model')}) to {out}")
        for w in summary["warnings"]:
            con.print(f"warning: {w}", style="yellow")
        con.print(f"note: {BLACK_BOX}")
        if too_many:
            print(f"difftest: infrastructure: {failed} of {len(prompts)} generations failed (over the "
                  f"error_rate_limit {run_cfg.error_rate_limit:g}); the recording is kept", file=sys.stderr)  # fmt: skip
        con.print(f"judge a target against it: difftest compare --baseline {args.out} --target URL")
    return int(summary["exit_code"])


def _ask_reference(
    args: argparse.Namespace,
    spec: ServerSpec | None,
    name: str,
    envs: dict[str, str],
    prompts: list[Prompt],
    settings: dict[str, Any],
    kw: dict[str, Any],
) -> Baseline:
    """The recording: of the URL given (spec None), of the config's url reference, or of the
    server the config launches (its log in DIR/logs)."""
    from difftest.recording import record
    from difftest.session import url_model

    if spec is None or spec.kind == "url":
        url = args.ref if spec is None else spec.url
        key = o.key_for(envs, name) if spec is None or spec.api_key_env is None else _env(spec.api_key_env)
        return record(name, url, prompts, settings, api_key=key, model=spec and url_model(spec), **kw)
    from difftest.session import launch_shown

    with launch_shown([spec], log_dir=Path(args.out) / "logs") as running:
        key = _env(spec.api_key_env) if spec.api_key_env else o.key_for(envs, name)
        return record(name, running[name].url, prompts, settings, api_key=key, **kw)


def _made_folder(folder: Path) -> Path:
    """`folder`, created now: it holds the lock for the whole recording, not only the file at its
    end. A folder that cannot be made is one line, exit 2, before anything is asked."""
    from difftest.errors import output_error

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    return folder


# the recorder answers /debug itself (404) so the baseline replays as the black-box server it is:
# the probe's "no debug protocol" is then about the recording, whatever the live server serves
BLACK_BOX = "a baseline is black-box: white-box checks (layers, quant audit) need a live reference"


def recording_warnings(warnings: list[str]) -> list[str]:
    """The probe's warnings as they apply to the recording: its "no debug protocol" is the
    recorder's own 404, said once as BLACK_BOX instead of as a fault of the live server."""
    from difftest.conformance import WARNINGS

    return [w for w in warnings if w != WARNINGS["no_debug"]]


def _check_writable(out: Path) -> None:
    """Refuse, before the reference is asked anything, a file that could not be written once the
    whole recording is done: a folder in its place (--overwrite replaces a file, never a folder)
    or a file where one of its folders goes."""
    from difftest.errors import OutputError

    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(out, f"{parent} is a file, not a folder")
    if out.exists() and not out.is_file():
        raise OutputError(
            out, "a folder (or other non-file) stands in its place; remove it or give another -o DIR"
        )


def _env(var: str) -> str | None:
    import os

    return os.environ.get(var)
