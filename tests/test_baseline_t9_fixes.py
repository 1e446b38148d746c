"""T9's findings on recorded baselines: a replay never tokenizes another server's text and names
what it could not answer; it asks for the recorded model; a run whose first prompt is not the
recording's (the batch-slot probe) is refused; a folder where baseline.json.gz goes is refused
before anything is asked; tags are kept; hand-damaged files are refused (exit 2) naming why."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeBehaviour, make_fake_app
from fastapi import Request
from fastapi.responses import JSONResponse
from live_fakes import live_fake

from difftest import retokenize
from difftest.baseline import Baseline, Exchanges, ReplayTransport
from difftest.cli import main
from difftest.client import REPLAY_URL, CompletionClient
from difftest.collect import Endpoint
from difftest.conformance import WARNINGS, Capabilities
from difftest.errors import OutputError, UsageError
from difftest.prompts import Prompt
from difftest.report import load_run

PROMPTS = [
    ("p0", "1+2+3=", ["arith"]),
    ("p1", "the quick brown fox", ["prose"]),
    ("p2", "def add(a, b):", []),
]


def _prompts_file(path: Path, rows: list[tuple[str, str, list[str]]] = PROMPTS) -> Path:
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": t} | ({"tags": g} if g else {})) + "\n" for i, t, g in rows)
    )
    return path


def _record(out: Path, ref: str, prompts: Path, *extra: str) -> None:
    argv = ["record", "--ref", ref, "--prompts", str(prompts), "--max-tokens", "6", "-o", str(out), *extra]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("t9")
    with live_fake() as ref:
        _record(tmp / "b", ref, _prompts_file(tmp / "p.jsonl"))
    return tmp / "b"


def _edited(recorded: Path, tmp_path: Path, edit: Callable[[dict], Any]) -> Path:
    with gzip.open(recorded / "baseline.json.gz", "rt") as f:
        doc = json.load(f)
    edit(doc)
    (tmp_path / "e").mkdir()
    with gzip.open(tmp_path / "e" / "baseline.json.gz", "wt") as f:
        json.dump(doc, f)
    return tmp_path / "e"


def _compare(base: Path, target: str, out: Path, *extra: str) -> int:
    return main(["compare", "--baseline", str(base), "--target", target, "-o", str(out), *extra])


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("difftest: error: "), err
    return err


# ---------------------------------------------------------------- 1: tokenizing the target's text


def _ep(name: str, url: str, *, tokenize: bool, logprobs: int) -> Endpoint:
    client = CompletionClient(url, name=name)
    return Endpoint(
        name, client, Capabilities(name=name, url=url, model=None, tokenize=tokenize, logprobs_cap=logprobs)
    )


@pytest.mark.parametrize(("target_tokenizes", "chosen"), [(False, None), (True, "target")])
def test_a_replay_never_tokenizes_the_target_text(target_tokenizes: bool, chosen: str | None) -> None:
    """The bug: the recording's /tokenize was chosen for the target's continuations; it never saw
    them, every request was a 404 and token match 0% (a false FAIL)."""
    eps = {
        "reference": _ep("reference", REPLAY_URL, tokenize=True, logprobs=5),
        "target": _ep("target", "http://127.0.0.1:9", tokenize=target_tokenizes, logprobs=0),
    }
    assert retokenize.plan(eps, [("reference", "target")]) == {"target": chosen}
    live = dict(eps, reference=_ep("reference", "http://127.0.0.1:8", tokenize=True, logprobs=5))
    # a live reference still tokenizes a token-less target that cannot
    assert retokenize.plan(live, [("reference", "target")]) == {"target": chosen or "reference"}
    if chosen is None:
        assert "no live server of the pair serves /tokenize" in retokenize.note("target", None)


def test_a_token_less_target_gets_the_live_verdict_from_a_baseline(recorded: Path, tmp_path: Path) -> None:
    bare = FakeBehaviour(max_logprobs=0, tokenize=False)
    prompts = _prompts_file(tmp_path / "p.jsonl")
    with live_fake() as ref, live_fake(bare) as tgt:
        live = main(["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "--max-tokens", "6",
                     "-o", str(tmp_path / "live")])  # fmt: skip
        stored = _compare(recorded, tgt, tmp_path / "stored")
    assert live == stored == 0
    run = load_run(tmp_path / "stored")
    acc = run.targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["token_match"] == 1.0  # was 0.0: every /tokenize a 404
    assert any("compared word by word" in w for w in acc.warnings)
    assert run.signature["baseline"]["not_recorded"] == {}  # the recording answered all it was asked


def test_a_recording_with_a_seed_answers_every_request_of_a_run(tmp_path: Path) -> None:
    """Echoes and slot probes carry the run's seed (collect.Endpoint.seed): recorded with seed 0
    there, every one of them was a replay miss in a run with --seed 7."""
    with live_fake() as ref:
        _record(tmp_path / "b", ref, _prompts_file(tmp_path / "p.jsonl"), "--seed", "7")
    with live_fake() as tgt:
        assert _compare(tmp_path / "b", tgt, tmp_path / "o") == 0
    assert load_run(tmp_path / "o").signature["baseline"]["not_recorded"] == {}


def test_replay_misses_are_named_not_silent(caplog: pytest.LogCaptureFixture) -> None:
    replay = ReplayTransport(Exchanges())

    async def ask() -> None:
        async with httpx.AsyncClient(transport=replay, base_url=REPLAY_URL) as c:
            for _ in range(2):
                assert (await c.post("/tokenize", json={"prompt": "abc"})).status_code == 404
            await c.get("/debug/config")  # the recorder's own 404: as recorded, no miss

    with caplog.at_level(logging.WARNING, logger="difftest.baseline"):
        asyncio.run(ask())
    assert replay.misses == 2 and replay.missed == {"POST /tokenize": 2}
    assert [r.getMessage() for r in caplog.records if "never recorded" in r.getMessage()] == [
        'baseline: POST /tokenize was never recorded (first: {"prompt":"abc"}); answered 404, '
        "which is not the reference's answer"
    ]
    (note,) = replay.notes("reference")
    assert (
        note.startswith("reference: the baseline holds no answer to 2 request(s)")
        and "POST /tokenize x2" in note
    )
    base = Baseline(reference={}, settings={}, prompts=[], exchanges=Exchanges())
    base.replays.append(replay)
    assert base.replay_notes("reference") == [note]
    assert base.provenance()["not_recorded"] == {"POST /tokenize": 2}


# ---------------------------------------------------------------- 2: the recorded model


def _several_models_app(behaviour: FakeBehaviour, served_first: bool = False) -> Any:
    app = make_fake_app(behaviour)

    @app.middleware("http")
    async def models(request: Request, call_next: Any) -> Any:  # another model listed first
        if request.url.path == "/v1/models":
            ids = [behaviour.model, "zzz-other"] if served_first else ["zzz-other", behaviour.model]
            return JSONResponse({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
        return await call_next(request)

    return app


def _record_several(tmp_path: Path, ref_url: str, target_url: str) -> Path:
    """`difftest record` of the reference at `ref_url` (its TOML value, extra keys included) into
    tmp_path / "b"; returns the config recorded from."""
    prompts = _prompts_file(tmp_path / "p.jsonl")
    rec = tmp_path / "rec.toml"
    rec.write_text(
        f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 6\nwhitebox = "off"\n'
        f'[reference]\nname = "ref"\nurl = "{ref_url}"\n'
        f'[[target]]\nname = "t"\nurl = "{target_url}"\nscheme = "fp8-block"\n'
    )
    assert main(["record", "--ref", str(rec), "-o", str(tmp_path / "b")]) == 0
    return rec


def test_a_recording_of_a_named_model_among_several_replays(tmp_path: Path, capsys) -> None:
    """The bug: the replay asked the first listed model ("zzz-other"), which no recorded request
    carries: "ref cannot serve /v1/completions: HTTP 404: not recorded in the baseline", exit 2."""
    with live_fake(app=_several_models_app(FakeBehaviour())) as ref, live_fake() as tgt:
        rec = _record_several(tmp_path, f'{ref}"\nmodel = "fake-model', tgt)
        stored = tmp_path / "stored.toml"
        stored.write_text(
            rec.read_text()
            .replace(f'url = "{ref}"\nmodel = "fake-model"', f'baseline = "{tmp_path / "b"}"')
            .replace("max_tokens = 6", f'max_tokens = 6\noutput_dir = "{tmp_path / "out"}"')
        )
        capsys.readouterr()
        assert main(["run", str(stored)]) == 0, capsys.readouterr().err
    assert load_run(tmp_path / "out").signature["baseline"]["not_recorded"] == {}
    assert Baseline.read(tmp_path / "b").capabilities["model_first_of_several"] is False  # named, not taken


def test_a_recording_records_that_it_took_the_first_of_several(tmp_path: Path) -> None:
    """The replay reads this field, not the warning's wording (which a later difftest may reword)."""
    with live_fake(app=_several_models_app(FakeBehaviour(), served_first=True)) as ref:
        _record_several(tmp_path, ref, ref)
    base = Baseline.read(tmp_path / "b")
    assert base.capabilities["model_first_of_several"] is True
    base.capabilities["warnings"] = []  # reworded away: the field still says it
    assert base.replay_model() is None


