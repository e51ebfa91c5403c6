"""Helpers of :class:`~lightning_eplb.callback.EplbCallback`: argument and setup checks,
DDP exclusions, gradient clipping by the true norm, and the collective steps of a
rearrangement.

Shapes: ``L`` layers, ``E`` logical experts, ``P`` physical slots, ``N`` ranks, ``S = P // N``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

# The policies and the migration engine are imported here, with the callback, so that the
# first rearrangement does not pay for importing (and compiling) them (~25 ms in a profile).
from lightning_eplb import _policy_balanced, _policy_deepseek, migration, placement  # noqa: F401
from lightning_eplb._safety import MigrationError, failures
from lightning_eplb.placement import Placement


def clip_global_norm(
    optimizer: torch.optim.Optimizer,
    layers: list[tuple[str, Any]],
    max_norm: float,
    ep_group: dist.ProcessGroup | None = None,
) -> None:
    """``clip_grad_norm_(params, max_norm)`` with the norm of the model without expert
    parallelism: replicated parameters once, each logical expert once (a slot's squared
    norm divided by its expert's replica count, summed over the ``ep_group``'s ranks with
    one all-reduce).
    No host synchronisation."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    expert_grads = {id(p): layer for _, layer in layers for p in layer.expert_tensors() if p.grad is not None}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    device, dtype = grads[0].device, torch.promote_types(grads[0].dtype, torch.float32)
    dense_sq = torch.zeros((), dtype=dtype, device=device)
    expert_sq = torch.zeros((), dtype=dtype, device=device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(ep_group) if distributed else 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            layer = expert_grads.get(id(p))
            if layer is None:
                dense_sq += p.grad.detach().to(dtype).pow(2).sum().to(device)
                continue
            slots = p.shape[0]
            replicas_P = layer.logical_replica_count.index_select(0, layer.physical_to_logical)
            replicas_S = replicas_P[rank * slots : (rank + 1) * slots].to(device, dtype)
            per_slot = p.grad.detach().to(dtype).reshape(slots, -1).pow(2).sum(1).to(device)
            expert_sq += (per_slot / replicas_S).sum()
    if distributed and any(i in held for i in expert_grads):
        dist.all_reduce(expert_sq, group=ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for (g_device, g_dtype), same in by_kind.items():
        torch._foreach_mul_(same, coef.to(g_device, g_dtype))


def agree_on_nonfinite(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Under fp16 AMP, make every rank skip an optimizer step together, or none.

    Lightning's ``GradScaler`` decides from this rank's gradients, unscaled just before
    ``on_before_optimizer_step``. With expert parallelism these include expert gradients
    no other rank holds (DDP's all-reduce makes the other gradients agree): one rank could
    skip a step the others take, and ranks and replicas would drift apart. One all-reduce
    (max) over the world of the scaler's found-inf flag for this optimizer makes the
    decision common, also for the loss-scale update. No host synchronisation; nothing
    without a scaler (bf16, fp32) or on one process."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    states = getattr(scaler, "_per_optimizer_states", {})  # torch.amp.GradScaler's (private) state
    found = dict(states[id(optimizer)].get("found_inf_per_device", {})) if id(optimizer) in states else {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = next(iter(found)) if found else params[0].device
    flag = torch.zeros((), dtype=torch.float32, device=device)  # one tensor on every rank, always
    for value in found.values():
        flag = torch.maximum(flag, value.to(device).reshape(()))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    for value in found.values():
        value.copy_(flag.to(value.device).reshape(value.shape))


def broadcast_from_rank_zero(p2l_LP: Tensor, device: torch.device, failed: bool = False) -> Tensor | None:
    """Rank 0's placement on every rank (guards against nondeterminism), or None on every
    rank if rank 0 says ``failed``. One broadcast of ``L * P + 1`` int64.

    Args:
        p2l_LP: ``(L, P)`` this rank's proposal (only rank 0's is used).
        device: where the collective runs (the GPU under NCCL).
        failed: this rank could not compute a proposal.

    Returns:
        ``(L, P)`` int64 on CPU, or None.
    """
    flat = torch.cat([torch.tensor([int(failed)]), p2l_LP.detach().to("cpu", torch.int64).flatten()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        buf = flat.to(device)
        dist.broadcast(buf, src=0)
        flat = buf.cpu()
    return None if int(flat[0]) else flat[1:].view(p2l_LP.shape)


def reduce_stats(
    sent: int,
    received: int,
    seconds: float,
    move_seconds: float,
    device: torch.device,
    replica_bytes: float = 0.0,
) -> tuple[float, float, float, float, float]:
    """Bytes sent summed over ranks, the busiest rank's bytes received, the slowest rank's
    seconds in all and in the migration, and the largest ``replica_bytes`` of any rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(sent), float(received), seconds, move_seconds, float(replica_bytes)
    mine = torch.tensor(
        [sent, received, seconds, move_seconds, replica_bytes], dtype=torch.float64, device=device
    )
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    table = torch.stack(parts).cpu()
    return (
        float(table[:, 0].sum()),
        float(table[:, 1].max()),
        float(table[:, 2].max()),
        float(table[:, 3].max()),
        float(table[:, 4].max()),
    )


def replica_grad_bytes(layers: Sequence[tuple[str, Any]]) -> float:
    """Bytes this rank sends per optimizer step to sum replica gradients, over the layers
    that say it (:meth:`ExpertParallelMoE.replica_grad_bytes`; a layer that only implements
    the protocol syncs its own way and counts 0). The average over copies of expert
    parallelism inside data parallelism is not counted: it exists without replicas too."""
    return sum(float(layer.replica_grad_bytes()) for _, layer in layers if hasattr(layer, "replica_grad_bytes"))


def plot_option(value: bool) -> bool:
    """``plot`` checked at construction: matplotlib must be importable when it is on."""
    value = boolean("plot", value)
    if value:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("plot=True needs matplotlib: pip install 'lightning-eplb[viz]'")
    return value


def plot_rearrangement(
    trainer: pl.Trainer, load_LE: Tensor, old_LP: Tensor, new_LP: Tensor, num_ranks: int, step: int
) -> None:
    """Heatmaps of one rearrangement on rank 0 (TensorBoard or PNG, see :mod:`lightning_eplb.viz`)."""
    if trainer.is_global_zero:
        from lightning_eplb.viz import log_figures

        log_figures(trainer, load_LE, old_LP, new_LP, num_ranks, step)


# ---------------------------------------------------------------------------- argument checks
_POLICY_NAMES: tuple[str, ...] = tuple(getattr(placement, "POLICIES", ("balanced", "deepseek")))


def positive_int(name: str, value: int | None, default: int | None = 0, minimum: int = 1) -> Any:
    """``value`` as an int >= ``minimum``; ``None`` gives ``default`` (``0`` means required)."""
    if value is None and default != 0:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} ({value!r}) must be an int >= {minimum}")
    return int(value)


def non_negative_int(name: str, value: int | None) -> int | None:
    return None if value is None else positive_int(name, value, minimum=0)


def boolean(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be True or False")
    return value


def policy(value: str | Callable[..., Placement]) -> str | Callable[..., Placement]:
    if isinstance(value, str):
        if value not in _POLICY_NAMES:
            raise ValueError(
                f"policy ({value!r}) must be one of {_POLICY_NAMES} or a callable like rebalance"
            )
        return value
    if not callable(value):
        raise ValueError(f"policy ({value!r}) must be one of {_POLICY_NAMES} or a callable like rebalance")
    return value


def min_improvement(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"min_improvement ({value!r}) must be a finite number in [-1, 1]")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"min_improvement ({value!r}) must lie in [-1, 1] (it is a balancedness difference)")
    return float(value)


# ---------------------------------------------------------------------------- setup checks
def find_layers(pl_module: pl.LightningModule) -> list[tuple[str, Any]]:
    """``(qualified name, layer)`` of every :class:`BalanceableMoE` submodule, outermost only."""
    from lightning_eplb.protocol import is_balanceable

    layers: list[tuple[str, Any]] = []
    for name, module in pl_module.named_modules():
        if is_balanceable(module) and not any(name.startswith(f"{n}.") for n, _ in layers if n):
            layers.append((name, module))
    if not layers:
        late = pl.utilities.model_helpers.is_overridden("configure_model", pl_module)
        raise MisconfigurationException(
            f"EplbCallback found no balanceable MoE layer (lightning_eplb.BalanceableMoE) in "
            f"{type(pl_module).__name__}{' after configure_model()' if late else ''}: add an "
            "ExpertParallelMoE or remove the callback."
        )
    return layers


def defer_to_configure_model(pl_module: pl.LightningModule, then: Callable[[], None]) -> bool:
    """When the module has no balanceable layer yet but overrides ``configure_model``, make
    its ``configure_model`` call ``then()`` right after itself (once) and return True.

    Lightning calls ``configure_model`` after the callbacks' ``setup`` and before the
    strategy wraps the model (DDP), which is where the callback's setup must happen.
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from lightning_eplb.protocol import is_balanceable

    if any(is_balanceable(m) for m in pl_module.modules()) or not is_overridden("configure_model", pl_module):
        return False
    original = pl_module.configure_model

    def configure_model_then_eplb() -> None:
        del pl_module.configure_model  # back to the class's method for later calls
        original()
        then()

    pl_module.configure_model = configure_model_then_eplb  # type: ignore[method-assign]
    return True


def check_strategy(strategy: Any) -> None:
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        SingleDeviceStrategy,
        SingleDeviceXLAStrategy,
        XLAStrategy,
    )

    unsupported = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)
    if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) or isinstance(strategy, unsupported):
        raise MisconfigurationException(
            f"EplbCallback supports a single device or DDP (strategy='ddp', 'ddp_spawn', ...), got "
            f"{type(strategy).__name__}: FSDP, DeepSpeed and model-parallel strategies shard or replicate "
            "the expert tensors themselves"
        )


def check_layers(
    layers: list[tuple[str, Any]], num_ranks: int, ranks_are: str = "the world size"
) -> tuple[int, int, int]:
    """``(E, P, G)`` shared by all layers; raises on layers that cannot be balanced together
    (``ranks_are`` names ``num_ranks`` in the message)."""
    first_name, first = layers[0]
    num_logical, num_physical = int(first.num_logical_experts), int(first.num_physical_experts)
    num_groups = int(getattr(first, "num_expert_groups", 1))
    for name, layer in layers:
        sizes = (int(layer.num_logical_experts), int(layer.num_physical_experts))
        if sizes != (num_logical, num_physical):
            raise MisconfigurationException(
                f"all balanced layers must have the same (num_logical_experts, num_physical_experts): "
                f"{first_name or 'the module'} has {(num_logical, num_physical)}, {name} has {sizes}"
            )
        if int(getattr(layer, "num_expert_groups", 1)) != num_groups:
            raise MisconfigurationException(
                f"all balanced layers must have the same num_expert_groups: {first_name} has {num_groups}, "
                f"{name} has {getattr(layer, 'num_expert_groups', 1)}"
            )
    if num_physical % num_ranks:
        raise MisconfigurationException(
            f"num_physical_experts ({num_physical}) = experts ({num_logical}) + redundant experts "
            f"({num_physical - num_logical}) must be divisible by {ranks_are} ({num_ranks}); "
            "change num_redundant_experts or the number of devices"
        )
    return num_logical, num_physical, num_groups


LAYER_BUFFERS = ("physical_to_logical", "logical_to_physical", "logical_replica_count", "expert_load")


def ignore_in_ddp(pl_module: pl.LightningModule, layers: list[tuple[str, Any]]) -> None:
    """Add expert parameters and the layers' placement/load buffers to
    ``pl_module._ddp_params_and_buffers_to_ignore`` (extending a list already there).

    Expert gradients are synced by ``sync_replica_grads``; ``expert_load`` differs on every
    rank and must not be overwritten by DDP's buffer broadcast; the placement buffers are
    identical everywhere and changed only by the callback, so broadcasting them every
    forward would be wasted work.
    """
    names = list(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []) or [])
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        ids = {id(p) for p in layer.expert_tensors()}
        names += [prefix + n for n, p in layer.named_parameters() if id(p) in ids]
        named = dict(layer.named_buffers())
        names += [prefix + b for b in LAYER_BUFFERS if b in named]
    setattr(pl_module, "_ddp_params_and_buffers_to_ignore", list(dict.fromkeys(names)))  # noqa: B010


# ---------------------------------------------------------------------------- rearrangement helpers
def migrate(
    trainer: pl.Trainer,
    layers: list[tuple[str, Any]],
    old_LP: Tensor,
    new_LP: Tensor,
    max_buffer_bytes: int | None,
    num_nodes: int,
    with_optimizer_state: bool,
    device: torch.device | None = None,
    group: dist.ProcessGroup | None = None,
) -> Any:
    """One :func:`migrate_experts` call for the weights (and optimizer state) of every layer,
    within the EP ``group`` (every EP group moves its own copy; the agreements span the world).

    Two agreements (one ``all_reduce`` of ``N`` int64 each) make a failure on one rank end
    the migration on every rank: after collecting the tensors (nothing moved yet) and after
    the transfers. A rank that fails mid-transfer while its peers wait for its messages
    leaves them waiting until the process group's timeout, then they fail too.

    Raises:
        MigrationError: on every rank when any rank failed; ``half_done`` tells whether
            expert tensors may already be partly overwritten.
    """

    error: BaseException | None = None
    tensors: list[list[Tensor]] = []
    try:
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers] if with_optimizer_state else []
        for _, layer in layers:
            params = list(layer.expert_tensors())
            row = [p.detach() for p in params]
            for optimizer in optimizers:
                held = {id(p) for group in optimizer.param_groups for p in group["params"]}
                mine = [p for p in params if id(p) in held]
                if mine:
                    row += migration.optimizer_state_tensors(optimizer, mine)
            tensors.append(row)
    except Exception as exc:  # every rank must still reach the agreement
        error = exc
    failed = failures(error, device=device)
    if failed:
        raise MigrationError(
            f"EPLB migration not started: preparing it failed on {_describe(failed)}; nothing was moved",
            half_done=False,
            ranks=list(failed),
        ) from error
    stats = None
    try:
        with torch.no_grad():
            stats = migration.migrate_experts(
                old_LP, new_LP, tensors, group=group, max_buffer_bytes=max_buffer_bytes, num_nodes=num_nodes
            )
    except Exception as exc:
        error = exc
    try:
        failed = failures(error, device=device)
    except Exception as exc:  # a peer died or timed out: the agreement itself failed
        first = error or exc
        raise MigrationError(
            f"EPLB migration failed ({type(first).__name__}: {first}); expert weights and optimizer state "
            "may be half-migrated",
            half_done=True,
        ) from first
    if failed:
        raise MigrationError(
            f"EPLB migration failed on {_describe(failed)}; expert weights and optimizer state may be "
            "half-migrated",
            half_done=True,
            ranks=list(failed),
        ) from error
    for _, layer in layers:
        for p in layer.expert_tensors():
            p.grad = None  # gradients of the old placement mean nothing in the new one
    return stats


def _describe(failed: dict[int, str]) -> str:
    return "; ".join(f"rank {r} ({message})" for r, message in failed.items())


def open_trace(trainer: pl.Trainer, layers: list[tuple[str, Any]], num_ranks: int) -> Any:
    """A ``TraceWriter`` on global rank 0 (None elsewhere). Calls ``trainer.log_dir`` on every
    rank (it broadcasts)."""
    from lightning_eplb import trace

    root = trainer.log_dir or trainer.default_root_dir
    if trainer.global_rank != 0:
        return None
    if not hasattr(trace, "TraceWriter"):
        rank_zero_warn(
            "EplbCallback(trace=True): lightning_eplb.trace.TraceWriter is missing; no trace is written"
        )
        return None
    first = layers[0][1]
    return trace.TraceWriter(
        os.path.join(root, "eplb_trace.npz"),
        len(layers),
        int(first.num_logical_experts),
        int(first.num_physical_experts),
        num_ranks,
    )


def checkpoint_hook(name: str) -> Callable[..., None]:
    """``lightning_eplb.checkpoint.<name>``, or a no-op while that module lacks it."""
    from lightning_eplb import checkpoint

    hook = getattr(checkpoint, name, None)
    if hook is None:
        warnings.warn(
            f"lightning_eplb.checkpoint.{name} is missing: expert state is saved per rank", stacklevel=2
        )
        return lambda *args: None
    return hook


def log_values(pl_module: pl.LightningModule, values: dict[str, float]) -> None:
    """Log values that are identical on every rank (no sync needed)."""
    for name, value in values.items():
        pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)


def log_event(trainer: pl.Trainer, values: dict[str, float]) -> None:
    """Write one row per event straight to the loggers (rank zero only, as
    ``LearningRateMonitor`` does): values given to ``pl_module.log`` would be written again
    at every later logging step of the epoch and read as more rearrangements."""
    step = int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def convert_weights_only_saves(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Make weights-only checkpoints placement-free too.

    For ``save_checkpoint(weights_only=True)`` (and ``ModelCheckpoint(save_weights_only=True)``)
    Lightning calls no callback hook, only the LightningModule's ``on_save_checkpoint``, on
    every rank: the module's hook is wrapped (on this instance, until :func:`restore_module_save`)
    to convert the expert weights to logical layout after the user's own hook. A full
    checkpoint, already converted by the callback's hook, passes unchanged.
    """
    restore_module_save(pl_module)
    original = pl_module.on_save_checkpoint

    def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
        original(checkpoint)
        checkpoint_hook("save_expert_state")(callback, trainer, pl_module, checkpoint)

    on_save_checkpoint._eplb_wrapper = True  # type: ignore[attr-defined]
    pl_module.on_save_checkpoint = on_save_checkpoint  # type: ignore[method-assign]


def restore_module_save(pl_module: pl.LightningModule) -> None:
    """Undo :func:`convert_weights_only_saves`."""
    if getattr(pl_module.__dict__.get("on_save_checkpoint"), "_eplb_wrapper", False):
        del pl_module.on_save_checkpoint
