"""The small protocol a MoE layer implements to be balanced by :class:`~lightning_eplb.EplbCallback`.

Shapes: ``E`` logical experts, ``P`` physical slots, ``S = P // N`` local slots on each of the
``N`` expert-parallel ranks, ``M = P - E + 1`` the widest possible replica list.

A layer that satisfies :class:`BalanceableMoE` holds its experts stacked by local slot
(every expert tensor has dim 0 of size ``S``), routes each token choice to one replica
through ``logical_to_physical``, and counts every routed token copy in ``expert_load``.
The callback reads the counters, computes a new placement, moves the expert tensors (and
their optimizer state) with :func:`~lightning_eplb.migrate_experts`, then calls
:meth:`BalanceableMoE.set_placement`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BalanceableMoE", "is_balanceable"]


@runtime_checkable
class BalanceableMoE(Protocol):
    """What :class:`~lightning_eplb.EplbCallback` needs from a MoE layer.

    Attributes:
        num_logical_experts: ``E``.
        num_physical_experts: ``P`` (``E`` plus redundant slots).
        physical_to_logical: ``(P,)`` int64 buffer, logical expert of each slot.
        logical_to_physical: ``(E, M)`` int64 buffer, slots of each expert padded with -1.
        logical_replica_count: ``(E,)`` int64 buffer, replicas of each expert.
        expert_load: ``(P,)`` buffer counting the token copies this rank routed to each
            slot since the last :meth:`reset_expert_load` (training-mode forwards only,
            once each: not again when activation checkpointing re-runs the forward inside
            the backward, where ``torch._C._current_graph_task_id() != -1``).
    """

    num_logical_experts: int
    num_physical_experts: int
    physical_to_logical: Tensor
    logical_to_physical: Tensor
    logical_replica_count: Tensor
    expert_load: Tensor

    def setup_expert_parallel(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Bind the expert-parallel group and keep only this rank's ``S`` slots.

        Called by the callback in ``setup``, before the optimizer exists and before DDP
        wraps the module. Idempotent. Must also exclude the expert tensors from DDP (the
        callback adds them to ``_ddp_params_and_buffers_to_ignore``).
        """
        ...

    def expert_tensors(self) -> list[torch.nn.Parameter]:
        """The per-slot expert parameters; each has dim 0 of size ``S``."""
        ...

    def sync_replica_grads(self) -> None:
        """Sum each expert's gradient over its replicas, write the sum back to every replica,
        and scale it to match DDP's gradient averaging. Once per optimizer step."""
        ...

    def set_placement(
        self, physical_to_logical: Tensor, logical_to_physical: Tensor, logical_replica_count: Tensor
    ) -> None:
        """Copy a new placement row ``(P,)``, ``(E, M)``, ``(E,)`` into the buffers in place.
        Moves no weights: the caller has already migrated them."""
        ...

    def reset_expert_load(self) -> None:
        """Zero ``expert_load`` in place (no host synchronisation)."""
        ...


_DATA_MEMBERS = (
    "num_logical_experts",
    "num_physical_experts",
    "physical_to_logical",
    "logical_to_physical",
    "logical_replica_count",
    "expert_load",
)
_METHODS = ("setup_expert_parallel", "expert_tensors", "sync_replica_grads", "set_placement", "reset_expert_load")


def is_balanceable(obj: object) -> bool:
    """Whether ``obj`` implements :class:`BalanceableMoE`.

    Use this rather than ``isinstance(obj, BalanceableMoE)``: from Python 3.12 on,
    ``isinstance`` against a runtime protocol looks attributes up statically and so misses
    the buffers of an ``nn.Module`` (they live in ``_buffers``, reached through
    ``__getattr__``).

    Example:
        >>> is_balanceable(torch.nn.Linear(2, 2))
        False
    """
    return all(hasattr(obj, name) for name in _DATA_MEMBERS) and all(
        callable(getattr(obj, name, None)) for name in _METHODS
    )
