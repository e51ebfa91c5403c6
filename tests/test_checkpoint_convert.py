"""gather_logical / scatter_logical against a slot-by-slot brute force, on 1, 2 and 3 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_eplb.checkpoint import gather_logical, scatter_logical
from tests._dist import spawn


def _brute_gather(full_P: torch.Tensor, p2l: list[int], num_logical: int) -> torch.Tensor:
    """Logical expert e := the lowest slot that holds it (a plain loop)."""
    rows = []
    for e in range(num_logical):
        rows.append(full_P[p2l.index(e)])
    return torch.stack(rows)


def _brute_scatter(logical_E: torch.Tensor, p2l: list[int], rank: int, num_ranks: int) -> torch.Tensor:
    per_rank = len(p2l) // num_ranks
    return torch.stack([logical_E[p2l[p]] for p in range(rank * per_rank, (rank + 1) * per_rank)])


# (E, p2l): contiguous with replicas, a shuffled one, one expert everywhere but one slot,
# and E == P (no redundancy). P is 6 so that 1, 2 and 3 ranks all divide it.
_CASES = [
    (4, [0, 1, 2, 3, 0, 1]),
    (4, [3, 1, 3, 0, 2, 1]),
    (2, [1, 1, 1, 0, 1, 1]),
    (6, [5, 4, 3, 2, 1, 0]),
]


def _check_all(rank: int, num_ranks: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for num_logical, p2l in _CASES:
        per_rank = len(p2l) // num_ranks
        for dtype, shape in [(torch.float32, (3, 2)), (torch.bfloat16, (5,)), (torch.int64, ())]:
            # every slot different, so the test sees which replica was taken
            full_P = (torch.randn(len(p2l), *shape, generator=gen) * 100).to(dtype)
            local_S = full_P[rank * per_rank : (rank + 1) * per_rank].clone()
            got = gather_logical(local_S, torch.tensor(p2l), num_logical=num_logical)
            expected = _brute_gather(full_P, p2l, num_logical)
            assert got.dtype == dtype and got.shape == (num_logical, *shape)
            assert torch.equal(got, expected), (p2l, dtype)
            # chunked along dim 1 (one column per all_gather at 1 byte), result on CPU
            chunked = gather_logical(
                local_S, torch.tensor(p2l), num_logical=num_logical, out_device="cpu", max_buffer_bytes=1
            )
            assert torch.equal(chunked, expected), (p2l, dtype)
            # scatter takes this rank's rows; scatter after gather of consistent replicas is identity
            logical = (torch.randn(num_logical, *shape, generator=gen) * 100).to(dtype)
            mine = scatter_logical(logical, torch.tensor(p2l), rank, num_ranks)
            assert torch.equal(mine, _brute_scatter(logical, p2l, rank, num_ranks))
            again = gather_logical(mine, torch.tensor(p2l), num_logical=num_logical)
            assert torch.equal(again, logical)
    # bad input fails on every rank alike before any collective (no hang)
    with pytest.raises(ValueError, match="slots per rank times ranks must equal P"):
        gather_logical(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="logical expert 2 has no physical slot"):
        gather_logical(torch.zeros(6 // num_ranks), torch.tensor([0, 1, 3, 3, 0, 1]), num_logical=4)
    # one more collective proves every rank is still in step
    flag = torch.ones(1)
    if dist.is_initialized():
        dist.all_reduce(flag)
    assert int(flag) == num_ranks


def _run_convert(rank: int, world_size: int) -> None:
    _check_all(rank, world_size)


def test_gather_scatter_one_process() -> None:
    _check_all(0, 1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_scatter_gloo(world_size: int) -> None:
    spawn(_run_convert, world_size=world_size)


def test_scatter_rejects_bad_input() -> None:
    logical = torch.arange(4.0)
    with pytest.raises(ValueError, match=r"num_physical \(6\) must be divisible by num_ranks \(4\)"):
        scatter_logical(logical, torch.tensor([0, 1, 2, 3, 0, 1]), 0, 4)
    with pytest.raises(ValueError, match=r"rank \(2\) must lie in \[0, num_ranks=2\)"):
        scatter_logical(logical, torch.tensor([0, 1, 2, 3, 0, 1]), 2, 2)
    with pytest.raises(ValueError, match="the logical tensor has 4 rows"):
        scatter_logical(logical, torch.tensor([0, 1, 2, 4, 0, 1]), 0, 2)
    with pytest.raises(ValueError, match=r"max_buffer_bytes \(0\) must be >= 1"):
        gather_logical(torch.zeros(6, 2), torch.tensor([0, 1, 2, 3, 0, 1]), max_buffer_bytes=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_logical=3\)"):
        gather_logical(torch.zeros(6), torch.tensor([0, 1, 2, 3, 0, 1]), num_logical=3)