def test_a_recording_that_took_the_first_of_several_asks_as_it_did() -> None:
    several = WARNINGS["several_models"].format(n=2, ids="a, b", first="a")
    base = Baseline(reference={"model": "a"}, settings={}, prompts=[], exchanges=Exchanges())
    assert base.replay_model() == "a"
    base.capabilities = {"warnings": [several]}
    assert base.replay_model() is None  # the probe then takes the first again, and says so again


# ---------------------------------------------------------------- 3: the batch-slot probe


def _run_prompts(ids: list[str]) -> list[Prompt]:
    rows = {i: (t, g) for i, t, g in PROMPTS}
    return [Prompt(id=i, prompt=rows[i][0], tags=tuple(rows[i][1])) for i in ids]


SETTINGS = {"max_tokens": 6, "logprobs": 5, "seed": 0, "endpoint": "completions", "batch_slot_check": True}


def test_a_subset_with_another_first_prompt_is_refused(recorded: Path) -> None:
    """The bug: accepted, and every reference slot draw was a 404 ("not measured on reference"):
    the target was judged alone."""
    base = Baseline.read(recorded)
    with pytest.raises(
        UsageError, match=r"probes the first prompt, and this run's \('p1'\) is not the recording's \('p0'\)"
    ):
        base.check(SETTINGS, _run_prompts(["p1", "p2"]))
    base.check(SETTINGS, _run_prompts(["p0", "p2"]))  # a subset that keeps the probe is fine
    base.check(SETTINGS | {"batch_slot_check": False}, _run_prompts(["p1", "p2"]))  # no slot check: fine


