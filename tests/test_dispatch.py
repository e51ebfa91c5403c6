"""The token gather, the row permutations and the weighted combine (``lightning_eplb._dispatch``).

Against plain autograd on the same expressions: the experts' output gradient is scaled by
``grad_scale``, the router weights' gradient is not, and the token gradient through the
gather is divided by it again, so only the expert weight gradients end up scaled. With a
power-of-two scale (N = 2, 4, 8 ranks) bit for bit, in float32 and bfloat16; with N = 3 to
float64 rounding. The backwards gather instead of scatter-adding, so a token's gradient is
the same bits whatever order its copies were sorted in.
"""

from __future__ import annotations

import pytest
import torch

from lightning_eplb._dispatch import combine, gather_copies, permute_rows, slot_order, take_rows

TOKENS, TOP_K, HIDDEN = 7, 3, 5


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.rand(TOKENS, TOP_K, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)  # a stand-in expert
    grad = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    order = torch.randperm(TOKENS * TOP_K, generator=torch.Generator().manual_seed(seed))
    return x, w, weight, grad, order, torch.argsort(order)


def _grads(scale: float | None, dtype: torch.dtype, seed: int = 0, elementwise: bool = False) -> list[torch.Tensor]:
    """Gradients of x, w and the expert weight; ``scale=None``: plain autograd. The copies
    are sorted by a random permutation (seeded); ``elementwise``: the stand-in expert
    scales each row by the weight's first row (row results independent of the order)."""
    x, w, weight, grad, order, inv = _inputs(dtype, seed)
    x, w, weight = (t.clone().requires_grad_() for t in (x, w, weight))
    if scale is None:
        rows = x.unsqueeze(1).expand(TOKENS, TOP_K, HIDDEN).reshape(-1, HIDDEN).index_select(0, order)
    else:
        rows = gather_copies(x, order, inv, TOP_K, scale)
    y = rows * weight[0] if elementwise else rows @ weight
    if scale is None:
        out = (y.index_select(0, inv).view(TOKENS, TOP_K, -1) * w.unsqueeze(-1)).sum(1)
    else:
        out = combine(permute_rows(y, inv, order).view(TOKENS, TOP_K, -1), w, scale)
    out.backward(grad)
    return [x.grad, w.grad, weight.grad]


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_power_of_two_scale_is_exact(num_ranks: int, dtype: torch.dtype) -> None:
    gx, gw, gweight = _grads(None, dtype)
    sx, sw, sweight = _grads(1.0 / num_ranks, dtype)
    assert torch.equal(sx, gx)  # token gradient unchanged
    assert torch.equal(sw, gw)  # router weights unchanged
    assert torch.equal(sweight, gweight / num_ranks)  # expert weights averaged like DDP


def test_other_scale_to_rounding() -> None:
    gx, gw, gweight = _grads(None, torch.float64)
    sx, sw, sweight = _grads(1.0 / 3, torch.float64)
    torch.testing.assert_close(sx, gx, rtol=1e-14, atol=0)
    assert torch.equal(sw, gw)
    torch.testing.assert_close(sweight, gweight / 3, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_gradient_does_not_depend_on_the_sort(dtype: torch.dtype) -> None:
    """The copies of a token are summed in ``k`` order whatever the slot order (autograd's
    scatter-add sums them in sorted order, so a new placement changed the bits)."""
    grads = [_grads(0.5, dtype, seed=seed, elementwise=True)[0] for seed in range(4)]
    for other in grads[1:]:
        assert torch.equal(other, grads[0])


def test_forward_unchanged_and_unit_scale_is_plain() -> None:
    x, w, weight, _, order, inv = _inputs(torch.float32)
    assert torch.equal(gather_copies(x, order, inv, TOP_K, 0.25), x.index_select(0, order // TOP_K))
    y = x.index_select(0, order // TOP_K) @ weight
    assert torch.equal(permute_rows(y, inv, order), y.index_select(0, inv))
    y_TKH = y.view(TOKENS, TOP_K, -1)
    assert torch.equal(combine(y_TKH, w, 0.25), (y_TKH * w.unsqueeze(-1)).sum(1))
    assert combine(y_TKH.requires_grad_(), w, 1.0).grad_fn.name() != "_CombineBackward"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_take_rows_matches_index_select(dtype: torch.dtype) -> None:
    """Rows copied as wide integers where the row size allows, plain otherwise."""
    gen = torch.Generator().manual_seed(1)
    for shape in [(6, 8), (6, 3), (6, 2, 4), (0, 8)]:
        x = (torch.randn(*shape, generator=gen) * 100).to(dtype)
        index = torch.randint(0, max(shape[0], 1), (9,), generator=gen) if shape[0] else torch.zeros(0, dtype=torch.int64)
        assert torch.equal(take_rows(x, index), x.index_select(0, index))
    strided = torch.arange(48).to(dtype).view(8, 6).t()  # not contiguous: copied first
    index = torch.tensor([5, 0, 0, 3])
    assert torch.equal(take_rows(strided, index), strided.index_select(0, index))


def test_slot_order_equals_a_stable_sort() -> None:
    gen = torch.Generator().manual_seed(2)
    for ranks, slots in [(1, 1), (2, 3), (4, 5), (3, 1)]:
        recv_NS = torch.randint(0, 4, (ranks, slots), generator=gen)
        recv_NS[0, 0] = 0  # empty blocks too
        local = torch.arange(slots).repeat(ranks)
        slot_R = torch.repeat_interleave(local, recv_NS.reshape(-1))
        perm, inv, sorted_slots = slot_order(recv_NS, int(recv_NS.sum()))
        assert perm.tolist() == torch.argsort(slot_R, stable=True).tolist()
        assert torch.equal(inv[perm], torch.arange(len(perm)))
        assert sorted_slots.tolist() == sorted(slot_R.tolist())
