"""Secondary-check fixes: an infinite mean KL fails (it crashed the judge), chosen-token logprobs
that contradict their own top list or are not its top-1 at temperature 0 are broken answers, a
golden that is the reference is named, and a noise floor records how it was measured."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeBehaviour, FakeServer
from live_fakes import live_fake
from test_runner import write_config
from test_whitebox_w2_fixes import BODY, endpoint

from difftest.cli import main
from difftest.conformance import probe
from difftest.metrics.aggregate import aggregate_prompts
from difftest.metrics.logprobs import PositionLogprobs, teacher_forced_stats
from difftest.noise import NoiseFloor, measurement_settings, settings_mismatch
from difftest.prompts import Prompt
from difftest.report import load_run
from difftest.results import Check, Comparison, LayerDiff, LayerPoint, PromptDiff
from difftest.tokens_view import Position, TokensView, greedy_not_top1, impossible_logprobs
from difftest.verdict import _prompts_to_decide, budget_for, judge_target
from difftest.whitebox.activations import fetch_activations
from difftest.whitebox.layers import layer_verdict
from difftest.whitebox.localise import localisation_sentence
from difftest.whitebox.replay import replay_failures
from server_shim.models import LoadedModel, load_model

# ------------------------------------------------------------------ 1. an infinite mean KL


def _prompt(i: int, kl: float) -> PromptDiff:
    p = PromptDiff(prompt_id=f"p{i}", prompt="x")
    p.ref_text = p.tgt_text = "a b c"
    p.ref_tokens = p.tgt_tokens = ["a", "b", "c"]
    p.match_rate, p.exact, p.garbled = 1.0, True, False
    p.kl_mean = p.kl_lower = p.kl_upper = kl
    p.position_kl = [kl] * 3
    p.top1_agreement, p.dp_mean, p.dp_rms = 1.0, 0.0, 0.0
    return p


def test_an_infinite_kl_on_one_prompt_fails_decided_naming_it() -> None:
    """The bug: mean KL inf with a 95% CI [0.0069, inf] "straddled" the limit, and the estimate
    of prompts to decide took ceil(n * (inf / inf) ** 2): ValueError, exit 1, no report."""
    prompts = [_prompt(i, 0.001) for i in range(7)] + [_prompt(7, math.inf)]
    agg, ci = aggregate_prompts(prompts)
    comp = Comparison(kind="accuracy", baseline="ref", target="t", prompts=prompts, aggregate=agg, ci=ci)
    v = judge_target("t", "pass", None, comp, budget_for("fp8-block"), None)
    kl = next(c for c in v.parts[-1].checks if c.name == "kl_mean")
    assert kl.value == math.inf and kl.decided and kl.fails and "infinite on p7: always fails" in kl.note
    assert v.label == "FAIL"


def test_an_infinite_value_fails_even_a_limit_widened_past_use() -> None:
    """As NaN does: a noisy null that widened the limit must not turn an infinite KL into a pass."""
    assert Check("kl_mean", math.inf, 50.0, "<=", False, informative=False).fails
    assert not Check("kl_mean", 60.0, 50.0, "<=", False, informative=False).fails  # finite: shown only


@pytest.mark.parametrize("ci", [[0.0069, math.inf], [0.0, math.nan]])
def test_no_prompt_estimate_from_a_non_finite_interval(ci: list[float]) -> None:
    assert _prompts_to_decide(8, ci, 0.5, 0.01) is None
    assert _prompts_to_decide(8, [0.0, 0.2], 0.1, 0.05) == 32  # 8 * (half 0.1 / gap 0.05) ** 2


def test_p99_of_positions_with_an_infinite_kl_is_inf_without_a_numpy_warning() -> None:
    """np.percentile interpolated inf - inf and printed "invalid value encountered in subtract"."""
    ok = PositionLogprobs(
        token="a", ref_logprob=-0.1, tgt_logprob=-0.1, ref_top={"a": -0.1}, tgt_top={"a": -0.1}
    )
    gone = PositionLogprobs(
        token="a", ref_logprob=-0.1, tgt_logprob=-math.inf, ref_top={"a": -0.1}, tgt_top={"q": 0.0}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = teacher_forced_stats([ok] * 3 + [gone], k=1)
    assert stats is not None and stats.kl_p99 == math.inf and stats.kl_mean == math.inf


# ----------------------------------------------- 2. chosen tokens against their own top list


def _view(*positions: tuple[int, float, dict]) -> TokensView:
    """Positions keyed by token id, as a server honouring return_tokens_as_token_ids sends them."""
    return TokensView(tuple(Position(f"token_id:{t}", t, lp, top, None) for t, lp, top in positions))


def test_a_chosen_logprob_that_contradicts_its_own_top_entry_is_impossible() -> None:
    """lm-eval scores with token_logprobs, the KL reads top_logprobs: 1 nat apart, each judged
    another model, and the run passed with KL 0."""
    view = _view((1, -1.744, {1: -0.7445, 2: -1.2}), (2, -0.3, {2: -0.3}))
    problem = impossible_logprobs(view)
    assert problem is not None and "differ from their own top_logprobs entry at positions [0]" in problem
    assert "-1.744 against -0.7445" in problem
    assert impossible_logprobs(_view((1, -0.70, {1: -0.71}))) is None  # bf16 rounding: within 0.05


def test_text_keys_are_never_held_to_their_chosen_token() -> None:
    """Two tokens that decode alike ("▁" and "<0x20>") share a text key, and a server's dict keeps
    one value for both: the chosen token's "own" entry may be the other's, on a correct server."""
    collided = TokensView((Position(" ", None, -1.0, {" ": -5.0, "a": -0.9}, None),))
    assert impossible_logprobs(collided) is None


def test_a_temperature_0_token_below_its_own_top_1_is_named_not_refused() -> None:
    """A sampling server, or one applying a penalty at temperature 0 (vLLM's generation_config
    repetition_penalty: deterministic, alike on both sides): said, never a broken answer."""
    view = _view((1, -0.7, {1: -0.7, 2: -1.2}), (2, -1.2, {1: -0.7, 2: -1.2}))
    said = greedy_not_top1(view)
    assert said is not None and "not the top-1 of their own top_logprobs at positions [1]" in said
    assert impossible_logprobs(view, greedy=True) is None
    assert greedy_not_top1(_view((2, -0.70, {1: -0.69, 2: -0.70}))) is None  # a near-tie, either way


async def test_the_probe_names_a_server_whose_greedy_tokens_are_not_its_top_1() -> None:
    async with FakeServer(FakeBehaviour(fault="not-argmax")).client(name="tgt") as client:
        caps = await probe(client)
    status, detail = next((st, d) for name, st, d in caps.checks if name == "greedy = top-1")
    assert status == "warn" and "not the top-1 of their own top_logprobs" in detail
    assert any("samples or applies a penalty at temperature 0" in w for w in caps.warnings)


def test_a_target_whose_chosen_logprobs_contradict_its_list_is_a_broken_fail(tmp_path: Path) -> None:
    """On the run's own prompts (asked with token ids): a broken answer each, a FAIL naming it."""
    shifted = FakeBehaviour(fault="chosen-logprob-shift", fault_match="lazy dog is")
    with live_fake() as ref, live_fake(shifted) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}])
        code = main(["run", str(cfg)])
    assert code == 1
    verdict = load_run(tmp_path / "out").targets[0].verdict
    assert verdict is not None and verdict.label == "FAIL"
    assert any("differ from their own top_logprobs entry" in r for r in verdict.reasons), verdict.reasons


