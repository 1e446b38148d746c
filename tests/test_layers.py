"""difftest.whitebox (activations, replay, layers, localise): pure parts (bounds, ranking, first
divergence, verdict, the localisation sentence) with hand values, then in process: debug apps over
tiny-llama through ASGITransport inside CompletionClient.

`shim_endpoint` is the debug router on a bare FastAPI over the real Engine (what the white-box
functions need); `shim_server` is the whole app (`create_app`, `--debug`) for a Session, which
probes completions too."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from difftest.client import CompletionClient
from difftest.collect import Endpoint
from difftest.conformance import Capabilities
from difftest.metrics.tensors import TensorDiff
from difftest.results import LayerDiff, LayerPoint
from difftest.session import Server, Session
from difftest.whitebox.activations import (
    LayerThresholds,
    first_divergence,
    layer_of,
    local_out_of_bounds,
    point_flagged,
    point_kind,
    sibling_key,
)
from difftest.whitebox.layers import layer_verdict
from difftest.whitebox.localise import localisation_line, localisation_sentence, localise_target
from difftest.whitebox.replay import choose_guilty, rank_modules, routing_rescale, slot_dependent, slot_note
from server_shim.models import LoadedModel, load_model

PROMPT = "The capital of France is Paris. The capital of Germany is"
TH = LayerThresholds()
# Where the in-process models run. CI: CPU float32. On a GPU, e.g. DIFFTEST_TEST_DEVICE=cuda
# DIFFTEST_TEST_DTYPE=float16 DIFFTEST_TEST_BACKEND=triton, test_whitebox_acceptance.py repeats the
# fault-class acceptance inside the GPU kernels.
DEVICE = os.environ.get("DIFFTEST_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("DIFFTEST_TEST_DTYPE", "float32")


# ---------------------------------------------------------------- in-process servers (shared)


def build(
    model: str = "tiny-llama", scheme: str = "none", backend: str = "torch", faults: Sequence[str] = ()
) -> LoadedModel:
    lm = load_model(model, dtype=DTYPE, device=DEVICE)
    if scheme != "none":
        from server_shim.quant.linear import quantize_model

        quantize_model(lm.model, scheme=scheme, backend=backend, faults=list(faults))
    return lm


@contextlib.asynccontextmanager
async def shim_endpoint(name: str, loaded: LoadedModel) -> AsyncIterator[Endpoint]:
    from server_shim.debug import create_debug_router
    from server_shim.engine import Engine

    engine = Engine(loaded)
    app = FastAPI()
    app.include_router(create_debug_router(engine))
    client = CompletionClient(
        "http://test", name=name, transport=httpx.ASGITransport(app=app), max_retries=0, timeout_s=600
    )
    try:
        yield Endpoint(name, client, Capabilities(name=name, url="http://test", model=None, debug=True))
    finally:
        await client.aclose()
        engine.close()


class CountingTransport(httpx.AsyncBaseTransport):
    """Records (method, path) of every request on its way to the wrapped transport."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        return await self.inner.handle_async_request(request)

    def count(self, method: str, path: str) -> int:
        return self.requests.count((method, path))


@contextlib.contextmanager
def shim_server(name: str, loaded: LoadedModel) -> Iterator[tuple[Server, CountingTransport]]:
    """The whole shim app with --debug, in process, as a Session's Server (requests counted)."""
    from server_shim.app import create_app
    from server_shim.engine import Engine
    from server_shim.serve import ServeOptions

    engine = Engine(loaded)
    transport = CountingTransport(
        httpx.ASGITransport(app=create_app(engine, ServeOptions(model=loaded.name, debug=True)))
    )
    try:
        yield Server(name, f"http://{name}.test", transport=transport), transport
    finally:
        engine.close()


def serve_in_process(monkeypatch: pytest.MonkeyPatch, servers: dict[str, Server]) -> None:
    """`Session.of_urls` (what the white-box commands connect with) over in-process servers."""

    def of_urls(cls, urls, *, api_key=None, keys=None, options=None):  # noqa: ANN001, ANN202
        return cls([servers[name] for name in urls], options)

    monkeypatch.setattr(Session, "of_urls", classmethod(of_urls))


