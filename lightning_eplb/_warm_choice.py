"""Warm starts of flat rows and the choice among them (used by the balanced policy).

:func:`warm_start` brings a previous packing to a target with few changed slots (cycle cover,
drain, swaps; see :mod:`~lightning_eplb._warm`). :func:`flat_warm` runs it at several
targets per row and :func:`spend_budget` keeps, per row, the result that spends the summed
balance budget where it saves most changed slots: balancedness divides by the peaks summed
over layers, so only the sum of the peaks counts, not each layer's.

Shapes: ``B`` rows, ``E`` experts, ``N`` ranks, ``S`` slots per rank, ``T`` tries.
"""

from __future__ import annotations

import numpy as np

from lightning_eplb._packing import PackState, improve, repair, warm_pack
from lightning_eplb._warm import PREOPEN_MIN, cycle_cover, drain
from lightning_eplb._warm_lp import lp_guide

__all__ = ["flat_warm", "pick_rows", "row_peak", "spend_budget", "warm_start"]

#: Passes of :func:`~lightning_eplb._warm.cycle_cover` (the second fixes most of what the
#: first left over, for few slots).
COVER_PASSES = 2
#: A flat row whose warm result stays more than this above its warm target is retried with
#: water-filling counts, then takes the fresh packing (which changes most of its slots).
FALLBACK_TOLERANCE = 1e-3
#: Flat layers spend the balance budget where it saves most slots: the cycle warm start runs
#: at ``LOW_SHARE`` times each row's tolerance on every row and at ``HIGH_SHARE`` times it on
#: the ``HIGH_ROWS`` share of rows that changed most slots at the low one; each row then keeps
#: one result, chosen so that the summed peak over the rows stays within the summed
#: tolerance (:func:`spend_budget`). Balancedness sums peaks over layers, so only the sum counts.
LOW_SHARE = 2.0 / 3.0
HIGH_SHARE = 5.0 / 3.0
HIGH_ROWS = 0.5
#: The warm start with swaps alone (no cycles) is tried only with at least this many slots per
#: rank: with fewer the cycles win (at 4 slots per rank on the shared loads, on 2 of 464 rows).
SWAPS_MIN_PER_RANK = 5
#: Each cycle target is tried twice from one LP guide (:func:`_two_roundings`): the guide's
#: rooms opened first above ``PREOPEN_MIN``, and above this (one rounding of the relaxation
#: suits some rows, the other others; the budget spending keeps the better per row).
ALT_PREOPEN_MIN = 0.5
#: ... only with at most this many slots per rank (EP32 drift, 9 per rank: 16.8 -> 16.4% for
#: a third more time per warm call; at 4 per rank, EP72: 24.7 -> 24.2%).
ALT_MAX_PER_RANK = 4


def _prepare(previous_BNS: np.ndarray, load_BE: np.ndarray, count_BE: np.ndarray) -> PackState:
    """The previous packing with the new counts (:func:`~lightning_eplb._packing.warm_pack`),
    repaired, with ``home`` set to the previous placement."""
    warm = warm_pack(previous_BNS, load_BE, count_BE)
    repair(warm)
    warm.home = previous_BNS
    return warm


def warm_start(
    previous_BNS: np.ndarray,
    load_BE: np.ndarray,
    count_BE: np.ndarray,
    target_B: np.ndarray,
    cycles: bool = True,
    best_fit: bool = True,
    guided: bool = True,
    lp_iterations: int | None = None,
    guide_BNS: np.ndarray | None = None,
    preopen_min: np.ndarray | None = None,
    prepared: PackState | None = None,
) -> PackState:
    """Packing from a previous one with few changed slots, each row at or near its target.

    With ``cycles`` the overloaded ranks are first fixed along cycles and strict swaps
    (:mod:`~lightning_eplb._warm`), then by swaps from the heaviest rank; without, by
    those swaps alone. With ``guided`` the first cover pass opens the rooms of the LP guide
    first and follows it (:mod:`~lightning_eplb._warm_lp`): ``guide_BNS`` (``(B, N, S)``)
    if given, else one of ``lp_iterations`` steps computed here.
    ``preopen_min`` (``(B,)``, default ``PREOPEN_MIN``) is the guide above which a room is
    opened first; ``prepared`` (from :func:`_prepare` on these rows) saves rebuilding the start.
    """
    warm = prepared if prepared is not None else _prepare(previous_BNS, load_BE, count_BE)
    if cycles:
        guide = None
        if guided:
            guide = lp_guide(warm, target_B, lp_iterations) if guide_BNS is None else guide_BNS
        for i in range(COVER_PASSES):  # the guide steers the first pass only
            cycle_cover(warm, target_B, best_fit, guide if i == 0 else None, preopen=i == 0, preopen_min=preopen_min)
        repair(warm)
        drain(warm, target_B)
    improve(warm, target_B, few_moves=True)
    # rows the few-moves scoring left above the target get the balance-first swaps
    improve(warm, target_B)
    return warm


