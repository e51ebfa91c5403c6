"""Top-k router shared by :class:`~lightning_eplb.moe.ExpertParallelMoE` and
:class:`~lightning_eplb.dense.DenseMoE`, so both pick the same experts bit for bit.

Shapes: ``T`` tokens, ``E`` logical experts, ``G`` expert groups, ``K`` = top_k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_routing_args(
    num_experts: int, top_k: int, num_expert_groups: int, num_limited_groups: int | None
) -> int:
    """Validate the router's sizes; return the resolved ``num_limited_groups``.

    Raises:
        ValueError: naming the offending value and the rule it breaks.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts ({num_experts}) must be >= 1")
    if top_k < 1:
        raise ValueError(f"top_k ({top_k}) must be >= 1")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    if num_expert_groups < 1:
        raise ValueError(f"num_expert_groups ({num_expert_groups}) must be >= 1")
    if num_experts % num_expert_groups:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by num_expert_groups ({num_expert_groups})"
        )
    limited = max(1, num_expert_groups // 2) if num_limited_groups is None else int(num_limited_groups)
    if not 1 <= limited <= num_expert_groups:
        raise ValueError(
            f"num_limited_groups ({limited}) must lie in [1, num_expert_groups={num_expert_groups}]"
        )
    per_group = num_experts // num_expert_groups
    if num_expert_groups > 1 and top_k > limited * per_group:
        raise ValueError(
            f"top_k ({top_k}) must be <= num_limited_groups ({limited}) * experts per group ({per_group})"
        )
    return limited


def route(
    logits: Tensor, top_k: int, num_expert_groups: int = 1, num_limited_groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Softmax over experts, optional group limit, top-k, weights renormalised to sum to one.

    Group-limited routing (``num_expert_groups > 1``, DeepSeek-V2 style): experts form
    ``G`` contiguous groups of ``E // G``; a group's score is the **max** softmax score of
    its experts; each token keeps its ``num_limited_groups`` best groups and picks its top-k
    experts among them. Ties are broken by :func:`torch.topk`, identically for every caller.

    Args:
        logits: ``(T, E)`` router logits.
        top_k: ``K`` experts per token.
        num_expert_groups: ``G``.
        num_limited_groups: groups each token may use (ignored when ``G == 1``).

    Returns:
        ``(weights, experts)``: ``(T, K)`` weights in ``promote(logits.dtype, float32)``
        summing to one per token, and ``(T, K)`` int64 logical expert ids.
    """
    score_dtype = torch.promote_types(logits.dtype, torch.float32)
    scores_TE = torch.softmax(logits.to(score_dtype), dim=-1)
    choose_TE = scores_TE
    if num_expert_groups > 1:
        num_tokens, num_experts = scores_TE.shape
        group_TG = scores_TE.view(num_tokens, num_expert_groups, -1).amax(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, torch.topk(group_TG, num_limited_groups, dim=-1).indices, True)
        keep_TE = keep_TG.repeat_interleave(num_experts // num_expert_groups, dim=1)
        choose_TE = scores_TE.masked_fill(~keep_TE, -1.0)  # softmax scores are >= 0
    experts_TK = torch.topk(choose_TE, top_k, dim=-1).indices
    weights_TK = torch.gather(scores_TE, 1, experts_TK)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, experts_TK
