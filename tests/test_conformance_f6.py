"""Conformance fixes (F6): an echo cut at the prompt's end by trusted offsets only, prompt ids
that differ only in Unicode normalisation refused, and the recorded "first of several models"
read from a field instead of a warning's words."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBehaviour, FakeServer

from difftest import conformance
from difftest.baseline import Baseline, Exchanges
from difftest.cli import main
from difftest.conformance import (
    WARNINGS,
    Capabilities,
    _Probe,
    _probe_models,
    _prompt_part,
    probe,
    with_model,
)
from difftest.errors import UsageError
from difftest.prompts import load_prompts
from difftest.tokens_view import TokensView, parse_logprobs

# ----------------------------------------------------------------------------- 1: cutting an echo

PROMPT = "ab cd ef gh"  # 4 tokens: "ab" " cd" " ef" " gh"; the continuation " ij kl" is 2 more
TOKENS = ["ab", " cd", " ef", " gh", " ij", " kl"]
ECHO = PROMPT + " ij kl"


def _echo(tokens: list[str], offsets: list[int], text: str = ECHO) -> TokensView:
    """An echo's block: the first position has nothing to condition on (null logprob)."""
    lps = [None] + [-0.5] * (len(tokens) - 1)
    return parse_logprobs({"tokens": tokens, "token_logprobs": lps, "text_offset": offsets}, text=text)


def _running(tokens: list[str], start: int = 0) -> list[int]:
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


def test_offsets_counted_from_the_prompts_start_on_top_of_the_echo_cut_at_its_end() -> None:
    """Legacy convention applied to an echo: offsets 11, 13, 16, 19, 22, 25. Every one was past the
    prompt's 11 characters, so the prompt's part was no token at all (an empty tokenization)."""
    view = _echo(TOKENS, _running(TOKENS, start=len(PROMPT)))
    part = _prompt_part(view, PROMPT)
    assert part is not None and part.tokens == ("ab", " cd", " ef", " gh")


IDS = [f"token_id:{i}" for i in (11, 12, 13, 14, 15, 16)]


def test_offsets_that_count_token_id_labels_cut_by_the_servers_token_count() -> None:
    """vLLM with ids: 0, 11, 22, ... (len "token_id:11" = 11). Only offset 0 is under the prompt's
    11 characters: the prompt was one token, not four. The count (usage.prompt_tokens) cuts it."""
    view = _echo(IDS, _running(IDS))
    part = _prompt_part(view, PROMPT, count=4)
    assert part is not None and part.token_ids == (11, 12, 13, 14)
    assert _prompt_part(view, PROMPT) is None  # no count: the cut cannot be made, and is not


def test_a_bos_counted_by_its_string_length_is_no_cut_either() -> None:
    """vLLM's plain offsets count "<s>" as 3 characters: 0, 3, 5, 8, ... Offsets under 11 took
    "<s>" "ab" " cd" " ef" (one short); the strings do not spell the prompt either ("<s>ab cd"
    is as long as "ab cd ef"), so the count cuts: BOS and the 4 prompt tokens."""
    toks = ["<s>", *TOKENS]
    part = _prompt_part(_echo(toks, _running(toks)), PROMPT, count=5)
    assert part is not None and part.tokens == ("<s>", "ab", " cd", " ef", " gh")


def test_trusted_offsets_still_cut_where_the_strings_do_not_spell_the_text() -> None:
    """Byte pieces: "<0xC3>" "<0xA9>" name "é" (offsets 2, 2: the second completes it)."""
    toks = ["ab", "<0xC3>", "<0xA9>", " x"]
    part = _prompt_part(_echo(toks, [0, 2, 2, 3], text="abé x"), "abé")
    assert part is not None and part.tokens == ("ab", "<0xC3>", "<0xA9>")


def test_an_echo_without_prompt_positions_is_not_cut() -> None:
    """Its first position has a logprob: generated tokens only, no prompt part to find."""
    view = parse_logprobs(
        {"tokens": [" ij", " kl"], "token_logprobs": [-0.1, -0.2], "text_offset": [11, 14]}, text=ECHO
    )
    assert _prompt_part(view, PROMPT, count=4) is None


class _Unlimited(FakeServer):
    """max_tokens=0 read as "no limit" (the echo continues), offsets counted `how`: "legacy" (the
    prompt's length added, echo or not) or "label" (each token as sent, "token_id:N" included)."""

    def __init__(self, behaviour: FakeBehaviour, how: str) -> None:
        super().__init__(behaviour)
        self.how = how

    def completions(self, req: dict) -> dict:
        if req.get("max_tokens") == 0:
            req = req | {"max_tokens": 12}
        out = super().completions(req)
        block, prompt = out["choices"][0]["logprobs"], req.get("prompt")
        if block and isinstance(prompt, str):
            if self.how == "legacy":
                block["text_offset"] = [o + len(prompt) for o in block["text_offset"]]
            else:
                block["text_offset"] = _running(block["tokens"])
        return out


async def _tokenizations(server: FakeServer) -> Capabilities:
    async with server.client(name="srv") as c:
        return await probe(c)


