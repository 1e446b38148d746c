"""Servers' text shown to a person: control characters escaped, never sent to a terminal raw.

A server controls the text, tokens, model names and error messages difftest prints and logs. C0
and C1 controls (ESC starts sequences that clear the screen or retitle the window; U+009B is the
one-byte CSI) and the bidirectional overrides (which reorder what a reader sees) are shown as
`\\x1b` / `\\u202e`. Tab and newline are left to the callers that have a use for them.
`LONE_SURROGATE` finds the other text no output can carry: half a UTF-16 pair, which no UTF-8
encoder writes (the client replaces it in servers' answers, the prompt reader refuses it).
"""

from __future__ import annotations

import re

# half a UTF-16 pair ("\ud83d" decoded alone): no UTF-8 text can carry it (json.loads joins valid pairs)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(m: re.Match[str]) -> str:
    """The escaped form of one unsafe character (a `re.sub` replacement)."""
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe(text: str) -> str:
    """`text` with every unsafe character escaped."""
    return _UNSAFE.sub(_shown, text)


def truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