# ---------------------------------------------------------------- 4: a folder where the file goes


def test_record_refuses_a_folder_in_the_baselines_place_before_asking(tmp_path: Path, capsys) -> None:
    """The bug: the whole recording ran, then an IsADirectoryError traceback (exit 1) and a stray
    .baseline.json.gz.tmp. Port 9 listens to nothing: reaching it would be exit 3."""
    (tmp_path / "b" / "baseline.json.gz").mkdir(parents=True)
    prompts = _prompts_file(tmp_path / "p.jsonl")
    code = main(
        [
            "record",
            "--ref",
            "http://127.0.0.1:9",
            "--prompts",
            str(prompts),
            "-o",
            str(tmp_path / "b"),
            "--overwrite",
        ]
    )
    assert code == 2 and "a folder (or other non-file) stands in its place" in _one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["baseline.json.gz"]


def test_a_failed_write_is_an_output_error_and_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "baseline.json.gz").mkdir()
    base = Baseline(reference={}, settings={}, prompts=[], exchanges=Exchanges())
    with pytest.raises(OutputError, match="a folder stands in its place"):
        base.write(tmp_path / "baseline.json.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json.gz"]


# ---------------------------------------------------------------- 5: tags


def test_tags_are_recorded_and_replayed(recorded: Path, tmp_path: Path) -> None:
    base = Baseline.read(recorded)
    assert [p.tags for p in base.prompt_list()] == [("arith",), ("prose",), ()]
    assert base.prompts[0]["tags"] == ["arith"] and "tags" not in base.prompts[2]
    base.check(SETTINGS, [Prompt(id="p0", prompt="1+2+3=", tags=("other",))])  # tags change no request
    old = Baseline.read(_edited(recorded, tmp_path, lambda d: [p.pop("tags", None) for p in d["prompts"]]))
    assert [p.tags for p in old.prompt_list()] == [(), (), ()]  # a file recorded before tags were kept


