"""`difftest noise` fixes (t14): it measures over the configured endpoint, an unwritable floor
destination is refused before any server is asked (and `run` reads a bad floor path as one line),
`null = "aa"` beside a floor file is refused like `null = "none"`, and `noise -o DIR` keeps its
server logs in DIR."""

from __future__ import annotations

import errno
import json
import pathlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from live_fakes import free_port, live_fake
from quirk_fakes import live_app, quirk_app
from test_chat import write_prompts as write_chat_prompts
from test_runner import write_config

from difftest.cli import main


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _counted_app() -> tuple[Any, Counter[str]]:
    """A fake serving completions and chat, counting every request by method and path."""
    app, seen = quirk_app(), Counter()

    @app.middleware("http")
    async def count(request: Any, call_next: Any) -> Any:
        seen[f"{request.method} {request.url.path}"] += 1
        return await call_next(request)

    return app, seen


def test_a_chat_config_measures_its_floor_over_chat(tmp_path: Path) -> None:
    """The bug: Session probed every server as completions, so `endpoint = "chat"` sent every
    generation to /v1/completions (a file of `messages` prompts was refused as needing chat) and the
    floor file said "chat" all the same."""
    app, seen = _counted_app()
    with live_app(app) as ref:
        cfg = write_config(tmp_path, ref, [], extra_run='endpoint = "chat"')
        chat = write_chat_prompts(tmp_path / "chat.jsonl")
        cfg.write_text(cfg.read_text().replace(str(tmp_path / "prompts.jsonl"), str(chat)))
        assert main(["noise", str(cfg), "--no-restart", "-o", str(tmp_path / "nf")]) == 0
    floor = json.loads((tmp_path / "nf" / "noise-floor.json").read_text())
    assert floor["settings"]["endpoint"] == "chat" and floor["n_prompts"] == 2 * 5  # 2 comparisons
    assert seen["POST /v1/chat/completions"] >= 3 * 5  # pass A, its repeat, the serial pass
    assert seen["POST /v1/completions"] == 0  # not one generation (nor echo: chat has none)
    assert floor["kl_mean"] is None  # no teacher forcing over chat: KL is not measured


def _dead_config(tmp_path: Path, extra_run: str = "") -> Path:
    """A config whose reference nobody serves: anything that reaches a server fails (exit 3)."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path, dead, [{"name": "t", "url": dead}], extra_run=extra_run)
    # reached at all, it fails in seconds (exit 3), not after the default 600 s health wait
    cfg.write_text(cfg.read_text().replace(f'url = "{dead}"', f'url = "{dead}"\nstartup_timeout_s = 2', 1))
    return cfg


@pytest.mark.parametrize("case", ["floor-is-folder", "parent-is-file", "out-floor-is-folder"])
def test_an_unwritable_floor_destination_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """The bug: a traceback and exit 1, after the whole measurement."""
    folder, blocker = tmp_path / "floordir", tmp_path / "a-file"
    folder.mkdir()
    blocker.write_text("x")
    argv: list[str] = []
    if case == "floor-is-folder":
        cfg, key, dest = _dead_config(tmp_path, f'noise_floor = "{folder}"'), "run.noise_floor", folder
    elif case == "parent-is-file":
        dest = blocker / "floor.json"
        cfg, key = _dead_config(tmp_path, f'noise_floor = "{dest}"'), "run.noise_floor"
    else:
        (folder / "noise-floor.json").mkdir()
        cfg, key, dest = _dead_config(tmp_path), "-o", folder / "noise-floor.json"
        argv = ["-o", str(folder)]
    assert main(["noise", str(cfg), "--no-restart", *argv]) == 2  # not 3: no server was asked
    err = _one_line(capsys.readouterr().err)
    assert f"{key}: cannot write {dest}: " in err
    assert ("is a file, not a folder" if case == "parent-is-file" else "a folder stands in its place") in err


def test_a_floor_write_that_fails_after_measuring_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk that fills while measuring: exit 2 naming the file (OutputError), not a traceback."""
    dest = tmp_path / "nf" / "noise-floor.json"
    real = pathlib.Path.write_text

    def full(self: Path, *args: Any, **kw: Any) -> int:
        if self == dest:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kw)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with live_fake() as ref:
        cfg = write_config(tmp_path, ref, [])
        assert main(["noise", str(cfg), "--no-restart", "--limit", "2", "-o", str(dest.parent)]) == 2
    assert f"cannot write {dest}: No space left on device" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("case", ["folder", "not-utf8"])
def test_run_with_an_unreadable_noise_floor_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """The bug: `noise_floor` naming a folder passed the exists() check and read_text() tracebacked."""
    floor = tmp_path / "floordir"
    if case == "folder":
        floor.mkdir()
    else:
        floor.write_bytes(b"\xff\xfe{}")
    assert main(["run", str(_dead_config(tmp_path, f'noise_floor = "{floor}"'))]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"noise floor file {floor}: cannot read it: " in err
    assert ("a folder, not a file" if case == "folder" else "not UTF-8 text") in err
    assert not (tmp_path / "out").exists()  # refused before any server is asked


def test_null_aa_beside_a_noise_floor_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bug: the floor file silently replaced the in-run A/A that `null = "aa"` asked for."""
    floor = tmp_path / "floor.json"
    floor.write_text('{"schema": "difftest-noise-floor", "version": 1}')
    cfg = _dead_config(tmp_path, f'null = "aa"\nnoise_floor = "{floor}"')
    assert main(["run", str(cfg)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert (
        f'[run] null = "aa" (each golden\'s in-run A/A, which a floor file replaces) contradicts noise_floor = "{floor}"'
        in err
    )
    assert "remove one" in err and not (tmp_path / "out").exists()


def test_noise_out_keeps_its_logs_in_the_named_folder(tmp_path: Path) -> None:
    """The bug: `-o DIR` wrote the floor to DIR but the server logs under run.output_dir, so a bad
    output_dir failed a command that never uses it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with live_fake() as ref:
        cfg = write_config(tmp_path, ref, [])
        cfg.write_text(cfg.read_text().replace(str(tmp_path / "out"), str(blocker / "out")))
        assert main(["noise", str(cfg), "--no-restart", "--limit", "2", "-o", str(tmp_path / "nf")]) == 0
    assert (tmp_path / "nf" / "noise-logs").is_dir() and (tmp_path / "nf" / "noise-floor.json").is_file()
