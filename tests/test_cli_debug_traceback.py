"""`--debug-traceback` shows the traceback without changing the exit code."""

from __future__ import annotations

from difftest.cli import main


def test_debug_traceback_keeps_the_exit_code(tmp_path, capsys):
    """The bug: with the flag, a usage error (2) or an unreachable server (3) was re-raised and
    exited 1, the code of a regressed target."""
    assert main(["run", str(tmp_path / "missing.toml"), "--debug-traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "difftest: error:" in err
    assert main(["probe", "http://127.0.0.1:9", "--timeout", "2", "--debug-traceback"]) == 3
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_the_error_line_keeps_the_spaces_it_quotes(tmp_path, capsys) -> None:  # noqa: ANN001
    """(t21 D7) every run of whitespace was collapsed: a prompt of three spaces was quoted as ' '."""
    from difftest.cli import main, one_line

    prompts = tmp_path / "ws.jsonl"
    prompts.write_text('{"id": "a", "prompt": "   "}\n')
    argv = [
        "compare",
        "--ref",
        "http://127.0.0.1:9",
        "--target",
        "http://127.0.0.1:9",
        "--prompts",
        str(prompts),
    ]
    assert main(argv) == 2
    assert "got '   '" in capsys.readouterr().err
    assert one_line("a  b\n\n  c\td \n") == "a  b c\td"
