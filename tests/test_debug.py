"""server_shim.debug: the /debug/* routes in process (ASGITransport) over tiny-llama and tiny-moe."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server_shim.debug import create_debug_router
from server_shim.debug_capture import list_points
from server_shim.engine import Engine
from server_shim.models import LoadedModel, load_model


@contextlib.asynccontextmanager
async def client_for(loaded: LoadedModel, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The router alone on a bare FastAPI app over the real Engine (its model thread runs the hooks)."""
    engine = Engine(loaded)
    app = FastAPI()
    app.include_router(create_debug_router(engine, **kw))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            yield c
    finally:
        engine.close()


def meta_of(body: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n])["__metadata__"]


async def activations(loaded: LoadedModel, **req: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    async with client_for(loaded) as c:
        r = await c.post("/debug/activations", json=req)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return st_load(r.content), meta_of(r.content)


TOKENS = [1, 504, 3575, 282, 4649, 314, 7042, 30, 198, 1780]


async def test_residuals_equal_hidden_states(tiny_llama: LoadedModel) -> None:
    t, meta = await activations(tiny_llama, tokens=TOKENS, logits=True)
    with torch.inference_mode():
        ref = tiny_llama.model(torch.tensor([TOKENS]), output_hidden_states=True)
    hs = ref.hidden_states  # embeddings, blocks 0..2, then final-norm(block 3)
    torch.testing.assert_close(t["model.embed_tokens"], hs[0][0], rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(t[f"model.layers.{i}"], hs[i + 1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t["model.norm"], hs[4][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t["logits"], ref.logits[0], rtol=1e-6, atol=1e-6)
    assert json.loads(meta["token_ids"]) == TOKENS
    assert json.loads(meta["positions"]) == list(range(len(TOKENS)))
    points = json.loads(meta["points"])
    assert set(points) == set(list_points(tiny_llama.model)) == set(t)
    order = [
        points.index(f"model.layers.1.{p}") for p in ("self_attn.q_proj", "self_attn", "mlp.down_proj", "mlp")
    ]
    assert order == sorted(order) and points.index("model.layers.1.mlp") < points.index("model.layers.1")
    assert points[0] == "model.embed_tokens" and points[-2:] == ["model.norm", "logits"]
    assert "model.layers.3.mlp.down_proj" in points and "lm_head" not in points
    assert t["model.layers.3.self_attn.q_proj"].shape == (len(TOKENS), 128)
    assert t["model.layers.3.self_attn.k_proj"].shape == (len(TOKENS), 64)  # 2 kv heads x 32


async def test_sublayers_add_up_to_the_residual(tiny_llama: LoadedModel) -> None:
    t, _ = await activations(tiny_llama, tokens=TOKENS, layers=["model.layers.[12]", "model.layers.2.*"])
    assert set(t) == {
        "model.layers.1", "model.layers.2", "model.layers.2.self_attn", "model.layers.2.mlp",
        *(f"model.layers.2.self_attn.{p}_proj" for p in "qkvo"),
        *(f"model.layers.2.mlp.{p}_proj" for p in ("gate", "up", "down")),
    }  # fmt: skip
    block = t["model.layers.1"] + t["model.layers.2.self_attn"] + t["model.layers.2.mlp"]
    torch.testing.assert_close(block, t["model.layers.2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["model.layers.2.self_attn"], t["model.layers.2.self_attn.o_proj"])


async def test_positions_and_prompt(tiny_llama: LoadedModel) -> None:
    full, _ = await activations(tiny_llama, tokens=TOKENS, layers=["model.layers.3"])
    last, _ = await activations(tiny_llama, tokens=TOKENS, layers=["model.layers.3"], positions="last")
    some, meta = await activations(tiny_llama, tokens=TOKENS, layers=["model.layers.3"], positions=[0, -1, 4])
    assert json.loads(meta["positions"]) == [0, 9, 4]
    torch.testing.assert_close(last["model.layers.3"], full["model.layers.3"][-1:], rtol=0, atol=0)
    torch.testing.assert_close(some["model.layers.3"], full["model.layers.3"][[0, 9, 4]], rtol=0, atol=0)
    prompt = "The capital of France is"
    _, meta = await activations(tiny_llama, prompt=prompt, layers=["model.layers.0"])
    assert json.loads(meta["token_ids"]) == tiny_llama.tokenizer(prompt)["input_ids"]


async def test_inputs_replay_through_module_route(tiny_llama: LoadedModel) -> None:
    name = "model.layers.2.mlp.down_proj"
    t, meta = await activations(tiny_llama, tokens=TOKENS, layers=[name], inputs=True)
    assert json.loads(meta["inputs"]) == [f"{name}:input"]
    x = t[f"{name}:input"]
    assert x.shape == (len(TOKENS), 256)
    body = st_save({"input": x}, metadata={"module": name})
    async with client_for(tiny_llama) as c:
        r = await c.post("/debug/module", content=body)
    assert r.status_code == 200, r.text
    out = st_load(r.content)["output"]
    with torch.inference_mode():
        direct = tiny_llama.model.get_submodule(name)(x)
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    torch.testing.assert_close(out, t[name], rtol=1e-6, atol=1e-6)


async def test_moe_experts_and_block_replay(tiny_moe: LoadedModel) -> None:
    experts, mlp = "model.layers.2.mlp.experts", "model.layers.2.mlp"
    t, _ = await activations(tiny_moe, tokens=TOKENS, layers=[experts, mlp], inputs=True)
    assert t[f"{experts}:top_k_index"].dtype == torch.int64
    assert t[f"{experts}:top_k_weights"].shape == (len(TOKENS), 2)
    # routed_scaling_factor 2.5 is applied by the router, before the experts: the weights carry it.
    torch.testing.assert_close(t[f"{experts}:top_k_weights"].sum(-1), torch.full((len(TOKENS),), 2.5))
    async with client_for(tiny_moe) as c:
        routed = {k.split(":")[1]: v for k, v in t.items() if k.startswith(experts + ":")}
        r1 = await c.post("/debug/module", content=st_save(routed, metadata={"module": experts}))
        r2 = await c.post(
            "/debug/module", content=st_save({"input": t[f"{mlp}:input"]}, metadata={"module": mlp})
        )
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    torch.testing.assert_close(st_load(r1.content)["output"], t[experts], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st_load(r2.content)["output"], t[mlp], rtol=1e-6, atol=1e-6)


# transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns, then goes)
@pytest.mark.filterwarnings("error::FutureWarning")
async def test_decode_steps_equal_incremental_forward(tiny_llama: LoadedModel) -> None:
    steps = 4
    t, meta = await activations(tiny_llama, tokens=TOKENS, decode_steps=steps, logits=True, positions="last")
    decoded = json.loads(meta["decode_token_ids"])
    with torch.inference_mode():
        gen = tiny_llama.model.generate(torch.tensor([TOKENS]), max_new_tokens=steps, do_sample=False)
        seq = gen[0].tolist()
        assert decoded == seq[len(TOKENS) :]
        full = tiny_llama.model(torch.tensor([seq]), output_hidden_states=True)
    for s in range(steps):
        pos = len(TOKENS) + s  # decode step s feeds decoded[s] at this position
        assert seq[pos] == decoded[s]
        for i in range(3):
            got = t[f"decode.{s}.model.layers.{i}"]
            torch.testing.assert_close(got, full.hidden_states[i + 1][0, pos : pos + 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            t[f"decode.{s}.logits"], full.logits[0, pos : pos + 1], rtol=1e-4, atol=1e-4
        )
    assert t["logits"].shape == (1, 49152) and t["decode.0.model.layers.0.mlp.down_proj"].shape == (1, 128)


async def test_size_cap_is_413_naming_the_cap(tiny_llama: LoadedModel) -> None:
    async with client_for(tiny_llama, max_response_bytes=100_000) as c:
        r = await c.post("/debug/activations", json={"tokens": TOKENS, "logits": True})
        ok = await c.post("/debug/activations", json={"tokens": TOKENS, "layers": ["model.layers.0"]})
    assert r.status_code == 413
    err = r.json()["error"]
    assert "100000 bytes" in err["message"] and err["code"] == "response_too_large"
    assert ok.status_code == 200  # the cap is per response; the server still serves


async def test_config(tiny_moe: LoadedModel) -> None:
    async with client_for(tiny_moe) as c:
        r = await c.get("/debug/config")
    cfg = r.json()
    assert cfg["model"] == "tiny-moe" and cfg["dtype"] == "float32" and cfg["num_layers"] == 4
    assert cfg["arch"] == "cpu"
    assert cfg["decode"] == {"cuda_graphs": False, "fused": False}  # the CPU: eager, HF's attention
    mods = cfg["modules"]
    assert mods["model.layers.0"]["kind"] == "block"
    assert mods["model.layers.1.self_attn"]["kind"] == "attention"
    assert mods["model.layers.1.self_attn.kv_b_proj"] == {
        "kind": "linear", "scheme": "none", "weight_dtype": "float32", "weight_shape": [256, 128]
    }  # fmt: skip
    assert mods["model.layers.0.mlp"] == {"kind": "mlp", "moe": False}
    assert mods["model.layers.1.mlp"] == {"kind": "mlp", "moe": True}
    assert mods["model.layers.1.mlp.experts"]["kind"] == "moe"
    assert mods["model.layers.1.mlp.experts"]["weights"]["gate_up_proj"] == [8, 256, 128]
    assert mods["model.layers.1.mlp.gate"]["kind"] == "router"
    assert mods["model.norm"]["kind"] == "norm"


class FakeQuantLinear(torch.nn.Linear):
    """Stands in for QUANT's module: the debug routes only rely on the contract's methods."""

    def debug_info(self) -> dict[str, Any]:
        return {"kind": "linear", "scheme": "int8", "backend": "torch", "scale_shape": [128, 1]}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": torch.ones(128, 256, dtype=torch.int8), "scale": torch.full((128, 1), 0.5)}

    def stored_metadata(self) -> dict[str, str]:
        return {"scheme": "int8", "scale_layout": json.dumps({"order": "row-major", "shuffled": False})}


async def test_quant_route_and_config_of_quantized_module() -> None:
    lm = load_model("tiny-llama", device="cpu")
    old = lm.model.model.layers[0].mlp.down_proj
    new = FakeQuantLinear(256, 128, bias=False)
    new.weight = old.weight
    lm.model.model.layers[0].mlp.down_proj = new
    async with client_for(lm) as c:
        q = await c.get("/debug/quant/model.layers.0.mlp.down_proj")
        plain = await c.get("/debug/quant/model.layers.1.mlp.down_proj")
        missing = await c.get("/debug/quant/model.layers.9.mlp.down_proj")
        cfg = (await c.get("/debug/config")).json()
    assert q.status_code == 200
    tensors = st_load(q.content)
    assert tensors["qweight"].dtype == torch.int8 and float(tensors["scale"][0, 0]) == 0.5
    assert json.loads(meta_of(q.content)["scale_layout"])["order"] == "row-major"
    assert plain.status_code == 400 and "not quantized" in plain.json()["error"]["message"]
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "module"
    assert cfg["modules"]["model.layers.0.mlp.down_proj"]["scheme"] == "int8"


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"tokens": TOKENS, "layers": ["model.layers.99"]}, "layers", "matches no point"),
        ({"tokens": TOKENS, "layers": [""]}, "layers", "non-empty"),
        ({"tokens": TOKENS, "prompt": "x"}, "tokens", "exactly one"),
        ({}, "tokens", "exactly one"),
        ({"tokens": []}, "tokens", "empty"),
        ({"tokens": [1, 49152]}, "tokens", "outside the vocabulary"),
        ({"tokens": [1, -1]}, "tokens", "outside the vocabulary"),
        ({"tokens": [1] * 2049}, "tokens", "context length"),
        ({"tokens": TOKENS, "positions": [10]}, "positions", "outside the sequence"),
        ({"tokens": TOKENS, "positions": []}, "positions", "empty"),
        ({"tokens": TOKENS, "positions": "first"}, "positions", ""),
        ({"tokens": TOKENS, "decode_steps": -1}, "decode_steps", ""),
        ({"tokens": TOKENS, "logits": "yes"}, "logits", ""),
        ({"tokens": ["1"]}, "tokens.0", ""),
        ({"tokens": TOKENS, "layer": ["x"]}, "layer", ""),
    ],
)
async def test_bad_activation_requests(tiny_llama: LoadedModel, body: dict, param: str, needle: str) -> None:
    async with client_for(tiny_llama) as c:
        r = await c.post("/debug/activations", json=body)
        after = await c.post("/debug/activations", json={"tokens": [1, 2], "layers": ["model.layers.0"]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"]
    assert err["type"] == "invalid_request_error" and "code" in err
    assert after.status_code == 200


async def test_bad_module_requests(tiny_llama: LoadedModel) -> None:
    x = torch.zeros(2, 128)
    cases = [
        (b"not safetensors", 400, "body"),
        (st_save({"input": x}), 400, "module"),  # no metadata
        (st_save({"input": x}, metadata={"module": "model.layers.0.mlp.nope"}), 404, "module"),
        (st_save({"x": x}, metadata={"module": "model.layers.0.mlp.up_proj"}), 400, "input"),
        (
            st_save({"input": torch.zeros(2, 7)}, metadata={"module": "model.layers.0.mlp.up_proj"}),
            400,
            "input",
        ),
        (st_save({"input": x}, metadata={"module": "model.layers.0.self_attn"}), 400, "module"),
    ]
    async with client_for(tiny_llama) as c:
        for body, status, param in cases:
            r = await c.post("/debug/module", content=body)
            assert r.status_code == status, r.text
            assert r.json()["error"]["param"] == param
        bad_json = await c.post("/debug/activations", content=b"{nope")
        not_obj = await c.post("/debug/activations", json=[1, 2])
        form = await c.post(
            "/debug/activations",
            content=b'{"prompt": "hi"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert bad_json.status_code == 400 and "malformed JSON" in bad_json.json()["error"]["message"]
    assert form.status_code == 400 and form.json()["error"]["code"] == "invalid_content_type"
    assert not_obj.status_code == 400


async def test_real_quantized_model_points_and_quant_route() -> None:
    pytest.importorskip("server_shim.quant.moe")  # quantize_model needs it (QUANT's module)
    from server_shim.quant.linear import quantize_model

    lm = load_model("tiny-llama", device="cpu")
    quantize_model(lm.model, scheme="int8", backend="torch")
    name = "model.layers.1.self_attn.v_proj"
    async with client_for(lm) as c:
        q = await c.get(f"/debug/quant/{name}")
        cfg = (await c.get("/debug/config")).json()
        r = await c.post("/debug/activations", json={"tokens": TOKENS, "layers": [name], "inputs": True})
        head = await c.get("/debug/quant/lm_head")
    assert q.status_code == 200 and st_load(q.content)["weight"].dtype == torch.int8
    assert meta_of(q.content)["scheme"] == "int8"
    info = cfg["modules"][name]
    assert info["kind"] == "linear" and info["scheme"] == "int8" and "fault" not in json.dumps(cfg)
    assert cfg["points"] == list_points(
        load_model("tiny-llama", device="cpu").model
    )  # names survive the swap
    t = st_load(r.content)
    with torch.inference_mode():
        direct = lm.model.get_submodule(name)(t[f"{name}:input"])
    torch.testing.assert_close(t[name], direct, rtol=1e-6, atol=1e-6)
    assert head.status_code == 400  # lm_head stays unquantized by default


async def test_real_quantized_moe_experts_replay() -> None:
    pytest.importorskip("server_shim.quant.moe")
    from server_shim.quant.linear import quantize_model

    lm = load_model("tiny-moe", device="cpu")
    quantize_model(lm.model, scheme="int4-g128", backend="torch")
    experts = "model.layers.3.mlp.experts"
    async with client_for(lm) as c:
        r = await c.post("/debug/activations", json={"tokens": TOKENS, "layers": [experts], "inputs": True})
        t = st_load(r.content)
        routed = {k.split(":")[1]: v for k, v in t.items() if k.startswith(experts + ":")}
        rep = await c.post("/debug/module", content=st_save(routed, metadata={"module": experts}))
        q = await c.get(f"/debug/quant/{experts}")
        cfg = (await c.get("/debug/config")).json()
    assert set(routed) == {"input", "top_k_index", "top_k_weights"}
    torch.testing.assert_close(st_load(rep.content)["output"], t[experts], rtol=1e-6, atol=1e-6)
    assert q.status_code == 200 and len(st_load(q.content)) > 0
    assert cfg["modules"][experts]["kind"] == "moe" and cfg["modules"][experts]["scheme"] == "int4-g128"


async def test_through_create_app_with_api_key(tiny_llama: LoadedModel) -> None:
    from server_shim.app import create_app
    from server_shim.options import ServeOptions

    engine = Engine(tiny_llama)
    try:
        for debug in (True, False):
            app = create_app(engine, ServeOptions(model="tiny-llama", debug=debug, api_key="k"))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                anon = await c.get("/debug/config")
                cfg = await c.get("/debug/config", headers={"Authorization": "Bearer k"})
                act = await c.post(
                    "/debug/activations",
                    json={"tokens": [1, 2, 3], "layers": ["model.layers.0"]},
                    headers={"Authorization": "Bearer k"},
                )
            assert anon.status_code == 401
            if debug:
                assert cfg.status_code == 200 and cfg.json()["num_layers"] == 4
                assert st_load(act.content)["model.layers.0"].shape == (3, 128)
            else:
                assert cfg.status_code == 404 and act.status_code == 404
    finally:
        engine.close()


async def test_module_replay_answers_within_the_response_cap(tiny_llama: LoadedModel) -> None:
    """The bug: /debug/module had no cap: 1400 rows through lm_head answered 263 MiB from a
    0.7 MB request. Now a linear's output is sized before it runs (413 naming the cap)."""
    x = torch.zeros(1, 300, tiny_llama.model.get_submodule("lm_head").in_features)  # 300 x 49152 x 4 > 1 MB
    body = st_save({"input": x}, metadata={"module": "lm_head"})
    async with client_for(tiny_llama, max_response_bytes=1_000_000) as c:
        big = await c.post("/debug/module", content=body)
        small = await c.post(
            "/debug/module", content=st_save({"input": x[:, :2]}, metadata={"module": "lm_head"})
        )
    assert big.status_code == 413 and big.json()["error"]["code"] == "response_too_large"
    assert "1000000 bytes" in big.json()["error"]["message"] and small.status_code == 200


async def test_positions_are_sized_before_they_are_copied(tiny_llama: LoadedModel) -> None:
    """The bug: 3 million repeated positions allocated 549 GB before the cap was checked (a 500);
    thousands allocated gigabytes. Repeats are refused; a large list is a 413 before any copy."""
    async with client_for(tiny_llama, max_response_bytes=1_000_000) as c:
        twice = await c.post("/debug/activations", json={"tokens": TOKENS, "positions": [0, 0]})
        many = await c.post("/debug/activations", json={"tokens": TOKENS * 100, "positions": list(range(1000)),
                                                        "logits": True})  # fmt: skip
    assert twice.status_code == 400 and "names a position twice" in twice.json()["error"]["message"]
    assert many.status_code == 413


async def test_a_debug_prompt_over_the_character_cap_is_refused_before_tokenizing(
    tiny_llama: LoadedModel,
) -> None:
    async with client_for(tiny_llama, max_prompt_chars=100) as c:
        r = await c.post("/debug/activations", json={"prompt": "ab " * 50})
    assert r.status_code == 400 and "at most 100 (--max-prompt-chars)" in r.json()["error"]["message"]


async def test_debug_jobs_in_flight_are_bounded() -> None:
    """Unbounded, queued debug jobs stalled generation for every client and slow readers of their
    answers grew memory without limit: past MAX_DEBUG_JOBS in flight a request gets a 429."""
    import asyncio

    from server_shim.debug import _DebugSlots

    slots, gate = _DebugSlots(limit=2), asyncio.Event()

    class Engine:
        async def run_exclusive(self, fn):  # noqa: ANN001, ANN202
            await gate.wait()
            return fn()

    held = [asyncio.create_task(slots.run(Engine(), lambda: b"x")) for _ in range(2)]
    await asyncio.sleep(0)
    over = await slots.run(Engine(), lambda: b"x")
    gate.set()
    done = await asyncio.gather(*held)
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200] and slots.busy == 0
    assert (await slots.run(Engine(), lambda: b"x")).status_code == 200


async def test_a_debug_client_that_hangs_up_frees_its_slot_and_cancels_its_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiting debug request whose client disconnected cancels its job (queued, it never runs) and
    frees its slot: an interrupted `difftest layers -j 8` left its forwards queued on the model thread
    ahead of generation."""
    import asyncio

    from server_shim import debug
    from server_shim.debug import _DebugSlots

    slots, gate, cancelled = _DebugSlots(limit=1), asyncio.Event(), []

    class Engine:
        async def run_exclusive(self, fn):  # noqa: ANN001, ANN202
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return fn()

    class Request:
        gone = False
        url = type("U", (), {"path": "/debug/activations"})()

        async def is_disconnected(self) -> bool:
            return self.gone

    request = Request()
    monkeypatch.setattr(debug, "DISCONNECT_POLL_S", 0.01)
    waiting = asyncio.create_task(slots.run(Engine(), lambda: b"x", request))
    await asyncio.sleep(0.05)
    assert not waiting.done() and slots.busy == 1  # a client still there keeps waiting
    request.gone = True
    response = await asyncio.wait_for(waiting, 5)
    assert response.status_code == debug.CLIENT_GONE and cancelled == [True] and slots.busy == 0
    gate.set()
    assert (await slots.run(Engine(), lambda: b"x", Request())).status_code == 200  # the slot is free