# ---------------------------------------------------------------- pure parts


def td(cos: float = 1.0, nr: float = 1.0, rel: float = 0.0, finite: bool = True) -> TensorDiff:
    return TensorDiff(cos, nr, 0.0, rel, 0.0, finite, 10)


def test_names() -> None:
    assert layer_of("model.layers.12.mlp.down_proj") == 12 and layer_of("logits") is None
    assert point_kind("model.layers.3") == "residual" and point_kind("decode.model.layers.3") == "residual"
    assert point_kind("model.layers.3.self_attn") == "attn" and point_kind("logits") == "logits"
    assert point_kind("model.layers.3.mlp.experts", "moe") == "moe"
    assert point_kind("model.layers.3.mlp.down_proj") == "linear"
    assert sibling_key("model.layers.12.mlp.down_proj") == "model.layers.*.mlp.down_proj"


@pytest.mark.parametrize(
    ("d", "kind", "pkind", "flagged"),
    [
        (td(rel=0.06), "exactness", "residual", True),  # over 5e-2
        (td(rel=0.04), "exactness", "residual", False),
        (td(rel=0.9), "exactness", "linear", False),  # sublayers inherit: replay judges them
        (td(finite=False), "exactness", "linear", True),  # NaN always fails
        (td(cos=0.9999, nr=0.5, rel=0.5), "accuracy", "residual", True),  # fnuz x0.5: cosine is blind
        (td(cos=0.985, nr=1.0), "accuracy", "residual", True),  # under the 8-bit residual cosine 0.99
        (td(cos=0.995, nr=1.05), "accuracy", "logits", False),
    ],
)
def test_point_bounds(d: TensorDiff, kind: str, pkind: str, flagged: bool) -> None:
    assert point_flagged(d, kind, "fp8-block", TH, pkind) is flagged


def test_local_bounds() -> None:
    assert local_out_of_bounds(td(rel=2e-3), "exactness", None, TH)
    assert not local_out_of_bounds(td(rel=5e-4), "exactness", None, TH)
    assert local_out_of_bounds(td(cos=1.0, nr=0.5), "accuracy", "fp8-block", TH)
    assert local_out_of_bounds(td(cos=0.99, nr=1.0), "accuracy", "fp8-block", TH)  # 8-bit budget 0.995
    assert not local_out_of_bounds(td(cos=0.99, nr=1.0), "accuracy", "int4-g128", TH)  # 4-bit budget 0.95


def test_rank_relative_to_siblings() -> None:
    local = {f"model.layers.{i}.q_proj": v for i, v in enumerate([0.1, 0.1, 0.25, 0.1])}
    local |= {f"model.layers.{i}.k_proj": v for i, v in enumerate([0.2, 0.2, 0.2, 0.2])}
    exact = rank_modules(local, "exactness")
    assert exact[0] == ("model.layers.2.q_proj", 0.25)
    acc = dict(rank_modules(local, "accuracy"))
    # median of the q_proj siblings [0.1, 0.1, 0.25, 0.1] is 0.1: 0.25 / 0.1 = 2.5
    assert acc["model.layers.2.q_proj"] == pytest.approx(2.5)
    assert acc["model.layers.0.k_proj"] == pytest.approx(1.0)
    assert rank_modules(local, "accuracy")[0][0] == "model.layers.2.q_proj"
    assert rank_modules({"a": math.nan, "b": 1.0}, "exactness")[0][0] == "a"  # NaN ranks first


def test_routing_rescale() -> None:
    base = np.array([[2.0, 0.5], [1.5, 1.0]])  # sums 2.5: the factor applied in the router
    assert routing_rescale(base, base / 2.5) == pytest.approx(0.4)
    assert routing_rescale(base, base * 1.001) == 1.0  # same convention


def _p(name: str, kind: str, rel: float = 0.0, flagged: bool = False, **local: float) -> LayerPoint:
    return LayerPoint(name, layer_of(name), kind, 1.0, 1.0, rel, rel, 0.0, flagged, **local)


