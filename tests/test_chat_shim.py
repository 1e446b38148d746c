"""Chat completions between two real shims (tiny-llama, in-process, served on loopback): the same
model passes, a build with a scale fault fails; teacher forcing is reported unavailable."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from quirk_fakes import live_app
from test_layers import build

from difftest.chat import NO_TEACHER_FORCING
from difftest.cli import main
from difftest.report import load_run
from server_shim.models import LoadedModel

CONVERSATIONS = [
    [{"role": "user", "content": "The capital of France is"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "1, 2, 3, 4,"}],
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "user", "content": "Once upon a time"}],
    [{"role": "user", "content": "The quick brown fox"}],
    [{"role": "user", "content": "Water boils at"}],
]


@contextlib.contextmanager
def shim(loaded: LoadedModel) -> Iterator[str]:
    from server_shim.app import create_app
    from server_shim.engine import Engine
    from server_shim.serve import ServeOptions

    engine = Engine(loaded)
    try:
        with live_app(create_app(engine, ServeOptions(model=loaded.name))) as url:
            yield url
    finally:
        engine.close()


@pytest.mark.parametrize(("faults", "code"), [((), 0), (("scale-skipped",), 1)])
def test_chat_between_two_shims(faults: tuple[str, ...], code: int, tmp_path: Path) -> None:
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(CONVERSATIONS))
    )
    target = build(scheme="fp8-block", faults=list(faults)) if faults else build()
    with shim(build()) as ref, shim(target) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--endpoint", "chat"]
        got = main([*argv, "--scheme", "none", "--max-tokens", "8", "-o", str(tmp_path / "o")])
    assert got == code
    run = load_run(tmp_path / "o")
    acc = run.targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["failed_requests"] == 0
    assert (acc.aggregate["token_match"] == 1.0) == (code == 0)
    checks = {c[0]: c[1] for c in run.targets[0].conformance["checks"]}
    assert checks["chat completions"] == "ok" and checks["top_logprobs cap"] == "ok"
    assert checks["token ids in responses"] in ("ok", "warn")
    assert NO_TEACHER_FORCING in json.dumps(run.to_dict())
