"""State-dict loading for :class:`~lightning_eplb.moe.ExpertParallelMoE` (the replica-gradient
sync lives in :mod:`lightning_eplb._replica_sync`).

Shapes: ``E`` logical experts, ``P`` physical slots, ``S`` local slots, ``N`` EP ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_eplb.placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    from lightning_eplb.moe import ExpertParallelMoE

#: State-dict key (under the layer's prefix) or ``local_metadata`` entry that marks the
#: layout of ``w1``/``w3``/``w2``: ``"logical"`` (``(E, ...)``) or ``"physical"`` (``(S, ...)``).
EPLB_LAYOUT_KEY = "eplb_layout"
_EXPERT_NAMES = ("w1", "w3", "w2")
__all__ = ["EPLB_LAYOUT_KEY", "load_state_dict_post_hook", "load_state_dict_pre_hook"]
_PLACEMENT_NAMES = ("physical_to_logical", "logical_to_physical", "logical_replica_count")


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
