"""A linear-programming guide for the first cycle-cover pass of the warm start.

:func:`~lightning_eplb._warm.cycle_cover` chooses, greedily, one released slot per
overloaded rank and the room intervals that cover its excess interval (see
:mod:`~lightning_eplb._warm` for the model). The greedy opens more room than it needs and
strands a few overloaded ranks that later cost many changed slots; the exact choice (an
integer program) fixes nearly all of them with fewer rooms. Its linear relaxation is
cheap to approximate and says which options belong together:

    minimise   sum_j cost_j x_j
    subject to cover(level) = sum_{room j over level} x_j - sum_{excess j over level} x_j >= 0
               sum_{j of rank r} x_j <= 1            for every rank r
               0 <= x_j <= 1,

where ``j`` runs over the options (rank, slot): an overloaded rank's option is its excess
interval ``(a - e, a]`` with cost ``changed - STRAND_PENALTY`` (a reward for fixing the
rank), another rank's is its room interval ``(a, a + s]`` with cost ``changed`` (1 if the
slot still holds its previous expert, else 0). :func:`lp_guide` runs a fixed number of
diagonally preconditioned primal-dual (PDHG, Chambolle-Pock) steps on all rows at once,
in the reflected Halpern form (each iterate moves to ``k / (k + 1)`` of the reflected
step, anchored at zero; faster than plain PDHG here: 200 of these guide the cover about
as well as 300 plain ones). Only the *valleys* of the level line carry a constraint: a
cell whose lower end falls (a room ends, an excess begins) and whose upper end rises has
no more cover than the cells around it up to the neighbouring rises, whatever ``x >= 0``
(about 130 of the 576 cells at EP72); fewer rows mean larger steps and faster convergence
(offline, first drift step at EP72: rooms opened after 500 such steps do as well as after
3000 plain steps on every cell). The
interval sums are prefix sums over the valleys, so one iteration is a handful of array
operations. :func:`~lightning_eplb._warm.cycle_cover` opens the rooms the guide selects
first, then prefers the options with large ``x``.

Shapes: ``B`` rows, ``N`` ranks, ``S`` slots per rank, ``J = N * S`` options, ``L = 2 J``
levels (cells between sorted interval ends), ``V`` valleys (padded).
"""

from __future__ import annotations

import numpy as np

from lightning_eplb._packing import PackState
from lightning_eplb._warm import COVER_MARGIN

__all__ = ["lp_guide"]

#: Reward (in changed slots) for fixing an overloaded rank in the relaxation.
STRAND_PENALTY = 15.0
#: Primal-dual iterations of :func:`lp_guide` (about 0.3 ms each for 58 rows of 288 slots).
LP_ITERATIONS = 400


