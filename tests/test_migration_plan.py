"""Migration planner, without a process group: symbolic execution, symmetry, spread, nodes."""

from __future__ import annotations

import pytest
import torch

from lightning_eplb.migration import MigrationPlan, _build_batches, _staging_rows, plan_migration
from tests.test_migration import random_placement


def _simulate(plan: MigrationPlan, old_LP: torch.Tensor) -> torch.Tensor:
    """Apply the plan to slot *labels* (the expert ids themselves) and return the result."""
    num_slots = plan.slots_per_rank
    out = old_LP.clone()
    for layer, ranks in enumerate(plan.layers):
        for rank, rp in enumerate(ranks):
            base = rank * num_slots
            for r in rp.recvs:
                peer_plan = plan.layers[layer][r.peer]
                # the peer sends exactly this expert, from a slot that held it
                (send,) = [s for s in peer_plan.sends if s.peer == rank and s.expert == r.expert]
                assert int(old_LP[layer, r.peer * num_slots + send.slot]) == r.expert
                out[layer, base + r.slot] = r.expert
            for c in rp.copies:
                if c.received:
                    assert c.src in {r.slot for r in rp.recvs if r.expert == c.expert}
                else:
                    assert int(old_LP[layer, base + c.src]) == c.expert
                out[layer, base + c.dst] = c.expert
    return out


