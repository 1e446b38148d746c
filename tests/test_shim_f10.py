"""Shim server fixes (tester reports t13 1-4, t14 8): a token-id prompt ending inside a character,
API keys beyond Latin-1, --max-model-len on the debug routes, the startup line's port, and the
bounds of the shim's seed.

The prompt of the first group is t13's repro: "Chinese: 世界和平" through smollm2's tokenizer (tiny-llama
shares it) without its last token, so it ends with the first two of 平's three bytes; the three
generated ids are what smollm2 generated there: 128 completes 平, 18614 and 119 are 天's bytes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from server_shim.detok import IncrementalDetokenizer
from server_shim.models import LoadedModel, load_model, smollm2_tokenizer

GENERATED = [128, 18614, 119]


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def cut_prompt(tok) -> list[int]:  # noqa: ANN001
    ids = tok("Chinese: 世界和平")["input_ids"]
    assert ids[-1] == GENERATED[0]  # the repro's split: the last token is 平's last byte
    return ids[:-1]


# ----------------------------------------------------------------------------- T13-1 detok


def _pieces(tokenizer: Any, prompt: list[int], generated: list[int]) -> list[str]:
    det = IncrementalDetokenizer(tokenizer, prompt)
    return [det.push(t, None, None).text for t in generated]


def _vllm_v1(tok: Any, prompt: list[int], generated: list[int]) -> str:
    """vLLM V1's FastIncrementalDetokenizer: a DecodeStream primed with the prompt."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    for t in prompt:
        stream.step(tok._tokenizer, t)
    return "".join(stream.step(tok._tokenizer, t) or "" for t in generated)


def test_the_token_completing_a_prompts_last_character_releases_it(tok, cut_prompt) -> None:  # noqa: ANN001
    """Was ['', '', '天']: the context was seeded as read, '和\ufffd', so 平 was never released."""
    assert _pieces(tok, cut_prompt, GENERATED) == ["平", "", "天"]
    assert _vllm_v1(tok, cut_prompt, GENERATED) == "平天"


@pytest.mark.parametrize("fast", [False, True], ids=["hf", "rust"])
def test_pieces_equal_vllm_v1_for_prompts_cut_anywhere(tok, fast: bool) -> None:  # noqa: ANN001
    """Every split of a multilingual text into prompt and generation (t13's second case, 世界 cut
    after 世's first bytes, among them) gives vLLM V1's text."""
    from server_shim.fast_decode import backend_decoder

    t = backend_decoder(tok) if fast else tok
    ids = tok("世界, naïve 🦀 Привет 日本語 ok")["input_ids"]
    for cut in range(1, len(ids)):
        prompt, generated = ids[:cut], ids[cut:]
        assert "".join(_pieces(t, prompt, generated)) == _vllm_v1(tok, prompt, generated), cut


def test_a_prompts_own_incomplete_bytes_are_not_flushed_as_completion_text(tok, cut_prompt) -> None:  # noqa: ANN001
    """An EOS straight after the prompt: nothing generated, so nothing (no U+FFFD) to release."""
    det = IncrementalDetokenizer(tok, cut_prompt)
    assert det.flush() == ""
    x = tok("x")["input_ids"][0]  # not the completing byte: the stray bytes show, as in vLLM V1
    assert det.push(x, None, None).text == "\ufffdx" == _vllm_v1(tok, cut_prompt, [x])
    assert det.flush() == ""


