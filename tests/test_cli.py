"""CLI conventions (issue 12): every option documented, one flag vocabulary, --version, -v anywhere,
one-line errors without a doubled prefix, API keys (OPENAI_API_KEY and per server), --timeout,
exit codes that reflect FAIL, and --json output that parses, for every command."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
from fakes import FakeBehaviour
from live_fakes import live_fake

from difftest.cli import COMMANDS, build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(subs) == set(COMMANDS)
    undocumented = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, p in [("difftest", parser), *subs.items()]
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())
    ]
    assert undocumented == []


def test_one_flag_vocabulary() -> None:
    subs = _subparsers(build_parser())
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in subs.items()}
    for name, have in flags.items():
        assert {"--json", "-v", "--debug-traceback"} <= have, name
    talks_to_servers = ("run", "compare", "record", "probe", "noise", "layers", "quant")
    for name in talks_to_servers:
        assert "--timeout" in flags[name], name
    for name in ("compare", "record", "probe", "layers", "quant"):
        assert "--api-key-env" in flags[name], name
    for name in ("run", "compare", "record", "noise"):
        assert {"-j", "--concurrency", "--limit"} <= flags[name], name
    for name in talks_to_servers:
        assert {"-j", "--concurrency"} <= flags[name], name
    for name in ("run", "compare", "record", "noise", "report", "diff", "layers", "quant"):
        out = next(a for a in subs[name]._actions if "-o" in a.option_strings)
        assert out.metavar == "DIR" and out.option_strings == ["-o", "--out"], name  # -o is a folder


def test_version_and_help_exit_0(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("difftest ")
    for name in COMMANDS:
        assert main([name, "--help"]) == 0
        assert "--json" in capsys.readouterr().out


def test_verbose_counts_anywhere() -> None:
    parser = build_parser()
    args = parser.parse_args(["-v", "probe", "http://x", "-v"])
    assert args.verbose + args.verbose_sub == 2
    args = parser.parse_args(["probe", "http://x", "-vv"])
    assert getattr(args, "verbose", 0) + args.verbose_sub == 2


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["compare", "--target", "http://x", "--prompt", "a"],
            "compare: one of the arguments --ref --baseline",
        ),
        (["frobnicate"], "invalid choice"),
        (["probe", "ftp://x"], "'ftp://x' is not an http(s) URL"),
        (["compare", "--ref", "http://x", "--target", "http://y"], "give --prompts FILE or --prompt TEXT"),
        (["probe", "http://x", "--api-key-env", "NOPE_NOT_SET_123"], "NOPE_NOT_SET_123 is not set"),
        (
            ["probe", "http://x", "--timeout", "0"],
            "--timeout: must be a finite number of seconds > 0, got '0'",
        ),
        (
            ["probe", "http://x", "--timeout", "nan"],
            "--timeout: must be a finite number of seconds > 0, got 'nan'",
        ),
        (
            ["compare", "--ref", "http://x", "--target", "http://y", "--prompt", "hi", "--timeout", "inf"],
            "must be a finite number of seconds > 0, got 'inf'",
        ),
        (
            ["compare", "--ref", "http://x", "--target", "http://y", "--prompt", "hi", "--seed", "-1"],
            "--seed must be >= 0, got -1",
        ),
        (
            ["compare", "--ref", "http://x", "--target", "http://y", "--prompt", "hi", "--logprobs", "21"],
            "--logprobs must be in 1..20 (the continuation's tokens are read from the logprobs block), got 21",
        ),
        (  # refused while parsing: the old check came after every request had been answered
            [
                "compare",
                "--ref",
                "http://x",
                "--target",
                "http://y",
                "--prompts",
                "p.jsonl",
                "--scheme",
                "fp8-blok",
            ],
            "unknown scheme 'fp8-blok' (known: none, fp8-tensor, fp8-token, fp8-block, int8, int4-g128, mxfp4); "
            "did you mean 'fp8-block'?",
        ),
        (
            ["record", "--ref", "http://x", "--prompts", "p.jsonl", "--seed", "-2"],
            "--seed must be >= 0, got -2",
        ),
    ],
)
def test_errors_are_one_line_with_one_prefix(argv: list[str], words: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("difftest: error: ") and words in err
    assert "error: difftest" not in err


def test_openai_api_key_is_the_default_key(monkeypatch, capsys) -> None:
    with live_fake(FakeBehaviour(api_key="sk-secret")) as url:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        assert main(["probe", url, "--json"]) == 2  # 401: no key, and the error says what to do
        err = capsys.readouterr().err
        assert (
            "401" in err and "(no API key was sent: name the variable that holds it with --api-key-env" in err
        )
        monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
        assert main(["probe", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_code"] == 0


def test_per_server_keys(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("KEY_A", "sk-a")
    monkeypatch.setenv("KEY_B", "sk-b")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with live_fake(FakeBehaviour(api_key="sk-a")) as ref, live_fake(FakeBehaviour(api_key="sk-b")) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompt", "the quick brown fox", "--json"]
        assert main([*argv, "--api-key-env", "reference=KEY_A", "--api-key-env", "target=KEY_B"]) == 0
        assert json.loads(capsys.readouterr().out)["prompts"][0]["match_rate"] == 1.0
        assert main([*argv, "--api-key-env", "KEY_A"]) == 2  # one key for both: the target refuses it
    err = capsys.readouterr().err
    assert "401" in err and "(an API key was sent and refused)" in err


def test_timeout_is_honoured(capsys) -> None:
    with live_fake(FakeBehaviour(delay_s=3.0)) as url:
        start = time.monotonic()
        code = main(["probe", url, "--timeout", "0.3"])
        took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code in (2, 3) and "timed out after 0.3s" in err and took < 3.0


def test_quick_look_json_and_exit_code(capsys) -> None:
    with live_fake() as ref, live_fake(FakeBehaviour(echo=False, flip_every=2)) as tgt:
        code = main(["compare", "--ref", ref, "--target", tgt, "--prompt", "the quick brown fox", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 == data["exit_code"]  # the target's probe marks echo FAIL
    assert data["failed_checks"] == [
        {"server": "target", "check": "echo", "detail": "HTTP 400: echo is not supported"}
    ]
    (view,) = data["prompts"]
    d = view["first_divergence"]  # the first context the flipping model ranks its runner-up first after
    assert d is not None and view["ref_tokens"][:d] == view["tgt_tokens"][:d]
    assert view["ref_tokens"][d] != view["tgt_tokens"][d]


def test_run_and_noise_json(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(["a b", "1+1="]))
    )
    with live_fake() as ref, live_fake() as tgt:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 6\noutput_dir = "{tmp_path / "out"}"\n'
            f'[reference]\nurl = "{ref}"\n[[target]]\nname = "t"\nurl = "{tgt}"\nscheme = "fp8-block"\n'
        )
        assert main(["run", str(cfg), "--json", "-j", "2", "--timeout", "30"]) == 0
        run = json.loads(capsys.readouterr().out)
        assert run["gate_passed"] and run["targets"][0]["verdict"] == "PASS"
        assert main(["noise", str(cfg), "--json", "--no-restart", "-o", str(tmp_path / "floor")]) == 0
        noise = json.loads(capsys.readouterr().out)
        assert main(["noise", str(cfg), "--no-restart", "-o", str(tmp_path / "floor2")]) == 0
        shown = capsys.readouterr().out  # two identical fakes never diverge: no tie margin, in words
        assert "tie_margin: n/a (no A/A divergence)" in shown and "None" not in shown
        # the bound the exactness limits rest on is shown beside the point value (identical fakes: 0)
        assert "kl_mean: 0 (upper 95% bound 0: what the limits rest on)" in shown, shown
    assert noise["floor_file"] == str(tmp_path / "floor" / "noise-floor.json")  # -o is a folder
    assert Path(noise["floor_file"]).is_file() and noise["floor"]["schema"] == "difftest-noise-floor"
    signature = json.loads((tmp_path / "out" / "report.json").read_text())["signature"]["run"]
    assert signature["concurrency"] == 2 and signature["request_timeout_s"] == 30


def test_piped_tables_are_not_cut(capsys) -> None:
    from difftest.cli.layers import render_layers
    from difftest.cli.options import console
    from difftest.results import LayerDiff, LayerPoint

    name = "model.layers.17.self_attn.some_really_long_module_name.q_proj"
    point = LayerPoint(name, 17, "linear", 0.99912345, 1.0012, 3.3e-3, 0.1, 40.0, flagged=True,
                       local_cosine=0.99987654, local_norm_ratio=1.0001, local_rel_err=1.2e-4)  # fmt: skip
    render_layers(LayerDiff("ref", "accuracy", [point], summary="x"), "target", console())
    out = capsys.readouterr().out
    assert name in out and "0.999123" in out and "…" not in out


def test_a_clean_layer_diff_says_what_the_replay_cannot_see(capsys) -> None:
    """slot-tile (slot 16 on) left `difftest layers` at "no divergence", exit 0, without a word."""
    from difftest.cli.layers import REPLAY_SLOTS_NOTE, render_layers
    from difftest.cli.options import console
    from difftest.results import LayerDiff

    render_layers(LayerDiff("ref", "accuracy", [], summary="no divergence vs ref"), "t", console())
    assert " ".join(REPLAY_SLOTS_NOTE.split()) in " ".join(capsys.readouterr().out.split())
    render_layers(LayerDiff("ref", "accuracy", [], summary="x", guilty_module="m"), "t", console())
    assert "batch slots 0 and 1" not in capsys.readouterr().out


def test_quick_look_writes_its_json_into_the_out_folder(tmp_path: Path, capsys) -> None:
    with live_fake() as ref, live_fake() as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompt", "1+2+3=", "-o", str(tmp_path / "look")]
        assert main(argv) == 0
    data = json.loads((tmp_path / "look" / "quicklook.json").read_text())
    assert data["exit_code"] == 0 and data["prompts"][0]["match_rate"] == 1.0


def test_run_uses_openai_api_key_for_running_servers(tmp_path: Path, monkeypatch, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the quick brown fox"}) + "\n")
    with live_fake(FakeBehaviour(api_key="sk-k")) as ref, live_fake(FakeBehaviour(api_key="sk-k")) as tgt:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 4\noutput_dir = "{tmp_path / "out"}"\n'
            f'[reference]\nurl = "{ref}"\n[[target]]\nname = "t"\nurl = "{tgt}"\nscheme = "fp8-block"\n'
        )
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        assert main(["run", str(cfg)]) in (2, 3)  # 401 without a key
        monkeypatch.setenv("OPENAI_API_KEY", "sk-k")
        capsys.readouterr()
        code = main(["run", str(cfg), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == summary["exit_code"] and summary["targets"][0]["verdict"] in ("PASS", "INCONCLUSIVE")


@pytest.mark.parametrize(
    "argv",
    [
        [
            "compare",
            "--ref",
            "http://127.0.0.1:9",
            "--target",
            "http://127.0.0.1:9",
            "--prompt",
            "hi",
            "-o",
            "{f}",
        ],
        ["record", "--ref", "http://127.0.0.1:9", "-o", "{f}"],
        ["diff", "a", "b", "-o", "{f}"],
        ["report", "a", "-o", "{f}"],
        ["layers", "--ref", "http://127.0.0.1:9", "--target", "http://127.0.0.1:9", "-o", "{f}"],
    ],
    ids=lambda a: a[0],
)
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(argv, tmp_path: Path, capsys) -> None:
    """The bug: FileExistsError tracebacks, after `record` and the quick look had done their requests."""
    f = tmp_path / "afile"
    f.write_text("hi")
    assert main([a.replace("{f}", str(f)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err
        and f"{f} is a file, not a folder" in err
        and len(err.strip().splitlines()) == 1
    )


def test_api_key_env_names_a_server_of_the_command(monkeypatch, capsys) -> None:
    """The bug: --api-key-env SERVER=VAR naming no server (a typo, or `target` with two targets,
    which are target1 and target2) gave no server a key, silently."""
    from difftest.cli import options as o

    monkeypatch.setenv("MYKEY", "k")
    argv = ["compare", "--ref", "http://127.0.0.1:9", "--target", "http://127.0.0.1:9", "--prompt", "hi"]
    assert main([*argv, "--api-key-env", "refrence=MYKEY"]) == 2
    err = capsys.readouterr().err
    assert "no server is named 'refrence' here (servers: reference, target)" in err
    assert main(["probe", "http://127.0.0.1:9", "--api-key-env", "reference=MYKEY"]) == 2
    assert "(servers: server)" in capsys.readouterr().err
    # `target` is every numbered target's key
    envs = o.key_envs(["target=MYKEY"])
    o.check_key_servers(envs, ["reference", "target1", "target2"])
    assert o.key_env_for(envs, "target2") == "MYKEY" and o.key_env_for(envs, "reference") in (
        None,
        "OPENAI_API_KEY",
    )


def test_servers_text_is_printed_as_text_not_markup_or_escapes(capsys) -> None:
    """The bugs: a model named "llama[/]" made `probe` a rich MarkupError traceback; ESC sequences in
    a server's words reached the terminal raw (they can clear the screen, retitle the window)."""
    from fakes import FakeBehaviour
    from live_fakes import live_fake

    from difftest.cli.options import console

    with live_fake(FakeBehaviour(model="llama[/]")) as url:
        assert main(["probe", url]) in (0, 1)
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "llama[/]" in out.out
    con = console()
    with con.capture() as cap:
        con.print("evil \x1b[2J\x9b31m \u202etxt [bold]x[/bold] :smile:")
    assert cap.get().strip() == "evil \\x1b[2J\\x9b31m \\u202etxt [bold]x[/bold] :smile:"


