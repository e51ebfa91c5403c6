"""Replica-gradient sync of :class:`~lightning_eplb.moe.ExpertParallelMoE`: plan and executor.

Every replica of a logical expert must end a step with the same gradient: the sum over all
its replicas. Each rank first sums its own slots of an expert (the *local sum*); the total
is then the sum of the holders' local sums **in increasing rank order**, so every holder
computes the identical floating-point value and replicas stay bit-identical.

Two ways to get the other holders' local sums, chosen per expert on the host when the
placement changes (the same choice on every rank, as it depends on the placement only):

* point-to-point: each rank sends its local sums to every other holder, one packed buffer
  per peer, all peers in one ``batch_isend_irecv``; ``(h - 1) * D`` elements sent per
  holder of an expert with ``h`` holders.
* all-reduce over the EP group: ``2 (N - 1) / N * D`` elements per rank per expert, whether
  the rank holds it or not; cheaper for experts held by many ranks.

An expert held by one rank only (several slots there) needs no communication.

Shapes: ``E`` logical experts, ``P`` physical slots, ``S`` local slots, ``N`` EP ranks,
``Q`` local slots holding a replicated expert, ``K`` replicated experts held by this rank,
``X`` replicated experts synced by all-reduce, ``V`` rows received from peers, ``D`` the
elements of one expert (all tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class _DeviceIndex:
    local_slots: Tensor  # (Q,)
    local_rows: Tensor  # (Q,) row in the (K, D) local sums
    first_src: Tensor  # (K,) row of Z holding the lowest holder's local sum
    adds: tuple[tuple[Tensor, Tensor], ...]  # per later holder position: (dst rows in K, src rows in Z)
    send_rows: Tensor  # (sum of k_q,) rows of the local sums sent, peer after peer
    ar_rows: Tensor  # (K_ar,) rows in K of the experts synced by all-reduce
    ar_pos: Tensor  # (K_ar,) their rows in the (X, D) all-reduce buffer


@dataclass
class ReplicaIndex:
    """How this rank syncs the gradients of replicated experts; depends on the placement only.

    Built on CPU when the placement changes and copied to the device once, so the gradient
    sync needs no host synchronisation.

    Attributes:
        local_slots: ``(Q,)`` int64 local slots holding a replicated expert.
        local_rows: ``(Q,)`` int64 row of each in the ``(K, D)`` local sums (this rank's
            replicated experts in increasing logical id).
        num_local: ``K``.
        peers: ``(peer rank in the EP group, rows of the local sums exchanged with it)``
            in increasing rank; the peer sends the same experts in the same order.
        first_src: ``(K,)`` row of ``Z = [local sums; received rows]`` holding each expert's
            lowest-ranked holder's local sum.
        adds: per further holder position ``j >= 1``: ``(dst (k_j,) rows of K, src (k_j,)
            rows of Z)``, added in this order.
        ar_rows: ``(K_ar,)`` rows of K synced by all-reduce; ``ar_pos``: ``(K_ar,)`` their
            rows in the all-reduce buffer.
        num_replicated: experts with more than one replica (identical on every rank).
        num_all_reduce: ``X`` experts synced by all-reduce (identical on every rank).
        max_p2p_holders: experts with at most this many holder ranks go point-to-point.
        sent_rows: expert-sized rows this rank sends per sync (P2P rows plus the all-reduce's
            ``2 (N - 1) / N * X``).
        all_reduce_rows: what one all-reduce of every replicated expert would send per rank.

    Example:
        >>> p2l = torch.tensor([0, 1, 2, 0, 3, 4])  # 3 ranks of 2 slots; expert 0 on ranks 0, 1
        >>> index = ReplicaIndex.build(p2l, torch.tensor([2, 1, 1, 1, 1]), rank=0, num_slots=2)
        >>> index.local_slots.tolist(), [q for q, _ in index.peers], index.sent_rows
        ([0], [1], 1.0)
        >>> round(index.all_reduce_rows, 3)  # an all-reduce would send 2 (N - 1) / N rows
        1.333
    """

    local_slots: Tensor
    local_rows: Tensor
    num_local: int
    peers: list[tuple[int, Tensor]]
    first_src: Tensor
    adds: list[tuple[Tensor, Tensor]]
    ar_rows: Tensor
    ar_pos: Tensor
    num_replicated: int
    num_all_reduce: int
    max_p2p_holders: int
    sent_rows: float
    all_reduce_rows: float
    _on_device: dict[torch.device, _DeviceIndex] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        physical_to_logical: Tensor,
        replica_count: Tensor,
        rank: int,
        num_slots: int,
        max_p2p_holders: int | None = None,
    ) -> ReplicaIndex:
        """Plan the sync for one rank (CPU, at placement changes only).

        Args:
            physical_to_logical: ``(P,)`` integer; ranks own ``num_slots`` consecutive slots.
            replica_count: ``(E,)`` integer; experts with more than one replica are synced.
            rank: this rank in the EP group.
            num_slots: ``S``; ``N = P / S``.
            max_p2p_holders: experts held by at most this many ranks go point-to-point, the
                others through one all-reduce (1: all-reduce only; ``N``: point-to-point
                only). None picks the value with the fewest elements sent by the busiest
                rank (ties: the smaller value).

        Returns:
            the index.
        """
        p2l = physical_to_logical.to(torch.int64).tolist()
        num_ranks = len(p2l) // num_slots
        replicated = [e for e, c in enumerate(replica_count.to(torch.int64).tolist()) if c > 1]
        is_rep = set(replicated)
        holders: dict[int, list[int]] = {e: [] for e in replicated}
        for p, e in enumerate(p2l):
            if e in is_rep and (not holders[e] or holders[e][-1] != p // num_slots):
                holders[e].append(p // num_slots)  # slots are in rank order: sorted, unique
        ring = 2.0 * (num_ranks - 1) / num_ranks

        def cost(t: int) -> float:
            per_rank = [0] * num_ranks
            for e in replicated:
                if len(holders[e]) <= t:
                    for r in holders[e]:
                        per_rank[r] += len(holders[e]) - 1
            return max(per_rank, default=0) + ring * sum(len(holders[e]) > t for e in replicated)

        if max_p2p_holders is None:
            max_p2p_holders = min(range(1, num_ranks + 1), key=lambda t: (cost(t), t))
        elif max_p2p_holders < 1:
            raise ValueError(f"max_p2p_holders ({max_p2p_holders}) must be >= 1")
        t = max_p2p_holders
        all_reduced = [e for e in replicated if len(holders[e]) > t]
        ar_index = {e: i for i, e in enumerate(all_reduced)}

        mine = [e for e in replicated if rank in holders[e]]
        krow = {e: k for k, e in enumerate(mine)}
        local = [
            (s, krow[e]) for s, e in enumerate(p2l[rank * num_slots : (rank + 1) * num_slots]) if e in krow
        ]
        p2p = [e for e in mine if 1 < len(holders[e]) <= t]
        peers: list[tuple[int, list[int]]] = []
        offset: dict[int, int] = {}  # peer -> first row of its block in Z
        position: dict[tuple[int, int], int] = {}  # (peer, expert) -> row in Z
        num_rows = len(mine)
        for q in range(num_ranks):
            shared = [e for e in p2p if q != rank and q in holders[e]]
            if shared:
                offset[q] = num_rows
                for i, e in enumerate(shared):
                    position[q, e] = num_rows + i
                num_rows += len(shared)
                peers.append((q, [krow[e] for e in shared]))
        first_src = []
        adds: list[tuple[list[int], list[int]]] = []
        for e in mine:
            hs = holders[e] if e in p2p else [rank]
            rows = [krow[e] if r == rank else position[r, e] for r in hs]
            first_src.append(rows[0])
            for j, row in enumerate(rows[1:]):
                if j == len(adds):
                    adds.append(([], []))
                adds[j][0].append(krow[e])
                adds[j][1].append(row)
        mine_ar = [e for e in mine if e in ar_index]
        sent = sum(len(rows) for _, rows in peers) + ring * len(all_reduced)

        def i64(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64)

        return cls(
            local_slots=i64([s for s, _ in local]),
            local_rows=i64([k for _, k in local]),
            num_local=len(mine),
            peers=[(q, i64(rows)) for q, rows in peers],
            first_src=i64(first_src),
            adds=[(i64(d), i64(s)) for d, s in adds],
            ar_rows=i64([krow[e] for e in mine_ar]),
            ar_pos=i64([ar_index[e] for e in mine_ar]),
            num_replicated=len(replicated),
            num_all_reduce=len(all_reduced),
            max_p2p_holders=t,
            sent_rows=float(sent),
            all_reduce_rows=ring * len(replicated) if num_ranks > 1 else 0.0,
        )

    def on(self, device: torch.device) -> _DeviceIndex:
        """The index tensors on ``device``, copied once per placement."""
        if device not in self._on_device:

            def to(t: Tensor) -> Tensor:
                # non_blocking: a host-to-device copy from pageable memory without a stream sync
                return t.to(device, non_blocking=True)

            send = [rows for _, rows in self.peers]
            self._on_device[device] = _DeviceIndex(
                local_slots=to(self.local_slots),
                local_rows=to(self.local_rows),
                first_src=to(self.first_src),
                adds=tuple((to(d), to(s)) for d, s in self.adds),
                send_rows=to(torch.cat(send) if send else torch.zeros(0, dtype=torch.int64)),
                ar_rows=to(self.ar_rows),
                ar_pos=to(self.ar_pos),
            )
        return self._on_device[device]


@torch.no_grad()
def sync_replica_grads_(
    params: list[torch.nn.Parameter], index: ReplicaIndex, num_ranks: int, group: dist.ProcessGroup | None
) -> None:
    """Sum replica gradients across slots and ranks, write back, divide by ``num_ranks``.

    Every rank of the group calls it (it joins the all-reduce when ``X > 0``; the
    point-to-point exchange involves the holders of shared experts only).

    Args:
        params: per-slot parameters, each ``(S, ...)``; missing grads become zeros.
        index: the current :class:`ReplicaIndex`.
        num_ranks: ``N``.
        group: the EP group (None: the default group).
    """
    grads = []
    for p in params:
        if p.grad is None or not p.grad.is_contiguous():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.contiguous()
        grads.append(p.grad)
    if index.num_local or index.num_all_reduce:
        dev = index.on(grads[0].device)
        flats = [g.view(g.shape[0], -1) for g in grads]
        sizes = [f.shape[1] for f in flats]
        packed_QD = torch.cat([f.index_select(0, dev.local_slots) for f in flats], dim=1)
        num_recv = sum(len(rows) for _, rows in index.peers)
        z_VD = packed_QD.new_empty(index.num_local + num_recv, packed_QD.shape[1])
        local_KD = z_VD[: index.num_local].zero_().index_add_(0, dev.local_rows, packed_QD)
        if index.peers:
            send_VD = local_KD.index_select(0, dev.send_rows)
            ops, start = [], 0
            for q, rows in index.peers:
                end = start + len(rows)
                # P2POp takes the peer's global rank (group_peer= needs torch >= 2.6)
                peer = dist.get_global_rank(group, q) if group is not None else q
                ops.append(dist.P2POp(dist.isend, send_VD[start:end], peer, group))
                recv = z_VD[index.num_local + start : index.num_local + end]
                ops.append(dist.P2POp(dist.irecv, recv, peer, group))
                start = end
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        total_KD = z_VD.index_select(0, dev.first_src)
        for dst, src in dev.adds:  # holder after holder, the same order on every holder
            total_KD.index_add_(0, dst, z_VD.index_select(0, src))
        if index.num_all_reduce:
            buf_XD = packed_QD.new_zeros(index.num_all_reduce, packed_QD.shape[1])
            buf_XD.index_copy_(0, dev.ar_pos, local_KD.index_select(0, dev.ar_rows))
            dist.all_reduce(buf_XD, group=group)
            total_KD.index_copy_(0, dev.ar_rows, buf_XD.index_select(0, dev.ar_pos))
        summed_QD = total_KD.index_select(0, dev.local_rows)
        for f, part in zip(flats, summed_QD.split(sizes, dim=1), strict=True):
            f.index_copy_(0, dev.local_slots, part)
    if num_ranks > 1:
        for g in grads:
            g.div_(num_ranks)
