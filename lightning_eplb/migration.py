"""Move expert weights and optimizer state to a new placement, in place, with P2P ops.

Shapes (suffixes used in names below):
    L: MoE layers      P: physical slots      N: expert-parallel ranks
    S = P // N: local slots per rank; every migrated tensor is ``(S, ...)``.

How it works: :func:`plan_migration` decides who sends which slot to whom (identical on
every rank). :func:`migrate_experts` views every tensor as ``(S, row_bytes)`` bytes, so any
mix of dtypes travels together, and cuts the work into *batches*: byte ranges of slot rows
of one or more layers. For each batch a rank packs everything it sends to one peer into one
buffer, posts all sends and receives with one ``batch_isend_irecv``, and, once they are
done, writes received rows and local copies into place. Outgoing rows and local-copy
sources are captured from the old content before anything of that batch is written, and
batches touch disjoint bytes, so updating in place is safe. The next batch is packed and
posted before the previous one is unpacked, so packing overlaps the transfers.

Memory knob: ``max_buffer_bytes`` bounds the staging memory of one rank (send buffers,
receive buffers and staged local copies of the two batches in flight); each batch takes at
most half of it. The default is the bytes of one layer's ``S`` local slots over all its
tensors (the largest layer), i.e. about one layer's local experts. Smaller values mean
smaller messages (lower bandwidth), larger ones fewer, bigger messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb._migration_plan import Copy, MigrationPlan, RankLayerPlan, Recv, Send, plan_migration
from lightning_eplb._optim_state import optimizer_state_tensors

__all__ = [
    "Copy",
    "MigrationPlan",
    "MigrationStats",
    "RankLayerPlan",
    "Recv",
    "Send",
    "migrate_experts",
    "optimizer_state_tensors",
    "plan_migration",
]

log = logging.getLogger(__name__)

_ALIGN = 512  # byte ranges of a split slot row start on multiples of this when they can


@dataclass(frozen=True)
class MigrationStats:
    """What one rank moved in :func:`migrate_experts`.

    Attributes:
        bytes_sent: bytes this rank sent to peers.
        bytes_received: bytes this rank received from peers (local copies not counted).
        seconds: wall time of the migration on this rank, device work included.

    Example:
        >>> stats = MigrationStats(bytes_sent=0, bytes_received=2 * 88_080_384, seconds=0.5)
        >>> round(stats.bytes_received / stats.seconds / 1e9, 3)  # GB/s received
        0.352
    """

    bytes_sent: int
    bytes_received: int
    seconds: float


class _Part(NamedTuple):
    """Bytes ``[start, stop)`` of every slot row of ``layers[layer][tensor]``."""

    layer: int
    tensor: int
    start: int
    stop: int


class _LocalOps(NamedTuple):
    """One layer's work on this rank, in the order messages are packed."""

    send: dict[int, list[int]]  # peer -> local source slots
    recv: dict[int, list[int]]  # peer -> local destination slots
    staged: list[tuple[int, list[int]]]  # (src, dsts): src is overwritten, copy its old rows via staging
    direct: list[tuple[int, int]]  # (dst, src): src is kept, copy any time
    after: list[tuple[int, int]]  # (dst, src): src is filled by a receive, copy after it


def _staging_rows(rp: RankLayerPlan) -> int:
    return (
        len(rp.sends)
        + len(rp.recvs)
        + len({c.src for c in rp.copies if not c.received and c.src not in rp.keep})
    )


def _local_ops(rp: RankLayerPlan) -> _LocalOps:
    send: dict[int, list[int]] = {}
    for s in rp.sends:
        send.setdefault(s.peer, []).append(s.slot)
    recv: dict[int, list[int]] = {}
    for r in rp.recvs:
        recv.setdefault(r.peer, []).append(r.slot)
    kept = set(rp.keep)
    staged: dict[int, list[int]] = {}
    direct, after = [], []
    for c in rp.copies:
        if c.received:
            after.append((c.dst, c.src))
        elif c.src in kept:
            direct.append((c.dst, c.src))
        else:
            staged.setdefault(c.src, []).append(c.dst)
    return _LocalOps(send, recv, sorted(staged.items()), direct, after)


