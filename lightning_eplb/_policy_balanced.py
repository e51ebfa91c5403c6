"""The balanced placement policy: near-optimal balance, fast, and movement-aware.

1. Replica counts by water-filling (:func:`~lightning_eplb._packing.replica_counts`); where
   the fresh packing with them stays more than ``COUNT_SEARCH_GAP`` above the lower bound
   (few slots per rank) in a row of at most ``COUNT_SEARCH_MAX_SLOTS`` slots, a beam search
   over moving single replicas between experts (:func:`_search_counts`); with a previous
   placement the previous counts, changed only where a replica would get much heavier than
   with these (:func:`~lightning_eplb._warm.sticky_counts`).
2. From scratch: balanced differencing (:func:`~lightning_eplb._packing.kk_pack`); with a
   previous placement: keep every replica that still exists in its slot and place only the
   new ones (:func:`~lightning_eplb._packing.warm_pack`).
3. Swaps between the heaviest rank and the others until the heaviest rank is within a
   tolerance of the lower bound ``max(mean rank load, heaviest replica)`` or no swap helps.
   From a previous placement the target is looser: above a fresh packing's heaviest rank
   by its own gap to the bound, clipped to ``[MIN_WARM_TOLERANCE, WARM_TOLERANCE]``. The
   overloaded ranks are first fixed along cycles, one changed slot per touched rank
   (:func:`~lightning_eplb._warm.cycle_cover`, twice), then by swaps that
   keep the partner under the target (:func:`~lightning_eplb._warm.drain`), then by swaps
   scored by the excess they remove (ties to swaps changing fewer slots)
   (:func:`~lightning_eplb._warm_choice.warm_start`). Flat layers spend the tolerance as one
   budget: each runs at a lower and (where it moved most) a higher target, plus swaps alone
   with many slots per rank, and keeps the result that spends the summed budget where it
   saves most slots (:func:`~lightning_eplb._warm_choice.flat_warm`). Rows of a
   hierarchical layer keep the better of cycles and swaps alone at the layer's target. A
   row above its limit is retried (other counts, the other deal, swaps alone), then takes
   the fresh packing, its ranks renamed to overlap the previous placement most.
4. With a previous placement, a layer whose previous row is valid and no less balanced
   than the result keeps the previous row unchanged.

With nodes, groups are first packed onto nodes the same way (items are whole groups; a
layer whose kept group layout is worse than a fresh one takes the fresh one), then each
node is solved as a flat problem; rows of the batch are then (layer, node) pairs. With a
previous placement every node of a layer gets the layer's warm target (the largest of its
nodes'): only the heaviest rank counts for balancedness, so the ranks of a light node keep
their experts while they stay below it.

Shapes: ``L`` layers, ``E`` experts, ``P`` slots, ``N`` ranks, ``S = P // N``, ``G`` groups,
``M`` nodes, ``B`` rows of a batch.
"""

from __future__ import annotations

import numpy as np

from lightning_eplb._packing import PackState, improve, kk_pack, repair, replica_counts, replicas, warm_pack
from lightning_eplb._warm import sticky_counts
from lightning_eplb._warm_choice import FALLBACK_TOLERANCE, flat_warm, pick_rows, row_peak, warm_start

__all__ = ["balanced_placement"]

#: Stop improving a fresh packing once the heaviest rank is within this of the lower bound.
SCRATCH_TOLERANCE = 1e-5
#: From a previous placement, accept a heaviest rank up to this far above a fresh packing's
#: (or the lower bound) rather than moving more experts: at most ``WARM_TOLERANCE``, at
#: least ``MIN_WARM_TOLERANCE``, otherwise the fresh packing's own gap to the lower bound.
WARM_TOLERANCE = 1.8e-3
MIN_WARM_TOLERANCE = 5e-4
#: Fresh rows whose heaviest rank sits more than this above the lower bound search other
#: replica counts (few slots per rank: water-filling's counts can be the wrong ones, e.g.
#: the demo's 8 experts on 2 ranks of 5 slots: 0.917 instead of 0.999). The rows of the
#: real DeepSeek-V3 loads at EP8-EP72 stay below it (at most 2.5% above the bound, EP72),
#: and pay nothing; searching their rows above 1% gained 0.00015 at 8x the time.
COUNT_SEARCH_GAP = 3e-2
#: ... in rows of at most this many slots (small expert-parallel groups: the search packs
#: hundreds of candidates; on heavy-tailed random loads at EP72, 288 slots, it took 1.3 s
#: instead of 15 ms for +0.003 balancedness).
COUNT_SEARCH_MAX_SLOTS = 64
#: Candidate count vectors per row and round: donors x receivers of one replica.
COUNT_SEARCH_DONORS, COUNT_SEARCH_RECEIVERS = 8, 8
COUNT_SEARCH_ROUNDS, COUNT_SEARCH_BEAM = 8, 4
#: LP guide steps of the warm start of rows that are not whole layers (hierarchical): 200
#: move as few slots there as 400 (EP32 on 4 nodes 10.7%, EP64 on 8 nodes 5.4%), in 2/3 of
#: the time.
ROWS_LP_ITERATIONS = 200


