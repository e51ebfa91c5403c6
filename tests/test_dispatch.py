"""The token gather and the weighted combine with a gradient scale (``lightning_eplb._dispatch``).

Against plain autograd on the same expressions: the experts' output gradient is scaled by
``grad_scale``, the router weights' gradient is not, and the token gradient through the
gather is divided by it again, so only the expert weight gradients end up scaled. With a
power-of-two scale (N = 2, 4, 8 ranks) bit for bit (the bf16 token gradient to one
rounding); with N = 3 to float64 rounding.
"""

from __future__ import annotations

import pytest
import torch

from lightning_eplb._dispatch import combine, gather_rows


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    tokens, top_k, hidden = 7, 3, 5
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64).to(dtype)  # a stand-in expert
    index = torch.randint(0, tokens, (tokens * top_k,), generator=gen)
    grad = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, weight, index, grad


def _grads(scale: float | None, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of x, w and the expert weight; ``scale=None``: plain autograd."""
    x, w, weight, index, grad = _inputs(dtype)
    x, w, weight = (t.clone().requires_grad_() for t in (x, w, weight))
    rows = x.index_select(0, index) if scale is None else gather_rows(x, index, scale)
    y = (rows @ weight).view(x.shape[0], w.shape[1], -1)
    out = (y * w.unsqueeze(-1)).sum(1) if scale is None else combine(y, w, scale)
    out.backward(grad)
    return [x.grad, w.grad, weight.grad]


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_of_two_scale_is_exact(num_ranks: int, dtype: torch.dtype) -> None:
    gx, gw, gweight = _grads(None, dtype)
    sx, sw, sweight = _grads(1.0 / num_ranks, dtype)
    if dtype == torch.float32:
        assert torch.equal(sx, gx)  # token gradient unchanged
    else:  # bf16 index_add_ with alpha rounds its duplicate-row sums on its own path
        torch.testing.assert_close(sx, gx, rtol=1e-2, atol=2e-2)
    assert torch.equal(sw, gw)  # router weights unchanged
    assert torch.equal(sweight, gweight / num_ranks)  # expert weights averaged like DDP


def test_other_scale_to_rounding() -> None:
    gx, gw, gweight = _grads(None, torch.float64)
    sx, sw, sweight = _grads(1.0 / 3, torch.float64)
    torch.testing.assert_close(sx, gx, rtol=1e-14, atol=0)
    assert torch.equal(sw, gw)
    torch.testing.assert_close(sweight, gweight / 3, rtol=1e-14, atol=0)


def test_forward_unchanged_and_unit_scale_is_plain() -> None:
    x, w, weight, index, _ = _inputs(torch.float32)
    y = (x.index_select(0, index) @ weight).view(x.shape[0], w.shape[1], -1)
    assert torch.equal(gather_rows(x, index, 0.25), x.index_select(0, index))
    assert torch.equal(combine(y, w, 0.25), (y * w.unsqueeze(-1)).sum(1))
    assert combine(y.requires_grad_(), w, 1.0).grad_fn.name() != "_CombineBackward"
