"""Placement policies on the real DeepSeek-V3 loads: speed, balance, movement, scaling.

Run: ``PYTHONPATH=. python benchmarks/placement.py [--loads-dir DIR] [--repeats 5] [--steps 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from lightning_eplb.placement import rebalance

DEFAULT_LOADS = Path(__file__).resolve().parents[2] / "shared" / "data" / "loads"
# name, ranks, slots, nodes, groups
CONFIGS = [
    ("EP8", 8, 288, 1, 1),
    ("EP32", 32, 288, 1, 1),
    ("EP32 4 nodes 8 groups", 32, 288, 4, 8),
    ("EP72", 72, 288, 1, 1),
    ("EP64 8 nodes 320 slots", 64, 320, 8, 8),
]


def read_loads(loads_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(loads_dir.glob("*.json")):
        load = torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)
        out[path.stem] = load[load.sum(1) > 0]
    if not out:
        raise SystemExit(f"no *.json loads in {loads_dir}")
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def lower_bound(load: torch.Tensor, p) -> float:
    heaviest = (load / p.logical_replica_count).max(1).values
    bound = torch.maximum(load.sum(1) / p.num_ranks, heaviest)
    return float((load.sum(1) / p.num_ranks).sum() / bound.sum())


def shared_ranks(p) -> int:
    copies = p.copies_per_rank()
    return int(((copies >= 2).any(2) & (copies == 0).any(2)).sum())


def drift_changes(
    load: torch.Tensor, cfg, policy: str, steps: int, use_previous: bool
) -> tuple[float, float, float]:
    """Mean share of slots changed, mean balancedness and median seconds per call on the drift."""
    _, ranks, slots, nodes, groups = cfg
    gen = torch.Generator().manual_seed(0)
    current = rebalance(load, slots, ranks, num_nodes=nodes, num_groups=groups, policy=policy)
    changed, bal, times = [], [], []
    for _ in range(steps):
        load = load * torch.exp(0.15 * torch.randn(load.shape, generator=gen, dtype=torch.float64))
        start = time.perf_counter()
        new = rebalance(
            load,
            slots,
            ranks,
            num_nodes=nodes,
            num_groups=groups,
            policy=policy,
            previous=current.physical_to_logical if use_previous else None,
        )
        times.append(time.perf_counter() - start)
        changed.append(new.num_changed_slots(current) / current.physical_to_logical.numel())
        bal.append(new.balancedness(load))
        current = new
    return statistics.mean(changed), statistics.mean(bal), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loads-dir", type=Path, default=DEFAULT_LOADS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps of the drifting sequence")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min)")
    loads = read_loads(args.loads_dir)
    print(
        f"loads: {len(loads)} files, {next(iter(loads.values())).shape[0]} layers x "
        f"{next(iter(loads.values())).shape[1]} experts\n"
    )
    print(
        "| config | policy | ms/call (median) | balancedness mean (min) | lower bound | gap to bound "
        "| shared-rank replicas | changed slots/step no prev | with prev | drift balancedness no prev "
        "| with prev | ms/call with prev |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in CONFIGS:
        name, ranks, slots, nodes, groups = cfg
        for policy in ("deepseek", "balanced"):
            times, bals, bounds, shared = [], [], [], 0
            for load in loads.values():
                t, p = timed(
                    partial(rebalance, load, slots, ranks, num_nodes=nodes, num_groups=groups, policy=policy),
                    args.repeats,
                )
                times.append(t)
                bals.append(p.balancedness(load))
                bounds.append(lower_bound(load, p))
                shared += shared_ranks(p)
            first = next(iter(loads.values()))
            ch0, b0, _ = drift_changes(first, cfg, policy, args.steps, False)
            if policy == "balanced":
                ch1, b1, t1 = drift_changes(first, cfg, policy, args.steps, True)
                prev_cols = f"{100 * ch1:.1f}% | {b0:.5f} | {b1:.5f} | {1e3 * t1:.0f}"
            else:
                prev_cols = f"(ignores previous) | {b0:.5f} | - | -"
            gap = statistics.mean(b - a for a, b in zip(bals, bounds, strict=True))
            print(
                f"| {name} | {policy} | {1e3 * statistics.median(times):.1f} | {statistics.mean(bals):.5f} "
                f"({min(bals):.5f}) | {statistics.mean(bounds):.5f} | {gap:.5f} | {shared} | "
                f"{100 * ch0:.1f}% | {prev_cols} |",
                flush=True,
            )
    print("\nscaling (balanced, random heavy-tailed loads, ms/call median)\n")
    print("| layers | experts | slots | ranks | balanced ms | deepseek ms |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for layers, experts, slots, ranks in [
        (1, 256, 288, 32),
        (16, 256, 288, 32),
        (58, 256, 288, 32),
        (58, 128, 144, 16),
        (58, 256, 512, 64),
        (58, 256, 512, 128),
        (58, 256, 512, 256),
    ]:
        load = torch.rand(layers, experts, generator=gen, dtype=torch.float64) ** 4 * 1e6
        tb, _ = timed(partial(rebalance, load, slots, ranks), args.repeats)
        td, _ = timed(partial(rebalance, load, slots, ranks, policy="deepseek"), args.repeats)
        print(f"| {layers} | {experts} | {slots} | {ranks} | {1e3 * tb:.1f} | {1e3 * td:.1f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
