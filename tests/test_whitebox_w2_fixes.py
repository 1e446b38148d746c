"""White-box fixes (tester t5: items 1, 4, 6, 8, 9): activations fetched in chunks under the
response caps, embeddings / final norm as first divergent points, the accumulated-error check
without replay, a /debug/config that was not answered, one limit for flagging and judging, and
the reports' per-layer values.

In process: debug routers over tiny-llama through ASGITransport (as tests/test_layers.py)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI

from difftest import runner
from difftest.client import CompletionClient
from difftest.collect import Endpoint
from difftest.conformance import Capabilities, probe_debug
from difftest.errors import ConformanceError, InfraError, RequestRejected, ServerError
from difftest.judge import _layer_parts
from difftest.null import NullModel
from difftest.report.heatmap import error_exponent, layer_grid
from difftest.report.plotdata import layer_profile
from difftest.report.words import check_words
from difftest.results import Check, LayerDiff, LayerPoint, PartVerdict, RunResult, TargetResult
from difftest.session import require_debug
from difftest.whitebox.activations import (
    LayerThresholds,
    compare_points,
    fetch_activations,
    first_divergence,
    point_kind,
)
from difftest.whitebox.layers import diff_layers, layer_verdict
from difftest.whitebox.localise import TargetLocalisation
from server_shim.models import LoadedModel, load_model

PROMPT = "The capital of France is Paris. The capital of Germany is"
BODY = {"prompt": PROMPT, "inputs": True, "logits": True, "decode_steps": 2}


class Sizes(httpx.AsyncBaseTransport):
    """An ASGI transport that records each answer's size (what the client had to take)."""

    def __init__(self, app: FastAPI) -> None:
        self.inner, self.sizes = httpx.ASGITransport(app=app), []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        body = await resp.aread()
        if request.url.path.endswith("/activations"):
            self.sizes.append((resp.status_code, len(body)))
        return httpx.Response(resp.status_code, headers=resp.headers, content=body)


@contextlib.asynccontextmanager
async def endpoint(
    loaded: LoadedModel, *, cap: int = 64 * 2**20, server_cap: int | None = None, name: str = "golden"
) -> AsyncIterator[tuple[Endpoint, Sizes]]:
    from server_shim.debug import create_debug_router
    from server_shim.engine import Engine

    engine = Engine(loaded)
    app = FastAPI()
    app.include_router(create_debug_router(engine, max_response_bytes=server_cap))
    sizes = Sizes(app)
    client = CompletionClient("http://test", name=name, transport=sizes, max_retries=0, timeout_s=600,
                              max_response_bytes=cap)  # fmt: skip
    try:
        yield (
            Endpoint(name, client, Capabilities(name=name, url="http://test", model=None, debug=True)),
            sizes,
        )
    finally:
        await client.aclose()
        engine.close()


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny-llama", dtype="float32", device="cpu")


def _same(a, b) -> None:  # noqa: ANN001 - two Activations
    assert a.token_ids == b.token_ids and a.decode_ids == b.decode_ids and a.points == b.points
    assert set(a.st.tensors) == set(b.st.tensors)
    for k, v in a.st.tensors.items():
        np.testing.assert_array_equal(v, b.st.tensors[k], err_msg=k)


# ---------------------------------------------------------------- item 1: chunks under the caps


async def test_activations_over_the_client_cap_come_in_chunks_under_it(tiny: LoadedModel) -> None:
    """The bug: one answer of everything; over the client's 64 MiB it was an error (smollm2: 42
    tokens). Now the same tensors come in chunks, none over the cap. 1 MB here: the logits alone
    (13 rows x 49152 floats) are over it, so a point is split by positions too."""
    async with endpoint(tiny) as (whole_ep, _):
        whole = await fetch_activations(whole_ep, BODY)
    cap = 1_000_000
    async with endpoint(tiny, cap=cap) as (ep, sizes):
        got = await fetch_activations(ep, BODY)
    _same(got, whole)
    assert got.positions is None and not got.notes
    used = [n for status, n in sizes.sizes if status == 200 and n <= cap]  # the client takes no other
    assert sizes.sizes[0][1] > cap and len(used) > 3


