"""The run's seed on every request (teacher forcing and the batch-slot check sent 0), `diff`'s
unpaired comparisons named both ways and its intervals judged on the prompts they rest on, and a
target that ignores `return_tokens_as_token_ids` (two identical servers FAILed on every echo)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBehaviour, FakeServer, make_fake_app
from live_fakes import live_fake

from difftest.cli import main
from difftest.collect import Endpoint, force, generate, prompt_token_ids
from difftest.conformance import probe
from difftest.prompts import Prompt
from difftest.report import load_run
from difftest.results import Comparison, PromptDiff, RunResult, TargetResult
from difftest.rundiff import diff_runs, metric_move
from difftest.tokenizer_check import check_pair

PROMPTS = ["1+2+3=", "the quick brown fox", "def add(a, b):", "the lazy dog is", "a fox jumps over"]


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return path


# ----------------------------------------------------------------------------- A: --seed everywhere


def test_the_run_seed_is_sent_with_echoes_and_slot_probes_too(tmp_path: Path) -> None:
    """The bug: `--seed 7` reached the greedy generations only; every teacher-forcing echo and
    batch-slot probe sent seed 0 (collect.force, invariance.check_batch_slots)."""
    app = make_fake_app()
    server = app.state.fake
    sent: list[dict[str, Any]] = []
    answer = server.completions

    def logged(req: dict) -> dict:
        sent.append(dict(req))
        return answer(req)

    server.completions = logged
    with live_fake() as ref, live_fake(app=app) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(_prompts(tmp_path / "p.jsonl"))]
        assert main([*argv, "--max-tokens", "6", "--seed", "7", "-o", str(tmp_path / "o")]) == 0
    # the run's requests: its prompts' generations, echoes (text or ids) and slot batches; the
    # probe's carry no seed, the identity canary its own fixed one (difftest.identity)
    seeded = [b for b in sent if "seed" in b and _ours(b["prompt"])]
    echoes = [b for b in seeded if b.get("echo") and b.get("max_tokens") == 0]
    batches = [b for b in seeded if isinstance(b["prompt"], list) and isinstance(b["prompt"][0], str)]
    assert echoes and batches  # teacher forcing and the batch-slot check both asked
    assert {b["seed"] for b in seeded} == {7}


def _ours(prompt: Any) -> bool:
    """A request of the run's own: one of its prompts (alone or in a batch), or token ids (an echo)."""
    return any(t in json.dumps(prompt) for t in PROMPTS) or isinstance(prompt[0], int)


