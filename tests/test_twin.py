"""The rounding twin (server_shim.twin): deterministic, batch-invariant, the intended amplitude."""

from __future__ import annotations

import pytest
import torch

from server_shim.tolerance import module_tolerance, unit_roundoff
from server_shim.twin import apply_rounding_twin, perturb, resolve_amplitude, value_hash_uniform


def test_tolerance_by_dtype_worked_by_hand() -> None:
    assert unit_roundoff("float16") == 2.0**-11
    assert module_tolerance("float32") == 2.5e-4  # the act-quant flip floor dominates 2 * 2^-24
    assert module_tolerance("torch.float16") == pytest.approx(9.765625e-4)  # 2 * 2^-11
    assert module_tolerance("bfloat16") == pytest.approx(7.8125e-3)  # 2 * 2^-8
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
    assert apply_rounding_twin(model, 1e-2, seed=3) == 2
    batched = model(x)
    # the noise is elementwise in the output's own values: a row gets the same noise in any slot
    y = torch.randn(5, 32)
    assert torch.equal(perturb(y, 1e-2, 7)[3], perturb(y[3:4], 1e-2, 7)[0])
    assert torch.equal(perturb(y, 1e-2, 7)[3], perturb(y.flip(0), 1e-2, 7)[1])
    rel = ((batched - clean).norm() / clean.norm()).item()
    assert 1e-3 < rel < 3e-2


def test_amplitude_resolution() -> None:
    assert resolve_amplitude("auto", torch.float16) == module_tolerance("float16")
    assert resolve_amplitude("0.001", torch.float32) == 1e-3
    with pytest.raises(ValueError):
        resolve_amplitude("2", torch.float32)