def test_slot_note_and_sentence_summarise_slot_dependence() -> None:
    """One line for all slot-dependent modules (a slot-variant kernel is in every module of its
    scheme: one warning each buried the report in 210 lines), and the sentence says it of the
    guilty module with the count."""
    pts = [_p(f"model.layers.{i}.mlp.up_proj", "linear", local_cosine=0.9, local_norm_ratio=1.0,
              local_rel_err=0.1 * (i + 1)) for i in range(5)]  # fmt: skip
    pts.append(_p("model.layers.0", "residual", 1e-6))
    for i, p in enumerate(pts[:5]):
        p.slot_rel_err = 0.0 if i == 0 else 0.25 * i  # 0.25, 0.5, 0.75, 1.0
        p.slot_dependent = i > 0
    diff = LayerDiff(against="g", kind="exactness", points=pts, guilty_module="model.layers.4.mlp.up_proj")
    assert slot_note(diff, named=2) == (
        "output depends on the batch slot in 4 of 5 linears replayed in two slots (model.layers.1.mlp.up_proj, "
        "model.layers.2.mlp.up_proj and 2 more; worst slot 1 vs slot 0 rel err 1 in model.layers.4.mlp.up_proj)"
    )
    assert localisation_sentence(diff).endswith(
        "rel err 0.5), its output depends on the batch slot (slot 1 vs slot 0 rel err 1; so do 4 of 5 linears "
        "replayed in two slots); 1 other module out of bounds, the worst model.layers.0.mlp.up_proj (local rel err 0.1)"
    )  # the slot clause counts the slot-dependent ones; layer 0's local error is another fault
    for p in pts:
        p.slot_dependent = False
    assert slot_note(diff) is None and "batch slot" not in localisation_sentence(diff)


def test_slot_dependent_bounds() -> None:
    th = LayerThresholds(slot_rel_err=1e-3)
    assert [slot_dependent(v, th) for v in (None, 0.0, 1e-3, 1.1e-3, math.inf, math.nan)] == [
        False, False, False, True, True, False,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("poison", "expected"),
    [(None, 0.0), ("slot1", math.inf), ("both", math.nan)],
    ids=["clean", "slot1-nonfinite", "both-nonfinite"],
)
async def test_replay_module_slot_error_with_nonfinite_outputs(
    monkeypatch: pytest.MonkeyPatch, poison: str | None, expected: float
) -> None:
    """A non-finite output in one slot only is a slot dependence (+inf); in both slots it says
    nothing about the slot (NaN, and the module's own error reports it)."""
    from difftest.whitebox import replay as R
    from difftest.whitebox.activations import Activations
    from difftest.whitebox.safetensors import read_safetensors, write_safetensors
    from server_shim import debug_protocol as P

    name = "model.layers.0.mlp.up_proj"
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    st = read_safetensors(write_safetensors({f"{name}{P.INPUT_SUFFIX}": x}, {}))
    w = np.linspace(-1, 1, 8).reshape(2, 4)

    async def fake_replay(ep: object, module: str, tensors: dict) -> np.ndarray:
        out = tensors[P.INPUT].astype(np.float64) @ w.T  # [2 slots, T, N]
        if ep == "target" and poison:
            out[1 if poison == "slot1" else slice(None), 0, 0] = np.inf
        return out

    monkeypatch.setattr(R, "replay", fake_replay)
    _, slot = await R.replay_module("base", "target", name, "linear", Activations(st, [], [], []))  # type: ignore[arg-type]
    assert slot == expected or (math.isnan(expected) and math.isnan(slot))


