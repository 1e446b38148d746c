"""`difftest noise CONFIG`: measure the reference's A/A noise floor into OUT/noise-floor.json."""

from __future__ import annotations

import argparse
import dataclasses
import os
from datetime import UTC, datetime
from pathlib import Path

from difftest.cli import options as o
from difftest.cli.run import with_overrides
from difftest.config import load_config
from difftest.errors import InfraError, UsageError, output_error

HELP = "measure the reference's A/A noise floor into DIR/noise-floor.json (-o DIR)"
FLOOR_FILE = "noise-floor.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the run's TOML config (its reference is measured)")
    o.add_out(
        p, f"{FLOOR_FILE} goes there (default: written to run.noise_floor itself, else into run.output_dir)"
    )
    o.add_limit(p)
    p.add_argument("--no-restart", action="store_true", help="skip the after-restart repetition")
    o.add_jobs(p)
    o.add_timeout(p, "the config's run.request_timeout_s")
    o.add_keys(p, "for running servers (url) without their own api_key_env")
    o.add_json(p)


# tie_margin is measured at A/A divergences: where the reference never diverged from itself
NO_DIVERGENCE = "n/a (no A/A divergence)"


def run(args: argparse.Namespace) -> int:
    from difftest.noise_run import measure_noise

    o.positive("--limit", args.limit)
    o.positive("--concurrency", args.concurrency)
    o.positive("--timeout", args.timeout)
    cfg = with_overrides(
        load_config(args.config, require_targets=False), args, reference_only=True
    )  # the reference alone
    if cfg.baseline is not None:
        raise UsageError(f"{args.config}: the reference is a recorded baseline; its noise is measured live")
    path, key = floor_destination(args.out, cfg.run.noise_floor, Path(cfg.run.output_dir))
    why = floor_file_problem(path)
    if why is not None:  # now, not as a traceback after minutes of measuring
        raise UsageError(f"{key}: cannot write {path}: {why}")
    # the logs go with the floor into the folder the user named, not the config's output_dir
    logs = Path(args.out if args.out is not None else cfg.run.output_dir) / "noise-logs"
    floor = measure_noise(cfg, limit=args.limit, restart=not args.no_restart, log_dir=logs)
    floor = dataclasses.replace(floor, created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    if floor.failed_requests > cfg.run.error_rate_limit * max(floor.n_prompts, 1):
        # a floor measured on lost answers sets limits from the wrong thing: none is written
        raise InfraError(
            f"{floor.failed_requests} of {floor.n_prompts} A/A requests failed (over the error_rate_limit "
            f"{cfg.run.error_rate_limit:g}): no noise floor written"
        )
    try:  # checked above, but the disk may fill (or the folder change) while measuring
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(floor.to_json())
    except OSError as exc:
        raise output_error(path, exc) from None
    if args.json:
        o.emit_json({"exit_code": 0, "floor_file": str(path), "floor": floor.to_dict()})
        return 0
    from difftest.noise import CI_HIGH

    con = o.console()
    con.print(floor.describe())
    for key in ("kl_mean", "kl_p99", "top1_disagreement", "token_mismatch", "tie_margin", "failed_requests"):
        value = getattr(floor, key)
        missing = NO_DIVERGENCE if key == "tie_margin" else "n/a (not measured)"
        high = getattr(floor, CI_HIGH[key]) if key in CI_HIGH else None
        bound = "" if high is None else f" (upper 95% bound {high:g}: what the limits rest on)"
        con.print(f"  {key}: {missing if value is None else f'{value:g}'}{bound}")
    setting = config_relative(path, args.config)
    con.print(f'written to {path}; set run.noise_floor = "{setting}" in the config to use it')
    return 0


def floor_destination(out: Path | None, noise_floor: Path | None, output_dir: Path) -> tuple[Path, str]:
    """Where the floor file goes, and the setting that put it there (errors name it)."""
    if out is not None:
        return Path(out) / FLOOR_FILE, "-o"
    if noise_floor is not None:
        return Path(noise_floor), "run.noise_floor"
    return output_dir / FLOOR_FILE, "run.output_dir"


def floor_file_problem(path: Path) -> str | None:
    """Why the floor file cannot be written at `path` (None: it can): a folder in its place, a file
    there that may not be replaced, or a parent folder that cannot be made or written into."""
    if path.is_dir():
        return "a folder stands in its place"
    if path.exists() and not os.access(path, os.W_OK):
        return "permission denied"
    return o.output_folder_problem(path.parent)


def config_relative(path: Path, config: Path) -> Path:
    """`path` as the config would name it: relative to the config's folder (config paths are, not
    to the working directory), else absolute."""
    try:
        return path.resolve().relative_to(config.resolve().parent)
    except ValueError:
        return path.resolve()