def lp_guide(state: PackState, target_B: np.ndarray, iterations: int | None = None) -> np.ndarray:
    """Approximate solution of the cover's linear relaxation (module docstring).

    Args:
        state: the packing (``state.home``, if set, marks the slots that changed already).
        target_B: ``(B,)`` rank load to reach.
        iterations: primal-dual iterations (default ``LP_ITERATIONS``).

    Returns:
        ``(B, N, S)`` float64 in ``[0, 1]``: how much the relaxation uses each slot as its
        rank's released slot (0 for slots that cannot be released usefully).
    """
    if iterations is None:
        iterations = LP_ITERATIONS
    num_rows, num_ranks, per_rank = state.expert.shape
    num_opts = num_ranks * per_rank
    scale_B = np.where(target_B > 0, target_B, 1.0) * (1 - COVER_MARGIN)
    item_BJ = (state.load / scale_B[:, None, None]).reshape(num_rows, num_opts)
    slack_BJ = np.repeat(1.0 - state.rank_load / scale_B[:, None], per_rank, axis=1)
    if state.home is None:
        cost_BJ = np.ones((num_rows, num_opts))
    else:
        cost_BJ = (state.expert == state.home).reshape(num_rows, num_opts).astype(np.float64)
    over_BJ = slack_BJ < 0
    valid_BJ = np.where(over_BJ, item_BJ + slack_BJ >= 0, slack_BJ > 0)
    ub_BJ = valid_BJ.astype(np.float64)
    sign_BJ = np.where(over_BJ, -1.0, 1.0) * ub_BJ
    c_BJ = np.where(over_BJ, cost_BJ - STRAND_PENALTY, cost_BJ) * ub_BJ
    # the ends in increasing order (at equal values, rises before falls; unusable options'
    # ends last): cell i lies between the i-th and the (i + 1)-th end, and an interval
    # covers the cells from the position of its lower end to just below that of its upper end
    lo_BJ = np.where(valid_BJ, np.where(over_BJ, item_BJ + slack_BJ, item_BJ), np.inf)
    hi_BJ = np.where(valid_BJ, np.where(over_BJ, item_BJ, item_BJ + slack_BJ), np.inf)
    ends_BL = np.concatenate([lo_BJ, hi_BJ], 1)
    rise_BL = np.concatenate([sign_BJ, -sign_BJ], 1)
    order_BL = np.lexsort((-rise_BL, ends_BL), axis=1)
    num_levels = 2 * num_opts
    rows_B1 = np.arange(num_rows)[:, None]
    position_BL = np.empty_like(order_BL)
    position_BL[rows_B1, order_BL] = np.arange(num_levels)
    # only the valleys bind: a cell whose lower end falls and whose upper end rises has no
    # more cover than any cell up to the neighbouring rises (for every x >= 0)
    rise_sorted = np.take_along_axis(rise_BL, order_BL, 1)
    valley_BL = rise_sorted < 0
    valley_BL[:, :-1] &= rise_sorted[:, 1:] > 0
    valley_BL[:, -1] = False
    before_BL = np.zeros((num_rows, num_levels + 1), dtype=np.int64)
    np.cumsum(valley_BL, 1, out=before_BL[:, 1:])
    num_valleys = max(int(before_BL[:, -1].max()), 1)
    width = num_valleys + 1
    v_lo_BJ = np.take_along_axis(before_BL, position_BL[:, :num_opts], 1)
    v_hi_BJ = np.take_along_axis(before_BL, position_BL[:, num_opts:], 1)
    # an interval covers the valleys v_lo .. v_hi - 1; prefix sums carry a leading zero
    flat_ends = np.concatenate([(rows_B1 * width + v_lo_BJ).ravel(), (rows_B1 * width + v_hi_BJ).ravel()])
    live_BV = np.arange(num_valleys) < before_BL[:, -1:]

    def cover(weight_BJ: np.ndarray) -> np.ndarray:
        """``(B, V)``: summed weight of the intervals over each valley."""
        flat = weight_BJ.ravel()
        steps = np.bincount(flat_ends, np.concatenate([flat, -flat]), num_rows * width)
        return np.cumsum(steps.reshape(num_rows, width)[:, :num_valleys], 1)

    # diagonal preconditioning: steps 1 / (nonzeros of the column or row)
    tau_BJ = ub_BJ / (v_hi_BJ - v_lo_BJ + 1.0)
    sigma_BV = np.where(live_BV, 1.0 / np.maximum(cover(ub_BJ), 1.0), 0.0)
    sigma_BN = 1.0 / np.maximum(ub_BJ.reshape(num_rows, num_ranks, per_rank).sum(-1), 1.0).ravel()
    x_BJ = np.zeros((num_rows, num_opts))
    y_BV = np.zeros((num_rows, num_valleys))
    z_BN = np.zeros(num_rows * num_ranks)  # flat
    sums_BW = np.zeros((num_rows, width))
    sums = sums_BW.ravel()
    ones_S = np.ones(per_rank)
    new_BJ = x_BJ
    for step in range(iterations):
        np.cumsum(y_BV, 1, out=sums_BW[:, 1:])
        at_ends = sums.take(flat_ends).reshape(2, num_rows, num_opts)
        grad_BJ = c_BJ + z_BN.repeat(per_rank).reshape(num_rows, num_opts) - sign_BJ * (at_ends[1] - at_ends[0])
        new_BJ = np.minimum(np.maximum(x_BJ - tau_BJ * grad_BJ, 0.0), ub_BJ)
        bar_BJ = new_BJ + new_BJ - x_BJ
        new_BV = np.maximum(y_BV - sigma_BV * cover(sign_BJ * bar_BJ), 0.0)
        new_BN = np.maximum(z_BN + sigma_BN * (bar_BJ.reshape(-1, per_rank) @ ones_S - 1.0), 0.0)
        # Halpern iteration on the reflected step, anchored at the zero start
        keep = (step + 1.0) / (step + 2.0)
        x_BJ = keep * (new_BJ + new_BJ - x_BJ)
        y_BV = keep * (new_BV + new_BV - y_BV)
        z_BN = keep * (new_BN + new_BN - z_BN)
    return new_BJ.reshape(num_rows, num_ranks, per_rank)
