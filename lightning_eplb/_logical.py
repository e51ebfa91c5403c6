"""Convert per-rank expert tensors to and from logical layout: one row per logical expert.

Shapes (suffixes used in names below):
    E: logical experts per layer     P: physical slots (E + redundant)
    N: expert-parallel ranks         S = P // N: slots on one rank

Physical slot ``p`` lives on rank ``p // S`` at local index ``p % S``. Used by
:mod:`lightning_eplb.checkpoint`, which re-exports both functions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_logical", "scatter_logical"]


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(num_ranks, rank)`` in ``group``; ``(1, 0)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _first_slots(physical_to_logical_P: Tensor, num_logical: int | None) -> Tensor:
    """``(E,)`` int64: the lowest slot holding each logical expert.

    Raises:
        ValueError: on an id outside ``[0, E)`` or an expert without a slot.
    """
    p2l_P = torch.as_tensor(physical_to_logical_P).detach().to("cpu", torch.int64).reshape(-1)
    num_physical = p2l_P.numel()
    if num_physical == 0:
        raise ValueError("physical_to_logical is empty; it needs one entry per physical slot")
    num_logical = int(p2l_P.max()) + 1 if num_logical is None else int(num_logical)
    if int(p2l_P.min()) < 0 or int(p2l_P.max()) >= num_logical:
        raise ValueError(
            f"physical_to_logical holds ids in [{int(p2l_P.min())}, {int(p2l_P.max())}], "
            f"they must lie in [0, num_logical={num_logical})"
        )
    first_E = torch.full((num_logical,), num_physical, dtype=torch.int64)
    first_E.scatter_reduce_(0, p2l_P, torch.arange(num_physical), reduce="amin")
    if int(first_E.max()) == num_physical:
        missing = int((first_E == num_physical).nonzero()[0])
        raise ValueError(f"logical expert {missing} has no physical slot in physical_to_logical")
    return first_E


def gather_logical(
    local_S: Tensor,
    physical_to_logical_P: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    num_logical: int | None = None,
    out_device: torch.device | str | None = None,
    max_buffer_bytes: int | None = None,
) -> Tensor:
    """Gather one expert tensor from all ranks into one copy per logical expert.

    Collective: every rank of ``group`` calls it with the same ``physical_to_logical_P``,
    ``max_buffer_bytes`` and a local tensor of the same shape and dtype. Each logical expert
    is taken from its lowest-numbered slot (replicas are identical). The local tensors are
    all-gathered, so the transient memory on ``local_S``'s device is about
    ``P x local_S[0].nbytes`` on every rank; with ``max_buffer_bytes`` the tensor travels in
    chunks along dim 1 and that falls to about ``max_buffer_bytes`` (at least one
    ``(P, 1, ...)`` chunk). The result takes ``E x local_S[0].nbytes`` on ``out_device``.

    Args:
        local_S: ``(S, ...)`` this rank's slots of one tensor (weights or optimizer state).
        physical_to_logical_P: ``(P,)`` logical expert held by each slot, the same on every
            rank; ``P == S * N``.
        group: the expert-parallel group (default: the whole world). Without an
            initialised process group this is a one-rank gather (``S == P``).
        num_logical: ``E``; defaults to ``max(physical_to_logical_P) + 1``.
        out_device: where the result goes (default: ``local_S``'s device); ``"cpu"`` keeps
            the accelerator's memory to the transient buffers.
        max_buffer_bytes: bound on the gather buffers (None: no chunking).

    Returns:
        ``(E, ...)`` of ``local_S``'s dtype on ``out_device``, identical on every rank.

    Raises:
        ValueError: if ``S * N != P`` or the placement misses an expert.

    Example:
        >>> w_S = torch.tensor([[10.0], [11.0], [12.0], [10.0]])  # slots hold experts 0, 1, 2, 0
        >>> gather_logical(w_S, torch.tensor([0, 1, 2, 0])).flatten().tolist()
        [10.0, 11.0, 12.0]
    """
    first_E = _first_slots(physical_to_logical_P, num_logical)
    num_physical = int(torch.as_tensor(physical_to_logical_P).numel())
    num_ranks, _ = _world(group)
    num_slots = int(local_S.shape[0]) if local_S.dim() else 0
    if num_slots * num_ranks != num_physical:
        raise ValueError(
            f"local tensor has {num_slots} slots on each of {num_ranks} ranks, but physical_to_logical has "
            f"P={num_physical} slots; slots per rank times ranks must equal P"
        )
    if max_buffer_bytes is not None and max_buffer_bytes < 1:
        raise ValueError(f"max_buffer_bytes ({max_buffer_bytes}) must be >= 1 or None")
    local_S = local_S.detach()
    device = local_S.device if out_device is None else torch.device(out_device)
    if num_ranks == 1:
        return local_S.index_select(0, first_E.to(local_S.device)).to(device)
    out_E = torch.empty((first_E.numel(), *local_S.shape[1:]), dtype=local_S.dtype, device=device)
    # chunk along dim 1 so that the P gathered rows of one chunk fit the buffer bound
    width = int(local_S.shape[1]) if local_S.dim() > 1 else 1
    row_bytes = local_S[0].numel() * local_S.element_size()
    step = width
    if max_buffer_bytes is not None and local_S.dim() > 1 and width:
        step = max(1, min(width, max_buffer_bytes * width // max(1, num_physical * row_bytes)))
    owner_E = first_E // num_slots
    picks = []
    for r in range(num_ranks):
        experts = (owner_E == r).nonzero().flatten()
        picks.append((experts, first_E[experts] % num_slots))
    for lo in range(0, max(width, 1), step):
        chunk_S = local_S if step == width else local_S[:, lo : lo + step]
        chunk_S = chunk_S.contiguous()
        parts = [torch.empty_like(chunk_S) for _ in range(num_ranks)]
        dist.all_gather(parts, chunk_S, group=group)
        target = out_E if step == width else out_E[:, lo : lo + step]
        for part, (experts, rows) in zip(parts, picks, strict=True):
            if experts.numel():
                target[experts.to(device)] = part.index_select(0, rows.to(part.device)).to(device)
        del parts
    return out_E


def scatter_logical(logical_E: Tensor, physical_to_logical_P: Tensor, rank: int, num_ranks: int) -> Tensor:
    """Take this rank's slots out of a logical tensor (local, no communication).

    Args:
        logical_E: ``(E, ...)`` one row per logical expert.
        physical_to_logical_P: ``(P,)`` logical expert held by each slot; ``P % num_ranks == 0``.
        rank: this rank, in ``[0, num_ranks)``.
        num_ranks: ``N``, expert-parallel ranks.

    Returns:
        ``(S, ...)`` a new tensor: row ``i`` is ``logical_E[physical_to_logical_P[rank * S + i]]``.

    Raises:
        ValueError: on ``P % N != 0``, a rank out of range, or ids outside ``[0, E)``.

    Example:
        >>> w_E = torch.tensor([10.0, 11.0, 12.0])
        >>> scatter_logical(w_E, torch.tensor([0, 1, 2, 0, 2, 1]), rank=1, num_ranks=2).tolist()
        [10.0, 12.0, 11.0]
    """
    p2l_P = torch.as_tensor(physical_to_logical_P).detach().to("cpu", torch.int64).reshape(-1)
    num_physical = p2l_P.numel()
    if num_ranks < 1 or num_physical % num_ranks:
        raise ValueError(f"num_physical ({num_physical}) must be divisible by num_ranks ({num_ranks})")
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank ({rank}) must lie in [0, num_ranks={num_ranks})")
    num_logical = int(logical_E.shape[0]) if logical_E.dim() else 0
    if int(p2l_P.min()) < 0 or int(p2l_P.max()) >= num_logical:
        raise ValueError(
            f"physical_to_logical holds ids in [{int(p2l_P.min())}, {int(p2l_P.max())}], but the logical "
            f"tensor has {num_logical} rows (shape {tuple(logical_E.shape)})"
        )
    num_slots = num_physical // num_ranks
    ids_S = p2l_P[rank * num_slots : (rank + 1) * num_slots]
    return logical_E.detach().index_select(0, ids_S.to(logical_E.device))