def test_quick_look_alternatives_keep_every_row() -> None:
    """The bug: two byte pieces of a CJK character both detokenize to " \ufffd" (smollm2's ids
    25792 and 13223, seen from the shim), so keyed by text one overwrote the other and the
    quick look's table lost a row without a word."""
    from difftest.cli.compare import alt_keys

    alts = {"25792": -1.28, "13223": -1.5, "9": -1.9, "11": -2.5, "2028": -3.0, "x": -4.0}
    texts = {"25792": " \ufffd", "13223": " \ufffd", "9": " Paris", "11": " Paris", "2028": None}
    assert alt_keys(alts, texts) == {
        "token_id:25792": -1.28,  # not a whole character: named by id
        "token_id:13223": -1.5,
        " Paris": -1.9,
        "token_id:11": -2.5,  # the same text as a likelier one: named by id
        "2028": -3.0,  # not detokenized: its key as served
        "x": -4.0,
    }


def _option_help(command: str, flag: str) -> str:
    action = next(a for a in _subparsers(build_parser())[command]._actions if flag in a.option_strings)
    return " ".join((action.help or "").split())


@pytest.mark.parametrize(("command", "result"), [("layers", "layers.json"), ("quant", "quant.json")])
def test_whitebox_out_help_says_the_json_is_written_only_with_o(command: str, result: str) -> None:
    """The help said "(default: runs/whitebox)" for the JSON result, which is written only with -o
    (only launched servers' logs default there)."""
    text = _option_help(command, "--out")
    assert f"DIR/{result}, written only when -o is given" in text
    assert "logs go to DIR/logs (default: runs/whitebox)" in text