async def test_a_server_cap_under_ours_is_met_by_halving(tiny: LoadedModel) -> None:
    """A server whose own cap (413) is smaller than the client's: the planned chunks are halved."""
    async with endpoint(tiny) as (whole_ep, _):
        whole = await fetch_activations(whole_ep, BODY)
    async with endpoint(tiny, server_cap=600_000) as (ep, sizes):
        got = await fetch_activations(ep, BODY)
    _same(got, whole)
    assert any(status == 413 for status, _ in sizes.sizes)


async def test_over_the_memory_budget_the_last_positions_are_kept(tiny: LoadedModel) -> None:
    async with endpoint(tiny, cap=1_000_000) as (ep, _):
        got = await fetch_activations(ep, BODY, budget=3_000_000)
    n = len(got.token_ids)
    kept = got.positions
    assert kept is not None and 0 < len(kept) < n and kept == list(range(n - len(kept), n))
    assert got.st.tensors["logits"].shape[0] == len(kept)
    assert got.st.tensors["model.layers.0.mlp.down_proj:input"].shape[0] == len(kept)
    assert "the last" in got.notes[0] and "positions are compared" in got.notes[0]


async def test_a_fault_is_localised_through_chunks(tiny: LoadedModel) -> None:
    """diff_layers end to end with a 1 MB cap: the fault is found as with one answer."""
    from server_shim.quant.linear import quantize_model

    gold = load_model("tiny-llama", dtype="float32", device="cpu")
    tgt = load_model("tiny-llama", dtype="float32", device="cpu")
    quantize_model(gold.model, scheme="fp8-block", backend="torch", faults=[])
    quantize_model(tgt.model, scheme="fp8-block", backend="torch",
                   faults=["fnuz-unnormalized@model.layers.1.mlp.down_proj"])  # fmt: skip
    async with endpoint(gold, cap=1_000_000) as (g, _), endpoint(tgt, cap=1_000_000, name="target") as (t, _):
        diff = await diff_layers(g, t, PROMPT, kind="exactness")
    assert not diff.not_made, diff.warnings
    assert diff.guilty_module == "model.layers.1.mlp.down_proj"


async def test_one_point_at_one_position_over_the_cap_names_the_cause(tiny: LoadedModel) -> None:
    from difftest.errors import ResponseTooLarge

    async with endpoint(tiny, cap=100_000) as (ep, _):  # one row of logits: 196 kB
        with pytest.raises(ResponseTooLarge, match="point logits alone, at one position"):
            await fetch_activations(ep, BODY)


