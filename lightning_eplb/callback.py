"""``EplbCallback``: expert-parallel load balancing inside ``Trainer.fit``.

Shapes (suffixes used in names below):
    L: balanced MoE layers     E: logical experts per layer     P: physical slots per layer
    N: expert-parallel ranks (the whole world), S = P // N slots per rank

Per optimizer step the callback syncs replica gradients (before clipping) and moves the
layers' counters into an :class:`~lightning_eplb.load.ExpertLoadWindow`. Every
``step_interval`` steps it reduces the window, runs the placement policy from the current
placement, and, when the predicted gain is worth it, migrates expert weights and their
optimizer state with one :func:`~lightning_eplb.migrate_experts` call. Every decision is
taken from data that is identical on every rank (global step, all-reduced counts, and a
placement broadcast from rank 0), so ranks never disagree about when to communicate.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_eplb.load import ExpertLoadWindow, WindowLoad, token_statistics
from lightning_eplb.placement import Placement

__all__ = ["EplbCallback"]

_STATE_VERSION = 1


class EplbCallback(Callback):
    """Balance the experts of every :class:`~lightning_eplb.BalanceableMoE` layer during training.

    Supported strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ...); the expert-
    parallel group is the whole world. The callback excludes expert parameters and the
    placement/load buffers from DDP (``_ddp_params_and_buffers_to_ignore``): expert
    gradients are synced across replicas by the layers instead, and the placement buffers
    are kept identical by the callback itself, so DDP's buffer broadcast is not needed.

    Logged through the LightningModule (every ``log_every_n_steps`` steps, from the last
    ``window_size`` steps, all-reduced): ``eplb/balancedness`` (mean over max rank load,
    summed over layers; 1.0 is perfect), ``eplb/max_tokens`` and ``eplb/avg_tokens``
    (per step, summed over layers). Per rearrangement: ``eplb/rearrangement/*`` with the
    predicted balancedness before and after, the measured one of the window it was computed
    from, slots changed, bytes moved (sum over ranks), the busiest rank's bytes received,
    seconds (slowest rank) and ``skipped`` (1 when the gain was below ``min_improvement``).

    Manual optimization: replica gradients are synced when an optimizer holding expert
    parameters is stepped through ``self.optimizers()`` (not the raw optimizer); gradient
    clipping done by hand before ``opt.step()`` sees unsynced gradients.

    Args:
        step_interval: optimizer steps between rearrangements (>= 1).
        window_size: optimizer steps of load the policy sees (>= 1); default ``step_interval``.
        policy: ``"balanced"`` or ``"deepseek"`` (see :func:`~lightning_eplb.rebalance`), or a
            callable with ``rebalance``'s signature returning a ``Placement``.
        num_nodes: nodes the ranks span, for hierarchical placement; default
            ``trainer.num_nodes``.
        first_rearrangement_step: global step of the first rearrangement (a warm-up);
            default ``step_interval``. Later ones follow every ``step_interval`` steps.
        min_improvement: skip a rearrangement whose predicted balancedness gain is smaller
            (finite, in ``[-1, 1]``; negative values accept slightly worse placements).
        log_every_n_steps: log ``eplb/*`` statistics every n optimizer steps (0: never);
            default ``trainer.log_every_n_steps``. Each log costs one small all-reduce.
        max_buffer_bytes: staging memory bound of a migration per rank; default one layer's
            local experts (see :func:`~lightning_eplb.migrate_experts`).
        migrate_optimizer_state: move optimizer state with the weights (keep ``True``
            unless the optimizer has no per-parameter state).
        trace: rank 0 writes ``eplb_trace.npz`` (loads and rearrangements, see
            :mod:`lightning_eplb.trace`) into ``trainer.log_dir`` (or ``default_root_dir``).
        trace_every_n_steps: also record the window every n steps (needs ``trace=True``).
        rearrange: ``False`` records and logs the load but never moves an expert (a baseline
            with the same logging).

    Raises:
        ValueError: on a bad argument, naming the value and the rule.

    Example:
        >>> cb = EplbCallback(step_interval=100, window_size=50, min_improvement=0.02)
        >>> cb.step_interval, cb.window_size, cb.first_rearrangement_step
        (100, 50, 100)
        >>> [cb.is_rearrangement_step(s) for s in (50, 100, 150, 200)]
        [False, True, False, True]
    """

    def __init__(
        self,
        step_interval: int = 200,
        window_size: int | None = None,
        policy: str | Callable[..., Placement] = "balanced",
        num_nodes: int | None = None,
        first_rearrangement_step: int | None = None,
        min_improvement: float = 0.01,
        log_every_n_steps: int | None = None,
        max_buffer_bytes: int | None = None,
        migrate_optimizer_state: bool = True,
        trace: bool = False,
        trace_every_n_steps: int | None = None,
        rearrange: bool = True,
    ) -> None:
        super().__init__()
        self.step_interval = _positive_int("step_interval", step_interval)
        self.window_size = _positive_int("window_size", window_size, default=self.step_interval)
        self.policy = _policy(policy)
        self.num_nodes = _positive_int("num_nodes", num_nodes, default=None)
        self.first_rearrangement_step = _positive_int(
            "first_rearrangement_step", first_rearrangement_step, default=self.step_interval
        )
        self.min_improvement = _min_improvement(min_improvement)
        self.log_every_n_steps = _non_negative_int("log_every_n_steps", log_every_n_steps)
        self.max_buffer_bytes = _positive_int("max_buffer_bytes", max_buffer_bytes, default=None, minimum=2)
        self.migrate_optimizer_state = _boolean("migrate_optimizer_state", migrate_optimizer_state)
        self.trace = _boolean("trace", trace)
        self.trace_every_n_steps = _positive_int("trace_every_n_steps", trace_every_n_steps, default=None)
        if self.trace_every_n_steps is not None and not self.trace:
            raise ValueError(f"trace_every_n_steps ({trace_every_n_steps}) needs trace=True")
        self.rearrange = _boolean("rearrange", rearrange)

        self.layers: list[tuple[str, Any]] = []
        """``(qualified name, layer)`` of every balanced layer, found in :meth:`setup`."""
        self.rearrangements: list[dict[str, float]] = []
        """What each rearrangement of this session did (the values logged under ``eplb/rearrangement/``)."""
        self.last_stats: dict[str, float] = {}
        """The ``eplb/*`` statistics logged last."""
        self.last_rearrangement_step = -1
        self.num_rearrangements = 0
        self._window: ExpertLoadWindow | None = None
        self._pending_state: dict[str, Any] | None = None
        self._num_ranks, self._num_nodes, self._num_groups, self._log_every = 1, 1, 1, 0
        self._last_step = 0
        self._expert_param_ids: set[int] = set()
        self._trace_writer: Any = None
        self._clip_norm: float | None = None

    # ------------------------------------------------------------------ schedule
    def is_rearrangement_step(self, step: int) -> bool:
        """Whether the optimizer step numbered ``step`` (``trainer.global_step`` after it) rearranges."""
        return self._crossed(step - 1, step, self.first_rearrangement_step, self.step_interval)

    @staticmethod
    def _crossed(previous: int, current: int, first: int, every: int) -> bool:
        """Whether a step ``first + k * every`` (k >= 0) lies in ``(previous, current]``."""
        if every < 1 or current < first:
            return False
        last_due = first + (current - first) // every * every
        return last_due > previous

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find and check the balanced layers, split their experts over the ranks, exclude
        expert tensors from DDP and build the load window.

        Every check uses only what is identical on every rank and runs before the first
        collective, so a misconfiguration raises on all ranks together.
        """
        self.layers = _find_layers(pl_module)
        num_ranks = int(trainer.world_size)
        _check_strategy(trainer.strategy)
        num_logical, num_physical, num_groups = _check_layers(self.layers, num_ranks)
        num_nodes = self.num_nodes if self.num_nodes is not None else int(trainer.num_nodes)
        if num_ranks % num_nodes:
            raise ValueError(f"the world size ({num_ranks}) must be divisible by num_nodes ({num_nodes})")
        self._num_ranks, self._num_nodes, self._num_groups = num_ranks, num_nodes, num_groups
        log_every = self.log_every_n_steps
        self._log_every = int(trainer.log_every_n_steps) if log_every is None else log_every
        self._verify_ranks_agree(trainer)
        for _, layer in self.layers:
            layer.setup_expert_parallel()
        _ignore_in_ddp(pl_module, self.layers)
        self._expert_param_ids = {id(p) for _, layer in self.layers for p in layer.expert_tensors()}
        shape = (len(self.layers), num_logical, num_physical, self.window_size)
        if self._window is None or self._window_shape() != shape:
            self._window = ExpertLoadWindow(*shape)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def _verify_ranks_agree(self, trainer: pl.Trainer) -> None:
        """Place for the cross-rank fingerprint check (issue 9): one all-reduce of a small
        digest of the layers' shapes, placements and the callback's arguments, after every
        local check and before the first other collective. Not implemented yet."""

    def _window_shape(self) -> tuple[int, int, int, int]:
        w = self._window
        assert w is not None
        return (w.num_layers, w.num_logical, w.num_physical, w.window_size)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over gradient-norm clipping; reset the counters; open the trace."""
        self._last_step = int(trainer.global_step)
        algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm))
        if trainer.gradient_clip_val and algorithm in ("None", "norm") and pl_module.automatic_optimization:
            # Lightning's clip_grad_norm_ sees this rank's expert slots only (and replicas
            # several times): norms, hence clipping factors, would differ between ranks and
            # from a run without expert parallelism. The callback clips by the true norm.
            self._clip_norm = float(trainer.gradient_clip_val)
            trainer.gradient_clip_val = None
        for _, layer in self.layers:
            layer.reset_expert_load()  # drop counts of training-mode forwards outside fit
        if self.trace and self._trace_writer is None:
            self._trace_writer = _open_trace(trainer, self.layers, self._num_ranks)

    # ------------------------------------------------------------------ every step
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Sum replica gradients (before gradient clipping, so clipping sees true norms)."""
        if not self.layers:
            return
        params = (p for group in optimizer.param_groups for p in group["params"])
        if any(id(p) in self._expert_param_ids for p in params):
            for _, layer in self.layers:
                layer.sync_replica_grads()
        if self._clip_norm is not None:
            _clip_global_norm(optimizer, self.layers, self._clip_norm)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step: record the counters; log, trace and rearrange when due."""
        step, previous = int(trainer.global_step), self._last_step
        if step == previous or self._window is None:
            return  # a micro-batch that did not step the optimizer
        self._last_step = step
        self._record()
        rearrange = self.rearrange and self._crossed(
            previous, step, self.first_rearrangement_step, self.step_interval
        )
        log = self._crossed(previous, step, self._log_every, self._log_every)
        trace = self._trace_writer is not None or self.trace  # same value on every rank
        trace_window = trace and self._crossed(
            previous, step, self.trace_every_n_steps or 0, self.trace_every_n_steps or 0
        )
        if not (rearrange or log or trace_window):
            return
        load = self._window.compute()  # the one all-reduce
        if log:
            self._log_stats(pl_module, load)
        if trace_window and self._trace_writer is not None:
            self._trace_writer.add_window(step, load.logical_LE.cpu())
        if rearrange:
            self._rearrange(trainer, pl_module, load, step)

    def _record(self) -> None:
        """Stack the layers' counters into the window and zero them (no host synchronisation)."""
        assert self._window is not None
        counts_LP = torch.stack([layer.expert_load.detach() for _, layer in self.layers])
        p2l_LP = torch.stack([layer.physical_to_logical.detach() for _, layer in self.layers])
        if self._window.device != counts_LP.device:
            self._window.to(counts_LP.device)
        self._window.update(counts_LP, p2l_LP)
        for _, layer in self.layers:
            layer.reset_expert_load()

    def _log_stats(self, pl_module: pl.LightningModule, load: WindowLoad) -> None:
        stats = token_statistics(load.slot_LP, self._num_ranks, load.num_steps)
        max_tokens, avg_tokens, balancedness = torch.stack(list(stats)).tolist()
        self.last_stats = {
            "eplb/balancedness": balancedness,
            "eplb/max_tokens": max_tokens,
            "eplb/avg_tokens": avg_tokens,
        }
        _log(pl_module, self.last_stats)

    # ------------------------------------------------------------------ rearrangement
    def _rearrange(self, trainer: pl.Trainer, pl_module: pl.LightningModule, load: WindowLoad, step: int) -> None:
        """Policy, broadcast, migration, new placement buffers, logs. Collective."""
        from lightning_eplb.placement import rebalance

        start = time.perf_counter()
        num_logical = int(self.layers[0][1].num_logical_experts)
        load_LE = load.logical_LE.to("cpu", torch.float64)
        old_LP = torch.stack([layer.physical_to_logical.detach().to("cpu", torch.int64) for _, layer in self.layers])
        old = Placement.from_physical_to_logical(old_LP, num_logical, self._num_ranks)
        proposal = rebalance(
            load_LE,
            old.num_physical,
            self._num_ranks,
            num_nodes=self._num_nodes,
            num_groups=self._num_groups,
            previous=old_LP,
            policy=self.policy,
        )
        new_LP = _broadcast_from_rank_zero(proposal.physical_to_logical, load.slot_LP.device)
        new = Placement.from_physical_to_logical(new_LP, num_logical, self._num_ranks)
        before, after = old.balancedness(load_LE), new.balancedness(load_LE)
        measured = float(token_statistics(load.slot_LP, self._num_ranks, load.num_steps).balancedness)
        changed = new.num_changed_slots(old)
        skipped = changed == 0 or after - before < self.min_improvement
        sent = received = 0
        if not skipped:
            stats = _migrate(
                trainer, self.layers, old_LP, new_LP, self.max_buffer_bytes, self._num_nodes,
                self.migrate_optimizer_state,
            )
            sent, received = stats.bytes_sent, stats.bytes_received
            for row, (_, layer) in enumerate(self.layers):
                layer.set_placement(
                    new.physical_to_logical[row], new.logical_to_physical[row], new.logical_replica_count[row]
                )
            self.num_rearrangements += 1
            self.last_rearrangement_step = step
        total_sent, max_received, seconds = _reduce_stats(sent, received, time.perf_counter() - start, new_LP.device)
        record = {
            "step": float(step),
            "balancedness_before": before,
            "balancedness_after": after,
            "balancedness_measured": measured,
            "slots_changed": float(0 if skipped else changed),
            "bytes_sent": total_sent,
            "bytes_received_max": max_received,
            "seconds": seconds,
            "skipped": float(skipped),
        }
        self.rearrangements.append(record)
        _log(pl_module, {f"eplb/rearrangement/{k}": v for k, v in record.items() if k != "step"})
        if self._trace_writer is not None:
            self._trace_writer.add_window(step, load_LE)
            self._trace_writer.add_rearrangement(
                step, old_LP, old_LP if skipped else new_LP, before, after, int(total_sent), seconds
            )
        verb = "kept the placement (gain below min_improvement)" if skipped else f"moved {changed} slots"
        rank_zero_info(
            f"EPLB step {step}: predicted balancedness {before:.3f} -> {after:.3f} (measured {measured:.3f}); "
            f"{verb}, {total_sent / 1e6:.1f} MB sent in {seconds:.2f} s"
        )

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Expert weights and optimizer state in logical layout (every rank takes part)."""
        _checkpoint_hook("save_expert_state")(self, trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Optimizer state back to the current physical layout."""
        _checkpoint_hook("load_expert_state")(self, trainer, pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The load window (summed over ranks, on CPU) and the rearrangement counters.

        Collective under DDP (Lightning calls it on every rank while saving a checkpoint):
        the window is all-reduced so the checkpoint holds every rank's counts, not rank 0's.
        """
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "last_rearrangement_step": self.last_rearrangement_step,
            "num_rearrangements": self.num_rearrangements,
        }
        if self._window is not None:
            state["window"] = self._window.global_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters and the window (applied in :meth:`setup` if called before it)."""
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"EplbCallback state has version {version!r}, this version reads {_STATE_VERSION}")
        self.last_rearrangement_step = int(state_dict["last_rearrangement_step"])
        self.num_rearrangements = int(state_dict["num_rearrangements"])
        if self._window is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state_dict: dict[str, Any]) -> None:
        assert self._window is not None
        window = state_dict.get("window")
        if window is not None:
            keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
            if not self._window.load_global_state(window, keep=keep):
                rank_zero_warn("EplbCallback: the saved load window has other layer or expert counts; starting empty")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give gradient clipping back to the trainer; close the trace."""
        if self._clip_norm is not None:
            trainer.gradient_clip_val = self._clip_norm
            self._clip_norm = None
        if self._trace_writer is not None:
            self._trace_writer.close()
            self._trace_writer = None


def _log(pl_module: pl.LightningModule, values: dict[str, float]) -> None:
    """Log values that are identical on every rank (no sync needed)."""
    for name, value in values.items():
        pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)


def _clip_global_norm(optimizer: torch.optim.Optimizer, layers: list[tuple[str, Any]], max_norm: float) -> None:
    """``clip_grad_norm_(params, max_norm)`` with the norm of the model without expert
    parallelism: replicated parameters once, each logical expert once (a slot's squared
    norm divided by its expert's replica count, summed over ranks with one all-reduce).
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
    rank = dist.get_rank() if distributed else 0
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
        dist.all_reduce(expert_sq)
    total = (dense_sq + expert_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))


def _broadcast_from_rank_zero(p2l_LP: Tensor, device: torch.device) -> Tensor:
    """``(L, P)`` int64 on CPU: rank 0's placement on every rank (guards against nondeterminism)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return p2l_LP.to("cpu", torch.int64)
    buf = p2l_LP.to(device, torch.int64).contiguous()
    dist.broadcast(buf, src=0)
    return buf.cpu()


def _reduce_stats(sent: int, received: int, seconds: float, device: torch.device) -> tuple[float, float, float]:
    """Bytes sent summed over ranks, the busiest rank's bytes received, the slowest rank's seconds."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(sent), float(received), seconds
    mine = torch.tensor([sent, received, seconds], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    table = torch.stack(parts).cpu()
    return float(table[:, 0].sum()), float(table[:, 1].max()), float(table[:, 2].max())



# ---------------------------------------------------------------------------- argument checks
_POLICY_NAMES = ("balanced", "deepseek")


def _positive_int(name: str, value: int | None, default: int | None = 0, minimum: int = 1) -> Any:
    """``value`` as an int >= ``minimum``; ``None`` gives ``default`` (``0`` means required)."""
    if value is None and default != 0:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} ({value!r}) must be an int >= {minimum}")
    return int(value)


def _non_negative_int(name: str, value: int | None) -> int | None:
    return None if value is None else _positive_int(name, value, minimum=0)


def _boolean(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be True or False")
    return value


def _policy(value: str | Callable[..., Placement]) -> str | Callable[..., Placement]:
    if isinstance(value, str):
        if value not in _POLICY_NAMES:
            raise ValueError(f"policy ({value!r}) must be one of {_POLICY_NAMES} or a callable like rebalance")
        return value
    if not callable(value):
        raise ValueError(f"policy ({value!r}) must be one of {_POLICY_NAMES} or a callable like rebalance")
    return value


def _min_improvement(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"min_improvement ({value!r}) must be a finite number in [-1, 1]")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"min_improvement ({value!r}) must lie in [-1, 1] (it is a balancedness difference)")
    return float(value)


# ---------------------------------------------------------------------------- setup checks
def _find_layers(pl_module: pl.LightningModule) -> list[tuple[str, Any]]:
    """``(qualified name, layer)`` of every :class:`BalanceableMoE` submodule, outermost only."""
    from lightning_eplb.protocol import BalanceableMoE

    layers: list[tuple[str, Any]] = []
    for name, module in pl_module.named_modules():
        if isinstance(module, BalanceableMoE) and not any(name.startswith(f"{n}.") for n, _ in layers if n):
            layers.append((name, module))
    if not layers:
        hint = ""
        if pl.utilities.model_helpers.is_overridden("configure_model", pl_module):
            hint = " Layers built in configure_model() come too late: build them in __init__ or setup()."
        raise MisconfigurationException(
            f"EplbCallback found no balanceable MoE layer (lightning_eplb.BalanceableMoE) in "
            f"{type(pl_module).__name__}: add an ExpertParallelMoE or remove the callback.{hint}"
        )
    return layers


def _check_strategy(strategy: Any) -> None:
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


def _check_layers(layers: list[tuple[str, Any]], num_ranks: int) -> tuple[int, int, int]:
    """``(E, P, G)`` shared by all layers; raises on layers that cannot be balanced together."""
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
        group = getattr(layer, "process_group", None)
        if group is not None and dist.is_available() and dist.is_initialized():
            if dist.get_world_size(group) != num_ranks:
                raise MisconfigurationException(
                    f"layer {name} has an expert-parallel group of {dist.get_world_size(group)} ranks; "
                    f"EplbCallback needs the whole world ({num_ranks} ranks): pass process_group=None"
                )
    if num_physical % num_ranks:
        raise MisconfigurationException(
            f"num_physical_experts ({num_physical}) = experts ({num_logical}) + redundant experts "
            f"({num_physical - num_logical}) must be divisible by the world size ({num_ranks}); "
            "change num_redundant_experts or the number of devices"
        )
    return num_logical, num_physical, num_groups


_LAYER_BUFFERS = ("physical_to_logical", "logical_to_physical", "logical_replica_count", "expert_load")


def _ignore_in_ddp(pl_module: pl.LightningModule, layers: list[tuple[str, Any]]) -> None:
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
        names += [prefix + b for b in _LAYER_BUFFERS if b in named]
    pl_module._ddp_params_and_buffers_to_ignore = list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- rearrangement helpers
def _migrate(
    trainer: pl.Trainer,
    layers: list[tuple[str, Any]],
    old_LP: Tensor,
    new_LP: Tensor,
    max_buffer_bytes: int | None,
    num_nodes: int,
    with_optimizer_state: bool,
) -> Any:
    """One :func:`migrate_experts` call for the weights (and optimizer state) of every layer."""
    from lightning_eplb.migration import migrate_experts, optimizer_state_tensors

    optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers] if with_optimizer_state else []
    tensors: list[list[Tensor]] = []
    for _, layer in layers:
        params = list(layer.expert_tensors())
        row = [p.detach() for p in params]
        for optimizer in optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [p for p in params if id(p) in held]
            if mine:
                row += optimizer_state_tensors(optimizer, mine)
        tensors.append(row)
    with torch.no_grad():
        stats = migrate_experts(old_LP, new_LP, tensors, group=None, max_buffer_bytes=max_buffer_bytes, num_nodes=num_nodes)
    for _, layer in layers:
        for p in layer.expert_tensors():
            p.grad = None  # gradients of the old placement mean nothing in the new one
    return stats


def _open_trace(trainer: pl.Trainer, layers: list[tuple[str, Any]], num_ranks: int) -> Any:
    """A ``TraceWriter`` on global rank 0 (None elsewhere). Calls ``trainer.log_dir`` on every
    rank (it broadcasts)."""
    import os

    from lightning_eplb import trace

    root = trainer.log_dir or trainer.default_root_dir
    if trainer.global_rank != 0:
        return None
    if not hasattr(trace, "TraceWriter"):
        rank_zero_warn("EplbCallback(trace=True): lightning_eplb.trace.TraceWriter is missing; no trace is written")
        return None
    first = layers[0][1]
    return trace.TraceWriter(
        os.path.join(root, "eplb_trace.npz"),
        len(layers),
        int(first.num_logical_experts),
        int(first.num_physical_experts),
        num_ranks,
    )


def _checkpoint_hook(name: str) -> Callable[..., None]:
    """``lightning_eplb.checkpoint.<name>``, or a no-op while that module lacks it."""
    from lightning_eplb import checkpoint

    hook = getattr(checkpoint, name, None)
    if hook is None:
        warnings.warn(f"lightning_eplb.checkpoint.{name} is missing: expert state is saved per rank", stacklevel=2)
        return lambda *args: None
    return hook
