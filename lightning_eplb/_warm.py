"""Warm start of the balanced policy: bring overloaded ranks under a target with few changes.

After drift about half of the ranks sit above the warm target, by a few percent each, and
the total room below it is barely larger than the total excess. Swaps between two ranks
need a near-exact pair of items for every overloaded rank; cycles do not. Here every
touched rank releases one item (one changed slot) and the released items are dealt back
so that each rank receives an item no larger than its *cap*:

- an overloaded rank ``h`` with excess ``e`` releasing an item ``a`` has cap ``a - e``;
- a rank ``u`` with room ``s`` releasing ``a`` has cap ``a + s``.

Such a deal exists iff for every level ``x`` there are at least as many caps ``>= x`` as
released items ``>= x`` (deal the largest item to the largest cap, and so on), i.e. iff
every level ``x`` lies in at least as many *room intervals* ``(a_u, a_u + s_u]`` as
*excess intervals* ``(a_h - e, a_h]``. :func:`cycle_cover` builds such a set greedily,
largest excess first: an excess interval goes where existing room intervals already cover
it, else it opens the room intervals (up to ``MAX_OPENS``, top-down) that cover the rest;
slots that already differ from the previous placement cost nothing. The levels are the
interval ends (exact, no grid). All rows of a batch advance together. The items are then
dealt by best fit in increasing order of caps (:func:`_deal`), which leaves the unused room
on few ranks, where a second pass can use it.

:func:`drain` then swaps items off the heaviest rank of each row that is still above the
target, never pushing the partner above it.

Shapes: ``B`` rows, ``N`` ranks, ``S`` slots per rank, ``H`` overloaded ranks of a row
(padded), ``K = S`` options of a rank (which slot it releases), ``C`` levels.
"""

from __future__ import annotations

import numpy as np

from lightning_eplb._packing import PackState

__all__ = ["cycle_cover", "drain", "sticky_counts"]

#: Previous replica counts are kept while no replica is this much heavier than with
#: water-filling counts (each count change costs changed slots).
STICKY_SLACK = 0.15
#: Room intervals one excess interval may open.
MAX_OPENS = 6
#: Relative margin under the target kept by :func:`cycle_cover` against rounding.
COVER_MARGIN = 1e-9
#: With a guide, an option costs this times ``1 - guide`` more in :func:`cycle_cover`.
GUIDE_WEIGHT = 1.0
#: With a guide and ``preopen``, :func:`cycle_cover` first opens the room interval of every
#: rank with room whose most guided slot has a guide above this.
PREOPEN_MIN = 0.7
#: In :func:`drain`, a swap's gain drops by this fraction of the target per slot it changes.
DRAIN_PENALTY = 5e-3

_BIG = 1e9


def sticky_counts(previous_BNS: np.ndarray, load_BE: np.ndarray, count_BE: np.ndarray) -> np.ndarray:
    """Replica counts that stay close to the previous placement's.

    Water-filling recomputes every count from scratch, and each count that changes costs
    at least one changed slot. Here a row starts from its previous counts and, while its
    heaviest replica is more than ``STICKY_SLACK`` above the water-filling one, gives one
    more replica to the expert with the heaviest replica, taken from the expert that then
    has the lightest replicas. Rows whose previous placement lacks an expert (or has
    ``-1`` slots) take the water-filling counts.

    Args:
        previous_BNS: ``(B, N, S)`` previous expert of each slot, ``-1`` unknown.
        load_BE: ``(B, E)`` loads.
        count_BE: ``(B, E)`` water-filling counts.

    Returns:
        ``(B, E)`` int64 counts, each row summing to ``N * S``.
    """
    num_rows = load_BE.shape[0]
    rows = np.arange(num_rows)
    previous_BX = previous_BNS.reshape(num_rows, -1)
    old_BE = np.zeros_like(count_BE)
    np.add.at(old_BE, (rows[:, None], np.maximum(previous_BX, 0)), 1)
    usable_B = np.asarray((previous_BX >= 0).all(1) & (old_BE >= 1).all(1))
    level_B = (load_BE / count_BE).max(1) * (1 + STICKY_SLACK)
    out_BE = np.where(usable_B[:, None], old_BE, count_BE)
    for _ in range(previous_BX.shape[1]):  # a few rounds in practice; each moves one replica per row
        per_replica = load_BE / out_BE
        hot = per_replica.argmax(1)
        # the expert whose replicas stay lightest after giving one up
        after = np.where(out_BE > 1, load_BE / np.maximum(out_BE - 1, 1), np.inf)
        cold = after.argmin(1)
        go = (per_replica[rows, hot] > level_B) & (after[rows, cold] < per_replica[rows, hot])
        if not go.any():
            break
        out_BE[rows[go], hot[go]] += 1
        out_BE[rows[go], cold[go]] -= 1
    return out_BE


