"""server_shim.row_attention: the shim's CPU attention gives a row the same numbers wherever in the
batch it sits (torch's batched CPU SDPA did not on a 2-thread AVX-512 machine: rows 0 and 3 of
identical inputs 1.2e-7 apart, which per-token fp8 scales made 0.06 nats), and is SDPA otherwise."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("t", [1, 7])  # a decode step, a prefill chunk
def test_identical_rows_get_identical_numbers_in_every_slot(threads: int, t: int) -> None:
    q, k, v = _inputs(4, 96)
    q = q.expand(-1, -1, t, -1).contiguous()
    seen = torch.arange(96).view(1, 96) <= (80 + torch.arange(t)).view(t, 1)
    mask = seen.view(1, 1, t, 96).expand(4, 1, t, 96)  # the engine's kind of mask: the matmul path
    with _threads(threads):
        out, weights = row_attention.attention(_Attn(), q, k, v, mask, scaling=0.125)
        batched, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.125)
    assert weights is None and out.shape == (4, t, 9, 64)  # HF's [B, T, H, D]
    for r in range(1, 4):
        assert torch.equal(out[r], out[0]), r
    torch.testing.assert_close(out, batched, rtol=1e-5, atol=2e-6)  # the same attention, to rounding


def test_the_matmul_path_worked_by_hand() -> None:
    """One head, two positions: scores q·k x scale = [1, 0] -> softmax [e/(1+e), 1/(1+e)] over
    v = [[2], [0]]; the second query sees only position 0 -> v[0]; a row that sees nothing -> 0."""
    q = torch.tensor([[[[1.0], [1.0], [1.0]]]])  # [B=1, H=1, T=3, D=1]
    k = torch.tensor([[[[2.0], [0.0]]]])
    v = torch.tensor([[[[2.0], [0.0]]]])
    mask = torch.tensor([[[[True, True], [True, False], [False, False]]]])
    out = row_attention.matmul_attention(q, k, v, mask, scale=0.5)
    e = math.e
    torch.testing.assert_close(out.flatten(), torch.tensor([2 * e / (1 + e), 2.0, 0.0]))


def test_other_masks_run_sdpa_a_row_at_a_time() -> None:
    """A float (additive) mask is not the engine's: SDPA per row, equal to SDPA on that row alone."""
    q, k, v = _inputs(3, 40, seed=1)
    additive = torch.where(torch.arange(40) < 25, 0.0, float("-inf")).view(1, 1, 1, 40)
    out, _ = row_attention.attention(_Attn(), q, k, v, additive, scaling=0.125)
    one, _ = sdpa_attention_forward(_Attn(), q[:1], k[:1], v[:1], additive, scaling=0.125)
    assert torch.equal(out[2:3], one)
    shared = (torch.arange(40) < 25).view(1, 1, 1, 40)  # boolean, broadcast over the batch: matmul path
    out, _ = row_attention.attention(_Attn(), q, k, v, shared, scaling=0.125)
    assert torch.equal(out[2], out[0])
    torch.testing.assert_close(out[2:3], one, rtol=1e-5, atol=2e-6)


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


def test_values_narrower_than_keys_as_in_mla() -> None:
    """DeepSeek's MLA attends 48-wide queries and keys over 32-wide values: the output is 32 wide
    (the first version assumed one width, and tiny-moe's engine failed on every step)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 3, 48, generator=g)
    k, v = torch.randn(2, 4, 10, 48, generator=g), torch.randn(2, 4, 10, 32, generator=g)
    mask = (
        (torch.arange(10).view(1, 10) <= (7 + torch.arange(3)).view(3, 1))
        .view(1, 1, 3, 10)
        .expand(2, 1, 3, 10)
    )
    attn = _Attn()
    attn.num_key_value_groups = 1
    out, _ = row_attention.attention(attn, q, k, v, mask, scaling=0.2)
    want, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=0.2)
    assert out.shape == (2, 3, 4, 32)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
