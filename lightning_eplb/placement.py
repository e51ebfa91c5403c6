"""Expert placements: which logical expert each physical slot holds.

Shapes (suffixes used in names below):
    L: MoE layers balanced together      E: logical experts per layer
    P: physical slots (E + redundant)    N: expert-parallel ranks, S = P // N slots per rank
    M: max replicas of one expert = P - E + 1

Physical slot ``p`` lives on rank ``p // S`` at local index ``p % S``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["POLICIES", "Placement", "rebalance"]

_F = TypeVar("_F", bound=Callable[..., Any])


def on_host(fn: _F) -> _F:
    """Run ``fn`` with the CPU as the default device: placements are host-side bookkeeping,
    also when built inside a default-device context such as Lightning's ``configure_model``
    on GPUs (``torch.device("cuda")``), which would otherwise put half their tensors there."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Placement:
    """A placement of logical experts onto physical slots, for every layer.

    Args:
        physical_to_logical: ``(L, P)`` int64, the logical expert held by each slot.
        logical_to_physical: ``(L, E, M)`` int64, the slots of each logical expert in
            increasing order, padded with -1; ``M = P - E + 1`` so the width never changes.
        logical_replica_count: ``(L, E)`` int64, replicas of each logical expert (>= 1).
        num_ranks: expert-parallel ranks ``N``; ``P % N == 0``.

    Build one with :meth:`from_physical_to_logical` or :meth:`contiguous`, or get one from
    :func:`lightning_eplb.rebalance`.

    Example:
        >>> p = Placement.contiguous(num_layers=1, num_logical=4, num_physical=6, num_ranks=2)
        >>> p.physical_to_logical
        tensor([[0, 1, 2, 3, 0, 1]])
        >>> p.logical_replica_count
        tensor([[2, 2, 1, 1]])
        >>> p.rank_loads(torch.tensor([[4.0, 2.0, 1.0, 1.0]])).tolist()
        [[4.0, 4.0]]
        >>> p.balancedness(torch.tensor([[4.0, 2.0, 1.0, 1.0]]))
        1.0
    """

    physical_to_logical: Tensor
    logical_to_physical: Tensor
    logical_replica_count: Tensor
    num_ranks: int

    # ------------------------------------------------------------------ construction
    @classmethod
    @on_host
    def from_physical_to_logical(
        cls, physical_to_logical: Tensor, num_logical: int, num_ranks: int
    ) -> Placement:
        """Derive the other two maps from ``physical_to_logical``.

        Args:
            physical_to_logical: ``(L, P)`` or ``(P,)`` integer tensor of logical ids.
            num_logical: ``E``, logical experts per layer.
            num_ranks: ``N``, expert-parallel ranks.

        Raises:
            ValueError: on a bad shape, an id outside ``[0, E)``, an expert without a slot, or
                ``P`` not divisible by ``N``.
        """
        p2l_LP = torch.as_tensor(physical_to_logical).detach().to("cpu", torch.int64)
        if p2l_LP.dim() == 1:
            p2l_LP = p2l_LP.unsqueeze(0)
        if p2l_LP.dim() != 2:
            raise ValueError(f"physical_to_logical must have shape (L, P), got {tuple(p2l_LP.shape)}")
        num_layers, num_physical = p2l_LP.shape
        _check_sizes(num_logical, num_physical, num_ranks)
        if p2l_LP.numel() and (int(p2l_LP.min()) < 0 or int(p2l_LP.max()) >= num_logical):
            raise ValueError(
                f"physical_to_logical holds ids in [{int(p2l_LP.min())}, {int(p2l_LP.max())}], "
                f"they must lie in [0, num_logical={num_logical})"
            )
        count_LE = torch.zeros(num_layers, num_logical, dtype=torch.int64)
        count_LE.scatter_add_(1, p2l_LP, torch.ones_like(p2l_LP))
        if num_layers and int(count_LE.min()) < 1:
            layer, expert = (count_LE < 1).nonzero()[0].tolist()
            raise ValueError(
                f"logical expert {expert} of layer {layer} has no physical slot; every expert needs >= 1"
            )
        width = num_physical - num_logical + 1
        # Stable sort by logical id keeps slots of one expert in increasing order.
        order_LP = torch.sort(p2l_LP, dim=1, stable=True).indices
        sorted_ids_LP = torch.gather(p2l_LP, 1, order_LP)
        first_LE = torch.cumsum(count_LE, dim=1) - count_LE
        rank_in_expert_LP = torch.arange(num_physical).expand(num_layers, -1) - torch.gather(
            first_LE, 1, sorted_ids_LP
        )
        l2p_LEM = torch.full((num_layers, num_logical, width), -1, dtype=torch.int64)
        layer_idx = torch.arange(num_layers).unsqueeze(1).expand(-1, num_physical)
        l2p_LEM[layer_idx, sorted_ids_LP, rank_in_expert_LP] = order_LP
        return cls(p2l_LP, l2p_LEM, count_LE, int(num_ranks))

    @classmethod
    @on_host
    def contiguous(cls, num_layers: int, num_logical: int, num_physical: int, num_ranks: int) -> Placement:
        """The default starting placement: slot ``p`` holds logical expert ``p % E``.

        Redundant slots ``E..P-1`` hold extra replicas of experts ``0..R-1``.
        """
        _check_sizes(num_logical, num_physical, num_ranks)
        p2l_LP = (torch.arange(num_physical) % num_logical).expand(num_layers, -1).contiguous()
        return cls.from_physical_to_logical(p2l_LP, num_logical, num_ranks)

    # ------------------------------------------------------------------ sizes
    @property
    def num_layers(self) -> int:
        return int(self.physical_to_logical.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.physical_to_logical.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.logical_replica_count.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    # ------------------------------------------------------------------ quality
    def slot_loads(self, load: Tensor) -> Tensor:
        """Load of every slot: each replica takes an equal share of its expert's load.

        Args:
            load: ``(L, E)`` tokens per logical expert (any real dtype, any device).

        Returns:
            ``(L, P)`` float64 on CPU.
        """
        load_LE = self._check_load(load)
        per_replica_LE = load_LE / self.logical_replica_count.to(torch.float64)
        return torch.gather(per_replica_LE, 1, self.physical_to_logical)

    def rank_loads(self, load: Tensor) -> Tensor:
        """Load of every rank.

        Args:
            load: ``(L, E)`` tokens per logical expert.

        Returns:
            ``(L, N)`` float64 on CPU: sum of the rank's slot loads.
        """
        return self.slot_loads(load).view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)

    def balancedness(self, load: Tensor) -> float:
        """``sum_l mean_r load[l, r] / sum_l max_r load[l, r]``; 1.0 is perfect, and so is zero load.

        Args:
            load: ``(L, E)`` tokens per logical expert.
        """
        rank_LN = self.rank_loads(load)
        peak = float(rank_LN.max(dim=1).values.sum())
        if peak <= 0.0:
            return 1.0
        return float(rank_LN.mean(dim=1).sum()) / peak

    def num_changed_slots(self, other: Placement) -> int:
        """Slots whose logical expert differs between this placement and ``other``."""
        if other.physical_to_logical.shape != self.physical_to_logical.shape:
            raise ValueError(
                f"placements have different shapes {tuple(self.physical_to_logical.shape)} and "
                f"{tuple(other.physical_to_logical.shape)}"
            )
        return int((self.physical_to_logical != other.physical_to_logical).sum())

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check the invariants; raise ``ValueError`` naming the first violation.

        The three tensors agree, every expert has >= 1 replica, ``P % N == 0``, and no rank
        holds two replicas of one expert while a rank without that expert exists.
        """
        rebuilt = Placement.from_physical_to_logical(
            self.physical_to_logical, self.num_logical, self.num_ranks
        )
        if not torch.equal(rebuilt.logical_to_physical, self.logical_to_physical):
            raise ValueError("logical_to_physical disagrees with physical_to_logical")
        if not torch.equal(rebuilt.logical_replica_count, self.logical_replica_count):
            raise ValueError("logical_replica_count disagrees with physical_to_logical")
        copies_LEN = self.copies_per_rank()
        lacking_LE = (copies_LEN == 0).any(dim=2)
        doubled_LE = (copies_LEN >= 2).any(dim=2)
        bad = (lacking_LE & doubled_LE).nonzero()
        if len(bad):
            layer, expert = bad[0].tolist()
            raise ValueError(
                f"layer {layer}: a rank holds two replicas of expert {expert} while another rank has none"
            )

    def copies_per_rank(self) -> Tensor:
        """``(L, E, N)`` int64: how many replicas of each expert each rank holds."""
        num_layers, num_physical = self.physical_to_logical.shape
        rank_P = torch.arange(num_physical) // self.slots_per_rank
        flat_LP = self.physical_to_logical * self.num_ranks + rank_P
        out = torch.zeros(num_layers, self.num_logical * self.num_ranks, dtype=torch.int64)
        out.scatter_add_(1, flat_LP, torch.ones_like(flat_LP))
        return out.view(num_layers, self.num_logical, self.num_ranks)

    def _check_load(self, load: Tensor) -> Tensor:
        load_LE = torch.as_tensor(load).detach().to("cpu", torch.float64)
        if load_LE.dim() == 1:
            load_LE = load_LE.unsqueeze(0)
        if tuple(load_LE.shape) != (self.num_layers, self.num_logical):
            raise ValueError(
                f"load has shape {tuple(load_LE.shape)}, expected (L, E) = ({self.num_layers}, {self.num_logical})"
            )
        return load_LE


def _check_sizes(num_logical: int, num_physical: int, num_ranks: int) -> None:
    if num_logical < 1:
        raise ValueError(f"num_logical ({num_logical}) must be >= 1")
    if num_ranks < 1:
        raise ValueError(f"num_ranks ({num_ranks}) must be >= 1")
    if num_physical < num_logical:
        raise ValueError(f"num_physical ({num_physical}) must be >= num_logical ({num_logical})")
    if num_physical % num_ranks:
        raise ValueError(f"num_physical ({num_physical}) must be divisible by num_ranks ({num_ranks})")


# ---------------------------------------------------------------------------- rebalance
PolicyFn = Callable[..., Union["Placement", Tensor]]
#: Names accepted by ``rebalance(policy=...)``.
POLICIES = ("balanced", "deepseek")
_warned_fallback: set[tuple[int, int]] = set()


@on_host
def rebalance(
    load: Tensor,
    num_physical: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
    previous: Tensor | Placement | None = None,
    policy: str | PolicyFn = "balanced",
) -> Placement:
    """Compute a placement of ``E`` logical experts onto ``num_physical`` slots for every layer.

    Policies:

    - ``"balanced"`` (default): replica counts by water-filling (at most ``num_ranks`` per
      expert while slots allow), balanced differencing onto ranks with equal slot counts,
      then swaps until the heaviest rank is within 1e-5 of the lower bound
      ``max(mean rank load, heaviest replica)`` or no swap helps. With ``previous`` it starts
      from the old placement and moves experts only until the heaviest rank is within 5e-4
      of a fresh placement's (about 0.0005 less balanced than without ``previous``); a
      layer whose previous row is valid and no less balanced than the result is returned
      unchanged. Never two replicas of an expert on a rank while
      another rank lacks it (with nodes: another rank of the same node, replicas never leave
      their group's node).
    - ``"deepseek"``: DeepSeek's published EPLB, output for output (ignores ``previous``).
    - a callable with this function's signature, returning a :class:`Placement` or an
      ``(L, P)`` physical-to-logical tensor.

    With ``num_nodes > 1`` both policies keep each group's experts on one node (groups packed
    onto nodes with equal group counts); when ``num_groups % num_nodes != 0`` they warn once
    and place globally.

    Args:
        load: ``(L, E)`` or ``(E,)`` non-negative tokens per logical expert; any real dtype,
            any device.
        num_physical: ``P >= E`` slots per layer, divisible by ``num_ranks``.
        num_ranks: ``N`` expert-parallel ranks, divisible by ``num_nodes``.
        num_nodes: ``M`` nodes (groups of ``N / M`` ranks with a fast interconnect).
        num_groups: ``G`` expert groups (group-limited routing); divides ``E``.
        previous: ``(L, P)`` physical-to-logical map in force (or a :class:`Placement`).
        policy: ``"balanced"``, ``"deepseek"`` or a callable.

    Returns:
        A :class:`Placement` with CPU int64 tensors (``L = 1`` for a 1-D load).

    Raises:
        ValueError: naming the value and the rule it breaks.

    Example:
        >>> load = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
        >>> p = rebalance(load, num_physical=16, num_ranks=8)
        >>> p.logical_replica_count.tolist()  # 2 slots per rank: counts searched past water-filling
        [[1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 3, 1]]
        >>> round(p.balancedness(load), 4)
        0.9494
        >>> p.validate()  # DeepSeek's packing puts both replicas of expert 1 on one rank here
        >>> rebalance(load, 16, 8, policy="deepseek").copies_per_rank()[0, 1].max().item()
        2
    """
    load_LE = _check_rebalance_load(load)
    num_layers, num_logical = load_LE.shape
    for name, value in (
        ("num_physical", num_physical),
        ("num_ranks", num_ranks),
        ("num_nodes", num_nodes),
        ("num_groups", num_groups),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    _check_sizes(num_logical, num_physical, num_ranks)
    if num_logical % num_groups:
        raise ValueError(
            f"num_groups ({num_groups}) must divide the number of logical experts ({num_logical})"
        )
    if num_ranks % num_nodes:
        raise ValueError(f"num_ranks ({num_ranks}) must be divisible by num_nodes ({num_nodes})")
    previous_LP = _check_previous(previous, num_layers, num_logical, num_physical)
    if callable(policy):
        out = policy(
            load,
            num_physical,
            num_ranks,
            num_nodes=num_nodes,
            num_groups=num_groups,
            previous=previous,
            policy=policy,
        )
        placement = (
            out
            if isinstance(out, Placement)
            else Placement.from_physical_to_logical(out, num_logical, num_ranks)
        )
        if (
            placement.physical_to_logical.shape != (num_layers, num_physical)
            or placement.num_ranks != num_ranks
        ):
            raise ValueError(
                f"custom policy returned a placement of shape {tuple(placement.physical_to_logical.shape)} on "
                f"{placement.num_ranks} ranks, expected ({num_layers}, {num_physical}) on {num_ranks}"
            )
        return placement
    if policy not in POLICIES:
        raise ValueError(f"policy ({policy!r}) must be one of {POLICIES} or a callable")
    groups, nodes = num_groups, num_nodes
    if num_nodes > 1 and num_groups % num_nodes:
        if (num_groups, num_nodes) not in _warned_fallback:
            _warned_fallback.add((num_groups, num_nodes))
            warnings.warn(
                f"hierarchical placement needs num_groups ({num_groups}) divisible by num_nodes ({num_nodes}); "
                "placing experts globally instead",
                UserWarning,
                stacklevel=2,
            )
        groups, nodes = 1, 1
    load_np = load_LE.numpy()
    if policy == "deepseek":
        from lightning_eplb._policy_deepseek import deepseek_placement

        p2l = deepseek_placement(load_np, num_physical, num_ranks, groups, nodes)
    else:
        from lightning_eplb._policy_balanced import balanced_placement

        prev_np = None if previous_LP is None else previous_LP.numpy()
        p2l = balanced_placement(load_np, num_physical, num_ranks, groups if nodes > 1 else 1, nodes, prev_np)
    return Placement.from_physical_to_logical(
        torch.from_numpy(np.ascontiguousarray(p2l)), num_logical, num_ranks
    )


def _check_rebalance_load(load: Tensor) -> Tensor:
    load_LE = torch.as_tensor(load).detach()
    if load_LE.is_complex() or load_LE.dtype == torch.bool:
        raise ValueError(f"load must hold real numbers, got dtype {load_LE.dtype}")
    load_LE = load_LE.to("cpu", torch.float64)
    if load_LE.dim() == 1:
        load_LE = load_LE.unsqueeze(0)
    if load_LE.dim() != 2 or load_LE.shape[0] < 1 or load_LE.shape[1] < 1:
        raise ValueError(f"load must have shape (L, E) or (E,) with L, E >= 1, got {tuple(load.shape)}")
    if not bool(torch.isfinite(load_LE).all()):
        raise ValueError("load must be finite: it holds NaN or inf")
    if bool((load_LE < 0).any()):
        raise ValueError(f"load must be non-negative, its minimum is {float(load_LE.min())}")
    return load_LE


def _check_previous(
    previous: Tensor | Placement | None, num_layers: int, num_logical: int, num_physical: int
) -> Tensor | None:
    if previous is None:
        return None
    p2l = (
        previous.physical_to_logical
        if isinstance(previous, Placement)
        else torch.as_tensor(previous).detach()
    )
    if p2l.dtype.is_floating_point or p2l.is_complex() or p2l.dtype == torch.bool:
        raise ValueError(f"previous must be an integer tensor, got dtype {p2l.dtype}")
    p2l = p2l.to("cpu", torch.int64)
    if p2l.dim() == 1:
        p2l = p2l.unsqueeze(0)
    if tuple(p2l.shape) != (num_layers, num_physical):
        raise ValueError(
            f"previous has shape {tuple(p2l.shape)}, expected (L, P) = ({num_layers}, {num_physical})"
        )
    if int(p2l.min()) < 0 or int(p2l.max()) >= num_logical:
        raise ValueError(
            f"previous holds ids in [{int(p2l.min())}, {int(p2l.max())}], they must lie in [0, {num_logical})"
        )
    return p2l
