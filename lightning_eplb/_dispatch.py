"""Differentiable all-to-all with uneven splits, the count exchange that sizes it, and the
token gather and weighted combine around the experts.

The gather and the combine take a ``grad_scale``: the combine hands the experts
``grad_scale`` times their output gradient and the gather multiplies the input gradient by
``1 / grad_scale`` again, so expert weight gradients leave the backward already scaled
(``1 / N``, DDP's averaging) while every other gradient is unchanged. The combine's factor
rides on the router-weight multiplication its backward makes anyway and the gather's is one
multiply of the ``(T, H)`` token gradient, so the scaling costs no pass over the expert
gradients; with ``N`` a power of two it is exact.

Row permutations (:func:`permute_rows`) and the gather (:func:`gather_copies`) have
backwards that gather with the inverse permutation instead of autograd's scatter-add: no
atomics (bf16 atomic adds cost about a quarter of a layer's step on an H200) and the same
bits on every run.

Shapes: ``N`` ranks of the expert-parallel group, ``S`` local slots, ``R`` rows, ``T``
tokens, ``K`` experts per token, ``C = T * K`` token copies, ``H`` hidden size, ``B = N * S``
blocks of received rows (source rank, local slot).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward is the reverse exchange."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        ctx.group = group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group
        )
        return grad_in, None, None, None


def recomputing() -> bool:
    """Whether this runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not) re-running a forward to rebuild what it
    did not save. Such a forward routes the same tokens again: it must not count them."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # private; present since torch 2.0
    return task_id is not None and task_id() != -1