def test_execution_order_puts_a_composite_after_its_points() -> None:
    from difftest.whitebox.activations import execution_order

    names = ["model.embed_tokens", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.self_attn.q_proj",
             "model.layers.0.mlp", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.norm", "logits"]  # fmt: skip
    assert execution_order(names) == [
        "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn",
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp", "model.layers.0", "model.layers.1.mlp.up_proj",
        "model.norm", "logits",
    ]  # fmt: skip


def test_a_diff_never_made_is_skipped_for_its_real_cause() -> None:
    """The bug: "no module could be replayed" for a diff whose activations were over the cap."""
    cause = (
        "activations unavailable: golden: POST /debug/activations response of 90351056 bytes exceeds the cap"
    )
    diff = LayerDiff("golden", "exactness", warnings=[cause], not_made="failed",
                     summary="layer diff not made (activations unavailable)")  # fmt: skip
    part = layer_verdict(diff)
    assert part.skipped == f"layer diff not made: {cause}"


# ---------------------------------------------------------------- item 6: accumulated error without replay


def _pt(
    name: str, layer: int | None, kind: str, rel: float, flagged: bool = False, cos: float = 1.0
) -> LayerPoint:
    return LayerPoint(name, layer, kind, cos, 1.0, rel, rel, 0.0, flagged=flagged)


def test_without_replay_the_accumulated_error_still_judges() -> None:
    points = [_pt("model.layers.0", 0, "residual", 0.01), _pt("model.layers.2", 2, "residual", 0.161),
              _pt("model.layers.2.mlp.up_proj", 2, "linear", 0.5)]  # fmt: skip
    diff = LayerDiff("golden", "exactness", points=points,
                     warnings=["replay of model.layers.0.self_attn.q_proj failed: HTTP 404"],
                     replays_unjudged={"refused": 1})  # fmt: skip
    part = layer_verdict(diff, LayerThresholds(exact_point_rel_err=0.05))
    assert part.skipped is None and not part.passed
    local, point = part.checks
    assert local.name == "local_rel_err_max" and local.value is None and not local.fails
    assert "replay of model.layers.0.self_attn.q_proj failed" in local.note
    assert (point.name, point.value, point.note.split(";")[0]) == (
        "point_rel_err_max",
        0.161,
        "model.layers.2",
    )
    assert point.fails
    acc = layer_verdict(LayerDiff("ref", "accuracy", points=points))  # no residual check against FP16
    assert acc.skipped == "no module could be replayed"


# ---------------------------------------------------------------- item 4: embeddings and the final norm


def test_point_kinds_of_the_embeddings_and_final_norm() -> None:
    assert point_kind("model.embed_tokens") == "embedding" and point_kind("model.norm") == "norm"
    assert point_kind("decode.model.norm") == "norm"


def test_a_divergence_in_the_embeddings_or_final_norm_is_named_there() -> None:
    emb = [_pt("model.embed_tokens", None, "embedding", 0.3, True), _pt("model.layers.0", 0, "residual", 0.24, True),
           _pt("logits", None, "logits", 0.2, True)]  # fmt: skip
    assert first_divergence(emb) == (None, "model.embed_tokens")
    norm = [_pt("model.layers.3", 3, "residual", 0.0), _pt("decode.logits", None, "logits", 0.5, True),
            _pt("logits", None, "logits", 0.5, True), _pt("model.norm", None, "norm", 0.5, True)]  # fmt: skip
    assert first_divergence(norm) == (None, "model.norm")
    mixed = [
        _pt("model.embed_tokens", None, "embedding", 0.0),
        _pt("model.layers.1", 1, "residual", 0.2, True),
    ]
    assert first_divergence(mixed) == (1, "model.layers.1")


async def test_an_embedding_table_off_by_30_percent_is_flagged_at_the_embeddings(tiny: LoadedModel) -> None:
    """The bug: point_flagged judged only residual and logits points, so the sentence said "first
    divergent layer 0" for an embedding table x1.3 (the final norm: "first divergent point logits")."""
    tgt = load_model("tiny-llama", dtype="float32", device="cpu")
    with torch.no_grad():
        tgt.model.get_input_embeddings().weight.mul_(1.3)
    async with endpoint(tiny) as (g, _), endpoint(tgt, name="target") as (t, _):
        base = await fetch_activations(g, {"prompt": PROMPT, "logits": True})
        other = await fetch_activations(t, {"tokens": base.token_ids, "logits": True})
    points, _ = compare_points(base, other, kind="exactness", scheme=None, th=LayerThresholds())
    emb = next(p for p in points if p.name == "model.embed_tokens")
    assert emb.kind == "embedding" and emb.flagged and math.isclose(emb.norm_ratio, 1.3, rel_tol=1e-5)
    assert first_divergence(points) == (None, "model.embed_tokens")


# ---------------------------------------------------------------- item 8: /debug/config not answered


class _DebugConfigFails:
    """A client whose GET /debug/config raises `exc`, as the real one does after its retries."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def debug_config(self, *, retries: int | None = None) -> dict:
        raise self.exc


async def _ep(name: str, exc: RequestRejected | ServerError) -> Endpoint:
    """The endpoint the probe makes of that failure (conformance.probe_debug, both probes' reader)."""
    fields, _, err = await probe_debug(_DebugConfigFails(exc))  # type: ignore[arg-type]
    caps = Capabilities(name=name, url=f"http://{name}", model=None,
                        checks=(("debug protocol", "warn", err.reason),), **fields)  # fmt: skip
    return Endpoint(name, None, caps)  # type: ignore[arg-type]


def _server_error(reason: str, status: int | None = None) -> ServerError:
    return ServerError(
        f"target: GET /debug/config: {reason}", server="target", status_code=status, reason=reason
    )


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (_server_error("timed out after 2s (TimeoutError)"), InfraError),
        (_server_error("connection failed (ConnectError)"), InfraError),
        (_server_error("HTTP 503: busy", 503), InfraError),
        (
            RequestRejected("404", server="target", status_code=404, reason="HTTP 404: Not Found"),
            ConformanceError,
        ),
        (_server_error("HTTP 500: Internal Server Error", 500), ConformanceError),
    ],
)
async def test_a_debug_config_not_answered_is_infrastructure(exc: ServerError, error: type) -> None:
    detail = exc.reason
    target = await _ep("target", exc)
    with pytest.raises(error) as info:
        require_debug({"target": target}, ["target"])
    assert detail in str(info.value)
    assert ("--debug" in str(info.value)) == (error is ConformanceError)
    assert type(info.value) is error


