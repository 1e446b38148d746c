"""Prompt files: JSON Lines of `{"id", "prompt" | "messages", "max_tokens"?, "tags"?}`, one a line.

Strict on purpose: a misspelt "max_token" that is silently ignored changes what both servers
generate and shows up later as an unexplained diff, so every problem is a UsageError naming the
file and line ("prompts/x.jsonl:7: missing 'prompt'").
"""

from __future__ import annotations

import difflib
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from difftest.errors import UsageError
from difftest.textsafe import LONE_SURROGATE

KEYS = ("id", "prompt", "max_tokens", "tags", "messages")
ROLES = ("system", "user", "assistant", "developer")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    max_tokens: int | None = None  # None: the run's max_tokens
    tags: tuple[str, ...] = ()
    source: str = ""  # "file:line", for messages and reports
    messages: tuple[dict[str, str], ...] = ()  # a chat conversation (`[run] endpoint = "chat"`)


def load_prompts(
    paths: Path | str | Iterable[Path | str], *, limit: int | None = None, endpoint: str | None = None
) -> list[Prompt]:
    """All prompts of one or more files in order; ids must be unique across the files. With
    `endpoint = "completions"`, a prompt given as `messages` is refused (`needs_chat`)."""
    if isinstance(paths, str | Path):
        paths = [paths]
    prompts: list[Prompt] = []
    seen: dict[str, Prompt] = {}  # by the id's NFC form
    for path in paths:
        for prompt in read_prompt_file(Path(path)):
            _check_unique(prompt, seen)
            prompts.append(prompt)
    prompts = prompts[:limit] if limit is not None else prompts
    if endpoint == "completions":
        check_completions(prompts)
    return prompts


def _check_unique(prompt: Prompt, seen: dict[str, Prompt]) -> None:
    """A UsageError for an id seen before, also one that differs only in Unicode normalisation
    ("e\u0301" and "\u00e9"): such two print alike in every report row, and an editor that
    re-saves the file normalised turns one into the other, so `diff` between runs matched the wrong
    prompt or none."""
    key = unicodedata.normalize("NFC", prompt.id)
    first = seen.get(key)
    if first is None:
        seen[key] = prompt
    elif first.id == prompt.id:
        raise UsageError(f"{prompt.source}: duplicate id {prompt.id!r} (first at {first.source})")
    else:
        raise UsageError(
            # ascii(): both spellings print alike, the escapes show how they differ
            f"{prompt.source}: id {ascii(prompt.id)} differs from {ascii(first.id)} (at {first.source}) "
            "only in Unicode normalisation (NFC/NFD): give them ids that differ in their letters"
        )


def needs_chat(prompt: Prompt) -> str:
    """The one-line refusal of a conversation over /v1/completions."""
    where = prompt.source or "prompts"
    return f'{where}: prompt {prompt.id!r} has messages: they need endpoint = "chat" (--endpoint chat)'


def check_completions(prompts: Iterable[Prompt]) -> None:
    """A UsageError for the first conversation among `prompts`: over /v1/completions it would be
    sent as its report text ("role: content" lines), a prompt no chat server would see (no chat
    template), compared as if it were the conversation."""
    bad = next((p for p in prompts if p.messages), None)
    if bad is not None:
        raise UsageError(needs_chat(bad))


def read_prompt_file(path: Path) -> list[Prompt]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read prompts: {exc.strerror or exc}") from None
    # JSON Lines ends a line at "\n" only: str.splitlines() also splits at U+2028, U+2029, U+0085 and
    # other characters a JSON string may hold raw, which made valid prompts "invalid JSON"
    lines = text.replace("\r\n", "\n").split("\n")
    prompts = [_parse_line(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise UsageError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def _no_duplicates(pairs: list[tuple[str, object]], where: str) -> dict[str, object]:
    """json.loads keeps the last of two equal keys: `"max_tokens": 5, "max_tokens": null` silently
    dropped the prompt's limit, which changes what both servers generate."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise UsageError(f"{where}: key {key!r} appears twice (JSON keeps only the last)")
        out[key] = value
    return out


def _parse_line(line: str, where: str) -> Prompt:
    try:
        obj = json.loads(line, object_pairs_hook=lambda pairs: _no_duplicates(pairs, where))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(KEYS)})"
            raise UsageError(f"{where}: unknown key {key!r}{hint}")
    messages = _messages(obj.get("messages"), where)
    if "prompt" in obj and messages:  # which one is asked would depend on the endpoint: say which
        raise UsageError(f"{where}: give 'prompt' or 'messages', not both")
    if "prompt" not in obj and messages:  # a chat prompt: its text is the conversation, for reports
        obj = obj | {"prompt": "\n".join(f"{m['role']}: {m['content']}" for m in messages)}
    for key in ("id", "prompt"):
        if key not in obj:
            raise UsageError(f"{where}: missing {key!r}")
    pid = obj["id"]
    if isinstance(pid, bool) or not isinstance(pid, str | int) or str(pid).strip() == "":
        raise UsageError(f"{where}: 'id' must be a non-empty string, got {pid!r}")
    text = obj["prompt"]
    if not isinstance(text, str) or not text.strip():  # as --prompt: whitespace alone is no prompt
        raise UsageError(f"{where}: 'prompt' must be a non-empty string, got {text!r}")
    # an escape such as "\ud83d" alone decodes to half a UTF-16 pair, which no UTF-8 request carries
    if "\\u" in line and LONE_SURROGATE.search(json.dumps(obj, ensure_ascii=False)):
        raise UsageError(f"{where}: a string holds half a UTF-16 surrogate pair (e.g. \\ud83d alone)")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise UsageError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise UsageError(f"{where}: 'tags' must be a list of strings, got {tags!r}")
    return Prompt(
        id=str(pid), prompt=text, max_tokens=max_tokens, tags=tuple(tags), source=where, messages=messages
    )


def _messages(value: object, where: str) -> tuple[dict[str, str], ...]:
    """`messages`: a non-empty list of {"role", "content"} (strings), as the chat API takes them."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise UsageError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise UsageError(
                f"{where}: messages[{i}]: role must be one of {', '.join(ROLES)} and content a string"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)
