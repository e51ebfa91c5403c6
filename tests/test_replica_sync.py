"""Replica-gradient sync: point-to-point plan and executor against brute force.

The distributed checks run every case in one gloo worker per world size (2 and 4 ranks):
after ``sync_replica_grads_`` every slot's gradient equals the float64 sum over all replicas
of its logical expert (everything gathered), replicas are bit-identical
across ranks, and the result matches the former all-reduce-only path within 1e-12; with
rows handled as slices (runs), as gathered copies, and mixed.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb import _rows
from lightning_eplb._replica_sync import ReplicaIndex, sync_replica_grads_
from lightning_eplb._sync_cost import sync_rows
from tests._dist import spawn
from tests.test_moe import random_placement

SHAPES = ((3, 2), (3, 2), (2, 3))  # per-slot shapes of w1, w3, w2 (small, distinct sizes)


def _counts(p2l: Tensor, num_logical: int) -> Tensor:
    return torch.bincount(p2l, minlength=num_logical)


def _holders(p2l: Tensor, num_ranks: int) -> dict[int, list[int]]:
    slots = len(p2l) // num_ranks
    out: dict[int, list[int]] = {}
    for p, e in enumerate(p2l.tolist()):
        if p // slots not in out.setdefault(e, []):
            out[e].append(p // slots)
    return out


def _cases(n: int) -> list[tuple[str, Tensor, int]]:
    """``(name, physical_to_logical (P,), E)``; hand-made edge cases plus random placements."""
    cases = [
        ("no replicas", torch.arange(2 * n), 2 * n),
        # expert 0 twice on rank 0 (no communication needed for it), expert 1 on ranks 0 and 1
        ("two on one rank", torch.tensor([0, 0, 1, 1, 2, 3, *range(4, 4 + 3 * (n - 2))]), 3 * n - 2),
    ]
    # expert 0 on every rank, expert 1 on the first min(3, N) ranks, the rest once each
    rows: list[int] = []
    fresh = 2
    for r in range(n):
        rows += [0, 1, fresh] if r < 3 else [0, fresh, fresh + 1]
        fresh += 1 if r < 3 else 2
    cases.append(("on every rank", torch.tensor(rows), fresh))
    # 12 experts on every rank at every other slot, in rank-dependent orders: more runs than
    # MAX_RUNS (packed messages, gathered adds) and pairs that do not run together
    rows, fresh = [], 12
    for r in range(n):
        for e in [(5 * i + r) % 12 for i in range(12)]:
            rows += [e, fresh]
            fresh += 1
    cases.append(("many runs", torch.tensor(rows), fresh))
    for seed in range(3):
        pl = random_placement(n + 2, 4 * n, n, seed)  # many replicas: up to N holders
        cases.append((f"random {seed}", pl.physical_to_logical[0], n + 2))
    return cases


def _old_sync(grads: list[Tensor], p2l: Tensor, counts: Tensor, rank: int, n: int) -> list[Tensor]:
    """The former path: one all-reduce of every replicated expert's summed slots."""
    slots = len(p2l) // n
    local = p2l[rank * slots : (rank + 1) * slots]
    rep = counts > 1
    row = torch.cumsum(rep.long(), 0) - 1
    out = [g.clone() for g in grads]
    buf = torch.zeros(int(rep.sum()), sum(g[0].numel() for g in grads), dtype=grads[0].dtype)
    for s, e in enumerate(local.tolist()):
        if rep[e]:
            buf[row[e]] += torch.cat([g[s].flatten() for g in grads])
    dist.all_reduce(buf)
    for s, e in enumerate(local.tolist()):
        if rep[e]:
            for o, part in zip(out, buf[row[e]].split([g[0].numel() for g in grads]), strict=True):
                o[s] = part.view_as(o[s])
    return out


