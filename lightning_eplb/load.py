"""Expert load: a sliding window of per-slot token counts, and the statistics read from it.

Shapes (suffixes used in names below):
    W: steps kept in the window      L: balanced MoE layers
    E: logical experts per layer     P: physical slots per layer
    N: expert-parallel ranks, S = P // N slots per rank

Each optimizer step every rank adds the ``(L, P)`` counts of the token copies *it routed* to
every slot (the layers' ``expert_load`` buffers). Summed over ranks they are the tokens each
slot processed; rank ``r``'s load is the sum over its slots ``r*S .. r*S+S-1``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

_INT32_MAX = 2**31 - 1

__all__ = ["ExpertLoadWindow", "TokenStats", "WindowLoad", "logical_load", "token_statistics"]


class WindowLoad(NamedTuple):
    """The window summed over its steps (and over ranks, from :meth:`ExpertLoadWindow.compute`).

    Attributes:
        slot_LP: ``(L, P)`` int64 token copies per physical slot.
        logical_LE: ``(L, E)`` int64 token copies per logical expert (each step converted
            with the placement that routed it).
        num_steps: ``()`` int64, steps in the window (``min(steps recorded, W)``).
    """

    slot_LP: Tensor
    logical_LE: Tensor
    num_steps: Tensor


class TokenStats(NamedTuple):
    """Per-step token statistics of the ranks, summed over layers (all ``()`` float64 tensors).

    Attributes:
        max_tokens: ``sum_l max_r tokens[l, r]`` per step: the busiest rank of each layer.
        avg_tokens: ``sum_l mean_r tokens[l, r]`` per step.
        balancedness: ``avg_tokens / max_tokens``; 1.0 is perfect, and so is no load at all.
    """

    max_tokens: Tensor
    avg_tokens: Tensor
    balancedness: Tensor


def logical_load(load_LP: Tensor, physical_to_logical_LP: Tensor, num_logical: int) -> Tensor:
    """Sum slot counts into logical experts: replicas of one expert add up.

    Args:
        load_LP: ``(L, P)`` counts per physical slot (any real dtype, any device).
        physical_to_logical_LP: ``(L, P)`` integer, the logical expert of each slot.
        num_logical: ``E``.

    Returns:
        ``(L, E)`` of ``load_LP``'s dtype and device.

    Example:
        >>> logical_load(torch.tensor([[3, 1, 2]]), torch.tensor([[0, 1, 0]]), 2)
        tensor([[5, 1]])
    """
    if load_LP.dim() != 2 or physical_to_logical_LP.shape != load_LP.shape:
        raise ValueError(
            f"load_LP {tuple(load_LP.shape)} and physical_to_logical_LP {tuple(physical_to_logical_LP.shape)} "
            "must both have shape (L, P)"
        )
    if num_logical < 1:
        raise ValueError(f"num_logical ({num_logical}) must be >= 1")
    out_LE = torch.zeros(load_LP.shape[0], num_logical, dtype=load_LP.dtype, device=load_LP.device)
    return out_LE.scatter_add_(1, physical_to_logical_LP.to(load_LP.device, torch.int64), load_LP)


def token_statistics(slot_LP: Tensor, num_ranks: int, num_steps: int | Tensor = 1) -> TokenStats:
    """Measured balance of the ranks: rank load = sum of its slots' counts.

    Runs on ``slot_LP``'s device without a host synchronisation.

    Args:
        slot_LP: ``(L, P)`` tokens per physical slot, summed over ranks.
        num_ranks: ``N``; ``P % N == 0``.
        num_steps: steps the counts cover (statistics are per step); 0 is read as 1.

    Returns:
        :class:`TokenStats` of ``()`` float64 tensors on ``slot_LP``'s device.

    Example:
        >>> s = token_statistics(torch.tensor([[4, 0, 1, 1]]), num_ranks=2, num_steps=2)
        >>> [round(float(v), 3) for v in s]
        [2.0, 1.5, 0.75]
    """
    num_layers, num_physical = slot_LP.shape
    if num_ranks < 1 or num_physical % num_ranks:
        raise ValueError(f"num_physical ({num_physical}) must be divisible by num_ranks ({num_ranks}) >= 1")
    rank_LN = slot_LP.to(torch.float64).view(num_layers, num_ranks, num_physical // num_ranks).sum(-1)
    steps = torch.as_tensor(num_steps, dtype=torch.float64, device=slot_LP.device).clamp(min=1)
    peak = rank_LN.max(dim=1).values.sum() / steps
    mean = rank_LN.mean(dim=1).sum() / steps
    balancedness = torch.where(peak > 0, mean / peak.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    return TokenStats(peak, mean, balancedness.to(torch.float64))


class ExpertLoadWindow(Metric):
    """Sliding window of the last ``W`` optimizer steps of expert load, per rank.

    Each :meth:`update` writes one step: the ``(L, P)`` slot counts this rank routed, and
    the same counts summed into logical experts with the placement that routed them (so
    the window stays meaningful across rearrangements even when ``W`` exceeds the
    rearrangement interval). Updates run on the counters' device with no host
    synchronisation. :meth:`compute` sums the window over its steps and over ranks with
    **one** ``all_reduce`` of ``L * (P + E)`` int64 values: torchmetrics' own
    synchronisation (an all-gather of the whole window) is switched off.

    State (``add_state(..., persistent=True)``, so it is in ``state_dict()``):
    ``slot_counts (W, L, P)`` and ``logical_counts (W, L, E)`` int32 (counts of one step
    on one rank), and ``cursor ()`` int64, the number of steps recorded so far
    (the ``k``-th sits at row ``k % W``). Memory is ``4 * W * L * (P + E)`` bytes.

    Extreme counts (checked on the device, no host synchronisation in :meth:`update`; read
    in :meth:`compute`, which reduces them with the counts in the same all-reduce, so every
    rank decides alike): NaN, inf or negative counts (possible only from a custom layer
    with float or signed buffers) make :meth:`compute` raise ``ValueError`` while such a
    step is in the window; a count above ``2**31 - 1`` in one step is saturated to it with
    one warning. Sums over the window and over ranks are int64 and cannot overflow.

    Args:
        num_layers: ``L``.
        num_logical: ``E``.
        num_physical: ``P``.
        window_size: ``W`` >= 1.
        kwargs: passed to :class:`torchmetrics.Metric` (for example ``process_group``, the
            group :meth:`compute` reduces over; the default is the whole world).
            ``sync_on_compute`` and ``compute_with_cache`` are fixed to ``False``.

    Example:
        >>> w = ExpertLoadWindow(num_layers=1, num_logical=2, num_physical=4, window_size=2)
        >>> p2l = torch.tensor([[0, 1, 0, 1]])
        >>> w.update(torch.tensor([[5, 0, 0, 0]]), p2l)
        >>> w.update(torch.tensor([[1, 1, 1, 1]]), p2l)
        >>> w.update(torch.tensor([[0, 2, 0, 0]]), p2l)  # pushes the first step out
        >>> load = w.compute()  # no process group: this rank's window
        >>> load.slot_LP, load.logical_LE, int(load.num_steps)
        (tensor([[1, 3, 1, 1]]), tensor([[2, 4]]), 2)
        >>> [round(float(v), 3) for v in token_statistics(load.slot_LP, num_ranks=2, num_steps=2)]
        [2.0, 1.5, 0.75]
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    slot_counts: Tensor
    logical_counts: Tensor
    cursor: Tensor
    extreme_flags: Tensor

    def __init__(
        self, num_layers: int, num_logical: int, num_physical: int, window_size: int, **kwargs: Any
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_logical", num_logical),
            ("num_physical", num_physical),
            ("window_size", window_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an int >= 1")
        if num_physical < num_logical:
            raise ValueError(f"num_physical ({num_physical}) must be >= num_logical ({num_logical})")
        for key in ("sync_on_compute", "compute_with_cache"):
            if kwargs.pop(key, False):
                raise ValueError(f"{key}=True is not supported: compute() reduces over ranks itself")
        super().__init__(sync_on_compute=False, compute_with_cache=False, **kwargs)
        self.num_layers, self.num_logical = num_layers, num_logical
        self.num_physical, self.window_size = num_physical, window_size
        shape_LP, shape_LE = (window_size, num_layers, num_physical), (window_size, num_layers, num_logical)
        self.add_state(
            "slot_counts", torch.zeros(shape_LP, dtype=torch.int32), dist_reduce_fx="sum", persistent=True
        )
        self.add_state(
            "logical_counts", torch.zeros(shape_LE, dtype=torch.int32), dist_reduce_fx="sum", persistent=True
        )
        self.add_state("cursor", torch.zeros((), dtype=torch.int64), dist_reduce_fx="max", persistent=True)
        # per step: [any NaN/inf/negative count, any count saturated to int32]; not checkpointed
        self.add_state("extreme_flags", torch.zeros((window_size, 2), dtype=torch.int32), dist_reduce_fx="sum")
        self._warned_saturated = False

    def update(self, counts_LP: Tensor, physical_to_logical_LP: Tensor) -> None:
        """Record one optimizer step.

        Args:
            counts_LP: ``(L, P)`` integer counts this rank routed to each slot during the step.
            physical_to_logical_LP: ``(L, P)`` the placement that routed them.
        """
        shape = (self.num_layers, self.num_physical)
        if tuple(counts_LP.shape) != shape or tuple(physical_to_logical_LP.shape) != shape:
            raise ValueError(
                f"counts_LP {tuple(counts_LP.shape)} and physical_to_logical_LP "
                f"{tuple(physical_to_logical_LP.shape)} must have shape (L, P) = {shape}"
            )
        counts_LP = counts_LP.detach().to(self.slot_counts.device)
        if counts_LP.is_floating_point() or counts_LP.is_complex():
            counts_LP = counts_LP.real if counts_LP.is_complex() else counts_LP
            bad = ~torch.isfinite(counts_LP) | (counts_LP < 0)
            counts_LP = torch.where(bad, torch.zeros_like(counts_LP), counts_LP)
        else:
            bad = counts_LP < 0
        counts_LP = counts_LP.clamp(min=0).to(torch.int64)
        logical_LE = logical_load(counts_LP, physical_to_logical_LP.detach(), self.num_logical)
        saturated = logical_LE.max() > _INT32_MAX  # >= every slot count of the expert
        row = torch.remainder(self.cursor, self.window_size).view(1)
        self.slot_counts.index_copy_(0, row, counts_LP.clamp(max=_INT32_MAX).to(torch.int32).unsqueeze(0))
        self.logical_counts.index_copy_(0, row, logical_LE.clamp(max=_INT32_MAX).to(torch.int32).unsqueeze(0))
        flags = torch.stack([bad.any(), saturated]).to(torch.int32)
        self.extreme_flags.index_copy_(0, row, flags.unsqueeze(0))
        self.cursor.add_(1)

    def local_sum(self) -> WindowLoad:
        """This rank's window summed over its steps; no communication, no host synchronisation."""
        num_steps = torch.clamp(self.cursor, max=self.window_size)
        return WindowLoad(
            self.slot_counts.sum(0, dtype=torch.int64),
            self.logical_counts.sum(0, dtype=torch.int64),
            num_steps,
        )

    def compute(self) -> WindowLoad:
        """The window summed over its steps and over the ranks of the process group.

        Collective when a process group is initialised: call it on every rank together.
        One ``all_reduce`` (sum) of the ``(L, P)`` and ``(L, E)`` sums and the two extreme-count
        flags packed together; reading the flags synchronises with the device.

        Raises:
            ValueError: on every rank, if any rank recorded a NaN, inf or negative count
                in a step still in the window.
        """
        local = self.local_sum()
        flags = self.extreme_flags.sum(0, dtype=torch.int64)
        split = self.num_layers * self.num_physical
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            flat = torch.cat([local.slot_LP.flatten(), local.logical_LE.flatten(), flags])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            flags = flat[-2:]
            local = WindowLoad(
                flat[:split].view(self.num_layers, self.num_physical),
                flat[split:-2].view(self.num_layers, self.num_logical),
                local.num_steps,
            )
        bad, saturated = flags.tolist()
        if bad:
            raise ValueError(
                f"expert load counters held NaN, inf or negative values in {bad} rank-step(s) of the last "
                f"{self.window_size} steps: a layer's expert_load must count token copies (finite, >= 0)"
            )
        if saturated and not self._warned_saturated:
            self._warned_saturated = True
            rank_zero_warn(
                f"expert load counts above {_INT32_MAX} tokens per slot in one step were saturated to "
                f"{_INT32_MAX} (the window stores int32 per step); the placement sees them capped"
            )
        return local

    def global_state(self) -> dict[str, Tensor]:
        """The window summed over ranks, as CPU tensors, for a checkpoint.

        Collective when a process group is initialised (one ``all_reduce`` of the window).
        Every rank gets the same dict; load it with :meth:`load_global_state`.
        """
        slot_WLP, logical_WLE = self.slot_counts.to(torch.int64), self.logical_counts.to(torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            flat = torch.cat([slot_WLP.flatten(), logical_WLE.flatten()])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            slot_WLP, logical_WLE = (
                flat[: slot_WLP.numel()].view_as(slot_WLP),
                flat[slot_WLP.numel() :].view_as(logical_WLE),
            )
        return {
            "slot_counts": slot_WLP.cpu(),
            "logical_counts": logical_WLE.cpu(),
            "cursor": self.cursor.detach().cpu().clone(),
        }

    def load_global_state(self, state: dict[str, Tensor], keep: bool = True) -> bool:
        """Restore a window saved by :meth:`global_state`, possibly of another window size.

        The saved steps are put in order and the last ``min(saved, W)`` are kept. Counts
        summed over ranks must be counted once: pass ``keep=True`` on one rank only (rank 0)
        and ``keep=False`` elsewhere (an empty window with the same cursor).

        Args:
            state: ``slot_counts (W', L, P)``, ``logical_counts (W', L, E)``, ``cursor ()``.
            keep: whether this rank takes the saved counts.

        Returns:
            False (and nothing changed) if the saved ``(L, E, P)`` differ from this window's.
        """
        slot_WLP, logical_WLE = state["slot_counts"], state["logical_counts"]
        if tuple(slot_WLP.shape[1:]) != (self.num_layers, self.num_physical) or tuple(
            logical_WLE.shape[1:]
        ) != (
            self.num_layers,
            self.num_logical,
        ):
            return False
        saved_w, cursor = int(slot_WLP.shape[0]), int(state["cursor"])
        kept = min(cursor, saved_w, self.window_size)
        rows = [(cursor - kept + i) % saved_w for i in range(kept)]  # oldest first
        device = self.slot_counts.device
        self.reset()
        if keep and kept:  # the kept steps become rows 0 .. kept-1, oldest first
            self.slot_counts[:kept] = slot_WLP[rows].to(device, torch.int32)
            self.logical_counts[:kept] = logical_WLE[rows].to(device, torch.int32)
        self.cursor.fill_(kept)
        self._update_count = int(kept > 0)  # torchmetrics warns on compute() before any update
        return True

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update` (the batch-value machinery of ``Metric.forward`` would reduce)."""
        self.update(*args, **kwargs)