def test_first_divergence_and_guilt() -> None:
    pts = [
        _p("model.layers.0", "residual", 1e-6),
        _p("model.layers.1", "residual", 0.2, True),
        _p("model.layers.2", "residual", 0.3, True),
        _p("model.layers.1.mlp", "mlp", local_cosine=0.9, local_norm_ratio=1.0, local_rel_err=0.4),
        _p(
            "model.layers.1.mlp.down_proj",
            "linear",
            local_cosine=0.9,
            local_norm_ratio=1.0,
            local_rel_err=0.4,
        ),
        _p(
            "model.layers.1.mlp.up_proj", "linear", local_cosine=1.0, local_norm_ratio=1.0, local_rel_err=1e-7
        ),
    ]
    assert first_divergence(pts) == (1, "model.layers.1")
    diff = LayerDiff(against="gold", kind="exactness", points=pts, first_divergent_layer=1)
    assert choose_guilty(diff, "fp8-block", TH)[0] == "model.layers.1.mlp.down_proj"  # the leaf, not the mlp
    diff.guilty_module, diff.guilty_backend, diff.audit_hint = (
        "model.layers.1.mlp.down_proj",
        "triton",
        "scales look transposed",
    )
    line = localisation_sentence(diff)
    assert line.startswith(
        "first divergent layer 1, local error in model.layers.1.mlp.down_proj (local cos 0.9"
    )
    assert line.endswith("backend triton, scales look transposed")
    verdict = layer_verdict(diff)
    assert not verdict.passed
    assert any("model.layers.1.mlp.down_proj" in r and "local_rel_err_max" in r for r in verdict.reasons)
    # one producer: a verdict's localisation line is the first localised diff's sentence
    quiet = LayerDiff(against="ref", kind="accuracy", summary="no divergence vs ref")
    assert localisation_line([quiet, diff]) == line and localisation_line([quiet]) is None


def test_verdict_accuracy_and_skip() -> None:
    ok = [_p(f"model.layers.{i}.q_proj", "linear", local_cosine=0.9995, local_norm_ratio=1.0, local_rel_err=0.03)
          for i in range(4)]  # fmt: skip
    assert layer_verdict(LayerDiff("ref", "accuracy", ok), scheme="fp8-block").passed
    half = [
        *ok[:3],
        _p("model.layers.3.q_proj", "linear", local_cosine=0.9995, local_norm_ratio=0.5, local_rel_err=0.5),
    ]
    v = layer_verdict(LayerDiff("ref", "accuracy", half), scheme="fp8-block")
    assert not v.passed and any(
        "local_norm_ratio_min" in r and "model.layers.3.q_proj" in r for r in v.reasons
    )
    assert layer_verdict(LayerDiff("ref", "accuracy", [])).skipped


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def ref_model() -> LoadedModel:
    return build()


async def test_reference_against_itself_has_nothing_flagged(ref_model: LoadedModel) -> None:
    async with shim_endpoint("a", ref_model) as a, shim_endpoint("b", ref_model) as b:
        found = await localise_target(b, prompt=PROMPT, golden=a)
    (diff,) = found.diffs
    assert diff.points and not any(p.flagged for p in diff.points)
    assert diff.first_divergent_layer is None and diff.guilty_module is None and not found.audit
    replayed = [p for p in diff.points if p.local_rel_err is not None]
    assert len(replayed) == 28 and all(p.local_rel_err == 0.0 for p in replayed)  # 7 linears x 4 layers
    assert any(p.name == "decode.model.layers.3" for p in diff.points)  # decode path compared too
    assert layer_verdict(diff).passed and diff.summary == "no divergence vs a"


async def test_fault_is_localised_and_cli_exits_1(ref_model: LoadedModel, monkeypatch, capsys) -> None:
    """`difftest layers --ref --golden --target`: the fault is named once per diff, the blamed module
    is audited once (both diffs blame it), and each server's /debug/config is fetched once."""
    module = "model.layers.2.mlp.up_proj"
    bad = build(scheme="fp8-block", faults=[f"fnuz-unnormalized@{module}"])
    golden = build(scheme="fp8-block")
    from difftest.cli import layers as layers_cmd
    from difftest.cli import whitebox as whitebox_cli

    with (
        shim_server("reference", ref_model) as (ref, ref_t),
        shim_server("golden", golden) as (gold, gold_t),
        shim_server("target", bad) as (tgt, tgt_t),
    ):
        serve_in_process(monkeypatch, {"reference": ref, "golden": gold, "target": tgt})
        monkeypatch.setattr(whitebox_cli.aio, "run", _run_in_current_loop)
        args = argparse.Namespace(
            config=None, ref="http://r", target="http://t", golden="http://g", prompt=PROMPT, api_key_env=None
        )
        code = await layers_cmd.run(args)
    assert code == 1
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert out.count(f"local error in {module}") == 2  # vs golden and vs reference
    assert "e4m3fnuz" in out  # the audit's hint, in both sentences
    for t in (ref_t, gold_t, tgt_t):
        assert t.count("GET", "/debug/config") == 1, t.requests
    assert tgt_t.count("GET", f"/debug/quant/{module}") == 1  # one audit, though two diffs blame it
    assert not any(m == "GET" and p.startswith("/debug/quant") for m, p in ref_t.requests + gold_t.requests)


