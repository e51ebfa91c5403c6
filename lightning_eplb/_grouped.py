"""SwiGLU over all local expert slots in one grouped matrix multiply.

Shapes: ``R`` token copies sorted by local slot, ``S`` local slots, ``H`` hidden size,
``F`` expert FFN size. Expert ``s`` computes ``w2[s] @ (silu(w1[s] x) * (w3[s] x))``.

Backends (``backend`` argument):
    ``"grouped_mm"``: :func:`torch._grouped_mm` with int32 offsets; on CUDA it is a single
    kernel whose cost follows the token count, not the slot count. Needs bf16 on sm90+ in
    torch 2.11 (fp32 works on CPU in newer torch); sizes ``H`` and ``F`` must keep rows
    16-byte aligned.
    ``"bmm"``: scatter rows into a zero-padded ``(S, C, H)`` buffer, ``C`` = the busiest
    slot's count, and use :func:`torch.bmm`. Any dtype and device; cost ``S * C``.
    ``"loop"``: one matmul per slot (reference only; the benchmark shows why not).
    ``"auto"``: ``grouped_mm`` where :func:`grouped_mm_supported` says so, else ``bmm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "grouped_mm", "bmm", "loop")


def grouped_mm_supported(x: Tensor, hidden_size: int, ffn_hidden_size: int) -> bool:
    """Whether ``torch._grouped_mm`` is present and known to work for this input.

    True on CUDA for bf16 on compute capability >= 9.0 with 16-byte aligned rows.
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if hidden_size % 8 or ffn_hidden_size % 8:
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def resolve_backend(backend: str, x: Tensor, hidden_size: int, ffn_hidden_size: int) -> str:
    """Map ``"auto"`` to a concrete backend for ``x``."""
    if backend == "auto":
        return "grouped_mm" if grouped_mm_supported(x, hidden_size, ffn_hidden_size) else "bmm"
    return backend


def grouped_swiglu(
    x_RH: Tensor,
    slot_R: Tensor,
    count_S: Tensor,
    count_host: list[int] | None,
    w1_SFH: Tensor,
    w3_SFH: Tensor,
    w2_SHF: Tensor,
    backend: str,
) -> Tensor:
    """Apply each slot's SwiGLU expert to its rows.

    Args:
        x_RH: ``(R, H)`` rows sorted by local slot.
        slot_R: ``(R,)`` int64 local slot of every row (non-decreasing).
        count_S: ``(S,)`` int64 rows per slot, on the rows' device.
        count_host: the same counts as a Python list, or None if not on the host yet
            (``bmm`` and ``loop`` then read them: one host synchronisation).
        w1_SFH, w3_SFH: ``(S, F, H)`` gate and up projections.
        w2_SHF: ``(S, H, F)`` down projection.
        backend: ``"grouped_mm"``, ``"bmm"`` or ``"loop"`` (already resolved).

    Returns:
        ``(R, H)`` expert outputs, row for row.
    """
    num_rows = x_RH.shape[0]
    if num_rows == 0:
        # Still run through x and the weights so that autograd (and with it the backward
        # all-to-all) takes the same path on every rank.
        return (F.silu(x_RH @ w1_SFH[0].T) * (x_RH @ w3_SFH[0].T)) @ w2_SHF[0].T
    if backend == "grouped_mm":
        offs_S = torch.cumsum(count_S, 0).to(torch.int32)
        h1 = torch._grouped_mm(x_RH, w1_SFH.transpose(-2, -1), offs=offs_S)
        h3 = torch._grouped_mm(x_RH, w3_SFH.transpose(-2, -1), offs=offs_S)
        act = (F.silu(h1) * h3).contiguous()
        return torch._grouped_mm(act, w2_SHF.transpose(-2, -1), offs=offs_S)
    if count_host is None:
        count_host = count_S.tolist()
    if backend == "loop":
        outs = []
        for s, x_s in enumerate(torch.split(x_RH, count_host)):
            outs.append((F.silu(x_s @ w1_SFH[s].T) * (x_s @ w3_SFH[s].T)) @ w2_SHF[s].T)
        return torch.cat(outs)
    if backend != "bmm":
        raise ValueError(f"expert backend {backend!r} is not one of {BACKENDS}")
    num_slots = len(count_host)
    cap = max(count_host) if count_host else 0
    start_S = torch.cumsum(count_S, 0) - count_S
    pos_R = torch.arange(num_rows, device=x_RH.device) - start_S.index_select(0, slot_R)
    flat_R = slot_R * cap + pos_R
    buf = x_RH.new_zeros(num_slots * cap, x_RH.shape[1]).index_copy(0, flat_R, x_RH)
    buf_SCH = buf.view(num_slots, cap, -1)
    act = F.silu(torch.bmm(buf_SCH, w1_SFH.transpose(1, 2))) * torch.bmm(buf_SCH, w3_SFH.transpose(1, 2))
    out_SCH = torch.bmm(act, w2_SHF.transpose(1, 2))
    return out_SCH.reshape(num_slots * cap, -1).index_select(0, flat_R)
