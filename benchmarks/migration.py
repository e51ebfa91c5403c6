"""Migration bandwidth: expert weights and Adam moments moved with NCCL P2P vs raw P2P.

Run from the repository root on a GPU machine::

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/migration.py
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/migration.py

and on CPU with gloo (tiny experts, to check the script)::

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/migration.py --small

Experts are DeepSeek-V3 sized: three 7168x2048 bf16 matrices (88 MB) plus fp32 ``exp_avg``
and ``exp_avg_sq`` of each (352 MB), 440 MB per slot. The rearrangement goes from the
contiguous placement to a rebalance of real DeepSeek-V3 loads (``benchmarks/data``, the first
``E`` experts of the first ``L`` MoE layers); if ``lightning_eplb.rebalance`` is not available,
to a seeded random placement with replicas of the hottest experts. In the same run it
measures NCCL point-to-point bandwidth (pairs of ranks exchanging 1 GiB, and the per-peer
message size the migration uses, pairwise and with all peers at once), then the migration's
GB/s per rank (bytes received / seconds), its ratio to P2P, and the peak extra memory
(``torch.cuda.max_memory_allocated`` above what was allocated before) against the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_eplb.migration import _build_batches, _local_ops, migrate_experts, plan_migration
from lightning_eplb.placement import Placement

GB = 1e9
LOADS = Path(__file__).parent / "data" / "prefill_in1024_moe_layers.json"


def _placements(args: argparse.Namespace, world: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    num_physical = args.experts + args.redundant
    old = Placement.contiguous(args.layers, args.experts, num_physical, world).physical_to_logical
    load = torch.tensor(json.loads(LOADS.read_text())["logical_count"], dtype=torch.float64)
    load = load[: args.layers, : args.experts]
    try:
        from lightning_eplb.placement import rebalance

        new = rebalance(load, num_physical, world, previous=old).physical_to_logical
        return old, new, "rebalance(real loads)"
    except (ImportError, AttributeError, NotImplementedError):
        gen = torch.Generator().manual_seed(args.seed)
        rows = []
        for layer in range(args.layers):  # hottest experts get the redundant slots, then shuffle
            hot = load[layer].argsort(descending=True)[: args.redundant]
            ids = torch.cat([torch.arange(args.experts), hot])
            rows.append(ids[torch.randperm(num_physical, generator=gen)])
        return old, torch.stack(rows), "random placement (rebalance unavailable)"


def _make_layers(args: argparse.Namespace, old: torch.Tensor, rank: int, slots: int, device: torch.device):
    """Per layer: w1, w3, w2 (bf16) and exp_avg, exp_avg_sq of each (fp32); slot rows = expert id."""
    hidden, ffn = (64, 32) if args.small else (7168, 2048)
    layers = []
    for layer in range(args.layers):
        tensors = [torch.empty(slots, ffn, hidden, dtype=torch.bfloat16, device=device) for _ in range(3)]
        tensors += [torch.empty(slots, ffn, hidden, dtype=torch.float32, device=device) for _ in range(6)]
        for t in tensors:
            for slot in range(slots):
                t[slot].fill_(float(old[layer, rank * slots + slot]))
        layers.append(tensors)
    return layers


def _check(layers, p2l: torch.Tensor, rank: int, slots: int) -> bool:
    return all(
        bool(t[slot].eq(float(p2l[layer, rank * slots + slot])).all())
        for layer, tensors in enumerate(layers)
        for t in tensors
        for slot in range(slots)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p2p(nbytes: int, peers: list[int], device: torch.device, iters: int) -> float:
    """GB/s received per rank when exchanging ``nbytes`` with each of ``peers`` at once."""
    send = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in peers]
    recv = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in peers]
    ops = [dist.P2POp(dist.isend, s, p) for s, p in zip(send, peers, strict=True)]
    ops += [dist.P2POp(dist.irecv, r, p) for r, p in zip(recv, peers, strict=True)]
    times = []
    for i in range(iters + 2):  # two warm-ups
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return nbytes * len(peers) / statistics.median(times) / GB


def _message_bytes(old, new, world: int, row_bytes: list[list[int]], budget: int) -> tuple[int, int]:
    """Mean size of one per-peer message of the migration (over all ranks and batches), and batches."""
    plan = plan_migration(old, new, world)
    batches = _build_batches(plan, row_bytes, budget // 2)
    sizes = []
    for rank in range(world):
        ops = [_local_ops(ranks[rank]) for ranks in plan.layers]
        for batch in batches:
            per_peer: dict[int, int] = {}
            for part in batch:
                for peer, slots in ops[part.layer].recv.items():
                    per_peer[peer] = per_peer.get(peer, 0) + len(slots) * (part.stop - part.start)
            sizes += [n for n in per_peer.values() if n]
    return (int(statistics.mean(sizes)) if sizes else 0), len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny experts on CPU/gloo (script check)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16, help="logical experts per layer")
    parser.add_argument("--redundant", type=int, default=4, help="redundant slots per layer")
    parser.add_argument("--budgets", default="1,2,4", help="max_buffer_bytes as multiples of the default")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and not args.small
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    slots = (args.experts + args.redundant) // world

    old, new, source = _placements(args, world)
    layers = _make_layers(args, old, rank, slots, device)
    row_bytes = [[t[0].numel() * t.element_size() for t in tensors] for tensors in layers]
    slot_bytes = sum(row_bytes[0])
    default_budget = slots * slot_bytes
    sent, received = plan_migration(old, new, world).bytes_per_rank([sum(r) for r in row_bytes])

    big = (16 << 20) if args.small else (1 << 30)
    partner = [rank ^ 1] if world % 2 == 0 else [(rank + 1) % world]
    others = [q for q in range(world) if q != rank]
    iters = 3 if args.small else 10
    p2p_big = _p2p(big, partner, device, iters)
    rows = []
    current = old
    for mult in [float(x) for x in args.budgets.split(",")]:
        budget = int(default_budget * mult)
        msg, num_batches = _message_bytes(old, new, world, row_bytes, budget)
        p2p_msg = _p2p(msg, partner, device, iters) if msg else float("nan")
        p2p_all = _p2p(msg, others, device, iters) if msg else float("nan")
        times, peaks, stats = [], [], None
        if current is new:  # start every budget from the old placement
            migrate_experts(new, old, layers, max_buffer_bytes=budget)
            current = old
        for i in range(2 * args.repeats + 1):  # old -> new -> old -> ... -> new; the first is a warm-up
            target = new if current is old else old
            if use_cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            dist.barrier()
            stats = migrate_experts(current, target, layers, max_buffer_bytes=budget)
            if use_cuda:
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
            if i > 0 and target is new:
                times.append(stats.seconds)
            current = target
        assert stats is not None
        ok = _check(layers, current, rank, slots)
        secs = statistics.median(times)
        gbps = stats.bytes_received / secs / GB
        rows.append(
            dict(
                mult=mult,
                budget=budget,
                batches=num_batches,
                msg=msg,
                p2p_msg=p2p_msg,
                p2p_all=p2p_all,
                recv=stats.bytes_received,
                sent=stats.bytes_sent,
                secs=secs,
                gbps=gbps,
                peak=max(peaks or [0]),
                ok=ok,
            )
        )

    gathered: list = [None] * world
    dist.all_gather_object(gathered, (rank, p2p_big, rows))
    if rank == 0:
        _report(args, gathered, world, device, use_cuda, slots, slot_bytes, source, sent, received, big)
    dist.barrier()
    dist.destroy_process_group()


def _report(args, gathered, world, device, use_cuda, slots, slot_bytes, source, sent, received, big) -> None:
    name = torch.cuda.get_device_name(device) if use_cuda else "CPU (gloo)"
    print(
        f"# migration benchmark: {world} ranks, {name}, torch {torch.__version__}, backend {dist.get_backend()}"
    )
    print(
        f"# L={args.layers} E={args.experts} P={args.experts + args.redundant} S={slots}; slot = "
        f"{slot_bytes / 1e6:.1f} MB (3 bf16 matrices + 6 fp32 Adam moments); new placement: {source}"
    )
    print(
        f"# planned MB received per rank {[round(int(x) / 1e6, 1) for x in received]}, "
        f"sent {[round(int(x) / 1e6, 1) for x in sent]}"
    )
    print(
        "| budget (x default) | bound MB | batches | msg MB | rank | recv MB | sent MB | ms | GB/s | "
        f"P2P {big >> 20} MiB GB/s | % of it | P2P msg GB/s | P2P msg all-peer GB/s | peak extra MB | ok |"
    )
    print("|---" * 15 + "|")
    for r, p2p_r, rank_rows in sorted(gathered):
        for x in rank_rows:
            print(
                f"| {x['mult']:g} | {x['budget'] / 1e6:.1f} | {x['batches']} | {x['msg'] / 1e6:.1f} | {r} | "
                f"{x['recv'] / 1e6:.1f} | {x['sent'] / 1e6:.1f} | {x['secs'] * 1e3:.2f} | {x['gbps']:.1f} | "
                f"{p2p_r:.1f} | {100 * x['gbps'] / p2p_r:.0f}% | {x['p2p_msg']:.1f} | {x['p2p_all']:.1f} | "
                f"{x['peak'] / 1e6:.1f} | {x['ok']} |"
            )
    p2p_ref = statistics.mean(p for _, p, _ in gathered)
    for i in range(len(gathered[0][2])):
        per_rank = [rank_rows[i] for _, _, rank_rows in gathered]
        secs = max(x["secs"] for x in per_rank)
        mean_gbps = statistics.mean(x["gbps"] for x in per_rank)
        busiest = max(max(x["recv"], x["sent"]) for x in per_rank)
        print(
            f"# budget x{per_rank[0]['mult']:g}: mean per-rank received GB/s {mean_gbps:.1f} = "
            f"{100 * mean_gbps / p2p_ref:.0f}% of P2P {big >> 20} MiB ({p2p_ref:.1f} GB/s); busiest rank moves "
            f"{busiest / 1e6:.0f} MB one way in {secs * 1e3:.2f} ms = {busiest / secs / GB:.1f} GB/s = "
            f"{100 * busiest / secs / GB / p2p_ref:.0f}% of P2P; peak extra "
            f"{max(x['peak'] for x in per_rank) / 1e6:.0f} MB, bound {per_rank[0]['budget'] / 1e6:.0f} MB"
        )


if __name__ == "__main__":
    main()
