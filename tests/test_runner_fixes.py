"""Runner fixes: a run that writes no report leaves no earlier report standing as its result, the
failed column counts what the exit-3 line counts, a floor file of another reference is named, the
contradictory null = "none" + noise_floor is refused, a url server's `model` is the one asked, the
signature states only what the config set, and report.md says where limits came from."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from live_fakes import free_port, live_fake
from test_runner import write_config

from difftest.cli import main
from difftest.report import load_run

REPORTS = ("report.json", "report.md", "report.html", "junit.xml")


def _answers(cache: Path) -> int:
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def _passed_once(tmp_path: Path, ref: str, tgt: str) -> tuple[Path, Path, int]:
    """A PASS run into tmp/out; returns (its config, the folder, the answers it cached)."""
    cfg = write_config(tmp_path, ref, [{"name": "tgt", "url": tgt, "scheme": "none"}])
    out = tmp_path / "out"
    assert main(["run", str(cfg), "-o", str(out)]) == 0
    cached = _answers(out / "cache.sqlite")
    assert cached > 0 and all((out / f).exists() for f in REPORTS)
    return cfg, out, cached


def _earlier_set_aside(out: Path, cached: int, caplog: pytest.LogCaptureFixture) -> None:
    """No report of the earlier run at the top (CI reads it as this run's); all of it, with the
    cache its numbers came from, in previous/, said in one line."""
    assert not any((out / f).exists() for f in REPORTS)
    assert load_run(out / "previous").gate_passed
    assert _answers(out / "previous" / "cache.sqlite") == cached
    said = [r.getMessage() for r in caplog.records if "wrote no report" in r.getMessage()]
    assert len(said) == 1 and str(out / "previous") in said[0], said


def test_a_run_that_cannot_start_sets_the_earlier_report_aside(tmp_path, caplog) -> None:
    """The bug: a second run that failed at launch (exit 3) emptied cache.sqlite and left the
    earlier run's PASS report in place."""
    with live_fake() as ref, live_fake() as tgt:
        _, out, cached = _passed_once(tmp_path, ref, tgt)
    dead = f"http://127.0.0.1:{free_port()}"
    second = tmp_path / "second"
    second.mkdir()
    cfg = write_config(second, ref, [{"name": "tgt", "url": dead, "startup_timeout_s": 1}])
    with caplog.at_level(logging.WARNING, logger="difftest.runner"):
        assert main(["run", str(cfg), "-o", str(out)]) == 3
    _earlier_set_aside(out, cached, caplog)


def test_an_interrupted_run_sets_the_earlier_report_aside(tmp_path, caplog, monkeypatch) -> None:
    from difftest import runner

    with live_fake() as ref, live_fake() as tgt:
        cfg, out, cached = _passed_once(tmp_path, ref, tgt)

        async def interrupted(*_args: object, **_kw: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(runner, "run_async", interrupted)
        with caplog.at_level(logging.WARNING, logger="difftest.runner"):
            assert main(["run", str(cfg), "-o", str(out)]) == 130
    _earlier_set_aside(out, cached, caplog)


def test_a_conformance_error_sets_the_earlier_report_aside_and_a_good_run_clears_it(tmp_path, caplog) -> None:
    with live_fake() as ref, live_fake() as tgt, live_fake(FakeBehaviour(tokenizer="alt")) as alt:
        cfg, out, cached = _passed_once(tmp_path, ref, tgt)
        second = tmp_path / "second"
        second.mkdir()
        bad = write_config(second, ref, [{"name": "tgt", "url": alt, "scheme": "none"}])
        with caplog.at_level(logging.WARNING, logger="difftest.runner"):
            assert main(["run", str(bad), "-o", str(out)]) == 2
        _earlier_set_aside(out, cached, caplog)
        assert main(["run", str(cfg), "-o", str(out)]) == 0  # a report again: previous/ goes
    assert not (out / "previous").exists() and load_run(out).gate_passed


def test_a_resumed_run_that_fails_keeps_its_cache_and_sets_the_report_aside(tmp_path, monkeypatch) -> None:
    from difftest import runner

    with live_fake() as ref, live_fake() as tgt:
        cfg, out, cached = _passed_once(tmp_path, ref, tgt)

        async def interrupted(*_args: object, **_kw: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(runner, "run_async", interrupted)
        assert main(["run", str(cfg), "-o", str(out), "--resume"]) == 130
    assert _answers(out / "cache.sqlite") == cached  # what --resume reads stays where it reads it
    assert (out / "previous" / "report.json").exists() and not (out / "report.json").exists()


def test_failed_prompts_count_either_side_and_every_comparison() -> None:
    """Worked by hand: exactness loses p1 (the golden's answer), accuracy p1 and p2 (the
    reference's, or forcing): 2 distinct prompts of 3, whichever side lost them."""
    from difftest.results import Comparison, PromptDiff
    from difftest.runner import failed_prompts

    def comp(kind: str, errors: dict[str, str | None]) -> Comparison:
        return Comparison(kind, "b", "t", [PromptDiff(pid, "x", error=e) for pid, e in errors.items()])

    exact = comp("exactness", {"p0": None, "p1": "baseline: 503", "p2": None})
    acc = comp("accuracy", {"p0": None, "p1": "target: timeout", "p2": "forced baseline: reset"})
    assert failed_prompts([exact, acc]) == 2 and failed_prompts([exact]) == 1 and failed_prompts([]) == 0


def test_the_failed_column_counts_what_exit_3_names(tmp_path: Path, capsys) -> None:
    """The bug: the reference died, exit 3 said "tgt vs ref: N of 6 prompts failed" and the failed
    column said 0/6 (it counted the target's own generation errors only)."""
    with live_fake(FakeBehaviour(die_after=16)) as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "tgt", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg), "-o", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    (t,) = load_run(tmp_path / "out").targets
    acc = t.comparison("accuracy")
    assert acc is not None
    lost = int(acc.aggregate["failed_requests"])
    assert lost > 0 and t.failed_requests == lost and f"{lost} of 6 prompts failed" in err
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"failed prompts {lost}/6" in md


def test_a_floor_of_another_reference_is_named_in_the_warnings(tmp_path: Path, capsys) -> None:
    """The bug: the floor file recorded only the reference's name, and a floor measured on another
    model set this run's limits without a word. Now the file records the served model id (and
    /version, /debug/config where served), and the run says which field differs, in the report and
    on the terminal."""
    floor_path = tmp_path / "floor.json"
    run = f'noise_floor = "{floor_path}"\nbatch_slot_check = false'
    with live_fake(FakeBehaviour(model="model-a")) as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}], extra_run=run)
        assert main(["noise", str(cfg), "--limit", "2"]) == 0
        recorded = json.loads(floor_path.read_text())["identity"]
        assert recorded == {"served_model": "model-a", "version": "fake-0.1"}  # a url server: no spec keys
        assert main(["run", str(cfg), "-o", str(tmp_path / "same")]) == 0
    assert not [w for w in load_run(tmp_path / "same").warnings if "another reference" in w]
    capsys.readouterr()
    with live_fake(FakeBehaviour(model="model-b")) as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}], extra_run=run)
        main(["run", str(cfg), "-o", str(tmp_path / "other")])
    (said,) = [w for w in load_run(tmp_path / "other").warnings if "another reference" in w]
    assert "served_model 'model-a' there, 'model-b' here" in said and str(floor_path) in said
    assert "version" not in said  # the same /version: not named
    assert "measured on another reference" in capsys.readouterr().out