def test_a_run_against_a_baseline_keeps_the_tag_breakdown(recorded: Path, tmp_path: Path) -> None:
    with live_fake() as tgt:
        assert _compare(recorded, tgt, tmp_path / "o") == 0
    acc = load_run(tmp_path / "o").targets[0].comparison("accuracy")
    assert acc is not None and {p.prompt_id: p.tags for p in acc.prompts}["p0"] == ["arith"]


# ---------------------------------------------------------------- 9: hand-damaged files


def _prompt_text(d: dict) -> None:
    d["prompts"][0]["prompt"] = "2+2="


def _duplicate(d: dict) -> None:
    d["prompts"].append(dict(d["prompts"][0]))


DAMAGE = [
    ("prompt-text", _prompt_text, "prompt 'p0' has no recorded answer"),
    (
        "logprobs-0",
        lambda d: d["settings"].update(logprobs=0),
        "malformed (ValueError: settings.logprobs is 0)",
    ),
    ("duplicate-id", _duplicate, "prompts[3]: duplicate id 'p0' (first at prompts[0])"),
    ("tags", lambda d: d["prompts"][0].update(tags="arith"), "prompts[0].tags is not a list of strings"),
    ("failed-prompts", lambda d: d["reference"].update(failed_prompts=3), "reference.failed_prompts"),
]


@pytest.mark.parametrize(("edit", "said"), [(e, s) for _, e, s in DAMAGE], ids=[i for i, _, _ in DAMAGE])
def test_a_hand_damaged_baseline_is_exit_2_naming_why(
    recorded: Path, tmp_path: Path, edit, said: str, capsys
) -> None:
    """The bugs: an edited prompt text was exit 3 (every request a 404 read as the reference
    failing); logprobs 0 was accepted (then "every request was refused"); a duplicate id judged twice."""
    base = _edited(recorded, tmp_path, edit)
    capsys.readouterr()
    assert _compare(base, "http://127.0.0.1:9", tmp_path / "o") == 2  # refused before the target is asked
    assert said in _one_line_error(capsys)


def test_a_prompt_whose_recording_failed_unanswered_is_not_called_edited(
    recorded: Path, tmp_path: Path
) -> None:
    """A generation lost without any answer (a dropped connection) is in no exchange: the file names
    it (failed_prompts), so it is not refused as an edited prompt."""

    def lose_p1(d: dict) -> None:
        d["exchanges"] = [
            e for e in d["exchanges"] if (e["body"] or {}).get("prompt") != "the quick brown fox"
        ]

    base = Baseline.read(_edited(recorded, tmp_path, lose_p1))
    with pytest.raises(UsageError, match="prompt 'p1' has no recorded answer"):
        base.check(SETTINGS, _run_prompts(["p0", "p1"]))
    base.reference["failed_prompts"] = ["p1"]
    base.check(SETTINGS, _run_prompts(["p0", "p1"]))


def test_a_key_for_a_recorded_reference_is_refused(
    recorded: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """T9 item 9: `--api-key-env reference=VAR` with `--baseline` was accepted and sent nowhere (the
    replay opens no socket); a key meant for the live reference is the user's mistake to hear of."""
    monkeypatch.setenv("SOME_KEY", "sk-x")
    code = _compare(recorded, "http://127.0.0.1:9", tmp_path / "o", "--api-key-env", "reference=SOME_KEY")
    assert code == 2
    assert "--api-key-env reference=SOME_KEY: no server is named 'reference' here (servers: target)" in (
        _one_line_error(capsys)
    )