def row_peak(load_BE: np.ndarray, expert_BNS: np.ndarray) -> np.ndarray:
    """``(B,)`` heaviest rank of a flat packing, replicas sharing their expert's load."""
    num_rows, num_experts = load_BE.shape
    count_BE = np.zeros((num_rows, num_experts), dtype=np.int64)
    np.add.at(count_BE, (np.arange(num_rows)[:, None, None], expert_BNS), 1)
    per_replica_BE = load_BE / np.maximum(count_BE, 1)
    return (
        np.take_along_axis(per_replica_BE, expert_BNS.reshape(num_rows, -1), 1)
        .reshape(expert_BNS.shape)
        .sum(-1)
        .max(1)
    )


def pick_rows(
    tries: list[np.ndarray], previous_BNS: np.ndarray, load_BE: np.ndarray, limit_B: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the packing within the limit that changes fewest slots, else the lowest peak.

    Args:
        tries: packings ``(B, N, S)`` of the same rows.
        previous_BNS: ``(B, N, S)`` previous expert of each slot.
        load_BE: ``(B, E)`` loads.
        limit_B: ``(B,)`` highest acceptable rank load.

    Returns:
        ``(expert_BNS, peak_B)`` of the chosen packings.
    """
    peaks = np.stack([row_peak(load_BE, t) for t in tries])
    moved = np.stack([(t != previous_BNS).sum((1, 2)) for t in tries])
    worst = previous_BNS[0].size + 1
    key = np.where(peaks <= limit_B, moved, worst + peaks / np.maximum(peaks.max(0), 1e-300))
    pick = key.argmin(0)
    rows = np.arange(len(limit_B))
    return np.stack(tries)[pick, rows], peaks[pick, rows]


def spend_budget(
    tries: list[np.ndarray],
    previous_BNS: np.ndarray,
    load_BE: np.ndarray,
    fresh_B: np.ndarray,
    budget: float,
    valid_TB: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row one of the tries: fewest changed slots while the summed peak stays in budget.

    Minimises ``moved + lam * (peak - fresh) / fresh`` per row, with the smallest ``lam``
    (bisection) whose choice keeps ``sum(peak - fresh) <= budget``; with no such ``lam``, the
    lowest peak. Only valid tries count.

    Args:
        tries: ``T`` packings ``(B, N, S)`` of the same rows.
        previous_BNS: ``(B, N, S)`` previous expert of each slot.
        load_BE: ``(B, E)`` loads.
        fresh_B: ``(B,)`` heaviest rank of a fresh packing (positive).
        budget: largest accepted ``sum(peak - fresh)`` over the rows.
        valid_TB: ``(T, B)`` bool: the try may be chosen for the row.

    Returns:
        ``(expert_BNS, peak_B, chosen_B)``; ``chosen_B`` is False where no try was valid.
    """
    peaks = np.stack([row_peak(load_BE, t) for t in tries])
    moved = np.stack([(t != previous_BNS).sum((1, 2)) for t in tries]).astype(np.float64)
    over = (peaks - fresh_B) / fresh_B
    rows = np.arange(len(fresh_B))
    chosen_B: np.ndarray = np.asarray(valid_TB.any(0))

    def pick(lam: float) -> np.ndarray:
        return np.where(valid_TB, moved + lam * over, np.inf).argmin(0)

    def spent(choice: np.ndarray) -> float:
        return float(np.where(chosen_B, peaks[choice, rows] - fresh_B, 0.0).sum())

    lo, hi = 0.0, 1.0
    while spent(pick(hi)) > budget and hi < 1e12:
        hi *= 8.0
    choice = pick(hi)
    if spent(choice) <= budget and spent(pick(lo)) > budget:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if spent(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        choice = pick(hi)
    elif spent(pick(lo)) <= budget:
        choice = pick(lo)
    return np.stack(tries)[choice, rows], peaks[choice, rows], chosen_B


def _two_roundings(
    previous_BNS: np.ndarray,
    load_BE: np.ndarray,
    count_BE: np.ndarray,
    target_B: np.ndarray,
    lp_iterations: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Guided warm starts of the same rows at one target, the LP guide's rooms opened first
    above ``PREOPEN_MIN`` and above ``ALT_PREOPEN_MIN`` (one LP solve, one stacked batch);
    with more than ``ALT_MAX_PER_RANK`` slots per rank the first only, twice.

    Args:
        previous_BNS: ``(B, N, S)`` previous expert of each slot.
        load_BE: ``(B, E)`` loads.
        count_BE: ``(B, E)`` replica counts.
        target_B: ``(B,)`` rank load to reach.
        lp_iterations: steps of the LP guide (default ``LP_ITERATIONS``).

    Returns:
        two ``(B, N, S)`` expert arrays.
    """
    num_rows = previous_BNS.shape[0]
    state = _prepare(previous_BNS, load_BE, count_BE)
    guide = lp_guide(state, target_B, lp_iterations)
    if previous_BNS.shape[2] > ALT_MAX_PER_RANK:
        one = warm_start(previous_BNS, load_BE, count_BE, target_B, guide_BNS=guide, prepared=state).expert
        return one, one
    stacked = PackState(
        *(np.concatenate([x, x]) for x in (state.expert, state.load, state.rank_load, state.copies, previous_BNS))
    )
    thresholds = np.repeat([PREOPEN_MIN, ALT_PREOPEN_MIN], num_rows)
    both = warm_start(
        np.concatenate([previous_BNS, previous_BNS]),
        np.concatenate([load_BE, load_BE]),
        np.concatenate([count_BE, count_BE]),
        np.concatenate([target_B, target_B]),
        guide_BNS=np.concatenate([guide, guide]),
        preopen_min=thresholds,
        prepared=stacked,
    ).expert
    return both[:num_rows], both[num_rows:]


def flat_warm(
    previous_BNS: np.ndarray,
    load_BE: np.ndarray,
    count_BE: np.ndarray,
    fresh_B: np.ndarray,
    tolerance_B: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warm results of flat rows (one row per layer) with the balance budget spent per row.

    Tries the cycle warm start at ``LOW_SHARE`` of each row's tolerance (every row) and at
    ``HIGH_SHARE`` of it (the ``HIGH_ROWS`` share of rows it moved most at the low one), and,
    with at least ``SWAPS_MIN_PER_RANK`` slots per rank, swaps alone at the tolerance; the
    summed peak stays within ``sum(fresh * tolerance)``.

    Args:
        previous_BNS: ``(B, N, S)`` previous expert of each slot.
        load_BE: ``(B, E)`` loads.
        count_BE: ``(B, E)`` replica counts.
        fresh_B: ``(B,)`` positive reference peak (a fresh packing's, or the lower bound).
        tolerance_B: ``(B,)`` relative balance budget of each row.

    Returns:
        ``(expert_BNS, peak_B, chosen_B)`` as :func:`spend_budget`.
    """
    low_B, mid_B, high_B = (fresh_B * (1 + share * tolerance_B) for share in (LOW_SHARE, 1.0, HIGH_SHARE))
    low, low_alt = _two_roundings(previous_BNS, load_BE, count_BE, low_B)
    moved_B = (low != previous_BNS).sum((1, 2))
    # the rows that moved most, and those the low target left above it
    stuck_B = row_peak(load_BE, low) > low_B * (1 + FALLBACK_TOLERANCE)
    busy = np.nonzero((moved_B >= np.quantile(moved_B, 1.0 - HIGH_ROWS)) | stuck_B)[0]
    # the second target: the tolerance itself where the low one was out of reach, else higher
    second_B = np.where(stuck_B, mid_B, high_B)
    high, high_alt = low.copy(), low.copy()
    high[busy], high_alt[busy] = _two_roundings(previous_BNS[busy], load_BE[busy], count_BE[busy], second_B[busy])
    tries, targets = [low, high, low_alt, high_alt], [low_B, second_B, low_B, second_B]
    if previous_BNS.shape[2] >= SWAPS_MIN_PER_RANK:
        tries.append(warm_start(previous_BNS, load_BE, count_BE, mid_B, cycles=False).expert)
        targets.append(mid_B)
    valid_TB = np.stack(
        [row_peak(load_BE, t) <= g * (1 + FALLBACK_TOLERANCE) for t, g in zip(tries, targets, strict=True)]
    )
    # only rows that can be chosen here share the budget: the others are retried later with
    # their own tolerance, so lending their share to these would exceed the summed bound
    budget = float((fresh_B * tolerance_B)[valid_TB.any(0)].sum())
    return spend_budget(tries, previous_BNS, load_BE, fresh_B, budget, valid_TB)
