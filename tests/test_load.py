"""ExpertLoadWindow, logical_load and token_statistics against brute-force references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_eplb.load import ExpertLoadWindow, logical_load, token_statistics
from tests._dist import spawn

L, E, P = 2, 3, 4


def _steps(num_steps: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random counts ``(L, P)`` and a placement ``(L, P)`` per step (the placement changes)."""
    g = torch.Generator().manual_seed(seed)
    counts = [torch.randint(0, 50, (L, P), generator=g) for _ in range(num_steps)]
    p2ls = [
        torch.stack(
            [
                torch.cat([torch.randperm(E, generator=g), torch.randint(0, E, (P - E,), generator=g)])
                for _ in range(L)
            ]
        )
        for _ in range(num_steps)
    ]
    return counts, p2ls


def _brute_logical(counts_LP: torch.Tensor, p2l_LP: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(L, E, dtype=torch.int64)
    for layer in range(L):
        for slot in range(P):
            out[layer, p2l_LP[layer, slot]] += counts_LP[layer, slot]
    return out


def test_logical_load_sums_replicas():
    # slots 0 and 2 hold expert 0: 3 + 2 = 5; slot 1 holds expert 1; expert 2 has no slot here.
    assert logical_load(torch.tensor([[3, 1, 2]]), torch.tensor([[0, 1, 0]]), 3).tolist() == [[5, 1, 0]]
    counts, p2ls = _steps(1, 0)
    assert torch.equal(logical_load(counts[0], p2ls[0], E), _brute_logical(counts[0], p2ls[0]))
    with pytest.raises(ValueError, match="shape"):
        logical_load(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int64), 3)


@pytest.mark.parametrize("window", [1, 3, 10])
def test_window_keeps_last_steps(window):
    counts, p2ls = _steps(7, seed=window)
    w = ExpertLoadWindow(L, E, P, window)
    for c, p in zip(counts, p2ls, strict=True):
        w.update(c, p)
    kept = range(max(0, 7 - window), 7)
    load = w.compute()
    assert torch.equal(load.slot_LP, sum(counts[k] for k in kept))
    # each step's counts are summed into experts with the placement that routed them
    assert torch.equal(load.logical_LE, sum(_brute_logical(counts[k], p2ls[k]) for k in kept))
    assert int(load.num_steps) == len(kept)
    assert load.slot_LP.dtype == load.logical_LE.dtype == torch.int64


def test_token_statistics_brute_force():
    g = torch.Generator().manual_seed(3)
    slot_LP = torch.randint(0, 100, (3, 8), generator=g)
    for num_ranks in (1, 2, 4, 8):
        slots = 8 // num_ranks
        rank_LN = torch.tensor(
            [
                [float(slot_LP[layer, r * slots : (r + 1) * slots].sum()) for r in range(num_ranks)]
                for layer in range(3)
            ],
            dtype=torch.float64,
        )
        stats = token_statistics(slot_LP, num_ranks, num_steps=5)
        peak, mean = rank_LN.max(1).values.sum() / 5, rank_LN.mean(1).sum() / 5
        assert torch.allclose(stats.max_tokens, peak) and torch.allclose(stats.avg_tokens, mean)
        assert torch.allclose(stats.balancedness, mean / peak)
    # edge cases: no load is perfectly balanced; one rank taking everything gives 1 / N
    assert float(token_statistics(torch.zeros(1, 4, dtype=torch.int64), 2).balancedness) == 1.0
    assert float(token_statistics(torch.tensor([[9, 0, 0, 0]]), 4).balancedness) == 0.25
    with pytest.raises(ValueError, match="divisible"):
        token_statistics(torch.zeros(1, 6), 4)


def test_global_state_round_trip_and_resize():
    counts, p2ls = _steps(5, seed=7)
    w = ExpertLoadWindow(L, E, P, 3)
    for c, p in zip(counts, p2ls, strict=True):
        w.update(c, p)
    state = w.global_state()  # no process group: this rank's window
    assert state["slot_counts"].device.type == "cpu" and int(state["cursor"]) == 5
    for new_window, kept in ((3, [2, 3, 4]), (2, [3, 4]), (6, [2, 3, 4])):
        other = ExpertLoadWindow(L, E, P, new_window)
        assert other.load_global_state(state)
        load = other.compute()
        assert torch.equal(load.slot_LP, sum(counts[k] for k in kept))
        assert int(load.num_steps) == len(kept)
        # the next step pushes out the oldest kept one once the window is full
        other.update(counts[0], p2ls[0])
        kept_after = [*kept, 0][-new_window:]
        assert torch.equal(other.compute().slot_LP, sum(counts[k] for k in kept_after))
    empty = ExpertLoadWindow(L, E, P, 3)
    assert empty.load_global_state(state, keep=False)
    assert int(empty.compute().slot_LP.sum()) == 0 and int(empty.compute().num_steps) == 3
    assert not ExpertLoadWindow(L, E, P + 1, 3).load_global_state(state)  # other shape: refused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_size": 0}, "window_size"),
        ({"num_layers": True}, "num_layers"),
        ({"num_physical": 2}, "num_physical"),
        ({"sync_on_compute": True}, "sync_on_compute"),
    ],
)
def test_window_bad_arguments(kwargs, message):
    args = {"num_layers": L, "num_logical": E, "num_physical": P, "window_size": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        ExpertLoadWindow(**args)
    w = ExpertLoadWindow(L, E, P, 2)
    with pytest.raises(ValueError, match=r"shape \(L, P\)"):
        w.update(torch.zeros(L, P + 1), torch.zeros(L, P + 1, dtype=torch.int64))


def _run_reduce(rank: int, world_size: int) -> None:
    counts, p2ls = _steps(4, seed=100)  # same placements on every rank, counts differ by rank
    mine = [c * (rank + 1) for c in counts]
    w = ExpertLoadWindow(L, E, P, 3)
    for c, p in zip(mine, p2ls, strict=True):
        w.update(c, p)
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        load = w.compute()
    finally:
        dist.all_reduce = real
    assert len(calls) == 1, calls  # one all-reduce of L * (P + E) values, not the whole window
    assert calls[0] == (L * (P + E) + 2,)  # + the two extreme-count flags
    total = sum(range(1, world_size + 1))
    assert torch.equal(load.slot_LP, total * sum(counts[1:]))
    assert torch.equal(load.logical_LE, total * sum(_brute_logical(counts[k], p2ls[k]) for k in (1, 2, 3)))
    # checkpoint path: every rank gets the global window; rank 0 alone keeps it on load
    state = w.global_state()
    again = ExpertLoadWindow(L, E, P, 3)
    assert again.load_global_state(state, keep=rank == 0)
    assert torch.equal(again.compute().slot_LP, load.slot_LP)


def test_window_reduces_over_ranks_with_one_all_reduce():
    spawn(_run_reduce, world_size=2)
