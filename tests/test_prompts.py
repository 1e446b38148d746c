"""difftest.prompts: the shipped files load; every problem names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftest.errors import UsageError
from difftest.prompts import Prompt, load_prompts, read_prompt_file

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_prompts_are_issue5_part11() -> None:
    prompts = load_prompts(ROOT / "prompts" / "smoke.jsonl")
    assert len(prompts) == 10
    assert prompts[0].prompt == "1+2+3="
    tags = {t for p in prompts for t in p.tags}
    assert {"arithmetic", "code", "facts", "zh", "fr", "list", "json", "story", "reasoning"} <= tags
    assert any("prime" in p.prompt for p in prompts)
    assert prompts[0].source == f"{ROOT / 'prompts' / 'smoke.jsonl'}:1"


def test_diverse_prompts_are_many_and_varied() -> None:
    prompts = load_prompts(ROOT / "prompts" / "diverse.jsonl")
    assert 50 <= len(prompts) <= 80
    lengths = sorted(len(p.prompt) for p in prompts)
    assert lengths[0] < 10 and lengths[-1] > 300  # short and long prompts
    assert len({t for p in prompts for t in p.tags}) >= 15
    assert any(p.max_tokens for p in prompts)


def test_fields_defaults_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        {"id": "x", "prompt": "hello", "max_tokens": 7, "tags": ["t1", "t2"]},
        {"id": 12, "prompt": "world"},
    ]
    path.write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")  # a trailing blank line is fine
    prompts = load_prompts(path)
    assert prompts == [
        Prompt("x", "hello", 7, ("t1", "t2"), f"{path}:1"),
        Prompt("12", "world", None, (), f"{path}:2"),
    ]
    assert load_prompts([path], limit=1) == prompts[:1]


def test_several_files_keep_order_and_ids_are_unique_across_them(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"id": "1", "prompt": "p"}\n')
    b.write_text('{"id": "2", "prompt": "q"}\n{"id": "1", "prompt": "r"}\n')
    c = tmp_path / "c.jsonl"
    c.write_text('{"id": "0", "prompt": "s"}\n')
    assert [p.id for p in load_prompts([c, str(a)])] == ["0", "1"]
    with pytest.raises(UsageError, match=r"b\.jsonl:2: duplicate id '1' \(first at .*a\.jsonl:1\)"):
        load_prompts([a, b])


BAD = [
    ('{"id": "a"}', "1: missing 'prompt'"),
    ('{"prompt": "x"}', "1: missing 'id'"),
    ('{"id": "a", "prompt": ""}', "1: 'prompt' must be a non-empty string"),
    ('{"id": "a", "prompt": 5}', "1: 'prompt' must be a non-empty string, got 5"),
    ('{"id": true, "prompt": "x"}', "1: 'id' must be a non-empty string"),
    ('{"id": "a", "prompt": "x", "max_tokens": 0}', "1: 'max_tokens' must be a positive integer, got 0"),
    ('{"id": "a", "prompt": "x", "max_tokens": "8"}', "1: 'max_tokens' must be a positive integer"),
    ('{"id": "a", "prompt": "x", "tags": "t"}', "1: 'tags' must be a list of strings"),
    ('{"id": "a", "prompt": "x", "max_token": 3}', "1: unknown key 'max_token'; did you mean 'max_tokens'?"),
    (
        '{"id": "a", "prompt": "x", "answer": 3}',
        "1: unknown key 'answer' (allowed: id, prompt, max_tokens, tags, messages)",
    ),
    ('["a", "b"]', "1: expected a JSON object, got list"),
    ('{"id": "a", "prompt": "   "}', "1: 'prompt' must be a non-empty string"),  # as --prompt "   "
    # which one was asked depended on the endpoint, and the report showed the other
    (
        '{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
        "1: give 'prompt' or 'messages', not both",
    ),
    ('{"id": "a", "tags": ' + "[" * 100_000 + "]" * 100_000 + "}", "1: JSON nested too deeply"),
    ('{"id": "a", "prompt": "x",}', "1: invalid JSON: "),
    # json.loads keeps the last: the prompt's own limit was silently dropped
    ('{"id": "a", "prompt": "x", "max_tokens": 5, "max_tokens": null}', "1: key 'max_tokens' appears twice"),
    (
        '{"id": "a", "messages": [{"role": "user", "content": "y", "content": "z"}]}',
        "1: key 'content' appears twice",
    ),
    ('{"id": " ", "prompt": "x"}', "1: 'id' must be a non-empty string"),  # as the prompt: blank is none
]


@pytest.mark.parametrize(("line", "expected"), BAD, ids=[b[1][:30] for b in BAD])
def test_each_error_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UsageError) as info:
        read_prompt_file(path)
    assert str(info.value).startswith(f"{path}:{expected}")


def test_error_line_counts_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n\n\n{"id": "b"}\n')
    with pytest.raises(UsageError, match=r"x\.jsonl:4: missing 'prompt'$"):
        load_prompts(path)


def test_empty_missing_and_binary_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UsageError, match=r"empty\.jsonl: no prompts"):
        load_prompts(empty)
    with pytest.raises(UsageError, match=r"absent\.jsonl: cannot read prompts"):
        load_prompts(tmp_path / "absent.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match=r"bin\.jsonl: not UTF-8"):
        load_prompts(binary)


def test_utf8_bom_and_non_ascii(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"id": "zh", "prompt": "你好，世界"}\n'.encode())
    assert load_prompts(path)[0].prompt == "你好，世界"


def test_line_separators_inside_a_prompt_are_text(tmp_path: Path) -> None:
    """JSON Lines ends lines at \\n only: U+2028 / U+2029 / U+0085 raw in a string split the line
    (str.splitlines) and a valid prompt was 'invalid JSON'."""
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "x\u2028y\u0085z"}, ensure_ascii=False) + "\r\n"
                 + json.dumps({"id": "b", "prompt": "w"}) + "\n", encoding="utf-8")  # fmt: skip
    assert [p.prompt for p in read_prompt_file(f)] == ["x\u2028y\u0085z", "w"]


def test_half_a_surrogate_pair_is_refused(tmp_path: Path) -> None:
    """No UTF-8 request can carry "\\ud83d" alone; it crashed the writers later."""
    f = tmp_path / "s.jsonl"
    f.write_text('{"id": "a", "prompt": "x\\ud83d"}\n{"id": "b", "prompt": "\\ud83d\\ude00 ok"}\n')
    with pytest.raises(UsageError, match="s.jsonl:1: a string holds half a UTF-16 surrogate pair"):
        read_prompt_file(f)
    f.write_text('{"id": "b", "prompt": "\\ud83d\\ude00 ok"}\n')  # a whole pair is a character
    assert read_prompt_file(f)[0].prompt == "\U0001f600 ok"