def test_a_baseline_recorded_with_a_seed_replays_its_echoes_and_slot_draws(tmp_path: Path, capsys) -> None:
    """A recording asks what a run asks, with the run's seed: a replay sends seed 7 on its echoes
    now, so the recording must have sent it too (record_reference's Endpoint carries the seed)."""
    prompts = str(_prompts(tmp_path / "p.jsonl"))
    common = ["--max-tokens", "6", "--seed", "7"]
    with live_fake() as ref, live_fake() as tgt:
        assert main(["record", "--ref", ref, "--prompts", prompts, *common, "-o", str(tmp_path / "b")]) == 0
        argv = ["compare", "--baseline", str(tmp_path / "b"), "--target", tgt, "--prompts", prompts]
        code = main([*argv, *common, "--scheme", "none", "-o", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    text = json.dumps(load_run(tmp_path / "o").to_dict())
    assert "not recorded in the baseline" not in text


# ----------------------------------------------------------------------------- B, C: diff


def _run(comparisons: list[Comparison]) -> RunResult:
    return RunResult("reference", targets=[TargetResult("t", "none", "pass", comparisons=comparisons)])


def test_a_comparison_only_in_b_is_named_like_one_only_in_a() -> None:
    """The bug: B with a golden added (an exactness comparison A lacks) gave no word of it, while
    the reverse warned "exactness vs golden is in A only"."""
    acc = Comparison("accuracy", "reference", "t", aggregate={"kl_mean": 0.01})
    exact = Comparison("exactness", "golden", "t", aggregate={"kl_mean": 0.001})
    assert diff_runs(_run([acc]), _run([exact, acc])).warnings == ["t: exactness vs golden is in B only"]
    assert diff_runs(_run([exact, acc]), _run([acc])).warnings == ["t: exactness vs golden is in A only"]


def _kl_run(kl: float, ci: list[float], forced: int, n: int = 10) -> Comparison:
    """n answered prompts, the first `forced` of them teacher-forced (KL `kl` each)."""
    prompts = [PromptDiff(f"p{i}", "", match_rate=1.0, kl_mean=kl if i < forced else None) for i in range(n)]
    agg = {"n_prompts": float(n), "tf_prompts": float(forced), "kl_mean": kl, "dp_mean": kl}
    return Comparison(
        "accuracy", "reference", "t", prompts=prompts, aggregate=agg, ci={"kl_mean": ci, "dp_mean": ci}
    )


def test_beyond_noise_counts_the_prompts_the_interval_rests_on() -> None:
    """Worked by hand: KL 0.010 [0.008, 0.012] -> 0.020 [0.013, 0.030]: the intervals are apart
    (0.012 < 0.013) and the move 0.010 exceeds the minimum 0.005, so over 6 teacher-forced prompts
    it is beyond noise. Over 2 teacher-forced prompts of 10 the bootstrap is the verdict's "range
    of the 2 prompts", not a CI: unknown, where n_prompts = 10 called it a regression."""
    a, b = [0.008, 0.012], [0.013, 0.030]
    six = metric_move("kl_mean", _kl_run(0.010, a, 6), _kl_run(0.020, b, 6), None)
    assert (six.noise, six.beyond_noise, six.regressed) == ("ci", True, True)
    two = metric_move("kl_mean", _kl_run(0.010, a, 2), _kl_run(0.020, b, 2), None)
    assert (two.noise, two.beyond_noise, two.regressed) == ("few", None, False)  # and said so (t22 #4)
    # dp_mean has no per-prompt list in the verdict: it rests on the tf_prompts it averages over
    dp = metric_move("dp_mean", _kl_run(0.010, a, 2), _kl_run(0.020, b, 2), None)
    assert (dp.noise, dp.beyond_noise) == ("few", None)
    # a report of aggregates alone: tf_prompts is the count
    bare = lambda c: dataclasses.replace(c, prompts=[])  # noqa: E731
    alone = metric_move("kl_mean", bare(_kl_run(0.010, a, 2)), bare(_kl_run(0.020, b, 2)), None)
    assert alone.beyond_noise is None
    # token match rests on every prompt: 10, the intervals decide
    assert metric_move("token_match", _matched(0.9, [0.85, 0.95]), _matched(0.5, [0.4, 0.6]), None).regressed


def _matched(rate: float, ci: list[float]) -> Comparison:
    """10 answered prompts, each matching `rate` of its tokens."""
    prompts = [PromptDiff(f"p{i}", "", match_rate=rate) for i in range(10)]
    agg = {"n_prompts": 10.0, "token_match": rate}
    return Comparison("accuracy", "reference", "t", prompts=prompts, aggregate=agg, ci={"token_match": ci})


# ----------------------------------------------------------------------------- D: ids ignored


async def test_a_pair_whose_target_ignores_token_ids_is_not_forced_as_ids() -> None:
    async with FakeServer().client(name="ref") as rc, FakeServer(token_ids=False).client(name="tgt") as tc:
        pc = await check_pair((rc, await probe(rc)), (tc, await probe(tc)))
    assert not pc.echo_as_ids and not pc.teacher_forced  # its top lists are keyed by string
    assert any("ref returns token ids, tgt only token strings" in w for w in pc.warnings)


async def test_ids_echoed_back_as_strings_are_checked_by_their_text() -> None:
    """collect.force compared the echo's token strings with the continuation's "token_id:N"
    labels: ids sent to a server that ignores `return_tokens_as_token_ids` always read as "other
    ids back". Its strings are now compared with the continuation's text, so the same tokens line
    up and other tokens still fail."""
    p = Prompt(id="p0", prompt="the quick brown fox")
    async with FakeServer().client(name="ref") as rc, FakeServer(token_ids=False).client(name="tgt") as tc:
        ref, tgt = Endpoint("ref", rc, await probe(rc)), Endpoint("tgt", tc, await probe(tc))
        cont = await generate(ref, p, max_tokens=6, k=5, seed=0)
        ids = await prompt_token_ids(ref, p.prompt)
        same = await force(tgt, p, cont, prompt_ids=ids, as_ids=True, k=5)
        # the last token's id moved to another token: the echo spells that one, not the text's
        last = cont.view.positions[-1]
        other = next(i for i in range(4, 40) if i != last.token_id)
        moved = cont.view.positions[:-1] + (dataclasses.replace(last, token_id=other),)
        wrong = dataclasses.replace(cont, view=dataclasses.replace(cont.view, positions=moved))
        shifted = await force(tgt, p, wrong, prompt_ids=ids, as_ids=True, k=5)
    assert cont.view.has_ids and same.error is None and len(same.positions) == len(cont.view)
    assert shifted.failed and "differ from the token ids sent" in (shifted.error or "")


@pytest.mark.parametrize(("noise", "code"), [(0.0, 0), (2.0, 1)])
def test_identical_servers_pass_when_the_target_ignores_token_ids(
    noise: float, code: int, tmp_path: Path, capsys
) -> None:
    """The bug: every echo failed as "echoed token ids differ from the ids sent", and two identical
    servers FAILed (impossible-answer rate 100%). Now judged without teacher forcing (said), and a
    target of another model still FAILs."""
    with live_fake() as ref, live_fake(FakeBehaviour(token_ids=False, perturb_noise=noise)) as tgt:
        argv = ["compare", "--ref", ref, "--target", tgt, "--prompts", str(_prompts(tmp_path / "p.jsonl"))]
        assert main([*argv, "--scheme", "none", "--max-tokens", "8", "-o", str(tmp_path / "o")]) == code
    acc = load_run(tmp_path / "o").targets[0].comparison("accuracy")
    assert acc is not None and acc.aggregate["failed_requests"] == 0
    assert any("only token strings" in w for w in acc.warnings)
