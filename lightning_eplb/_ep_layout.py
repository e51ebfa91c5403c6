"""Expert parallelism inside data parallelism: the layout of :class:`~lightning_eplb.EplbCallback`.

By default the expert-parallel (EP) group is the whole world: ``N`` ranks hold the ``P``
slots between them. Layers may instead be built on an EP *subgroup* of ``N`` ranks (e.g.
the GPUs of one node, from ``init_device_mesh(..., (dp, ep))["ep"].get_group()``); the world
of ``W`` ranks is then ``D = W / N`` EP groups, each holding all ``P`` slots, which are copies
of each other: the *expert data-parallel* (DP) dimension. Rank ``j`` of every EP group holds
the same slots; the ``D`` ranks with EP rank ``j`` form that slot range's DP group.

What changes with ``D > 1``:

* the placement is computed for ``N`` ranks, from the loads summed over all ``W`` ranks, and
  every EP group migrates its own copy of the experts (the same plan in each);
* expert gradients, summed over replicas and divided by ``N`` inside each EP group, are
  then summed over the DP group and divided by ``D``: the average over all ``W`` ranks that
  DDP applies to every other parameter;
* the global gradient norm counts each logical expert once (the expert part is reduced over
  the EP group only, its DP copies being equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_eplb._overlap import warm_up
from lightning_eplb._replica_sync import start_average


@dataclass
class ExpertParallelLayout:
    """Where this rank stands.

    Attributes:
        ep_group: the layers' EP group (None: the whole world).
        ep_size: ``N``.
        dp_group: the ranks holding the same slots in the other EP groups (None when ``D == 1``).
        dp_size: ``D = W / N``.
        ep_groups: the global ranks of every EP group, in increasing first rank (None when
            the EP group is the whole world).
    """

    ep_group: dist.ProcessGroup | None = None
    ep_size: int = 1
    dp_group: dist.ProcessGroup | None = None
    dp_size: int = 1
    ep_groups: list[list[int]] | None = None


def expert_parallel_layout(layers: list[tuple[str, Any]], world_size: int) -> ExpertParallelLayout:
    """The EP and expert-DP groups of the balanced layers. Collective on several ranks: one
    ``all_gather_object`` of each rank's EP group members (also when every layer uses the
    default, the whole world: a rank that took another path would leave the others waiting),
    then one ``new_group`` per DP group when ``D > 1``.

    Raises:
        MisconfigurationException: on every rank, when layers on one rank use different EP
            groups, or the EP groups do not split the world into equal, disjoint groups.
    """
    groups = {id(getattr(layer, "process_group", None)): getattr(layer, "process_group", None) for _, layer in layers}
    if not (dist.is_available() and dist.is_initialized()) or world_size == 1:
        return ExpertParallelLayout(ep_size=world_size)
    mine: list[int] | str
    if len(groups) > 1:
        mine = "layers on one rank use different expert-parallel process groups"
    else:
        group = next(iter(groups.values()))
        mine = list(range(world_size)) if group is None else list(dist.get_process_group_ranks(group))
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    problems = sorted({f"rank {r}: {m}" for r, m in enumerate(everyone) if isinstance(m, str)})
    members = [m for m in everyone if not isinstance(m, str)]
    distinct = sorted({tuple(m) for m in members})
    sizes = {len(m) for m in distinct}
    covered = sorted(r for m in distinct for r in m)
    if not problems and (len(sizes) != 1 or covered != list(range(world_size))):
        problems.append(
            "the expert-parallel groups must split the world into disjoint groups of one size, got "
            + ", ".join(str(list(m)) for m in distinct)
        )
    if problems:
        raise MisconfigurationException("EplbCallback: " + "; ".join(problems))
    group = next(iter(groups.values()))
    ep_size = len(distinct[0])
    if ep_size == world_size:
        return ExpertParallelLayout(ep_group=group, ep_size=world_size)
    if group is None:  # unreachable: a rank with the whole world would have made sizes differ
        raise MisconfigurationException("EplbCallback: inconsistent expert-parallel groups")
    ep_rank = dist.get_rank(group)
    dp_group = None
    for j in range(ep_size):  # every rank creates every DP group, in the same order
        created = dist.new_group(ranks=sorted(m[j] for m in distinct))
        if j == ep_rank:
            dp_group = created
    assert dp_group is not None
    warm_up(dp_group)
    return ExpertParallelLayout(group, ep_size, dp_group, world_size // ep_size, [list(m) for m in distinct])


def nodes_per_ep_group(num_nodes: int, world_size: int, ep_size: int) -> int:
    """Nodes one EP group spans (ranks numbered node by node, EP groups contiguous): what
    hierarchical placement calls ``num_nodes``.

    Raises:
        MisconfigurationException: when the EP groups do not align with the nodes.
    """
    per_node = world_size // num_nodes
    if ep_size % per_node == 0:
        return ep_size // per_node
    if per_node % ep_size == 0:
        return 1
    raise MisconfigurationException(
        f"expert-parallel groups of {ep_size} ranks do not align with {num_nodes} nodes of {per_node} ranks: "
        "an EP group must be whole nodes or fit in one node"
    )


@torch.no_grad()
def average_over_copies(
    layers: list[tuple[str, Any]], layout: ExpertParallelLayout, skip: set[int] | frozenset[int] = frozenset()
) -> None:
    """Average every expert gradient over the DP group (after the replica sync), except for
    the layers whose ``id`` is in ``skip`` (averaged by the overlap)."""
    if layout.dp_size == 1 or layout.dp_group is None:
        return
    grads: list[Tensor] = []
    for _, layer in layers:
        if id(layer) in skip:
            continue
        for p in layer.expert_tensors():
            if p.grad is None:  # every DP rank must join the same all-reduces
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    if grads:
        start_average(grads, layout.dp_group).finish()
