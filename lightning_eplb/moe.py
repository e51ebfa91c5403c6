"""Expert-parallel MoE layer that :class:`~lightning_eplb.EplbCallback` can balance.

Shapes (suffixes used in names below):
    T: tokens on this rank        K: top_k        C = T * K token copies
    H: hidden size                F: expert FFN size
    E: logical experts            P: physical slots = E + redundant
    N: expert-parallel ranks      S = P // N local slots      M = P - E + 1
    R: token copies received by this rank

Forward on ``N > 1`` ranks: route (top-k logical experts per token), pick one replica of
each choice (round-robin over the expert's replicas in the order of the copies, see
``_sort_by_slot``: deterministic in the token positions, even over replicas), count the
copies per slot into ``expert_load``, sort them by slot, exchange the per-slot counts
(one small all-to-all, then **one host synchronisation**: the row exchange needs its split
sizes as Python integers), send the rows with an uneven all-to-all, run all local slots in
one grouped matmul, send the results back, combine with the router weights. On one rank
there are no collectives; with the ``grouped_mm`` backend no host synchronisation at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_eplb._dispatch import (
    all_to_all,
    combine,
    exchange_counts,
    gather_copies,
    inverse_permutation,
    permute_rows,
    recomputing,
    slot_order,
)
from lightning_eplb._grouped import BACKENDS, grouped_swiglu, resolve_backend
from lightning_eplb._moe_state import load_state_dict_post_hook, load_state_dict_pre_hook
from lightning_eplb._replica_sync import PendingSync, ReplicaIndex, finish_sync, start_sync
from lightning_eplb._routing import check_routing_args, route
from lightning_eplb.dense import init_logical_experts
from lightning_eplb.placement import Placement
from lightning_eplb.protocol import BalanceableMoE

__all__ = ["BalanceableMoE", "ExpertParallelMoE"]


class ExpertParallelMoE(nn.Module):
    """Top-k routed SwiGLU MoE whose experts are spread over ranks by a placement.

    Args:
        hidden_size: ``H``.
        ffn_hidden_size: ``F``, hidden size of each expert.
        num_experts: ``E`` logical experts.
        top_k: experts per token (``<= E``).
        num_redundant_experts: extra slots for replicas of hot experts; ``P = E + R``.
        num_expert_groups: ``G > 1`` turns on group-limited routing: a token picks its
            ``num_limited_groups`` best groups (group score: the max expert score in it),
            then its top-k experts inside them. ``E % G == 0``.
        process_group: expert-parallel group (None: the whole world). With a subgroup, the
            backward averages expert gradients over that group only (``1 / N``): they must
            still be averaged over the groups' copies (EplbCallback does it).
        num_limited_groups: default ``max(1, G // 2)``.
        init_seed: seed of the logical expert weights; None draws one from torch's global
            RNG (equal on every rank after ``seed_everything``).
        expert_backend: ``"auto"`` (``torch._grouped_mm`` on CUDA bf16 sm90+, else a padded
            ``bmm``), ``"grouped_mm"``, ``"bmm"`` or ``"loop"`` (reference only).

    Built without a process group it holds all ``P`` slots (``S = P``).
    :meth:`setup_expert_parallel` keeps this rank's ``S = P / N`` slots; it runs at
    construction if ``torch.distributed`` is already initialised with more than one rank
    (e.g. in ``configure_model``), otherwise :class:`~lightning_eplb.EplbCallback` calls it
    in ``setup``. A forward on several ranks before that raises ``RuntimeError``.

    Parameters: ``gate.weight (E, H)`` (replicated, trained by DDP as usual) and the expert
    slots ``w1 (S, F, H)``, ``w3 (S, F, H)``, ``w2 (S, H, F)``, which DDP must ignore
    (list them, with ``expert_load``, in ``_ddp_params_and_buffers_to_ignore``). Without
    the callback call :meth:`sync_replica_grads` after backward, before ``optimizer.step()``.

    Buffers: ``physical_to_logical (P,)``, ``logical_to_physical (E, M)``,
    ``logical_replica_count (E,)`` (persistent, int64) and ``expert_load (P,)`` (int64,
    not persistent).

    Example:
        >>> moe = ExpertParallelMoE(8, 16, num_experts=4, top_k=2, num_redundant_experts=2, init_seed=0)
        >>> moe.physical_to_logical
        tensor([0, 1, 2, 3, 0, 1])
        >>> moe(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
        >>> int(moe.expert_load.sum())  # 15 tokens x top_k 2
        30
    """

    physical_to_logical: Tensor
    logical_to_physical: Tensor
    logical_replica_count: Tensor
    expert_load: Tensor

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        num_redundant_experts: int = 0,
        num_expert_groups: int = 1,
        process_group: dist.ProcessGroup | None = None,
        *,
        num_limited_groups: int | None = None,
        init_seed: int | None = None,
        expert_backend: str = "auto",
    ) -> None:
        super().__init__()
        if hidden_size < 1 or ffn_hidden_size < 1:
            raise ValueError(
                f"hidden_size ({hidden_size}) and ffn_hidden_size ({ffn_hidden_size}) must be >= 1"
            )
        if num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts ({num_redundant_experts}) must be >= 0")
        if expert_backend not in BACKENDS:
            raise ValueError(f"expert_backend ({expert_backend!r}) must be one of {BACKENDS}")
        self.num_limited_groups = check_routing_args(
            num_experts, top_k, num_expert_groups, num_limited_groups
        )
        self.hidden_size, self.ffn_hidden_size, self.top_k = hidden_size, ffn_hidden_size, top_k
        self.num_expert_groups = num_expert_groups
        self.num_logical_experts = num_experts
        self.num_physical_experts = num_experts + num_redundant_experts
        self.process_group = process_group
        self.expert_backend = expert_backend

        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        start = Placement.contiguous(1, num_experts, self.num_physical_experts, 1)
        self.register_buffer("physical_to_logical", start.physical_to_logical[0].clone())
        self.register_buffer("logical_to_physical", start.logical_to_physical[0].clone())
        self.register_buffer("logical_replica_count", start.logical_replica_count[0].clone())
        self.register_buffer(
            "expert_load", torch.zeros(self.num_physical_experts, dtype=torch.int64), persistent=False
        )

        if init_seed is None:
            init_seed = int(torch.randint(0, 2**62, (1,)).item())
        self.init_seed = int(init_seed)
        # Built where torch.distributed is up (Lightning's configure_model, a torchrun
        # script): draw only this rank's slots, so a large layer never exists whole here.
        lo, hi = 0, self.num_physical_experts
        if dist.is_available() and dist.is_initialized():
            if process_group is not None or dist.get_world_size() > 1:
                lo, hi = self._slot_range(process_group, strict=False)  # setup raises on a bad group
        self._drawn_slots = (lo, hi)  # the slots whose weights this rank holds
        held_S = start.physical_to_logical[0, lo:hi]
        w1, w3, w2 = init_logical_experts(
            num_experts, hidden_size, ffn_hidden_size, self.init_seed, held_S.tolist()
        )
        # drawn on CPU in float32 (the same values whatever the context), then placed like
        # the gate: the default dtype and device, e.g. inside Lightning's configure_model
        device, dtype = self.gate.weight.device, self.gate.weight.dtype
        self.w1 = nn.Parameter(w1.to(device, dtype))
        self.w3 = nn.Parameter(w3.to(device, dtype))
        self.w2 = nn.Parameter(w2.to(device, dtype))

        self._ep_group: dist.ProcessGroup | None = None
        self._ep_size, self._ep_rank, self._is_setup = 1, 0, False
        self._pending_sync: PendingSync | None = None
        self.forward_calls = 0
        """Training forwards with autograd since the callback last reset it (host counter;
        a forward that activation checkpointing re-runs in the backward is not counted)."""
        self._refresh_replica_index()
        self._register_load_state_dict_pre_hook(load_state_dict_pre_hook, with_module=True)
        self.register_load_state_dict_post_hook(load_state_dict_post_hook)
        if dist.is_available() and dist.is_initialized():
            if process_group is not None or dist.get_world_size() > 1:
                self.setup_expert_parallel(process_group)

    # ------------------------------------------------------------------ sizes
    @property
    def num_local_experts(self) -> int:
        """``S``: slots held by this rank (``P`` before :meth:`setup_expert_parallel`)."""
        return int(self.w1.shape[0])

    @property
    def ep_size(self) -> int:
        """``N``: ranks of the expert-parallel group (1 before setup)."""
        return self._ep_size

    @property
    def ep_rank(self) -> int:
        """This rank's index in the expert-parallel group (0 before setup)."""
        return self._ep_rank

    # ------------------------------------------------------------------ protocol
    def setup_expert_parallel(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Bind the expert-parallel group and keep this rank's ``S`` slots. Idempotent.

        Call before the optimizer exists (the parameters are replaced). Without an
        initialised ``torch.distributed`` or on one rank, nothing changes.

        Args:
            process_group: the EP group; None uses the constructor's, else the whole world.

        Raises:
            ValueError: ``P`` not divisible by the group size, or already set up for a
                group of another size.
        """
        group = process_group if process_group is not None else self.process_group
        if not (dist.is_available() and dist.is_initialized()):
            return
        num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        if self._is_setup:
            if num_ranks != self._ep_size:
                raise ValueError(
                    f"layer already set up for {self._ep_size} expert-parallel ranks, got a group of {num_ranks}"
                )
            return
        lo, hi = self._slot_range(group, strict=True)
        if self._drawn_slots == (0, self.num_physical_experts):
            for name in ("w1", "w3", "w2"):
                old = getattr(self, name)
                setattr(self, name, nn.Parameter(old.detach()[lo:hi].clone(), requires_grad=old.requires_grad))
        elif self._drawn_slots != (lo, hi):
            raise ValueError(
                f"layer was built under torch.distributed holding slots {self._drawn_slots} of"
                f" {self.num_physical_experts}, but this group (rank {rank} of {num_ranks}) needs"
                f" slots {(lo, hi)}: pass the same process_group to the constructor"
            )
        self._drawn_slots = (lo, hi)
        self._ep_group, self._ep_size, self._ep_rank, self._is_setup = group, num_ranks, rank, True
        self.process_group = group
        self._refresh_replica_index()

    def _slot_range(self, group: dist.ProcessGroup | None, strict: bool) -> tuple[int, int]:
        """``(lo, hi)``: the physical slots this rank holds in ``group``; all ``P`` when the
        group cannot hold them and not ``strict``.

        Raises:
            ValueError: with ``strict``, this process outside ``group``, or ``P`` not
                divisible by its size.
        """
        num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0 or self.num_physical_experts % num_ranks:
            if not strict:
                return 0, self.num_physical_experts
            if rank < 0:
                raise ValueError("this process is not a member of the expert-parallel process group")
            raise ValueError(
                f"num_physical_experts ({self.num_physical_experts}) = num_experts ({self.num_logical_experts})"
                f" + num_redundant_experts ({self.num_physical_experts - self.num_logical_experts}) must be"
                f" divisible by the number of expert-parallel ranks ({num_ranks})"
            )
        slots = self.num_physical_experts // num_ranks
        return rank * slots, (rank + 1) * slots

    def expert_tensors(self) -> list[nn.Parameter]:
        """``[w1 (S, F, H), w3 (S, F, H), w2 (S, H, F)]``."""
        return [self.w1, self.w3, self.w2]

    def set_placement(
        self, physical_to_logical: Tensor, logical_to_physical: Tensor, logical_replica_count: Tensor
    ) -> None:
        """Copy a new placement into the buffers in place (moves no weights).

        Args:
            physical_to_logical: ``(P,)`` integer.
            logical_to_physical: ``(E, M)`` integer, -1 padded.
            logical_replica_count: ``(E,)`` integer.

        Raises:
            ValueError: on a shape that does not match the buffers.
        """
        new = (physical_to_logical, logical_to_physical, logical_replica_count)
        old = (self.physical_to_logical, self.logical_to_physical, self.logical_replica_count)
        names = ("physical_to_logical", "logical_to_physical", "logical_replica_count")
        for name, src, dst in zip(names, new, old, strict=True):
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        for src, dst in zip(new, old, strict=True):
            dst.copy_(src)
        self._refresh_replica_index()

    def sync_replica_grads(self) -> None:
        """Sum each expert's gradient over its replicas and write the sum to every replica
        (bit-identical). Expert gradients already leave the backward divided by ``N``
        (DDP's averaging; the factor is folded into the combine's backward), so afterwards
        they are what DDP would give the logical expert.

        Holders of an expert exchange their local sums point-to-point; experts held by many
        ranks go through one all-reduce when that sends fewer bytes (planned per placement
        by :class:`~lightning_eplb._replica_sync.ReplicaIndex`); nothing without replicas.

        Every rank of the EP group must call it once per optimizer step, after backward and
        before gradient clipping and ``optimizer.step()``. Missing gradients become zeros.
        """
        pending, self._pending_sync = self._pending_sync, None
        if pending is None:
            pending = start_sync(self.expert_tensors(), self._replicas, self._ep_group)
        finish_sync(pending, self._replicas)

    def start_replica_grad_sync(
        self, process_group: dist.ProcessGroup | None = None, copies_group: dist.ProcessGroup | None = None
    ) -> None:
        """Start the exchange of :meth:`sync_replica_grads` and return without waiting; the
        next :meth:`sync_replica_grads` completes it. Lets the exchange run during the rest
        of the backward (:class:`~lightning_eplb.EplbCallback` calls it from gradient hooks).
        On CUDA the sums are queued behind the exchange on a side stream, so they too run
        during the backward.

        The gradients must not change until then. Every rank of the EP group calls it in the
        same order relative to its other collectives on ``process_group``.

        Args:
            process_group: a group with the EP group's ranks in the same order (a separate
                communicator lets the exchange overlap the backward's all-to-alls); None:
                the EP group.
            copies_group: with expert parallelism inside data parallelism, the ranks holding
                copies of this rank's slots: the synced gradients are then also averaged
                over it (started behind the sums; the callback passes its DP group).
        """
        if self._pending_sync is None:
            group = process_group if process_group is not None else self._ep_group
            self._pending_sync = start_sync(
                self.expert_tensors(), self._replicas, group, finish_early=True, copies_group=copies_group
            )

    def replica_grad_bytes(self) -> float:
        """Bytes this rank sends per optimizer step to sum the gradients of its replicated
        experts with their other holders, under the placement in force (the sync's plan)."""
        row_bytes = sum(t[0].numel() * t.element_size() for t in self.expert_tensors())
        return self._replicas.sent_rows * row_bytes

    def reset_expert_load(self) -> None:
        """Zero ``expert_load`` in place."""
        self.expert_load.zero_()

    # ------------------------------------------------------------------ helpers
    def _refresh_replica_index(self) -> None:
        """Rebuild the replica-sync plan from the placement buffers (on CPU, once per placement)."""
        self._replicas = ReplicaIndex.build(
            self.physical_to_logical.detach().cpu(),
            self.logical_replica_count.detach().cpu(),
            self._ep_rank,
            self.num_local_experts,
        )

    def gather_logical(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Logical ``(E, ...)`` copies of per-slot tensors (weights, grads, optimizer state).

        Collective when set up on several ranks: every rank of the group calls it and gets
        the same result (an expert's first replica, detached).

        Args:
            tensors: each ``(S, ...)``.

        Returns:
            each ``(E, ...)``.
        """
        first_E = self.logical_to_physical[:, 0]
        out = []
        for t in tensors:
            full = t.detach()
            if self._ep_size > 1:
                parts = [torch.empty_like(full) for _ in range(self._ep_size)]
                dist.all_gather(parts, full.contiguous(), group=self._ep_group)
                full = torch.cat(parts)
            out.append(full.index_select(0, first_E.to(full.device)))
        return out

    def load_logical_experts(self, tensors: Sequence[Tensor]) -> None:
        """Copy logical weights ``[w1 (E, F, H), w3 (E, F, H), w2 (E, H, F)]`` into this
        rank's slots under the current placement (no communication)."""
        lo = self._ep_rank * self.num_local_experts
        local_S = self.physical_to_logical[lo : lo + self.num_local_experts]
        with torch.no_grad():
            for dst, src in zip(self.expert_tensors(), tensors, strict=True):
                dst.copy_(src.to(dst.device).index_select(0, local_S.to(dst.device)))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(..., H)``. Returns: ``(..., H)``.

        Raises:
            RuntimeError: run on several ranks before :meth:`setup_expert_parallel`.
        """
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"input has last dimension {x.shape[-1]}, expected hidden_size ({self.hidden_size})"
            )
        if not self._is_setup and dist.is_available() and dist.is_initialized():
            if dist.get_world_size(self.process_group) > 1:
                raise RuntimeError(
                    "ExpertParallelMoE still holds all slots on a multi-rank run: call "
                    "setup_expert_parallel() (EplbCallback does it in setup) before the first forward"
                )
        # activation checkpointing re-runs the forward in the backward: count tokens once
        counting = self.training and not recomputing()
        if counting and torch.is_grad_enabled():
            self.forward_calls += 1  # host-side; EplbCallback resets it after each backward
        x_TH = x.reshape(-1, self.hidden_size)
        num_tokens, top_k = x_TH.shape[0], self.top_k
        weights_TK, experts_TK = route(
            self.gate(x_TH), top_k, self.num_expert_groups, self.num_limited_groups
        )

        expert_C = experts_TK.reshape(-1)
        order_C, slot_sorted_C, count_P = self._sort_by_slot(expert_C)
        if counting:
            self.expert_load.add_(count_P)

        # expert weight gradients leave the backward divided by N (DDP's averaging): the
        # factor rides on the combine's router-weight multiplication
        grad_scale = 1.0 / self._ep_size
        inv_C = inverse_permutation(order_C)
        x_CH = gather_copies(x_TH, order_C, inv_C, top_k, grad_scale)
        y_CH = self._experts(x_CH, slot_sorted_C, count_P)
        y_TKH = permute_rows(y_CH, inv_C, order_C).view(num_tokens, top_k, -1)
        y_TH = combine(y_TKH, weights_TK.to(y_CH.dtype), grad_scale)
        return y_TH.view(x.shape)

    def _sort_by_slot(self, expert_C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pick a replica for every token copy and sort the copies by slot.

        The ``n``-th copy of expert ``e`` (in flat ``(token, k)`` order) goes to replica
        ``j = (n + rank) % c`` of its ``c`` replicas, so one expert's copies split over its
        replicas within one (the rank offset spreads the remainders over ranks) and the
        choice depends on positions only. One stable sort by expert gives ``n``; a copy's
        place among its slot's copies follows from ``n`` arithmetically (``n + rank = j + c q``
        for consecutive ``q``), so no second sort by slot is needed.

        Args:
            expert_C: ``(C,)`` logical expert of each copy.

        Returns:
            ``order_C``: ``(C,)`` the copies sorted by slot (stable: ``argsort(slot_C,
            stable=True)``); ``slot_sorted_C``: their slots, non-decreasing; ``count_P``:
            ``(P,)`` copies per slot.
        """
        table = self.logical_to_physical.reshape(-1)
        width = self.logical_to_physical.shape[1]
        count_P = torch.zeros(self.num_physical_experts, dtype=torch.int64, device=expert_C.device)
        if self._replicas.num_replicated == 0:  # known on the host: every expert has one slot
            slot_C = table.index_select(0, expert_C * width)
            count_P.index_add_(0, slot_C, torch.ones_like(slot_C))
            order_C = torch.argsort(slot_C, stable=True)
            return order_C, slot_C.index_select(0, order_C), count_P
        num_copies, rank = expert_C.numel(), self._ep_rank
        by_expert_C = torch.argsort(expert_C, stable=True)
        expert_sorted_C = expert_C.index_select(0, by_expert_C)
        experts_E = torch.arange(self.num_logical_experts, device=expert_C.device)
        start_E = torch.searchsorted(expert_sorted_C, experts_E)  # first copy of each expert
        copy_C = torch.arange(num_copies, device=expert_C.device)
        shifted_C = copy_C - start_E.index_select(0, expert_sorted_C) + rank  # n + rank
        replicas_C = self.logical_replica_count.index_select(0, expert_sorted_C)
        replica_C = shifted_C % replicas_C
        slot_C = table.index_select(0, expert_sorted_C * width + replica_C)
        count_P.index_add_(0, slot_C, torch.ones_like(slot_C))
        # the slot's copies have n + rank = j + c q for q = q0, q0 + 1, ...; q0 = ceil((rank - j) / c)
        first_C = torch.div(rank - replica_C + replicas_C - 1, replicas_C, rounding_mode="floor")
        within_C = torch.div(shifted_C, replicas_C, rounding_mode="floor") - first_C
        place_C = (torch.cumsum(count_P, 0) - count_P).index_select(0, slot_C) + within_C
        order_C = torch.empty_like(by_expert_C).scatter_(0, place_C, by_expert_C)
        return order_C, torch.empty_like(slot_C).scatter_(0, place_C, slot_C), count_P

    def _experts(self, x_CH: Tensor, slot_C: Tensor, count_P: Tensor) -> Tensor:
        """Run sorted token copies through their slots, wherever they live.

        Args:
            x_CH: ``(C, H)`` copies sorted by physical slot.
            slot_C: ``(C,)`` their slots (non-decreasing).
            count_P: ``(P,)`` copies per slot.

        Returns:
            ``(C, H)`` expert outputs in the same order.
        """
        backend = resolve_backend(self.expert_backend, x_CH, self.hidden_size, self.ffn_hidden_size)
        weights = (self.w1, self.w3, self.w2)
        num_ranks, slots = self._ep_size, self.num_local_experts
        if num_ranks == 1:
            return grouped_swiglu(x_CH, slot_C, count_P, None, *weights, backend)
        group = self._ep_group
        recv_NS, output_splits, input_splits, slot_counts = exchange_counts(
            count_P.view(num_ranks, slots), group
        )
        x_RH = all_to_all(x_CH, output_splits, input_splits, group)
        perm_R, inv_R, slot_R = slot_order(recv_NS, sum(output_splits))
        y_RH = grouped_swiglu(
            permute_rows(x_RH, perm_R, inv_R), slot_R, recv_NS.sum(0), slot_counts, *weights, backend
        )
        y_RH = permute_rows(y_RH, inv_R, perm_R)
        return all_to_all(y_RH, input_splits, output_splits, group)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"num_experts={self.num_logical_experts}, num_physical_experts={self.num_physical_experts}, "
            f"top_k={self.top_k}, num_expert_groups={self.num_expert_groups}, ep_size={self._ep_size}"
        )
