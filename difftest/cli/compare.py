"""`difftest compare`: two (or more) running servers, no config.

difftest compare --ref URL --target URL --prompts FILE      full comparison, report folder
difftest compare --ref URL --target URL --prompt TEXT       the quick look, side by side
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftest import aio
from difftest.baseline import Baseline
from difftest.cli import options as o
from difftest.cli.outcome import execute_and_finish
from difftest.config import RunConfig, RunSettings, TargetConfig
from difftest.errors import UsageError
from difftest.prompts import Prompt
from server_shim.launch_spec import ServerSpec

if TYPE_CHECKING:
    from collections.abc import Mapping

    from rich.console import Console

    from difftest.collect import Endpoint, Generation
    from difftest.retokenize import Retokenizer

HELP = "compare running servers without a config"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_OUT = Path("runs/compare")
QUICKLOOK_FILE = "quicklook.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", type=o.http_url, metavar="URL", help="reference server URL")
    ref.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="a recorded reference (`difftest record`) instead of --ref; its prompts and settings by default",
    )
    p.add_argument(
        "--target",
        required=True,
        action="append",
        type=o.http_url,
        metavar="URL",
        help="target server URL (repeatable)",
    )
    p.add_argument(
        "--golden", type=o.http_url, metavar="URL", help="golden server URL, for exactness (default: none)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompts", type=Path, action="append", metavar="FILE", help="prompts .jsonl (repeatable)"
    )
    src.add_argument(
        "--prompt",
        action="append",
        type=o.prompt_arg,
        metavar="TEXT",
        help="a prompt text (repeatable; '-' reads stdin, less one final line break): side by side",
    )
    p.add_argument(
        "--scheme",
        type=o.scheme,
        # the runner reads a missing scheme off the target's /debug/config: "none" only as a last resort
        help="budget to judge accuracy with (e.g. fp8-block; default: the scheme the target's "
        "/debug/config reports, else none)",
    )
    o.add_generation(p, defaults_from="baseline")
    o.add_endpoint(p)
    o.add_jobs(p, default=8)
    o.add_out(p, "report (default: runs/compare); with --prompt: quicklook.json")
    o.add_keys(p)
    o.add_limit(p)
    o.add_timeout(p, f"{DEFAULT_TIMEOUT_S:g}")
    o.add_json(p)


# compare's servers run already: a URL that refuses connections gets this long, not a launch's 600 s
COMPARE_STARTUP_S = 30.0


def url_spec(name: str, url: str, envs: dict[str, str]) -> ServerSpec:
    o.check_url(name, url)
    return ServerSpec(
        name=name, url=url, api_key_env=o.key_env_for(envs, name), startup_timeout_s=COMPARE_STARTUP_S
    )


def compare_config(args: argparse.Namespace, baseline: Baseline | None = None) -> RunConfig:
    envs = o.key_envs(args.api_key_env)
    if baseline is not None:
        ref = ServerSpec(name="reference", url=Path(args.baseline).resolve().as_uri())
    else:
        ref = url_spec("reference", args.ref, envs)
    recorded = baseline.settings if baseline is not None else {}
    golden = url_spec("golden", args.golden, envs) if args.golden else None
    targets = []
    for i, url in enumerate(args.target):
        name = "target" if len(args.target) == 1 else f"target{i + 1}"
        targets.append(TargetConfig(server=url_spec(name, url, envs), scheme=args.scheme, golden=golden))
    settings = RunSettings(
        prompts=tuple(args.prompts or ()),
        max_tokens=args.max_tokens or recorded.get("max_tokens", 32),
        logprobs=args.logprobs if args.logprobs is not None else recorded.get("logprobs", 5),
        seed=args.seed if args.seed is not None else recorded.get("seed", 0),
        endpoint=args.endpoint or recorded.get("endpoint", "completions"),
        concurrency=args.concurrency,
        output_dir=args.out or DEFAULT_OUT,
        limit=args.limit,
        request_timeout_s=args.timeout or DEFAULT_TIMEOUT_S,
        # the check runs where the recording holds it: compare has no flag to turn it off
        batch_slot_check=baseline is None or baseline.slot_draws > 0,
    )
    base_path = Path(args.baseline) if baseline is not None else None
    cfg = RunConfig(run=settings, reference=ref, targets=tuple(targets), baseline=base_path)
    # a recorded reference opens no socket: a key for it would be accepted and sent nowhere
    live = [s.name for s in cfg.servers() if baseline is None or s.name != ref.name]
    o.check_key_servers(envs, live)
    return cfg


def run(args: argparse.Namespace) -> int:
    o.positive("--concurrency", args.concurrency)
    o.check_generation(args)
    o.positive("--timeout", args.timeout)
    o.positive("--limit", args.limit)
    baseline = Baseline.read(args.baseline) if args.baseline is not None else None
    if baseline is None and not (args.prompts or args.prompt):
        raise UsageError("give --prompts FILE or --prompt TEXT (or --baseline DIR, which holds its prompts)")
    cfg = compare_config(args, baseline)
    if args.prompt:
        if baseline is not None:
            raise UsageError("--prompt (the quick look) needs a live --ref, not a --baseline")
        unused = [flag for flag, value in (("--golden", args.golden), ("--scheme", args.scheme),
                                           ("--limit", args.limit)) if value]  # fmt: skip
        if unused:  # the quick look judges nothing: refused, not ignored
            raise UsageError(
                f"{', '.join(unused)}: the quick look (--prompt) judges nothing; use --prompts FILE"
            )
        return aio.run(explore(cfg, prompt_texts(args.prompt), as_json=args.json, out=args.out))
    from difftest.runner import RunOptions

    return execute_and_finish(
        cfg, RunOptions(out_dir=args.out or DEFAULT_OUT, baseline=baseline), as_json=args.json
    )


def prompt_texts(values: list[str]) -> list[Prompt]:
    texts = [o.stdin_text() if v == "-" else v for v in values]
    if any(not t.strip() for t in texts):
        raise UsageError("--prompt: empty prompt text")
    return [Prompt(id=f"prompt{i + 1}", prompt=t) for i, t in enumerate(texts)]


async def explore(
    cfg: RunConfig, prompts: list[Prompt], *, as_json: bool = False, out: Path | None = None
) -> int:
    """The quick look: continuations side by side, first divergence and alternatives.

    Exit 3 when more prompts were lost (requests failed after their retries) than the run's
    `error_rate_limit` allows, as a full comparison (it said 0 with nothing compared); else 1 when a
    server's probe marks a check FAIL (the look is then partial); else 0. 3 beats 1, as in a run."""
    from difftest.cache import ResponseCache
    from difftest.collect import generate
    from difftest.conformance import FAIL
    from difftest.preflight import check_running_async
    from difftest.runner import _connect, refused_all
    from server_shim.launch import RunningServer

    con = o.console()
    specs = [cfg.reference, *(t.server for t in cfg.targets)]
    running = {s.name: RunningServer(name=s.name, url=s.url, spec=s, pid=None, log_path=None) for s in specs}  # type: ignore[arg-type]
    await check_running_async(specs, request_timeout_s=cfg.run.request_timeout_s)  # seconds, not minutes
    cache = ResponseCache(":memory:")
    eps = await _connect(running, cfg, cache, cfg.run.concurrency)
    failed_checks = [
        {"server": name, "check": c[0], "detail": c[2]}
        for name, ep in eps.items()
        for c in ep.caps.checks
        if c[1] == FAIL
    ]
    views: list[dict[str, Any]] = []
    retok = quick_retokenizer(eps, cfg)
    try:
        ref = eps[cfg.reference.name]
        for p in prompts:
            if not as_json:
                con.rule(f"{p.id}: {p.prompt[:60]!r}")
            ref_gen = await generate(
                ref, p, max_tokens=cfg.run.max_tokens, k=cfg.run.logprobs, seed=cfg.run.seed
            )
            for t in cfg.targets:
                tgt_gen = await generate(
                    eps[t.name], p, max_tokens=cfg.run.max_tokens, k=cfg.run.logprobs, seed=cfg.run.seed
                )
                view = await look(eps, retok, cfg, p, (ref_gen, tgt_gen), t.name, None if as_json else con)
                views.append(view)
    finally:
        await asyncio.gather(*(ep.client.aclose() for ep in eps.values()))
        cache.close()
    refused = refused_all([v.get("error") for v in views], "compared")
    if refused is not None:
        raise UsageError(refused)
    problems = lost_problems(views, cfg, len(prompts))
    code = 3 if problems else 1 if failed_checks else 0
    result = {
        "exit_code": code, "failed_checks": failed_checks, "infrastructure_problems": problems,
        "prompts": views,
    }  # fmt: skip
    if out is not None:
        from difftest.report.jsonio import atomic_write_text, strict_json

        atomic_write_text(Path(out) / QUICKLOOK_FILE, strict_json(result))
    if as_json:
        o.emit_json(result)
    else:
        for f in failed_checks:
            con.print(f"FAIL: {f['server']}: {f['check']}: {f['detail']}", style="red")
    from difftest.cli.outcome import say_infrastructure

    say_infrastructure(problems)
    return code


