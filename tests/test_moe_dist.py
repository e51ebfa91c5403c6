"""ExpertParallelMoE on 1, 2 and 4 gloo processes against DenseMoE on the global batch.

One worker per world size runs every check (each spawn costs seconds). Rank ``r`` takes rows
``r::N`` of a global batch every rank builds from the same seed; the dense reference runs the
whole batch on every rank. Gate gradients are averaged by hand (what DDP does); expert
gradients go through ``sync_replica_grads``.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb.dense import DenseMoE, init_logical_experts
from lightning_eplb.moe import ExpertParallelMoE
from tests._dist import spawn
from tests.test_moe import DT, apply_placement, brute_load, brute_route, make_pair, random_placement

TOL = {"atol": 1e-12, "rtol": 1e-10}


def _gather_slots(t: Tensor) -> Tensor:
    """All ``P`` slots of a per-slot tensor, in physical order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _check_equivalence(rank: int, n: int, experts: int, redundant: int, groups: int, seed: int) -> None:
    ep, dense = make_pair(8, 12, experts, 2, redundant, groups, seed=seed, expert_backend="bmm")
    placement = random_placement(experts, experts + redundant, n, seed)
    apply_placement(ep, placement, [t.to(DT) for t in init_logical_experts(experts, 8, 12, seed)])
    assert ep.num_local_experts == (experts + redundant) // n
    x = torch.randn(4 * n + 1, 8, dtype=DT, requires_grad=True)  # uneven: rank 0 has one row more
    g = torch.randn_like(x)
    (dense(x) * g).sum().backward()
    x_local = x.detach()[rank::n].clone().requires_grad_()
    ep.train()
    y_local = ep(x_local)
    torch.testing.assert_close(y_local, dense(x)[rank::n], **TOL)
    (y_local * g[rank::n]).sum().backward()
    torch.testing.assert_close(x_local.grad, x.grad[rank::n], **TOL)
    gate_grad = ep.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)
    torch.testing.assert_close(gate_grad, dense.gate.weight.grad, **TOL)
    ep.sync_replica_grads()
    grads = ep.gather_logical([p.grad for p in ep.expert_tensors()])
    for got, want in zip(grads, [dense.w1.grad, dense.w3.grad, dense.w2.grad], strict=True):
        torch.testing.assert_close(got * n, want, **TOL)
    for p in ep.expert_tensors():  # replicas bit-identical, wherever they live
        full = _gather_slots(p.grad)
        assert torch.equal(full, full[placement.logical_to_physical[0, placement.physical_to_logical[0], 0]])
    experts_TK, _ = brute_route(ep.gate(x_local).detach(), 2, groups, ep.num_limited_groups)
    assert ep.expert_load.tolist() == brute_load(experts_TK, placement, rank)


def _sgd_step(module: torch.nn.Module, lr: float = 0.5) -> None:
    """Plain SGD (torch.optim would import far more than this test needs)."""
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
            p.grad = None


