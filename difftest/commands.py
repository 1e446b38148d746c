"""One function per `difftest` subcommand; each returns the exit code (see difftest.cli)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from difftest.config import RunConfig, RunSettings, TargetConfig, load_config
from difftest.errors import ConfigError, UsageError
from difftest.prompts import Prompt
from difftest.results import RunResult
from server_shim.launch_spec import ServerSpec


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def _console() -> Console:
    """A terminal keeps its width; a log file or CI step gets wide lines instead of 80 columns."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _finish(run: RunResult, out: Path, problems: list[str]) -> int:
    from difftest.report import write_report
    from difftest.report.terminal import render_summary

    write_report(run, out)
    render_summary(run, _console(), report_dir=out)
    if problems:
        for p in problems:
            print(f"difftest: infrastructure: {p}", file=sys.stderr)
        return 3
    return GATE_EXIT[run.gate]


# 0 every verdict as expected, 1 a verdict contradicts its expectation, 4 inconclusive (an
# undecided check or no informative check, nothing failed): see README "Exit codes".
GATE_EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 4}


# ----------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from difftest.runner import RunOptions, execute

    _positive("--concurrency", args.concurrency)
    _positive("--limit", args.limit)
    cfg = load_config(args.config)
    out = args.out or cfg.run.output_dir
    run, problems = execute(
        cfg, RunOptions(out_dir=out, resume=args.resume, concurrency=args.concurrency, limit=args.limit)
    )
    return _finish(run, out, problems)


# ----------------------------------------------------------------------------- compare


def _url_spec(name: str, url: str, api_key_env: str | None) -> ServerSpec:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{name}: {url!r} is not an http(s) URL")
    if api_key_env and api_key_env not in os.environ:
        raise UsageError(f"--api-key-env {api_key_env}: that environment variable is not set")
    return ServerSpec(name=name, url=url, api_key_env=api_key_env)


def compare_config(args: argparse.Namespace) -> RunConfig:
    ref = _url_spec("reference", args.ref, args.api_key_env)
    golden = _url_spec("golden", args.golden, args.api_key_env) if args.golden else None
    targets = []
    for i, url in enumerate(args.target):
        name = "target" if len(args.target) == 1 else f"target{i + 1}"
        targets.append(
            TargetConfig(server=_url_spec(name, url, args.api_key_env), scheme=args.scheme, golden=golden)
        )
    settings = RunSettings(
        prompts=tuple(args.prompts or ()),
        max_tokens=args.max_tokens,
        logprobs=args.logprobs,
        concurrency=args.concurrency,
        output_dir=args.out,
        limit=args.limit,
    )
    return RunConfig(run=settings, reference=ref, targets=tuple(targets))


def cmd_compare(args: argparse.Namespace) -> int:
    _positive("--concurrency", args.concurrency)
    _positive("--max-tokens", args.max_tokens)
    if not 0 <= args.logprobs <= 20:
        raise UsageError(f"--logprobs must be in 0..20, got {args.logprobs}")
    cfg = compare_config(args)
    if args.prompt:
        return asyncio.run(_explore(cfg, _prompt_texts(args.prompt)))
    from difftest.runner import RunOptions, execute

    run, problems = execute(cfg, RunOptions(out_dir=args.out))
    return _finish(run, args.out, problems)


def _prompt_texts(values: list[str]) -> list[Prompt]:
    texts: list[str] = []
    for v in values:
        texts.append(sys.stdin.read() if v == "-" else v)
    if any(not t.strip() for t in texts):
        raise UsageError("--prompt: empty prompt text")
    return [Prompt(id=f"prompt{i + 1}", prompt=t) for i, t in enumerate(texts)]


async def _explore(cfg: RunConfig, prompts: list[Prompt]) -> int:
    """The quick look: both continuations side by side, first divergence and alternatives."""
    from difftest.cache import ResponseCache
    from difftest.collect import generate
    from difftest.preflight import check_running_async
    from difftest.report.terminal import render_side_by_side
    from difftest.runner import _connect
    from difftest.scoring import score_prompt
    from difftest.verdict import tie_margin_for
    from server_shim.launch import RunningServer

    console = _console()
    specs = [cfg.reference, *(t.server for t in cfg.targets)]
    running = {s.name: RunningServer(name=s.name, url=s.url, spec=s, pid=None, log_path=None) for s in specs}  # type: ignore[arg-type]
    await check_running_async(specs, request_timeout_s=cfg.run.request_timeout_s)  # seconds, not minutes
    cache = ResponseCache(":memory:")
    eps = await _connect(running, cfg, cache, cfg.run.concurrency)
    try:
        ref = eps[cfg.reference.name]
        for p in prompts:
            console.rule(f"{p.id}: {p.prompt[:60]!r}")
            ref_gen = await generate(ref, p, max_tokens=cfg.run.max_tokens, k=cfg.run.logprobs, seed=0)
            for t in cfg.targets:
                tgt_gen = await generate(
                    eps[t.name], p, max_tokens=cfg.run.max_tokens, k=cfg.run.logprobs, seed=0
                )
                if ref_gen.error or tgt_gen.error:
                    console.print(f"request failed: {ref_gen.error or tgt_gen.error}")
                    continue
                d = score_prompt(
                    p,
                    ref_gen,
                    tgt_gen,
                    ref_forced=None,
                    tgt_forced=None,
                    tie_margin=tie_margin_for(None),
                    k=cfg.run.logprobs,
                )
                render_side_by_side(
                    d.ref_tokens, d.tgt_tokens, d.first_divergence,
                    await _alt_texts(ref, d.ref_alternatives), await _alt_texts(eps[t.name], d.tgt_alternatives),
                    console, ref_label=cfg.reference.name, tgt_label=t.name,
                )  # fmt: skip
                if d.divergence_kind:
                    console.print(f"divergence kind: {d.divergence_kind}")
    finally:
        await asyncio.gather(*(ep.client.aclose() for ep in eps.values()))
        cache.close()
    return 0