async def look(
    eps: Mapping[str, Endpoint],
    retok: Retokenizer,
    cfg: RunConfig,
    p: Prompt,
    gens: tuple[Generation, Generation],
    tgt_name: str,
    con: Console | None,
) -> dict[str, Any]:
    """One prompt of one pair: its view (`--json`), shown side by side on `con` (None: not shown).
    A failed request's view holds its error and whether the prompt was `lost` (failed after its
    retries, or the reference's answer broken: not compared), as opposed to the target's broken
    answer (its bug, not a lost request), the distinction a full run's exit 3 draws."""
    from difftest.report.terminal import render_side_by_side
    from difftest.scoring import score_prompt
    from difftest.verdict import tie_margin_for

    ref_gen, tgt_gen = gens
    ref_name = cfg.reference.name
    if ref_gen.error or tgt_gen.error:
        err = ref_gen.error or tgt_gen.error
        if con is not None:
            con.print(f"request failed: {err}")
        lost = bool(ref_gen.error) or not tgt_gen.broken
        return {"prompt_id": p.id, "target": tgt_name, "error": err, "lost": lost}
    c = await comparable(retok, p.id, ref_gen, tgt_gen, ref_name, tgt_name)
    d = score_prompt(
        p, c.ref, c.tgt, ref_forced=None, tgt_forced=None, tie_margin=tie_margin_for(None), k=cfg.run.logprobs
    )
    alts = []
    for name, own, side, found in (
        (ref_name, c.own[0], c.ref, d.ref_alternatives),
        (tgt_name, c.own[1], c.tgt, d.tgt_alternatives),
    ):
        shown = shown_alternatives(own, side, found, d.first_divergence) if not c.worded else found
        at = d.first_divergence
        if not shown and side.retokenized and own.view.top_k and at is not None and at < len(side.view):
            c.notes.append(
                f"{name} sent alternatives, but none of its own tokens starts at the divergence (it cut "
                "the text elsewhere): none to show there"
            )
        alts.append(await alt_texts(eps[name], shown))
    view = {
        "prompt_id": p.id, "prompt": p.prompt, "target": tgt_name,
        "ref_text": ref_gen.text, "tgt_text": tgt_gen.text,
        "ref_tokens": d.ref_tokens, "tgt_tokens": d.tgt_tokens,
        "first_divergence": d.first_divergence, "divergence_kind": d.divergence_kind,
        "match_rate": d.match_rate, "ref_alternatives": alts[0], "tgt_alternatives": alts[1],
        "compared": "words" if c.worded else "tokens", "notes": c.notes,
    }  # fmt: skip
    if con is None:
        return view
    for line in c.notes:
        con.print(line)
    render_side_by_side(
        d.ref_tokens, d.tgt_tokens, d.first_divergence, alts[0], alts[1],
        con, ref_label=ref_name, tgt_label=tgt_name,
    )  # fmt: skip
    if d.divergence_kind:
        con.print(f"divergence kind: {d.divergence_kind}")
    return view