def all_to_all(
    x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> Tensor:
    """Differentiable uneven all-to-all.

    Args:
        x: ``(sum(input_splits), ...)`` rows, ``input_splits[j]`` of them go to rank ``j``.
        output_splits: rows received from each rank.
        input_splits: rows sent to each rank.
        group: the process group (None: the default group).

    Returns:
        ``(sum(output_splits), ...)`` rows, grouped by source rank.
    """
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(
    send_NS: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, list[int], list[int], list[int]]:
    """Tell every rank how many rows it will receive for each of its slots.

    This is the one host synchronisation of a forward: the split sizes of the row
    exchange must be Python integers.

    Args:
        send_NS: ``(N, S)`` int64 rows this rank sends to local slot ``s`` of rank ``n``.
        group: the expert-parallel group.

    Returns:
        ``(recv_NS, output_splits, input_splits, slot_counts)``: ``(N, S)`` int64 rows this
        rank receives from rank ``n`` for its local slot ``s`` (device); the per-rank row
        counts to receive and to send (host lists of length ``N``); rows received per
        local slot (host list of length ``S``).
    """
    num_ranks = send_NS.shape[0]
    recv_NS = torch.empty_like(send_NS)
    dist.all_to_all_single(recv_NS, send_NS.contiguous(), group=group)
    host = torch.cat([recv_NS.sum(1), send_NS.sum(1), recv_NS.sum(0)]).tolist()
    return recv_NS, host[:num_ranks], host[num_ranks : 2 * num_ranks], host[2 * num_ranks :]


def inverse_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i`` (one scatter, no sort)."""
    inv = torch.empty_like(perm)
    return inv.scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def slot_order(recv_NS: Tensor, num_recv: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the received rows (grouped by source rank, each group by slot) by local slot,
    stably, without a sort: the rows of block ``(n, s)`` move from its offset in ``(n, s)``
    order to its offset in ``(s, n)`` order.

    Args:
        recv_NS: ``(N, S)`` rows received from rank ``n`` for local slot ``s``.
        num_recv: ``R``, their total (known on the host).

    Returns:
        ``perm_R`` (the received row at each sorted position), its inverse, and the sorted
        rows' slots.
    """
    num_ranks, slots = recv_NS.shape
    count_B = recv_NS.reshape(-1)  # blocks in (n, s) order
    src_B = torch.cumsum(count_B, 0) - count_B
    count_SN = recv_NS.t().reshape(-1)
    dst_B = (torch.cumsum(count_SN, 0) - count_SN).view(slots, num_ranks).t().reshape(-1)
    blocks = torch.arange(num_ranks * slots, device=recv_NS.device)
    block_R = torch.repeat_interleave(blocks, count_B, output_size=num_recv)
    inv_R = torch.arange(num_recv, device=recv_NS.device) + (dst_B - src_B).index_select(0, block_R)
    local_S = torch.arange(slots, device=recv_NS.device)
    slot_R = torch.repeat_interleave(local_S, recv_NS.sum(0), output_size=num_recv)
    return inverse_permutation(inv_R), inv_R, slot_R


def wide_rows(t: Tensor) -> Tensor:
    """``t`` as ``(rows, D)`` viewed with the widest integer type its rows allow, when it is
    contiguous: row copies by index then move 8 bytes per element instead of 2 (bf16)."""
    if t.dim() < 2 or not t.is_contiguous():
        return t
    t = t.flatten(1)
    row_bytes = t.shape[1] * t.element_size()
    for dtype in (torch.int64, torch.int32):
        if dtype.itemsize > t.element_size() and row_bytes % dtype.itemsize == 0:
            return t.view(dtype)
    return t


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along the first dimension (rows copied as wide integers where possible)."""
    x = x.contiguous()
    return wide_rows(x).index_select(0, index).view(x.dtype).view(index.shape[0], *x.shape[1:])


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation, whose backward is ``grad[inv]``: a gather, where
    autograd's own backward of ``index_select`` scatters with atomic adds (slow on bf16 and
    not reproducible on GPU)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        return take_rows(x, perm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return take_rows(grad, inv), None, None


def permute_rows(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
    """``x[perm]``, ``perm`` a permutation of the rows and ``inv`` its inverse."""
    return _PermuteRows.apply(x, perm, inv)


class _GatherCopies(torch.autograd.Function):
    """The ``top_k`` copies of every token in sorted order; backward: each token's copies
    gathered back (``inv``) and summed over ``k`` in a fixed order, divided by
    ``grad_scale``. No atomics: deterministic, and the sum does not depend on the order
    the copies were sorted in."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_TH: Tensor, order_C: Tensor, inv_C: Tensor, top_k: int, grad_scale: float
    ) -> Tensor:
        ctx.save_for_backward(inv_C)
        ctx.top_k, ctx.inv_scale = top_k, 1.0 / grad_scale
        return take_rows(x_TH, torch.div(order_C, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx: Any, grad_CH: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        (inv_C,) = ctx.saved_tensors
        grad_CH = take_rows(grad_CH, inv_C)
        grad_TH = grad_CH.view(-1, ctx.top_k, *grad_CH.shape[1:]).sum(1)
        if ctx.inv_scale != 1.0:
            grad_TH.mul_(ctx.inv_scale)
        return grad_TH, None, None, None, None


class _Combine(torch.autograd.Function):
    """``sum_k w[t, k] * y[t, k]`` whose backward hands ``y`` the gradient times
    ``grad_scale`` (folded into the router weights it is multiplied by anyway); the router
    weights get their plain gradient."""

    @staticmethod
    def forward(ctx: Any, y_TKH: Tensor, w_TK: Tensor, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(y_TKH, w_TK)
        ctx.grad_scale = grad_scale
        return (y_TKH * w_TK.unsqueeze(-1)).sum(1)

    @staticmethod
    def backward(ctx: Any, grad_TH: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        y_TKH, w_TK = ctx.saved_tensors
        grad_T1H = grad_TH.unsqueeze(1)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_T1H * (w_TK * ctx.grad_scale).unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_T1H * y_TKH).sum(-1)
        return grad_y, grad_w, None


def gather_copies(
    x_TH: Tensor, order_C: Tensor, inv_C: Tensor, top_k: int, grad_scale: float = 1.0
) -> Tensor:
    """``x_TH[order_C // top_k]``: copy ``c`` of the flat ``(token, k)`` order sits at row
    ``inv_C[c]`` (``order_C`` a permutation of ``T * top_k`` copies, ``inv_C`` its inverse);
    the backward sums every token's copies and divides by ``grad_scale`` (undoing
    :func:`combine`'s factor for the token gradients)."""
    return _GatherCopies.apply(x_TH, order_C, inv_C, top_k, grad_scale)


def combine(y_TKH: Tensor, w_TK: Tensor, grad_scale: float = 1.0) -> Tensor:
    """``(y_TKH * w_TK[..., None]).sum(1)``; the gradient reaching ``y_TKH`` (the experts)
    is multiplied by ``grad_scale``, the one reaching ``w_TK`` is not."""
    if grad_scale == 1.0:
        return (y_TKH * w_TK.unsqueeze(-1)).sum(1)
    return _Combine.apply(y_TKH, w_TK, grad_scale)