def _gather(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _flat(tensors: list[Tensor]) -> Tensor:
    """``(S, D)``: the three per-slot tensors side by side."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)


def _run_sync(rank: int, n: int) -> None:
    for case, (name, p2l, num_logical) in enumerate(_cases(n)):
        counts = _counts(p2l, num_logical)
        slots = len(p2l) // n
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(1000 * case + rank)
            before = [
                torch.randn(slots, *shape, generator=gen, dtype=torch.float64).to(dtype) for shape in SHAPES
            ]
            full_before = _gather(_flat(before)).double()
            want = torch.zeros(num_logical, full_before.shape[1], dtype=torch.float64)
            want = want.index_add_(0, p2l, full_before)[p2l]
            old = _flat(_old_sync(before, p2l, counts, rank, n)) if dtype == torch.float64 else None
            for max_holders, max_runs in itertools.product((None, *sorted({1, 2, n})), (0, 1, 8)):
                _rows.MAX_RUNS = max_runs  # 0: always gathered copies; 8: the default
                params = [torch.nn.Parameter(torch.zeros_like(b)) for b in before]
                for p, b in zip(params, before, strict=True):
                    p.grad = b.clone()
                index = ReplicaIndex.build(p2l, counts, rank, slots, max_p2p_holders=max_holders)
                sync_replica_grads_(params, index, None)
                where = f"{name}, {dtype}, max_p2p_holders={max_holders}, MAX_RUNS={max_runs}, rank {rank}"
                synced = [p.grad for p in params if p.grad is not None]
                assert len(synced) == 3 and all(g.is_contiguous() for g in synced)
                after = _flat(synced)
                full_after = _gather(after)
                tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
                torch.testing.assert_close(full_after.double(), want, atol=tol, rtol=tol, msg=where)
                if old is not None:
                    torch.testing.assert_close(after, old, atol=1e-12, rtol=0, msg=where)
                first: dict[int, Tensor] = {}
                for slot, e in enumerate(p2l.tolist()):  # replicas bit-identical (bytes)
                    ref = first.setdefault(e, full_after[slot])
                    assert torch.equal(full_after[slot].view(torch.uint8), ref.view(torch.uint8)), where


@pytest.mark.parametrize("world_size", [2, 4])
def test_sync_matches_brute_force(world_size: int) -> None:
    spawn(_run_sync, world_size)


def test_plan_symmetric_and_cost() -> None:
    """Every rank receives from a peer exactly the experts that peer sends it, in order."""
    for n in (1, 2, 3, 4):
        for name, p2l, num_logical in _cases(n) if n > 1 else [("one rank", torch.tensor([0, 1, 0]), 2)]:
            counts = _counts(p2l, num_logical)
            holders = _holders(p2l, n)
            for t in (None, 1, 2, n):
                index = [
                    ReplicaIndex.build(p2l, counts, r, len(p2l) // n, max_p2p_holders=t) for r in range(n)
                ]
                assert (
                    len({i.max_p2p_holders for i in index}) == 1
                    and len({i.num_all_reduce for i in index}) == 1
                )
                mine = [[e for e in sorted(holders) if counts[e] > 1 and r in holders[e]] for r in range(n)]
                sends = {
                    (r, q): [mine[r][k] for k in rows.tolist()]
                    for r in range(n)
                    for q, rows in index[r].peers
                }
                for r, q in sends:
                    assert sends[r, q] == sends[q, r], (name, r, q)
                    assert all(1 < len(holders[e]) <= index[r].max_p2p_holders for e in sends[r, q])
                if t is None:  # the automatic choice is never worse than all-reduce only
                    busiest = max(i.sent_rows for i in index)
                    assert busiest <= index[0].all_reduce_rows + 1e-9, name
                    # the price the simulator puts on a placement is what the plan sends
                    assert sync_rows(p2l, counts, len(p2l) // n) == [i.sent_rows for i in index], name
                # ... and by brute force: each holder sends its sum to every other holder,
                # experts of more than max_p2p_holders holders go through the all-reduce
                t_used = index[0].max_p2p_holders
                ring = 2 * (n - 1) / n
                for r in range(n):
                    p2p = sum(len(h) - 1 for e, h in holders.items() if counts[e] > 1 and r in h and len(h) <= t_used)
                    reduced = sum(1 for e, h in holders.items() if counts[e] > 1 and len(h) > t_used)
                    assert index[r].sent_rows == pytest.approx(p2p + ring * reduced), (name, r)


def test_plan_even_benchmark_placement() -> None:
    """Rank r holds its E/N experts and R/N replicas of rank r+1's: a third of the bytes."""
    from benchmarks.moe_gpu import even_placement

    for redundant in (16, 32):
        pl = even_placement(64, 64 + redundant, 4)
        for r in range(4):
            index = ReplicaIndex.build(
                pl.physical_to_logical[0], pl.logical_replica_count[0], r, (64 + redundant) // 4
            )
            # each rank sends its R/N replicas to rank r+1 and its R/N replicated own experts to r-1
            assert index.sent_rows == 2 * redundant / 4 and index.num_all_reduce == 0
            assert index.all_reduce_rows == 2 * 3 / 4 * redundant


def test_bad_max_p2p_holders() -> None:
    with pytest.raises(ValueError, match="max_p2p_holders"):
        ReplicaIndex.build(torch.tensor([0, 0]), torch.tensor([2]), 0, 2, max_p2p_holders=0)
