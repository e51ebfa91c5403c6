"""ExpertParallelMoE on one process against DenseMoE and brute-force references.

The helpers at the top are shared with ``test_moe_dist.py`` (gloo, 1/2/4 processes).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_eplb._routing import route
from lightning_eplb.dense import DenseMoE, init_logical_experts
from lightning_eplb.moe import BalanceableMoE, ExpertParallelMoE
from lightning_eplb.placement import Placement
from lightning_eplb.protocol import is_balanceable

DT = torch.float64


# ---------------------------------------------------------------------------- helpers
def random_placement(num_logical: int, num_physical: int, num_ranks: int, seed: int) -> Placement:
    """Every expert once plus random extra replicas, shuffled (two replicas may share a rank)."""
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
    p2l = torch.cat([torch.arange(num_logical), extra])[torch.randperm(num_physical, generator=gen)]
    return Placement.from_physical_to_logical(p2l, num_logical, num_ranks)


def make_pair(
    hidden: int,
    ffn: int,
    experts: int,
    top_k: int,
    redundant: int = 0,
    groups: int = 1,
    seed: int = 3,
    **kw: object,
) -> tuple[ExpertParallelMoE, DenseMoE]:
    """An EP layer and a dense layer with the same logical weights and gate, in float64."""
    torch.manual_seed(seed)
    ep = ExpertParallelMoE(hidden, ffn, experts, top_k, redundant, groups, init_seed=seed, **kw).to(DT)  # type: ignore[arg-type]
    dense = DenseMoE(
        hidden, ffn, experts, top_k, groups, num_limited_groups=ep.num_limited_groups, init_seed=seed
    )
    dense = dense.to(DT)
    with torch.no_grad():
        dense.gate.weight.copy_(ep.gate.weight)
    return ep, dense


def apply_placement(layer: ExpertParallelMoE, placement: Placement, logical: list[Tensor]) -> None:
    """Move weights by hand: set the maps, then fill the local slots from logical weights."""
    layer.set_placement(
        placement.physical_to_logical[0], placement.logical_to_physical[0], placement.logical_replica_count[0]
    )
    layer.load_logical_experts(logical)


def brute_route(
    logits: Tensor, top_k: int, groups: int, limited: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Per token, a Python loop: best groups by max score, then top-k experts, renormalised."""
    probs = torch.softmax(logits, dim=-1).tolist()
    num_experts = logits.shape[1]
    per_group = num_experts // groups
    experts, weights = [], []
    for p in probs:
        group_score = [max(p[g * per_group : (g + 1) * per_group]) for g in range(groups)]
        best_groups = sorted(range(groups), key=lambda g: -group_score[g])[:limited]
        allowed = [e for e in range(num_experts) if e // per_group in best_groups]
        top = sorted(allowed, key=lambda e: -p[e])[:top_k]
        total = sum(p[e] for e in top)
        experts.append(top)
        weights.append([p[e] / total for e in top])
    return experts, weights


def brute_load(experts: list[list[int]], placement: Placement, rank: int) -> list[int]:
    """Slot counts: the n-th copy of expert e in (token, k) order goes to replica (n + rank) % count."""
    l2p, count = placement.logical_to_physical[0].tolist(), placement.logical_replica_count[0].tolist()
    seen = [0] * len(count)
    load = [0] * placement.num_physical
    for row in experts:
        for e in row:
            load[l2p[e][(seen[e] + rank) % count[e]]] += 1
            seen[e] += 1
    return load


def grouped_mm_works() -> bool:
    try:
        a, b = torch.randn(8, 8), torch.randn(2, 8, 8)
        torch._grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", ["bmm", "loop", "grouped_mm"])
def test_outputs_and_grads_match_dense_under_random_placements(backend: str) -> None:
    dtype = DT
    if backend == "grouped_mm":
        if not grouped_mm_works():
            pytest.skip("torch._grouped_mm does not run fp32 on this CPU build")
        dtype = torch.float32  # grouped_mm has no float64 kernel
    for seed in range(3):
        ep, dense = make_pair(8, 12, 5, 2, redundant=4, seed=seed, expert_backend=backend)
        ep, dense = ep.to(dtype), dense.to(dtype)
        logical = [t.to(dtype) for t in init_logical_experts(5, 8, 12, seed)]
        apply_placement(ep, random_placement(5, 9, 1, seed), logical)
        x = torch.randn(3, 7, 8, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        g = torch.randn(3, 7, 8, dtype=dtype)
        (ep(x) * g).sum().backward()
        (dense(x_ref) * g).sum().backward()
        ep.sync_replica_grads()
        tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == DT else {"atol": 2e-6, "rtol": 1e-5}
        torch.testing.assert_close(ep(x), dense(x_ref), **tol)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol)
        torch.testing.assert_close(ep.gate.weight.grad, dense.gate.weight.grad, **tol)
        grads = ep.gather_logical([p.grad for p in ep.expert_tensors()])
        for got, want in zip(grads, [dense.w1.grad, dense.w3.grad, dense.w2.grad], strict=True):
            torch.testing.assert_close(got, want, **tol)
        # replicas of one expert carry bit-identical gradients after the sync
        p2l = ep.physical_to_logical
        for p in ep.expert_tensors():
            assert torch.equal(p.grad, p.grad[ep.logical_to_physical[p2l, 0]])


def test_group_limited_routing_matches_brute_force() -> None:
    torch.manual_seed(0)
    for groups, limited, top_k in [(4, 2, 3), (4, 1, 2), (2, 1, 1), (4, 4, 4)]:
        logits = torch.randn(20, 8, dtype=DT)
        weights, experts = route(logits, top_k, groups, limited)
        want_e, want_w = brute_route(logits, top_k, groups, limited)
        assert experts.tolist() == want_e
        torch.testing.assert_close(weights, torch.tensor(want_w, dtype=DT), atol=1e-14, rtol=0)
    ep, dense = make_pair(8, 12, 8, 2, redundant=2, groups=4, expert_backend="bmm")
    assert ep.num_limited_groups == 2  # default max(1, G // 2)
    x = torch.randn(10, 8, dtype=DT)
    torch.testing.assert_close(ep(x), dense(x), atol=1e-12, rtol=1e-10)


def test_load_counts_equal_brute_force_and_spread_evenly() -> None:
    ep, _ = make_pair(8, 12, 4, 2, redundant=4)
    # expert 0 four times (slots 0, 3, 5, 6), expert 1 twice: a hot expert over many slots
    placement = Placement.from_physical_to_logical(torch.tensor([0, 1, 2, 0, 3, 0, 0, 1]), 4, 1)
    apply_placement(ep, placement, [t.to(DT) for t in init_logical_experts(4, 8, 12, 3)])
    x = torch.randn(2, 9, 8, dtype=DT)
    ep.train()
    ep(x)
    experts, _ = brute_route(ep.gate(x.reshape(-1, 8)).detach(), 2, 1, 1)
    want = brute_load(experts, placement, rank=0)
    assert ep.expert_load.tolist() == want
    assert ep.expert_load.dtype == torch.int64 and sum(want) == 18 * 2
    hot = [want[s] for s in (0, 3, 5, 6)]
    assert max(hot) - min(hot) <= 1
    ep(x)  # counts accumulate
    assert ep.expert_load.tolist() == [2 * c for c in want]
    ep.eval()
    ep(x)  # no counting in eval mode
    assert ep.expert_load.tolist() == [2 * c for c in want]
    ep.reset_expert_load()
    assert ep.expert_load.tolist() == [0] * 8


def test_sort_by_slot_equals_the_replica_rule_and_a_stable_sort() -> None:
    """One sort by expert plus arithmetic: the replica of brute_load's rule for any rank
    offset (also ranks beyond an expert's replica count) and the order of a stable argsort
    by slot; with no replicated expert the plain path."""
    gen = torch.Generator().manual_seed(5)
    for seed in range(6):
        physical = 6 if seed == 0 else 13  # seed 0: no replicas
        ep, _ = make_pair(8, 12, 6, 2, redundant=physical - 6)
        placement = random_placement(6, physical, 1, seed)
        ep.set_placement(
            placement.physical_to_logical[0], placement.logical_to_physical[0], placement.logical_replica_count[0]
        )
        l2p, count = placement.logical_to_physical[0].tolist(), placement.logical_replica_count[0].tolist()
        for rank in range(5):
            ep._ep_rank = rank
            expert_C = torch.randint(0, 6, (60,), generator=gen)
            order, slots, count_P = ep._sort_by_slot(expert_C)
            seen, want = [0] * 6, []
            for e in expert_C.tolist():
                want.append(l2p[e][(seen[e] + rank) % count[e]])
                seen[e] += 1
            slot_C = torch.tensor(want)
            assert order.tolist() == torch.argsort(slot_C, stable=True).tolist()
            assert slots.tolist() == sorted(want)
            assert count_P.tolist() == torch.bincount(slot_C, minlength=physical).tolist()


def test_placement_change_with_moved_weights_keeps_outputs() -> None:
    ep, dense = make_pair(8, 12, 6, 3, redundant=3, expert_backend="bmm")
    x = torch.randn(11, 8, dtype=DT)
    before = ep(x)
    for seed in range(3):
        logical = ep.gather_logical(ep.expert_tensors())
        apply_placement(ep, random_placement(6, 9, 1, seed + 10), logical)
        torch.testing.assert_close(ep(x), before, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(dense(x), before, atol=1e-13, rtol=1e-12)


def test_protocol_and_defaults() -> None:
    ep = ExpertParallelMoE(4, 8, 3, 1, num_redundant_experts=3, init_seed=0)
    assert isinstance(ep, BalanceableMoE)
    assert is_balanceable(ep)
    # slot p holds p % E, whatever the number of ranks
    assert ep.physical_to_logical.tolist() == [0, 1, 2, 0, 1, 2]
    assert ep.logical_to_physical.tolist() == [[0, 3, -1, -1], [1, 4, -1, -1], [2, 5, -1, -1]]
    assert ep.logical_replica_count.tolist() == [2, 2, 2]
    assert [tuple(t.shape) for t in ep.expert_tensors()] == [(6, 8, 4), (6, 8, 4), (6, 4, 8)]
    assert "expert_load" not in ep.state_dict()
    assert {"physical_to_logical", "logical_to_physical", "logical_replica_count"} <= set(ep.state_dict())
    # same init_seed, same logical weights; replicas identical
    again = ExpertParallelMoE(4, 8, 3, 1, init_seed=0)
    assert torch.equal(again.w1, ep.w1[:3]) and torch.equal(ep.w2[3:], ep.w2[:3])
    ep.setup_expert_parallel()  # no process group: nothing to do
    assert ep.num_local_experts == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 5}, r"top_k \(5\) must be <= num_experts \(4\)"),
        ({"top_k": 0}, r"top_k \(0\) must be >= 1"),
        ({"num_expert_groups": 3}, r"num_experts \(4\) must be divisible by num_expert_groups \(3\)"),
        ({"num_expert_groups": 2, "num_limited_groups": 3}, r"num_limited_groups \(3\) must lie in"),
        (
            {"num_expert_groups": 4, "num_limited_groups": 1, "top_k": 2},
            r"top_k \(2\) must be <= num_limited_groups",
        ),
        ({"num_redundant_experts": -1}, r"num_redundant_experts \(-1\) must be >= 0"),
        ({"hidden_size": 0}, r"hidden_size \(0\)"),
        ({"expert_backend": "cutlass"}, r"expert_backend \('cutlass'\) must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"hidden_size": 4, "ffn_hidden_size": 8, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ExpertParallelMoE(**args)


def test_bad_placement_and_input_raise() -> None:
    ep = ExpertParallelMoE(4, 8, 4, 2, num_redundant_experts=2, init_seed=0)
    with pytest.raises(ValueError, match=r"physical_to_logical has shape \(5,\), expected \(6,\)"):
        ep.set_placement(torch.zeros(5, dtype=torch.int64), ep.logical_to_physical, ep.logical_replica_count)
    with pytest.raises(ValueError, match=r"expected hidden_size \(4\)"):
        ep(torch.randn(3, 5))


def test_state_dict_physical_and_logical_layouts() -> None:
    ep, dense = make_pair(8, 12, 4, 2, redundant=2, expert_backend="bmm")
    logical = ep.gather_logical(ep.expert_tensors())
    placement = random_placement(4, 6, 1, seed=7)
    apply_placement(ep, placement, logical)
    x = torch.randn(9, 8, dtype=DT)
    want = dense(x)

    # physical state dict: the target adopts the saved placement
    fresh, _ = make_pair(8, 12, 4, 2, redundant=2, seed=99, expert_backend="bmm")
    fresh.load_state_dict(ep.state_dict())
    assert torch.equal(fresh.physical_to_logical, placement.physical_to_logical[0])
    torch.testing.assert_close(fresh(x), want, atol=1e-13, rtol=1e-12)

    # a dense (logical, placement-free) state dict loads into the current placement
    fresh, _ = make_pair(8, 12, 4, 2, redundant=2, seed=99, expert_backend="bmm")
    fresh.load_state_dict(dense.state_dict())
    assert fresh.physical_to_logical.tolist() == [0, 1, 2, 3, 0, 1]
    torch.testing.assert_close(fresh(x), want, atol=1e-13, rtol=1e-12)

    # logical weights plus a saved placement: rows picked by the saved placement
    state = {**dense.state_dict(), **{k: v for k, v in ep.state_dict().items() if "logical" in k}}
    fresh, _ = make_pair(8, 12, 4, 2, redundant=2, seed=99, expert_backend="bmm")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.physical_to_logical, placement.physical_to_logical[0])
    torch.testing.assert_close(fresh(x), want, atol=1e-13, rtol=1e-12)

    # a placement for another number of slots is ignored (logical weights still load)
    state = {
        **dense.state_dict(),
        "physical_to_logical": torch.arange(5),
        "logical_replica_count": torch.ones(5),
    }
    fresh, _ = make_pair(8, 12, 4, 2, redundant=2, seed=99, expert_backend="bmm")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), want, atol=1e-13, rtol=1e-12)

    # a DenseMoE loads a gathered logical state
    round_trip = DenseMoE(8, 12, 4, 2, init_seed=5).to(DT)
    w1, w3, w2 = ep.gather_logical(ep.expert_tensors())
    round_trip.load_state_dict({"gate.weight": ep.gate.weight, "w1": w1, "w3": w3, "w2": w2})
    torch.testing.assert_close(round_trip(x), want, atol=1e-13, rtol=1e-12)