class _Successor:
    """Hooks that make a model's greedy next token a fixed function of the current token (the rest
    of the model still runs): the base's hidden state carries the input id, lm_head maps it."""

    def __init__(self, loaded: LoadedModel, succ: dict[int, int]) -> None:
        vocab = loaded.model.get_input_embeddings().num_embeddings
        self.table = torch.zeros(vocab, dtype=torch.long)  # any other token: id 0
        for a, b in succ.items():
            self.table[a] = b
        loaded.model.get_decoder().register_forward_hook(self._ids_in_hidden, with_kwargs=True)
        loaded.model.get_output_embeddings().register_forward_hook(self._logits)

    @staticmethod
    def _ids_in_hidden(_mod: Any, _args: Any, kwargs: dict, out: Any) -> Any:
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        hidden.zero_()
        hidden[..., 0] = kwargs["input_ids"].to(hidden.dtype)
        return out

    def _logits(self, _mod: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        ids = args[0][..., 0].round().long().cpu()
        logits = torch.full(out.shape, -30.0, dtype=out.dtype)
        logits.scatter_(-1, self.table[ids].unsqueeze(-1), 0.0)
        return logits.to(out.device)


@pytest.fixture(scope="module")
def scripted_engine(cut_prompt):  # noqa: ANN001, ANN201 - a generator fixture
    """An Engine over its own tiny-llama whose greedy tokens after the cut prompt are GENERATED."""
    from server_shim.engine import Engine

    loaded = load_model("tiny-llama", dtype="float32", device="cpu")  # its own copy: hooked
    _Successor(loaded, dict(zip([cut_prompt[-1], *GENERATED[:-1]], GENERATED, strict=True)))
    engine = Engine(loaded)
    yield engine
    engine.close()


@pytest.fixture
async def scripted_client(scripted_engine) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ANN001
    from server_shim.app import create_app
    from server_shim.options import ServeOptions

    app = create_app(scripted_engine, ServeOptions(model="tiny-llama"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shim", timeout=60
    ) as c:
        yield c


def _body(prompt: list[int], **kw: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3, "temperature": 0, **kw}


async def test_completion_text_has_the_completed_character_stream_and_not(
    scripted_client, cut_prompt
) -> None:  # noqa: ANN001
    """t13 finding 1 through the HTTP API: was '天' in both forms."""
    r = await scripted_client.post(
        "/v1/completions", json=_body(cut_prompt, logprobs=0, return_tokens_as_token_ids=True)
    )
    choice = r.json()["choices"][0]
    assert [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]] == GENERATED
    assert choice["text"] == "平天"
    r = await scripted_client.post("/v1/completions", json=_body(cut_prompt, stream=True))
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "平天"


async def test_echo_is_the_prompts_text_then_the_completion(scripted_client, cut_prompt, tok) -> None:  # noqa: ANN001
    """As vLLM's echo: the prompt's decoded text (its stray bytes as U+FFFD), then the text."""
    r = await scripted_client.post("/v1/completions", json=_body(cut_prompt, echo=True, logprobs=0))
    choice = r.json()["choices"][0]
    assert choice["text"] == tok.decode(cut_prompt) + "平天" == "Chinese: 世界和\ufffd平天"
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]


# ----------------------------------------------------------------------------- T13-2 API key

KEY = "密码密码密码密码"


async def _status(key: str, header: bytes | None) -> int:
    from server_shim.middleware import GuardMiddleware

    async def ok(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = GuardMiddleware(ok, api_key=key, max_body_bytes=1024)
    headers = {} if header is None else {"Authorization": header}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shim") as c:
        return (await c.get("/v1/models", headers=headers)).status_code


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (f"Bearer {KEY}".encode(), 200),  # UTF-8, as curl sends it: was 401
        (b"Bearer " + b"?" * len(KEY), 401),  # was 200: the key had become question marks
        (f"Bearer {KEY}".encode("utf-16-le"), 401),
        (b"bearer " + KEY.encode(), 200),
        (None, 401),
    ],
    ids=["utf8", "question-marks", "utf16", "scheme-case", "none"],
)
async def test_a_non_latin1_key_is_compared_as_utf8_bytes(header: bytes | None, status: int) -> None:
    assert await _status(KEY, header) == status


async def test_a_latin1_key_is_its_utf8_bytes_too() -> None:
    assert await _status("café", "Bearer café".encode()) == 200
    assert await _status("café", "Bearer café".encode("latin-1")) == 401


