"""A recorded reference (`difftest record`) judges a target exactly as the live reference does, and
a baseline that does not fit the run (prompts, settings, tokenizer, file) is refused with exit 2."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from live_fakes import live_fake

from difftest.baseline import FORMAT, Baseline
from difftest.cli import main
from difftest.report import load_run

PROMPTS = ["1+2+3=", "the quick brown fox", "def add(a, b):", "the lazy dog is", "a fox jumps over"]


def write_prompts(path: Path, texts: list[str] = PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _numbers(report_dir: Path) -> tuple[str, dict, list]:
    run = load_run(report_dir)
    t = run.targets[0]
    acc = t.comparison("accuracy")
    assert acc is not None and t.verdict is not None
    per_prompt = [
        (p.prompt_id, p.match_rate, p.kl_mean, p.first_divergence, p.divergence_kind) for p in acc.prompts
    ]
    return t.verdict.label, acc.aggregate, per_prompt


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), k
        else:
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("target", [FakeBehaviour(), FakeBehaviour(flip_every=3, perturb_noise=0.3)])
def test_baseline_judges_like_the_live_reference(tmp_path: Path, target: FakeBehaviour, capsys) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl")
    common = ["--max-tokens", "10", "--logprobs", "5", "--scheme", "fp8-block"]
    with live_fake() as ref, live_fake(target) as tgt:
        assert (
            main(
                [
                    "record",
                    "--ref",
                    ref,
                    "--prompts",
                    str(prompts),
                    "--max-tokens",
                    "10",
                    "-o",
                    str(tmp_path / "base"),
                    "--json",
                ]
            )
            == 0
        )
        rec = json.loads(capsys.readouterr().out)
        live = main(
            [
                "compare",
                "--ref",
                ref,
                "--target",
                tgt,
                "--prompts",
                str(prompts),
                *common,
                "-o",
                str(tmp_path / "live"),
            ]
        )
    assert rec["prompts"] == len(PROMPTS) and rec["failed_generations"] == 0
    # the reference is gone: the baseline answers alone
    with live_fake(target) as tgt:
        stored = main(
            [
                "compare",
                "--baseline",
                str(tmp_path / "base"),
                "--target",
                tgt,
                *common[4:],
                "-o",
                str(tmp_path / "stored"),
            ]
        )
    assert live == stored
    live_v, live_agg, live_prompts = _numbers(tmp_path / "live")
    base_v, base_agg, base_prompts = _numbers(tmp_path / "stored")
    assert live_v == base_v
    _same(live_agg, base_agg)
    assert live_prompts == base_prompts
    assert (live == 0) == (target.flip_every == 0)  # an agreeing target passes, a flipping one fails


def test_config_reference_baseline(tmp_path: Path, recorded: Path) -> None:
    prompts = tmp_path / "p.jsonl"  # written by the `recorded` fixture, which recorded them into "b"
    with live_fake() as tgt:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 8\noutput_dir = "{tmp_path / "out"}"\n'
            '[reference]\nname = "stored"\nbaseline = "b"\n'
            f'[[target]]\nname = "t"\nurl = "{tgt}"\nscheme = "fp8-block"\n'
        )
        assert main(["run", str(cfg)]) == 0
    assert main(["noise", str(cfg)]) == 2  # a recorded reference has no noise to measure
    run = load_run(tmp_path / "out")
    assert run.signature["baseline"]["prompts"] == len(PROMPTS) and run.signature["baseline"]["created_at"]
    assert run.reference == "stored" and run.targets[0].comparison("accuracy").aggregate["n_prompts"] == len(
        PROMPTS
    )
    # teacher forcing ran against the recorded echoes (not degraded)
    assert run.targets[0].comparison("accuracy").aggregate.get("kl_mean") is not None


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    prompts = write_prompts(tmp_path / "p.jsonl")
    with live_fake() as ref:
        assert (
            main(
                [
                    "record",
                    "--ref",
                    ref,
                    "--prompts",
                    str(prompts),
                    "--max-tokens",
                    "8",
                    "-o",
                    str(tmp_path / "b"),
                ]
            )
            == 0
        )
    return tmp_path / "b"


@pytest.mark.parametrize(
    ("extra", "behaviour", "message"),
    [
        (["--max-tokens", "9"], FakeBehaviour(), "recorded with max_tokens=8"),
        (["--logprobs", "3"], FakeBehaviour(), "recorded with logprobs=5"),
        (["--seed", "7"], FakeBehaviour(), "recorded with seed=0"),
        (["--prompts", "OTHER"], FakeBehaviour(), "differs from the recorded one"),
        ([], FakeBehaviour(tokenizer="alt"), "tokenizers differ"),
    ],
)
def test_mismatched_baseline_is_refused(
    recorded: Path, tmp_path: Path, extra: list[str], behaviour: FakeBehaviour, message: str, capsys
) -> None:
    if "OTHER" in extra:
        extra = [
            "--prompts",
            str(write_prompts(tmp_path / "other.jsonl", [*PROMPTS[:2], "a different prompt"])),
        ]
    capsys.readouterr()
    with live_fake(behaviour) as tgt:
        code = main(
            ["compare", "--baseline", str(recorded), "--target", tgt, *extra, "-o", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("difftest: error: ") and message in err


@pytest.mark.parametrize("damage", ["missing", "not-gzip", "foreign", "version"])
def test_bad_baseline_file_is_one_line_exit_2(recorded: Path, tmp_path: Path, damage: str, capsys) -> None:
    path = recorded / "baseline.json.gz"
    if damage == "missing":
        path = tmp_path / "nowhere"
    elif damage == "not-gzip":
        path.write_text("{}")
    else:
        doc = {"format": "other"} if damage == "foreign" else {"format": FORMAT, "version": 99}
        with gzip.open(path, "wt") as f:
            json.dump(doc, f)
    capsys.readouterr()
    code = main(["compare", "--baseline", str(path), "--target", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "baseline" in err


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda d: d["prompts"][0].pop("prompt"), "prompts[0] has no string 'id' and 'prompt'"),
        (lambda d: d["settings"].update(max_tokens="4"), "settings.max_tokens is '4'"),
        (lambda d: d["settings"].update(seed=-3), "settings.seed is -3"),
        (lambda d: d["prompts"][1].update(max_tokens=0), "prompts[1].max_tokens is 0"),
        (lambda d: d.update(prompts={"a": 1}), "'prompts' is not a list"),
    ],
    ids=["prompt-missing", "settings-type", "settings-seed", "prompt-max-tokens", "prompts-type"],
)
def test_a_baseline_damaged_inside_is_malformed_not_a_traceback(
    recorded: Path, damage, said: str, capsys
) -> None:
    """The bug: a prompt without 'prompt' was a KeyError traceback; settings.max_tokens "4" a TypeError
    halfway through the run."""
    path = recorded / "baseline.json.gz"
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    damage(doc)
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)
    capsys.readouterr()
    assert main(["compare", "--baseline", str(recorded), "--target", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed" in err and said in err


def test_baseline_file_holds_what_was_asked(recorded: Path) -> None:
    base = Baseline.read(recorded)
    assert base.settings == {"max_tokens": 8, "logprobs": 5, "seed": 0, "endpoint": "completions"}
    assert [p["prompt"] for p in base.prompts] == PROMPTS
    assert base.tokenizer["model"] == "fake-model" and base.tokenizer["probe_tokenizations"]
    paths = {json.loads(k)[1] for k in base.exchanges.table}
    assert {"/v1/completions", "/v1/models", "/tokenize"} <= paths
    assert not any(p.startswith("/debug") for p in paths)  # black-box only


def test_record_from_a_config_then_run_against_it(tmp_path: Path, capsys) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl")
    with live_fake() as ref, live_fake(FakeBehaviour(flip_every=2)) as bad:
        cfg = tmp_path / "live.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 8\noutput_dir = "{tmp_path / "live"}"\n'
            f'[reference]\nname = "ref"\nurl = "{ref}"\n'
            f'[[target]]\nname = "t"\nurl = "{bad}"\nscheme = "none"\n'
        )
        assert main(["record", "--ref", str(cfg), "-o", str(tmp_path / "b"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["settings"]["max_tokens"] == 8  # the config's
        live = main(["run", str(cfg)])
        stored_cfg = tmp_path / "stored.toml"
        stored_cfg.write_text(
            cfg.read_text().replace(f'url = "{ref}"', 'baseline = "b"').replace('"live"', '"stored"')
        )
        stored = main(["run", str(stored_cfg), "-o", str(tmp_path / "stored")])
    assert live == stored == 1
    assert _numbers(tmp_path / "live")[2] == _numbers(tmp_path / "stored")[2]
    # a baseline key beside server keys is a config error naming the key
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text(stored_cfg.read_text().replace('baseline = "b"', 'baseline = "b"\nmodel = "x"'))
    assert main(["run", str(bad_cfg)]) == 2
    assert "'model' cannot go with 'baseline'" in capsys.readouterr().err


def test_a_recording_with_too_many_failed_generations_is_exit_3(tmp_path: Path, capsys) -> None:
    """The bug: exit 0 with failed_generations 1 of 5 (over error_rate_limit 5%); every compare
    replayed from it then exited 3."""
    prompts = write_prompts(tmp_path / "p.jsonl")
    with live_fake(FakeBehaviour(fault="http-500", fault_match="def add")) as ref:
        code = main(["record", "--ref", ref, "--prompts", str(prompts), "-o", str(tmp_path / "b"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 3 and out["exit_code"] == 3 and out["failed_generations"] == 1
    assert (tmp_path / "b" / "baseline.json.gz").exists()  # kept, as a run's report is


def test_recording_a_debug_server_says_the_baseline_is_black_box(tmp_path: Path, capsys) -> None:
    """The recorder answers /debug itself, so the probe saw 'no debug protocol'; said of a server
    that serves one, that warning was false. The baseline is what is black-box."""
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    with live_fake(FakeBehaviour(debug=True)) as ref:
        out = tmp_path / "base"
        argv = ["record", "--ref", ref, "--prompts", str(prompts), "--max-tokens", "4", "-o", str(out)]
        assert main([*argv, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert not any("debug" in w for w in summary["warnings"])
        assert summary["note"].startswith("a baseline is black-box")
        assert main(argv) == 2  # a baseline is already there: never replaced unasked
        assert "already holds a recorded baseline" in capsys.readouterr().err
        assert main([*argv, "--overwrite"]) == 0
        shown = capsys.readouterr().out
        assert "no debug protocol" not in shown and "note: a baseline is black-box" in shown
