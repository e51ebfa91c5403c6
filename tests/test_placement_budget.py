"""The balance budget of a warm call is spent per layer where it saves most changed slots."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_eplb._packing import replica_counts
from lightning_eplb._warm import sticky_counts
from lightning_eplb._warm_choice import FALLBACK_TOLERANCE, HIGH_SHARE, flat_warm, row_peak, spend_budget
from lightning_eplb.placement import rebalance


def _tries_with_known_cost(
    rng: np.random.Generator, rows: int, num_tries: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tries over one rank of one slot per expert: peak = the slot's load, moved = 0 or 1."""
    # (T, B, 1, 1): each try puts one expert of the row on the only slot
    num_experts = num_tries
    load_BE = rng.random((rows, num_experts)) + 1.0
    previous_BNS = np.zeros((rows, 1, 1), dtype=np.int64)
    tries = [np.full((rows, 1, 1), t, dtype=np.int64) for t in range(num_tries)]
    fresh_B = load_BE.min(1) * 0.999
    valid_TB = rng.random((num_tries, rows)) < 0.8
    valid_TB[0] = True
    return tries, previous_BNS, load_BE, fresh_B, valid_TB


@pytest.mark.parametrize("seed", range(6))
def test_spend_budget_is_optimal_for_what_it_spends(seed):
    rng = np.random.default_rng(seed)
    rows, num_tries = 5, 3
    tries, previous_BNS, load_BE, fresh_B, valid_TB = _tries_with_known_cost(rng, rows, num_tries)
    peaks_TB = np.stack([row_peak(load_BE, t) for t in tries])
    moved_TB = np.stack([(t != previous_BNS).sum((1, 2)) for t in tries])
    # a budget between the cheapest and the dearest valid choice
    low = np.where(valid_TB, peaks_TB, np.inf).min(0).sum() - fresh_B.sum()
    high = np.where(valid_TB, peaks_TB, -np.inf).max(0).sum() - fresh_B.sum()
    budget = low + rng.random() * (high - low)
    expert_BNS, peak_B, chosen_B = spend_budget(tries, previous_BNS, load_BE, fresh_B, budget, valid_TB)
    assert chosen_B.all()
    choice_B = expert_BNS[:, 0, 0]
    assert valid_TB[choice_B, np.arange(rows)].all()
    np.testing.assert_allclose(peak_B, peaks_TB[choice_B, np.arange(rows)])
    spent = float((peak_B - fresh_B).sum())
    moved = int(moved_TB[choice_B, np.arange(rows)].sum())
    assert spent <= budget + 1e-12
    # brute force: no valid choice spends at most as much and moves fewer slots
    for combo in itertools.product(range(num_tries), repeat=rows):
        pick = np.array(combo)
        if not valid_TB[pick, np.arange(rows)].all():
            continue
        if (peaks_TB[pick, np.arange(rows)] - fresh_B).sum() <= spent + 1e-12:
            assert moved_TB[pick, np.arange(rows)].sum() >= moved


def test_spend_budget_takes_the_lowest_peaks_when_the_budget_is_out_of_reach():
    rng = np.random.default_rng(0)
    tries, previous_BNS, load_BE, fresh_B, valid_TB = _tries_with_known_cost(rng, 4, 3)
    _, peak_B, chosen_B = spend_budget(tries, previous_BNS, load_BE, fresh_B, -1.0, valid_TB)
    peaks_TB = np.stack([row_peak(load_BE, t) for t in tries])
    np.testing.assert_allclose(peak_B, np.where(valid_TB, peaks_TB, np.inf).min(0))
    assert chosen_B.all()


def test_flat_warm_spends_the_summed_budget_not_each_rows():
    # EP72's shape scaled down: 4 slots per rank; a fresh call, then one after a drift
    gen = torch.Generator().manual_seed(5)
    load = torch.rand(12, 128, generator=gen, dtype=torch.float64) ** 3 * 1000 + 1
    first = rebalance(load, 144, 36)
    drifted = (load * torch.exp(0.15 * torch.randn(load.shape, generator=gen, dtype=torch.float64))).numpy()
    fresh = rebalance(torch.from_numpy(drifted), 144, 36)
    previous_BNS = first.physical_to_logical.numpy().reshape(12, 36, 4)
    count_BE = sticky_counts(previous_BNS, drifted, replica_counts(drifted, 144, 36))
    fresh_B = fresh.rank_loads(torch.from_numpy(drifted)).max(1).values.numpy()
    tolerance_B = np.full(12, 1.5e-3)
    expert_BNS, peak_B, chosen_B = flat_warm(previous_BNS, drifted, count_BE, fresh_B, tolerance_B)
    np.testing.assert_allclose(peak_B, row_peak(drifted, expert_BNS))
    rows = np.nonzero(chosen_B)[0]
    assert len(rows) >= 8  # this seed: 9 of 12; solve_flat retries the others
    # within the summed budget; some rows spend more than their own share, others less
    budget = (fresh_B[rows] * tolerance_B[rows]).sum() * (1 + FALLBACK_TOLERANCE)
    assert (peak_B[rows] - fresh_B[rows]).sum() <= budget
    over_B = peak_B[rows] / fresh_B[rows] - 1
    assert (over_B <= HIGH_SHARE * 1.5e-3 * (1 + FALLBACK_TOLERANCE) + 1e-12).all()
    assert over_B.max() > 1.5e-3 > over_B.min()
    # each row holds the replica counts it was asked for
    for b in range(12):
        np.testing.assert_array_equal(np.bincount(expert_BNS[b].ravel(), minlength=128), count_BE[b])
