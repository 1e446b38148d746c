"""Tester 6's quantization findings: slot faults on MoE experts follow the request's batch slot,
faults / switches / flags that can do nothing are refused at start (exit 2, one line), and the
fnuz-unnormalized row of docs/design.md says what the fault shows."""

from __future__ import annotations

import argparse
import copy
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server_shim.errors import QuantConfigError
from server_shim.models import LoadedModel
from server_shim.option_rules import refuse_inert_options
from server_shim.options import ServeOptions
from server_shim.quant.faults import FaultSet, parse_fault, slot_sources
from server_shim.quant.linear import quantize_model
from server_shim.serve import build_engine

ROOT = Path(__file__).resolve().parents[1]
SLOT_VARIANT, SLOT_TILE = FaultSet(slot_variant=True), FaultSet(slot_tile=True)


# ----------------------------------------------------------------------------- 1: MoE slot faults


def test_slot_sources_by_hand() -> None:
    """lead (3, 2): rows 0..5 are (slot, position) (0,0) (0,1) (1,0) (1,1) (2,0) (2,1)."""
    rows = torch.arange(6)
    assert slot_sources(rows, (3, 2), SLOT_VARIANT).tolist() == [0, 1, 0, 1, 0, 1]
    assert slot_sources(rows, (3, 2), SLOT_TILE).tolist() == [0, 1, 2, 3, 4, 5]  # all below slot 16
    # 18 one-token slots: 16 and 17 read slots 0 and 1
    assert slot_sources(torch.tensor([15, 16, 17]), (18, 1), SLOT_TILE).tolist() == [15, 0, 1]
    assert slot_sources(torch.tensor([15, 16, 17]), (18,), SLOT_VARIANT).tolist() == [0, 0, 0]


def test_an_experts_gemm_adds_the_source_rows_it_was_not_routed() -> None:
    from server_shim.quant.moe import _with_sources

    src_of = torch.tensor([0, 1, 0, 1, 0, 1])  # slot-variant over lead (3, 2)
    rows, src = _with_sources(torch.tensor([3, 5]), src_of)  # tokens (1,1) and (2,1) routed here
    assert rows.tolist() == [3, 5, 1]  # token (0,1) joins as an extra row
    assert src.tolist() == [2, 2, 2]  # both read its scale; it reads its own
    rows, src = _with_sources(torch.tensor([1, 2, 3, 0]), src_of)  # sources already routed: no extra
    assert rows.tolist() == [1, 2, 3, 0] and src.tolist() == [0, 3, 0, 3]


def _moe_logits(lm: LoadedModel, ids: torch.Tensor, faults: list[str]) -> torch.Tensor:
    model = copy.deepcopy(lm.model)
    quantize_model(model, scheme="fp8-block", backend="torch", faults=faults)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_moe_slot_faults_leave_a_request_alone_untouched_and_act_by_slot(tiny_moe: LoadedModel) -> None:
    """The bug: an expert's routed rows were read as batch slots, so one 16-token prompt alone
    flipped 14 of 16 argmaxes under slot-variant@*.experts. Now: alone bit-exact; batched, slot 0
    exact and every later slot wrong (slot-variant), slots 0..15 exact and 16 on wrong (slot-tile)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (18, 5), generator=g)
    clean = _moe_logits(tiny_moe, ids, [])
    alone = _moe_logits(tiny_moe, ids[1:2], [])
    for fault, first in (("slot-variant@*.experts", 1), ("slot-tile@*.experts", 16)):
        assert torch.equal(_moe_logits(tiny_moe, ids[1:2], [fault]), alone), fault  # 5 tokens, one slot
        moved = (_moe_logits(tiny_moe, ids, [fault]) - clean).abs().amax(dim=(1, 2))
        assert (moved[:first] == 0).all(), (fault, moved)
        assert (moved[first:] > 0.1).all(), (fault, moved)


def test_a_debug_replay_of_moe_experts_reads_slots_from_its_input_shape(tiny_moe: LoadedModel) -> None:
    """forward_with_backend (the /debug/module replay) has no parent: the input's first dim is the slot."""
    model = copy.deepcopy(tiny_moe.model)
    quantize_model(
        model, scheme="fp8-block", backend="torch", faults=["slot-variant@model.layers.1.mlp.experts"]
    )
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(3, 4, experts.gate_up_shape[1], generator=torch.Generator().manual_seed(1))
    faulty, faulty_alone = (
        experts.forward_with_backend(x, "auto"),
        experts.forward_with_backend(x[1:2], "auto"),
    )
    experts._faults = FaultSet()
    clean, clean_alone = experts.forward_with_backend(x, "auto"), experts.forward_with_backend(x[1:2], "auto")
    assert torch.equal(faulty_alone, clean_alone)  # 4 tokens of one slot
    assert torch.equal(faulty[0], clean[0])
    assert all((faulty[s] - clean[s]).abs().max() > 1e-3 for s in (1, 2))


