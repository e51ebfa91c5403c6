"""Offline what-if replay: how balanced would a run be with this many ranks, replicas, interval?

``lightning-eplb simulate TRACE [TRACE ...] --ranks N ...`` replays recorded loads (a trace
written by the callback, or SGLang expert-distribution JSON files) through the placement
policy: every ``step_interval`` steps it rebalances on the last ``window`` steps (given the
placement in force, as the callback does), and measures the balancedness of the placement in
force on each step's actual load, next to the static contiguous placement (no EPLB).

Shapes: ``T`` replayed steps, ``L`` layers, ``E`` logical experts, ``P`` physical slots.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_eplb._sync_cost import sync_rows
from lightning_eplb.placement import Placement
from lightning_eplb.trace import read_sglang, read_trace

__all__ = ["Rearrangement", "SimulationResult", "drifting_loads", "main", "replica_sync_rows", "simulate"]


@dataclass(frozen=True)
class Rearrangement:
    """One simulated rearrangement.

    Args:
        step: replay step from which the new placement is in force (it was computed on
            steps ``[step - window, step)``).
        balancedness_before: old placement on the window's load.
        balancedness_after: new placement on the window's load.
        slots_changed: slots whose logical expert changed (summed over layers).
        slots_received: changed slots whose new expert was not already on the same rank,
            i.e. weights that must cross the network.
        bytes_moved: ``expert_bytes * slots_received``.
        seconds: time the policy took.
        replica_grad_bytes: what the new placement costs every optimizer step: the most
            bytes a rank sends to sum the gradients of replicated experts
            (``grad_bytes * replica_sync_rows(new)``).
    """

    step: int
    balancedness_before: float
    balancedness_after: float
    slots_changed: int
    slots_received: int
    bytes_moved: int
    seconds: float
    replica_grad_bytes: float = 0.0


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` measured.

    Args:
        balancedness: ``(T,)`` float64, placement in force on each step's own load.
        static_balancedness: ``(T,)`` float64, contiguous placement (no EPLB) on the same load.
        rearrangements: in step order.
        placement: the placement in force at the end.
        num_ranks, num_physical, policy, step_interval, window: the replay's settings.
        grad_bytes: bytes of one expert's gradient (0: replicas not priced).

    Example:
        >>> load_TLE = torch.tensor([[[8.0, 1.0, 1.0, 2.0]]]).expand(4, 1, 4)
        >>> r = simulate(load_TLE, num_ranks=2, num_redundant=2, step_interval=2)
        >>> r.static_balancedness.tolist()
        [0.9230769230769231, 0.9230769230769231, 0.9230769230769231, 0.9230769230769231]
        >>> [x.step for x in r.rearrangements], r.balancedness[2:].tolist()
        ([2], [1.0, 1.0])
    """

    balancedness: Tensor
    static_balancedness: Tensor
    rearrangements: tuple[Rearrangement, ...]
    placement: Placement
    num_ranks: int
    num_physical: int
    policy: str
    step_interval: int
    window: int
    grad_bytes: int = 0

    @property
    def num_steps(self) -> int:
        return int(self.balancedness.shape[0])

    @property
    def mean_balancedness(self) -> float:
        return float(self.balancedness.mean())

    @property
    def mean_static_balancedness(self) -> float:
        return float(self.static_balancedness.mean())

    @property
    def total_bytes_moved(self) -> int:
        return sum(r.bytes_moved for r in self.rearrangements)

    def table(self, max_rows: int = 30) -> str:
        """A text table: one row per interval between rearrangements (at most ``max_rows``)."""
        return format_table(self, max_rows=max_rows)