@pytest.mark.parametrize("seed", range(12))
def test_random_plans_reach_new_placement_with_minimal_receives(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_ranks = [1, 2, 3, 4, 8][seed % 5]
    num_slots = 1 + seed % 4
    num_physical = num_ranks * num_slots
    num_logical = max(1, num_physical - seed % 3)
    old = random_placement(gen, 3, num_logical, num_physical)
    new = random_placement(gen, 3, num_logical, num_physical)
    num_nodes = 2 if num_ranks % 2 == 0 else 1
    plan = plan_migration(old, new, num_ranks, num_nodes=num_nodes)
    assert torch.equal(_simulate(plan, old), new)
    for layer in range(3):
        for rank in range(num_ranks):
            mine = slice(rank * num_slots, (rank + 1) * num_slots)
            lacking = set(new[layer, mine].tolist()) - set(old[layer, mine].tolist())
            rp = plan.layers[layer][rank]
            assert sorted(r.expert for r in rp.recvs) == sorted(lacking)  # each lacking expert once
            # symmetry: what a sends to b is exactly what b expects from a, in message order
            for peer in range(num_ranks):
                sent = [(s.expert) for s in rp.sends if s.peer == peer]
                expected = [r.expert for r in plan.layers[layer][peer].recvs if r.peer == rank]
                assert sent == expected
    assert plan.num_sent().sum() == plan.num_received().sum()
    assert plan == plan_migration(old, new, num_ranks, num_nodes=num_nodes)  # deterministic


def test_sending_is_spread_over_all_holders() -> None:
    # 8 ranks of 2 slots; expert 0 lives on ranks 0 and 1; every other rank needs it.
    old = torch.tensor([0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    new = old.clone()
    new[0::2] = 0
    plan = plan_migration(old, new, num_ranks=8)
    assert plan.num_sent()[0].tolist() == [3, 3, 0, 0, 0, 0, 0, 0]
    assert plan.num_received()[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    # three holders, four receivers: 2 + 1 + 1
    old = torch.tensor([0, 1, 0, 2, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    new = torch.tensor([0, 1, 0, 2, 0, 3, 0, 5, 0, 7, 0, 9, 0, 11])
    assert sorted(plan_migration(old, new, num_ranks=7).num_sent()[0].tolist()[:3]) == [1, 1, 2]


def test_same_node_source_is_preferred() -> None:
    # 4 ranks of 2 slots on 2 nodes (ranks 0,1 | 2,3); expert 0 on ranks 0 and 2.
    old = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6])
    new = torch.tensor([0, 1, 0, 3, 0, 4, 0, 6])
    one_node = plan_migration(old, new, num_ranks=4)
    two_nodes = plan_migration(old, new, num_ranks=4, num_nodes=2)
    assert one_node.layers[0][1].recvs[0].peer == 2  # nearest in rank order, across nodes
    assert two_nodes.layers[0][1].recvs[0].peer == 0  # same node
    assert two_nodes.layers[0][3].recvs[0].peer == 2


def test_local_copies_and_duplicates() -> None:
    # 2 ranks of 3 slots: rank 0 [0, 1, 2] -> [1, 1, 3]: expert 1 kept in slot 1 and copied to
    # slot 0; expert 3 received once for slot 2.  rank 1 [3, 4, 0] -> [2, 2, 4]: expert 2
    # received once and copied to the second slot; expert 4 moves locally from slot 1 to 2.
    old = torch.tensor([0, 1, 2, 3, 4, 0])
    new = torch.tensor([1, 1, 3, 2, 2, 4])
    plan = plan_migration(old, new, num_ranks=2)
    r0, r1 = plan.layers[0]
    assert r0.keep == (1,) and [tuple(c) for c in r0.copies] == [(0, 1, 1, False)]
    assert [tuple(r) for r in r0.recvs] == [(2, 1, 3)]
    assert r1.keep == () and [tuple(r) for r in r1.recvs] == [(0, 0, 2)]
    assert sorted(tuple(c) for c in r1.copies) == [(1, 0, 2, True), (2, 1, 4, False)]
    sent, received = plan.bytes_per_rank([10])
    assert sent.tolist() == [10, 10] and received.tolist() == [10, 10]
    assert "layer 0 rank 1" in plan.describe() and "2 received" in repr(plan)


def test_identical_placements_plan_nothing() -> None:
    old = torch.tensor([[3, 1, 2, 0, 1, 1]])
    plan = plan_migration(old, old, num_ranks=3)
    assert plan.num_received().sum() == plan.num_copied().sum() == 0
    assert all(len(rp.keep) == 2 for rp in plan.layers[0])


def test_bad_inputs_raise() -> None:
    p2l = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="same shape"):
        plan_migration(p2l, p2l[:, :2], 2)
    with pytest.raises(ValueError, match="divisible by num_ranks"):
        plan_migration(p2l, p2l, 3)
    with pytest.raises(ValueError, match=r"num_ranks \(2\) must be divisible by num_nodes \(3\)"):
        plan_migration(p2l, p2l, 2, num_nodes=3)
    with pytest.raises(ValueError, match="logical expert 5 that no old slot holds"):
        plan_migration(p2l, torch.tensor([[0, 1, 2, 5]]), 2)
    with pytest.raises(ValueError, match="integer expert ids"):
        plan_migration(p2l.float(), p2l, 2)
    with pytest.raises(ValueError, match="negative"):
        plan_migration(p2l, -p2l, 2)
    with pytest.raises(ValueError, match="3 entries"):
        plan_migration(p2l, p2l, 2).bytes_per_rank([1, 2, 3])


@pytest.mark.parametrize("cap", [1, 7, 100, 513, 10_000])
def test_batches_cover_every_byte_once_within_the_staging_cap(cap: int) -> None:
    gen = torch.Generator().manual_seed(cap)
    old = random_placement(gen, 3, 9, 12)
    new = random_placement(gen, 3, 9, 12)
    plan = plan_migration(old, new, 4)
    row_bytes = [[30, 7, 1200], [0, 64], [5]]
    covered = {(layer, t): [] for layer, sizes in enumerate(row_bytes) for t in range(len(sizes))}
    for batch in _build_batches(plan, row_bytes, cap):
        staging = [0] * 4
        for part in batch:
            covered[(part.layer, part.tensor)].append((part.start, part.stop))
            for rank, rp in enumerate(plan.layers[part.layer]):
                staging[rank] += _staging_rows(rp) * (part.stop - part.start)
        costs = [_staging_rows(rp) for ranks in plan.layers for rp in ranks]
        assert max(staging) <= max(cap, max(costs))  # one byte per staged row is the floor
    for (layer, t), ranges in covered.items():
        assert sorted(ranges) == _tiling(sorted(ranges), row_bytes[layer][t]), (layer, t)


def _tiling(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """``ranges`` if they tile ``[0, size)`` exactly (no gap, no overlap), else ``[]``."""
    position = 0
    for start, stop in ranges:
        if start != position or stop <= start:
            return []
        position = stop
    return ranges if position == size else []
