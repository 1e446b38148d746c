"""`difftest layers --json` and `difftest quant --json`: parseable results, exit codes, and the
JSON file in the -o folder (in-process tiny-llama shims behind the debug protocol)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from test_layers import _run_in_current_loop, build, serve_in_process, shim_server

from difftest.cli import build_parser, whitebox
from difftest.cli import layers as layers_cmd
from difftest.cli import quant as quant_cmd
from difftest.whitebox.audit import HINTS

FAULT_MODULE = "model.layers.1.mlp.up_proj"


async def _run(monkeypatch: Any, command: Any, args: argparse.Namespace) -> int:
    bad = build(scheme="fp8-block", faults=[f"scale-skipped@{FAULT_MODULE}"])
    with shim_server("reference", build()) as (r, _), shim_server("target", bad) as (t, _):
        serve_in_process(monkeypatch, {"reference": r, "target": t})
        monkeypatch.setattr(whitebox.aio, "run", _run_in_current_loop)  # already inside a loop
        return await command.run(args)  # main() would wrap the coroutine in int()


async def test_layers_and_quant_json(monkeypatch, tmp_path: Path, capsys) -> None:
    parse = build_parser().parse_args
    argv = ["--ref", "http://r", "--target", "http://t", "--json"]
    layers_code = await _run(monkeypatch, layers_cmd, parse(["layers", *argv, "-o", str(tmp_path / "l")]))
    layers = json.loads(capsys.readouterr().out)
    quant_code = await _run(monkeypatch, quant_cmd, parse(["quant", *argv]))
    quant = json.loads(capsys.readouterr().out)
    assert layers_code == layers["exit_code"] == 1
    (diff,) = layers["diffs"]
    assert diff["target"] == "target" and diff["kind"] == "accuracy" and diff["failed"]
    assert diff["guilty_module"] == FAULT_MODULE and any(p["flagged"] for p in diff["points"])
    assert json.loads((tmp_path / "l" / "layers.json").read_text()) == layers
    assert quant_code == quant["exit_code"] == 1
    (audit,) = quant["audits"]
    flagged = [m for m in audit["modules"] if m.get("flagged")]
    assert audit["flagged"] and [m["module"] for m in flagged] == [FAULT_MODULE]


def test_layers_and_quant_give_a_configs_url_servers_their_api_keys(tmp_path, monkeypatch) -> None:
    """The bug: `layers CONFIG --api-key-env VAR` (and OPENAI_API_KEY) reached `run`'s url servers,
    not layers' / quant's: HTTP 401."""
    import argparse

    from difftest.cli.whitebox import _plan

    monkeypatch.setenv("MYKEY", "k")
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nprompts = "p.jsonl"\n[reference]\nurl = "http://127.0.0.1:9"\n'
                   '[[target]]\nname = "t"\nurl = "http://127.0.0.1:9"\n')  # fmt: skip
    args = argparse.Namespace(config=cfg, ref=None, target=None, golden=None, api_key_env=["MYKEY"])
    specs, _, _ = _plan(args)
    assert {s.name: s.api_key_env for s in specs} == {"reference": "MYKEY", "t": "MYKEY"}


def test_quant_launches_no_golden_beside_a_live_reference() -> None:
    """`quant CONFIG` audits each target against its reference and reads a golden only where no
    live reference exists: on configs/default.toml it launched every target's golden too, three
    more models loaded that nothing asked. `layers` diffs against both and still launches them."""
    import argparse
    from pathlib import Path

    from difftest.cli.whitebox import _plan

    args = argparse.Namespace(config=Path("configs/default.toml"), ref=None, target=None, golden=None)
    for fallback, goldens_expected in ((True, False), (False, True)):
        specs, _, jobs = _plan(args, fallback)
        names = {s.name for s in specs}
        assert any(j.golden for j in jobs) is goldens_expected
        assert any(n.endswith("-golden") for n in names) is goldens_expected, names
        assert {j.reference for j in jobs} == {"fp32"} and "fp32" in names


def test_layers_refuses_an_empty_prompt(capsys) -> None:
    """`layers --prompt ""` used to capture on the default prompt, without a word."""
    from difftest.cli import main

    assert main(["layers", "--target", "http://127.0.0.1:9", "--prompt", " "]) == 2
    assert "--prompt: empty prompt text" in capsys.readouterr().err


def test_a_layer_diff_that_says_nothing_is_never_exit_0() -> None:
    """The bug: activations a server failed or refused (a 500, a prompt over the context) gave
    "layer diff not made" and exit 0, "nothing flagged", for a grossly faulty target."""
    from difftest.cli.layers import unmade
    from difftest.results import LayerDiff, LayerPoint

    refused = LayerDiff(
        "reference", "accuracy", not_made="rejected", warnings=["activations unavailable: HTTP 400"]
    )
    assert unmade(refused) == ("activations unavailable: HTTP 400", 2)
    assert unmade(LayerDiff("reference", "accuracy", not_made="failed"))[1] == 3
    point = LayerPoint(name="model.layers.0.mlp.up_proj", layer=0, kind="linear", cosine=1.0, norm_ratio=1.0,
                       rel_err=0.0, max_abs=0.0, sqnr_db=99.0)  # fmt: skip
    unreplayed = LayerDiff("reference", "accuracy", points=[point], warnings=["replay of x failed: HTTP 500"],
                           replays_unjudged={"failed": 1})  # as replay_all records it  # fmt: skip
    # a replay the server failed to answer is the server's (3, README's table), no longer "undecided" (4)
    assert unmade(unreplayed) == ("no module could be replayed (replay of x failed: HTTP 500)", 3)
    replayed = LayerDiff(
        "reference", "accuracy", points=[LayerPoint(**{**point.__dict__, "local_rel_err": 0.0})]
    )
    assert unmade(replayed) == ("", 0)


async def test_layers_over_the_context_is_a_usage_error_not_a_clean_result(monkeypatch, capsys) -> None:
    parse = build_parser().parse_args
    argv = ["layers", "--ref", "http://r", "--target", "http://t", "--json", "--prompt", "a " * 3000]
    code = await _run(monkeypatch, layers_cmd, parse(argv))
    out = json.loads(capsys.readouterr().out)
    assert code == out["exit_code"] == 2 and out["not_made"]


def test_layers_fails_what_run_fails_not_drift_no_module_explains() -> None:
    """The false alarm: a correct tiny-moe fp8-block target failed `layers` on residual drift
    (routing flips; every module's local cosine >= 0.998) that `run` never failed on."""
    import math

    from difftest.cli.layers import diff_failed
    from difftest.results import LayerDiff, LayerPoint

    def point(name: str, kind: str, cos: float, **kw) -> LayerPoint:
        return LayerPoint(name=name, layer=1, kind=kind, cosine=cos, norm_ratio=1.0, rel_err=1 - cos, max_abs=0.0,
                          sqnr_db=30.0, **kw)  # fmt: skip

    modules = [point(f"model.layers.{i}.mlp.up_proj", "linear", 0.999, local_rel_err=0.02, local_cosine=0.999,
                     local_norm_ratio=1.0) for i in range(4)]  # fmt: skip
    drift = LayerDiff(
        "reference", "accuracy", points=[point("model.layers.2", "residual", 0.957, flagged=True), *modules]
    )
    assert not diff_failed(drift, "fp8-block")
    bad = [*modules[:3], point("model.layers.3.mlp.up_proj", "linear", 0.5, local_rel_err=0.9, local_cosine=0.5,
                                local_norm_ratio=1.0)]  # fmt: skip
    assert diff_failed(LayerDiff("reference", "accuracy", points=bad), "fp8-block")
    nan = LayerDiff("reference", "accuracy", points=[point("model.layers.2", "residual", math.nan), *modules])
    assert diff_failed(nan, "fp8-block")


async def test_quant_on_a_target_with_nothing_quantized_is_exit_4(monkeypatch, capsys) -> None:
    """An fp32 target gave an empty audit table and exit 0, "nothing flagged", without a word."""
    parse = build_parser().parse_args
    with shim_server("reference", build()) as (r, _), shim_server("target", build()) as (t, _):
        serve_in_process(monkeypatch, {"reference": r, "target": t})
        monkeypatch.setattr(whitebox.aio, "run", _run_in_current_loop)
        code = await quant_cmd.run(parse(["quant", "--ref", "http://r", "--target", "http://t"]))
    assert code == quant_cmd.NOTHING_AUDITED == 4
    assert "target: nothing to audit: it serves no quantized module" in " ".join(
        capsys.readouterr().out.split()
    )


def test_the_audit_table_piped_still_names_the_flagged_module_and_its_hint() -> None:
    """T11: piped, the table was cut to the console's width and the hint, its last column, got none
    ('scales look transposed' printed nowhere among 210 rows); a best hypothesis that explains
    nothing (garbage-gemm: fnuz-unnormalized at rel err 1.09) was shown as if it did."""
    import io

    from rich.console import Console

    hyp = {f"hypothesis-{i}": 1.09 + i for i in range(12)}
    rows = [
        {"module": f"model.layers.{i}.mlp.up_proj", "scheme": "fp8-block", "backend": "torch",
         "layout": {"order": "row-major"}, "checks": {"finite": True}, "best": "declared",
         "kernel_hypotheses": {"declared": 1e-8} | hyp, "flagged": False, "hint": None}
        for i in range(3)
    ] + [
        {"module": "model.layers.10.mlp.up_proj", "scheme": "fp8-block", "backend": "torch",
         "layout": {"order": "row-major"}, "checks": {"finite": True}, "best": "fnuz-unnormalized",
         "kernel_hypotheses": {"fnuz-unnormalized": 1.09} | hyp, "flagged": True,
         "hint": "the kernel's weight matches no layout hypothesis (wrong kernel for the arch?)"},
    ]  # fmt: skip
    out = io.StringIO()
    quant_cmd.render_audit(rows, "tgt", Console(file=out, width=120, force_terminal=False))
    text = out.getvalue()
    assert (
        "FLAGGED model.layers.10.mlp.up_proj: the kernel's weight matches no layout hypothesis (wrong kernel for the arch?)"
        in text
    )
    assert "tgt: 1 of 4 modules flagged" in text
    row = next(line for line in text.splitlines() if "layers.10.mlp.up_proj" in line and "│" in line)
    assert "FLAGGED" in row and "fnuz-unnormalized" not in row.split("│")[6]  # best: none
    assert "declared" in next(line for line in text.splitlines() if "layers.0.mlp" in line)


def test_the_backend_mark_is_the_schemes_module_bound_against_the_reference() -> None:
    """T12: against the reference's fp32 weights every module of a correct int4-g128 / mxfp4 target
    (cosine about 0.992) was marked under one 0.999 bound: 210 of 210 '!', telling nothing. Against
    the target's own torch arithmetic a correct kernel is all but exact, and 0.999 stays."""
    from difftest.whitebox.activations import LayerThresholds
    from difftest.whitebox.audit import BACKEND_COSINE_MIN, backend_cosine_min

    th = LayerThresholds()
    assert (
        backend_cosine_min("int4-g128", True)
        == backend_cosine_min("mxfp4", True)
        == th.module_cosine_4bit
        == 0.95
    )
    assert backend_cosine_min("int8", True) == 0.985 and backend_cosine_min("fp8-block", True) == 0.995
    assert backend_cosine_min("int4-g128", False) == BACKEND_COSINE_MIN == 0.999
    assert 0.95 <= 0.992 < 0.999  # the measured correct 4-bit module: unmarked now, marked before


@pytest.mark.parametrize(
    ("expect", "flagged", "declared", "code", "said"),
    [
        # a negative control the audit flags: caught, as `run` and `layers` gate it (it exited 1)
        ("fail", True, (f"scale-skipped@{FAULT_MODULE}",), 0, "a module flagged, as expected"),
        # a control audited clean: its (visible) fault went unseen
        ("fail", False, (f"scale-skipped@{FAULT_MODULE}",), 1, "no module flagged: NOT as expected"),
        # a control whose only fault is a slot fault: one request of one slot cannot see it
        ("fail", False, ("slot-tile",), 4, "no module flagged, undecided: its faults (slot-tile)"),
        ("fail", True, ("slot-tile",), 0, "a module flagged, as expected"),  # seen anyway
        ("pass", True, (), 1, None),  # a target expected to pass, flagged
        ("pass", False, (), 0, None),
    ],
)
async def test_quant_config_gates_each_target_on_its_expect(
    monkeypatch, capsys, expect: str, flagged: bool, declared: tuple[str, ...], code: int, said: str | None
) -> None:
    """The bug: `quant CONFIG` read no `expect`, so configs/default.toml's negative control
    (fp8-block-faulty, expect = "fail") flagged as it should and made the exit 1: `difftest quant
    configs/default.toml` could never exit 0, where `run` and `layers` on it do."""
    from difftest.whitebox import audit as audit_mod

    async def one_row(target, reference):  # noqa: ANN001, ANN202 - the audit's verdict, without its cost
        return [{"module": FAULT_MODULE, "scheme": "fp8-block", "checks": {"scale_shape": True},
                 "audited": True, "flagged": flagged, "hint": HINTS["unit-scales"] if flagged else None}]  # fmt: skip

    monkeypatch.setattr(audit_mod, "audit", one_row)
    job = whitebox.Job("target", None, None, expect, declared)  # as `_plan` makes it from a CONFIG
    monkeypatch.setattr(whitebox, "_plan", lambda args, *_: ([], {"target": "http://t"}, [job]))
    with shim_server("target", build()) as (t, _):
        serve_in_process(monkeypatch, {"target": t})
        monkeypatch.setattr(whitebox.aio, "run", _run_in_current_loop)
        got = await quant_cmd.run(build_parser().parse_args(["quant", "--target", "http://t"]))
    out = " ".join(capsys.readouterr().out.split())
    assert got == code, out
    control = 'target (expect = "fail", a negative control): '
    assert (control + said in out) if said else control not in out


def test_unseen_faults_are_the_slot_faults_only() -> None:
    assert quant_cmd.unseen_faults(["slot-variant", "slot-tile@*.down_proj"]) == ["slot-variant", "slot-tile"]
    assert quant_cmd.unseen_faults(["slot-tile", "scale-transposed"]) == []  # one it sees: 1 if missed
    assert quant_cmd.unseen_faults([]) == []


@pytest.mark.parametrize(
    ("scheme", "dtypes", "blind"),
    [("int8", ("bfloat16",), True), ("int8", ("float32", "bf16"), True), ("int8", ("float16", "auto"), False),
     ("int8", (), False), ("fp8-block", ("bfloat16",), False)],
)  # fmt: skip
def test_ue8m0_on_int8_in_bfloat16_is_out_of_the_audits_reach(
    scheme: str, dtypes: tuple[str, ...], blind: bool
) -> None:
    """The int8 probe (45/64 cannot show it on an integer grid; 1031/2048 can, but only in fp16 /
    fp32): a bf16 int8 control with ue8m0-rounding found clean was exit 1, "the audit missed it"."""
    unseen = quant_cmd.unseen_faults(["ue8m0-rounding@*"], scheme, dtypes)
    assert unseen == (["ue8m0-rounding"] if blind else [])
    assert quant_cmd.unseen_faults(["ue8m0-rounding", "scale-skipped"], scheme, dtypes) == []  # one it sees
    line = quant_cmd.control_line("t", False, unseen, False)
    assert ("probe that bfloat16 cannot hold" in line) is blind
    assert ("NOT as expected" in line) is not blind


@pytest.mark.slow
def test_quant_config_with_a_flagged_negative_control_exits_0(tmp_path: Path, capsys) -> None:
    """End to end through CONFIG: the control's `expect` reaches the gate (exit 1 before)."""
    from difftest.cli import main

    shim = 'model = "tiny-llama"\ndtype = "float32"\ndevice = "cpu"\n'
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "the quick brown fox"}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[run]\nprompts = "p.jsonl"\n[reference]\nname = "ref"\n{shim}'
        f'[[target]]\nname = "bad"\n{shim}quant = "fp8-block"\nexpect = "fail"\n'
        f'faults = ["scale-skipped@{FAULT_MODULE}"]\n'
    )
    out = tmp_path / "q"
    assert main(["quant", str(cfg), "-o", str(out)]) == 0, capsys.readouterr().err
    assert 'bad (expect = "fail", a negative control): a module flagged, as expected' in " ".join(
        capsys.readouterr().out.split()
    )
    (audit,) = json.loads((out / "quant.json").read_text())["audits"]
    assert audit["expect"] == "fail" and audit["flagged"]
