"""Migration planner: who sends which expert slot to whom when the placement changes.

Shapes (suffixes used in names below):
    L: MoE layers      P: physical slots      N: expert-parallel ranks
    S = P // N: local slots per rank; physical slot ``p`` is local slot ``p % S`` of rank ``p // S``.

The plan is a pure function of the two placements, the number of ranks and the number of
nodes: every rank computes the same plan without a process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Copy", "MigrationPlan", "RankLayerPlan", "Recv", "Send", "plan_migration"]


class Send(NamedTuple):
    """Send the old content of local ``slot`` (holding logical ``expert``) to rank ``peer``."""

    slot: int
    peer: int
    expert: int


class Recv(NamedTuple):
    """Receive logical ``expert`` from rank ``peer`` into local ``slot``."""

    slot: int
    peer: int
    expert: int


class Copy(NamedTuple):
    """Copy local slot ``src`` into local slot ``dst`` (both hold logical ``expert`` in the end).

    ``received`` is False when ``src`` held ``expert`` *before* the migration (its old content
    is copied, even if ``src`` itself is overwritten), True when ``src`` is filled by a
    :class:`Recv` of this migration (a second replica of a received expert: copied after
    the receive, so the expert travels once).
    """

    dst: int
    src: int
    expert: int
    received: bool


@dataclass(frozen=True)
class RankLayerPlan:
    """What one rank does for one layer; all slot numbers are local (``0 <= slot < S``).

    Attributes:
        keep: slots whose expert does not change.
        copies: local copies, see :class:`Copy`.
        recvs: one :class:`Recv` per expert this rank lacks, sorted by ``(peer, expert)``.
        sends: one :class:`Send` per expert a peer receives from this rank, sorted by
            ``(peer, expert)``: the order in which both sides pack and unpack a message.
    """

    keep: tuple[int, ...]
    copies: tuple[Copy, ...]
    recvs: tuple[Recv, ...]
    sends: tuple[Send, ...]


@dataclass(frozen=True)
class MigrationPlan:
    """A frozen migration plan, identical on every rank; build it with :func:`plan_migration`.

    Attributes:
        num_ranks: ``N``.
        num_nodes: nodes the ranks are spread over (``N // num_nodes`` consecutive ranks each).
        slots_per_rank: ``S``.
        layers: ``layers[l][r]`` is the :class:`RankLayerPlan` of rank ``r`` for layer ``l``.

    Example:
        >>> old = torch.tensor([0, 1, 2, 3])  # 2 ranks: [0, 1 | 2, 3]
        >>> new = torch.tensor([0, 2, 3, 3])  # rank 0 lacks 2; rank 1 copies 3 locally
        >>> plan = plan_migration(old, new, num_ranks=2)
        >>> plan
        MigrationPlan(L=1, N=2, S=2, nodes=1: 1 received, 1 copied, 2 kept slots; received per rank [1, 0])
        >>> plan.layers[0][0].recvs
        (Recv(slot=1, peer=1, expert=2),)
        >>> plan.layers[0][1].sends
        (Send(slot=0, peer=0, expert=2),)
        >>> plan.layers[0][1].copies
        (Copy(dst=0, src=1, expert=3, received=False),)
    """

    num_ranks: int
    num_nodes: int
    slots_per_rank: int
    layers: tuple[tuple[RankLayerPlan, ...], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def num_received(self) -> Tensor:
        """``(L, N)`` int64: experts each rank receives per layer."""
        return self._count(lambda rp: len(rp.recvs))

    def num_sent(self) -> Tensor:
        """``(L, N)`` int64: experts each rank sends per layer."""
        return self._count(lambda rp: len(rp.sends))

    def num_copied(self) -> Tensor:
        """``(L, N)`` int64: local copies each rank makes per layer."""
        return self._count(lambda rp: len(rp.copies))

    def bytes_per_rank(self, slot_bytes: int | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Bytes each rank sends and receives, without moving anything.

        Args:
            slot_bytes: bytes of one slot (summed over all its tensors), one int for every
                layer or one per layer.

        Returns:
            ``(sent, received)``, each ``(N,)`` int64.
        """
        if isinstance(slot_bytes, int):
            per_layer = torch.full((self.num_layers, 1), slot_bytes, dtype=torch.int64)
        else:
            per_layer = torch.as_tensor(list(slot_bytes), dtype=torch.int64).reshape(-1, 1)
            if per_layer.shape[0] != self.num_layers:
                raise ValueError(
                    f"slot_bytes has {per_layer.shape[0]} entries, the plan has {self.num_layers} layers"
                )
        return (self.num_sent() * per_layer).sum(0), (self.num_received() * per_layer).sum(0)

    def describe(self) -> str:
        """A readable multi-line listing of every layer and rank."""
        lines = [repr(self)]
        for layer, ranks in enumerate(self.layers):
            for rank, rp in enumerate(ranks):
                parts = [f"keep {list(rp.keep)}"]
                if rp.copies:
                    parts.append(
                        "copy " + ", ".join(f"{c.dst}<-{c.src}{'*' if c.received else ''}" for c in rp.copies)
                    )
                if rp.recvs:
                    parts.append("recv " + ", ".join(f"{r.slot}<-r{r.peer}:e{r.expert}" for r in rp.recvs))
                if rp.sends:
                    parts.append("send " + ", ".join(f"r{s.peer}<-{s.slot}:e{s.expert}" for s in rp.sends))
                lines.append(f"  layer {layer} rank {rank}: " + "; ".join(parts))
        return "\n".join(lines)

    def __repr__(self) -> str:
        received = self.num_received()
        kept = sum(len(rp.keep) for ranks in self.layers for rp in ranks)
        return (
            f"MigrationPlan(L={self.num_layers}, N={self.num_ranks}, S={self.slots_per_rank}, "
            f"nodes={self.num_nodes}: {int(received.sum())} received, {int(self.num_copied().sum())} copied, "
            f"{kept} kept slots; received per rank {received.sum(0).tolist()})"
        )

    def _count(self, fn: object) -> Tensor:
        counts = [[fn(rp) for rp in ranks] for ranks in self.layers]  # type: ignore[operator]
        return torch.tensor(counts, dtype=torch.int64).reshape(self.num_layers, self.num_ranks)


def _as_LP(name: str, p2l: Tensor) -> Tensor:
    t = torch.as_tensor(p2l).detach().to("cpu")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer expert ids, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (L, P) or (P,), got {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} holds a negative expert id ({int(t.min())}); ids must be >= 0")
    return t


def plan_migration(
    old_physical_to_logical: Tensor, new_physical_to_logical: Tensor, num_ranks: int, *, num_nodes: int = 1
) -> MigrationPlan:
    """Plan the moves that turn the old placement into the new one.

    Every rank receives each expert it lacks exactly once (further replicas of it on that
    rank are local copies). A missing expert is fetched from a rank that holds it, on the
    same node when one does; among the candidates the rank with the fewest sends so far
    (in this layer, then in all layers) is chosen, so sending is spread over all holders.

    Args:
        old_physical_to_logical: ``(L, P)`` or ``(P,)`` logical expert of each slot now.
        new_physical_to_logical: same shape, the logical expert each slot must hold.
        num_ranks: ``N``; ``P % N == 0``.
        num_nodes: nodes; rank ``r`` is on node ``r // (N // num_nodes)``.

    Returns:
        A :class:`MigrationPlan`.

    Raises:
        ValueError: on mismatched shapes, bad sizes, or a new expert no old slot holds.
    """
    old_LP = _as_LP("old_physical_to_logical", old_physical_to_logical)
    new_LP = _as_LP("new_physical_to_logical", new_physical_to_logical)
    if old_LP.shape != new_LP.shape:
        raise ValueError(
            f"old_physical_to_logical {tuple(old_LP.shape)} and new_physical_to_logical "
            f"{tuple(new_LP.shape)} must have the same shape"
        )
    if num_ranks < 1:
        raise ValueError(f"num_ranks ({num_ranks}) must be >= 1")
    if num_nodes < 1 or num_ranks % num_nodes:
        raise ValueError(
            f"num_ranks ({num_ranks}) must be divisible by num_nodes ({num_nodes}), num_nodes >= 1"
        )
    num_layers, num_physical = old_LP.shape
    if num_physical % num_ranks:
        raise ValueError(f"num_physical ({num_physical}) must be divisible by num_ranks ({num_ranks})")
    num_slots = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    total_sent = [0] * num_ranks
    layers = []
    for layer in range(num_layers):
        old = old_LP[layer].tolist()
        new = new_LP[layer].tolist()
        layers.append(_plan_layer(layer, old, new, num_ranks, num_slots, ranks_per_node, total_sent))
    return MigrationPlan(num_ranks, num_nodes, num_slots, tuple(layers))


def _plan_layer(
    layer: int,
    old: list[int],
    new: list[int],
    num_ranks: int,
    num_slots: int,
    ranks_per_node: int,
    total_sent: list[int],
) -> tuple[RankLayerPlan, ...]:
    # old slots of every expert on every rank: holders[e][r] = [local slots]
    holders: dict[int, dict[int, list[int]]] = {}
    for p, e in enumerate(old):
        holders.setdefault(e, {}).setdefault(p // num_slots, []).append(p % num_slots)
    missing = sorted(set(new) - set(holders))
    if missing:
        raise ValueError(
            f"layer {layer}: the new placement holds logical expert {missing[0]} that no old slot holds; "
            "a migration can only move experts that exist"
        )
    keep: list[list[int]] = [[] for _ in range(num_ranks)]
    copies: list[list[Copy]] = [[] for _ in range(num_ranks)]
    needs: list[tuple[int, int, int]] = []  # (rank, expert, first local slot) to receive
    recv_dups: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]  # (dst, expert)
    for rank in range(num_ranks):
        first_slot: dict[int, int] = {}
        for i in range(num_slots):
            p = rank * num_slots + i
            e = new[p]
            if old[p] == e:
                keep[rank].append(i)
            elif rank in holders[e]:
                local = holders[e][rank]
                kept = [j for j in local if new[rank * num_slots + j] == e]
                copies[rank].append(Copy(i, (kept or local)[0], e, False))
            elif e in first_slot:
                recv_dups[rank].append((i, e))
            else:
                first_slot[e] = i
                needs.append((rank, e, i))
        for dst, e in recv_dups[rank]:
            copies[rank].append(Copy(dst, first_slot[e], e, True))
    # Most constrained receivers first (fewest holders), then a fixed order.
    needs.sort(key=lambda t: (len(holders[t[1]]), t[1], t[0]))
    layer_sent = [0] * num_ranks
    recvs: list[list[Recv]] = [[] for _ in range(num_ranks)]
    sends: list[list[Send]] = [[] for _ in range(num_ranks)]
    for rank, e, slot in needs:
        candidates = list(holders[e])
        node = rank // ranks_per_node
        same_node = [q for q in candidates if q // ranks_per_node == node]
        pool = same_node or candidates
        src = min(pool, key=lambda q: (layer_sent[q], total_sent[q], (q - rank) % num_ranks))
        layer_sent[src] += 1
        total_sent[src] += 1
        recvs[rank].append(Recv(slot, src, e))
        sends[src].append(Send(holders[e][src][0], rank, e))
    return tuple(
        RankLayerPlan(
            keep=tuple(keep[r]),
            copies=tuple(sorted(copies[r])),
            recvs=tuple(sorted(recvs[r], key=lambda x: (x.peer, x.expert))),
            sends=tuple(sorted(sends[r], key=lambda x: (x.peer, x.expert))),
        )
        for r in range(num_ranks)
    )