def test_identity_mismatch_compares_only_what_both_sides_know() -> None:
    from difftest.noise import NoiseFloor, identity_mismatch

    old = NoiseFloor(reference="ref")  # an older file: the name alone
    assert identity_mismatch(old, "ref", {"served_model": "x"}) is None
    renamed = identity_mismatch(NoiseFloor(reference="smollm2-on-H100"), "ref", {"served_model": "x"})
    assert renamed is not None and "name 'smollm2-on-H100' there, 'ref' here" in renamed
    assert "records only the name" in renamed
    new = NoiseFloor(reference="ref", identity={"served_model": "x", "dtype": "float32"})
    assert identity_mismatch(new, "ref", {"served_model": "x"}) is None  # dtype unknown here
    why = identity_mismatch(new, "ref", {"served_model": "x", "dtype": "bfloat16"})
    assert why is not None and "dtype 'float32' there, 'bfloat16' here" in why and "older" not in why


def test_the_floor_files_identity_is_checked_and_older_files_still_load() -> None:
    from difftest.errors import NoiseFloorError
    from difftest.noise import NoiseFloor

    base = {"schema": "difftest-noise-floor", "version": 1, "reference": "ref"}
    assert NoiseFloor.from_dict(base).identity == {}
    floor = NoiseFloor.from_dict(base | {"identity": {"served_model": "m", "dtype": "float32"}})
    assert NoiseFloor.from_json(floor.to_json()) == floor
    with pytest.raises(NoiseFloorError, match='identity is {"dtype": 16}, not an object of strings'):
        NoiseFloor.from_dict(base | {"identity": {"dtype": 16}})
    with pytest.raises(NoiseFloorError, match="not an object of strings"):
        NoiseFloor.from_dict(base | {"identity": ["served_model"]})


