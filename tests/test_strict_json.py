"""Result files and --json documents are strict JSON: a NaN or inf metric (a point not compared, a
diverged replay) is stored as the string report.json uses, never as a bare NaN that jq or a
browser's JSON.parse rejects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from difftest.report.jsonio import strict_json


def _strict_load(text: str):
    def refuse(name: str):
        raise ValueError(f"bare {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_report_json_strings():
    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (1, 2), "p": Path("x/y")}
    assert _strict_load(strict_json(data)) == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": [1, 2], "p": "x/y"}


def test_objects_go_through_to_dict_and_nested_values_are_cleaned():
    class Row:
        def to_dict(self):
            return {"kl": math.nan}

    assert _strict_load(strict_json({"rows": [Row()]})) == {"rows": [{"kl": "nan"}]}


def test_unknown_objects_need_a_fallback():
    with pytest.raises(TypeError):
        strict_json({"x": object()})
    assert _strict_load(strict_json({"x": {1, 2}}))["x"] in ([1, 2], [2, 1])
    assert _strict_load(strict_json({"x": complex(1, 2)}, fallback=str)) == {"x": "(1+2j)"}


def test_ascii_only_escapes_for_stdout():
    assert strict_json({"t": "天"}, ascii_only=True).strip() == '{\n "t": "\\u5929"\n}'
    assert "天" in strict_json({"t": "天"})


def test_emit_json_writes_strict_json(capsys):
    from difftest.cli.options import emit_json

    emit_json({"kl": math.nan, "where": Path("runs/a")})
    assert _strict_load(capsys.readouterr().out) == {"kl": "nan", "where": "runs/a"}
