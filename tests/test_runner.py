"""The differ end to end over fake engines served on loopback: verdicts, exit codes, degradation,
a server dying halfway, and --resume (issue 5's differ tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from live_fakes import free_port, live_fake

from difftest.cli import main
from difftest.report import load_run

PROMPTS = [
    "1+2+3=",
    "the quick brown fox",
    "def add(a, b):",
    "the lazy dog is",
    "a fox jumps over",
    "2+2+2=",
]


def write_prompts(tmp: Path) -> Path:
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def _toml(v: object) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def write_config(tmp: Path, ref: str, targets: list[dict], *, extra_run: str = "") -> Path:
    prompts = write_prompts(tmp)
    lines = [
        "[run]",
        f'prompts = ["{prompts}"]',
        "max_tokens = 12",
        "logprobs = 5",
        "concurrency = 4",
        f'output_dir = "{tmp / "out"}"',
        "max_retries = 1",
        "request_timeout_s = 10",
        extra_run,
        "[reference]",
        'name = "ref"',
        f'url = "{ref}"',
    ]
    for t in targets:
        lines.append("[[target]]")
        for k, v in t.items():
            lines.append(f"{k} = {_toml(v)}")
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_with_golden(tmp_path: Path, apps: dict, whitebox: str) -> int:
    """`difftest run` of target "t" with golden "g" against reference "ref", each served by its
    app in `apps` (keys "ref", "gold", "tgt"), without the batch-slot check; report in tmp/out."""
    with (
        live_fake(app=apps["ref"]) as ref,
        live_fake(app=apps["gold"]) as gold,
        live_fake(app=apps["tgt"]) as tgt,
    ):
        cfg = write_config(
            tmp_path, ref, [{"name": "t", "url": tgt, "golden": {"name": "g", "url": gold}}],
            extra_run=f'whitebox = "{whitebox}"\nbatch_slot_check = false',
        )  # fmt: skip
        return main(["run", str(cfg), "-o", str(tmp_path / "out")])


def test_identical_servers_pass_and_exit_0(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake() as tgt, live_fake() as gold:
        cfg = write_config(
            tmp_path,
            ref,
            [{"name": "tgt", "url": tgt, "scheme": "none", "golden": {"url": gold, "name": "gold"}}],
        )
        assert main(["run", str(cfg)]) == 0
    run = load_run(tmp_path / "out")
    (t,) = run.targets
    assert t.verdict is not None and t.verdict.passed
    acc = t.comparison("accuracy")
    assert acc is not None and acc.aggregate["token_match"] == 1.0
    assert acc.aggregate["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert t.comparison("exactness") is not None
    for name in ("report.md", "report.html", "report.json", "junit.xml", "cache.sqlite"):
        assert (tmp_path / "out" / name).exists()


def test_wrong_target_fails_with_reasons_exit_1(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(flip_every=2)) as tgt:
        # every 2nd greedy token is the runner-up: far under the tight "none" budget's token match
        cfg = write_config(tmp_path, ref, [{"name": "bad", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 1
    (t,) = load_run(tmp_path / "out").targets
    assert t.verdict is not None and not t.verdict.passed
    reasons = " ".join(t.verdict.reasons)
    assert "accuracy" in reasons and ("token_match" in reasons or "top1" in reasons)
    acc = t.comparison("accuracy")
    assert acc is not None and acc.aggregate["token_match"] < 0.9
    assert any(p.divergence_kind in ("DRIFT", "TIE", "WRONG") for p in acc.prompts)


def test_negative_control_expected_to_fail_exit_0(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(flip_every=2)) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "ctrl", "url": tgt, "scheme": "none", "expect": "fail"}])
        assert main(["run", str(cfg)]) == 0


def test_target_without_echo_degrades_with_warning(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(echo=False)) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "noecho", "url": tgt, "scheme": "fp8-block"}])
        code = main(["run", str(cfg)])
    (t,) = load_run(tmp_path / "out").targets
    acc = t.comparison("accuracy")
    assert acc is not None and "kl_mean" not in acc.aggregate  # never a silently empty metric
    assert acc.aggregate["token_match"] == 1.0
    text = " ".join(acc.warnings + list(t.verdict.warnings))  # type: ignore[union-attr]
    assert "teacher-forced" in text
    assert code == 0


def test_incompatible_tokenizers_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(tokenizer="alt")) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "other", "url": tgt, "scheme": "none"}])
        assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_server_dying_halfway_exit_3_then_resume_completes(tmp_path: Path) -> None:
    port = free_port()
    # conformance probes use ~10 requests; the server dies partway through the prompts
    with live_fake() as ref:
        with live_fake(FakeBehaviour(die_after=16, die_mode="503"), port=port) as tgt:
            cfg = write_config(tmp_path, ref, [{"name": "flaky", "url": tgt, "scheme": "none"}])
            assert main(["run", str(cfg)]) == 3
        first = load_run(tmp_path / "out")
        acc = first.targets[0].comparison("accuracy")
        assert acc is not None and acc.aggregate["failed_requests"] > 0
        done_before = sum(p.error is None for p in acc.prompts)
        with live_fake(port=port):
            assert main(["run", str(cfg), "--resume"]) == 0
    second = load_run(tmp_path / "out").targets[0].comparison("accuracy")
    assert second is not None and second.aggregate["failed_requests"] == 0
    assert sum(p.error is None for p in second.prompts) == len(PROMPTS) >= done_before


def test_report_rerenders_offline_with_new_thresholds(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(flip_every=4)) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "int4-g128"}])
        first = main(["run", str(cfg)])
    strict = tmp_path / "strict.toml"
    strict.write_text("[thresholds.int4-g128]\ntoken_match_min = 0.999\n")
    # servers are gone: this only reads report.json
    assert main(["report", str(tmp_path / "out"), "--thresholds", str(strict)]) == 1
    run = load_run(tmp_path / "out")
    assert run.signature["rejudged_with"] == str(strict)
    assert any("token_match" in r for r in run.targets[0].verdict.reasons)  # type: ignore[union-attr]
    assert first in (0, 1, 4)  # judged (a verdict's exit code), whatever the verdict


def test_compare_without_config(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path)
    with live_fake() as ref, live_fake() as tgt:
        code = main(
            ["compare", "--ref", ref, "--target", tgt, "--prompts", str(prompts), "-o", str(tmp_path / "c")]
        )
    assert code == 0
    assert (tmp_path / "c" / "report.md").read_text().count("PASS") >= 1


def test_compare_single_prompt_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(flip_every=3)) as tgt:
        code = main(["compare", "--ref", ref, "--target", tgt, "--prompt", "the quick brown fox"])
    out = capsys.readouterr().out
    assert code == 0
    assert "first divergence at token" in out


def test_probe_prints_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    with live_fake(FakeBehaviour(echo=False)) as url:
        assert main(["probe", url]) == 1  # echo FAIL is exit 1
    out = capsys.readouterr().out
    assert "echo" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "/nonexistent.toml"],
        ["run"],
        ["compare", "--ref", "notaurl", "--target", "http://127.0.0.1:1", "--prompt", "x"],
        [
            "compare",
            "--ref",
            "http://127.0.0.1:1",
            "--target",
            "http://127.0.0.1:1",
            "--prompt",
            "x",
            "--logprobs",
            "50",
        ],
        ["report", "/nonexistent-dir"],
        ["frobnicate"],
    ],
)
def test_usage_errors_are_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_noise_floor_measured_and_used(tmp_path: Path) -> None:
    with live_fake() as ref, live_fake() as tgt:
        floor_path = tmp_path / "floor.json"
        cfg = write_config(
            tmp_path,
            ref,
            [{"name": "t", "url": tgt, "scheme": "none"}],
            extra_run=f'noise_floor = "{floor_path}"',
        )
        assert main(["noise", str(cfg)]) == 0
        data = json.loads(floor_path.read_text())
        assert data["schema"] == "difftest-noise-floor" and data["n_comparisons"] >= 2
        assert main(["run", str(cfg)]) == 0
    run = load_run(tmp_path / "out")
    assert run.noise_floor is not None and "noise floor" in run.signature["noise_floor"]


def test_a_damaged_noise_floor_is_refused_before_any_server_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A number written as a string loaded, every server answered, then the judge crashed with a
    traceback (exit 1, the verdict's code). Now exit 2 first: the URLs here serve nothing, and
    asking them would have been exit 3."""
    floor = tmp_path / "floor.json"
    floor.write_text('{"schema": "difftest-noise-floor", "version": 1, "kl_mean": "0.001"}')
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path, dead, [{"name": "t", "url": dead}], extra_run=f'noise_floor = "{floor}"')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f'{floor}: noise-floor file: kl_mean is "0.001", not a number' in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_chunked_run_gives_the_same_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts processed 2 at a time (raw responses dropped per chunk) score exactly as in one go."""
    from difftest import runner

    with live_fake() as ref, live_fake(FakeBehaviour(flip_every=3)) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "fp8-block"}])
        main(["run", str(cfg), "-o", str(tmp_path / "one")])
        monkeypatch.setattr(runner, "CHUNK_PROMPTS", 2)
        main(["run", str(cfg), "-o", str(tmp_path / "chunked")])
    one = load_run(tmp_path / "one").targets[0].comparison("accuracy")
    chunked = load_run(tmp_path / "chunked").targets[0].comparison("accuracy")
    assert one is not None and chunked is not None
    assert [p.prompt_id for p in chunked.prompts] == [f"p{i}" for i in range(len(PROMPTS))]
    assert chunked.prompts == one.prompts and chunked.aggregate == one.aggregate


def test_a_target_without_logprobs_costs_no_batch_slot_draws(tmp_path: Path) -> None:
    """Its slot check is skipped (stated), so the reference is not asked for its own slot variance:
    the same completions reach it with the check on as with it off."""
    from fakes import make_fake_app

    served = {}
    for check in (True, False):
        ref_app = make_fake_app(FakeBehaviour())
        with live_fake(app=ref_app) as ref, live_fake(FakeBehaviour(max_logprobs=0)) as tgt:
            out = tmp_path / str(check)
            out.mkdir()
            cfg = write_config(out, ref, [{"name": "nolp", "url": tgt, "scheme": "none"}],
                               extra_run=f"batch_slot_check = {str(check).lower()}")  # fmt: skip
            assert main(["run", str(cfg)]) == 0
        served[check] = ref_app.state.fake.completions_served
        if check:
            (t,) = load_run(out / "out").targets
            assert t.invariance["skipped"] == "the server returns no logprobs"
    assert served[True] == served[False] > 0


def test_the_quick_look_sends_the_seed_and_refuses_what_it_cannot_use(monkeypatch, capsys) -> None:
    """The bugs: the quick look sent seed 0 whatever --seed said, and took --golden / --scheme /
    --limit without using them."""
    import difftest.collect as collect

    seeds: list[int] = []
    real = collect.generate

    async def spy(ep, prompt, *, max_tokens, k, seed):  # noqa: ANN001, ANN202
        seeds.append(seed)
        return await real(ep, prompt, max_tokens=max_tokens, k=k, seed=seed)

    monkeypatch.setattr(collect, "generate", spy)
    with live_fake() as ref, live_fake() as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompt", "the quick brown fox"]
        assert main([*argv, "--seed", "1234"]) == 0
        assert seeds == [1234, 1234]
        for extra in (["--golden", ref], ["--scheme", "fp8-block"], ["--limit", "1"]):
            assert main([*argv, *extra]) == 2
            assert "the quick look (--prompt) judges nothing" in capsys.readouterr().err


def test_compare_against_a_refused_port_says_so_and_gives_up_in_seconds(
    tmp_path, monkeypatch, caplog, capsys
) -> None:
    """The bug: `compare --prompts` against a URL that refuses connections waited a launch's 600 s
    without a line. Now compare's running servers get COMPARE_STARTUP_S, and the wait says what
    it waits for."""
    import logging

    from live_fakes import free_port

    import difftest.cli.compare as compare_cli
    import server_shim.launch as launch

    monkeypatch.setattr(compare_cli, "COMPARE_STARTUP_S", 1.0)
    monkeypatch.setattr(launch, "WAIT_NOTE_S", 0.3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="server_shim.launch"):
        code = main(
            ["compare", "--ref", url, "--target", url, "--prompts", str(prompts), "-o", str(tmp_path / "o")]
        )
    assert code == 3 and "not healthy after 1s" in capsys.readouterr().err
    assert any("still waiting for reference" in r.getMessage() for r in caplog.records)


def test_a_run_whose_every_request_is_refused_as_invalid_is_a_usage_error(tmp_path, capsys) -> None:
    """The bug: --max-tokens over the server's cap had every request refused (HTTP 400), and the run
    said exit 3, 'infrastructure'; it is a usage error (exit 2): nothing was judged."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "the quick"}\n')
    with live_fake(FakeBehaviour(max_tokens_cap=64)) as ref:
        argv = [
            "compare",
            "--ref",
            ref,
            "--target",
            ref,
            "--prompts",
            str(prompts),
            "-o",
            str(tmp_path / "o"),
        ]
        code = main([*argv, "--max-tokens", "100"])
    err = capsys.readouterr().err
    assert code == 2 and "every request was refused as invalid, nothing was judged" in err


