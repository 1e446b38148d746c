"""Faults that need real processes (issue 10): a launched server SIGKILLed mid-run and the resume
after it (requests counted), `difftest run` interrupted by SIGINT / SIGTERM (no server left behind),
and an API key that must appear in no artifact of a run."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from interrupts import default_sigint
from live_fakes import live_fake

from difftest.cli import main
from difftest.identity import CANARY_PROMPT, RECHECK_SAMPLE
from difftest.report import load_run

ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
N_PROMPTS = 40
ROOT = Path(__file__).resolve().parent.parent


def _prompts(tmp: Path) -> Path:
    path = tmp / "prompts.jsonl"
    rows = [{"id": f"p{i:02d}", "prompt": f"prompt {i}: the quick brown fox"} for i in range(N_PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _engine(*args: object) -> str:
    return " ".join([sys.executable, str(ENGINE), "--port {port}", *map(str, args)])


def _config(tmp: Path, ref: dict, tgt: dict, **run: object) -> Path:
    settings = {
        "prompts": [str(_prompts(tmp))], "max_tokens": 8, "logprobs": 5, "concurrency": 4,
        "output_dir": str(tmp / "out"), "max_retries": 1, "request_timeout_s": 10,
        "batch_slot_check": False, "whitebox": "off", **run,
    }  # fmt: skip
    lines = ["[run]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    for header, table in (("[reference]", ref), ("[[target]]", tgt)):
        lines += [header, *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _log(path: Path) -> list[dict]:
    """The requests a fake engine logged; `run` marks the cacheable ones of the run itself (they
    carry a seed; the cache identity's canary does too, but is asked fresh on purpose)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r | {"run": r["run"] and not _canary(r["prompt"])} for r in rows if not r.get("answered")]


def _canary(prompt: object) -> bool:
    """The identity canary, asked alone or in a batch (a prompt list holding it)."""
    return prompt == CANARY_PROMPT or isinstance(prompt, list) and CANARY_PROMPT in prompt


def _answered(path: Path) -> int:
    """Run requests whose answer the engine sent in full before it died."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(1 for r in rows if r.get("answered") and r["run"] and not _canary(r["prompt"]))


def _cached(db: Path, server: str) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "SELECT COUNT(*) FROM responses WHERE fingerprint LIKE ?", (f'%"name":"{server}"%',)
        ).fetchone()[0]
    finally:
        con.close()


@pytest.mark.slow
def test_server_sigkilled_mid_run_exit_3_report_kept_answers_resume_asks_only_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log, once = tmp_path / "requests.jsonl", tmp_path / "died-once"
    tgt = {"name": "tgt", "scheme": "none", "command": _engine("--sigkill-after 40", f"--once {once}",
                                                                f"--request-log {log}")}  # fmt: skip
    with live_fake() as ref:
        cfg = _config(tmp_path, {"name": "ref", "url": ref}, tgt)
        assert main(["run", str(cfg)]) == 3
        err = capsys.readouterr().err
        assert "server tgt exited with code -9 during the run" in err and "Traceback" not in err
        first = load_run(tmp_path / "out")  # the report is written
        acc = first.targets[0].comparison("accuracy")
        assert (
            acc is not None and acc.aggregate["failed_requests"] > 0
        )  # teacher forcing into the dead server fails too
        kept = _cached(tmp_path / "out" / "cache.sqlite", "tgt")
        asked_first = _log(log)
        # every answer the engine sent before it died is in the cache: none lost
        assert 0 < kept == _answered(log) < sum(r["run"] for r in asked_first)

        log.unlink()
        assert main(["run", str(cfg), "--resume"]) == 0
    asked = _log(log)
    run_requests = sum(r["run"] for r in asked)
    # a full run asks the target 2 x N_PROMPTS cacheable questions (generation + teacher forcing);
    # the resume asks what is missing, plus the identity re-check's few cached requests asked again
    # (the longest echo and generation, a sample of RECHECK_SAMPLE: identity.pick_rechecks)
    rechecked = run_requests - (2 * N_PROMPTS - kept)
    assert 0 < rechecked <= 2 + RECHECK_SAMPLE, (run_requests, kept)
    second = load_run(tmp_path / "out").targets[0].comparison("accuracy")
    assert second is not None and second.aggregate["failed_requests"] == 0
    print(
        f"\nSIGKILL after 40 completions: first run {len(asked_first)} requests, {kept} answers sent "
        f"and kept; "
        f"resume sent {len(asked)} ({run_requests} run requests, {len(asked) - run_requests} probes)"
    )


def _state(pid: int) -> str | None:
    """The process state letter, None when there is no such process (a zombie is "Z")."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if _state(p) not in (None, "Z")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_server_process(tmp_path: Path, sig: signal.Signals) -> None:
    pids, log = tmp_path / "pids", tmp_path / "requests.jsonl"
    common = (
        f"--pid-file {pids}",
        f"--request-log {log}",
        "--delay 1",
    )  # a run of 20+ s: time to interrupt it
    cfg = _config(
        tmp_path,
        {"name": "ref", "command": _engine(*common)},
        {"name": "tgt", "scheme": "none", "command": _engine(*common)},
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "difftest", "run", str(cfg)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sum(r["run"] for r in _log(log)) < 4:  # both servers up, the run itself under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
        servers = [int(x) for x in pids.read_text().split()]
        assert len(servers) == 2 and _alive(servers) == servers
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = f"exit {proc.returncode}; stderr:\n{err.decode(errors='replace')[-3000:]}"
    assert proc.returncode == 128 + sig, said  # 130 / 143
    assert b"Traceback" not in err, said
    deadline = time.monotonic() + 10
    while _alive(servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(servers) == []


KEY = "sk-difftest-SECRET-0123456789abcdef"


@pytest.mark.slow
def test_api_key_is_in_no_artifact_of_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key-checking reference (url) and target (launched, key from the environment); then a
    target that refuses the key and echoes it back. Every file of both runs, their output and
    every log record are searched for the key."""
    monkeypatch.setenv("DIFFTEST_TEST_KEY", KEY)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        with (
            live_fake(FakeBehaviour(api_key=KEY)) as ref,
            live_fake(FakeBehaviour(api_key="another")) as wrong,
        ):
            cfg = _config(
                tmp_path,
                {"name": "ref", "url": ref, "api_key_env": "DIFFTEST_TEST_KEY"},
                {"name": "tgt", "scheme": "none", "api_key_env": "DIFFTEST_TEST_KEY",
                 "command": _engine("--api-key-env DIFFTEST_TEST_KEY")},
            )  # fmt: skip
            assert main(["-vv", "run", str(cfg)]) == 0
            (tmp_path / "bad").mkdir()
            bad = _config(
                tmp_path / "bad",
                {"name": "ref", "url": ref, "api_key_env": "DIFFTEST_TEST_KEY"},
                {"name": "tgt", "scheme": "none", "url": wrong, "api_key_env": "DIFFTEST_TEST_KEY"},
            )
            assert main(["-vv", "run", str(bad)]) == 2
    finally:
        logging.getLogger().removeHandler(handler)
    out, err = capsys.readouterr()
    assert "Invalid API key: Bearer ***" in err  # the server's echo, scrubbed
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "cache.sqlite" for p in files) and any(p.suffix == ".log" for p in files)
    leaks = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    leaks += [name for name, text in (("stdout", out), ("stderr", err)) if KEY in text]
    leaks += [r for r in records if KEY in r]
    assert leaks == []
    assert records  # -vv: there were log records to search