# ----------------------------------------------------------------------------- 2, 6: inert options


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"faults": ("slot-variant",), "batch_invariant": True}, "slot-variant would change nothing.*batch-invariant"),
        ({"faults": ("slot-variant@*.o_proj",), "max_batch_size": 1}, "slot-variant would change nothing.*size 1 "),
        ({"faults": ("slot-tile",), "max_batch_size": 16}, "slot-tile would change nothing.*slot 16.*use 17"),
        ({"faults": ("slot-tile",), "batch_invariant": True, "max_batch_size": 64}, "slot-tile.*batch-invariant"),
        ({"backend": "vendor", "ck_free": True}, "--backend vendor contradicts --ck-free"),
        ({"backend": "vendor", "ck_free": True, "quant": "none"}, "--backend vendor contradicts --ck-free"),
        ({"backend": "triton", "quant": "none"}, "--backend triton does nothing with --quant none"),
        ({"ck_free": True, "quant": "none"}, "--ck-free does nothing with --quant none"),
        ({"quant_skip": ("model.layers.0.*",), "quant": "none"}, "--quant-skip does nothing with --quant none"),
    ],
)  # fmt: skip
def test_options_that_can_do_nothing_are_refused_before_the_model_loads(
    changes: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server_shim.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    opts = ServeOptions(**{"model": "tiny-llama", "device": "cpu", "quant": "int8", **changes})
    with pytest.raises(QuantConfigError, match=message) as info:
        build_engine(opts)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"faults": ("slot-variant",), "max_batch_size": 2},
        {"faults": ("slot-tile",), "max_batch_size": 17},
        {"faults": ("slot-tile",)},  # the default 32 slots
        {"quant": "none", "backend": "torch"},  # golden = "auto" of an unquantized target
        {"ck_free": True, "backend": "triton"},
    ],
)
def test_options_that_act_are_accepted(changes: dict) -> None:
    refuse_inert_options(ServeOptions(**{"model": "tiny-llama", "quant": "int8", **changes}))


def _shim_specs() -> list:
    """Every built-in shim server the repository's configs start: reference, targets, goldens, twins."""
    from difftest.config import load_config

    specs = []
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        specs.append(cfg.reference)
        for t in cfg.targets:
            specs += [s for s in (t.server, t.golden, t.twin) if s is not None]
    return [s for s in specs if s.kind == "shim"]


def test_every_shim_server_of_the_configs_still_starts() -> None:
    """The start-time refusals judge a launched server's argv as `serve` parses it."""
    from server_shim.options import add_arguments, argv_for, from_namespace

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    specs = _shim_specs()
    assert any("slot-tile" in s.faults for s in specs) and any(s.quant == "none" for s in specs)
    for spec in specs:
        args = parser.parse_args(["--model", str(spec.model), *argv_for(spec), *spec.extra_args])
        refuse_inert_options(from_namespace(args))


# ----------------------------------------------------------------------------- 4, 5: globs


def test_a_quant_skip_glob_that_matches_no_module_is_refused(tiny_llama: LoadedModel) -> None:
    model = copy.deepcopy(tiny_llama.model)
    with pytest.raises(
        QuantConfigError, match=r"--quant-skip model\.layers\.0 matches no .*model\.layers\.0\.\*"
    ):
        quantize_model(model, scheme="int8", skip=["model.layers.0"])  # the layer, not its linears
    with pytest.raises(QuantConfigError, match=r"--quant-skip \*\.mlp\.down matches no linear"):
        quantize_model(model, scheme="int8", skip=["*.mlp.down"])
    summary = quantize_model(
        model, scheme="int8", skip=["lm_head", "model.layers.0.*"]
    )  # lm_head: skipped anyway
    assert "model.layers.0.mlp.down_proj" in summary.skipped