def lost_problems(views: list[dict[str, Any]], cfg: RunConfig, n: int) -> list[str]:
    """Exit 3's reasons: per target, the prompts lost past the run's `error_rate_limit`, in a full
    run's words (`runner.lost_past_limit`). The quick look used to end 0 with every request lost
    (HTTP 500, connection errors after their retries), where `--prompts` ends 3."""
    from difftest.runner import lost_past_limit

    problems = []
    for t in cfg.targets:
        lost = sum(1 for v in views if v["target"] == t.server.name and v.get("lost"))
        problem = lost_past_limit(t.server.name, cfg.reference.name, lost, n, cfg.run.error_rate_limit)
        if problem is not None:
            problems.append(problem)
    return problems


def quick_retokenizer(eps: Mapping[str, Endpoint], cfg: RunConfig) -> Retokenizer:
    """Who tokenizes a side that sends no tokens (one that ignores `logprobs`), planned as a full
    run plans it (`retokenize.plan`): untokenized, its identical answer read as 0% and a LENGTH
    divergence at token 0."""
    from difftest import retokenize

    pairs = [(cfg.reference.name, t.server.name) for t in cfg.targets]
    return retokenize.Retokenizer(eps, retokenize.plan(eps, pairs), pairs)


@dataclass(frozen=True)
class Compared:
    """One prompt of one pair as the quick look compares it."""

    ref: Generation  # as compared: on one tokenizer with the other side where one sent no tokens
    tgt: Generation
    own: tuple[Generation, Generation]  # both as served (ids given their text): their own alternatives
    worded: bool  # compared word by word
    notes: list[str]  # how it was compared