def _check_training_steps(rank: int, n: int) -> None:
    """SGD on N ranks with the same global batch equals the dense model on one process."""
    ep, dense = make_pair(8, 12, 6, 2, redundant=2, seed=5, expert_backend="bmm")
    placement = random_placement(6, 8, n, seed=21)
    apply_placement(ep, placement, [t.to(DT) for t in init_logical_experts(6, 8, 12, 5)])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4 * n, 8, dtype=DT, generator=gen)
        target = torch.randn(4 * n, 8, dtype=DT, generator=gen)
        ((dense(x) - target) ** 2).mean().backward()
        _sgd_step(dense)
        ((ep(x[rank::n]) - target[rank::n]) ** 2).mean().backward()
        dist.all_reduce(ep.gate.weight.grad)
        ep.gate.weight.grad.div_(n)  # DDP's averaging
        ep.sync_replica_grads()
        _sgd_step(ep)
    torch.testing.assert_close(ep.gate.weight, dense.gate.weight, atol=1e-12, rtol=1e-10)
    for got, want in zip(ep.gather_logical(ep.expert_tensors()), [dense.w1, dense.w3, dense.w2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    full = _gather_slots(ep.w2.detach())
    assert torch.equal(full, full[placement.logical_to_physical[0, placement.physical_to_logical[0], 0]])


def _check_placement_change_and_state_dict(rank: int, n: int) -> None:
    ep, dense = make_pair(8, 12, 4, 3, redundant=4, seed=8, expert_backend="bmm")
    x = torch.randn(6, 8, dtype=DT)
    want = dense(x)
    torch.testing.assert_close(ep(x), want, **TOL)
    for seed in range(3):  # move weights by hand: gather logical, re-slice for the new placement
        logical = ep.gather_logical(ep.expert_tensors())
        apply_placement(ep, random_placement(4, 8, n, 30 + seed), logical)
        torch.testing.assert_close(ep(x), want, **TOL)
    # a logical state dict (what placement-free checkpoints hold) with another placement
    new = random_placement(4, 8, n, 77)
    state = {
        **dense.state_dict(),
        "eplb_layout": "logical",
        "physical_to_logical": new.physical_to_logical[0],
    }
    ep.load_state_dict(state)
    assert torch.equal(ep.logical_to_physical, new.logical_to_physical[0])
    torch.testing.assert_close(ep(x), want, **TOL)
    # physical state dict of rank r loads into rank r's layer
    fresh, _ = make_pair(8, 12, 4, 3, redundant=4, seed=9, expert_backend="bmm")
    fresh.load_state_dict(ep.state_dict())
    torch.testing.assert_close(fresh(x), want, **TOL)
    # the dense copy built from the sharded layer (collective) is the same model
    torch.testing.assert_close(DenseMoE.from_expert_parallel(ep)(x), want, **TOL)


def _check_setup(rank: int, n: int) -> None:
    # Built "before the process group exists": holds all P slots until setup.
    with mock.patch("torch.distributed.is_initialized", return_value=False):
        ep, dense = make_pair(8, 12, 4, 2, redundant=4, seed=2, expert_backend="bmm")
    assert ep.num_local_experts == 8
    x = torch.randn(5, 8, dtype=DT)
    if n > 1:
        with pytest.raises(RuntimeError, match="setup_expert_parallel"):
            ep(x)
    ep.setup_expert_parallel()
    ep.setup_expert_parallel()  # idempotent
    assert ep.num_local_experts == 8 // n and ep.ep_rank == rank and ep.ep_size == n
    assert torch.equal(
        ep.w1, dense.w1.detach()[ep.physical_to_logical[rank * (8 // n) : (rank + 1) * (8 // n)]]
    )
    torch.testing.assert_close(ep(x), dense(x), **TOL)
    # Built under the process group: draws only its own slots, the same weights as above.
    with mock.patch("lightning_eplb.moe.init_logical_experts", wraps=init_logical_experts) as drawn:
        local = ExpertParallelMoE(8, 12, 4, 2, num_redundant_experts=4, init_seed=2, expert_backend="bmm").to(DT)
    assert drawn.call_args.args[4] == ep.physical_to_logical[rank * (8 // n) : (rank + 1) * (8 // n)].tolist()
    assert local.num_local_experts == 8 // n and torch.equal(local.w1, ep.w1) and torch.equal(local.w2, ep.w2)
    local.setup_expert_parallel()  # nothing to slice: still the same slots
    assert torch.equal(local.w3, ep.w3)
    if n > 1:  # a layer holding one rank's slots cannot be set up for another group size
        with pytest.raises(ValueError, match=r"holding slots .* needs slots"):
            local._is_setup = False
            local.setup_expert_parallel(dist.new_group(ranks=[rank], use_local_synchronization=True))
    if n > 1:  # 7 slots on 2 or 4 ranks: refused at construction (the group exists already)
        with pytest.raises(ValueError, match=rf"num_physical_experts \(7\).* divisible by .* \({n}\)"):
            ExpertParallelMoE(8, 12, 5, 2, num_redundant_experts=2)


def _run_all(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    _check_equivalence(rank, world_size, experts=6, redundant=2, groups=1, seed=1)
    _check_equivalence(rank, world_size, experts=4, redundant=4, groups=1, seed=2)  # many replicas
    _check_equivalence(rank, world_size, experts=8, redundant=0, groups=4, seed=3)  # group-limited
    _check_training_steps(rank, world_size)
    _check_placement_change_and_state_dict(rank, world_size)
    _check_setup(rank, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_expert_parallel_equals_dense_on_gloo(world_size: int) -> None:
    spawn(_run_all, world_size=world_size, timeout_s=90.0)