async def _alt_texts(ep: Any, alts: dict[str, float]) -> dict[str, float]:
    """Alternatives keyed by token id -> keyed by token text (via /detokenize where served)."""
    from difftest.collect import detokenize

    out: dict[str, float] = {}
    for key, lp in alts.items():
        text = await detokenize(ep, int(key)) if key.lstrip("-").isdigit() else None
        out[text if text is not None else key] = lp
    return out


# ----------------------------------------------------------------------------- probe


def cmd_probe(args: argparse.Namespace) -> int:
    from difftest.client import CompletionClient
    from difftest.conformance import probe

    spec = _url_spec("server", args.url, args.api_key_env)
    key = os.environ.get(args.api_key_env) if args.api_key_env else None

    async def go() -> Any:
        async with CompletionClient(spec.url or "", name="server", api_key=key, max_retries=1) as client:
            return await probe(client)

    caps = asyncio.run(go())
    table = Table(title=f"capabilities of {args.url}")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for check, status, detail in caps.table():
        table.add_row(check, status, detail)
    console = _console()
    console.print(table)
    for w in caps.warnings:
        console.print(f"warning: {w}", style="yellow")
    return 0


# ----------------------------------------------------------------------------- noise


def cmd_noise(args: argparse.Namespace) -> int:
    from difftest.noise_run import measure_noise

    _positive("--limit", args.limit)
    cfg = load_config(args.config)
    out = args.out or cfg.run.noise_floor or (Path(cfg.run.output_dir) / "noise-floor.json")
    floor = measure_noise(
        cfg, limit=args.limit, restart=not args.no_restart, log_dir=Path(cfg.run.output_dir) / "noise-logs"
    )
    floor = dataclasses.replace(floor, created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(floor.to_json())
    console = _console()
    console.print(floor.describe())
    for key in ("kl_mean", "kl_p99", "top1_disagreement", "token_mismatch", "tie_margin"):
        console.print(f"  {key}: {getattr(floor, key)}")
    console.print(f'written to {out}; set run.noise_floor = "{out}" in the config to use it')
    return 0


# ----------------------------------------------------------------------------- report


def _threshold_file(path: Path) -> dict[str, dict[str, float]]:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UsageError(f"--thresholds: {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    table = doc.get("thresholds", doc)
    out: dict[str, dict[str, float]] = {}
    for scheme, limits in table.items():
        if not isinstance(limits, dict):
            raise ConfigError(f"{path}: [thresholds.{scheme}] must be a table of metric = number")
        for key, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path}: thresholds.{scheme}.{key} must be a number, got {value!r}")
        out[scheme] = {k: float(v) for k, v in limits.items()}
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """Re-judge (optionally with other thresholds) and re-render from report.json: no servers."""
    from difftest.config import thresholds_for
    from difftest.judge import rejudge
    from difftest.report import load_run
    from difftest.runner import floor_for_target

    run = load_run(args.dir)
    if args.thresholds:
        thresholds = _threshold_file(args.thresholds)
        floor = (
            floor_for_target(run.noise_floor, None)
            if run.noise_floor and "in_run" not in run.noise_floor
            else None
        )
        by_scheme = {t.scheme: thresholds_for(thresholds, t.scheme) for t in run.targets}
        rejudge(run, by_scheme, floor)
        run.signature["thresholds"] = thresholds
        run.signature["rejudged_with"] = str(args.thresholds)
    return _finish(run, args.dir, [])


# ----------------------------------------------------------------------------- white-box


def cmd_layers(args: argparse.Namespace) -> int:
    from difftest.whitebox_cli import layers_command

    return layers_command(args)


def cmd_quant(args: argparse.Namespace) -> int:
    from difftest.whitebox_cli import quant_command

    return quant_command(args)
