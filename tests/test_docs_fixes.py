"""README and docs agree with the code: every CLI flag, config key and placeholder the code accepts
is documented, and every docs/design.md section a file cites exists.

Each list is read from the code (argparse, `_RUN_KEYS`, `SPEC_KEYS`, `THRESHOLD_KEYS`,
`PLACEHOLDERS`), so a flag or key added without a README line fails here, not in a user's hands.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from difftest.cli import COMMANDS, build_parser
from difftest.config import _RUN_KEYS, TARGET_KEYS
from difftest.verdict import THRESHOLD_KEYS
from server_shim.launch import PLACEHOLDERS
from server_shim.launch_spec import SPEC_KEYS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


CLI = _section(README, "## The CLI", "\n## The config")
CONFIG = _section(README, "## The config", "\n## What is compared")


def _mentions(text: str, word: str) -> bool:
    """`word` as a whole token (`--seed` is not `--seeds`, `seed` not `seed_x`)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_every_command_is_in_the_readme_cli_section(command: str) -> None:
    parser = _subparsers()[command]
    missing = [
        "/".join(a.option_strings)
        for a in parser._actions
        if a.option_strings
        and "-h" not in a.option_strings
        and not any(_mentions(CLI, flag) for flag in a.option_strings)
    ]
    assert not missing, f"difftest {command}: flags not in README's CLI section: {missing}"


def test_every_config_key_is_in_the_readme_config_section() -> None:
    keys = {*_RUN_KEYS, *SPEC_KEYS, *TARGET_KEYS, "baseline"}
    keys |= {k for k in THRESHOLD_KEYS if "." not in k}
    missing = sorted(k for k in keys if not _mentions(CONFIG, k))
    assert not missing, f"config keys not in README's config section: {missing}"


def test_every_per_part_threshold_check_and_placeholder_is_in_the_readme() -> None:
    checks = {k.split(".", 1)[1] for k in THRESHOLD_KEYS if "." in k}
    parts = {k.split(".", 1)[0] for k in THRESHOLD_KEYS if "." in k}
    assert all(f"{p}.<check>" in CONFIG for p in parts), parts
    assert not sorted(c for c in checks if not _mentions(CONFIG, c))
    assert not [p for p in PLACEHOLDERS if p not in CONFIG]


def test_the_readme_config_example_is_toml_with_its_comments_uncommented() -> None:
    block = CONFIG[CONFIG.index("```toml") + 7 :]
    block = block[: block.index("```")]
    tomllib.loads(block)
    # each commented-out key line is an example to enable: it must parse too
    doc = tomllib.loads(re.sub(r"(?m)^# ([a-z_.]+ = )", r"\1", block))
    assert doc["thresholds"]["tie_margin"] >= 0 and "quant_skip" in doc["target"][1]


# ----------------------------------------------------------------------------- design.md citations

_HEADINGS = {re.sub(r"^#+\s*", "", line).strip() for line in DESIGN.splitlines() if line.startswith("#")}
_WRAP = r"\n[ \t]*(?:#|//)?[ \t]*"  # a citation wrapped onto the next line of a comment or docstring
_QUOTED = re.compile(rf'design\.md,?[ \t]*(?:{_WRAP})?["“]((?:[^"”\n]|{_WRAP})+?)["”]')
_ANCHOR = re.compile(r"design\.md#([\w-]+)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _citations() -> list[tuple[str, str]]:
    files = [ROOT / "README.md", ROOT / "Makefile"]
    for folder in ("difftest", "server_shim", "tests", "docs", "configs", "bench"):
        files += [p for ext in ("*.py", "*.md", "*.toml") for p in (ROOT / folder).rglob(ext)]
    out = []
    for f in files:
        if not f.is_file() or f == Path(__file__).resolve():  # this file's examples cite on purpose
            continue
        text = f.read_text(errors="replace")
        out += [
            (str(f.relative_to(ROOT)), " ".join(re.sub(_WRAP, " ", m).split())) for m in _QUOTED.findall(text)
        ]
        out += [(str(f.relative_to(ROOT)), "#" + m) for m in _ANCHOR.findall(text)]
    return out


def test_every_cited_design_section_exists() -> None:
    """engine.py cited docs/design.md, "Engine", a section that never existed."""
    cites = _citations()
    slugs = {_slug(h) for h in _HEADINGS}
    bad = [(f, c) for f, c in cites if (c[1:] not in slugs if c.startswith("#") else c not in _HEADINGS)]
    assert not bad, f"citations of docs/design.md sections that do not exist: {bad}"
    assert len(cites) > 20  # the pattern still finds the repo's citations


def test_the_citation_pattern_reads_wrapped_and_anchored_forms() -> None:
    text = 'see docs/design.md "Verdicts and\n    null models" and docs/design.md#cache-identity; (docs/design.md, "Engine")'
    assert [" ".join(re.sub(_WRAP, " ", m).split()) for m in _QUOTED.findall(text)] == [
        "Verdicts and null models",
        "Engine",
    ]
    assert _ANCHOR.findall(text) == ["cache-identity"]
    assert "Engine" not in _HEADINGS and "The server" in _HEADINGS
