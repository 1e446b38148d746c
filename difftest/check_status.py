"""The status words of the conformance tables, and the text helpers their messages share.

Its own module so that conformance.py (what one server can do) and pair.py (whether two servers
can be compared) share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"


def first_diff(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Index of the first differing element; the shorter length when one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