@pytest.mark.parametrize("text", ["garbage-gemm@", "garbage-gemm@ ", " garbage-gemm@"])
def test_an_empty_fault_glob_is_refused_not_read_as_every_module(text: str) -> None:
    with pytest.raises(QuantConfigError, match="empty glob"):
        parse_fault(text)
    assert parse_fault("garbage-gemm").glob is None and parse_fault("garbage-gemm@x").glob == "x"


# ----------------------------------------------------------------------------- 3: valued switches


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DIFFTEST_TRITON_KERNELS", "legcy", "DIFFTEST_TRITON_KERNELS='legcy' must be one of fast, legacy"),
        ("DIFFTEST_TRITON_FACTORED_4BIT", "1", "DIFFTEST_TRITON_FACTORED_4BIT is no longer supported"),
        ("DIFFTEST_TRITON_FACTORED_4BIT", "maybe", "DIFFTEST_TRITON_FACTORED_4BIT='maybe' is neither on"),
    ],
)
def test_valued_and_retired_switches_are_checked_at_start(
    name: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server_shim.switches import SwitchError, check_switches

    monkeypatch.setenv(name, value)
    with pytest.raises(SwitchError, match=re.escape(message)):
        check_switches()


@pytest.mark.parametrize(
    ("value", "want"), [("", "fast"), ("legacy", "legacy"), (" Legacy ", "legacy"), ("FAST", "fast")]
)
def test_the_kernels_switch_reads_like_the_on_off_ones(
    value: str, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server_shim.switches import check_switches, env_choice

    monkeypatch.setenv("DIFFTEST_TRITON_KERNELS", value)
    monkeypatch.setenv("DIFFTEST_TRITON_FACTORED_4BIT", "off")  # off: nothing to refuse
    check_switches()
    assert env_choice("DIFFTEST_TRITON_KERNELS") == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"DIFFTEST_TRITON_KERNELS": "legcy"}, ["--quant", "int8", "--backend", "triton"], "DIFFTEST_TRITON_KERNELS"),
        ({}, ["--quant", "int8", "--fault", "slot-variant", "--batch-invariant"], "slot-variant would change nothing"),
        ({}, ["--quant", "int8", "--quant-skip", "model.layers.0"], "--quant-skip model.layers.0 matches no"),
    ],
    ids=["kernels-typo", "slot-fault-batch-invariant", "skip-glob"],
)  # fmt: skip
def test_the_cli_stops_with_one_line_and_exit_2(env: dict, args: list[str], message: str) -> None:
    import os

    r = subprocess.run(
        [sys.executable, "-m", "server_shim", "serve", "--model", "tiny-llama", "--device", "cpu",
         "--port", str(_free_port()), "--log-level", "error", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("server_shim: error:"), r.stderr


# ----------------------------------------------------------------------------- 7: the docs


def test_the_fnuz_fault_row_promises_no_nan_the_quantizer_cannot_store() -> None:
    from server_shim.quant import formats as F
    from server_shim.quant.faults import read_weight

    w = -torch.rand(64, 128) * 1e-6  # every value rounds to -0 in e4m3fn: code 0x80 if stored
    w[:, 0] = 1.0
    qw = F.quantize_weight(w, "fp8-block")
    assert not (qw.data.view(torch.uint8) == 0x80).any()
    data, _, _ = read_weight(qw, FaultSet(fnuz_unnormalized=True))
    assert not torch.isnan(data.float()).any()
    design = (ROOT / "docs" / "design").with_suffix(
        ".md"
    )  # not a literal: test_docs_fixes reads those as citations
    row = next(line for line in design.read_text().splitlines() if "`fnuz-unnormalized`" in line)
    assert "NaN at code 0x80" not in row and "no NaN" in row