def _last_true(mask_BC: np.ndarray) -> np.ndarray:
    """``(B, C + 1)``: entry ``c`` is the largest index ``< c`` where the mask is set, else -1."""
    num_rows, num_cells = mask_BC.shape
    idx = np.where(mask_BC, np.arange(num_cells), -1)
    out = np.full((num_rows, num_cells + 1), -1, dtype=np.int64)
    out[:, 1:] = np.maximum.accumulate(idx, axis=1)
    return out


def _first_true(mask_BC: np.ndarray) -> np.ndarray:
    """``(B, C + 1)``: entry ``c`` is the smallest index ``>= c`` where the mask is set, else C."""
    num_rows, num_cells = mask_BC.shape
    idx = np.where(mask_BC, np.arange(num_cells), num_cells)
    out = np.full((num_rows, num_cells + 1), num_cells, dtype=np.int64)
    out[:, :-1] = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    return out


def _add_ranges(free_BC: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: int) -> None:
    """``free[rows[i], lo[i]:hi[i]] += value`` for every ``i``."""
    if not len(rows):
        return
    width = free_BC.shape[1] + 1
    size = free_BC.shape[0] * width
    delta = np.bincount(rows * width + lo, minlength=size) - np.bincount(rows * width + hi, minlength=size)
    free_BC += value * np.cumsum(delta.reshape(-1, width), axis=1)[:, :-1]


