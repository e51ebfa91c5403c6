"""Differentiable all-to-all with uneven splits, and the count exchange that sizes it.

Shapes: ``N`` ranks of the expert-parallel group, ``S`` local slots, ``R`` rows.
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
