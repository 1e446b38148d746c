"""A baseline that cannot answer what a run will ask is refused before any server starts (exit 2,
one line): damaged exchanges inside the file, or a batch-slot check the recording left out. And a
replayed "worst of N draws" is N recorded draws, not one draw served N times."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_fakes import live_fake

from difftest import runner
from difftest.baseline import Baseline, Exchanges, ReplayTransport, request_key
from difftest.cli import main

PROMPTS = ["1+2+3=", "the quick brown fox", "def add(a, b):"]


def _record(tmp_path: Path, *extra: str) -> Path:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS))
    )
    out = tmp_path / "b"
    with live_fake() as ref:
        argv = ["record", "--ref", ref, "--prompts", str(prompts), "--max-tokens", "6", "-o", str(out)]
        assert main([*argv, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("rec"))


@pytest.fixture(scope="module")
def recorded_without_slots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("rec_noslot"), "--no-batch-slot-check")


def _config(tmp_path: Path, base: Path, target: str, *, slot_check: bool = True) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[run]\nprompts = ["{base.parent / "p.jsonl"}"]\nmax_tokens = 6\nwhitebox = "off"\n'
        f'batch_slot_check = {str(slot_check).lower()}\noutput_dir = "{tmp_path / "out"}"\n'
        f'[reference]\nname = "stored"\nbaseline = "{base}"\n'
        f'[[target]]\nname = "t"\nurl = "{target}"\nscheme = "fp8-block"\n'
    )
    return cfg


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and stops) any attempt to reach or launch a server: a refusal must come first."""
    calls: list[str] = []

    def refuse(*_: Any, **__: Any) -> Any:
        calls.append("server")
        raise AssertionError("a server was contacted before the baseline was refused")

    monkeypatch.setattr(runner, "check_running", refuse)
    monkeypatch.setattr(runner, "launch_shown", refuse)
    return calls


def _first_completion(doc: dict) -> dict:
    return next(e for e in doc["exchanges"] if e["path"] == "/v1/completions")


def _drop_status(doc: dict) -> None:
    for e in doc["exchanges"]:
        for r in e["responses"]:
            r.pop("status", None)


DAMAGE: list[tuple[str, Callable[[dict], Any], str]] = [
    ("status-missing", _drop_status, "responses[0].status: Field required"),
    ("responses-string", lambda d: _first_completion(d).update(responses="x"), "responses: Input should be a valid list"),
    ("responses-empty", lambda d: _first_completion(d).update(responses=[]), "responses: List should have at least 1"),
    ("status-string", lambda d: _first_completion(d)["responses"][0].update(status="200"), "status: Input should be a valid integer"),
    ("status-bool", lambda d: _first_completion(d)["responses"][0].update(status=True), "status: Input should be a valid integer"),
    ("body-number", lambda d: _first_completion(d)["responses"][0].update(body=5), "body: Input should be a valid string"),
    ("content-type-missing", lambda d: _first_completion(d)["responses"][0].pop("content_type"), "content_type: Field required"),
    ("method-missing", lambda d: _first_completion(d).pop("method"), "method: Field required"),
    ("exchange-not-object", lambda d: d["exchanges"].append("GET /v1/models"), "exchanges["),
    ("exchanges-not-list", lambda d: d.update(exchanges={"a": 1}), "exchanges: Input should be a valid list"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "said"), [(d, s) for _, d, s in DAMAGE], ids=[i for i, _, _ in DAMAGE])