# --------------------------------------------------------------- 3. golden = reference


@pytest.mark.parametrize("spell", [lambda u: u, lambda u: u.replace("127.0.0.1", "localhost")])
def test_a_golden_that_is_the_reference_is_named(tmp_path: Path, spell) -> None:
    """(t21) a golden at http://localhost:P beside a reference at http://127.0.0.1:P had no warning:
    the target FAILed exactness against the reference itself with no word why."""
    with live_fake() as ref, live_fake() as tgt:
        golden = {"name": "gold", "url": spell(ref)}
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none", "golden": golden}])
        main(["run", str(cfg)])
    run = load_run(tmp_path / "out")
    said = [w for w in run.warnings if "golden gold and reference ref are one server" in w]
    assert len(said) == 1 and "exactness compares the target with the reference itself" in said[0]


# ---------------------------------------------------- 4. how a noise floor was measured


PROMPTS = [Prompt("p1", "one"), Prompt("p2", "two", max_tokens=4)]


def test_settings_record_what_a_floor_depends_on() -> None:
    s = measurement_settings(max_tokens=16, logprobs=5, endpoint="completions", prompts=PROMPTS)
    assert s["max_tokens"] == "16" and s["logprobs"] == "5" and s["prompts"].startswith("2 prompts, sha256 ")
    other = measurement_settings(
        max_tokens=16, logprobs=5, endpoint="completions", prompts=[PROMPTS[0], Prompt("p2", "two")]
    )
    assert other["prompts"] != s["prompts"]  # a per-prompt max_tokens is part of the prompts