# ---------------------------------------------------------------- item 9: one limit, words, one value per layer


def test_flagging_and_judging_use_one_point_limit() -> None:
    """The bug: the run flagged residual points past max(0.05, null limit), the verdict failed them
    past the null limit (0.03): a point at 0.046 failed and was never "first divergent"."""
    from difftest.judge import layer_thresholds

    null = NullModel("twin", "twin", "full", point_rel_err=1e-6)
    th = layer_thresholds("float32", null, 3.0)
    assert th.exact_point_rel_err == 0.03  # the absolute minimum won
    t = TargetResult("t", "fp8-block", "fail", golden="g", dtype="float32",
                     layers=[LayerDiff("g", "exactness", points=[_pt("logits", None, "logits", 0.046)])])  # fmt: skip
    (part,) = _layer_parts(t, null, "fp8-block", 3.0)
    check = next(c for c in part.checks if c.name == "point_rel_err_max")
    assert check.limit == th.exact_point_rel_err and check.fails


async def test_the_run_flags_with_the_judged_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """runner._whitebox flags with the bound `_layer_parts` judges with (0.03 here, not 0.05)."""
    seen = {}

    async def fake_localise(target, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.update(kw)
        return TargetLocalisation()

    monkeypatch.setattr(runner, "localise_target", fake_localise)
    eps = {n: Endpoint(n, SimpleNamespace(base_url=f"http://{n}", from_baseline=False),  # type: ignore[arg-type]
                       Capabilities(name=n, url="", model=None, debug=True)) for n in ("t", "g", "ref")}  # fmt: skip
    cfg = SimpleNamespace(thresholds_for=lambda s: {}, run=SimpleNamespace(batch_slot_check=False, whitebox="on"),
                          reference=SimpleNamespace(name="ref"))  # fmt: skip
    tcfg = SimpleNamespace(name="t", golden=SimpleNamespace(name="g"))
    result = TargetResult("t", "fp8-block", "fail", golden="g", dtype="float32")
    null = NullModel("twin", "twin", "full", point_rel_err=1e-6)
    prompts = [SimpleNamespace(prompt="x")]
    await runner._whitebox(cfg, tcfg, eps, prompts, result, {}, null)  # type: ignore[arg-type]
    judged = _layer_parts(result, null, "fp8-block", 3.0)  # no layers yet: nothing judged
    assert judged == [] and seen["thresholds"].exact_point_rel_err == 0.03


def test_a_check_at_logits_reads_at_logits() -> None:
    c = Check(
        "point_rel_err_max",
        0.04639,
        0.03,
        "<=",
        False,
        note="logits; accumulated vs golden; absolute minimum 0.03",
    )
    words = check_words(PartVerdict("layers-exactness", "g", (c,)), c)
    assert words.where == "logits"
    assert "> limit 0.03 at logits (limit: accumulated vs golden; absolute minimum 0.03)" in words.sentence()


def test_heatmap_and_plot_show_the_worse_of_prefill_and_decode() -> None:
    """The bug: report.md's heatmap showed the prefill residual, report.html's plot the worse of
    prefill and decode: one layer read two ways. Both now show the worse."""
    pts = [_pt("model.layers.0", 0, "residual", 0.001, cos=0.999),
           _pt("decode.model.layers.0", 0, "residual", 0.01, cos=0.99)]  # fmt: skip
    diff = LayerDiff("ref", "accuracy", points=pts)
    t = TargetResult("t", "fp8-block", "pass", layers=[diff])
    grid = layer_grid(RunResult("ref", targets=[t]))
    assert grid is not None and grid.values[0][0] == pytest.approx(error_exponent(0.99))
    profile = layer_profile(t, diff)
    assert profile is not None and profile.accumulated[0] == pytest.approx(1 - 0.99)