async def test_layers_command_needs_the_debug_protocol(ref_model: LoadedModel, monkeypatch) -> None:
    from difftest.cli import layers as layers_cmd
    from difftest.cli import whitebox as whitebox_cli
    from difftest.errors import ConformanceError
    from server_shim.app import create_app
    from server_shim.engine import Engine
    from server_shim.serve import ServeOptions

    engine = Engine(ref_model)
    plain = Server(
        "target",
        "http://t.test",
        transport=httpx.ASGITransport(app=create_app(engine, ServeOptions(model="tiny-llama"))),
    )
    try:
        with shim_server("reference", ref_model) as (ref, _):
            serve_in_process(monkeypatch, {"reference": ref, "target": plain})
            monkeypatch.setattr(whitebox_cli.aio, "run", _run_in_current_loop)
            args = argparse.Namespace(
                config=None, ref="http://r", target="http://t", golden=None, prompt=PROMPT, api_key_env=None
            )
            with pytest.raises(ConformanceError, match=r"debug protocol.*target") as info:
                await layers_cmd.run(args)
    finally:
        engine.close()
    assert info.value.exit_code == 2 and "reference" not in str(info.value)


def _run_in_current_loop(coro):  # noqa: ANN001, ANN202 - asyncio.run stand-in inside a running loop
    return coro


def test_cli_usage_errors() -> None:
    from difftest.cli.layers import run as layers_command
    from difftest.errors import UsageError

    with pytest.raises(UsageError):
        layers_command(
            argparse.Namespace(config=None, ref=None, target=None, golden=None, prompt=None, api_key_env=None)
        )
    with pytest.raises(UsageError):
        layers_command(
            argparse.Namespace(
                config=None, ref="x", target="ftp://y", golden=None, prompt=None, api_key_env=None
            )
        )


def test_two_models_are_not_diffed_module_by_module() -> None:
    """The bug: tiny-llama against tiny-moe got "local error in model.layers.3.self_attn.o_proj",
    a confident localisation of a difference that is the whole model."""
    from difftest.whitebox.layers import _model_mismatch

    llama = {"num_layers": 4, "modules": {"model.layers.0.mlp.up_proj": {}, "lm_head": {}}}
    assert _model_mismatch(llama, dict(llama)) == ""
    assert _model_mismatch(llama, {**llama, "num_layers": 2}) == "4 layers against 2"
    moe = {"num_layers": 4, "modules": {"model.layers.0.mlp.experts": {}, "lm_head": {}}}
    assert _model_mismatch(llama, moe) == "2 module(s) only one side has, e.g. model.layers.0.mlp.experts"


def test_two_servers_that_compute_alike_show_no_divergence() -> None:
    """Was "largest local error relative to its siblings: ... (0.00x their median, within budget)"."""
    from difftest.results import LayerPoint

    points = [LayerPoint(name=f"model.layers.{i}.mlp.up_proj", layer=i, kind="linear", cosine=1.0, norm_ratio=1.0,
                         rel_err=0.0, max_abs=0.0, sqnr_db=99.0, local_rel_err=0.0) for i in range(4)]  # fmt: skip
    assert (
        localisation_sentence(LayerDiff("reference", "accuracy", points=points))
        == "no divergence vs reference"
    )