def test_a_floor_measured_otherwise_is_said_and_an_older_file_is_not() -> None:
    here = measurement_settings(max_tokens=16, logprobs=5, endpoint="completions", prompts=PROMPTS)
    there = dict(here, max_tokens="1", logprobs="1")
    why = settings_mismatch(NoiseFloor(settings=there), here)
    assert why is not None and "max_tokens '1' there, '16' here; logprobs '1' there, '5' here" in why
    assert settings_mismatch(NoiseFloor(settings=here), here) is None
    assert settings_mismatch(NoiseFloor(), here) is None  # recorded nothing: nothing to compare
    loaded = NoiseFloor.from_json(NoiseFloor(kl_mean=0.01, settings=there).to_json())
    assert loaded.settings == there


def test_a_run_on_a_floor_of_other_settings_warns(tmp_path: Path) -> None:
    floor = tmp_path / "floor.json"
    floor.write_text(NoiseFloor(kl_mean=0.001, reference="ref", settings={"max_tokens": "1"}).to_json())
    with live_fake() as ref, live_fake() as tgt:
        cfg = write_config(
            tmp_path, ref, [{"name": "t", "url": tgt, "scheme": "none"}], extra_run=f'noise_floor = "{floor}"'
        )
        main(["run", str(cfg)])
    run = load_run(tmp_path / "out")
    assert any("measured with other settings: max_tokens '1' there, '12' here" in w for w in run.warnings)
    assert json.loads(floor.read_text())["settings"] == {"max_tokens": "1"}


# ------------------------------------------------------------- 5. extra choices for n=1


async def test_a_server_answering_extra_choices_is_named_by_the_probe() -> None:
    """Choice index 0 is judged; a second choice for one asked was dropped without a word."""
    async with FakeServer(FakeBehaviour(fault="two-choices")).client(name="tgt") as client:
        caps = await probe(client)
    assert ("one choice", "warn", "2 choices for n=1") in caps.checks
    assert any("2 choices answered for one asked (n ignored?)" in w for w in caps.warnings)
    async with FakeServer(FakeBehaviour()).client(name="ok") as client:
        assert not any(name == "one choice" for name, _, _ in (await probe(client)).checks)


# -------------------------------------------------- 6. module replays a server failed, in run


def _replayed(name: str, local_rel_err: float) -> LayerPoint:
    p = LayerPoint(name, 0, "linear", 1.0, 1.0, 0.0, 0.0, 99.0)
    p.local_cosine, p.local_norm_ratio, p.local_rel_err = 1.0, 1.0, local_rel_err
    return p


def _diff(*points: LayerPoint, unjudged: dict[str, int] | None = None) -> LayerDiff:
    d = LayerDiff("golden", "exactness", list(points), replays_unjudged=unjudged or {})
    if unjudged:
        d.warnings.append("replay of model.layers.0.mlp.down_proj failed: HTTP 500 (and 0 more of 2 modules)")
    return d