def _lower_bound(load_BE: np.ndarray, count_BE: np.ndarray, num_ranks: int) -> np.ndarray:
    return np.maximum(load_BE.sum(1) / num_ranks, (load_BE / count_BE).max(1))


def _fresh(load_BE: np.ndarray, count_BE: np.ndarray, num_ranks: int, target_B: np.ndarray) -> PackState:
    expert_BX, item_load_BX = replicas(load_BE, count_BE)
    expert_BNS, load_BNS = kk_pack(expert_BX, item_load_BX, num_ranks)
    state = PackState.build(expert_BNS, load_BNS, load_BE.shape[1])
    repair(state)
    improve(state, target_B)
    return state


def _search_counts(
    load_BE: np.ndarray,
    count_BE: np.ndarray,
    num_ranks: int,
    fresh_BNS: np.ndarray,
    peak_B: np.ndarray,
    cap: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replica counts for the rows whose fresh packing is far above its lower bound.

    Water-filling minimises the heaviest replica, but with few slots per rank the packing is
    bound by how the items fill ranks of exactly ``S`` slots, not by the heaviest replica. A
    beam search moves one replica from a donor (an expert with several, least load lost
    first) to a receiver (heaviest load per replica after the move first), packs every
    candidate as a fresh row would be packed (skipping those whose :func:`_count_bound`
    cannot beat the row), and keeps the ``COUNT_SEARCH_BEAM`` best count vectors of each row
    for the next round; it stops when a round finds nothing better.

    Args:
        load_BE: ``(B, E)`` loads.
        count_BE: ``(B, E)`` water-filling counts.
        num_ranks: ``N``.
        fresh_BNS: ``(B, N, S)`` the fresh packing with ``count_BE``.
        peak_B: ``(B,)`` its heaviest rank.
        cap: most replicas of one expert, or None. A whole layer needs none: more replicas
            than ranks are valid (the spread rule puts one on every rank first) and can
            balance better (3 replicas on 2 ranks split an expert 2:1). A node's row needs
            ``N``: ranks of the other nodes lack the expert, so two on one rank is invalid.

    Returns:
        ``(counts, packing, peak)`` like the arguments: the best found per row (rows that
        need no search unchanged).
    """
    count_BE, fresh_BNS, peak_B = count_BE.copy(), fresh_BNS.copy(), peak_B.copy()
    rows = np.nonzero(peak_B > _lower_bound(load_BE, count_BE, num_ranks) * (1 + COUNT_SEARCH_GAP))[0]
    beams = {int(b): count_BE[b : b + 1].copy() for b in rows}  # (K, E) count vectors per row
    for _ in range(COUNT_SEARCH_ROUNDS):
        cand_rows, cand_counts = [], []
        for b, beam_KE in beams.items():
            moved_CE = np.concatenate([_one_replica_moved(load_BE[b], count_E, cap) for count_E in beam_KE])
            if not len(moved_CE):  # no expert has a replica to give
                continue
            _, first = np.unique(moved_CE, axis=0, return_index=True)
            moved_CE = moved_CE[np.sort(first)]  # distinct, in the order generated
            keep = _count_bound(load_BE[b], moved_CE, num_ranks) < peak_B[b] * (1 - 1e-9)
            cand_rows.extend([b] * int(keep.sum()))
            cand_counts.append(moved_CE[keep])
        if not cand_rows:
            break
        which = np.asarray(cand_rows)
        counts_CE = np.concatenate(cand_counts)
        loads_CE = load_BE[which]
        target_C = _lower_bound(loads_CE, counts_CE, num_ranks) * (1 + SCRATCH_TOLERANCE)
        packed = _fresh(loads_CE, counts_CE, num_ranks, target_C)
        cand_peak = packed.rank_load.max(1)
        next_beams = {}
        for b in beams:
            mine = np.nonzero(which == b)[0]
            if not len(mine):  # every candidate skipped: nothing can beat this row's peak
                continue
            ranked = mine[np.argsort(cand_peak[mine], kind="stable")]
            best = ranked[0]
            if cand_peak[best] < peak_B[b] * (1 - 1e-9):
                count_BE[b], fresh_BNS[b], peak_B[b] = counts_CE[best], packed.expert[best], cand_peak[best]
                if peak_B[b] > target_C[best]:  # not at its bound yet: search on
                    next_beams[b] = counts_CE[ranked[:COUNT_SEARCH_BEAM]]
        beams = next_beams
        if not beams:
            break
    return count_BE, fresh_BNS, peak_B


def _count_bound(load_E: np.ndarray, count_CE: np.ndarray, num_ranks: int) -> np.ndarray:
    """``(C,)`` lower bounds on the heaviest rank of any packing with each count vector:
    :func:`_lower_bound`, and the rank holding the heaviest replica, which also holds
    ``S - 1`` others of at least the lightest replica's load."""
    per_replica_CE = load_E / count_CE
    per_rank = int(count_CE[0].sum()) // num_ranks
    holder_C = per_replica_CE.max(1) + (per_rank - 1) * per_replica_CE.min(1)
    return np.maximum(_lower_bound(np.broadcast_to(load_E, count_CE.shape), count_CE, num_ranks), holder_C)


def _one_replica_moved(load_E: np.ndarray, count_E: np.ndarray, cap: int | None) -> np.ndarray:
    """``(C, E)`` count vectors with one replica moved from a donor to a receiver (see
    :func:`_search_counts`)."""
    donors = np.nonzero(count_E > 1)[0]
    donors = donors[np.argsort(load_E[donors] / (count_E[donors] - 1), kind="stable")][:COUNT_SEARCH_DONORS]
    receivers = np.argsort(-load_E / (count_E + 1), kind="stable")
    if cap is not None:
        receivers = receivers[count_E[receivers] < cap]
    receivers = receivers[: COUNT_SEARCH_RECEIVERS + 1]
    pairs = [(a, e) for a in donors for e in receivers[receivers != a][:COUNT_SEARCH_RECEIVERS]]
    moved_CE = np.repeat(count_E[None], len(pairs), axis=0)
    if pairs:
        src, dst = np.asarray(pairs).T
        moved_CE[np.arange(len(pairs)), src] -= 1
        moved_CE[np.arange(len(pairs)), dst] += 1
    return moved_CE


def _match_ranks(fresh_BNS: np.ndarray, previous_BNS: np.ndarray, num_experts: int) -> np.ndarray:
    """Rename the ranks of ``fresh_BNS`` and reorder slots to keep most experts in place.

    Ranks are matched greedily by the number of experts they share; inside a rank an expert
    that was already there keeps its slot.

    Returns:
        ``(B, N, S)`` the same packing (same rank contents up to renaming) with slots moved.
    """
    num_rows, num_ranks, _ = fresh_BNS.shape
    rows = np.arange(num_rows)
    eye = np.eye(num_experts + 1, dtype=np.float32)[:, :num_experts]
    fresh_BNE = eye[fresh_BNS].sum(2)
    prev_BNE = eye[np.where(previous_BNS >= 0, previous_BNS, num_experts)].sum(2)
    overlap_BNN = np.minimum(fresh_BNE[:, :, None, :], prev_BNE[:, None, :, :]).sum(-1)
    target_BN = np.empty((num_rows, num_ranks), dtype=np.int64)
    for _ in range(num_ranks):
        best = overlap_BNN.reshape(num_rows, -1).argmax(1)
        src, dst = np.divmod(best, num_ranks)
        target_BN[rows, src] = dst
        overlap_BNN[rows, src, :] = -1.0
        overlap_BNN[rows, :, dst] = -1.0
    moved_BNS = np.empty_like(fresh_BNS)
    moved_BNS[rows[:, None], target_BN] = fresh_BNS
    return _settle_slots(moved_BNS, previous_BNS, num_experts)


def _settle_slots(expert_BNS: np.ndarray, previous_BNS: np.ndarray, num_experts: int) -> np.ndarray:
    """Order each rank's experts so that those already on the rank keep their slots."""
    per_rank = expert_BNS.shape[2]
    prev = np.where(previous_BNS >= 0, previous_BNS, num_experts)
    # old slot s keeps its expert if the new rank holds it (matched copy by copy)
    same_BNSS = prev[..., :, None] == expert_BNS[..., None, :]
    result = np.full_like(expert_BNS, -1)
    taken_new = np.zeros_like(expert_BNS, dtype=bool)
    for s in range(per_rank):  # S is small; each step is vectorised over rows and ranks
        match = same_BNSS[..., s, :] & ~taken_new
        has = match.any(-1)
        pick = match.argmax(-1)
        b_idx, n_idx = np.nonzero(has)
        result[b_idx, n_idx, s] = expert_BNS[b_idx, n_idx, pick[b_idx, n_idx]]
        taken_new[b_idx, n_idx, pick[b_idx, n_idx]] = True
    # the remaining experts fill the remaining slots in order
    rest_order = np.argsort(taken_new, axis=-1, kind="stable")
    rest = np.take_along_axis(expert_BNS, rest_order, -1)
    hole_order = np.argsort(result >= 0, axis=-1, kind="stable")
    filled = np.take_along_axis(result, hole_order, -1)
    num_rest = (~taken_new).sum(-1, keepdims=True)
    filled = np.where(np.arange(per_rank) < num_rest, rest, filled)
    np.put_along_axis(result, hole_order, filled, -1)
    return result


def _layer_max(value_B: np.ndarray, rows_per_layer: int) -> np.ndarray:
    """``(B,)`` each row's value replaced by the largest over its run of ``rows_per_layer`` rows."""
    return np.repeat(value_B.reshape(-1, rows_per_layer).max(1), rows_per_layer)


def solve_flat(
    load_BE: np.ndarray,
    num_slots: int,
    num_ranks: int,
    previous_BX: np.ndarray | None,
    rows_per_layer: int = 1,
) -> np.ndarray:
    """Balanced packing of every row on its own ranks.

    Args:
        load_BE: ``(B, E)`` float64 loads.
        num_slots: ``X`` slots per row, divisible by ``num_ranks``.
        num_ranks: ``N``.
        previous_BX: ``(B, X)`` previous expert of each slot (``-1``: no expert to keep) or None.
        rows_per_layer: ``K``: consecutive runs of ``K`` rows are the nodes of one layer. With
            a previous placement a row's warm target is then the layer's (the largest of its
            rows'): only the heaviest rank of the layer counts for balancedness, so a light
            node keeps its slots as long as its ranks stay below the layer's heaviest.

    Returns:
        ``(B, X)`` int64 expert of each slot.
    """
    num_rows, num_experts = load_BE.shape
    per_rank = num_slots // num_ranks
    count_BE = replica_counts(load_BE, num_slots, num_ranks)
    bound_B = _lower_bound(load_BE, count_BE, num_ranks)
    fresh = _fresh(load_BE, count_BE, num_ranks, bound_B * (1 + SCRATCH_TOLERANCE))
    fresh_BNS, fresh_peak_B = fresh.expert, fresh.rank_load.max(1)
    if num_slots <= COUNT_SEARCH_MAX_SLOTS:
        cap = None if rows_per_layer == 1 else num_ranks  # node rows: see _search_counts
        count_BE, fresh_BNS, fresh_peak_B = _search_counts(load_BE, count_BE, num_ranks, fresh_BNS, fresh_peak_B, cap)
        bound_B = _lower_bound(load_BE, count_BE, num_ranks)
    if previous_BX is None:
        return fresh_BNS.reshape(num_rows, num_slots)
    previous_BNS = previous_BX.reshape(num_rows, num_ranks, per_rank)
    # spend more of the balance budget where a fresh packing is itself far from the bound
    # (there movement is expensive); where it is at the bound, stay close to it
    gap_B = fresh_peak_B / np.where(bound_B > 0, bound_B, 1.0) - 1
    tolerance_B = np.clip(gap_B, MIN_WARM_TOLERANCE, WARM_TOLERANCE)
    warm_target_B = np.maximum(bound_B, fresh_peak_B) * (1 + tolerance_B)
    if rows_per_layer > 1:
        warm_target_B = _layer_max(warm_target_B, rows_per_layer)
    limit_B = warm_target_B * (1 + FALLBACK_TOLERANCE)
    sticky_BE = sticky_counts(previous_BNS, load_BE, count_BE)
    if rows_per_layer == 1 and (fresh_peak_B > 0).all():
        # each row a layer: spend the summed budget where it saves most slots
        base_B = np.maximum(bound_B, fresh_peak_B)
        out_BNS, peak_B, chosen_B = flat_warm(previous_BNS, load_BE, sticky_BE, base_B, tolerance_B)
        worse = np.nonzero(~chosen_B)[0]
    else:
        # cycles fix most overloaded ranks for fewest slots with few slots per rank; with many
        # the swaps alone sometimes do better: each row keeps the better of the two
        out_BNS, peak_B = pick_rows(
            [
                warm_start(previous_BNS, load_BE, sticky_BE, warm_target_B, lp_iterations=ROWS_LP_ITERATIONS).expert,
                warm_start(previous_BNS, load_BE, sticky_BE, warm_target_B, cycles=False).expert,
            ],
            previous_BNS,
            load_BE,
            limit_B,
        )
        worse = np.nonzero(peak_B > limit_B)[0]
    if len(worse):
        # a few rows can stay stuck where another start would not: retry them with
        # water-filling counts or the other deal (and, for flat rows, the tolerance itself)
        sub_prev, sub_load, sub_target = previous_BNS[worse], load_BE[worse], warm_target_B[worse]
        sub_water = count_BE[worse]
        out_BNS[worse], peak_B[worse] = pick_rows(
            [
                out_BNS[worse],
                warm_start(sub_prev, sub_load, sticky_BE[worse], sub_target).expert,
                warm_start(sub_prev, sub_load, sub_water, sub_target).expert,
                warm_start(sub_prev, sub_load, sticky_BE[worse], sub_target, best_fit=False).expert,
                warm_start(sub_prev, sub_load, sub_water, sub_target, cycles=False).expert,
            ],
            sub_prev,
            sub_load,
            limit_B[worse],
        )
        worse = worse[peak_B[worse] > limit_B[worse]]
    if len(worse):
        out_BNS[worse] = _match_ranks(fresh_BNS[worse], previous_BNS[worse], num_experts)
    return out_BNS.reshape(num_rows, num_slots)


def _previous_group_packing(
    previous_LP: np.ndarray, num_groups: int, num_nodes: int, group_size: int
) -> np.ndarray:
    """``(L, M, G/M)`` groups of each node in a previous placement, ``-1`` where unknown."""
    num_layers, num_slots = previous_LP.shape
    node_P = np.arange(num_slots) // (num_slots // num_nodes)
    votes = np.zeros((num_layers, num_groups, num_nodes), dtype=np.int64)
    np.add.at(votes, (np.arange(num_layers)[:, None], previous_LP // group_size, node_P[None]), 1)
    node_LG = votes.argmax(-1)
    per_node = num_groups // num_nodes
    consistent = (np.stack([(node_LG == m).sum(1) for m in range(num_nodes)], 1) == per_node).all(1)
    order_LG = np.argsort(node_LG, axis=1, kind="stable")
    packing = order_LG.reshape(num_layers, num_nodes, per_node)
    return np.where(consistent[:, None, None], packing, -1)


def balanced_placement(
    load_LE: np.ndarray,
    num_physical: int,
    num_ranks: int,
    num_groups: int,
    num_nodes: int,
    previous_LP: np.ndarray | None,
) -> np.ndarray:
    """The balanced policy (hierarchical when ``num_nodes > 1``).

    Args:
        load_LE: ``(L, E)`` float64 loads.
        num_physical: ``P``.
        num_ranks: ``N``, divisible by ``num_nodes``.
        num_groups: ``G``; with ``num_nodes > 1`` each group's experts stay on one node.
        num_nodes: ``M``; ``G % M == 0`` when ``M > 1``.
        previous_LP: ``(L, P)`` previous physical-to-logical map or None.

    Returns:
        ``(L, P)`` int64 physical-to-logical map; a layer whose previous row is valid and no
        less balanced than the computed one keeps the previous row unchanged.
    """
    out_LP = _solve(load_LE, num_physical, num_ranks, num_groups, num_nodes, previous_LP)
    if previous_LP is None:
        return out_LP
    keep_L = _previous_at_least_as_good(load_LE, previous_LP, out_LP, num_ranks, num_groups, num_nodes)
    return np.where(keep_L[:, None], previous_LP, out_LP)


def _previous_at_least_as_good(
    load_LE: np.ndarray,
    previous_LP: np.ndarray,
    out_LP: np.ndarray,
    num_ranks: int,
    num_groups: int,
    num_nodes: int,
) -> np.ndarray:
    """``(L,)`` bool: the previous row is a valid result and no less balanced than ``out_LP``.

    Valid: every expert has a replica, no rank holds two replicas of an expert while a rank
    of its node lacks it, and (with nodes) every group's replicas lie on one node.
    """
    num_layers, num_experts = load_LE.shape
    num_slots = previous_LP.shape[1]
    layer_L1 = np.arange(num_layers)[:, None]
    rank_P = np.arange(num_slots) // (num_slots // num_ranks)
    copies_LEN = np.zeros((num_layers, num_experts, num_ranks), dtype=np.int64)
    np.add.at(copies_LEN, (layer_L1, previous_LP, rank_P[None]), 1)
    valid_L = (copies_LEN.sum(-1) >= 1).all(1)
    per_node = copies_LEN.reshape(num_layers, num_experts, num_nodes, num_ranks // num_nodes)
    spread_ok = ~((per_node >= 2).any(-1) & (per_node == 0).any(-1)).any((1, 2))
    valid_L &= spread_ok
    if num_nodes > 1:
        group_LP = previous_LP // (num_experts // num_groups)
        node_P = np.arange(num_slots) // (num_slots // num_nodes)
        on_node_LGM = np.zeros((num_layers, num_groups, num_nodes), dtype=np.int64)
        np.add.at(on_node_LGM, (layer_L1, group_LP, node_P[None]), 1)
        valid_L &= ((on_node_LGM > 0).sum(-1) == 1).all(1)
    previous_peak_L = row_peak(load_LE, previous_LP.reshape(num_layers, num_ranks, -1))
    return valid_L & (previous_peak_L <= row_peak(load_LE, out_LP.reshape(num_layers, num_ranks, -1)))


def _solve(
    load_LE: np.ndarray,
    num_physical: int,
    num_ranks: int,
    num_groups: int,
    num_nodes: int,
    previous_LP: np.ndarray | None,
) -> np.ndarray:
    if num_nodes == 1:
        return solve_flat(load_LE, num_physical, num_ranks, previous_LP)
    num_layers, num_experts = load_LE.shape
    group_size = num_experts // num_groups
    # 1. groups onto nodes, like replicas onto ranks (one replica per group)
    group_load_LG = load_LE.reshape(num_layers, num_groups, group_size).sum(-1)
    ones_LG = np.ones_like(group_load_LG, dtype=np.int64)
    node_bound_L = group_load_LG.sum(1) / num_nodes
    if previous_LP is None:
        groups = _fresh(group_load_LG, ones_LG, num_nodes, node_bound_L * (1 + SCRATCH_TOLERANCE))
    else:
        prev_groups = _previous_group_packing(previous_LP, num_groups, num_nodes, group_size)
        groups = warm_pack(prev_groups, group_load_LG, ones_LG)
        fresh = _fresh(group_load_LG, ones_LG, num_nodes, node_bound_L * (1 + SCRATCH_TOLERANCE))
        fresh_peak_L = fresh.rank_load.max(1)
        improve(groups, np.maximum(node_bound_L, fresh_peak_L) * (1 + MIN_WARM_TOLERANCE))
        # as in solve_flat: a layer whose kept group layout stays clearly worse than a fresh
        # one takes the fresh one, its nodes renamed to overlap the previous layout most
        worse = np.nonzero(groups.rank_load.max(1) > fresh_peak_L * (1 + MIN_WARM_TOLERANCE))[0]
        if len(worse):
            # (a layer with no consistent previous layout has all -1: no overlap to keep)
            groups.expert[worse] = _match_ranks(fresh.expert[worse], prev_groups[worse], num_groups)
    group_LMK = groups.expert  # (L, M, G/M)
    # 2. each node as a flat problem over its experts; rows are (layer, node)
    expert_LMX = (group_LMK[..., None] * group_size + np.arange(group_size)).reshape(
        num_layers * num_nodes, -1
    )
    sub_load = np.take_along_axis(np.repeat(load_LE, num_nodes, axis=0), expert_LMX, 1)
    slots_per_node = num_physical // num_nodes
    previous_local = None
    if previous_LP is not None:
        local_of = np.full((num_layers * num_nodes, num_experts), -1, dtype=np.int64)
        np.put_along_axis(local_of, expert_LMX, np.arange(expert_LMX.shape[1])[None], 1)
        prev_rows = previous_LP.reshape(num_layers * num_nodes, slots_per_node)
        previous_local = np.take_along_axis(local_of, prev_rows, 1)
    local = solve_flat(sub_load, slots_per_node, num_ranks // num_nodes, previous_local, num_nodes)
    return np.take_along_axis(expert_LMX, local, 1).reshape(num_layers, num_physical)
