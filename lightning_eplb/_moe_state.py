"""Replica-gradient sync and state-dict loading for :class:`~lightning_eplb.moe.ExpertParallelMoE`.

Shapes: ``E`` logical experts, ``P`` physical slots, ``S`` local slots, ``N`` EP ranks,
``Q`` local slots holding a replicated expert, ``X`` replicated experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb.placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    from lightning_eplb.moe import ExpertParallelMoE

#: State-dict key (under the layer's prefix) or ``local_metadata`` entry that marks the
#: layout of ``w1``/``w3``/``w2``: ``"logical"`` (``(E, ...)``) or ``"physical"`` (``(S, ...)``).
EPLB_LAYOUT_KEY = "eplb_layout"
_EXPERT_NAMES = ("w1", "w3", "w2")
_PLACEMENT_NAMES = ("physical_to_logical", "logical_to_physical", "logical_replica_count")


@dataclass
class ReplicaIndex:
    """Which local slots hold a replicated expert, and that expert's row in the sync buffer.

    Depends on the placement only, so it is built on CPU when the placement changes, and
    the gradient sync needs no host synchronisation.

    Attributes:
        local_slots: ``(Q,)`` int64 local slot indices.
        rows: ``(Q,)`` int64 row of each in the ``(X, ...)`` buffer (replicated experts in
            increasing logical id).
        num_replicated: ``X``, identical on every rank.
    """

    local_slots: Tensor
    rows: Tensor
    num_replicated: int
    _on_device: dict[torch.device, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, physical_to_logical: Tensor, replica_count: Tensor, rank: int, num_slots: int
    ) -> ReplicaIndex:
        """Args: physical_to_logical: ``(P,)``; replica_count: ``(E,)``; rank; num_slots: ``S``."""
        replicated_E = replica_count.to(torch.int64) > 1
        row_E = torch.cumsum(replicated_E.to(torch.int64), 0) - 1
        local_S = physical_to_logical.to(torch.int64)[rank * num_slots : (rank + 1) * num_slots]
        local_slots = replicated_E[local_S].nonzero().flatten()
        return cls(local_slots, row_E[local_S[local_slots]], int(replicated_E.sum()))

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(local_slots, rows)`` on ``device``, copied once per placement."""
        if device not in self._on_device:
            # non_blocking: a host-to-device copy from pageable memory without a stream sync
            slots = self.local_slots.to(device, non_blocking=True)
            self._on_device[device] = (slots, self.rows.to(device, non_blocking=True))
        return self._on_device[device]


@torch.no_grad()
def sync_replica_grads_(
    params: list[torch.nn.Parameter], index: ReplicaIndex, num_ranks: int, group: dist.ProcessGroup | None
) -> None:
    """Sum replica gradients across slots and ranks, write back, divide by ``num_ranks``.

    Args:
        params: per-slot parameters, each ``(S, ...)``; missing grads become zeros.
        index: the current :class:`ReplicaIndex`.
        num_ranks: ``N``.
        group: the EP group (collective on it when ``N > 1`` and ``X > 0``).
    """
    grads = []
    for p in params:
        if p.grad is None or not p.grad.is_contiguous():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.contiguous()
        grads.append(p.grad)
    if index.num_replicated:
        slots_Q, rows_Q = index.on(grads[0].device)
        flats = [g.view(g.shape[0], -1) for g in grads]
        sizes = [f.shape[1] for f in flats]
        packed_QD = torch.cat([f.index_select(0, slots_Q) for f in flats], dim=1)
        buf_XD = packed_QD.new_zeros(index.num_replicated, packed_QD.shape[1]).index_add_(
            0, rows_Q, packed_QD
        )
        if num_ranks > 1:
            dist.all_reduce(buf_XD, group=group)
        summed_QD = buf_XD.index_select(0, rows_Q)
        for f, part in zip(flats, summed_QD.split(sizes, dim=1), strict=True):
            f.index_copy_(0, slots_Q, part)
    if num_ranks > 1:
        for g in grads:
            g.div_(num_ranks)


def load_state_dict_pre_hook(
    module: ExpertParallelMoE,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Accept logical ``(E, ...)`` expert weights as well as this rank's ``(S, ...)`` slots.

    Placement: taken from the loaded dict when it holds a ``(P,)`` ``physical_to_logical``
    (the other two maps are rebuilt from it); absent or of another ``P``, the layer keeps
    its current placement (written into the dict so nothing is reported missing).

    Layout of ``w1``/``w3``/``w2``: ``"logical"`` if the dict carries
    ``prefix + "eplb_layout" == "logical"`` (popped) or ``local_metadata["eplb_layout"]``
    says so; else a tensor with dim 0 of ``E`` is logical unless ``E == S`` (then
    physical: mark logical checkpoints when ``E == S`` could be ambiguous). Logical tensors
    become rows ``physical_to_logical[this rank's slots]``.
    """
    layout = state_dict.pop(prefix + EPLB_LAYOUT_KEY, None) or local_metadata.get(EPLB_LAYOUT_KEY)
    if layout not in (None, "logical", "physical"):
        raise ValueError(f"{EPLB_LAYOUT_KEY} ({layout!r}) must be 'logical' or 'physical'")
    num_logical, num_physical = module.num_logical_experts, module.num_physical_experts
    loaded = state_dict.get(prefix + "physical_to_logical")
    if isinstance(loaded, Tensor) and tuple(loaded.shape) == (num_physical,):
        try:
            placement = Placement.from_physical_to_logical(loaded, num_logical, module.ep_size)
        except ValueError as err:
            raise ValueError(
                f"{prefix}physical_to_logical in the loaded state is not a valid placement: {err}"
            ) from err
        values = (
            placement.physical_to_logical[0],
            placement.logical_to_physical[0],
            placement.logical_replica_count[0],
        )
    else:
        values = tuple(getattr(module, name).detach().cpu() for name in _PLACEMENT_NAMES)
    for name, value in zip(_PLACEMENT_NAMES, values, strict=True):
        state_dict[prefix + name] = value
    slots = module.num_local_experts
    local_S = values[0][module.ep_rank * slots : (module.ep_rank + 1) * slots]
    for name in _EXPERT_NAMES:
        tensor = state_dict.get(prefix + name)
        if not isinstance(tensor, Tensor) or tensor.dim() == 0:
            continue
        if layout == "logical" and tensor.shape[0] != num_logical:
            raise ValueError(
                f"{prefix}{name} is marked logical but has dim 0 of {tensor.shape[0]}, not E ({num_logical})"
            )
        is_logical = layout == "logical" or (layout is None and tensor.shape[0] == num_logical != slots)
        if is_logical:
            state_dict[prefix + name] = tensor.index_select(0, local_S.to(tensor.device))


def load_state_dict_post_hook(module: ExpertParallelMoE, incompatible_keys: Any) -> None:
    """Rebuild the replica index from the freshly loaded placement buffers."""
    module._refresh_replica_index()
