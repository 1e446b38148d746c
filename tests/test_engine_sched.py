"""The engine's scheduling through its eager path on the CPU: chunked prefill, continuous batching
(join / leave), decode buckets, failure isolation per request, the KV cache's growth, and the CUDA
graph bookkeeping (first call eager, second captures, later ones replay; a failed capture falls
back to eager). The GPU itself is checked by bench/engine_gpu_check.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import torch

from server_shim import cuda_graphs
from server_shim import engine as engine_module
from server_shim.cuda_graphs import DecodeGraphs, device_lock, graphs_wanted
from server_shim.engine import Engine, EngineFailure, SamplingParams
from server_shim.kv_cache import SlotKVCache
from server_shim.scheduler import bucket, default_buckets, lowest_free, plan_prefill, pow2_at_least

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a very long prompt that needs several chunks",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "héllo 日本 wörld and more",
]


def _hf_greedy(loaded, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False)  # fmt: skip
    return out[0, len(ids) :].tolist()


async def _drain(handle, log: list | None = None, tag: object = None) -> list[int]:  # noqa: ANN001
    out: list[int] = []
    async for ev in handle.events():
        if not ev.prompt:
            out.extend(t.token_id for t in ev.tokens)
        if log is not None and ev.finish_reason is not None:
            log.append(tag)
    return out


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], log: list | None = None):  # noqa: ANN202
    async def go():  # noqa: ANN202
        hs = [engine.submit([p], sp) for p, sp in zip(prompts, params, strict=True)]
        return await asyncio.gather(*(_drain(h, log, i) for i, h in enumerate(hs)), return_exceptions=True)

    return asyncio.run(go())


# ----------------------------------------------------------------------------- pure scheduling


@pytest.mark.parametrize(
    ("n", "buckets", "want"),
    [
        (1, (1, 2, 4), 1),
        (3, (1, 2, 4), 4),
        (4, (1, 2, 4), 4),
        (5, (1, 2, 4), 5),
        (7, None, 7),
        (9, (8, 16), 16),
    ],
)
def test_bucket(n, buckets, want) -> None:
    assert bucket(n, buckets) == want


def test_pow2_and_default_buckets() -> None:
    assert [pow2_at_least(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert pow2_at_least(5, 64) == 64
    assert default_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert default_buckets(1) == (1,)
    assert lowest_free([object(), None, object(), None]) == 1 and lowest_free([object()]) is None


class _S:
    def __init__(self, n: int, cached: int = 0, handle: object = None, solo: bool = False) -> None:
        self.prompt, self.cached, self.handle, self.solo = [0] * n, cached, handle or object(), solo


def test_plan_prefill_splits_the_budget_in_arrival_order() -> None:
    a, b, c = _S(10, cached=4), _S(5), _S(7)
    items = plan_prefill([a, b, c], 9)
    assert [(it.seq, it.start, it.length) for it in items] == [(a, 4, 6), (b, 0, 3)]
    assert plan_prefill([_S(3, cached=3)], 8) == []


def test_plan_prefill_runs_a_suspect_request_alone() -> None:
    h = object()
    a, b, c = _S(4), _S(4, handle=h, solo=True), _S(4, handle=h, solo=True)
    items = plan_prefill([a, b, c], 100)
    assert [it.seq for it in items] == [b, c]


# ----------------------------------------------------------------------------- the engine, eager


def test_chunked_prefill_and_buckets_equal_hf_generate(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    eng = Engine(tiny_llama, prefill_chunk=3, buckets=(2, 4, 8))
    try:
        got = _run(eng, ids, [SamplingParams(max_tokens=6, ignore_eos=True)] * len(ids))
        stats = eng.stats
    finally:
        eng.close()
    for p, g in zip(ids, got, strict=True):
        assert g == _hf_greedy(tiny_llama, p, 6)
    total = sum(len(p) for p in ids)
    assert stats.prefill_tokens == total
    assert stats.prefill_chunks >= -(-total // 3)  # a 3-token budget: at least this many chunks
    assert (
        stats.decode_padded_rows % 2 == 0 and stats.decode_padded_rows > stats.decode_rows
    )  # padded to buckets


def test_echo_logprobs_across_prefill_chunks(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    ids = tok(PROMPTS[1])["input_ids"]
    eng = Engine(tiny_llama, prefill_chunk=4)

    async def go():  # noqa: ANN202
        h = eng.submit([ids], SamplingParams(max_tokens=0, echo=True, logprobs=2))
        return [ev async for ev in h.events()]

    try:
        events = asyncio.run(go())
    finally:
        eng.close()
    echo = events[0]
    assert echo.prompt and [t.token_id for t in echo.tokens] == ids
    with torch.inference_mode():
        lp = torch.log_softmax(tiny_llama.model(torch.tensor([ids])).logits[0].float(), -1)[:-1]
    want = lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    got = torch.tensor([t.logprob for t in echo.tokens[1:]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert events[-1].finish_reason == "length"


def test_short_requests_do_not_wait_for_a_long_one(tiny_llama) -> None:
    """Two slots, one long request and three short ones: the short ones take turns in the second
    slot and all finish while the long one is still decoding (continuous batching)."""
    tok = tiny_llama.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    params = [SamplingParams(max_tokens=40, ignore_eos=True)] + [
        SamplingParams(max_tokens=3, ignore_eos=True)
    ] * 3
    eng = Engine(tiny_llama, max_batch_size=2)
    finished: list[int] = []
    try:
        got = _run(eng, ids, params, finished)
    finally:
        eng.close()
    assert finished == [1, 2, 3, 0]
    assert [len(g) for g in got] == [40, 3, 3, 3]
    for p, g in zip(ids, got, strict=True):
        assert g == _hf_greedy(tiny_llama, p, len(g))


def test_batched_equals_batch_invariant(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_tokens=3 + 4 * i, ignore_eos=True) for i in range(len(ids))]
    outs = []
    for kw in ({"batch_invariant": True}, {"max_batch_size": 3, "prefill_chunk": 5}):
        eng = Engine(tiny_llama, **kw)
        try:
            outs.append(_run(eng, ids, params))
        finally:
            eng.close()
    assert outs[0] == outs[1]


def test_a_failing_decode_step_fails_only_its_request(tiny_llama, monkeypatch) -> None:
    """The decode step that carries request 0's first token as input fails: request 0 alone gets
    the error after the step is re-run request by request; request 1 goes on unharmed."""
    tok = tiny_llama.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    want1 = _hf_greedy(tiny_llama, ids[1], 8)
    poison = _hf_greedy(tiny_llama, ids[0], 1)[0]
    assert poison not in want1 and poison not in ids[1]
    eng = Engine(tiny_llama)
    real = eng._forward

    def forward(x, run):  # noqa: ANN001, ANN202
        if x.dim() == 1 and (x == poison).any():  # decode steps only (prefill ids are 2-D)
            raise RuntimeError("simulated kernel failure on this input")
        return real(x, run)

    monkeypatch.setattr(eng, "_forward", forward)
    try:
        got = _run(eng, ids, [SamplingParams(max_tokens=8, ignore_eos=True)] * 2)
    finally:
        eng.close()
    assert isinstance(got[0], EngineFailure)
    assert got[1] == want1


def test_cancelled_request_frees_its_slot(tiny_llama) -> None:
    tok = tiny_llama.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    eng = Engine(tiny_llama, max_batch_size=1)

    async def go():  # noqa: ANN202
        long = eng.submit([ids[0]], SamplingParams(max_tokens=1000, ignore_eos=True))
        short = eng.submit([ids[1]], SamplingParams(max_tokens=4, ignore_eos=True))
        async for _ in long.events():
            break  # the client goes away after the first token
        return await asyncio.wait_for(_drain(short), 120)

    try:
        assert asyncio.run(go()) == _hf_greedy(tiny_llama, ids[1], 4)
        assert eng._slots == [None]
    finally:
        eng.close()


def test_tiny_moe_mla_through_the_engine_equals_hf_generate(tiny_moe) -> None:
    tok = tiny_moe.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    eng = Engine(tiny_moe, prefill_chunk=4)
    try:
        got = _run(eng, ids, [SamplingParams(max_tokens=5, ignore_eos=True)] * 3)
    finally:
        eng.close()
    for p, g in zip(ids, got, strict=True):
        assert g == _hf_greedy(tiny_moe, p, 5)


# ----------------------------------------------------------------------------- cache and graphs


def test_kv_cache_growth_keeps_contents_and_counts_generations() -> None:
    cache = SlotKVCache(torch.device("cpu"), torch.float32, slots=2, positions=4)
    cache.k.append(torch.arange(3 * 1 * 5 * 2, dtype=torch.float32).view(3, 1, 5, 2))
    cache.v.append(torch.ones(3, 1, 5, 3))
    old_k = cache.k[0][:2, :, :4].clone()
    assert not cache.ensure(2, 4) and cache.generation == 0
    assert cache.ensure(3, 9)
    assert (cache.slots, cache.positions, cache.generation) == (4, 16, 1)
    assert cache.k[0].shape == (5, 1, 17, 2) and cache.v[0].shape == (5, 1, 17, 3)
    torch.testing.assert_close(cache.k[0][:2, :, :4], old_k)
    assert cache.k[0][2:].abs().sum() == 0  # new cells are zeros (finite garbage for idle rows)


class _FakeGraph:
    def __init__(self) -> None:
        self.replayed = 0

    def replay(self) -> None:
        self.replayed += 1


def test_graphs_first_call_eager_second_captures_then_replay(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    outs = (torch.zeros(1), torch.zeros(1))

    def body(rows: int, kv_len: int):  # noqa: ANN202
        calls.append((rows, kv_len))
        return outs

    graphs = DecodeGraphs(body, torch.device("cpu"))
    captured: list[_FakeGraph] = []

    def capture(rows: int, kv_len: int):  # noqa: ANN202
        captured.append(_FakeGraph())
        return captured[-1], outs

    monkeypatch.setattr(graphs, "_capture", capture)
    graphs.run(4, 64)
    assert calls == [(4, 64)] and not captured  # first call of a shape: eager (autotune, lazy init)
    graphs.run(4, 64)
    assert len(captured) == 1 and captured[0].replayed == 1 and calls == [(4, 64)]
    graphs.run(4, 64)
    assert captured[0].replayed == 2 and graphs.replays == 2 and graphs.captures == 1
    graphs.run(8, 64)  # another shape: eager first again
    assert calls[-1] == (8, 64) and len(captured) == 1
    graphs.invalidate()  # the cache moved: nothing stale is replayed
    graphs.run(4, 64)
    assert calls[-1] == (4, 64) and len(graphs) == 0


def test_failed_capture_falls_back_to_eager_for_good(monkeypatch) -> None:
    calls: list[int] = []
    graphs = DecodeGraphs(
        lambda r, k: calls.append(r) or (torch.zeros(1), torch.zeros(1)), torch.device("cpu")
    )

    def capture(rows: int, kv_len: int):  # noqa: ANN202
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "synchronize", lambda *a: None)
    for _ in range(4):
        graphs.run(2, 64)
    assert calls == [2, 2, 2, 2] and not graphs.enabled and "capturing" in graphs.error


@pytest.mark.parametrize(
    ("device", "option", "env", "want"),
    [("cpu", None, None, False), ("cpu", True, None, False), ("cuda", None, None, True), ("cuda", None, "0", False),
     ("cuda", False, None, False), ("cuda", True, "0", True), ("cuda", None, "off", False)],
)  # fmt: skip
def test_graphs_wanted(device, option, env, want, monkeypatch) -> None:
    if env is None:
        monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    else:
        monkeypatch.setenv(cuda_graphs.ENV, env)
    assert graphs_wanted(torch.device(device), option) is want


def test_device_lock_is_one_reentrant_lock_per_cuda_device() -> None:
    """No torch.cuda call is needed: an explicit index names the device."""
    assert isinstance(device_lock(torch.device("cpu")), contextlib.nullcontext)
    lock = device_lock(torch.device("cuda", 0))
    assert lock is device_lock(torch.device("cuda:0")) and lock is not device_lock(torch.device("cuda", 1))
    with lock, lock:  # re-entrant: a step that captures takes it twice
        assert not _free_in_another_thread(lock)
    assert _free_in_another_thread(lock)


def _free_in_another_thread(lock) -> bool:  # noqa: ANN001
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False) and (lock.release() or True)))
    t.start()
    t.join()
    return got[0]


def test_engine_steps_and_jobs_hold_the_device_lock(tiny_llama, monkeypatch) -> None:
    """Every step and every exclusive job runs under the device's lock, on the engine's worker."""
    held: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def recording(device):  # noqa: ANN001, ANN202
        held.append((str(device), threading.current_thread().name))
        yield

    monkeypatch.setattr(engine_module, "device_lock", recording)
    eng = Engine(tiny_llama)
    try:
        ids = [tiny_llama.tokenizer(PROMPTS[0])["input_ids"]]
        assert len(_run(eng, ids, [SamplingParams(max_tokens=3, ignore_eos=True)])[0]) == 3
        steps = len(held)
        assert asyncio.run(eng.run_exclusive(lambda: 7)) == 7
    finally:
        eng.close()
    assert steps >= 3 and len(held) == steps + 1
    assert set(held) == {("cpu", "model-worker")}


def test_cpu_engine_has_no_graphs(tiny_llama) -> None:
    eng = Engine(tiny_llama, cuda_graphs=True)
    try:
        assert eng.runner.graphs is None and not eng.cuda_graphs
    finally:
        eng.close()


def test_gpu_shapes_on_the_cpu_equal_hf_generate(tiny_llama) -> None:
    """What a GPU engine does to shapes, run on the CPU: prefill rows and columns padded to powers
    of two (idle rows in the scratch slot), decode rows padded to buckets, prompts that arrive
    while others decode gathered for a few steps. None of it may change a token."""
    tok = tiny_llama.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    eng = Engine(tiny_llama, max_batch_size=3, buckets=(1, 2, 4), prefill_chunk=8)
    eng._pad_shapes = True  # as on CUDA
    params = [SamplingParams(max_tokens=2 + 5 * i, ignore_eos=True) for i in range(len(ids))]
    try:
        got = _run(eng, ids, params)
        stats = eng.stats
    finally:
        eng.close()
    for p, sp, g in zip(ids, params, got, strict=True):
        assert g == _hf_greedy(tiny_llama, p, sp.max_tokens)
    assert stats.decode_padded_rows > stats.decode_rows


def test_fast_decode_gives_the_same_pieces(tiny_llama) -> None:
    from server_shim.detok import IncrementalDetokenizer
    from server_shim.fast_decode import BackendDecoder, backend_decoder

    tok = tiny_llama.tokenizer
    fast = backend_decoder(tok)
    assert isinstance(fast, BackendDecoder)
    ids = tok("héllo 日本 wörld <|im_start|> ok")["input_ids"] + [0, 1, 2, 49151, 300, 12000]
    a, b = IncrementalDetokenizer(tok, ids[:3]), IncrementalDetokenizer(fast, ids[:3])
    for t in ids[3:]:
        assert a.push(t, -1.0, [(7, -2.0), (t, -1.0)]) == b.push(t, -1.0, [(7, -2.0), (t, -1.0)])
    assert a.flush() == b.flush()


def test_batched_sends_keep_order_across_an_error_and_its_cancel() -> None:
    """The model thread holds its sends for a step; an error followed by the cancel that wakes
    `events` must still arrive in that order, or the request would end silently instead of 500."""
    import threading

    from server_shim.engine_types import RequestHandle, SeqEvent, batched_sends

    async def go() -> list:
        handle = RequestHandle(asyncio.get_running_loop(), 2)

        def worker() -> None:
            with batched_sends():
                handle._put(SeqEvent(0, (), "a"))
                handle._put(RuntimeError("boom"))
                handle.cancel()

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        seen: list = []
        with pytest.raises(EngineFailure, match="boom"):
            async for ev in handle.events():
                seen.append(ev.text)
        return seen

    assert asyncio.run(go()) == ["a"]