@pytest.mark.parametrize("key", ["abc\n", " abc", "abc\t", "a\x01b", "a\rb", "a\x7fb"])
def test_a_key_no_header_can_carry_refuses_to_start(
    key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server_shim.__main__ import main
    from server_shim.errors import ShimError
    from server_shim.middleware import GuardMiddleware

    monkeypatch.setenv("DIFFTEST_SHIM_API_KEY", key)
    # --backend triton without a quant is refused before the model loads too, a later check: a
    # server that let the key past stops there, never serving
    assert main(["serve", "--model", "tiny-llama", "--device", "cpu", "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("server_shim: error: $DIFFTEST_SHIM_API_KEY: the API key ") and err.count("\n") == 1
    with pytest.raises(ShimError):
        GuardMiddleware(None, api_key=key, max_body_bytes=1)


# ----------------------------------------------------------------------------- T13-3 debug routes


async def test_max_model_len_applies_to_the_debug_routes() -> None:
    """Was: /debug/config said 2048 and /debug/activations ran what /v1/completions refuses."""
    from server_shim.app import create_app
    from server_shim.options import ServeOptions
    from server_shim.serve import build_engine

    opts = ServeOptions(model="tiny-llama", dtype="float32", device="cpu", debug=True, max_model_len=64)
    engine = build_engine(opts)
    try:
        transport = httpx.ASGITransport(app=create_app(engine, opts))
        async with httpx.AsyncClient(transport=transport, base_url="http://shim", timeout=60) as c:
            assert (await c.get("/debug/config")).json()["context_length"] == 64
            body = {"tokens": list(range(100, 163)), "layers": ["logits"], "positions": "last"}
            assert (await c.post("/debug/activations", json={**body, "decode_steps": 1})).status_code == 200
            r = await c.post("/debug/activations", json={**body, "decode_steps": 2})
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == "tokens"
            assert "exceed the context length 64" in error["message"]
            r = await c.post("/v1/completions", json=_body(list(range(100, 163)), max_tokens=2))
            assert r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        engine.close()


# ----------------------------------------------------------------------------- T13-4 startup line


async def _empty_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@contextlib.contextmanager
def _serve_in_thread(port: int) -> Iterator[tuple[Any, list[int]]]:
    """A ShimServer on `port` in a thread (uvicorn's SystemExit stays there); yields it and the
    exit codes it raised, and stops it."""
    from server_shim.serve import ShimServer

    config = uvicorn.Config(_empty_app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    server = ShimServer(config, "m", "cpu, float32")
    codes: list[int] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:
            codes.append(int(exc.code or 0))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield server, codes
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_startup_line_names_the_port_bound(caplog: pytest.LogCaptureFixture) -> None:
    """Was "serving m on http://127.0.0.1:0", logged before the bind."""
    caplog.set_level("INFO", logger="server_shim.serve")
    with _serve_in_thread(0) as (server, _codes):
        port = server.bound_port()
        assert port != 0 and httpx.get(f"http://127.0.0.1:{port}/", trust_env=False).status_code == 204
        assert f"serving m on http://127.0.0.1:{port} (cpu, float32)" in caplog.messages


def test_no_serving_line_for_a_port_in_use(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="server_shim.serve")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with _serve_in_thread(busy.getsockname()[1]) as (server, codes):
            pass
    assert codes == [3] and not server.started  # uvicorn's startup failure: exit 3, as README says
    assert not [m for m in caplog.messages if m.startswith("serving")]


# ----------------------------------------------------------------------------- T14-8 seed bounds


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_the_shims_seed_flag_is_bounded(seed: str, capsys: pytest.CaptureFixture[str]) -> None:
    from server_shim.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "tiny-llama", "--seed", seed, "--backend", "triton"])  # see above
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--seed must be" in err and seed in err


def test_a_target_seed_past_2_64_is_a_config_line(tmp_path: Path) -> None:
    """t14 finding 8: was accepted, then the shim crashed loading (difftest exit 3, a traceback)."""
    from difftest.config import load_config
    from difftest.errors import ConfigError

    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    path = tmp_path / "x.toml"
    path.write_text(
        '[run]\nprompts = "p.jsonl"\n\n[reference]\nmodel = "tiny-llama"\n\n'
        '[[target]]\nname = "t"\nmodel = "tiny-llama"\nseed = 99999999999999999999\n'
    )
    with pytest.raises(
        ConfigError,
        match=r"x\.toml:\d+: \[\[target\]\] the shim would refuse to start: .*--seed must be <= 18446744073709551615",
    ):
        load_config(path)
    path.write_text(path.read_text().replace("99999999999999999999", str(2**64 - 1)))
    load_config(path)  # the largest seed torch takes is accepted


def test_every_accepted_seed_loads_and_twins() -> None:
    """The largest seed builds the tiny model and its rounding twin (the twin's hash overflowed
    from --seed 11087 on), and the twin's hash is unchanged for the seeds that worked."""
    from server_shim.options import SEED_MAX
    from server_shim.twin import apply_rounding_twin, value_hash_uniform

    loaded = load_model("tiny-llama", dtype="float32", device="cpu", seed=SEED_MAX)
    apply_rounding_twin(loaded.model, None, seed=SEED_MAX)
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([[1, 2, 3]]))
    y = torch.randn(64)
    bits = y.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for seed in (0, 7, 11_000 * 1_000_003 + 5, -3):  # the old formula's own answer, by hand
        h = (bits * 0x9E3779B1 + seed * 0x632BE5AB) & 0xFFFFFFFF
        h = h ^ (h >> 16)
        h = (h * 0x45D9F3B) & 0xFFFFFFFF
        h = h ^ (h >> 16)
        assert torch.equal(
            value_hash_uniform(y, seed), (h.to(torch.float64) / 2.0**31 - 1.0).to(torch.float32)
        )
