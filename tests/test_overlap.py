"""Replica-gradient sync overlapped with the backward: the same bits as syncing afterwards.

One gloo worker per rank (4 ranks): a stack of ``ExpertParallelMoE`` layers under random
placements with replicas (experts with up to 4 holders, two replicas on one rank), float64.
The gradients after an armed backward + ``finish`` must equal, byte for byte, those of the
same backward followed by plain ``sync_replica_grads``; also when one layer runs twice in the
forward (it is then not armed and syncs afterwards) and when one layer gets no gradient.
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb import ExpertParallelMoE
from lightning_eplb._overlap import ReplicaSyncOverlap, build_overlap
from tests._dist import spawn
from tests.test_moe import random_placement

H, F, E, TOP_K, P = 8, 12, 6, 2, 16


def _layers(n: int) -> list[ExpertParallelMoE]:
    torch.manual_seed(0)  # same gates on every rank
    layers = []
    for i in range(3):
        layer = ExpertParallelMoE(H, F, E, TOP_K, num_redundant_experts=P - E, init_seed=i)
        logical = layer.gather_logical(layer.expert_tensors())
        pl = random_placement(E, P, n, seed=7 + i)
        layer.set_placement(pl.physical_to_logical[0], pl.logical_to_physical[0], pl.logical_replica_count[0])
        layer.load_logical_experts(logical)
        layers.append(layer)
    return layers


def _forward(layers: list[ExpertParallelMoE], x: Tensor, twice: int | None, skip: int | None) -> Tensor:
    """Residual stack; layer ``twice`` runs two times, layer ``skip`` not at all; gradients reset."""
    h = x
    for i, layer in enumerate(layers):
        layer.zero_grad(set_to_none=True)
        layer.forward_calls = 0
        if i == skip:
            continue
        h = h + layer(h)
        if i == twice:
            h = h + layer(h)
    return h.square().sum()


def _run(rank: int, n: int) -> None:
    torch.set_default_dtype(torch.float64)
    layers = _layers(n)
    _check_new_group_is_warmed_up(layers)
    group = dist.new_group(ranks=list(range(n)))
    overlap = ReplicaSyncOverlap(layers, group)
    launched: list[int] = []
    for i, layer in enumerate(layers):
        start = layer.start_replica_grad_sync
        layer.start_replica_grad_sync = lambda g=None, s=start, i=i: launched.append(i) or s(g)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(rank))
    for twice, skip in ((None, None), (1, None), (None, 0)):
        where = f"twice={twice}, skip={skip}, rank {rank}"
        _forward(layers, x, twice, skip).backward()
        for layer in layers:
            layer.sync_replica_grads()  # a layer without gradients gets zeros
        plain = [p.grad.clone() for layer in layers for p in layer.expert_tensors()]
        launched.clear()
        loss = _forward(layers, x, twice, skip)
        overlap.arm()  # after the forward, as the callback does in on_before_backward
        loss.backward()
        during = len(launched)
        done = overlap.finish()
        for layer in layers:
            if id(layer) not in done:
                layer.sync_replica_grads()
        got = [p.grad for layer in layers for p in layer.expert_tensors()]
        for a, b in zip(got, plain, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), where
        armed = 3 - (twice is not None) - (skip is not None)
        assert len(done) == armed, where  # a layer run twice or not at all syncs afterwards
        if twice is None and skip is None:
            assert during == 3, where  # all started from hooks, during the backward
    overlap.remove()


def _check_new_group_is_warmed_up(layers: list[ExpertParallelMoE]) -> None:
    """NCCL builds a communicator on a group's first operation, collectively: the overlap's
    group must see one collective on every rank before any point-to-point batch (that a rank
    without replicated experts skips), else the others hang (seen on 4 H200s)."""
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
        overlap, group = build_overlap(layers, True, None)
    assert overlap is not None and group is not None
    assert [c.kwargs.get("group") for c in all_reduce.call_args_list] == [group]
    overlap.remove()
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
        build_overlap(layers, True, group)[0].remove()  # an existing group: no collective
    assert not all_reduce.called


def test_overlap_bit_identical_to_sync_after_backward() -> None:
    spawn(_run, 4)
