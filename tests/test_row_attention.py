"""server_shim.row_attention: the shim's CPU attention gives a row the same numbers wherever in the
batch it sits (torch's batched CPU SDPA did not on a 2-thread AVX-512 machine: rows 0 and 3 of
identical inputs 1.2e-7 apart, which per-token fp8 scales made 0.06 nats), and is SDPA otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server_shim import row_attention


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


def _inputs(rows: int, positions: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 9, 1, 64, generator=g)
    k, v = torch.randn(rows, 3, positions, 64, generator=g), torch.randn(rows, 3, positions, 64, generator=g)
    for r in range(1, rows):  # every row the same sequence
        q[r], k[r], v[r] = q[0], k[0], v[0]
    return q, k, v


@pytest.mark.parametrize("threads", [1, 2])
def test_identical_rows_get_identical_numbers_in_every_slot(threads: int) -> None:
    q, k, v = _inputs(4, 96)
    mask = (torch.arange(96) < 70).view(1, 1, 1, 96).expand(4, 1, 1, 96)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, weights = row_attention.attention(_Attn(), q, k, v, mask, scaling=0.125)
    finally:
        torch.set_num_threads(before)
    assert weights is None and out.shape == (4, 1, 9, 64)  # HF's [B, T, H, D]
    for r in range(1, 4):
        assert torch.equal(out[r], out[0]), r
    # the same attention as batched SDPA, to its rounding
    batched, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.125)
    torch.testing.assert_close(out, batched, rtol=1e-5, atol=1e-6)


def test_a_mask_broadcast_over_the_batch_is_every_rows_mask() -> None:
    q, k, v = _inputs(3, 40, seed=1)
    shared = (torch.arange(40) < 25).view(1, 1, 1, 40)
    out, _ = row_attention.attention(_Attn(), q, k, v, shared, scaling=0.125)
    one, _ = sdpa_attention_forward(_Attn(), q[:1], k[:1], v[:1], shared, scaling=0.125)
    assert torch.equal(out[2:3], one)


def test_install_points_sdpa_configs_at_it_and_uninstall_restores(tiny_llama) -> None:  # noqa: ANN001
    model = tiny_llama.model
    row_attention.uninstall(model)
    assert model.config._attn_implementation == "sdpa"
    assert row_attention.install(model) >= 1 and row_attention.install(model) >= 1  # idempotent
    assert model.config._attn_implementation == row_attention.NAME
    assert row_attention.underlying(model.config._attn_implementation) == "sdpa"
    batch = torch.tensor([[1, 5, 9, 200, 33], [2, 2, 1, 77, 8]])
    with torch.no_grad():
        rows = model(input_ids=batch).logits
        row_attention.uninstall(model)
        row_attention.uninstall(model)
        plain = model(input_ids=batch).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(rows, plain, rtol=1e-5, atol=1e-5)