def _build_batches(plan: MigrationPlan, row_bytes: list[list[int]], cap: int) -> list[list[_Part]]:
    """Cut the work into batches whose staging bytes stay <= ``cap`` on every rank.

    Args:
        plan: the migration plan.
        row_bytes: ``row_bytes[l][t]`` bytes of one slot row of tensor ``t`` of layer ``l``.
        cap: staging bytes allowed per batch and rank.
    """
    batches: list[list[_Part]] = []
    current: list[_Part] = []
    used = [0] * plan.num_ranks
    for layer, sizes in enumerate(row_bytes):
        ranks = plan.layers[layer]
        if not any(rp.copies or rp.recvs or rp.sends for rp in ranks):
            continue
        cost = [_staging_rows(rp) for rp in ranks]
        total = sum(sizes)
        if total == 0:
            continue
        seg = total
        if max(cost) > 0:  # equal segments of at most `limit` bytes, aligned when large enough
            limit = max(1, cap // max(cost))
            if limit >= _ALIGN:
                limit -= limit % _ALIGN
            seg = -(-total // -(-total // limit))
            if limit >= _ALIGN:
                seg = -(-seg // _ALIGN) * _ALIGN
        for start in range(0, total, seg):
            stop = min(start + seg, total)
            length = stop - start
            if current and any(u + c * length > cap for u, c in zip(used, cost, strict=True)):
                batches.append(current)
                current, used = [], [0] * plan.num_ranks
            offset = 0
            for t, size in enumerate(sizes):
                lo, hi = max(start, offset), min(stop, offset + size)
                if lo < hi:
                    current.append(_Part(layer, t, lo - offset, hi - offset))
                offset += size
            used = [u + c * length for u, c in zip(used, cost, strict=True)]
    if current:
        batches.append(current)
    return batches


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int, bool]:
    """``(rank, world_size, distributed)`` of the expert-parallel group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1, False
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, world, world > 1


def _byte_rows(layers: Sequence[Sequence[Tensor]], num_layers: int, num_slots: int) -> list[list[Tensor]]:
    """View every tensor as ``(S, row_bytes)`` uint8 sharing its storage."""
    if len(layers) != num_layers:
        raise ValueError(f"layers has {len(layers)} entries, the placements have L={num_layers} layers")
    rows: list[list[Tensor]] = []
    devices = set()
    for l_idx, tensors in enumerate(layers):
        out = []
        for t_idx, t in enumerate(tensors):
            if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != num_slots:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"layers[{l_idx}][{t_idx}] has shape {shape}; dim 0 must be the S={num_slots} local slots"
                )
            if not t.is_contiguous():
                raise ValueError(f"layers[{l_idx}][{t_idx}] must be contiguous to be migrated in place")
            devices.add(t.device)
            out.append(t.detach().reshape(num_slots, -1).view(torch.uint8))
        rows.append(out)
    if len(devices) > 1:
        raise ValueError(f"all migrated tensors must be on one device, found {sorted(map(str, devices))}")
    return rows


def _check_consistent(
    old_LP: Tensor,
    new_LP: Tensor,
    row_bytes: list[list[int]],
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> None:
    """Raise the same ValueError on every rank if ranks disagree on placements or tensor sizes."""
    mod = (1 << 61) - 1

    def digest(values: list[int]) -> int:
        h = 0
        for v in values:
            h = (h * 1_000_003 + v + 1) % mod
        return h

    names = ["num_layers", "num_physical", "old placement", "new placement", "tensors per layer", "row bytes"]
    values = [
        int(old_LP.shape[0]),
        int(old_LP.shape[1]),
        digest(old_LP.flatten().tolist()),
        digest(new_LP.flatten().tolist()),
        digest([len(sizes) for sizes in row_bytes]),
        digest([b for sizes in row_bytes for b in sizes]),
    ]
    vec = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
    high, low = vec[: len(values)].tolist(), [-v for v in vec[len(values) :].tolist()]
    differing = [n for n, h, lo in zip(names, high, low, strict=True) if h != lo]
    if differing:
        raise ValueError(
            f"ranks disagree on {', '.join(differing)}: every rank must pass the same placements and "
            "tensors of the same shapes and dtypes, in the same order"
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _InFlight(NamedTuple):
    """A posted batch: its buffers stay referenced until it is finished."""

    batch: list[_Part]
    recv_sizes: dict[int, int]
    works: list
    send_buf: Tensor
    recv_buf: Tensor
    stage_buf: Tensor


class _Executor:
    """Runs the batches of one migration on this rank."""

    def __init__(
        self,
        rows: list[list[Tensor]],
        ops: list[_LocalOps],
        device: torch.device,
        peers: list[int],
        group: dist.ProcessGroup | None,
    ) -> None:
        self.rows, self.ops, self.device, self.peers, self.group = rows, ops, device, peers, group
        self.bytes_sent = 0
        self.bytes_received = 0

    def _sizes(self, batch: list[_Part], which: str) -> dict[int, int]:
        sizes: dict[int, int] = {}
        for part in batch:
            for peer, slots in getattr(self.ops[part.layer], which).items():
                sizes[peer] = sizes.get(peer, 0) + len(slots) * (part.stop - part.start)
        return {peer: n for peer, n in sorted(sizes.items()) if n}

    def start(self, batch: list[_Part]) -> _InFlight:
        """Capture outgoing rows and staged copies from the old content; post the P2P ops."""
        send_sizes, recv_sizes = self._sizes(batch, "send"), self._sizes(batch, "recv")
        num_staged = sum(len(self.ops[p.layer].staged) * (p.stop - p.start) for p in batch)
        send_buf = torch.empty(sum(send_sizes.values()), dtype=torch.uint8, device=self.device)
        recv_buf = torch.empty(sum(recv_sizes.values()), dtype=torch.uint8, device=self.device)
        stage_buf = torch.empty(num_staged, dtype=torch.uint8, device=self.device)
        offset = 0
        for peer in send_sizes:
            for part in batch:
                rows = self.rows[part.layer][part.tensor]
                n = part.stop - part.start
                for slot in self.ops[part.layer].send.get(peer, ()):
                    send_buf[offset : offset + n].copy_(rows[slot, part.start : part.stop])
                    offset += n
        offset = 0
        for part in batch:
            rows = self.rows[part.layer][part.tensor]
            n = part.stop - part.start
            for src, _ in self.ops[part.layer].staged:
                stage_buf[offset : offset + n].copy_(rows[src, part.start : part.stop])
                offset += n
        p2p = []
        for buf, sizes, op in ((send_buf, send_sizes, dist.isend), (recv_buf, recv_sizes, dist.irecv)):
            offset = 0
            for peer, n in sizes.items():
                p2p.append(dist.P2POp(op, buf[offset : offset + n], self.peers[peer], self.group))
                offset += n
        works = dist.batch_isend_irecv(p2p) if p2p else []
        self.bytes_sent += send_buf.numel()
        self.bytes_received += recv_buf.numel()
        return _InFlight(batch, recv_sizes, works, send_buf, recv_buf, stage_buf)

    def finish(self, handle: _InFlight) -> None:
        """Wait for the batch's transfers, then write received rows and local copies."""
        batch, recv_sizes, works, _send_buf, recv_buf, stage_buf = handle
        for work in works:
            work.wait()
        offset = 0
        for peer in recv_sizes:
            for part in batch:
                rows = self.rows[part.layer][part.tensor]
                n = part.stop - part.start
                for slot in self.ops[part.layer].recv.get(peer, ()):
                    rows[slot, part.start : part.stop].copy_(recv_buf[offset : offset + n])
                    offset += n
        offset = 0
        for part in batch:
            rows = self.rows[part.layer][part.tensor]
            n = part.stop - part.start
            ops = self.ops[part.layer]
            for _, dsts in ops.staged:
                for dst in dsts:
                    rows[dst, part.start : part.stop].copy_(stage_buf[offset : offset + n])
                offset += n
            for dst, src in ops.direct + ops.after:
                rows[dst, part.start : part.stop].copy_(rows[src, part.start : part.stop])


@torch.no_grad()
def migrate_experts(
    old_physical_to_logical: Tensor,
    new_physical_to_logical: Tensor,
    layers: Sequence[Sequence[Tensor]],
    group: dist.ProcessGroup | None = None,
    *,
    max_buffer_bytes: int | None = None,
    num_nodes: int = 1,
) -> MigrationStats:
    """Move per-slot tensors (expert weights and optimizer state) to a new placement, in place.

    Call it on every rank of ``group`` with the same arguments (placements, tensor shapes
    and dtypes); each rank passes its own local tensors. Without an initialised process
    group (or with one rank) it is a local permutation.

    Args:
        old_physical_to_logical: ``(L, P)`` or ``(P,)`` placement the tensors hold now.
        new_physical_to_logical: ``(L, P)`` or ``(P,)`` placement they must hold afterwards.
        layers: ``layers[l]`` lists the tensors of layer ``l``, each ``(S, ...)`` with dim 0 the
            local slot, any dtype, contiguous, all on one device (CPU for gloo, this rank's
            GPU for NCCL). They are written in place (same storage): parameters'
            ``.data`` and optimizer state stay valid.
        group: expert-parallel process group (``None``: the default group).
        max_buffer_bytes: bound on this rank's staging memory (see the module docstring);
            default: bytes of one layer's ``S`` local slots over all its tensors.
        num_nodes: nodes the ranks span, to prefer same-node sources.

    Returns:
        :class:`MigrationStats` of this rank.

    Raises:
        ValueError: on bad placements or tensors, or ranks that disagree about them.

    Tensors must not share memory with each other (pass a parameter once, not also its
    ``.data``). Scalar optimizer state (``step``) is not moved: see
    :func:`optimizer_state_tensors`.

    Example:
        Weights and their Adam moments move together (one process: a local permutation).

        >>> w = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # (S=3, 2)
        >>> opt = torch.optim.Adam([w])
        >>> w.grad = w.detach().clone()
        >>> opt.step()
        >>> tensors = [w, *optimizer_state_tensors(opt, [w])]  # w, exp_avg, exp_avg_sq
        >>> migrate_experts(torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0]), [tensors]).bytes_received
        0
        >>> opt.state[w]["exp_avg"][:, 0]
        tensor([0.2000, 0.2000, 0.0000])
    """
    rank, world, distributed = _group_info(group)
    plan = plan_migration(old_physical_to_logical, new_physical_to_logical, world, num_nodes=num_nodes)
    rows = _byte_rows(layers, plan.num_layers, plan.slots_per_rank)
    row_bytes = [[int(r.shape[1]) for r in layer] for layer in rows]
    device = next((r.device for layer in rows for r in layer), torch.device("cpu"))
    if distributed:
        if dist.get_backend(group) == "nccl" and device.type == "cpu":
            device = torch.device("cuda", torch.cuda.current_device())
        old_LP = torch.as_tensor(old_physical_to_logical).reshape(plan.num_layers, -1)
        new_LP = torch.as_tensor(new_physical_to_logical).reshape(plan.num_layers, -1)
        _check_consistent(old_LP, new_LP, row_bytes, device, group)
    if max_buffer_bytes is None:
        max_buffer_bytes = max([plan.slots_per_rank * sum(sizes) for sizes in row_bytes] + [2])
    elif max_buffer_bytes < 2:
        raise ValueError(f"max_buffer_bytes ({max_buffer_bytes}) must be >= 2")
    batches = _build_batches(plan, row_bytes, max_buffer_bytes // 2)
    peers = (
        [dist.get_global_rank(group, q) if group is not None else q for q in range(world)]
        if distributed
        else [0]
    )
    executor = _Executor(rows, [_local_ops(ranks[rank]) for ranks in plan.layers], device, peers, group)

    _synchronize(device)
    t0 = time.perf_counter()
    pending = None
    for batch in batches:
        handle = executor.start(batch)
        if pending is not None:
            executor.finish(pending)
        pending = handle
    if pending is not None:
        executor.finish(pending)
    _synchronize(device)
    stats = MigrationStats(executor.bytes_sent, executor.bytes_received, time.perf_counter() - t0)
    log.debug("migration on rank %d: %d batches, %s", rank, len(batches), stats)
    return stats