def test_state_dict_layout_marker_when_experts_equal_slots() -> None:
    # E == S == 4: dim 0 cannot tell the layouts apart; the marker decides.
    ep, dense = make_pair(8, 12, 4, 2, expert_backend="bmm")
    perm = Placement.from_physical_to_logical(torch.tensor([2, 0, 3, 1]), 4, 1)
    x = torch.randn(5, 8, dtype=DT)
    marked = {
        **dense.state_dict(),
        "eplb_layout": "logical",
        "physical_to_logical": perm.physical_to_logical[0],
    }
    ep.load_state_dict(marked)
    assert ep.physical_to_logical.tolist() == [2, 0, 3, 1]
    assert torch.equal(ep.w1, dense.w1[[2, 0, 3, 1]])
    torch.testing.assert_close(ep(x), dense(x), atol=1e-13, rtol=1e-12)
    # unmarked: dim 0 == S means physical, taken as is
    ep.load_state_dict({**dense.state_dict(), "physical_to_logical": torch.tensor([0, 1, 2, 3])})
    assert torch.equal(ep.w1, dense.w1)
    with pytest.raises(ValueError, match="eplb_layout"):
        ep.load_state_dict({**dense.state_dict(), "eplb_layout": "sideways"})


def test_built_inside_a_default_device_context() -> None:
    """Lightning's ``configure_model`` on GPUs runs under ``torch.device("cuda")``; a layer
    built there must keep its placement bookkeeping on the host (found on 4 H200s: the
    start placement mixed CUDA and CPU tensors and raised). ``meta`` stands in for CUDA."""
    with torch.device("meta"):
        layer = ExpertParallelMoE(16, 32, 8, 2, num_redundant_experts=4, init_seed=0)
        placement = Placement.contiguous(2, 8, 12, 2)
    assert layer.gate.weight.is_meta and layer.w1.is_meta  # parameters follow the context
    assert layer.physical_to_logical.device.type == "cpu"
    assert layer.physical_to_logical.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert layer.logical_replica_count.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert layer._replicas.local_slots.device.type == "cpu"
    assert placement.logical_to_physical.device.type == "cpu"
    assert placement.logical_to_physical[0, 0].tolist() == [0, 8, -1, -1, -1]
