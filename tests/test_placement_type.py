"""The Placement type: derived maps, loads and validity, on hand-worked cases."""

import pytest
import torch

from lightning_eplb.placement import Placement


def test_maps_agree_on_deepseek_readme_layer():
    # Layer 0 of DeepSeek's README example: 12 experts, 16 slots, 8 ranks.
    p2l = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]])
    p = Placement.from_physical_to_logical(p2l, num_logical=12, num_ranks=8)
    assert p.logical_replica_count.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]]
    assert p.logical_to_physical.shape == (1, 12, 5)  # M = 16 - 12 + 1
    assert p.logical_to_physical[0, 5].tolist() == [0, 2, -1, -1, -1]
    assert p.logical_to_physical[0, 1].tolist() == [13, 15, -1, -1, -1]
    # every listed slot holds its expert
    l2p = p.logical_to_physical[0]
    for e in range(12):
        slots = l2p[e][l2p[e] >= 0]
        assert (p2l[0, slots] == e).all()
    p.validate()


def test_rank_loads_and_balancedness_by_hand():
    # 4 experts, 6 slots on 2 ranks: slots [0,1,2 | 3,0,1]
    p = Placement.contiguous(1, 4, 6, 2)
    load = torch.tensor([[6.0, 2.0, 3.0, 1.0]])
    # rank 0: 6/2 + 2/2 + 3 = 7; rank 1: 1 + 6/2 + 2/2 = 5
    assert p.rank_loads(load).tolist() == [[7.0, 5.0]]
    assert p.balancedness(load) == pytest.approx(6.0 / 7.0)
    assert p.balancedness(torch.zeros(1, 4)) == 1.0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="divisible by num_ranks"):
        Placement.contiguous(1, 4, 6, 4)
    with pytest.raises(ValueError, match="has no physical slot"):
        Placement.from_physical_to_logical(torch.tensor([[0, 0, 1, 1]]), 3, 2)
    with pytest.raises(ValueError, match=r"\[0, num_logical=2\)"):
        Placement.from_physical_to_logical(torch.tensor([[0, 2]]), 2, 1)
    bad = Placement.from_physical_to_logical(torch.tensor([[0, 0, 1, 2]]), 3, 2)
    with pytest.raises(ValueError, match="two replicas of expert 0"):
        bad.validate()
