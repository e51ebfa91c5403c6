"""Replica-gradient sync of :class:`~lightning_eplb.moe.ExpertParallelMoE`: plan and executor.

Every replica of a logical expert must end a step with the same gradient: the sum over all
its replicas. Each rank first sums its own slots of an expert (the *local sum*); the total
is then the sum of the holders' local sums **in increasing rank order**, so every holder
computes the identical floating-point value and replicas stay bit-identical.

Two ways to get the other holders' local sums, chosen per expert on the host when the
placement changes (the same choice on every rank, as it depends on the placement only):

* point-to-point: each rank sends its local sums to every other holder, all peers in one
  ``batch_isend_irecv``; ``(h - 1) * D`` elements sent per holder of an expert with ``h``
  holders.
* all-reduce over the EP group: ``2 (N - 1) / N * D`` elements per rank per expert, whether
  the rank holds it or not; cheaper for experts held by many ranks.

An expert held by one rank only (several slots there) needs no communication.

When every replicated expert of a rank sits in one local slot there (the usual case), the
local sums are the gradient's own rows: messages are views of them, the sums are added in
place, nothing is written back. Row sets of at most ``MAX_RUNS`` runs of consecutive rows
are handled slice by slice (one message per run, both sides compute the same split);
others go through one gathered copy.

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

from lightning_eplb._rows import Pair, Rows, message_sizes
from lightning_eplb._sync_cost import holders_of, pick_max_p2p_holders, ring_rows
from lightning_eplb.placement import on_host


@dataclass(frozen=True)
class _DeviceIndex:
    """The index on a device, with rows of ``L`` translated to rows of the *base*: the
    gradient itself (rows = local slots) when every replicated expert has one local slot,
    else the ``(K, D)`` local sums."""

    local_slots: Rows  # (Q,)
    local_rows: Rows  # (Q,) row in the (K, D) local sums
    send: tuple[Rows, ...]  # per peer: base rows sent
    recv_sizes: tuple[list[int], ...]  # per peer: the sizes of its messages
    adds: tuple[Pair, ...]  # rounds: base rows += received rows
    pre_rows: Rows  # (B,) base rows whose own holder position is >= 2
    pre_first: Rows  # (B,) received row of their lowest holder
    pre_adds: tuple[Pair, ...]  # rounds: (B, D) prefix rows += received rows
    ar_in: Pair  # all-reduce buffer rows = base rows
    ar_out: Pair  # base rows = all-reduce buffer rows


@dataclass
class ReplicaIndex:
    """How this rank syncs the gradients of replicated experts; depends on the placement only.

    Built on CPU when the placement changes and copied to the device once, so the gradient
    sync needs no host synchronisation.

    Attributes:
        local_slots: ``(Q,)`` int64 local slots holding a replicated expert.
        local_rows: ``(Q,)`` int64 row of each in the ``(K, D)`` local sums ``L`` (this
            rank's replicated experts in increasing logical id).
        num_local: ``K``.
        peers: ``(peer rank in the EP group, rows of L exchanged with it)`` in increasing
            rank; the peer sends the same experts in the same order.
        num_recv: rows received from all peers (the received buffer, peer after peer).
        adds: rounds ``(dst rows of L, src rows of the received buffer)``, applied in order
            as ``L[dst] += received[src]``: first the other of an expert's two lowest-ranked
            holders, then the holders after them in rank order.
        pre_rows, pre_first, pre_adds: for experts of which this rank is the third or later
            holder: their rows of L, the received row of the lowest holder, and rounds
            ``(rows of the prefix, received rows)`` summing the holders before this one.
        ar_rows: ``(K_ar,)`` rows of L synced by all-reduce; ``ar_pos``: ``(K_ar,)`` their
            rows in the all-reduce buffer.
        base_rows: ``(K,)`` where each row of L lives during the sync: its local slot in
            the gradient itself when every replicated expert of this rank has one local
            slot (the usual case: no copies), else its row in a ``(K, D)`` buffer of sums.
        one_slot_each: which of the two (True: every replicated expert of this rank sits
            in exactly one local slot, so the gradient is the base).
        recv_sizes: per peer, the sizes of the messages it sends (one per run of its base
            rows, or one packed message; see ``_rows.message_sizes``).
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
    num_recv: int
    adds: list[tuple[Tensor, Tensor]]
    pre_rows: Tensor
    pre_first: Tensor
    pre_adds: list[tuple[Tensor, Tensor]]
    ar_rows: Tensor
    ar_pos: Tensor
    base_rows: Tensor
    one_slot_each: bool
    recv_sizes: list[list[int]]
    num_replicated: int
    num_all_reduce: int
    max_p2p_holders: int
    sent_rows: float
    all_reduce_rows: float
    _on_device: dict[torch.device, _DeviceIndex] = field(default_factory=dict, repr=False)

    @classmethod
    @on_host
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
                rank (ties: the larger value: point-to-point
                needs no zero-filled buffer and sums in place).

        Returns:
            the index.
        """
        p2l = physical_to_logical.to(torch.int64).tolist()
        num_ranks = len(p2l) // num_slots
        holders = holders_of(p2l, replica_count.to(torch.int64).tolist(), num_slots)
        replicated = list(holders)  # increasing
        is_rep = set(replicated)
        ring = ring_rows(num_ranks)
        if max_p2p_holders is None:
            max_p2p_holders = pick_max_p2p_holders(holders, num_ranks)
        elif max_p2p_holders < 1:
            raise ValueError(f"max_p2p_holders ({max_p2p_holders}) must be >= 1")
        t = max_p2p_holders
        all_reduced = [e for e in replicated if len(holders[e]) > t]
        ar_index = {e: i for i, e in enumerate(all_reduced)}

        def base(r: int) -> tuple[bool, dict[int, int]]:
            """Whether rank r sums in its gradient itself (each of its replicated experts
            sits in one local slot there), and the base row of each: that slot, else the
            expert's row of its local sums. The one rule both ends of an exchange use."""
            slots_r = p2l[r * num_slots : (r + 1) * num_slots]
            on_r = [e for e in slots_r if e in is_rep]
            if len(on_r) == len(set(on_r)):
                return True, {e: s for s, e in enumerate(slots_r) if e in is_rep}
            return False, {e: k for k, e in enumerate(sorted(set(on_r)))}

        mine = [e for e in replicated if rank in holders[e]]
        krow = {e: k for k, e in enumerate(mine)}
        in_place, my_base = base(rank)
        local = [
            (s, krow[e]) for s, e in enumerate(p2l[rank * num_slots : (rank + 1) * num_slots]) if e in krow
        ]
        p2p = [e for e in mine if 1 < len(holders[e]) <= t]
        peers: list[tuple[int, list[int]]] = []
        recv_sizes: list[list[int]] = []
        position: dict[tuple[int, int], int] = {}  # (peer, expert) -> row of the received buffer
        num_recv = 0
        for q in range(num_ranks):
            shared = [e for e in p2p if q != rank and q in holders[e]]
            if shared:
                for i, e in enumerate(shared):
                    position[q, e] = num_recv + i
                num_recv += len(shared)
                peers.append((q, [krow[e] for e in shared]))
                _, theirs = base(q)
                recv_sizes.append(message_sizes([theirs[e] for e in shared]))
        # Canonical sum ((h0 + h1) + h2) + ... over the holders in rank order, computed in
        # place on the local sums L: exact because a + b == b + a in floating point. An
        # expert whose own position o is 0 or 1 adds the other of the first two holders to L;
        # one with o >= 2 first sums h0..h(o-1) in a temporary ("pre"), then L += pre; then
        # every expert adds the holders after max(o, 1), one position per round.
        first_add: tuple[list[int], list[int]] = ([], [])
        pre_rows: list[int] = []
        pre_terms: list[list[int]] = []
        later: list[tuple[list[int], list[int]]] = []
        for e in p2p:
            hs = holders[e]
            o = hs.index(rank)
            src = {j: position[r, e] for j, r in enumerate(hs) if r != rank}
            if o <= 1:
                first_add[0].append(krow[e])
                first_add[1].append(src[1 - o])
            else:
                pre_rows.append(krow[e])
                pre_terms.append([src[j] for j in range(o)])
            for j in range(max(o, 1) + 1, len(hs)):
                while len(later) <= j - 2:
                    later.append(([], []))
                later[j - 2][0].append(krow[e])
                later[j - 2][1].append(src[j])
        pre_rounds = []
        for j in range(1, max((len(terms) for terms in pre_terms), default=0)):
            which = [b for b, terms in enumerate(pre_terms) if len(terms) > j]
            pre_rounds.append((which, [pre_terms[b][j] for b in which]))
        mine_ar = [e for e in mine if e in ar_index]
        sent = sum(len(rows) for _, rows in peers) + ring * len(all_reduced)

        def i64(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64)

        pairs = [first_add, *later]
        return cls(
            local_slots=i64([s for s, _ in local]),
            local_rows=i64([k for _, k in local]),
            num_local=len(mine),
            peers=[(q, i64(rows)) for q, rows in peers],
            num_recv=num_recv,
            adds=[(i64(d), i64(s)) for d, s in pairs if d],
            pre_rows=i64(pre_rows),
            pre_first=i64([terms[0] for terms in pre_terms]),
            pre_adds=[(i64(b), i64(z)) for b, z in pre_rounds],
            ar_rows=i64([krow[e] for e in mine_ar]),
            ar_pos=i64([ar_index[e] for e in mine_ar]),
            base_rows=i64([my_base[e] for e in mine]),
            one_slot_each=in_place,
            recv_sizes=recv_sizes,
            num_replicated=len(replicated),
            num_all_reduce=len(all_reduced),
            max_p2p_holders=t,
            sent_rows=float(sent),
            all_reduce_rows=ring * len(replicated),
        )

    def on(self, device: torch.device) -> _DeviceIndex:
        """The index tensors on ``device`` (rows of L translated to base rows), copied once
        per placement."""
        if device not in self._on_device:
            base = self.base_rows

            def rows(k: Tensor) -> Rows:
                return Rows.of(base[k], device)

            ar_in = Pair.of(self.ar_pos, base[self.ar_rows], device)
            self._on_device[device] = _DeviceIndex(
                local_slots=Rows.of(self.local_slots, device),
                local_rows=Rows.of(self.local_rows, device),
                send=tuple(rows(k) for _, k in self.peers),
                recv_sizes=tuple(self.recv_sizes),
                adds=tuple(Pair.of(base[d], s, device) for d, s in self.adds),
                pre_rows=rows(self.pre_rows),
                pre_first=Rows.of(self.pre_first, device),
                pre_adds=tuple(Pair.of(b, z, device) for b, z in self.pre_adds),
                ar_in=ar_in,
                ar_out=ar_in.flipped(),
            )
        return self._on_device[device]


@dataclass
class PendingSync:
    """A replica-gradient sync whose communication is in flight (see :func:`start_sync`);
    per expert tensor: its gradient, local sums ``(K, D)``, received rows ``(V, D)`` and
    all-reduce buffer ``(X, D)``; ``done``: on CUDA, when the sums were queued on a side
    stream behind the exchange (``finish_early``), the event that marks them done;
    ``summed``: the sums are done already (the average over copies needed them first)."""

    grads: list[Tensor]
    local: list[Tensor] = field(default_factory=list)
    recv: list[Tensor] = field(default_factory=list)
    ar_bufs: list[Tensor] = field(default_factory=list)
    works: list = field(default_factory=list)
    done: torch.cuda.Event | None = None
    summed: bool = False
    copies: PendingAverage | None = None  # the average over the copies, in flight


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority stream per device for the sums behind early-finished exchanges."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return _SIDE_STREAMS[device]


def _grads(params: list[torch.nn.Parameter]) -> list[Tensor]:
    grads = []
    for p in params:
        if p.grad is None or not p.grad.is_contiguous():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.contiguous()
        grads.append(p.grad)
    return grads


@torch.no_grad()
def start_sync(
    params: list[torch.nn.Parameter],
    index: ReplicaIndex,
    group: dist.ProcessGroup | None,
    finish_early: bool = False,
    copies_group: dist.ProcessGroup | None = None,
) -> PendingSync:
    """Gather this rank's local sums and start their exchange; returns without waiting.

    Every rank of the group calls it, in the same order relative to its other collectives on
    ``group``. Until :func:`finish_sync` the gradients must not be changed.

    Args:
        params: per-slot parameters, each ``(S, ...)``; missing grads become zeros.
        index: the current :class:`ReplicaIndex`.
        group: the group of the exchange (None: the default group).
        finish_early: on CUDA, queue the canonical sums and the write-back on a side
            stream right away, to run when the exchange completes (no host wait);
            :func:`finish_sync` then only orders the current stream after them.
        copies_group: with expert parallelism inside data parallelism, the ranks holding
            copies of this rank's slots: once the sums are done, every expert gradient is
            averaged over it (one all-reduce per tensor, started here; on CUDA behind the
            sums, on the CPU after waiting for them).
    """
    pending = PendingSync(_grads(params))
    if index.num_local or index.num_all_reduce:
        _start_exchange(pending, index, group)
    if finish_early and pending.works and pending.grads[0].is_cuda:
        # queue the sums now, behind the exchange, on a side stream: they run as soon as
        # the data arrives, during the rest of the backward, instead of after it
        stream = _side_stream(pending.grads[0].device)
        with torch.cuda.stream(stream):
            _wait_and_sum(pending, index)
            pending.done = torch.cuda.Event()
            pending.done.record(stream)
    if copies_group is not None and dist.get_world_size(copies_group) > 1:
        # also on a rank without replicated experts: every copy joins every average
        if pending.done is None:  # CPU, or nothing exchanged: sum now (no-op without replicas)
            _wait_and_sum(pending, index)
            pending.summed = True
            pending.copies = start_average(pending.grads, copies_group)
        else:
            with torch.cuda.stream(_side_stream(pending.grads[0].device)):  # behind the sums
                pending.copies = start_average(pending.grads, copies_group)
    return pending


def _start_exchange(pending: PendingSync, index: ReplicaIndex, group: dist.ProcessGroup | None) -> None:
    """Post the exchange of :func:`start_sync`: from the gradient itself when every
    replicated expert has one local slot here (messages are views of its rows), else from
    the ``(K, D)`` local sums gathered first."""
    dev = index.on(pending.grads[0].device)
    # P2POp takes the peer's global rank (group_peer= needs torch >= 2.6)
    peers = [dist.get_global_rank(group, q) if group is not None else q for q, _ in index.peers]
    ops = []
    for g in pending.grads:
        flat_SD = g.view(g.shape[0], -1)
        if index.one_slot_each:
            base = flat_SD  # summed in place: no copy
        else:
            base = flat_SD.new_zeros(index.num_local, flat_SD.shape[1])
            base.index_add_(0, dev.local_rows.index, dev.local_slots.take(flat_SD))
        pending.local.append(base)
        recv_VD = flat_SD.new_empty(index.num_recv, flat_SD.shape[1])
        pending.recv.append(recv_VD)
        start = 0
        for peer, rows, sizes in zip(peers, dev.send, dev.recv_sizes, strict=True):
            for part in rows.parts(base):
                ops.append(dist.P2POp(dist.isend, part.contiguous(), peer, group))
            for n in sizes:
                ops.append(dist.P2POp(dist.irecv, recv_VD[start : start + n], peer, group))
                start += n
    if ops:
        pending.works.extend(dist.batch_isend_irecv(ops))
    if index.num_all_reduce:
        for base in pending.local:
            buf_XD = base.new_zeros(index.num_all_reduce, base.shape[1])
            dev.ar_in.copy(buf_XD, base)
            pending.ar_bufs.append(buf_XD)
            pending.works.append(dist.all_reduce(buf_XD, group=group, async_op=True))


@dataclass
class PendingAverage:
    """All-reduces of :func:`start_average` in flight, and the divisor still to apply."""

    grads: list[Tensor]
    works: list
    divide_by: int

    def finish(self) -> None:
        """Wait (on the current stream) and divide where the backend had no AVG."""
        for work in self.works:
            work.wait()
        if self.divide_by > 1:
            torch._foreach_div_(self.grads, float(self.divide_by))


def start_average(grads: list[Tensor], group: dist.ProcessGroup) -> PendingAverage:
    """Start averaging every tensor in place over ``group``: NCCL's AVG, or a sum divided by
    the group's size in :meth:`PendingAverage.finish` (gloo has no AVG); issued on the
    current stream. Expert data parallelism's average over the copies, overlapped
    (:func:`start_sync`) or after the backward (``_ep_layout.average_over_copies``)."""
    avg = dist.get_backend(group) == "nccl"
    op = dist.ReduceOp.AVG if avg else dist.ReduceOp.SUM
    works = [dist.all_reduce(g, op=op, group=group, async_op=True) for g in grads]
    return PendingAverage(grads, works, 1 if avg else dist.get_world_size(group))


@torch.no_grad()
def finish_sync(pending: PendingSync, index: ReplicaIndex) -> None:
    """Complete :func:`start_sync`: afterwards every replica's gradient is the canonical
    sum over all replicas of its expert, bit-identical on every holder (and averaged over
    the copies when ``copies_group`` was given).

    Args:
        pending: from :func:`start_sync`.
        index: the same :class:`ReplicaIndex`.
    """
    if pending.done is not None:
        torch.cuda.current_stream(pending.grads[0].device).wait_event(pending.done)
    elif not pending.summed:
        _wait_and_sum(pending, index)
    if pending.copies is not None:
        pending.copies.finish()


def _wait_and_sum(pending: PendingSync, index: ReplicaIndex) -> None:
    """Wait for the exchange (on the current stream), sum in canonical holder order and
    write every replica back."""
    for work in pending.works:
        work.wait()
    if not pending.local:
        return
    dev = index.on(pending.grads[0].device)
    for i, (g, base) in enumerate(zip(pending.grads, pending.local, strict=True)):
        recv_VD = pending.recv[i]
        if len(dev.pre_rows):
            pre_BD = dev.pre_first.take(recv_VD).clone()
            for pair in dev.pre_adds:
                pair.add(pre_BD, recv_VD)
            dev.pre_rows.add(base, pre_BD)
        for pair in dev.adds:  # round after round, the same order on every holder
            pair.add(base, recv_VD)
        if pending.ar_bufs:
            dev.ar_out.copy(base, pending.ar_bufs[i])
        if not index.one_slot_each:  # else the base is the gradient
            dev.local_slots.put(g.view(g.shape[0], -1), dev.local_rows.take(base))


def sync_replica_grads_(
    params: list[torch.nn.Parameter], index: ReplicaIndex, group: dist.ProcessGroup | None
) -> None:
    """Sum replica gradients across slots and ranks and write the sum to every replica.

    Every rank of the group calls it (it joins the all-reduce when ``X > 0``; the
    point-to-point exchange involves the holders of shared experts only).

    Args:
        params: per-slot parameters, each ``(S, ...)``; missing grads become zeros.
        index: the current :class:`ReplicaIndex`.
        group: the EP group (None: the default group).
    """
    finish_sync(start_sync(params, index, group), index)