def test_damaged_exchanges_are_refused_before_any_server(
    recorded: Path, tmp_path: Path, damage: Callable[[dict], Any], said: str, no_server: list[str], capsys
) -> None:
    """The bug: a response without `status` was a KeyError in the replay after "servers up", exit 1
    (a failed verdict to a CI gate); `"responses": "x"` a TypeError."""
    base = tmp_path / "b"
    base.mkdir()
    with gzip.open(recorded / "baseline.json.gz", "rt") as f:
        doc = json.load(f)
    damage(doc)
    with gzip.open(base / "baseline.json.gz", "wt") as f:
        json.dump(doc, f)
    (tmp_path / "p.jsonl").write_text((recorded.parent / "p.jsonl").read_text())
    capsys.readouterr()
    code = main(["run", str(_config(tmp_path, base, "http://127.0.0.1:9"))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("difftest: error: baseline ") and "malformed" in err
    assert said in err, err
    assert no_server == []
    assert not (tmp_path / "out").exists()  # refused before the folder was touched


def test_replay_serves_each_recorded_answer_once_then_counts_repeats() -> None:
    ex = Exchanges()
    key = request_key("POST", "/v1/completions", b'{"prompt": "a"}')
    ex.add(key, 200, "application/json", b'{"n": 1}')
    ex.add(key, 200, "application/json", b'{"n": 2}')
    replay = ReplayTransport(Exchanges.from_list(ex.to_list()))

    async def ask() -> list[int]:
        async with httpx.AsyncClient(transport=replay, base_url="http://baseline.invalid") as c:
            return [(await c.post("/v1/completions", json={"prompt": "a"})).json()["n"] for _ in range(3)]

    assert asyncio.run(ask()) == [1, 2, 2]
    assert replay.repeats == 1 and replay.misses == 0


def test_recording_holds_every_draw_of_the_slot_check(recorded: Path) -> None:
    """The bug: the recording made one batch-slot draw and the replay served it as each of the run's
    SLOT_BASELINE_DRAWS draws, "the worst of 2 draws" being one draw shown twice."""
    base = Baseline.read(recorded)
    assert base.slot_draws == runner.SLOT_BASELINE_DRAWS == base.signature["batch_slot_draws"]
    bodies = {k: json.loads(k)[2] or {} for k in base.exchanges.table}
    # the check's batches: greedy with logprobs, several prompts, no echo (not the probe's, not forcing)
    batched = [
        base.exchanges.table[k]
        for k, b in bodies.items()
        if isinstance(b.get("prompt"), list) and b.get("logprobs") and not b.get("echo")
    ]
    assert batched, "no batched request recorded"
    # each batched request of the check is asked the same number of times in every draw
    assert all(len(r) % runner.SLOT_BASELINE_DRAWS == 0 for r in batched), [len(r) for r in batched]


def test_a_baseline_that_does_not_say_has_one_draw(recorded: Path) -> None:
    base = Baseline.read(recorded)
    base.signature.pop("batch_slot_draws")  # written before draws were counted
    assert base.slot_draws == 1
    base.signature["batch_slot_check"] = False
    assert base.slot_draws == 0


def test_slot_check_against_a_baseline_recorded_without_it_is_refused(
    recorded_without_slots: Path, tmp_path: Path, no_server: list[str], capsys
) -> None:
    """The bug: every batched request of the check was a 404 from the replay, and the report said
    "ref itself: 0 (worst of 2 draws)", exit 0."""
    capsys.readouterr()
    code = main(["run", str(_config(tmp_path, recorded_without_slots, "http://127.0.0.1:9"))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "recorded without the batch-slot check" in err
    assert "batch_slot_check = false" in err and no_server == []


def test_without_the_slot_check_such_a_baseline_still_judges(
    recorded_without_slots: Path, tmp_path: Path
) -> None:
    with live_fake() as tgt:
        cfg = _config(tmp_path, recorded_without_slots, tgt, slot_check=False)
        assert main(["run", str(cfg)]) == 0


@pytest.mark.slow
def test_compare_judges_a_baseline_recorded_without_the_slot_check(
    recorded_without_slots: Path, tmp_path: Path
) -> None:
    """compare has no flag to turn the check off: it follows the recording (was: always refused)."""
    with live_fake() as tgt:
        argv = [
            "compare",
            "--baseline",
            str(recorded_without_slots),
            "--target",
            tgt,
            "-o",
            str(tmp_path / "o"),
        ]
        assert main(argv) == 0


def _old_style(recorded: Path, tmp_path: Path) -> Path:
    """`recorded` as written before draws were counted: one draw of the slot check."""
    base = tmp_path / "old"
    base.mkdir()
    with gzip.open(recorded / "baseline.json.gz", "rt") as f:
        doc = json.load(f)
    doc["signature"].pop("batch_slot_draws")
    with gzip.open(base / "baseline.json.gz", "wt") as f:
        json.dump(doc, f)
    (tmp_path / "p.jsonl").write_text((recorded.parent / "p.jsonl").read_text())
    return base


@pytest.mark.slow
@pytest.mark.parametrize("old", [False, True], ids=["two-draws", "one-draw"])
def test_the_reference_draws_are_the_recorded_ones(recorded: Path, tmp_path: Path, old: bool) -> None:
    """An old baseline's one draw was replayed twice and reported as "worst of 2 draws"."""
    base = _old_style(recorded, tmp_path) if old else recorded
    if not old:
        (tmp_path / "p.jsonl").write_text((recorded.parent / "p.jsonl").read_text())
    with live_fake() as tgt:
        assert main(["run", str(_config(tmp_path, base, tgt))]) == 0
    report = (tmp_path / "out" / "report.json").read_text()
    assert ("worst of 2 draws" in report) is not old
