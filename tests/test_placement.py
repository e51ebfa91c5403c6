"""rebalance: DeepSeek's worked example, validity, exhaustive optimality, edges, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_eplb import placement as placement_mod
from lightning_eplb.placement import Placement, rebalance

README_LOAD = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)


def test_deepseek_reproduces_readme_example():
    p = rebalance(README_LOAD, 16, 8, num_nodes=2, num_groups=4, policy="deepseek")
    assert p.physical_to_logical.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert p.logical_replica_count.tolist() == [
        [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
    ]
    assert p.physical_to_logical.dtype == torch.int64


def test_balanced_readme_example_hierarchical_and_valid():
    p = rebalance(README_LOAD, 16, 8, num_nodes=2, num_groups=4)
    p.validate()
    ds = rebalance(README_LOAD, 16, 8, num_nodes=2, num_groups=4, policy="deepseek")
    assert p.balancedness(README_LOAD) >= ds.balancedness(README_LOAD) - 1e-12
    _check_groups_on_nodes(p, num_groups=4, num_nodes=2)


def _check_groups_on_nodes(p: Placement, num_groups: int, num_nodes: int) -> None:
    group_size = p.num_logical // num_groups
    node_P = torch.arange(p.num_physical) // (p.num_physical // num_nodes)
    for layer in range(p.num_layers):
        group_P = p.physical_to_logical[layer] // group_size
        for g in range(num_groups):
            assert len(set(node_P[group_P == g].tolist())) == 1, f"group {g} spans nodes in layer {layer}"


def _brute_force_peak(load: list[float], num_physical: int, num_ranks: int) -> float:
    """Smallest heaviest-rank load over every valid placement (spread rule included)."""
    num_logical = len(load)
    per_rank = num_physical // num_ranks
    best = float("inf")
    for p2l in itertools.product(range(num_logical), repeat=num_physical):
        count = [p2l.count(e) for e in range(num_logical)]
        if min(count) < 1:
            continue
        ranks = [p2l[r * per_rank : (r + 1) * per_rank] for r in range(num_ranks)]
        copies = [[rk.count(e) for rk in ranks] for e in range(num_logical)]
        if any(max(c) - min(c) >= 2 for c in copies):
            continue
        peak = max(sum(load[e] / count[e] for e in rk) for rk in ranks)
        best = min(best, peak)
    return best


# Tiny cases: (E, P, N). Hand check for the first: loads [4, 1, 1] on 4 slots, 2 ranks: the
# best is {4/2, 1} on each rank, peak 3; the balanced policy finds it.
TINY = [(3, 4, 2), (3, 6, 2), (4, 6, 3), (4, 6, 2), (2, 4, 2), (3, 6, 3), (4, 4, 2), (5, 6, 2)]


@pytest.mark.parametrize(("num_logical", "num_physical", "num_ranks"), TINY)
def test_balanced_optimal_on_tiny_cases(num_logical, num_physical, num_ranks):
    gen = torch.Generator().manual_seed(num_logical * 100 + num_physical * 10 + num_ranks)
    worst = 1.0
    for trial in range(6):
        load = torch.randint(0, 20, (num_logical,), generator=gen).double()
        if trial == 0:
            load = torch.tensor([4.0, 1.0, 1.0] + [1.0] * (num_logical - 3))
        p = rebalance(load, num_physical, num_ranks)
        p.validate()
        got = float(p.rank_loads(load).max())
        best = _brute_force_peak(load.tolist(), num_physical, num_ranks)
        assert got >= best - 1e-9
        worst = max(worst, got / best if best > 0 else 1.0)
    # Stated factor: within 10% of the optimum. With 2-3 slots per rank and a handful of
    # experts, water-filling replica counts can be the wrong ones (e.g. loads [14, 15, 2],
    # 4 slots, 2 ranks: replicating expert 1 gives 21.5, replicating expert 2 gives 16);
    # the count search fixes most such rows (worst over these cases 1.34 before it, 1.08
    # with it); on the real loads (256 experts) the gap to the lower bound is below 0.3%.
    assert worst <= 1.10


@settings(max_examples=40, deadline=None)
@given(
    num_layers=st.integers(1, 3),
    num_nodes=st.sampled_from([1, 2]),
    ranks_per_node=st.integers(1, 4),
    per_rank=st.integers(1, 5),
    groups_per_node=st.sampled_from([1, 2]),
    group_size=st.integers(1, 4),
    integer=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    use_previous=st.booleans(),
)
def test_valid_on_random_configurations(
    num_layers, num_nodes, ranks_per_node, per_rank, groups_per_node, group_size, integer, seed, use_previous
):
    num_ranks = num_nodes * ranks_per_node
    num_groups = num_nodes * groups_per_node
    num_logical = num_groups * group_size
    num_physical = num_ranks * per_rank
    if num_physical < num_logical or num_physical // num_nodes < num_logical // num_nodes:
        return
    gen = torch.Generator().manual_seed(seed)
    load = torch.rand(num_layers, num_logical, generator=gen) ** 4 * 100
    load = load.round().long() if integer else load
    previous = None
    if use_previous:
        previous = Placement.contiguous(num_layers, num_logical, num_physical, num_ranks).physical_to_logical
    for policy in ("balanced", "deepseek"):
        p = rebalance(
            load,
            num_physical,
            num_ranks,
            num_nodes=num_nodes,
            num_groups=num_groups,
            previous=previous,
            policy=policy,
        )
        assert p.physical_to_logical.shape == (num_layers, num_physical)
        assert int(p.logical_replica_count.min()) >= 1
        assert (p.logical_replica_count.sum(1) == num_physical).all()
        # with nodes, replicas stay in their node: a node with more slots per rank than
        # experts must double up (DeepSeek's layout does the same)
        # (a whole layer may give an expert more replicas than ranks: 3 on 2 ranks split it
        # 2:1, valid as every rank holds one; validate() checks the spread rule)
        if policy == "balanced" and per_rank <= num_logical // num_nodes:
            p.validate()
        if num_nodes > 1:
            _check_groups_on_nodes(p, num_groups, num_nodes)


def test_balanced_never_below_deepseek_on_random_loads():
    gen = torch.Generator().manual_seed(0)
    for num_ranks, num_physical in [(4, 40), (8, 40), (8, 48), (16, 48)]:
        load = (torch.rand(4, 32, generator=gen) ** 3 * 1000).round()
        bal = rebalance(load, num_physical, num_ranks).balancedness(load)
        ds = rebalance(load, num_physical, num_ranks, policy="deepseek").balancedness(load)
        assert bal >= ds - 1e-12, (num_ranks, num_physical, bal, ds)


def test_edge_one_rank_keeps_everything_on_it():
    load = torch.tensor([[5.0, 1.0, 0.0]])
    p = rebalance(load, 5, 1)
    p.validate()
    assert p.logical_replica_count.sum().item() == 5
    assert p.balancedness(load) == 1.0


def test_edge_one_slot_per_rank():
    load = torch.tensor([[8.0, 4.0, 2.0, 2.0]])
    p = rebalance(load, 4, 4)  # no redundancy: each rank holds one expert
    assert sorted(p.physical_to_logical[0].tolist()) == [0, 1, 2, 3]
    p = rebalance(load, 6, 6)  # 2 redundant: expert 0 gets them (8/3 per replica)
    p.validate()
    assert p.logical_replica_count.tolist() == [[3, 1, 1, 1]]
    assert p.rank_loads(load).max().item() == 4.0  # expert 1 alone on its rank


def test_edge_zero_load_and_all_load_on_one_expert():
    p = rebalance(torch.zeros(2, 6), 8, 4)
    p.validate()
    assert p.balancedness(torch.zeros(2, 6)) == 1.0
    load = torch.zeros(1, 6)
    load[0, 3] = 600.0
    p = rebalance(load, 12, 4)
    p.validate()
    # as many replicas as ranks: one on every rank, perfect balance
    assert p.logical_replica_count[0, 3].item() == 4
    assert p.copies_per_rank()[0, 3].tolist() == [1, 1, 1, 1]
    assert p.rank_loads(load).tolist() == [[150.0, 150.0, 150.0, 150.0]]


def test_replicas_beyond_ranks_when_slots_exceed_experts():
    # 2 experts, 8 slots on 2 ranks: experts need more replicas than ranks (a multiple of
    # the rank count each, so every rank holds the same share)
    load = torch.tensor([[30.0, 10.0]])
    p = rebalance(load, 8, 2)
    p.validate()
    assert p.logical_replica_count.tolist() == [[4, 4]]
    assert p.copies_per_rank()[0].tolist() == [[2, 2], [2, 2]]
    assert p.balancedness(load) == 1.0


def test_accepts_any_dtype_1d_and_placement_previous():
    load = torch.tensor([5, 1, 3, 7], dtype=torch.int32)
    p = rebalance(load, 6, 2)
    assert p.physical_to_logical.shape == (1, 6)
    q = rebalance(load.half(), 6, 2, previous=p)
    assert q.physical_to_logical.dtype == torch.int64
    assert q.num_changed_slots(p) == 0


def test_movement_with_previous():
    gen = torch.Generator().manual_seed(1)
    load = torch.rand(6, 64, generator=gen) ** 4 * 1000
    first = rebalance(load, 80, 16)
    # same load: nothing moves
    assert rebalance(load, 80, 16, previous=first.physical_to_logical).num_changed_slots(first) == 0
    drifted = load * torch.exp(0.15 * torch.randn(load.shape, generator=gen))
    fresh = rebalance(drifted, 80, 16)
    warm = rebalance(drifted, 80, 16, previous=first.physical_to_logical)
    warm.validate()
    assert warm.num_changed_slots(first) < 0.7 * fresh.num_changed_slots(first)
    assert warm.balancedness(drifted) >= fresh.balancedness(drifted) - 0.002


def test_custom_policy_callable():
    def reverse(load, num_physical, num_ranks, **kwargs):
        return torch.arange(num_physical).flip(0).remainder(load.shape[-1]).expand(load.shape[0], -1)

    p = rebalance(torch.ones(2, 4), 4, 2, policy=reverse)
    assert p.physical_to_logical.tolist() == [[3, 2, 1, 0], [3, 2, 1, 0]]

    def wrong(load, num_physical, num_ranks, **kwargs):
        return Placement.contiguous(1, 4, 8, 2)

    with pytest.raises(ValueError, match="custom policy returned"):
        rebalance(torch.ones(2, 4), 4, 2, policy=wrong)


def test_hierarchical_fallback_warns_once():
    placement_mod._warned_fallback.clear()
    load = torch.rand(1, 12)
    with pytest.warns(UserWarning, match="placing experts globally"):
        rebalance(load, 16, 8, num_nodes=2, num_groups=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebalance(load, 16, 8, num_nodes=2, num_groups=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"load": torch.ones(1, 4), "num_physical": 6, "num_ranks": 4},
            r"num_physical \(6\) must be divisible",
        ),
        (
            {"load": torch.ones(1, 4), "num_physical": 2, "num_ranks": 2},
            r"num_physical \(2\) must be >= num_logical",
        ),
        ({"load": torch.tensor([[1.0, -1.0]]), "num_physical": 2, "num_ranks": 1}, "non-negative"),
        ({"load": torch.tensor([[1.0, float("nan")]]), "num_physical": 2, "num_ranks": 1}, "NaN or inf"),
        ({"load": torch.tensor([[1.0, float("inf")]]), "num_physical": 2, "num_ranks": 1}, "NaN or inf"),
        ({"load": torch.ones(2, 2, 2), "num_physical": 2, "num_ranks": 1}, "shape"),
        (
            {"load": torch.ones(1, 6), "num_physical": 8, "num_ranks": 2, "num_groups": 4},
            r"num_groups \(4\) must divide",
        ),
        (
            {"load": torch.ones(1, 4), "num_physical": 6, "num_ranks": 3, "num_nodes": 2},
            r"divisible by num_nodes \(2\)",
        ),
        ({"load": torch.ones(1, 4), "num_physical": 4, "num_ranks": 2, "policy": "greedy"}, "must be one of"),
        ({"load": torch.ones(1, 4), "num_physical": 4, "num_ranks": 0}, r"num_ranks \(0\)"),
        (
            {
                "load": torch.ones(2, 4),
                "num_physical": 4,
                "num_ranks": 2,
                "previous": torch.zeros(1, 4, dtype=torch.long),
            },
            r"previous has shape \(1, 4\)",
        ),
        (
            {
                "load": torch.ones(1, 4),
                "num_physical": 4,
                "num_ranks": 2,
                "previous": torch.tensor([[0, 1, 2, 9]]),
            },
            r"previous holds ids",
        ),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rebalance(**kwargs)


def _brute_force_rank_balance(load: list[float], num_physical: int, num_ranks: int) -> float:
    """Best balancedness over replica counts x placements on 2 ranks (the spread rule holds
    for any split of the slots over 2 ranks of equal size when counts stay <= 3)."""
    assert num_ranks == 2
    num_logical, per_rank, best = len(load), num_physical // 2, 0.0
    for extra in itertools.combinations_with_replacement(range(num_logical), num_physical - num_logical):
        count = [1 + extra.count(e) for e in range(num_logical)]
        if max(count) > 3:
            continue
        items = [load[e] / count[e] for e in range(num_logical) for _ in range(count[e])]
        owner = [e for e in range(num_logical) for _ in range(count[e])]
        for first in itertools.combinations(range(num_physical), per_rank):
            copies = [sum(owner[i] == e for i in first) for e in range(num_logical)]
            if any(abs(2 * c - count[e]) >= 2 for e, c in enumerate(copies)):  # spread rule
                continue
            a = sum(items[i] for i in first)
            best = max(best, sum(items) / 2 / max(a, sum(items) - a))
    return best


def test_count_search_on_the_demo_loads():
    """The CPU demo's first window (layer 0: 8 experts, 2 redundant, 2 ranks of 5 slots).
    Water-filling replicates the two heaviest experts and reaches 0.918; a third replica of
    a mid-weight expert instead balances the ranks (brute force: 1.0 on these rounded loads, 0.9992 on the exact ones)."""
    load = torch.tensor([13.0, 296.0, 2.0, 380.0, 8.0, 197.0, 65.0, 40.0])
    best = _brute_force_rank_balance(load.tolist(), 10, 2)
    p = rebalance(load, 10, 2)
    p.validate()
    assert best > 0.999
    assert float(p.balancedness(load)) >= best - 0.005