@pytest.mark.parametrize(
    ("how", "token_ids"), [("legacy", False), ("label", True)], ids=["legacy-strings", "label-ids"]
)
async def test_a_continuing_echo_gives_each_probe_texts_own_tokenization(how: str, token_ids: bool) -> None:
    """The warning promises "probe tokenizations cut at the prompt's end"; none was made (the
    echo was never asked), and cut at these offsets it would have been empty or short."""
    server = _Unlimited(FakeBehaviour(tokenize=False, token_ids=token_ids), how)
    caps = await _tokenizations(server)
    assert any("max_tokens=0 is treated as no limit" in w for w in caps.warnings)
    tok = server.tokenizer
    for t in caps.tokenizations:
        ids = tok.encode(t.text)
        if token_ids:
            assert (t.ids, t.source) == (tuple(ids), "echo"), t.text
        else:
            assert t.strings == tuple(tok.strings[i] for i in ids), t.text


# ----------------------------------------------------------------------------- 2: NFC / NFD ids

NFC, NFD = "caf\u00e9", "cafe\u0301"


def _lines(*ids: str) -> str:
    return "".join(json.dumps({"id": i, "prompt": f"p{n}"}) + "\n" for n, i in enumerate(ids))


def test_ids_that_differ_only_in_normalisation_are_refused_naming_both_lines(tmp_path: Path) -> None:
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
    path = tmp_path / "p.jsonl"
    path.write_text(_lines("a", NFC, NFD))
    with pytest.raises(UsageError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert "\n" not in msg and f"{path}:3: id 'cafe\\u0301' differs from 'caf\\xe9'" in msg
    assert f"(at {path}:2)" in msg and "Unicode normalisation" in msg


def test_across_files_too_and_plain_duplicates_keep_their_words(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(_lines(NFD))
    b.write_text(_lines(NFC))
    with pytest.raises(
        UsageError, match=r"b\.jsonl:1: id 'caf\\xe9' differs from 'cafe\\u0301' \(at .*a\.jsonl:1\)"
    ):
        load_prompts([a, b])
    b.write_text(_lines(NFD))
    with pytest.raises(UsageError, match=r"b\.jsonl:1: duplicate id 'cafe\u0301' \(first at .*a\.jsonl:1\)"):
        load_prompts([a, b])


def test_a_run_with_such_ids_exits_2_before_any_server(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(_lines(NFC, NFD))
    url = "http://127.0.0.1:9"  # nothing listens: refused before a request
    argv = ["compare", "--ref", url, "--target", url + "/v1", "--prompts", str(path)]
    assert main([*argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "only in Unicode normalisation" in err and "Traceback" not in err


def test_a_baseline_holding_such_ids_is_refused(tmp_path: Path) -> None:
    base = Baseline(
        reference={"name": "ref", "url": "u", "model": "m"},
        settings={},
        prompts=[{"id": NFC, "prompt": "x"}, {"id": NFD, "prompt": "y"}],
        exchanges=Exchanges(),
    )
    path = base.write(tmp_path / "b.json.gz")
    with pytest.raises(UsageError, match=r"prompts\[1\]: id 'cafe\\u0301' differs from prompts\[0\]'s"):
        Baseline.read(path)


# ----------------------------------------------------------------------------- 3: the first of several


class _Listing:
    """Just enough client for `_probe_models`."""

    name, base_url = "srv", "http://srv"

    def __init__(self, models: list[str]) -> None:
        self._models = models

    async def models(self) -> list[str]:
        return self._models


@pytest.mark.parametrize(
    ("models", "wanted", "first"),
    [(["a", "b"], None, True), (["a", "b"], "b", False), (["a"], None, False), ([], None, False)],
)
async def test_the_probe_records_that_it_took_the_first_of_several(
    models: list[str], wanted: str | None, first: bool
) -> None:
    p = _Probe(_Listing(models))  # type: ignore[arg-type]
    await _probe_models(p, wanted)
    assert p.fields["model_first_of_several"] is first


def test_a_configured_model_clears_the_field() -> None:
    caps = Capabilities(name="s", url="u", model="a", models=("a", "b"), model_first_of_several=True)
    assert with_model(caps, "b").model_first_of_several is False
    assert "model_first_of_several" in caps.to_dict()


def _base(capabilities: dict[str, Any]) -> Baseline:
    return Baseline(
        reference={"model": "a"}, settings={}, prompts=[], exchanges=Exchanges(), capabilities=capabilities
    )


def test_replay_model_reads_the_field_not_the_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording made before the warning was reworded: matched against the new words, the
    replay asked "a" by name. The field says how it was asked, whatever the words."""
    recorded = WARNINGS["several_models"].format(n=2, ids="a, b", first="a")
    base = _base({"warnings": [recorded], "model_first_of_several": True})
    monkeypatch.setitem(
        WARNINGS, "several_models", "several models served ({ids}); asking the first, {first!r} ({n})"
    )
    assert conformance.WARNINGS["several_models"].startswith("several models served")
    assert base.replay_model() is None
    assert _base({"warnings": [], "model_first_of_several": False}).replay_model() == "a"


def test_an_old_recording_is_still_read_by_the_warnings_words() -> None:
    """Recorded before the field: the wording of this difftest is all there is to go by."""
    several = WARNINGS["several_models"].format(n=2, ids="a, b", first="a")
    assert _base({"warnings": [several]}).replay_model() is None
    assert _base({"warnings": []}).replay_model() == "a"
    # the field, where present, wins over any words
    assert _base({"warnings": [several], "model_first_of_several": False}).replay_model() == "a"
