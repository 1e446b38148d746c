"""The fused decode path (server_shim/fused_decode.py, fused_kernels.py) on CPU, through Triton's
interpreter at tiny shapes: the kernels against SDPA with the engine's mask, LlamaRMSNorm and HF's
apply_rotary_pos_emb, the attention function's and the rotary wrapper's fallbacks, greedy tokens of an engine with the path on against one without, and the
switch being off unless asked for. Speed is bench/engine_gpu_check.py --fused's business."""

from __future__ import annotations

import asyncio
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import (see tests/test_kernels.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from server_shim import fused_decode, fused_kernels, row_attention  # noqa: E402
from server_shim.engine import Engine, SamplingParams  # noqa: E402
from server_shim.options import BY_NAME  # noqa: E402


def _sdpa_masked(q, k, v, pos, scale):  # noqa: ANN001, ANN202
    """HF's decode attention as the plain path runs it: repeat_kv, the boolean [B,1,1,S] mask."""
    rep = q.shape[1] // k.shape[1]
    seen = torch.arange(k.shape[2]).view(1, -1) <= pos.view(-1, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(rep, 1),
        v.repeat_interleave(rep, 1),
        attn_mask=seen[:, None, None, :],
        scale=scale,
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    ("hq", "hkv", "dqk", "dv", "kv_len"),
    [(6, 2, 16, 16, 40), (4, 4, 24, 8, 70)],  # GQA; MLA-like (dims differ, not powers of two)
)
def test_kernel_matches_masked_sdpa(hq: int, hkv: int, dqk: int, dv: int, kv_len: int) -> None:
    gen = torch.Generator().manual_seed(hq * 100 + kv_len)
    b = 5
    q = torch.randn((b, hq, 1, dqk), generator=gen)
    # the slot cache's layout: one scratch slot and column more than is read, so the views are strided
    kc = torch.randn((b + 1, hkv, kv_len + 1, dqk), generator=gen)
    vc = torch.randn((b + 1, hkv, kv_len + 1, dv), generator=gen)
    k, v = kc[:b, :, :kv_len], vc[:b, :, :kv_len]
    # ragged: one key, a block boundary, the last column, a middle, and past kv_len (clamped)
    pos_col = torch.tensor([0, 15, kv_len - 1, 33, kv_len + 7])
    inputs = torch.stack(
        (torch.zeros(b, dtype=torch.long), pos_col, pos_col), dim=1
    )  # the runner's [rows, 3]
    got = fused_kernels.decode_attention(q, k, v, inputs[:, 1], dqk**-0.5)
    want = _sdpa_masked(q, k, v, pos_col.clamp(max=kv_len - 1), dqk**-0.5)
    assert got.shape == (b, 1, hq, dv) and got.dtype == torch.float32
    # float32 throughout on both sides; they differ only in summation order and the online
    # softmax's rescaling: a few float32 ulps of O(1) outputs (seen: ~2e-7), far below 1e-5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a row that sees a single key returns that key's value exactly (softmax weight 1)
    assert torch.equal(got[0, 0], v[0, torch.arange(hq) // (hq // hkv), 0])


def test_rms_norm_kernel_matches_llama_rmsnorm() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(72, eps=1e-5)  # not a power of two: the masked tail
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(72, generator=gen) / 4)
    x = torch.randn((3, 2, 72), generator=gen) * 3
    got = fused_kernels.rms_norm(x, norm.weight.detach(), norm.variance_epsilon)
    # float32: the mean of squares summed in another order, rsqrt of the same value: ulps apart
    torch.testing.assert_close(got, norm(x).detach(), atol=1e-6, rtol=1e-6)


def _rope_inputs(b, hq, hk, t, d, dtype=torch.float32, seed=0):  # noqa: ANN001, ANN202
    """q, k as the attention forward makes them (transposed views of [B, T, heads, D]), cos / sin
    as the rotary embedding does (the angles twice over)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn((b, t, hq, d), generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn((b, t, hk, d), generator=gen).to(dtype).transpose(1, 2)
    angle = torch.rand((b, t, d // 2), generator=gen) * 50
    return q, k, torch.cat((angle.cos(),) * 2, -1).to(dtype), torch.cat((angle.sin(),) * 2, -1).to(dtype)


@pytest.mark.parametrize(("b", "hq", "hk", "t", "d"), [(3, 6, 2, 1, 16), (2, 4, 4, 3, 24), (1, 5, 1, 2, 10)])
def test_rotary_kernel_matches_hf(b: int, hq: int, hk: int, t: int, d: int) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _rope_inputs(b, hq, hk, t, d, seed=b * 10 + d)
    got_q, got_k = fused_kernels.rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    # float32: the same products, difference and sum as HF's (rotate_half's minus is exact; the
    # kernel launches without FMA contraction): bit for bit
    torch.testing.assert_close(got_q, want_q, atol=0, rtol=0)
    torch.testing.assert_close(got_k, want_k, atol=0, rtol=0)
    # cos / sin of one batch row for all (stride 0), as position ids of batch 1 give them
    one_q, one_k = fused_kernels.rotary(q, k, cos[:1], sin[:1])
    torch.testing.assert_close((one_q, one_k), apply_rotary_pos_emb(q, k, cos[:1], sin[:1]), atol=0, rtol=0)
    # float16: float32 math rounded once -- exactly the float32 formula cast, where HF rounds thrice
    h = tuple(x.half() for x in (q, k, cos, sin))
    assert all(
        torch.equal(a, r)
        for a, r in zip(fused_kernels.rotary(*h), fused_kernels.reference_rotary(*h), strict=True)
    )


def test_rope_wrapper_install_dispatch_uninstall(tiny_moe) -> None:  # noqa: ANN001
    """install_rope swaps Llama's function for the wrapper (idempotent) and uninstall restores it;
    the wrapper takes the kernel only in a decode context with rope on and at decode shapes;
    DeepSeek-V3 (tiny-moe) gets it only for its standard function, not its interleaved one, and
    other rotary functions (Phi-3's partial rotary) are left alone."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3

    original = modeling_llama.apply_rotary_pos_emb
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    phi = type("Phi3Like", (torch.nn.Module,), {"__module__": modeling_phi3.__name__})()
    phi_rope, ds_rope, ds_interleave = (
        modeling_phi3.apply_rotary_pos_emb,
        ds.apply_rotary_pos_emb,
        ds.apply_rotary_pos_emb_interleave,
    )
    try:
        assert fused_decode.install_rope(model) == 1 and fused_decode.install_rope(model) == 1
        wrapper = modeling_llama.apply_rotary_pos_emb
        assert wrapper is not original and wrapper.__wrapped__ is original  # not wrapped twice
        assert fused_decode.install_rope(phi) == 0 and modeling_phi3.apply_rotary_pos_emb is phi_rope
        assert fused_decode.install_rope(tiny_moe.model) == 1
        assert ds.apply_rotary_pos_emb is not ds_rope and ds.apply_rotary_pos_emb_interleave is ds_interleave

        q, k, cos, sin = _rope_inputs(2, 4, 2, 1, 8)
        want = original(q, k, cos, sin)
        pos = torch.zeros(2, dtype=torch.long)
        assert all(
            torch.equal(a, b) for a, b in zip(wrapper(q, k, cos, sin), want, strict=True)
        )  # no context
        with fused_decode.decode_context(2, 4, pos) as ctx:  # rope off in this context
            wrapper(q, k, cos, sin)
        assert ctx.rope_calls == 0
        with fused_decode.decode_context(2, 4, pos, rope=True) as ctx:
            qp, kp, cp, sp = _rope_inputs(2, 4, 2, 3, 8)
            assert all(
                torch.equal(a, b)
                for a, b in zip(wrapper(qp, kp, cp, sp), original(qp, kp, cp, sp), strict=True)
            )
            wrapper(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)  # another layout
            wrapper(q[:1], k[:1], cos[:1], sin[:1])  # 1 row, the step has 2
            assert ctx.rope_calls == 0
            got = wrapper(q, k, cos, sin)
            assert ctx.rope_calls == 1
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            # MLA's standard (non-interleaved) call: the rotary slice of q, one shared k head
            full_q = torch.randn((2, 1, 4, 12)).transpose(1, 2)
            latent = torch.randn((2, 1, 20))
            q_rot, k_rot = full_q[..., 4:], latent[..., 12:].view(2, 1, 1, 8)
            torch.testing.assert_close(
                ds.apply_rotary_pos_emb(q_rot, k_rot, cos, sin),
                ds_rope(q_rot, k_rot, cos, sin),
                atol=1e-6,
                rtol=1e-6,
            )
            assert ctx.rope_calls == 2
    finally:
        fused_decode.uninstall(model)
        fused_decode.uninstall(model)  # idempotent
        fused_decode.uninstall(tiny_moe.model)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert ds.apply_rotary_pos_emb is ds_rope and ds.apply_rotary_pos_emb_interleave is ds_interleave


def test_hub_kernel_module_is_seen_through_to_its_function() -> None:
    """transformers 5.25 with `kernels` 0.19 holds `apply_rotary_pos_emb` as an nn.Module whose
    forward calls the original from its closure; the rotary swap must recognise Llama's function
    inside it (else the fused rotary silently never installs), and not mistake another for it."""

    def rope(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202 - a stand-in original
        return q * cos, k * sin

    def hub_module(func):  # noqa: ANN001, ANN202 - the shape of kernels' _create_func_module
        class Func(torch.nn.Module):
            kernel_layer_name = "RotaryEmbedding"

            def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                return func(*args, **kwargs)

        return Func()

    wrapped = hub_module(rope)
    assert fused_decode._plain_function(wrapped) is rope
    assert fused_decode._code_key(wrapped) == fused_decode._code_key(rope) is not None
    other = hub_module(lambda q, k, cos, sin: (q, k))
    assert fused_decode._code_key(other) != fused_decode._code_key(rope)
    plain_module = torch.nn.Linear(2, 2)  # a module that is no hub kernel: no code to compare
    assert fused_decode._code_key(plain_module) is None
    wrapper = fused_decode._make_rope(wrapped)  # the swap keeps the module itself to call and restore
    assert wrapper.__wrapped__ is wrapped and "_parameters" not in vars(wrapper)


def test_function_falls_back_outside_decode() -> None:
    """Prefill (several query tokens), or no decode context, or another row count: the original
    implementation with the same arguments, and no kernel launch."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fused_decode._register()
    fn = ALL_ATTENTION_FUNCTIONS[fused_decode.NAME]
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    class Attn(torch.nn.Module):
        num_key_value_groups = 2
        is_causal = True

    gen = torch.Generator().manual_seed(1)
    b, t, s = 2, 3, 8
    q = torch.randn((b, 4, t, 16), generator=gen)
    k, v = torch.randn((b, 2, s, 16), generator=gen), torch.randn((b, 2, s, 16), generator=gen)
    mask = torch.ones((b, 1, t, s), dtype=torch.bool).tril(diagonal=s - t)
    pos = torch.tensor([s - 1, s - 1])
    with fused_decode.decode_context(b, s, pos) as ctx:
        got, _ = fn(Attn(), q, k, v, mask, scaling=0.25, dropout=0.0)
        want, _ = sdpa(Attn(), q, k, v, mask, scaling=0.25, dropout=0.0)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        fn(Attn(), q[:1, :, :1], k[:1], v[:1], mask[:1, :, :1], scaling=0.25)  # 1 row, the step has 2
        assert ctx.calls == 0
        fused_out, _ = fn(
            Attn(), q[:, :, :1], k, v, mask[:, :, -1:], scaling=0.25
        )  # a decode step: the kernel
        assert ctx.calls == 1
    plain, _ = fn(Attn(), q[:, :, :1], k, v, mask[:, :, -1:], scaling=0.25)  # no context: sdpa again
    torch.testing.assert_close(fused_out, plain, atol=1e-5, rtol=1e-5)


def _greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def go() -> list[list[int]]:
        handles = [engine.submit([p], SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]

        async def drain(h) -> list[int]:  # noqa: ANN001
            return [t.token_id async for ev in h.events() if not ev.prompt for t in ev.tokens]

        return list(await asyncio.gather(*(drain(h) for h in handles)))

    return asyncio.run(go())


def test_engine_fused_greedy_tokens_match_plain(tiny_llama) -> None:  # noqa: ANN001
    """tiny-llama, three prompts of different lengths decoded together (ragged rows), float32:
    the fused engine's greedy tokens equal the plain engine's, and the kernels really ran."""
    from transformers.models.llama import modeling_llama

    original_rope = modeling_llama.apply_rotary_pos_emb
    prompts = [[1, 5, 9, 200, 33], [1, 77, 8], [1, 400, 401, 402, 403, 404, 405, 406, 407, 3000]]
    model = tiny_llama.model
    row_attention.uninstall(model)  # a CPU engine of an earlier test installed row_attention: as loaded
    before = model.config._attn_implementation
    batch = torch.tensor([[1, 5, 9, 200, 33], [2, 2, 1, 77, 8]])  # left padding: HF builds its own mask
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        direct = model(input_ids=batch, attention_mask=mask).logits  # what debug capture / HF generate run
    plain = Engine(tiny_llama, fused_decode=False)
    fused = Engine(tiny_llama, fused_decode=True)
    try:
        want = _greedy(plain, prompts, 5)
        got = _greedy(fused, prompts, 5)
        assert fused.runner.fused and not plain.runner.fused
        assert model.config._attn_implementation == fused_decode.NAME  # installed while in use
        assert fused.runner.fused_calls >= 4 * model.config.num_hidden_layers  # 4 decode steps, every layer
        assert fused.runner.fused_norms == 2 * model.config.num_hidden_layers + 1  # every RMSNorm
        assert fused.runner.fused_rope == 1 and modeling_llama.apply_rotary_pos_emb is not original_rope
        assert fused.runner.fused_rope_calls >= 4 * model.config.num_hidden_layers  # the rotary kernel too
        assert got == want
        assert plain.runner._mask_dtype == fused.runner._mask_dtype  # the plain path kept its mask
        with torch.no_grad():  # outside the engine's decode steps the installed model is the same model
            torch.testing.assert_close(
                model(input_ids=batch, attention_mask=mask).logits, direct, atol=0, rtol=0
            )
    finally:
        plain.close()
        fused.close()
        fused_decode.uninstall(model)  # the session's model is shared: leave it as loaded
    assert model.config._attn_implementation == before
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert modeling_llama.apply_rotary_pos_emb is original_rope


def test_self_check_and_the_runner_falling_back(monkeypatch: pytest.MonkeyPatch, tiny_llama) -> None:  # noqa: ANN001
    assert fused_decode.self_check(torch.device("cpu"), torch.float32) is None
    real = fused_kernels.rms_norm
    monkeypatch.setattr(fused_kernels, "rms_norm", lambda x, w, eps: real(x, w, eps) * 1.01)
    assert "RMSNorm" in (fused_decode.self_check(torch.device("cpu"), torch.float32) or "")
    monkeypatch.setattr(fused_kernels, "rms_norm", real)
    real_rope = fused_kernels.rotary
    monkeypatch.setattr(fused_kernels, "rotary", lambda *a: tuple(x * 1.01 for x in real_rope(*a)))
    assert "rotary" in (fused_decode.self_check(torch.device("cpu"), torch.float32) or "")
    assert fused_decode.self_check(torch.device("cpu"), torch.float32, rope=False) is None  # rotary not asked
    monkeypatch.setenv(fused_decode.ROPE_ENV, "0")
    assert not fused_decode.rope_wanted() and fused_decode.norms_wanted()
    # a failed self-check: the engine decodes plainly and leaves the model as loaded
    monkeypatch.setattr(fused_decode, "self_check", lambda *a: "boom")
    eng = Engine(tiny_llama, fused_decode=True)
    try:
        assert not eng.runner.fused and eng.runner.fused_error == "boom" and eng.runner.fused_norms == 0
        assert tiny_llama.model.config._attn_implementation not in fused_decode.NAMES
    finally:
        eng.close()


def test_switch_on_for_gpus_off_for_the_cpu(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    """Default: on where a GPU runs Triton (measured faster, graph == eager), off on the CPU, where
    Triton only interprets; the env and the option override it."""
    monkeypatch.delenv(fused_decode.ENV, raising=False)
    assert not fused_decode.fused_wanted(torch.device("cpu"))
    monkeypatch.setattr(fused_decode, "triton_available", lambda device: True)  # as on a GPU box
    assert fused_decode.fused_wanted(torch.device("cuda"))
    assert not fused_decode.fused_wanted(torch.device("cuda"), False)  # serve --no-fused-decode
    monkeypatch.setenv(fused_decode.ENV, "0")
    assert not fused_decode.fused_wanted(torch.device("cuda"))
    monkeypatch.undo()
    monkeypatch.delenv(fused_decode.ENV, raising=False)
    assert BY_NAME["no_fused_decode"].default is False and BY_NAME["no_fused_decode"].spec
    assert not engine.runner.fused  # conftest's engine: built with defaults, on the CPU
    monkeypatch.setenv(fused_decode.ENV, "1")
    assert fused_decode.fused_wanted(torch.device("cpu"))  # TRITON_INTERPRET=1 here
    assert not fused_decode.fused_wanted(torch.device("cpu"), False)  # the option wins
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused_decode.fused_wanted(torch.device("cpu"))  # a CPU server: no Triton, plain
    if not torch.cuda.is_available():
        monkeypatch.delenv(fused_decode.ENV, raising=False)
        assert not fused_decode.fused_wanted(torch.device("cuda"))  # asked by default, no GPU: plain


def test_serve_flag_turns_it_off() -> None:
    import argparse

    from server_shim.options import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--no-fused-decode"]).no_fused_decode is True
    assert parser.parse_args(["--model", "m"]).no_fused_decode is False


def test_eager_models_fall_back_to_their_own_eager_attention() -> None:
    """A model loaded with eager attention gets `difftest_decode_eager`, whose fallback is the
    modeling file's own eager_attention_forward (additive masks, as the runner gives eager models)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    assert fused_decode.install(model) and model.config._attn_implementation == fused_decode.NAME + "_eager"
    assert fused_decode.base_implementation(model.config) == "eager"
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn((2, h, 3, 8), generator=gen) for h in (4, 2, 2))
    mask = torch.zeros((2, 1, 3, 3)).masked_fill(torch.ones(3, 3, dtype=torch.bool).triu(1), float("-inf"))
    got, _ = ALL_ATTENTION_FUNCTIONS[fused_decode.NAME + "_eager"](
        attn, q, k, v, mask, scaling=0.3, dropout=0.0
    )
    want, _ = modeling_llama.eager_attention_forward(attn, q, k, v, mask, scaling=0.3, dropout=0.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    fused_decode.uninstall(model)
    assert model.config._attn_implementation == "eager"