def test_compare_scheme_help_names_the_debug_config_default() -> None:
    """Without --scheme a target is judged on the scheme its /debug/config reports, not "none"."""
    text = _option_help("compare", "--scheme")
    assert "default: the scheme the target's /debug/config reports, else none" in text
    assert "default: none)" not in text


def test_layers_norm_ratios_read_like_the_rel_err_beside_them(capsys) -> None:
    """A skipped scale printed norm ratio 1611404929.3622 beside rel err 1.61e+09; near 1 the
    four decimals stay (fnuz's x0.5 is 0.5000, rounding 1.0001), a tiny ratio is not 0.0000."""
    from difftest.cli.layers import render_layers
    from difftest.cli.options import console
    from difftest.results import LayerDiff, LayerPoint

    def point(name: str, ratio: float, local: float | None) -> LayerPoint:
        return LayerPoint(name, 0, "linear", 0.08, ratio, 1.6e9, 1.0, 0.0, flagged=True,
                          local_cosine=0.99, local_norm_ratio=local, local_rel_err=1793.87)  # fmt: skip

    pts = [
        point("a.big", 1611404929.3622, 1793.8711),
        point("b.one", 1.0001, 0.5),
        point("c.tiny", 2e-5, None),
    ]
    render_layers(LayerDiff("ref", "accuracy", pts, summary="x"), "t", console())
    rows = {
        line.split("│")[2].strip(): line.split("│")
        for line in capsys.readouterr().out.splitlines()
        if "│" in line
    }
    cells = {name: (row[4].strip(), row[7].strip()) for name, row in rows.items()}
    assert cells == {
        "a.big": ("1.61e+09", "1793.8711"),
        "b.one": ("1.0001", "0.5000"),
        "c.tiny": ("2e-05", "-"),
    }