def test_null_none_beside_a_noise_floor_is_refused(tmp_path: Path, capsys) -> None:
    """The bug: `null = "none"` (absolute minimums only) was overridden by the floor file silently."""
    floor = tmp_path / "floor.json"
    floor.write_text('{"schema": "difftest-noise-floor", "version": 1}')
    dead = f"http://127.0.0.1:{free_port()}"
    extra = f'null = "none"\nnoise_floor = "{floor}"'
    cfg = write_config(tmp_path, dead, [{"name": "t", "url": dead}], extra_run=extra)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'null = "none" (absolute minimums only) contradicts noise_floor' in err
    assert not (tmp_path / "out").exists()  # refused before any server is asked


def test_a_url_servers_model_is_the_one_asked_and_must_be_served(tmp_path: Path, capsys) -> None:
    """The bug: `model = "gpt-4-this-does-not-exist"` on a url server was accepted and ignored:
    requests asked for the first id /v1/models lists, exit 0, no word."""
    from fakes import make_fake_app

    app = make_fake_app(FakeBehaviour())
    with live_fake(app=app) as ref, live_fake() as tgt:
        bad = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "model": "nope", "scheme": "none"}])
        assert main(["run", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model 'nope' is not served; /v1/models lists 'fake-model'" in err
        good = write_config(
            tmp_path, ref, [{"name": "t", "url": tgt, "model": "fake-model", "scheme": "none"}]
        )
        assert main(["run", str(good)]) == 0


def test_choose_model_names_the_pick_among_several() -> None:
    from difftest.conformance import choose_model
    from difftest.errors import ConformanceError

    assert choose_model("s", ["a"], None) == ("a", None)
    assert choose_model("s", [], None) == (None, None)
    assert choose_model("s", [], "x") == ("x", None)  # no list to check it against: asked as named
    assert choose_model("s", ["a", "b"], "b") == ("b", None)
    model, note = choose_model("s", ["a", "b"], None)
    assert (
        model == "a" and note is not None and "lists 2 models (a, b): requests ask for the first, 'a'" in note
    )
    with pytest.raises(ConformanceError, match="model 'c' is not served; /v1/models lists 'a', 'b'"):
        choose_model("s", ["a", "b"], "c")


def test_a_server_listing_several_models_says_which_was_asked(tmp_path: Path, monkeypatch) -> None:
    """Without `model` the first listed id is asked and a warning names it; with one, that id is
    in every request (probe included) and nothing is said."""
    from difftest.client import CompletionClient
    from difftest.identity import CANARY_PROMPT

    asked: dict[str, set[str]] = {}
    canary: dict[str, set[str]] = {}
    completions = CompletionClient.completions

    async def two(self: CompletionClient) -> list[str]:
        return ["fake-model", "fake-model-lora"]

    async def spy(self: CompletionClient, payload: dict, **kw: object) -> dict:
        # the cache's identity canary asked the first id, which "fake-model-lora" answers with a 404
        seen = canary if CANARY_PROMPT in str(payload.get("prompt")) else asked
        seen.setdefault(self.name, set()).add(payload.get("model"))
        return await completions(self, payload, **kw)

    monkeypatch.setattr(CompletionClient, "models", two)
    monkeypatch.setattr(CompletionClient, "completions", spy)
    with live_fake() as ref, live_fake(FakeBehaviour(model="fake-model-lora")) as tgt:  # 404 to other ids
        lora = {"name": "t", "url": tgt, "scheme": "none", "model": "fake-model-lora"}
        cfg = write_config(tmp_path, ref, [lora])
        assert main(["run", str(cfg)]) == 0
    warnings = load_run(tmp_path / "out").warnings
    assert [w for w in warnings if "lists 2 models" in w] == [
        "ref: /v1/models lists 2 models (fake-model, fake-model-lora): requests ask for the first, "
        "'fake-model' (set `model` in the server's table to choose)"
    ]
    assert asked == {"ref": {"fake-model"}, "t": {"fake-model-lora"}}
    assert canary == {"ref": {"fake-model"}, "t": {"fake-model-lora"}}


def test_the_signature_states_no_shim_defaults_for_url_or_command_servers() -> None:
    """The bug: `quant none`, `dtype auto`, `backend auto` were recorded for a url server that
    serves fp8-block: the shim's defaults, which do not apply to it."""
    from difftest.signature import _server
    from server_shim.launch_spec import ServerSpec

    url = _server(ServerSpec(name="t", url="http://127.0.0.1:1", model="m"))
    assert url == {"name": "t", "url": "http://127.0.0.1:1", "model": "m", "startup_timeout_s": 600.0}
    cmd = _server(ServerSpec(name="c", command="vllm serve {model} --port {port}", env={"K": "secret"}))
    assert "quant" not in cmd and "dtype" not in cmd and cmd["env_keys"] == ["K"] and "env" not in cmd
    shim = _server(ServerSpec(name="s", model="tiny-llama"))
    assert shim["quant"] == "none" and shim["dtype"]  # a built-in shim does run with its defaults


def test_the_white_box_skip_names_a_recorded_baseline_as_one() -> None:
    """The bug: "no /debug on reference reference ... a built-in shim serves /debug with debug =
    true", advice for a live server, said of a recorded baseline (a file: it has no /debug)."""
    from types import SimpleNamespace as NS

    from difftest.client import REPLAY_URL
    from difftest.runner import _no_debug

    def ep(name: str, debug: bool, url: str = "http://127.0.0.1:1") -> NS:
        return NS(name=name, caps=NS(debug=debug), client=NS(base_url=url, from_baseline=url == REPLAY_URL))

    cfg = NS(run=NS(whitebox="auto"))
    replay = ep("reference", False, REPLAY_URL)
    why = _no_debug(cfg, ep("t", True), replay, None)
    assert why is not None and why.startswith(
        "the reference (reference) is a recorded baseline: a recording has"
    )
    assert "built-in shim" not in why and "reference reference" not in why
    both = _no_debug(cfg, ep("t", False), replay, ep("g", True))
    assert both is not None and both.startswith(
        "no /debug on target t; the reference (reference) is a recorded"
    )
    assert "a built-in shim serves /debug" in both
    live = _no_debug(cfg, ep("t", False), ep("ref", False), ep("g", False))
    assert live is not None and live.startswith("no /debug on target t, reference ref, golden g: per-layer")
    assert _no_debug(cfg, ep("t", True), ep("ref", True), None) is None


def test_reference_identity_records_what_the_config_set_and_the_launch_free_fingerprint() -> None:
    from difftest.noise import reference_identity
    from server_shim.launch_spec import ServerSpec

    shim = ServerSpec(name="ref", model="tiny-llama", dtype="float32", device="cpu")
    fp = {"name": "ref", "url": "http://127.0.0.1:40123", "models": ["tiny-llama"], "version": "0.1",
          "debug_config_sha256": "ab" * 32}  # fmt: skip
    assert reference_identity(shim, "tiny-llama", fp) == {
        "served_model": "tiny-llama", "model": "tiny-llama", "dtype": "float32", "device": "cpu",
        "quant": "none", "version": "0.1", "server_config": "ab" * 8,
    }  # fmt: skip
    other_port = fp | {"url": "http://127.0.0.1:40999", "name": "reference"}
    assert reference_identity(shim, "tiny-llama", other_port) == reference_identity(shim, "tiny-llama", fp)
    url = ServerSpec(name="ref", url="http://127.0.0.1:1")
    assert reference_identity(url, None, None) == {}  # nothing known: nothing compared


@pytest.mark.parametrize("command", ["record", "noise"])
def test_record_and_noise_ask_for_a_url_servers_model_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """`run` asked for the configured model; `record` and `noise` probed the first listed id, which
    a server that serves only the second refuses (404): the recording or the floor failed."""
    from difftest.client import CompletionClient

    async def two(self: CompletionClient) -> list[str]:
        return ["fake-model", "fake-model-lora"]

    monkeypatch.setattr(CompletionClient, "models", two)
    with live_fake(FakeBehaviour(model="fake-model-lora")) as ref, live_fake() as tgt:
        floor = tmp_path / "floor.json"
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}],
                           extra_run=f'noise_floor = "{floor}"' if command == "noise" else "")  # fmt: skip
        text = cfg.read_text().replace(f'url = "{ref}"', f'url = "{ref}"\nmodel = "fake-model-lora"', 1)
        cfg.write_text(text)
        argv = (
            ["record", "--ref", str(cfg), "-o", str(tmp_path / "rec")]
            if command == "record"
            else [command, str(cfg)]
        )
        assert main(argv) == 0


