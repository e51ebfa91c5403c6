"""Building blocks of the balanced policy, vectorised over a batch of independent rows.

A row is one layer (or one layer on one node). Its ``X`` items (replicas) go into ``N``
bins (ranks) of exactly ``S`` items each. The state of a row is kept bin by bin:
``expert_BNS[b, r, s]`` is the expert of the item at local slot ``s`` of rank ``r`` and
``load_BNS`` its load, so a physical slot ``p`` is ``(p // S, p % S)``.

Shapes: ``B`` rows, ``E`` experts per row, ``N`` ranks, ``S`` slots per rank, ``X = N * S``.

The spread rule keeps every placement valid: a rank may hold one more replica of an expert
than another rank, never two more. With at most ``N`` replicas this is exactly "no rank
holds two replicas of an expert that some rank lacks".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Partner ranks searched first for a swap with the heaviest rank (the lightest ones).
LIGHT_PARTNERS = 8
#: With a home packing, a swap's score drops by this fraction of the target per slot it changes.
MOVE_PENALTY = 2e-5
#: :func:`improve` stops after ``ROUNDS_PER_SLOT * slots + 16`` rounds whatever happens.
ROUNDS_PER_SLOT = 2

__all__ = [
    "PackState",
    "improve",
    "kk_pack",
    "repair",
    "replica_counts",
    "warm_pack",
]


def replica_counts(load_BE: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Water-filling: replica counts minimising the heaviest replica ``max_e load_e / count_e``.

    Equivalent to giving each extra slot, one at a time, to the expert with the highest load
    per replica (lowest index on ties). An expert gets at most ``num_ranks`` replicas, one
    per rank, unless there are more slots than ``E * num_ranks``, then at most a multiple of
    ``num_ranks``. (More can still help the packing: 3 replicas on 2 ranks split an expert
    2:1; ``_policy_balanced._search_counts`` goes past the cap in small rows.)

    Args:
        load_BE: ``(B, E)`` non-negative float64 loads.
        num_slots: ``X >= E`` slots per row.
        num_ranks: ``N``.

    Returns:
        ``(B, E)`` int64 counts, each row summing to ``X``.
    """
    num_rows, num_experts = load_BE.shape
    cap = num_ranks * -(-num_slots // (num_experts * num_ranks))
    extra = num_slots - num_experts
    count_BE = np.ones((num_rows, num_experts), dtype=np.int64)
    if extra == 0:
        return count_BE
    # Bisection on the water level t: counts min(cap, max(1, ceil(load / t))) never exceed
    # the greedy ones while their sum stays <= X; the greedy loop below adds the rest.
    total_B1 = load_BE.sum(1, keepdims=True)
    lo_B1 = total_B1 / num_slots * 0.5
    hi_B1 = np.maximum(np.maximum(total_B1 / extra, load_BE.max(1, keepdims=True) / cap), 1e-300)
    for _ in range(16):
        mid_B1 = 0.5 * (lo_B1 + hi_B1)
        over_B1 = (
            np.minimum(cap, np.maximum(1.0, np.ceil(load_BE / mid_B1))).sum(1, keepdims=True) > num_slots
        )
        lo_B1 = np.where(over_B1, mid_B1, lo_B1)
        hi_B1 = np.where(over_B1, hi_B1, mid_B1)
    count_BE = np.minimum(cap, np.maximum(1.0, np.ceil(load_BE / hi_B1))).astype(np.int64)
    left_B = num_slots - count_BE.sum(1)
    rows = np.nonzero(left_B)[0]
    while len(rows):
        sub_RE = count_BE[rows]
        priority_RE = np.where(sub_RE < cap, load_BE[rows] / sub_RE, -1.0)
        count_BE[rows, priority_RE.argmax(1)] += 1
        left_B[rows] -= 1
        rows = rows[left_B[rows] > 0]
    return count_BE


def replicas(load_BE: np.ndarray, count_BE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items of every row, heaviest first: ``(expert_BX, load_BX)`` with ``X = count.sum(1)``."""
    num_rows, num_experts = load_BE.shape
    num_items = int(count_BE[0].sum())
    expert_BX = np.repeat(np.tile(np.arange(num_experts), num_rows), count_BE.ravel()).reshape(
        num_rows, num_items
    )
    item_load_BX = np.take_along_axis(load_BE / count_BE, expert_BX, axis=1)
    order_BX = np.argsort(-item_load_BX, axis=1, kind="stable")
    return np.take_along_axis(expert_BX, order_BX, 1), np.take_along_axis(item_load_BX, order_BX, 1)


def kk_pack(expert_BX: np.ndarray, load_BX: np.ndarray, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced largest differencing (Karmarkar-Karp with equal item counts per rank).

    The sorted items are cut into ``S`` rows of ``N``; each row is a partial solution with one
    item per rank. Repeatedly the two partial solutions with the largest spread are merged,
    heaviest rank of one with the lightest of the other. Replicas of one expert in the same
    row stay on distinct ranks; :func:`repair` fixes the rare clash across rows.

    Args:
        expert_BX: ``(B, X)`` expert of each item, heaviest item first.
        load_BX: ``(B, X)`` item loads, non-increasing along each row.
        num_ranks: ``N``, divides ``X``.

    Returns:
        ``(expert_BNS, load_BNS)``.
    """
    num_rows, num_items = load_BX.shape
    per_rank = num_items // num_ranks
    rows = np.arange(num_rows)
    # part: partial solution holding the item; bin: the item's rank inside it
    part_BX = np.broadcast_to(np.arange(num_items) // num_ranks, (num_rows, num_items)).copy()
    bin_BX = np.broadcast_to(np.arange(num_items) % num_ranks, (num_rows, num_items)).copy()
    sums_BKN = load_BX.reshape(num_rows, per_rank, num_ranks).copy()
    alive_BK = np.ones((num_rows, per_rank), dtype=bool)
    arange_N = np.broadcast_to(np.arange(num_ranks), (num_rows, num_ranks))
    for _ in range(per_rank - 1):
        spread_BK = np.where(alive_BK, sums_BKN.max(-1) - sums_BKN.min(-1), -1.0)
        top_B2 = np.argsort(-spread_BK, axis=1, kind="stable")[:, :2]
        first_B, second_B = top_B2[:, 0], top_B2[:, 1]
        a_BN, b_BN = sums_BKN[rows, first_B], sums_BKN[rows, second_B]
        order_a_BN = np.argsort(-a_BN, axis=1, kind="stable")
        order_b_BN = np.argsort(b_BN, axis=1, kind="stable")
        sums_BKN[rows, first_B] = np.take_along_axis(a_BN, order_a_BN, 1) + np.take_along_axis(
            b_BN, order_b_BN, 1
        )
        alive_BK[rows, second_B] = False
        new_a_BN = np.empty_like(order_a_BN)
        np.put_along_axis(new_a_BN, order_a_BN, arange_N, 1)
        new_b_BN = np.empty_like(order_b_BN)
        np.put_along_axis(new_b_BN, order_b_BN, arange_N, 1)
        in_a_BX = part_BX == first_B[:, None]
        in_b_BX = part_BX == second_B[:, None]
        bin_BX = np.where(in_a_BX, np.take_along_axis(new_a_BN, bin_BX, 1), bin_BX)
        bin_BX = np.where(in_b_BX, np.take_along_axis(new_b_BN, bin_BX, 1), bin_BX)
        part_BX = np.where(in_b_BX, first_B[:, None], part_BX)
    order_BX = np.argsort(bin_BX, axis=1, kind="stable")
    shape = (num_rows, num_ranks, per_rank)
    return (
        np.take_along_axis(expert_BX, order_BX, 1).reshape(shape),
        np.take_along_axis(load_BX, order_BX, 1).reshape(shape),
    )


@dataclass
class PackState:
    """Mutable packing of a batch of rows (see the module docstring for the shapes).

    Attributes:
        expert: ``(B, N, S)`` int64 expert of each slot.
        load: ``(B, N, S)`` float64 load of each slot.
        rank_load: ``(B, N)`` float64 sum of ``load`` over slots.
        copies: ``(B, E, N)`` int64 replicas of each expert on each rank.
        home: ``(B, N, S)`` int64 expert each slot held before (``-1``: none), or None;
            with a target, swap scores then favour swaps that change fewer slots.
    """

    expert: np.ndarray
    load: np.ndarray
    rank_load: np.ndarray
    copies: np.ndarray
    home: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        expert_BNS: np.ndarray,
        load_BNS: np.ndarray,
        num_experts: int,
        filled_BNS: np.ndarray | None = None,
    ) -> PackState:
        """State of a packing; slots outside ``filled_BNS`` (if given) are empty."""
        num_rows, num_ranks, _ = expert_BNS.shape
        flat = (np.arange(num_rows)[:, None, None] * num_experts + expert_BNS) * num_ranks + np.arange(
            num_ranks
        )[None, :, None]
        weights = None if filled_BNS is None else filled_BNS.ravel().astype(np.int64)
        copies = np.bincount(flat.ravel(), weights, minlength=num_rows * num_experts * num_ranks)
        return cls(
            expert_BNS,
            load_BNS,
            load_BNS.sum(-1),
            copies.reshape(num_rows, num_experts, num_ranks).astype(np.int64),
        )

    def swap(
        self, rows: np.ndarray, rank_a: np.ndarray, slot_a: np.ndarray, rank_b: np.ndarray, slot_b: np.ndarray
    ) -> None:
        """Exchange slot ``(rank_a, slot_a)`` with ``(rank_b, slot_b)`` in each given row (distinct rows)."""
        ea, eb = self.expert[rows, rank_a, slot_a], self.expert[rows, rank_b, slot_b]
        va, vb = self.load[rows, rank_a, slot_a], self.load[rows, rank_b, slot_b]
        self.expert[rows, rank_a, slot_a], self.expert[rows, rank_b, slot_b] = eb, ea
        self.load[rows, rank_a, slot_a], self.load[rows, rank_b, slot_b] = vb, va
        self.rank_load[rows, rank_a] += vb - va
        self.rank_load[rows, rank_b] += va - vb
        self.copies[rows, ea, rank_a] -= 1
        self.copies[rows, ea, rank_b] += 1
        self.copies[rows, eb, rank_b] -= 1
        self.copies[rows, eb, rank_a] += 1

    def _best_swaps(
        self,
        rows: np.ndarray,
        rank_R: np.ndarray,
        clash_R: np.ndarray | None,
        partners_RK: np.ndarray | None = None,
        target_R: np.ndarray | None = None,
    ) -> tuple[np.ndarray, ...]:
        """Best swap of one item of rank ``rank_R[i]`` with an item of another rank, per row.

        Without ``clash_R`` the score of a swap is how far it lowers the heavier of the two
        ranks (``min(d, gap - d)``, positive when it helps). With ``clash_R`` (an expert id per
        row) only that expert's item may leave, towards a rank holding two fewer copies, and
        the score is minus the heavier rank load after the swap. With ``target_R`` (and no
        ``clash_R``) the score is how far the swap lowers the two ranks' summed excess over
        the target, so a swap never pushes a light partner far above it.

        Args:
            rows: ``(R,)`` rows to search.
            rank_R: ``(R,)`` the rank giving an item.
            clash_R: ``(R,)`` expert that must leave, or None.
            partners_RK: ``(R, K)`` ranks to consider as partners (default all).
            target_R: ``(R,)`` rank load to reach, or None.

        Returns:
            ``(score_R, slot_a_R, rank_b_R, slot_b_R)``; ``score_R`` is ``-inf`` when no swap
            keeps the spread rule.
        """
        num_ranks, per_rank = self.expert.shape[1:]
        idx = np.arange(len(rows))
        if partners_RK is None:
            partners_RK = np.broadcast_to(np.arange(num_ranks), (len(rows), num_ranks))
        num_partners = partners_RK.shape[1]
        expert_RKS = self.expert[rows[:, None], partners_RK]
        load_RKS = self.load[rows[:, None], partners_RK].astype(np.float32)
        partner_load_RK = self.rank_load[rows[:, None], partners_RK]
        ea_RS = self.expert[rows, rank_R]
        va_RS = self.load[rows, rank_R].astype(np.float32)
        heavy_R = self.rank_load[rows, rank_R]
        # copies of a's expert on its rank and on each partner; of b's expert on b's rank and on rank_R
        ca_own_RS = self.copies[rows[:, None], ea_RS, rank_R[:, None]]
        ca_RSK = self.copies[rows[:, None, None], ea_RS[:, :, None], partners_RK[:, None, :]]
        cb_own_RKS = self.copies[rows[:, None, None], expert_RKS, partners_RK[:, :, None]]
        cb_there_RKS = self.copies[rows[:, None, None], expert_RKS, rank_R[:, None, None]]
        need = 1 if clash_R is None else 2
        ok_a_RSK = ca_own_RS[:, :, None] >= ca_RSK + need
        if clash_R is not None:
            ok_a_RSK &= (ea_RS == clash_R[:, None])[:, :, None]
        ok = ok_a_RSK[..., None] & (cb_own_RKS > cb_there_RKS)[:, None]
        d = va_RS[:, :, None, None] - load_RKS[:, None]
        if clash_R is None and target_R is not None:
            level = target_R.astype(np.float32)[:, None, None, None]
            heavy = heavy_R.astype(np.float32)[:, None, None, None]
            partner = partner_load_RK.astype(np.float32)[:, None, :, None]
            before = np.maximum(heavy - level, 0) + np.maximum(partner - level, 0)
            after = np.maximum(heavy - d - level, 0) + np.maximum(partner + d - level, 0)
            score = gross = np.where(ok & (d > 0), before - after, -np.inf)
            if self.home is not None:
                home_a = self.home[rows, rank_R][:, :, None, None]
                home_b = self.home[rows[:, None], partners_RK][:, None]
                ea, eb = ea_RS[:, :, None, None], expert_RKS[:, None]
                moves = (eb != home_a).astype(np.int8) + (ea != home_b) - (ea != home_a) - (eb != home_b)
                score = gross - (MOVE_PENALTY * level) * moves
        elif clash_R is None:
            gap = (heavy_R[:, None] - partner_load_RK).astype(np.float32)[:, None, :, None]
            score = gross = np.where(ok, np.minimum(d, gap - d), -np.inf)
        else:
            after = np.maximum(
                heavy_R.astype(np.float32)[:, None, None, None] - d,
                partner_load_RK.astype(np.float32)[:, None, :, None] + d,
            )
            score = gross = np.where(ok, -after, -np.inf)
        best_R = score.reshape(len(rows), -1).argmax(1)
        slot_a_R, partner_R, slot_b_R = np.unravel_index(best_R, (per_rank, num_partners, per_rank))
        return gross.reshape(len(rows), -1)[idx, best_R], slot_a_R, partners_RK[idx, partner_R], slot_b_R


def repair(state: PackState) -> None:
    """Restore the spread rule where it is broken (after :func:`kk_pack` or a warm start)."""
    copies = state.copies
    rows = np.nonzero((copies.max(-1) - copies.min(-1) >= 2).any(1))[0]
    for _ in range(state.expert.shape[1] * state.expert.shape[2]):
        if not len(rows):
            return
        sub = copies[rows]
        clash_R = (sub.max(-1) - sub.min(-1) >= 2).argmax(1)
        rank_R = sub[np.arange(len(rows)), clash_R].argmax(1)
        score_R, slot_a, rank_b, slot_b = state._best_swaps(rows, rank_R, clash_R)
        go = np.isfinite(score_R)
        state.swap(rows[go], rank_R[go], slot_a[go], rank_b[go], slot_b[go])
        sub = copies[rows]
        rows = rows[go & (sub.max(-1) - sub.min(-1) >= 2).any(1)]
    if len(rows):  # pragma: no cover - a clash can always be swapped away
        raise RuntimeError("could not restore the spread rule")


def improve(
    state: PackState, target_B: np.ndarray, max_rounds: int | None = None, *, few_moves: bool = False
) -> int:
    """Swap items between the heaviest rank and the others while that lowers it.

    Each round takes, for every row still above its target, the swap that lowers the
    heaviest rank the most without making the partner heavier than the heaviest was: first
    among the ``LIGHT_PARTNERS`` lightest ranks, among all ranks when none of those helps.
    A row ends when no swap lowers the heavier of the two ranks (checked in float64), and
    all rows end after ``max_rounds`` rounds (one swap per row each), so this always
    terminates quickly. Swaps keep the spread rule.

    Args:
        state: the packing, changed in place.
        target_B: ``(B,)`` stop a row once its heaviest rank is at or below this.
        few_moves: score swaps by how far they lower the summed excess of the two ranks over
            the target (fewer swaps to reach a loose target) instead of the heavier rank.
        max_rounds: cap on the rounds; default ``ROUNDS_PER_SLOT * N * S + 16`` (the real
            loads need at most about ``0.45 * N * S``).

    Returns:
        The number of swaps made.
    """
    num_ranks, per_rank = state.expert.shape[1:]
    if max_rounds is None:
        max_rounds = ROUNDS_PER_SLOT * num_ranks * per_rank + 16
    rows = np.arange(state.expert.shape[0])
    swaps = 0
    for _ in range(max_rounds):
        if not len(rows):
            break
        rank_load = state.rank_load[rows]
        heavy_R = rank_load.argmax(1)
        peak_R = rank_load[np.arange(len(rows)), heavy_R]
        busy = peak_R > target_B[rows]
        rows, heavy_R, peak_R, rank_load = rows[busy], heavy_R[busy], peak_R[busy], rank_load[busy]
        if not len(rows):
            break
        goal_R = target_B[rows] if few_moves else None
        if num_ranks > LIGHT_PARTNERS + 1:
            light_RK = np.argpartition(rank_load, LIGHT_PARTNERS - 1, axis=1)[:, :LIGHT_PARTNERS]
            score_R, slot_a, rank_b, slot_b = state._best_swaps(rows, heavy_R, None, light_RK, goal_R)
            stuck = np.nonzero(score_R <= 1e-7 * peak_R)[0]
            if len(stuck):
                found = state._best_swaps(
                    rows[stuck], heavy_R[stuck], None, None, None if goal_R is None else goal_R[stuck]
                )
                for mine, other in zip((score_R, slot_a, rank_b, slot_b), found, strict=True):
                    mine[stuck] = other
        else:
            score_R, slot_a, rank_b, slot_b = state._best_swaps(rows, heavy_R, None, None, goal_R)
        # the score is float32 (for speed): accept a swap only if, in float64, it lowers the
        # heavier of the two ranks by a relative margin (float32 rounding once let two
        # one-item ranks trade their items forever); the sorted rank loads then fall
        # strictly, and the round count is capped anyway
        moved_R = state.load[rows, heavy_R, slot_a] - state.load[rows, rank_b, slot_b]
        after_R = np.maximum(peak_R - moved_R, state.rank_load[rows, rank_b] + moved_R)
        go = (score_R > 1e-7 * peak_R) & (after_R < peak_R * (1.0 - 1e-9)) & (rank_b != heavy_R)
        state.swap(rows[go], heavy_R[go], slot_a[go], rank_b[go], slot_b[go])
        swaps += int(go.sum())
        rows = rows[go]
    return swaps


def warm_pack(previous_BNS: np.ndarray, load_BE: np.ndarray, count_BE: np.ndarray) -> PackState:
    """Start from a previous packing: keep what still fits, place the rest heaviest first.

    An expert keeps its first ``min(previous, new)`` slots (in slot order). The freed slots
    take the new replicas, heaviest first, each into the least loaded rank that has a free
    slot and the fewest copies of that expert.

    Args:
        previous_BNS: ``(B, N, S)`` previous expert of each slot, ``-1`` for a slot to refill.
        load_BE: ``(B, E)`` loads.
        count_BE: ``(B, E)`` new replica counts.

    Returns:
        The packing (the spread rule may still be broken: call :func:`repair`).
    """
    num_rows, num_ranks, per_rank = previous_BNS.shape
    num_experts = load_BE.shape[1]
    num_slots = num_ranks * per_rank
    prev_BX = previous_BNS.reshape(num_rows, num_slots)
    # occurrence of each slot's expert among the slots of that expert, in slot order
    key_BX = np.where(prev_BX >= 0, prev_BX, num_experts)
    order_BX = np.argsort(key_BX, axis=1, kind="stable")
    sorted_BX = np.take_along_axis(key_BX, order_BX, 1)
    run_start_BX = np.ones_like(sorted_BX, dtype=bool)
    run_start_BX[:, 1:] = sorted_BX[:, 1:] != sorted_BX[:, :-1]
    position_X = np.arange(num_slots)
    first_BX = np.maximum.accumulate(np.where(run_start_BX, position_X, 0), axis=1)
    occurrence_BX = np.empty_like(order_BX)
    np.put_along_axis(occurrence_BX, order_BX, position_X - first_BX, 1)
    padded_BE = np.concatenate([count_BE, np.zeros((num_rows, 1), dtype=np.int64)], axis=1)
    keep_BX = occurrence_BX < np.take_along_axis(padded_BE, key_BX, 1)
    expert_BX = np.where(keep_BX, prev_BX, -1)
    per_replica_BE = load_BE / count_BE
    slot_load_BX = np.where(keep_BX, np.take_along_axis(per_replica_BE, np.maximum(expert_BX, 0), 1), 0.0)
    free_BNS = ~keep_BX.reshape(previous_BNS.shape)
    state = PackState.build(
        np.maximum(expert_BX, 0).reshape(previous_BNS.shape),
        slot_load_BX.reshape(previous_BNS.shape),
        num_experts,
        filled_BNS=~free_BNS,
    )
    missing_BE = count_BE - state.copies.sum(-1)
    num_new_B = missing_BE.sum(1)
    if not num_new_B.any():
        return state
    # new items, heaviest first; padding items sort last
    new_count_BE = np.concatenate([missing_BE, (num_slots - num_new_B)[:, None]], axis=1)
    padded_load_BE = np.concatenate([per_replica_BE, np.full((num_rows, 1), -1.0)], axis=1)
    items_BX = np.repeat(np.tile(np.arange(num_experts + 1), num_rows), new_count_BE.ravel()).reshape(
        num_rows, num_slots
    )
    item_load_BX = np.take_along_axis(padded_load_BE, items_BX, 1)
    order_BX = np.argsort(-item_load_BX, axis=1, kind="stable")
    items_BX = np.take_along_axis(items_BX, order_BX, 1)
    item_load_BX = np.take_along_axis(item_load_BX, order_BX, 1)
    free_count_BN = free_BNS.sum(-1)
    for k in range(int(num_new_B.max())):
        live = np.nonzero(num_new_B > k)[0]
        e_R = items_BX[live, k]
        c_RN = state.copies[live, e_R]
        has_room = free_count_BN[live] > 0
        fewest = np.where(has_room, c_RN, np.iinfo(np.int64).max)
        fewest = fewest == fewest.min(1, keepdims=True)
        r_R = np.where(fewest, state.rank_load[live], np.inf).argmin(1)
        s_R = free_BNS[live, r_R].argmax(1)
        state.expert[live, r_R, s_R] = e_R
        state.load[live, r_R, s_R] = item_load_BX[live, k]
        state.rank_load[live, r_R] += item_load_BX[live, k]
        state.copies[live, e_R, r_R] += 1
        free_BNS[live, r_R, s_R] = False
        free_count_BN[live, r_R] -= 1
    return state
