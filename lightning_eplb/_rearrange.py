"""One rearrangement of :class:`~lightning_eplb.EplbCallback`: policy on rank 0, broadcast,
migration of weights and optimizer state, new placement buffers, record and logs.

Collective: every rank of the EP group runs it at the same step with the same window.
Shapes: ``L`` layers, ``E`` logical experts, ``P`` physical slots.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_eplb import _callback_utils as utils
from lightning_eplb import _safety
from lightning_eplb.load import WindowLoad, token_statistics
from lightning_eplb.placement import Placement


def rearrange(cb: Any, trainer: pl.Trainer, load: WindowLoad, step: int) -> None:
    """Rearrange ``cb.layers`` from the reduced window ``load`` at optimizer step ``step``;
    appends the record to ``cb.rearrangements`` and updates ``cb``'s counters."""
    start = time.perf_counter()
    num_logical = int(cb.layers[0][1].num_logical_experts)
    load_LE = load.logical_LE.to("cpu", torch.float64)
    old_LP = torch.stack(
        [layer.physical_to_logical.detach().to("cpu", torch.int64) for _, layer in cb.layers]
    )
    old = Placement.from_physical_to_logical(old_LP, num_logical, cb._num_ranks)
    empty = not bool(load_LE.sum() > 0)  # identical on every rank (all-reduced counts)
    if empty and not cb._warned_empty:
        cb._warned_empty = True
        rank_zero_warn(
            f"EPLB step {step}: no tokens were routed in the last {int(load.num_steps)} steps; "
            "keeping the placement (warned once)"
        )
    new_LP = propose_placement(
        None if empty else load_LE,
        old_LP,
        old.num_physical,
        cb._num_ranks,
        cb._num_nodes,
        cb._num_groups,
        cb.policy,
        load.slot_LP.device,
        step,
    )
    new = Placement.from_physical_to_logical(new_LP, num_logical, cb._num_ranks)
    before, after = old.balancedness(load_LE), new.balancedness(load_LE)
    measured = float(token_statistics(load.slot_LP, cb._num_ranks, load.num_steps).balancedness)
    changed = new.num_changed_slots(old)
    skipped = changed == 0 or after - before < cb.min_improvement or empty
    sent = received = 0
    move_seconds = 0.0
    if not skipped:
        try:
            stats = utils.migrate(
                trainer,
                cb.layers,
                old_LP,
                new_LP,
                cb.max_buffer_bytes,
                cb._num_nodes,
                cb.migrate_optimizer_state,
                device=load.slot_LP.device,
                group=cb._layout.ep_group,
            )
        except _safety.MigrationError as exc:
            if exc.half_done:
                cb._broken = f"step {step}: {exc}"
            raise
        sent, received, move_seconds = stats.bytes_sent, stats.bytes_received, stats.seconds
        for row, (_, layer) in enumerate(cb.layers):
            layer.set_placement(
                new.physical_to_logical[row], new.logical_to_physical[row], new.logical_replica_count[row]
            )
        cb.num_rearrangements += 1
        cb.last_rearrangement_step = step
    total_sent, max_received, seconds, move_seconds, replica_bytes = utils.reduce_stats(
        sent,
        received,
        time.perf_counter() - start,
        move_seconds,
        load.slot_LP.device,
        utils.replica_grad_bytes(cb.layers),
    )
    record = {
        "step": float(step),
        "balancedness_before": before,
        "balancedness_after": after,
        "balancedness_measured": measured,
        "slots_changed": float(0 if skipped else changed),
        "bytes_sent": total_sent,
        "bytes_received_max": max_received,
        "seconds": seconds,
        "migration_seconds": move_seconds,
        "replica_grad_bytes_max": replica_bytes,
        "skipped": float(skipped),
    }
    cb.rearrangements.append(record)
    report_rearrangement(
        trainer,
        record,
        load_LE,
        old_LP,
        old_LP if skipped else new_LP,
        cb._num_ranks,
        cb._trace_writer,
        cb.plot,
    )


def report_rearrangement(
    trainer: pl.Trainer,
    record: dict[str, float],
    load_LE: Tensor,
    old_LP: Tensor,
    new_LP: Tensor,
    num_ranks: int,
    trace_writer: Any,
    plot: bool,
) -> None:
    """Log a rearrangement's record, add it to the trace, draw it, and say it on rank 0.

    Args:
        record: the values of ``EplbCallback.rearrangements`` for this step.
        load_LE: ``(L, E)`` the window's load.
        old_LP, new_LP: ``(L, P)`` placements before and after (equal when skipped).
    """
    step = int(record["step"])
    utils.log_event(trainer, {f"eplb/rearrangement/{k}": v for k, v in record.items() if k != "step"})
    before, after = record["balancedness_before"], record["balancedness_after"]
    if trace_writer is not None:
        trace_writer.add_window(step, load_LE)
        trace_writer.add_rearrangement(
            step, old_LP, new_LP, before, after, int(record["bytes_sent"]), record["seconds"]
        )
    if plot:
        utils.plot_rearrangement(trainer, load_LE, old_LP, new_LP, num_ranks, step)
    changed = int(record["slots_changed"])
    verb = (
        "kept the placement (gain below min_improvement)" if record["skipped"] else f"moved {changed} slots"
    )
    rank_zero_info(
        f"EPLB step {step}: predicted balancedness {before:.3f} -> {after:.3f} "
        f"(measured {record['balancedness_measured']:.3f}); "
        f"{verb}, {record['bytes_sent'] / 1e6:.1f} MB sent in {record['seconds']:.2f} s; "
        f"replica gradients {record['replica_grad_bytes_max'] / 1e6:.1f} MB per step (busiest rank)"
    )


def propose_placement(
    load_LE: Tensor | None,
    old_LP: Tensor,
    num_physical: int,
    num_ranks: int,
    num_nodes: int,
    num_groups: int,
    policy: Any,
    device: torch.device,
    step: int,
) -> Tensor:
    """Run the policy from ``old_LP`` on rank 0's view and broadcast its ``(L, P)`` result.

    Every rank reaches the broadcast even when the policy raises; a failure on rank 0
    stops every rank (rank 0 with its own error).

    Args:
        load_LE: ``(L, E)`` float64 window load, or None to keep ``old_LP`` (no tokens).
        old_LP: ``(L, P)`` current placement.
    """
    from lightning_eplb.placement import rebalance

    error: Exception | None = None
    try:
        proposal_LP = (
            old_LP
            if load_LE is None
            else rebalance(
                load_LE,
                num_physical,
                num_ranks,
                num_nodes=num_nodes,
                num_groups=num_groups,
                previous=old_LP,
                policy=policy,
            ).physical_to_logical
        )
    except Exception as exc:  # every rank must still reach the broadcast
        error, proposal_LP = exc, old_LP
    new_LP = utils.broadcast_from_rank_zero(proposal_LP, device, failed=error is not None)
    if new_LP is None:  # the policy failed on rank 0: stop every rank with its message
        if error is not None:
            raise error
        raise RuntimeError(f"EPLB step {step}: the placement policy failed on rank 0 (see its traceback)")
    return new_LP