def _levels(ends_BX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ends of each row and the level of every end.

    The level of an end is the index of its first occurrence in its sorted row, which is
    ``np.searchsorted(points[b], ends[b], side="left")`` for all rows at once.

    Args:
        ends_BX: ``(B, X)`` float values (``inf`` allowed, no NaN).

    Returns:
        ``(points_BX, level_BX)``: each row sorted, and ``(B, X)`` int64 levels.
    """
    num_ends = ends_BX.shape[1]
    order = np.argsort(ends_BX, axis=1, kind="stable")
    points = np.take_along_axis(ends_BX, order, 1)
    start = np.ones(points.shape, dtype=bool)
    start[:, 1:] = points[:, 1:] != points[:, :-1]
    first = np.maximum.accumulate(np.where(start, np.arange(num_ends), 0), 1)
    level = np.empty(points.shape, dtype=np.int64)
    np.put_along_axis(level, order, first, 1)
    return points, level


def _cover(
    state: PackState,
    target_B: np.ndarray,
    guide_BNS: np.ndarray | None = None,
    preopen: bool = False,
    preopen_min: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Choose the released slots and caps of one cover pass.

    With ``guide_BNS`` (``(B, N, S)`` in ``[0, 1]``, see :mod:`~lightning_eplb._warm_lp`), an
    option whose slot has guide ``g`` costs ``GUIDE_WEIGHT * (1 - g)`` more (after changed
    slots, before the number of rooms opened).

    Returns:
        ``(row, rank, slot, cap)`` of every released slot, caps in units of the target.
    """
    num_rows, num_ranks, per_rank = state.expert.shape
    scale_B = np.where(target_B > 0, target_B, 1.0) * (1 - COVER_MARGIN)
    item_BNS = state.load / scale_B[:, None, None]
    slack_BN = 1.0 - state.rank_load / scale_B[:, None]
    paid_BNS = np.zeros(item_BNS.shape, dtype=bool) if state.home is None else state.expert != state.home
    cost_BNS = (~paid_BNS).astype(np.float64)
    pen_BNS = np.zeros(item_BNS.shape) if guide_BNS is None else GUIDE_WEIGHT * (1.0 - guide_BNS)
    over_BN = slack_BN < 0
    num_over = int(over_BN.sum(1).max())
    rows = np.arange(num_rows)
    empty = np.zeros(0, dtype=np.int64)
    if num_over == 0:
        return empty, empty, empty, np.zeros(0)
    order_BH = np.argsort(np.where(over_BN, slack_BN, np.inf), axis=1, kind="stable")[:, :num_over]
    active_BH = np.take_along_axis(over_BN, order_BH, 1)
    excess_BH = -np.take_along_axis(slack_BN, order_BH, 1)
    hi_BHK = item_BNS[rows[:, None], order_BH]
    lo_BHK = hi_BHK - excess_BH[..., None]
    top_BNS = item_BNS + np.maximum(slack_BN, 0)[..., None]
    # levels: every interval end; the cell c is (points[c], points[c + 1]]
    extra = np.where(active_BH[..., None], lo_BHK, np.inf).reshape(num_rows, -1)
    _, level_of = _levels(
        np.concatenate([item_BNS.reshape(num_rows, -1), top_BNS.reshape(num_rows, -1), extra], 1)
    )
    num_cells = level_of.shape[1]
    num_items = num_ranks * per_rank
    u_lo_BNS = level_of[:, :num_items].reshape(item_BNS.shape)
    u_hi_BNS = level_of[:, num_items : 2 * num_items].reshape(item_BNS.shape)
    c_hi_BHK = u_lo_BNS[rows[:, None], order_BH]
    # (inactive ranks' excess intervals are never used: any index in range will do)
    c_lo_BHK = np.where(active_BH[..., None], level_of[:, 2 * num_items :].reshape(lo_BHK.shape), num_cells)
    room_BN = slack_BN > 0
    # the ranks with room, first in each row (U of them, padded): only they can be opened
    num_room = max(int(room_BN.sum(1).max()), 1)
    room_idx_BU = np.argsort(~room_BN, axis=1, kind="stable")[:, :num_room]
    room_ok_BU = np.take_along_axis(room_BN, room_idx_BU, 1)
    ru_lo_BUS, ru_hi_BUS = (x[rows[:, None], room_idx_BU] for x in (u_lo_BNS, u_hi_BNS))
    r_item_BUS, r_top_BUS, r_cost_BUS, r_pen_BUS = (
        x[rows[:, None], room_idx_BU] for x in (item_BNS, top_BNS, cost_BNS, pen_BNS)
    )
    free_BC = np.zeros((num_rows, num_cells), dtype=np.int64)
    picked: list[tuple[np.ndarray, ...]] = []
    if preopen and guide_BNS is not None:
        # the guide's rooms first: the greedy below places the excess intervals in them
        rb, ub = np.nonzero(room_BN & (guide_BNS.max(-1) > (PREOPEN_MIN if preopen_min is None else preopen_min[:, None])))
        kb = guide_BNS[rb, ub].argmax(-1)
        room_BN[rb, ub] = False
        _add_ranges(free_BC, rb, u_lo_BNS[rb, ub, kb], u_hi_BNS[rb, ub, kb], 1)
        picked.append((rb, ub, kb, top_BNS[rb, ub, kb]))
    for i in range(num_over):
        act = active_BH[:, i]
        h = order_BH[:, i]
        c_lo, c_hi = c_lo_BHK[:, i], c_hi_BHK[:, i]
        lo_K, hi_K = lo_BHK[:, i], hi_BHK[:, i]
        valid_BK = act[:, None] & (lo_K >= 0)
        live_rows = np.nonzero(act)[0]
        if not len(live_rows):
            continue
        # the covered runs of the rows with a rank left (A of them; ``at`` maps a row to its
        # position among them, other rows to 0: their options are not valid)
        at = np.zeros(num_rows, dtype=np.int64)
        at[live_rows] = np.arange(len(live_rows))
        bad_AC = free_BC[live_rows] < 1
        last_bad = _last_true(bad_AC)
        next_bad = _first_true(bad_AC)
        row_K = at[:, None]
        # 1. fits where room intervals already cover it: the tightest run of covered levels
        first_in = next_bad[row_K, c_lo]
        fits_BK = valid_BK & (first_in >= c_hi)
        before = last_bad[row_K, c_lo]
        run_BK = (first_in - before) + np.minimum(c_lo - before - 1, first_in - c_hi)
        fit_score = np.where(
            fits_BK,
            run_BK
            + _BIG * cost_BNS[rows[:, None], h[:, None], np.arange(per_rank)]
            + 1e4 * pen_BNS[rows[:, None], h[:, None], np.arange(per_rank)],
            np.inf,
        )
        k_fit = fit_score.argmin(1)
        fit_rows = np.nonzero(fits_BK.any(1))[0]
        # 2. otherwise open room intervals top-down, per option
        need_rows = np.nonzero(act & ~fits_BK.any(1))[0]
        opens_u = np.full((len(need_rows), per_rank, MAX_OPENS), -1, dtype=np.int64)
        opens_k = np.zeros_like(opens_u)
        if len(need_rows):
            r_idx = need_rows
            c_lo_R, c_hi_R = c_lo[r_idx], c_hi[r_idx]
            cur_hi = c_hi_R.copy()
            ok_RK = valid_BK[r_idx].copy()
            score_RK = cost_BNS[r_idx, h[r_idx]] * _BIG + pen_BNS[r_idx, h[r_idx]]
            ridx_RU = room_idx_BU[r_idx]
            avail_RKU = np.broadcast_to(
                (room_BN[r_idx[:, None], ridx_RU] & room_ok_BU[r_idx])[:, None, :],
                (len(r_idx), per_rank, num_room),
            ).copy()
            lb = last_bad[at[r_idx]]
            nb = next_bad[at[r_idx]]
            row_R = np.arange(len(r_idx))[:, None]
            first_R = nb[row_R, c_lo_R]
            u_lo_R, u_hi_R = ru_lo_BUS[r_idx], ru_hi_BUS[r_idx]
            item_R, top_R, cost_R, pen_R = (
                r_item_BUS[r_idx],
                r_top_BUS[r_idx],
                r_cost_BUS[r_idx],
                r_pen_BUS[r_idx],
            )
            hi_RK, lo_RK = hi_K[r_idx], lo_K[r_idx]
            done_RK = np.zeros_like(ok_RK)
            for j in range(MAX_OPENS):
                top = lb[row_R, cur_hi]  # highest uncovered level below cur_hi
                done_RK |= top < c_lo_R
                live = ok_RK & ~done_RK
                if not live.any():
                    break
                # only the live (row, option) pairs: Q of them
                qr, qk = np.nonzero(live)
                top_Q = top[qr, qk]
                cand = (
                    avail_RKU[qr, qk][:, :, None]
                    & (u_lo_R[qr] <= top_Q[:, None, None])
                    & (u_hi_R[qr] > top_Q[:, None, None])
                )
                full = u_lo_R[qr] <= first_R[qr, qk][:, None, None]
                # how far the room interval sticks out of the excess interval (either side)
                tight_Q = np.minimum(
                    top_R[qr] - hi_RK[qr, qk][:, None, None], lo_RK[qr, qk][:, None, None] - item_R[qr]
                )
                base_Q = 100.0 * cost_R[qr] + tight_Q + pen_R[qr]
                score = np.where(
                    cand, base_Q + np.where(full, 0.0, 10.0 + u_lo_R[qr] / num_cells), np.inf
                ).reshape(len(qr), -1)
                best_Q = score.argmin(1)
                found_Q = score[np.arange(len(qr)), best_Q] < np.inf
                best = np.zeros_like(cur_hi)
                found = np.zeros_like(live)
                best[qr, qk] = best_Q
                found[qr, qk] = found_Q
                ok_RK &= found | ~live
                go = live & found
                u_pos, ku = np.divmod(best, per_rank)
                opens_u[:, :, j] = np.where(go, ridx_RU[row_R, u_pos], -1)
                opens_k[:, :, j] = ku
                # an option's score: changed slots first, then room intervals opened, then tightness
                step = (
                    _BIG * cost_R[row_R, u_pos, ku]
                    + 1.0
                    + pen_R[row_R, u_pos, ku]
                    + 1e-3 * np.minimum(top_R[row_R, u_pos, ku] - hi_RK, lo_RK - item_R[row_R, u_pos, ku])
                )
                score_RK = score_RK + np.where(go, step, 0.0)
                rr, kk = np.nonzero(go)
                avail_RKU[rr, kk, u_pos[rr, kk]] = False
                cur_hi = np.where(go, u_lo_R[row_R, u_pos, ku], cur_hi)
            top = lb[row_R, cur_hi]
            done_RK |= top < c_lo_R
            ok_RK &= done_RK
            pick = np.where(ok_RK, score_RK, np.inf).argmin(1)
            good = ok_RK[np.arange(len(r_idx)), pick]
            # apply the opens of the chosen option
            for j in range(MAX_OPENS):
                u = opens_u[np.arange(len(r_idx)), pick, j]
                ku = opens_k[np.arange(len(r_idx)), pick, j]
                sel = good & (u >= 0)
                rb, ub, kb = r_idx[sel], u[sel], ku[sel]
                room_BN[rb, ub] = False
                _add_ranges(free_BC, rb, u_lo_BNS[rb, ub, kb], u_hi_BNS[rb, ub, kb], 1)
                picked.append((rb, ub, kb, top_BNS[rb, ub, kb]))
            open_rows, open_k = r_idx[good], pick[good]
        else:
            open_rows, open_k = empty, empty
        # place the excess intervals
        rb = np.concatenate([fit_rows, open_rows])
        kb = np.concatenate([k_fit[fit_rows], open_k])
        hb = h[rb]
        _add_ranges(free_BC, rb, c_lo[rb, kb], c_hi[rb, kb], -1)
        picked.append((rb, hb, kb, lo_K[rb, kb]))
    row, rank, slot, cap = (np.concatenate(part) for part in zip(*picked, strict=True))
    return row.astype(np.int64), rank.astype(np.int64), slot.astype(np.int64), cap.astype(np.float64)


def _deal(row: np.ndarray, item: np.ndarray, cap: np.ndarray, num_rows: int) -> np.ndarray:
    """Which released item each released slot receives: caps in increasing order, each
    taking the largest item left that fits (best fit).

    A valid deal exists when the caps dominate the items (the cover guarantees it); best
    fit in increasing order of caps finds one, and, unlike dealing largest to largest, it
    leaves the unused room on few ranks (the largest caps), in pieces the next pass can use.

    Args:
        row: ``(Q,)`` row of each released slot.
        item: ``(Q,)`` its released item.
        cap: ``(Q,)`` its cap (same units as ``item``).
        num_rows: ``B``.

    Returns:
        ``(Q,)`` for each released slot, the index of the released slot whose item it gets.
    """
    count_B = np.bincount(row, minlength=num_rows)
    width = int(count_B.max())
    start_B = np.concatenate([[0], np.cumsum(count_B)[:-1]])
    by_item = np.lexsort((item, row))
    by_cap = np.lexsort((cap, row))
    column = np.arange(len(row)) - start_B[row[by_item]]  # rows sorted: same position list
    item_BW = np.full((num_rows, width), np.inf)
    src_BW = np.zeros((num_rows, width), dtype=np.int64)
    cap_BW = np.full((num_rows, width), np.inf)
    dst_BW = np.full((num_rows, width), -1, dtype=np.int64)
    item_BW[row[by_item], column] = item[by_item]
    src_BW[row[by_item], column] = by_item
    cap_BW[row[by_cap], column] = cap[by_cap]
    dst_BW[row[by_cap], column] = by_cap
    taken_BW = np.arange(width)[None, :] >= count_B[:, None]
    source = np.empty(len(row), dtype=np.int64)
    rows = np.arange(num_rows)
    for k in range(width):
        fit = ~taken_BW & (item_BW <= cap_BW[:, k : k + 1])
        # the largest fitting item (items ascend); rounding aside there always is one
        pick = np.where(fit.any(1), width - 1 - fit[:, ::-1].argmax(1), (~taken_BW).argmax(1))
        live = dst_BW[:, k] >= 0
        source[dst_BW[live, k]] = src_BW[rows[live], pick[live]]
        taken_BW[rows[live], pick[live]] = True
    return source


def cycle_cover(
    state: PackState,
    target_B: np.ndarray,
    best_fit: bool = True,
    guide_BNS: np.ndarray | None = None,
    preopen: bool = False,
    preopen_min: np.ndarray | None = None,
) -> None:
    """One pass: release one slot per touched rank and deal the items back under the caps.

    Every touched rank ends at or below its row's target; ranks whose excess could not be
    covered are left untouched (for :func:`drain`).

    Args:
        state: the packing, changed in place (``state.home``, if set, marks free slots).
        target_B: ``(B,)`` rank load to reach.
        best_fit: deal by best fit in increasing order of caps (:func:`_deal`), which
            leaves the unused room on few ranks; else the largest item to the largest cap.
        guide_BNS: ``(B, N, S)`` preference in ``[0, 1]`` for each slot as its rank's
            released slot (:func:`~lightning_eplb._warm_lp.lp_guide`), or None.
    """
    row, rank, slot, cap = _cover(state, target_B, guide_BNS, preopen, preopen_min)
    if not len(row):
        return
    scale = (np.where(target_B > 0, target_B, 1.0) * (1 - COVER_MARGIN))[row]
    item = state.load[row, rank, slot] / scale
    expert = state.expert[row, rank, slot]
    load = state.load[row, rank, slot]
    if best_fit:
        source = _deal(row, item, cap, state.expert.shape[0])
    else:  # largest item to largest cap
        source = np.empty(len(row), dtype=np.int64)
        source[np.lexsort((-cap, row))] = np.lexsort((-item, row))
    new_expert, new_load = expert[source], load[source]
    state.expert[row, rank, slot] = new_expert
    state.load[row, rank, slot] = new_load
    state.rank_load[:] = state.load.sum(-1)
    np.subtract.at(state.copies, (row, expert, rank), 1)
    np.add.at(state.copies, (row, new_expert, rank), 1)


def drain(state: PackState, target_B: np.ndarray, max_rounds: int | None = None) -> int:
    """Swap items off each row's heaviest rank while it is above the target.

    A swap may not push the partner above the target; its gain (how far it lowers the
    heaviest rank's excess) drops by ``DRAIN_PENALTY`` of the target per slot it changes
    against ``state.home``. Swaps keep the spread rule.

    Args:
        state: the packing, changed in place.
        target_B: ``(B,)`` rank load to reach.
        max_rounds: cap on the rounds (one swap per row each); default ``2 * N * S``.

    Returns:
        The number of swaps made.
    """
    num_rows, num_ranks, per_rank = state.expert.shape
    if max_rounds is None:
        max_rounds = 2 * num_ranks * per_rank
    rows = np.arange(num_rows)
    swaps = 0
    for _ in range(max_rounds):
        rank_load = state.rank_load[rows]
        heavy = rank_load.argmax(1)
        idx = np.arange(len(rows))
        peak = rank_load[idx, heavy]
        level = target_B[rows]
        busy = peak > level
        rows, heavy, peak, level, rank_load = (
            rows[busy],
            heavy[busy],
            peak[busy],
            level[busy],
            rank_load[busy],
        )
        if not len(rows):
            break
        idx = np.arange(len(rows))
        # partners: the ranks below the target (P of them, padded), in rank order
        room_RN = level[:, None] - rank_load
        num_partners = max(int((room_RN > 0).sum(1).max()), 1)
        part_RP = np.argsort(room_RN <= 0, axis=1, kind="stable")[:, :num_partners]
        room_RP = np.take_along_axis(room_RN, part_RP, 1)
        ea_RS = state.expert[rows, heavy]
        va_RS = state.load[rows, heavy]
        eb_RPS = state.expert[rows[:, None], part_RP]
        vb_RPS = state.load[rows[:, None], part_RP]
        copies = state.copies[rows]
        ca_own = copies[idx[:, None], ea_RS, heavy[:, None]]  # (R, S)
        ca_there = copies[idx[:, None, None], ea_RS[:, :, None], part_RP[:, None, :]]  # (R, S, P)
        cb_own = copies[idx[:, None, None], eb_RPS, part_RP[:, :, None]]  # (R, P, S)
        cb_there = copies[idx[:, None, None], eb_RPS, heavy[:, None, None]]
        ok = (ca_own[:, :, None] >= ca_there + 1)[..., None] & (cb_own > cb_there)[:, None]
        d = va_RS[:, :, None, None] - vb_RPS[:, None]
        ok &= (d > 0) & (d <= room_RP[:, None, :, None])
        gain = np.minimum(d, (peak - level)[:, None, None, None])
        if state.home is not None:
            home_a = state.home[rows, heavy][:, :, None, None]
            home_b = state.home[rows[:, None], part_RP][:, None]
            a, b = ea_RS[:, :, None, None], eb_RPS[:, None]
            moves = (b != home_a).astype(np.int8) + (a != home_b) - (a != home_a) - (b != home_b)
            gain = gain - DRAIN_PENALTY * level[:, None, None, None] * moves
        score = np.where(ok, gain, -np.inf).reshape(len(rows), -1)
        best = score.argmax(1)
        good = np.isfinite(score[idx, best])
        slot_a, part, slot_b = np.unravel_index(best, (per_rank, num_partners, per_rank))
        rank_b = part_RP[idx, part]
        state.swap(rows[good], heavy[good], slot_a[good], rank_b[good], slot_b[good])
        swaps += int(good.sum())
        rows = rows[good]
    return swaps
