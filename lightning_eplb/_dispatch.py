"""Differentiable all-to-all with uneven splits, the count exchange that sizes it, and the
token gather and weighted combine around the experts.

The gather and the combine take a ``grad_scale``: the combine hands the experts
``grad_scale`` times their output gradient and the gather multiplies the input gradient by
``1 / grad_scale`` again, so expert weight gradients leave the backward already scaled
(``1 / N``, DDP's averaging) while every other gradient is unchanged. Both factors ride on
multiplications the backward makes anyway, so the scaling costs no pass over the expert
gradients; with ``N`` a power of two it is exact.

Shapes: ``N`` ranks of the expert-parallel group, ``S`` local slots, ``R`` rows, ``T``
tokens, ``K`` experts per token, ``C = T * K`` token copies, ``H`` hidden size.
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


class _GatherRows(torch.autograd.Function):
    """``x[index]`` whose backward scatters ``grad / grad_scale`` back (one ``index_add_``,
    as autograd's own backward of ``index_select``, with ``alpha``)."""

    @staticmethod
    def forward(ctx: Any, x_TH: Tensor, index_C: Tensor, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index_C)
        ctx.num_rows, ctx.inv_scale = x_TH.shape[0], 1.0 / grad_scale
        return x_TH.index_select(0, index_C)

    @staticmethod
    def backward(ctx: Any, grad_CH: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (index_C,) = ctx.saved_tensors
        grad_TH = grad_CH.new_zeros((ctx.num_rows, *grad_CH.shape[1:]))
        return grad_TH.index_add_(0, index_C, grad_CH, alpha=ctx.inv_scale), None, None


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


def gather_rows(x_TH: Tensor, index_C: Tensor, grad_scale: float = 1.0) -> Tensor:
    """``x_TH.index_select(0, index_C)``; its backward divides the gradient by ``grad_scale``
    (undoing :func:`combine`'s factor for the token gradients)."""
    if grad_scale == 1.0:
        return x_TH.index_select(0, index_C)
    return _GatherRows.apply(x_TH, index_C, grad_scale)


def combine(y_TKH: Tensor, w_TK: Tensor, grad_scale: float = 1.0) -> Tensor:
    """``(y_TKH * w_TK[..., None]).sum(1)``; the gradient reaching ``y_TKH`` (the experts)
    is multiplied by ``grad_scale``, the one reaching ``w_TK`` is not."""
    if grad_scale == 1.0:
        return (y_TKH * w_TK.unsqueeze(-1)).sum(1)
    return _Combine.apply(y_TKH, w_TK, grad_scale)