def simulate(
    loads_TLE: Tensor,
    *,
    num_ranks: int,
    num_redundant: int = 0,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str | Callable[..., Placement] = "balanced",
    step_interval: int = 100,
    window: int | None = None,
    expert_bytes: int = 0,
    grad_bytes: int = 0,
    progress: bool = False,
) -> SimulationResult:
    """Replay loads through the placement policy.

    The replay starts from the contiguous placement (slot ``p`` holds expert ``p % E``). After
    step ``t`` (0-based) with ``(t + 1) % step_interval == 0`` and ``t + 1 < T`` it calls
    ``rebalance(loads[t + 1 - window : t + 1].sum(0), previous=current)``; the result is in
    force from step ``t + 1`` on.

    Args:
        loads_TLE: ``(T, L, E)`` non-negative tokens per step, layer and logical expert.
        num_ranks: ``N`` expert-parallel ranks; ``E + num_redundant`` must be divisible by it.
        num_redundant: ``R`` redundant slots per layer.
        num_nodes: nodes, for hierarchical placement.
        num_groups: expert groups, for hierarchical placement.
        policy: ``"balanced"``, ``"deepseek"`` or a callable like :func:`rebalance`.
        step_interval: steps between rearrangements.
        window: steps of load each rearrangement looks at (default: ``step_interval``).
        expert_bytes: bytes of one expert (weights plus optimizer state) moved per received slot.
        grad_bytes: bytes of one expert's gradient (its parameters times the gradient's
            element size), to price replicas: each rearrangement then reports what its
            placement's replica-gradient sync sends per optimizer step.
        progress: show a progress bar on stderr when it is a terminal.

    Raises:
        ValueError: on a bad shape, negative or non-finite load, or bad sizes.
    """
    from lightning_eplb.placement import rebalance

    loads_TLE = torch.as_tensor(loads_TLE).detach().to("cpu", torch.float64)
    if loads_TLE.dim() != 3 or min(loads_TLE.shape) == 0:
        raise ValueError(f"loads_TLE must have non-empty shape (T, L, E), got {tuple(loads_TLE.shape)}")
    if not torch.isfinite(loads_TLE).all() or (loads_TLE < 0).any():
        raise ValueError("loads_TLE must be finite and non-negative")
    T, L, E = loads_TLE.shape
    window = step_interval if window is None else window
    for name, value in (("step_interval", step_interval), ("window", window), ("num_nodes", num_nodes)):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")
    for name, value in (("num_redundant", num_redundant), ("expert_bytes", expert_bytes), ("grad_bytes", grad_bytes)):
        if value < 0:
            raise ValueError(f"{name} ({value}) must be >= 0")
    P = E + num_redundant
    if num_ranks < 1 or P % num_ranks:
        raise ValueError(
            f"physical slots E + redundant ({E} + {num_redundant} = {P}) must be divisible by num_ranks ({num_ranks})"
        )
    policy_fn = functools.partial(rebalance, policy=policy)
    static = Placement.contiguous(L, E, P, num_ranks)
    current = static
    balancedness = torch.empty(T, dtype=torch.float64)
    events: list[Rearrangement] = []
    bar = _progress(T, enabled=progress)
    start = 0
    try:
        while start < T:
            stop = min(T, (start // step_interval + 1) * step_interval)
            balancedness[start:stop] = balancedness_per_step(current, loads_TLE[start:stop])
            bar.update(stop - start)
            if stop < T:
                window_LE = loads_TLE[max(0, stop - window) : stop].sum(0)
                tic = time.perf_counter()
                new = policy_fn(
                    window_LE,
                    P,
                    num_ranks,
                    num_nodes=num_nodes,
                    num_groups=num_groups,
                    previous=current.physical_to_logical,
                )
                seconds = time.perf_counter() - tic
                received = slots_received(current, new)
                events.append(
                    Rearrangement(
                        step=stop,
                        balancedness_before=current.balancedness(window_LE),
                        balancedness_after=new.balancedness(window_LE),
                        slots_changed=new.num_changed_slots(current),
                        slots_received=received,
                        bytes_moved=received * int(expert_bytes),
                        seconds=seconds,
                        replica_grad_bytes=replica_sync_rows(new) * grad_bytes if grad_bytes else 0.0,
                    )
                )
                current = new
            start = stop
    finally:
        bar.close()
    return SimulationResult(
        balancedness=balancedness,
        static_balancedness=balancedness_per_step(static, loads_TLE),
        rearrangements=tuple(events),
        placement=current,
        num_ranks=num_ranks,
        num_physical=P,
        policy=policy if isinstance(policy, str) else getattr(policy, "__name__", "custom"),
        step_interval=step_interval,
        window=window,
        grad_bytes=int(grad_bytes),
    )


def replica_sync_rows(placement: Placement) -> float:
    """Expert-sized gradient rows the busiest rank sends per optimizer step to sum the
    gradients of replicated experts under ``placement`` (all layers), as the sync of
    :class:`~lightning_eplb.ExpertParallelMoE` plans it.

    Example:
        >>> replica_sync_rows(Placement.contiguous(2, 4, 6, 2))  # experts 0, 1 on both ranks
        4.0
    """
    per_rank = [0.0] * placement.num_ranks
    rows_LP = placement.physical_to_logical.tolist()
    for p2l, counts in zip(rows_LP, placement.logical_replica_count.tolist(), strict=True):
        for r, rows in enumerate(sync_rows(p2l, counts, placement.slots_per_rank)):
            per_rank[r] += rows
    return max(per_rank)


def balancedness_per_step(placement: Placement, loads_TLE: Tensor) -> Tensor:
    """:meth:`Placement.balancedness` of one placement on many loads at once.

    Args:
        placement: ``L`` layers, ``P`` slots, ``N`` ranks.
        loads_TLE: ``(T, L, E)`` tokens.

    Returns:
        ``(T,)`` float64; 1.0 where a step has no load.
    """
    T = loads_TLE.shape[0]
    per_replica_TLE = loads_TLE.to(torch.float64) / placement.logical_replica_count.to(torch.float64)
    index_TLP = placement.physical_to_logical.expand(T, -1, -1)
    slot_TLP = torch.gather(per_replica_TLE, 2, index_TLP)
    rank_TLN = slot_TLP.view(T, placement.num_layers, placement.num_ranks, placement.slots_per_rank).sum(-1)
    peak_T = rank_TLN.max(dim=2).values.sum(1)
    mean_T = rank_TLN.mean(dim=2).sum(1)
    safe_T = torch.where(peak_T > 0, peak_T, torch.ones_like(peak_T))
    return torch.where(peak_T > 0, mean_T / safe_T, torch.ones_like(peak_T))


def slots_received(old: Placement, new: Placement) -> int:
    """Slots of ``new`` whose expert no slot of the same rank held in ``old`` (summed over layers)."""
    copies_LEN = old.copies_per_rank()
    rank_P = torch.arange(new.num_physical) // new.slots_per_rank
    flat_LP = new.physical_to_logical * new.num_ranks + rank_P  # index into the (E, N) plane
    had_LP = copies_LEN.reshape(new.num_layers, -1).gather(1, flat_LP)
    return int((had_LP == 0).sum())


def drifting_loads(snapshots: Sequence[Tensor], num_steps: int, sigma: float, seed: int = 0) -> Tensor:
    """A drifting sequence of loads built from static snapshots.

    The base load moves linearly from one snapshot to the next over the ``num_steps`` steps
    (a single snapshot stays constant); each step multiplies the previous step's noise factor
    by ``exp(sigma * N(0, 1))`` elementwise (a geometric random walk, seeded), so step 0 is
    the first snapshot exactly.

    Args:
        snapshots: ``(L, E)`` loads, all of one shape.
        num_steps: ``T`` >= 1.
        sigma: drift per step (0: no noise).
        seed: seed of the noise.

    Returns:
        ``(T, L, E)`` float64.
    """
    if not snapshots:
        raise ValueError("drifting_loads needs at least one snapshot")
    shapes = {tuple(s.shape) for s in snapshots}
    if len(shapes) != 1:
        raise ValueError(
            f"all load files must have one shape (L, E) to be interpolated, got {sorted(shapes)}"
        )
    if num_steps < 1 or sigma < 0:
        raise ValueError(f"num_steps ({num_steps}) must be >= 1 and sigma ({sigma}) >= 0")
    snap_SLE = torch.stack([s.to(torch.float64) for s in snapshots])
    if len(snapshots) == 1 or num_steps == 1:
        base_TLE = snap_SLE[:1].expand(num_steps, -1, -1).clone()
    else:
        pos_T = torch.linspace(0, len(snapshots) - 1, num_steps, dtype=torch.float64)
        lo_T = pos_T.floor().long().clamp(max=len(snapshots) - 2)
        frac_T11 = (pos_T - lo_T).view(-1, 1, 1)
        base_TLE = (1 - frac_T11) * snap_SLE[lo_T] + frac_T11 * snap_SLE[lo_T + 1]
    if sigma > 0:
        gen = torch.Generator().manual_seed(seed)
        steps_TLE = torch.randn(base_TLE.shape, generator=gen, dtype=torch.float64) * sigma
        steps_TLE[0] = 0.0
        base_TLE *= torch.cumsum(steps_TLE, dim=0).exp_()
    return base_TLE


# ---------------------------------------------------------------------- reporting
def format_bytes(n: float) -> str:
    """``1.5 GB`` style (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_table(result: SimulationResult, max_rows: int = 30) -> str:
    """One row per interval: mean balancedness with EPLB and without, then the rearrangement
    that ends it (window balancedness before -> after, slots changed and received, bytes;
    with ``grad_bytes``, also the replica-gradient bytes its placement sends per step)."""
    edges = [0, *(r.step for r in result.rearrangements), result.num_steps]
    priced = result.grad_bytes > 0
    head = (
        f"{'steps':>13}  {'EPLB':>6}  {'static':>6}  | {'at step':>7}  {'window before->after':>20}  "
        f"{'changed':>8}  {'received':>8}  {'moved':>9}"
    ) + (f"  {'grads/step':>10}" if priced else "")
    lines = [head, "-" * len(head)]
    rows = list(range(len(edges) - 1))
    if len(rows) > max_rows > 1:
        keep = {round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)}
        rows = sorted(keep)
    previous = -1
    for i in rows:
        if i > previous + 1:
            lines.append(f"{'...':>13}")
        previous = i
        a, b = edges[i], edges[i + 1]
        row = f"{f'{a}-{b - 1}':>13}  {float(result.balancedness[a:b].mean()):6.3f}  "
        row += f"{float(result.static_balancedness[a:b].mean()):6.3f}  | "
        if i < len(result.rearrangements):
            r = result.rearrangements[i]
            moved = format_bytes(r.bytes_moved) if r.bytes_moved else "-"
            row += (
                f"{r.step:>7}  {f'{r.balancedness_before:.3f} -> {r.balancedness_after:.3f}':>20}  "
                f"{r.slots_changed:>8}  {r.slots_received:>8}  {moved:>9}"
            )
            if priced:
                grads = format_bytes(r.replica_grad_bytes) if r.replica_grad_bytes else "-"
                row += f"  {grads:>10}"
        else:
            row += f"{'-':>7}"
        lines.append(row)
    lines.append("-" * len(head))
    events = result.rearrangements
    total = format_bytes(result.total_bytes_moved) if result.total_bytes_moved else "-"
    lines.append(
        f"{'mean':>13}  {result.mean_balancedness:6.3f}  {result.mean_static_balancedness:6.3f}  | "
        f"{len(events):>4} rearrangements, {sum(r.slots_changed for r in events)} slots changed, "
        f"{sum(r.slots_received for r in events)} received, {total} moved, "
        f"policy {sum(r.seconds for r in events):.1f} s"
    )
    return "\n".join(lines)


class _TextProgress:
    """Minimal progress line on stderr for when tqdm is missing."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self._last = total, 0, 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 0.5 or self.done >= self.total:
            self._last = now
            sys.stderr.write(
                f"\rsimulate: {100 * self.done // max(self.total, 1):3d}% ({self.done}/{self.total} steps)"
            )
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextProgress(total)
    return tqdm(total=total, desc="simulate", unit="step", file=sys.stderr, leave=False)


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-eplb simulate",
        description="Replay expert loads through EPLB placements and report the balance it buys "
        "(balancedness = mean rank load / max rank load, summed over layers; 1.0 is perfect).",
    )
    p.add_argument(
        "traces", nargs="+", metavar="TRACE", help="callback trace (.npz) or SGLang load file (.json)"
    )
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks N")
    p.add_argument("--nodes", type=int, default=1, help="nodes, for hierarchical placement (default 1)")
    p.add_argument("--redundant", type=int, default=0, help="redundant expert slots per layer (default 0)")
    p.add_argument(
        "--groups", type=int, default=1, help="expert groups, for hierarchical placement (default 1)"
    )
    p.add_argument("--policy", choices=("balanced", "deepseek"), default="balanced")
    p.add_argument(
        "--step-interval", type=int, default=100, help="steps between rearrangements (default 100)"
    )
    p.add_argument(
        "--window", type=int, default=None, help="steps of load per rearrangement (default: interval)"
    )
    p.add_argument("--drift", type=float, default=0.0, help="per-step log-normal drift sigma (default 0)")
    p.add_argument("--steps", type=int, default=None, help="steps to replay (JSON default 1000; trace: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drift (default 0)")
    p.add_argument("--expert-bytes", type=int, default=0, help="bytes per expert moved (weights + optimizer)")
    p.add_argument(
        "--grad-bytes",
        type=int,
        default=0,
        help="bytes of one expert's gradient: adds the replica-gradient bytes the busiest rank sends "
        "per optimizer step under each new placement",
    )
    p.add_argument("--plot", type=Path, default=None, help="save a PNG of balancedness over time here")
    p.add_argument("--max-rows", type=int, default=30, help="rows of the table (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_sequence(paths: Sequence[str | Path], *, steps: int | None, drift: float, seed: int) -> Tensor:
    """The ``(T, L, E)`` loads a command line asks for: traces concatenated, or JSON snapshots
    interpolated over ``steps`` (default 1000); ``drift`` noise on top in both cases."""
    files = [Path(p) for p in paths]
    kinds = {p.suffix for p in files}
    if not kinds <= {".json", ".npz"}:
        raise ValueError(
            f"unknown load file types {sorted(kinds - {'.json', '.npz'})}; expected .npz traces or SGLang .json"
        )
    if len(kinds) > 1:
        raise ValueError("give either .npz traces or SGLang .json files, not both")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps ({steps}) must be >= 1")
    if kinds == {".json"}:
        return drifting_loads([read_sglang(p) for p in files], steps or 1000, drift, seed)
    loads = [read_trace(p).loads for p in files]
    if len({tuple(x.shape[1:]) for x in loads}) != 1:
        raise ValueError(f"traces have different (L, E) shapes: {[tuple(x.shape[1:]) for x in loads]}")
    seq_TLE = torch.cat(loads)[:steps]
    if seq_TLE.shape[0] == 0:
        raise ValueError("the traces hold no load windows")
    if drift > 0:
        seq_TLE = seq_TLE * drifting_loads([torch.ones(seq_TLE.shape[1:])], seq_TLE.shape[0], drift, seed)
    return seq_TLE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-eplb simulate``; returns the exit code (2 for user errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        if args.drift < 0:
            raise ValueError(f"--drift ({args.drift}) must be >= 0")
        loads_TLE = load_sequence(args.traces, steps=args.steps, drift=args.drift, seed=args.seed)
        T, L, E = loads_TLE.shape
        result = simulate(
            loads_TLE,
            num_ranks=args.ranks,
            num_redundant=args.redundant,
            num_nodes=args.nodes,
            num_groups=args.groups,
            policy=args.policy,
            step_interval=args.step_interval,
            window=args.window,
            expert_bytes=args.expert_bytes,
            grad_bytes=args.grad_bytes,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {err}\n")
        return 2
    print(
        f"replayed {T} steps of {L} layers x {E} experts on {args.ranks} ranks "
        f"({E + args.redundant} slots, {args.redundant} redundant), policy {args.policy}, "
        f"interval {result.step_interval}, window {result.window}, drift {args.drift}"
    )
    print(result.table(max_rows=args.max_rows))
    if args.plot is not None:
        try:
            from lightning_eplb.viz import save_simulation_plot

            path = save_simulation_plot(result, args.plot)
        except (ImportError, OSError) as err:
            sys.stderr.write(f"{parser.prog}: error: {err}\n")
            return 1
        print(f"plot saved to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