def test_a_run_warns_of_a_thresholds_table_no_target_reads(tmp_path: Path) -> None:
    """`report --thresholds` warned of it; `run` took the same table without a word."""
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        cfg.write_text(cfg.read_text() + "[thresholds.int4-g128]\nkl_mean_max = 0.5\n")
        assert main(["run", str(cfg)]) == 0
    warnings = load_run(tmp_path / "out").warnings
    assert "[thresholds.int4-g128] applies to no target of this run (schemes: none): ignored" in warnings


def test_what_a_probe_found_reaches_the_run_warnings(tmp_path: Path) -> None:
    """ "greedy decoding is not deterministic" and the like sat in report.json's conformance block
    alone: no terminal line, nothing in report.md or report.html."""
    with live_fake() as ref, live_fake(FakeBehaviour(nondeterministic=True)) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        main(["run", str(cfg)])
    run = load_run(tmp_path / "out")
    assert any(w.startswith("t: greedy decoding is not deterministic") for w in run.warnings)
    assert not any(w.startswith("ref:") for w in run.warnings)  # the fake reference is a clean one
    md = (tmp_path / "out" / "report.md").read_text()
    assert "t: greedy decoding is not deterministic" in md


def test_the_depth_note_names_no_kl_where_there_is_none() -> None:
    """Over chat (no echo, no teacher forcing) the note said "KL compares the top-5" beside KL n/a.
    With teacher forcing the probe's caps say nothing: the depths the echoes had are the
    comparison's note (scoring.depth_notes)."""
    from types import SimpleNamespace

    from difftest.runner import _depth_note, _Pair

    eps = {n: SimpleNamespace(caps=SimpleNamespace(logprobs_cap=cap)) for n, cap in (("ref", 20), ("t", 5))}
    forced = _Pair("accuracy", "ref", "t")
    assert _depth_note(forced, eps, 10) == []  # type: ignore[arg-type]
    forced.teacher_forced = False
    assert _depth_note(forced, eps, 10) == [  # type: ignore[arg-type]
        "logprobs listed to different depths (ref top-10, t top-5): divergences are classified from the "
        "top-5 of both sides"
    ]


