"""README's "Layout" section names every module and package of difftest/ (so that it stays true:
a newcomer looks there first), and names nothing that no longer exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def _difftest_lines(block: str) -> str:
    """The lines from `difftest/` up to the next top-level folder."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("difftest/"))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\S", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def test_readme_layout_names_every_difftest_module() -> None:
    block = _difftest_lines(_layout_block())
    named = set(re.findall(r"[\w]+(?:\.py|/)", block))
    pkg = ROOT / "difftest"
    present = {p.name for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.name + "/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert present - named == set(), "README layout misses these difftest modules"
    assert {n for n in named if n.endswith(".py")} - present == set(), (
        "README layout names modules that are gone"
    )
