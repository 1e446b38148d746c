"""The rounding twin (server_shim.twin): deterministic, batch-invariant, the intended amplitude."""

from __future__ import annotations

import pytest
import torch

from server_shim.tolerance import module_tolerance, replay_bound, unit_roundoff
from server_shim.twin import apply_rounding_twin, perturb, resolve_amplitude, value_hash_uniform


def test_tolerance_by_dtype_worked_by_hand() -> None:
    assert unit_roundoff("float16") == 2.0**-11
    # fp32: accumulation order over K dominates output rounding: sqrt(576) * 2^-24 = 24 * 5.96e-8
    assert module_tolerance("float32", 576) == pytest.approx(1.4305e-6, rel=1e-4)
    assert module_tolerance("torch.float16", 576) == pytest.approx(9.765625e-4)  # 2 * 2^-11
    assert module_tolerance("bfloat16") == pytest.approx(7.8125e-3)  # 2 * 2^-8
    assert replay_bound("float32") == 5e-4  # the quantization-flip floor
    assert replay_bound("float16") == pytest.approx(1.953125e-3)  # 2 x 2 x 2^-11
    with pytest.raises(ValueError):
        module_tolerance("int8")


def test_hash_is_uniform_deterministic_and_seeded() -> None:
    y = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    h = value_hash_uniform(y, seed=1)
    assert h.min() >= -1 and h.max() < 1
    assert abs(h.mean().item()) < 0.01 and h.var().item() == pytest.approx(1 / 3, rel=0.02)  # U(-1, 1)
    assert torch.equal(h, value_hash_uniform(y.clone(), seed=1))
    assert not torch.equal(h, value_hash_uniform(y, seed=2))


def test_perturb_relative_error_is_amplitude_over_sqrt3() -> None:
    y = torch.randn(4096, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).float()
    out = perturb(y, 1e-3, seed=0)
    rel = ((out - y).norm() / y.norm()).item()
    assert rel == pytest.approx(1e-3 / 3**0.5, rel=0.02)


def test_twin_is_batch_invariant_and_hooks_every_linear() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    clean = model(x)
    assert apply_rounding_twin(model, 1e-2, seed=3) == 1e-2
    batched = model(x)
    # the noise is elementwise in the output's own values: a row gets the same noise in any slot
    y = torch.randn(5, 32)
    assert torch.equal(perturb(y, 1e-2, 7)[3], perturb(y[3:4], 1e-2, 7)[0])
    assert torch.equal(perturb(y, 1e-2, 7)[3], perturb(y.flip(0), 1e-2, 7)[1])
    rel = ((batched - clean).norm() / clean.norm()).item()
    assert 1e-3 < rel < 3e-2


def test_amplitude_resolution_and_auto_per_module() -> None:
    assert resolve_amplitude("auto") is None and resolve_amplitude("0.001") == 1e-3
    for bad in ("2", "x", "-0.1"):
        with pytest.raises(ValueError):
            resolve_amplitude(bad)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    # auto: each module its own tolerance; in fp16 output rounding dominates either K
    assert apply_rounding_twin(model, None, dtype="float16") == module_tolerance("float16")
    fp32 = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(1024, 8))
    assert apply_rounding_twin(fp32, None, dtype="float32") == pytest.approx(32 * 2.0**-24)  # sqrt(1024)