async def comparable(
    retok: Retokenizer, pid: str, ref: Generation, tgt: Generation, ref_name: str, tgt_name: str
) -> Compared:
    """The two sides as a full run compares them (`Retokenizer.fill`, `for_pair`), whether that is
    word by word, and lines saying how. A side without tokens is tokenized by a /tokenize, else
    both sides are split into words; ids without text of their own get theirs from /detokenize,
    else, against token strings (a "token_id:N" label never equals one), words are compared. The
    words are then also shown: as tokens, the marker at a word's index pointed at the wrong token,
    and a word's index into one side's token alternatives at the wrong position. A side that sent
    tokens but was tokenized anew, to stand on its partner's tokenizer, is said too (`partner_note`):
    it was shown re-tokenized under a note naming only the token-less side."""
    from difftest.retokenize import note, partner_note, unreadable

    gens: dict[str, dict[str, Generation]] = {ref_name: {pid: ref}, tgt_name: {pid: tgt}}
    await retok.fill(gens)
    ref_side, tgt_side = (side[pid] for side in retok.for_pair(gens, ref_name, tgt_name))
    worded = retok.worded(ref_name, tgt_name, pid)
    lines = [note(n, retok.chosen.get(n)) for n in (ref_name, tgt_name) if retok.planned(n)]
    if worded and not lines:
        ids_side = ref_name if unreadable(gens[ref_name][pid]) else tgt_name
        lines.append(
            f"compared word by word: {ids_side} sent token ids with no text of their own (no /detokenize "
            "text joins back to its text), the other side token strings: the columns, the marker and the "
            "divergence's index below count words; token alternatives do not apply"
        )
    sides = ((ref_name, tgt_name, ref_side), (tgt_name, ref_name, tgt_side))
    lines += [
        partner_note(name, retok.chosen[other], gens[name][pid])
        for name, other, side in sides
        if side.retokenized and not worded and not retok.planned(name) and other in retok.chosen
    ]
    own = (gens[ref_name][pid], gens[tgt_name][pid])
    return Compared(ref_side, tgt_side, own, worded, lines)


def shown_alternatives(
    own: Generation, side: Generation, found: dict[str, float], index: int | None
) -> dict[str, float]:
    """A side's alternatives at the divergence: those scoring found on the compared tokens, else,
    where the side was tokenized anew (its compared tokens carry no logprobs), those it sent for
    its own token starting at the same point of the text (`retokenize.own_alternatives`)."""
    from difftest.retokenize import own_alternatives

    if found or not side.retokenized:
        return found
    return own_alternatives(own, side, index)


async def alt_texts(ep: Any, alts: dict[str, float]) -> dict[str, float]:
    """Alternatives keyed by token id -> keyed by token text (via /detokenize where served).

    A byte piece of a multi-byte character detokenizes to U+FFFD, and two of them to the same
    text: keyed by that text, one would overwrite the other and the table would lose a row. Such
    tokens, and any whose text is already taken, keep their id (`token_id:N`, vLLM's form)."""
    from difftest.collect import detokenize

    ids = {key: await detokenize(ep, int(key)) if key.lstrip("-").isdigit() else None for key in alts}
    return alt_keys(alts, ids)


def alt_keys(alts: dict[str, float], texts: dict[str, str | None]) -> dict[str, float]:
    """`alt_texts` without the requests: each alternative keyed by its text where that is a
    whole, unique text, else by its id."""
    out: dict[str, float] = {}
    for key, lp in sorted(alts.items(), key=lambda kv: -kv[1]):
        text = texts.get(key)
        if text is None:
            out[key] = lp
        elif text == "" or "\ufffd" in text or text in out:
            out[f"token_id:{key}"] = lp
        else:
            out[text] = lp
    return out