def test_a_module_whose_replay_failed_leaves_the_layer_part_undecided() -> None:
    """The bug: `run` judged the layer part on the modules that were replayed and PASSed, though
    the one whose replay failed could hold the fault (`layers` exits 3 there)."""
    clean = layer_verdict(_diff(_replayed("model.layers.0.self_attn.q_proj", 0.0)))
    assert clean.passed and not clean.open_questions
    part = layer_verdict(_diff(_replayed("model.layers.0.self_attn.q_proj", 0.0), unjudged={"failed": 1}))
    check = next(c for c in part.checks if c.name == "replays_unjudged")
    assert check.undecided and not check.fails and part.passed  # passed: nothing failed...
    assert part.open_questions and "1 module(s) not replayed, so not judged" in part.open_questions[0]
    faulty = layer_verdict(_diff(_replayed("model.layers.0.self_attn.q_proj", 0.5), unjudged={"failed": 1}))
    assert not faulty.passed  # ...and a module replayed out of bounds still fails the part
    assert replay_failures(_diff(unjudged={"refused": 2})) == {"failed": 0, "refused": 2}


def test_a_divergence_first_seen_at_the_embeddings_suspects_them() -> None:
    """The sentence named model.embed_tokens, then blamed "attention core, norm or rotary?"."""
    for point, suspect in (("model.embed_tokens", "the embedding table or its lookup?"),
                           ("model.norm", "the final norm's weight or kernel?")):  # fmt: skip
        d = _diff(_replayed("model.layers.0.self_attn.q_proj", 0.0))
        d.first_divergent_point = point
        assert localisation_sentence(d).startswith(
            f"first divergent point {point}, no replayed module shows local error ({suspect})"
        )
    d = _diff(_replayed("model.layers.0.self_attn.q_proj", 0.0))
    d.first_divergent_layer, d.first_divergent_point = 3, "model.layers.3"
    assert "(attention core, norm or rotary?)" in localisation_sentence(d)


def test_every_replay_failing_is_undecided_not_skipped() -> None:
    """The bug (found after the fix above): with every /debug/module call answering 500, nothing was
    replayed, the part was "skipped" and the run PASSed (exit 0), while one failure of 210 gave
    INCONCLUSIVE. A server that refuses every replay does not serve the route: skipped, as before."""
    stream = LayerPoint("model.layers.0", 0, "residual", 1.0, 1.0, 0.0, 0.0, 99.0)
    for kind in ("accuracy", "exactness"):
        part = layer_verdict(LayerDiff("g", kind, [stream], replays_unjudged={"failed": 210}))
        assert part.skipped is None and part.open_questions, kind
        assert any(c.name == "replays_unjudged" and c.undecided for c in part.checks)
    refused = layer_verdict(LayerDiff("g", "accuracy", [stream], replays_unjudged={"refused": 210}))
    assert refused.skipped is not None and not refused.checks


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny-llama", dtype="float32", device="cpu")


async def test_decode_steps_that_overflow_a_servers_cap_are_cut_not_the_diff(tiny: LoadedModel) -> None:
    """One row of logits fits the server's cap, the row with its decode steps does not (413): the
    fetch gave up the whole diff ("logits alone, at one position, is over the cap"), exit 3."""
    async with endpoint(tiny) as (whole_ep, _):
        whole = await fetch_activations(whole_ep, BODY)
    row = whole.st.tensors["logits"].nbytes // len(whole.token_ids)
    async with endpoint(tiny, server_cap=int(row * 1.5)) as (ep, _):
        got = await fetch_activations(ep, BODY)
    assert any("point logits with its decode steps is over the response cap" in n for n in got.notes)
    np.testing.assert_array_equal(got.st.tensors["logits"], whole.st.tensors["logits"])
    assert got.token_ids == whole.token_ids


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("http://127.0.0.1:8000", "http://localhost:8000/v1/", True), ("http://[::1]:8000", "http://127.0.0.2:8000", True),
     ("http://0.0.0.0:80", "http://localhost", True), ("https://h.example", "https://H.example:443/v1", True),
     ("http://127.0.0.1:8000", "http://127.0.0.1:8001", False), ("http://10.0.0.1:8000", "http://127.0.0.1:8000", False),
     ("http://a.example:1", "https://a.example:1", False), ("http://h:1/a", "http://h:1/b", False)],
)  # fmt: skip
def test_one_server_is_read_from_where_the_urls_reach(a: str, b: str, same: bool) -> None:
    from server_shim.launch import same_server

    assert same_server(a, b) is same and same_server(b, a) is same
