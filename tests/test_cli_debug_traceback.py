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
