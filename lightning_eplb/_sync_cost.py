"""What the replica-gradient sync of a placement sends: who holds each replicated expert,
and how many expert-sized rows each rank sends per sync under the plan
:class:`~lightning_eplb._replica_sync.ReplicaIndex` picks (point-to-point for experts held
by at most ``t`` ranks, one all-reduce over the EP group for the others).

Used by the sync's planner itself, and by the offline simulator to price a placement.

Shapes: ``P`` physical slots, ``E`` logical experts, ``N`` ranks of ``S`` consecutive slots.
"""

from __future__ import annotations

from collections.abc import Sequence


def holders_of(p2l: Sequence[int], replica_count: Sequence[int], num_slots: int) -> dict[int, list[int]]:
    """The ranks holding each expert with more than one replica, increasing (a rank holding
    an expert in several slots appears once; such an expert may have one holder only)."""
    holders: dict[int, list[int]] = {e: [] for e, c in enumerate(replica_count) if c > 1}
    for p, e in enumerate(p2l):
        if e in holders and (not holders[e] or holders[e][-1] != p // num_slots):
            holders[e].append(p // num_slots)  # slots are in rank order: sorted, unique
    return holders


def ring_rows(num_ranks: int) -> float:
    """Rows one rank sends per row of an all-reduce over ``num_ranks`` (ring: reduce-scatter
    then all-gather)."""
    return 2.0 * (num_ranks - 1) / num_ranks


def rows_per_rank(holders: dict[int, list[int]], num_ranks: int, t: int) -> list[float]:
    """Expert-sized rows each rank sends per sync when experts held by at most ``t`` ranks
    go point-to-point (each holder to every other) and the rest through one all-reduce
    (``2 (N - 1) / N`` rows per expert on every rank)."""
    per_rank = [0.0] * num_ranks
    all_reduced = 0
    for hs in holders.values():
        if len(hs) > t:
            all_reduced += 1
        else:
            for r in hs:
                per_rank[r] += len(hs) - 1
    return [rows + ring_rows(num_ranks) * all_reduced for rows in per_rank]


def pick_max_p2p_holders(holders: dict[int, list[int]], num_ranks: int) -> int:
    """The ``t`` with the fewest rows sent by the busiest rank (ties: the larger ``t``:
    point-to-point needs no zero-filled buffer and sums in place)."""
    return min(range(1, num_ranks + 1), key=lambda t: (max(rows_per_rank(holders, num_ranks, t)), -t))


def sync_rows(p2l: Sequence[int], replica_count: Sequence[int], num_slots: int) -> list[float]:
    """Rows each rank sends per sync of one layer under the plan the sync picks.

    Example:
        >>> sync_rows([0, 1, 2, 0, 3, 4], [2, 1, 1, 1, 1], num_slots=2)  # expert 0 on ranks 0, 1
        [1.0, 1.0, 0.0]
    """
    p2l, replica_count = [int(e) for e in p2l], [int(c) for c in replica_count]
    num_ranks = len(p2l) // num_slots
    holders = holders_of(p2l, replica_count, num_slots)
    return rows_per_rank(holders, num_ranks, pick_max_p2p_holders(holders, num_ranks))
