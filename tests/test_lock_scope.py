"""A run holds its folder's lock until its report is written and `previous/` dropped: released
before, a second run could take the folder in between, delete this run's cache and, interrupted,
leave this run's report at the top for CI to read as its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from live_fakes import live_fake

from difftest.cli import main
from difftest.errors import UsageError
from difftest.runner import folder_lock


def test_the_lock_is_held_while_the_report_is_written(tmp_path: Path, monkeypatch) -> None:
    import difftest.report as report

    seen: list[str] = []
    write = report.write_report

    def second_run_meanwhile(run, out):
        with pytest.raises(UsageError, match="in use by another difftest run"), folder_lock(Path(out)):
            seen.append("a second run got the folder")
        seen.append("refused")
        return write(run, out)

    monkeypatch.setattr(report, "write_report", second_run_meanwhile)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "the quick brown"}) + "\n")
    with live_fake() as ref, live_fake() as tgt:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[run]\nprompts = ["{prompts}"]\nmax_tokens = 4\nwhitebox = "off"\nbatch_slot_check = false\n'
            f'[reference]\nurl = "{ref}"\n[[target]]\nname = "t"\nurl = "{tgt}"\nscheme = "none"\n'
        )
        main(["run", str(cfg), "-o", str(tmp_path / "out")])
    assert seen == ["refused"]
    assert (tmp_path / "out" / "report.json").exists()