def test_a_run_refused_before_it_starts_keeps_the_earlier_cache(tmp_path: Path) -> None:
    """The cache of a finished run was deleted first, then the prompts were found to hold a
    duplicate id (exit 2): `--resume` had nothing left to resume."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "cache.sqlite").write_bytes(b"earlier answers")
    cfg = write_config(tmp_path, "http://127.0.0.1:9", [{"name": "tgt", "url": "http://127.0.0.1:9"}])
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    assert main(["run", str(cfg), "-o", str(out)]) == 2
    assert (out / "cache.sqlite").read_bytes() == b"earlier answers"
    fresh = tmp_path / "fresh"
    assert main(["run", str(cfg), "-o", str(fresh)]) == 2 and not fresh.exists()  # nor an empty folder


@pytest.mark.parametrize("spell", [lambda u: u + "/v1", lambda u: u.replace("127.0.0.1", "localhost") + "/"])
def test_a_target_at_the_references_url_is_named(tmp_path: Path, spell) -> None:
    """A copy-paste slip (the reference's URL as the target's) PASSed every check without a word;
    `localhost` for the reference's 127.0.0.1 was taken for another server (string equality)."""
    with live_fake() as ref:
        cfg = write_config(tmp_path, ref, [{"name": "tgt", "url": spell(ref), "scheme": "none"}])
        assert main(["run", str(cfg), "-o", str(tmp_path / "out")]) == 0
    warnings = load_run(tmp_path / "out").warnings
    assert any("tgt and ref are one server" in w and "compared with itself" in w for w in warnings), warnings
