"""``EplbCallback``: expert-parallel load balancing inside ``Trainer.fit``.

Shapes (suffixes used in names below):
    L: balanced MoE layers     E: logical experts per layer     P: physical slots per layer
    N: expert-parallel ranks (the whole world, or the layers' EP group), S = P // N slots per rank

Per optimizer step the callback syncs replica gradients (before clipping) and moves the
layers' counters into an :class:`~lightning_eplb.load.ExpertLoadWindow`. Every
``step_interval`` steps it reduces the window, runs the placement policy from the current
placement, and, when the predicted gain is worth it, migrates expert weights and their
optimizer state with one :func:`~lightning_eplb.migrate_experts` call. Every decision is
taken from data that is identical on every rank (global step, all-reduced counts, and a
placement broadcast from rank 0), so ranks never disagree about when to communicate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_eplb import _callback_utils as utils
from lightning_eplb import _safety
from lightning_eplb._ep_layout import (
    ExpertParallelLayout,
    average_over_copies,
    expert_parallel_layout,
    nodes_per_ep_group,
)
from lightning_eplb._overlap import ReplicaSyncOverlap, build_overlap, will_step
from lightning_eplb._rearrange import rearrange
from lightning_eplb.load import ExpertLoadWindow, WindowLoad, token_statistics
from lightning_eplb.placement import Placement

__all__ = ["EplbCallback"]

_STATE_VERSION = 1


class EplbCallback(Callback):
    """Balance the experts of every :class:`~lightning_eplb.BalanceableMoE` layer during training.

    Supported strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ...). The expert-
    parallel (EP) group is the whole world, or the layers' ``process_group``: equal, disjoint
    subgroups (e.g. one per node), each holding every slot; then the placement is computed for
    one group from the loads of all ranks, every group migrates its own copy, and expert
    gradients are averaged over the copies as DDP averages the rest
    (:mod:`lightning_eplb._ep_layout`). The callback excludes expert parameters and the
    placement/load buffers from DDP (``_ddp_params_and_buffers_to_ignore``): expert
    gradients are synced across replicas by the layers instead, and the placement buffers
    are kept identical by the callback itself, so DDP's buffer broadcast is not needed.

    Logged through the LightningModule (every ``log_every_n_steps`` steps, from the last
    ``window_size`` steps, all-reduced): ``eplb/balancedness`` (mean over max rank load,
    summed over layers; 1.0 is perfect), ``eplb/max_tokens`` and ``eplb/avg_tokens``
    (per step, summed over layers). Per rearrangement: ``eplb/rearrangement/*`` with the
    predicted balancedness before and after, the measured one of the window it was computed
    from, slots changed, bytes moved (sum over ranks), the busiest rank's bytes received,
    seconds (slowest rank), ``replica_grad_bytes_max`` (what the placement in force costs
    per optimizer step: the most bytes any rank sends to sum the gradients of replicated
    experts, :class:`~lightning_eplb.ExpertParallelMoE` layers only) and ``skipped`` (1
    when the gain was below ``min_improvement``).

    Gradient clipping by norm (``Trainer(gradient_clip_val=...)``) is taken over during
    ``fit``: Lightning's ``clip_grad_norm_`` would see only this rank's expert slots (and
    replicated experts several times), so ranks would clip by different factors and drift
    apart. The callback clips every parameter by the norm of the model without expert
    parallelism (one small all-reduce per step) and gives ``gradient_clip_val`` back to the
    trainer at the end. Clipping by value needs nothing (replicas carry equal gradients).

    fp16 mixed precision (``precision="16-mixed"``): the ``GradScaler`` decides to skip a
    step from this rank's gradients, expert gradients included, so the callback makes the
    decision common to every rank (one all-reduce of the scaler's flag per step, no host
    synchronisation); otherwise an overflow on one rank would let the ranks drift apart.

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
        plot: at each rearrangement rank 0 draws heatmaps of expert load and of rank load
            before/after (:mod:`lightning_eplb.viz`; needs matplotlib, the ``viz`` extra): to
            TensorBoard when the trainer has a ``TensorBoardLogger``, else PNG files under
            ``<log_dir>/eplb``.
        overlap_grad_sync: start each :class:`~lightning_eplb.ExpertParallelMoE`'s
            replica-gradient exchange during the backward, as soon as its expert gradients
            exist, on a process group of its own (one more NCCL communicator), so that it
            overlaps the backward of the layers below (automatic optimization; the result
            is bit-identical to syncing after the backward). ``False``: sync after the backward.

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
        plot: bool = False,
        overlap_grad_sync: bool = True,
    ) -> None:
        super().__init__()
        self.step_interval = utils.positive_int("step_interval", step_interval)
        self.window_size = utils.positive_int("window_size", window_size, default=self.step_interval)
        self.policy = utils.policy(policy)
        self.num_nodes = utils.positive_int("num_nodes", num_nodes, default=None)
        self.first_rearrangement_step = utils.positive_int(
            "first_rearrangement_step", first_rearrangement_step, default=self.step_interval
        )
        self.min_improvement = utils.min_improvement(min_improvement)
        self.log_every_n_steps = utils.non_negative_int("log_every_n_steps", log_every_n_steps)
        self.max_buffer_bytes = utils.positive_int(
            "max_buffer_bytes", max_buffer_bytes, default=None, minimum=2
        )
        self.migrate_optimizer_state = utils.boolean("migrate_optimizer_state", migrate_optimizer_state)
        self.trace = utils.boolean("trace", trace)
        self.trace_every_n_steps = utils.positive_int(
            "trace_every_n_steps", trace_every_n_steps, default=None
        )
        if self.trace_every_n_steps is not None and not self.trace:
            raise ValueError(f"trace_every_n_steps ({trace_every_n_steps}) needs trace=True")
        self.rearrange = utils.boolean("rearrange", rearrange)
        self.plot = utils.plot_option(plot)
        self.overlap_grad_sync = utils.boolean("overlap_grad_sync", overlap_grad_sync)

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
        # (id(optimizer), number of param groups) -> whether it holds expert parameters
        self._holds_experts: dict[tuple[int, int], bool] = {}
        self._trace_writer: Any = None
        self._clip_norm: float | None = None
        self._broken: str | None = None
        self._warned_empty = False
        self._overlap: ReplicaSyncOverlap | None = None
        self._sync_group: tuple[Any, Any] | None = None  # (EP groups it mirrors, group)
        self._layout = ExpertParallelLayout()
        self._synced: set[int] = set()  # id of layers whose replica sync finished this step
        self._module: pl.LightningModule | None = None  # its on_save_checkpoint is wrapped

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
        collective, so a misconfiguration raises on all ranks together. Layers built in
        ``configure_model`` (which Lightning calls after this hook, before wrapping the
        model in DDP) are set up right after it.
        """
        if utils.defer_to_configure_model(pl_module, lambda: self._setup_layers(trainer, pl_module, stage)):
            return
        self._setup_layers(trainer, pl_module, stage)

    def _setup_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = utils.find_layers(pl_module)
        world_size = int(trainer.world_size)
        utils.check_strategy(trainer.strategy)
        num_nodes = self.num_nodes if self.num_nodes is not None else int(trainer.num_nodes)
        if world_size % num_nodes:
            raise MisconfigurationException(
                f"the world size ({world_size}) must be divisible by num_nodes ({num_nodes}); "
                "pass EplbCallback(num_nodes=...) that divides it, or leave it to the trainer"
            )
        self._layout = expert_parallel_layout(self.layers, world_size)
        num_ranks = self._layout.ep_size
        num_logical, num_physical, num_groups = utils.check_layers(
            self.layers, num_ranks, "the world size" if num_ranks == world_size else "the expert-parallel group size"
        )
        num_nodes = nodes_per_ep_group(num_nodes, world_size, num_ranks)
        self._num_ranks, self._num_nodes, self._num_groups = num_ranks, num_nodes, num_groups
        log_every = self.log_every_n_steps
        self._log_every = int(getattr(trainer, "log_every_n_steps", 50)) if log_every is None else log_every
        self._verify_ranks_agree(trainer)
        for _, layer in self.layers:
            layer.setup_expert_parallel()
        utils.ignore_in_ddp(pl_module, self.layers)
        # a checkpoint of another model shape fails with a clear ValueError at weight loading
        utils.checkpoint_hook("install_load_checks")(pl_module, self.layers)
        utils.convert_weights_only_saves(self, trainer, pl_module)
        self._module = pl_module
        self._expert_param_ids = {id(p) for _, layer in self.layers for p in layer.expert_tensors()}
        self._holds_experts = {}
        self._setup_overlap(stage)
        shape = (len(self.layers), num_logical, num_physical, self.window_size)
        if self._window is None or self._window_shape() != shape:
            self._window = ExpertLoadWindow(*shape)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def _setup_overlap(self, stage: str) -> None:
        """Hooks that start replica-gradient syncs during the backward, on a group of their own."""
        if self._overlap is not None:
            self._overlap.remove()
        layout = self._layout
        wanted = stage == "fit" and self.overlap_grad_sync and self._num_ranks * layout.dp_size > 1
        key = layout.ep_groups  # the sync group mirrors the EP group: rebuilt if that changed
        cached = self._sync_group[1] if self._sync_group is not None and self._sync_group[0] == key else None
        layers = [lay for _, lay in self.layers]
        self._overlap, group = build_overlap(layers, wanted, cached, key, layout.dp_group)
        self._sync_group = (key, group) if group is not None else None

    def _verify_ranks_agree(self, trainer: pl.Trainer) -> None:
        """Compare a fingerprint of the callback's arguments, the world size and the layers'
        names, sizes, expert shapes and placements across ranks: one all-reduce of a few
        int64, after every local check and before the first other collective.

        Raises:
            RankDisagreementError: on every rank, naming what differs and on which ranks.
        """
        _safety.check_ranks_agree(_safety.setup_fingerprint(self, self._num_ranks), "EplbCallback.setup")

    def _verify_replicas_identical(self) -> None:
        """Replicas of an expert must hold the same weights when training starts (after any
        checkpoint was restored); checked across ranks with one all-gather of checksums.

        Raises:
            MisconfigurationException: on every rank, naming the layers, experts and slots.
        """
        differing = _safety.differing_replicas(self.layers, self._layout.ep_group, self._layout.dp_group)
        if differing:
            raise MisconfigurationException(
                "EplbCallback: replicas of one expert hold different weights: "
                + " | ".join(differing)
                + ". Every rank must build the layers with the same expert weights: give "
                "ExpertParallelMoE an init_seed (or call lightning.seed_everything before building the "
                "model); a layer of your own must initialise each logical expert identically on every rank"
            )

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
        if self.layers:
            _safety.check_ranks_agree(_safety.train_fingerprint(self, trainer), "EplbCallback.on_train_start")
            self._verify_replicas_identical()
        if self.trace and self._trace_writer is None:
            self._trace_writer = utils.open_trace(trainer, self.layers, self._num_ranks)

    # ------------------------------------------------------------------ every step
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Sum replica gradients (before gradient clipping, so clipping sees true norms)."""
        if not self.layers:
            return
        synced, self._synced = self._synced, set()
        if self._holds_expert_params(optimizer):
            for _, layer in self.layers:
                if id(layer) not in synced:
                    layer.sync_replica_grads()
            # the overlap averaged the layers it synced (it gets the DP group whenever D > 1)
            average_over_copies(self.layers, self._layout, skip=synced)
            utils.agree_on_nonfinite(trainer, optimizer)  # fp16: skip a step on every rank or none
        if self._clip_norm is not None:
            utils.clip_global_norm(optimizer, self.layers, self._clip_norm, self._layout.ep_group)

    def _holds_expert_params(self, optimizer: torch.optim.Optimizer) -> bool:
        key = (id(optimizer), len(optimizer.param_groups))  # add_param_group invalidates
        if key not in self._holds_experts:  # once per optimizer, not a scan of every parameter per step
            params = (p for group in optimizer.param_groups for p in group["params"])
            self._holds_experts[key] = any(id(p) in self._expert_param_ids for p in params)
        return self._holds_experts[key]

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """Arm the overlapped replica sync for a backward that ends in an optimizer step."""
        if self._overlap is not None and will_step(trainer, pl_module):
            if self._holds_expert_params(trainer.optimizers[0]):
                self._overlap.arm()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Complete the overlapped replica syncs before anything reads the gradients."""
        if self._overlap is not None:
            self._synced |= self._overlap.finish()
        for _, layer in self.layers:
            if hasattr(layer, "forward_calls"):
                layer.forward_calls = 0

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
        every = self.trace_every_n_steps or 0
        trace_window = self.trace and not rearrange and self._crossed(previous, step, every, every)
        if not (rearrange or log or trace_window):
            return
        if rearrange:  # ranks must be at the same place with the same placement: one small all-reduce
            fingerprint = _safety.step_fingerprint(self, trainer, batch_idx)
            _safety.check_ranks_agree(fingerprint, f"EPLB step {step}", device=self._window.device)
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
        utils.log_values(pl_module, self.last_stats)

    # ------------------------------------------------------------------ rearrangement
    def _rearrange(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, load: WindowLoad, step: int
    ) -> None:
        """Policy, broadcast, migration, new placement buffers, logs. Collective."""
        rearrange(self, trainer, load, step)

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Expert weights and optimizer state in logical layout (every rank takes part).

        Raises:
            RuntimeError: after a failed migration (expert tensors may be half-migrated):
                resume from the last checkpoint written before it instead.
        """
        _safety.refuse_if_broken(self._broken)
        utils.checkpoint_hook("save_expert_state")(self, trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Optimizer state back to the current physical layout."""
        utils.checkpoint_hook("load_expert_state")(self, trainer, pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The load window (summed over ranks, on CPU) and the rearrangement counters.

        Collective under DDP (Lightning calls it on every rank while saving a checkpoint):
        the window is all-reduced so the checkpoint holds every rank's counts, not rank 0's.
        """
        _safety.refuse_if_broken(self._broken)
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
            raise ValueError(
                f"EplbCallback state has version {version!r}, this version reads {_STATE_VERSION}"
            )
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
                rank_zero_warn(
                    "EplbCallback: the saved load window has other layer or expert counts; starting empty"
                )

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give gradient clipping back to the trainer; close the trace; remove the sync hooks."""
        if self._overlap is not None:
            self._overlap.remove()
            self._overlap = None
        if self._module is not None:
            utils.restore_module_save(self._module)
            self._module = None
        if self._clip_norm is not None:
            trainer.gradient_clip_val = self._clip_norm
            self._clip_norm = None
        if self._trace_writer is not None:
            self._trace_writer.close()
            self._trace_writer = None
