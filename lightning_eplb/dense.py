"""A plain single-device MoE with the same router and experts as
:class:`~lightning_eplb.moe.ExpertParallelMoE`, one loop over logical experts.

It is the reference the expert-parallel layer is tested against, and the model a
placement-free checkpoint loads into. Shapes: ``T`` tokens, ``H`` hidden size, ``F``
expert FFN size, ``E`` logical experts, ``K`` = top_k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eplb._routing import check_routing_args, route

if TYPE_CHECKING:  # pragma: no cover
    from lightning_eplb.moe import ExpertParallelMoE

__all__ = ["DenseMoE", "init_logical_experts"]


def init_logical_experts(
    num_experts: int, hidden_size: int, ffn_hidden_size: int, seed: int, experts: Sequence[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw logical expert weights (CPU, float32), each expert from its own generator
    seeded with ``seed`` and its id.

    Uniform in ``±1/sqrt(fan_in)`` like :class:`torch.nn.Linear`. Expert ``e``'s weights
    depend on ``seed`` and ``e`` only: never on the number of ranks, nor on which other
    experts are drawn, so a rank can draw just the experts it holds.

    Args:
        num_experts: ``E``.
        hidden_size: ``H``.
        ffn_hidden_size: ``F``.
        seed: the layer's seed.
        experts: which experts to draw, in this order (default: all ``E``).

    Returns:
        ``(w1, w3, w2)``: ``(X, F, H)``, ``(X, F, H)``, ``(X, H, F)``, ``X = len(experts)``.
    """
    ids = list(range(num_experts)) if experts is None else [int(e) for e in experts]
    for e in ids:
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} is outside [0, num_experts={num_experts})")
    bound_h, bound_f = 1.0 / math.sqrt(hidden_size), 1.0 / math.sqrt(ffn_hidden_size)
    # explicit: under a device or default-dtype context (Lightning's configure_model) too
    cpu: dict = {"device": "cpu", "dtype": torch.float32}
    w1 = torch.empty(len(ids), ffn_hidden_size, hidden_size, **cpu)
    w3 = torch.empty(len(ids), ffn_hidden_size, hidden_size, **cpu)
    w2 = torch.empty(len(ids), hidden_size, ffn_hidden_size, **cpu)
    for i, e in enumerate(ids):
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + e) % 2**63)
        for w, bound in ((w1, bound_h), (w3, bound_h), (w2, bound_f)):
            w[i].uniform_(-bound, bound, generator=gen)
    return w1, w3, w2


class DenseMoE(nn.Module):
    """Single-device MoE: router ``gate``, SwiGLU experts ``w2 @ (silu(w1 x) * (w3 x))``.

    Args:
        hidden_size: ``H``.
        ffn_hidden_size: ``F``.
        num_experts: ``E``.
        top_k: experts per token.
        num_expert_groups: groups for group-limited routing (see
            :func:`lightning_eplb._routing.route`).
        num_limited_groups: groups each token may use; default ``max(1, G // 2)``.
        init_seed: seed of the expert weights (same draw as ``ExpertParallelMoE``); None
            draws one from torch's global RNG.

    Parameters ``gate.weight (E, H)``, ``w1 (E, F, H)``, ``w3 (E, F, H)``, ``w2 (E, H, F)``.

    Example:
        >>> moe = DenseMoE(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2, init_seed=0)
        >>> moe(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        num_expert_groups: int = 1,
        *,
        num_limited_groups: int | None = None,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or ffn_hidden_size < 1:
            raise ValueError(
                f"hidden_size ({hidden_size}) and ffn_hidden_size ({ffn_hidden_size}) must be >= 1"
            )
        self.num_limited_groups = check_routing_args(
            num_experts, top_k, num_expert_groups, num_limited_groups
        )
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k, self.num_expert_groups = num_experts, top_k, num_expert_groups
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**62, (1,)).item())
        w1, w3, w2 = init_logical_experts(num_experts, hidden_size, ffn_hidden_size, init_seed)
        device, dtype = self.gate.weight.device, self.gate.weight.dtype
        self.w1, self.w3, self.w2 = (nn.Parameter(w.to(device, dtype)) for w in (w1, w3, w2))

    @classmethod
    def from_expert_parallel(cls, layer: ExpertParallelMoE) -> DenseMoE:
        """A dense copy of ``layer``'s logical weights (collective when ``layer`` is sharded:
        every rank of its group must call it). Same dtype and device as ``layer``."""
        dense = cls(
            layer.hidden_size,
            layer.ffn_hidden_size,
            layer.num_logical_experts,
            layer.top_k,
            layer.num_expert_groups,
            num_limited_groups=layer.num_limited_groups,
            init_seed=0,
        ).to(device=layer.w1.device, dtype=layer.w1.dtype)
        w1, w3, w2 = layer.gather_logical(layer.expert_tensors())
        with torch.no_grad():
            dense.gate.weight.copy_(layer.gate.weight)
            dense.w1.copy_(w1)
            dense.w3.copy_(w3)
            dense.w2.copy_(w2)
        return dense

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(..., H)``. Returns: ``(..., H)``."""
        x_TH = x.reshape(-1, self.hidden_size)
        weights_TK, experts_TK = route(
            self.gate(x_TH), self.top_k, self.num_expert_groups, self.num_limited_groups
        )
        weights_TK = weights_TK.to(x_TH.dtype)
        out_TH = torch.zeros_like(x_TH)
        for e in range(self.num_experts):
            token_idx, k_idx = (experts_TK == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            x_e = x_TH[token_idx]
            y_e = (F.silu(x_e @ self.w1[e].T) * (x_e @ self.w3[e].T)) @ self.w2[e].T
            out_TH = out_TH.index_add(0, token_idx, y_e * weights_TK[token_idx, k_idx].unsqueeze(-1))
        return out_TH.view(x.shape)
