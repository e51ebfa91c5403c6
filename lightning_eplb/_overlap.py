"""Replica-gradient sync overlapped with the backward (used by :class:`~lightning_eplb.EplbCallback`).

Without overlap every layer's replica gradients are exchanged after the whole backward, on
the critical path. Here each layer's exchange starts as soon as the backward has produced
all its expert gradients (``register_post_accumulate_grad_hook``), on a process group of its
own (its own NCCL communicator and stream), so it runs while the backward of the layers
below it computes; :meth:`ReplicaSyncOverlap.finish` completes them all right after the
backward (``on_after_backward``), before anything else reads or changes the gradients.
(Launching later, when the backward reaches the next layer's expert GEMMs so that the
exchange does not share the links with the layer's own dispatch all-to-all backward, was
measured slower on 4 H200s: the exchange then competes with the GEMMs instead.)

Collectives must be issued in the same order on every rank. Hooks fire in backward order,
which is the same on every rank for the same graph, but to be safe against a graph that
differs between ranks the exchanges are *launched* in one fixed order (the reverse of the
layers' module order): a layer whose gradients are ready waits until the layers before it in
that order have launched; whatever has not launched when the backward ends launches then,
in order. Only layers that ran exactly one forward since the last backward are armed (a
layer called twice would accumulate into its gradients after its exchange had started).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist


def build_overlap(
    layers: list[Any],
    wanted: bool,
    group: dist.ProcessGroup | None,
    ep_groups: list[list[int]] | None = None,
    copies_group: dist.ProcessGroup | None = None,
) -> tuple[ReplicaSyncOverlap | None, dist.ProcessGroup | None]:
    """The overlap for the layers that support it, and its process group: ``group`` if given,
    else created (every rank must call this at the same point, e.g. in the callback's
    ``setup``): a copy of the whole world, or with ``ep_groups`` (the global ranks of every
    expert-parallel subgroup) a copy of each, every rank creating all of them in order.
    With ``copies_group`` (the DP group of expert parallelism inside data parallelism) each
    layer's gradients are also averaged over it, started right behind its replica sums."""
    layers = [layer for layer in layers if supports_overlap(layer)]
    if not wanted or not layers:
        return None, group
    if group is None:
        rank = dist.get_rank()
        for ranks in ep_groups or [list(range(dist.get_world_size()))]:
            created = dist.new_group(ranks=ranks)
            if rank in ranks:
                group = created
        assert group is not None
        warm_up(group)
    return ReplicaSyncOverlap(layers, group, copies_group), group


def warm_up(group: dist.ProcessGroup) -> None:
    """One collective on a new group, on every rank together: NCCL creates a communicator
    lazily, collectively, on its first operation; were that a point-to-point batch that
    ranks without replicated experts skip, the others would wait for them forever."""
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.all_reduce(torch.zeros(1, device=device), group=group)


def will_step(trainer: Any, pl_module: Any) -> bool:
    """Whether the coming backward ends in an optimizer step (automatic optimization, one
    optimizer, not an accumulating micro-batch); False when Lightning cannot say."""
    if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
        return False
    try:
        return not bool(trainer.fit_loop._should_accumulate())
    except AttributeError:
        return False


def supports_overlap(layer: Any) -> bool:
    """Whether ``layer`` can start its replica-gradient sync early (our ExpertParallelMoE can;
    a user's layer implementing only the protocol syncs after the backward)."""
    return callable(getattr(layer, "start_replica_grad_sync", None)) and hasattr(layer, "forward_calls")


class ReplicaSyncOverlap:
    """Starts each layer's replica-gradient sync from gradient hooks during an armed backward.

    Args:
        layers: the balanced layers in module order (all support the overlap).
        group: a process group with the EP group's ranks in the same order, used for the
            exchanges only.
        copies_group: None, or the ranks holding copies of this rank's slots (expert
            parallelism inside data parallelism): the layers synced here are then also
            averaged over it, each right behind its replica sums.
    """

    def __init__(
        self, layers: list[Any], group: dist.ProcessGroup | None, copies_group: dist.ProcessGroup | None = None
    ) -> None:
        self.order = list(reversed(layers))  # the order the backward reaches them
        self.group = group
        self.copies_group = copies_group
        self.armed: list[bool] = [False] * len(self.order)
        self.launched = 0
        self._counts = [0] * len(self.order)
        self._needed = [len(layer.expert_tensors()) for layer in self.order]
        self._ready = [False] * len(self.order)
        self._handles = []
        for i, layer in enumerate(self.order):
            for p in layer.expert_tensors():
                self._handles.append(
                    p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))
                )

    def arm(self) -> None:
        """Before a backward that ends in an optimizer step: start syncs from hooks."""
        self.launched = 0
        for i, layer in enumerate(self.order):
            self.armed[i] = int(layer.forward_calls) == 1
            self._counts[i] = 0
            self._ready[i] = False

    @property
    def is_armed(self) -> bool:
        return any(self.armed)

    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        if not self.armed[i] or self._ready[i]:
            return
        self._counts[i] += 1
        if self._counts[i] == self._needed[i]:
            self._ready[i] = True
            self._launch(until_blocked=True)

    def _launch(self, until_blocked: bool) -> None:
        while self.launched < len(self.order):
            i = self.launched
            if self.armed[i]:
                if until_blocked and not self._ready[i]:
                    return
                if self.copies_group is None:  # a layer's own method may take the group only
                    self.order[i].start_replica_grad_sync(self.group)
                else:
                    self.order[i].start_replica_grad_sync(self.group, self.copies_group)
            self.launched += 1

    def finish(self) -> set[int]:
        """Launch what has not launched (in order), complete every armed layer's sync (and
        average over the copies) and disarm. Returns the ``id`` of the layers synced (the
        others still need ``sync_replica_grads()`` and, with copies, the average)."""
        if not self.is_armed:
            return set()
        self._launch(until_blocked=False)
        done = set()
        for i, layer in enumerate(self.order):
            if self.armed[i]:
                layer.sync_replica_grads()
                done.add(id(layer))
            self.armed[i] = False
        return done

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
