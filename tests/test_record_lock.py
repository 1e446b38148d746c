"""Two `difftest record -o DIR` at once (T19 #2): both passed the "already holds a baseline" check,
both exited 0, and the file held only the one that finished last, though a baseline is replaced
only with --overwrite. Now a recording holds DIR's lock (as `run` does) from before it asks the
reference until the file is written, writes through a temporary file of its own, and keeps a
baseline that appeared meanwhile. Port 9 listens to nothing: reaching it would be exit 3."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from difftest.baseline import Baseline, Exchanges
from difftest.cli import main
from difftest.errors import OutputError, UsageError
from difftest.runner import folder_lock

UNREACHABLE = "http://127.0.0.1:9"


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "p0", "prompt": "1+2+3="}) + "\n")
    return path


def _record_argv(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["record", "--ref", UNREACHABLE, "--prompts", str(_prompts(tmp_path)), "-o", str(out), *extra]


def _baseline(url: str) -> Baseline:
    return Baseline(
        reference={"name": "reference", "url": url}, settings={}, prompts=[], exchanges=Exchanges()
    )


def _recorded_url(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)["reference"]["url"]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("difftest: error: "), err
    return err


def test_a_record_into_a_folder_in_use_is_refused_before_asking(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    out.mkdir()
    with folder_lock(out):  # another record (or run) writing into DIR
        code = main(_record_argv(tmp_path, out))
    assert code == 2 and "is in use by another difftest run" in _one_line_error(capsys)
    assert not (out / "baseline.json.gz").exists()


def test_the_folder_is_locked_for_the_whole_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "b"
    seen: list[str] = []

    def recording(*args: Any, **kw: Any) -> Baseline:
        with pytest.raises(UsageError, match="in use by another difftest run"), folder_lock(out):
            pass
        seen.append("refused")
        return _baseline("http://mine")

    monkeypatch.setattr("difftest.recording.record", recording)
    assert main(_record_argv(tmp_path, out)) == 0
    assert seen == ["refused"] and _recorded_url(out / "baseline.json.gz") == "http://mine"
    with folder_lock(out):  # and released once the recording is written
        pass


def test_a_baseline_that_appeared_while_recording_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The old bug's other half: a writer that took no lock (an older difftest, a copy by hand)
    finished first; the recording that checked before it must not replace it silently."""
    out = tmp_path / "b"

    def recording(*args: Any, **kw: Any) -> Baseline:
        _baseline("http://theirs").write(out / "baseline.json.gz")
        return _baseline("http://mine")

    monkeypatch.setattr("difftest.recording.record", recording)
    code = main(_record_argv(tmp_path, out))
    assert code == 2 and "a baseline appeared there while recording" in _one_line_error(capsys)
    assert _recorded_url(out / "baseline.json.gz") == "http://theirs"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "baseline.json.gz"]  # no stray temp file


def test_overwrite_still_replaces_the_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "b"
    _baseline("http://old").write(out / "baseline.json.gz")
    monkeypatch.setattr("difftest.recording.record", lambda *a, **kw: _baseline("http://new"))
    assert main(_record_argv(tmp_path, out, "--overwrite")) == 0
    assert _recorded_url(out / "baseline.json.gz") == "http://new"


def test_write_keeps_a_file_already_there_unless_told_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json.gz"
    _baseline("http://first").write(path)
    with pytest.raises(OutputError, match="a baseline appeared there"):
        _baseline("http://second").write(path)
    assert _recorded_url(path) == "http://first"
    _baseline("http://third").write(path, overwrite=True)
    assert _recorded_url(path) == "http://third"
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json.gz"]


def test_write_never_uses_another_writers_temporary_file(tmp_path: Path) -> None:
    """Both writers wrote through `.baseline.json.gz.tmp`: two overlapping writes interleaved in
    one file, and the first to finish moved the other's half-written file into place."""
    path = tmp_path / "baseline.json.gz"
    theirs = tmp_path / ".baseline.json.gz.tmp"  # the fixed name an older difftest writes through
    theirs.write_bytes(b"half written")
    _baseline("http://mine").write(path)
    assert theirs.read_bytes() == b"half written"
    assert _recorded_url(path) == "http://mine"