def test_a_conversation_over_completions_is_refused_before_any_server_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused after the probe before (exit 2 all the same); the URLs here serve nothing, so a
    server asked first would have made it exit 3."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path, dead, [{"name": "t", "url": dead}])
    conv = json.dumps({"id": "conv", "messages": [{"role": "user", "content": "hi"}]})
    (tmp_path / "prompts.jsonl").write_text(conv + "\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "prompt 'conv' has messages: they need endpoint" in err and err.count("\n") == 1


def test_a_report_that_cannot_be_written_keeps_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """previous/ was deleted when the run's answers were in, before its report was written: a full
    disk then left the folder with no report at all."""
    import difftest.report as report
    from difftest.errors import OutputError

    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 0

        def full(run: object, out: Path) -> None:
            raise OutputError(out / "report.json", "No space left on device")

        monkeypatch.setattr(report, "write_report", full)
        assert main(["run", str(cfg)]) == 2
    out = tmp_path / "out"
    assert load_run(out / "previous").gate_passed and not (out / "report.json").exists()


@pytest.mark.parametrize(("name", "folder"), [("report.html", True), ("plots", False), ("junit.xml", True)])
def test_something_else_where_a_report_file_goes_is_never_moved_or_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, folder: bool
) -> None:
    """A folder named report.html (or a file named plots) was moved into previous/ with the report
    and deleted once the run succeeded: the user's files went without a word."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier report: the set-aside step runs
    mine = out / name
    if folder:
        mine.mkdir()
        (mine / "mine.txt").write_text("keep")
    else:
        mine.write_text("keep")
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {mine}: a {'folder' if folder else 'file'} stands where the report writes" in err
    assert (mine / "mine.txt").exists() if folder else mine.read_text() == "keep"
    assert (out / "report.json").read_text() == "{}"  # nothing moved
