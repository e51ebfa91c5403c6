"""DeepSeek's published EPLB algorithm, vectorised over layers.

Reproduces the outputs of ``rebalance_experts`` in DeepSeek's ``eplb.py`` (same arithmetic in
float32, same sort and tie-breaking), but loops over items with all layers at once instead
of over layers times items in Python.

Shapes: ``L`` layers, ``E`` logical experts, ``P`` physical slots, ``N`` ranks, ``G`` expert
groups, ``M`` nodes; ``B`` is a batch of independent rows (layers, or layers times nodes).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["deepseek_placement"]


def _sort_descending(weight_BX: np.ndarray) -> np.ndarray:
    # torch's CPU sort breaks ties in its own (unstable) way: use it so that ties go where
    # the reference puts them.
    return torch.from_numpy(np.ascontiguousarray(weight_BX)).sort(-1, descending=True).indices.numpy()


def _greedy_pack(weight_BX: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``X`` items into ``num_packs`` packs of ``X // num_packs`` items each.

    Items are taken heaviest first and each goes to the lightest pack that still has room
    (lowest index on ties).

    Args:
        weight_BX: ``(B, X)`` float32 item weights.
        num_packs: packs per row; divides ``X``.

    Returns:
        ``(pack_BX, rank_in_pack_BX)``: ``(B, X)`` int64 pack of each item and its position
        in the pack (order of arrival).
    """
    num_rows, num_items = weight_BX.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack_BX = np.broadcast_to(np.arange(num_items), (num_rows, num_items)).copy()
        return pack_BX, np.zeros((num_rows, num_items), dtype=np.int64)
    order_BX = _sort_descending(weight_BX)
    rows = np.arange(num_rows)
    pack_weight_BK = np.zeros((num_rows, num_packs), dtype=np.float32)
    pack_items_BK = np.zeros((num_rows, num_packs), dtype=np.int64)
    pack_BX = np.empty((num_rows, num_items), dtype=np.int64)
    rank_BX = np.empty((num_rows, num_items), dtype=np.int64)
    for k in range(num_items):
        item_B = order_BX[:, k]
        open_weight_BK = np.where(pack_items_BK < per_pack, pack_weight_BK, np.float32(np.inf))
        pack_B = open_weight_BK.argmin(axis=1)
        pack_BX[rows, item_B] = pack_B
        rank_BX[rows, item_B] = pack_items_BK[rows, pack_B]
        pack_weight_BK[rows, pack_B] += weight_BX[rows, item_B]
        pack_items_BK[rows, pack_B] += 1
    return pack_BX, rank_BX


def _replicate(weight_BE: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Give each extra slot to the expert with the highest load per replica.

    Args:
        weight_BE: ``(B, E)`` float32 loads.
        num_physical: slots per row ``P >= E``.

    Returns:
        ``(phy2log_BP, count_BE)``: slot ``p < E`` holds expert ``p``, later slots the
        chosen experts in order; replica counts.
    """
    num_rows, num_logical = weight_BE.shape
    weight = torch.from_numpy(weight_BE)
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(num_rows, 1)
    count = torch.ones(num_rows, num_logical, dtype=torch.int64)
    rows = torch.arange(num_rows)
    for slot in range(num_logical, num_physical):
        chosen = (weight / count).max(dim=-1).indices
        phy2log[:, slot] = chosen
        count[rows, chosen] += 1
    return phy2log.numpy(), count.numpy()


def _inverse(perm_BX: np.ndarray) -> np.ndarray:
    inv_BX = np.empty_like(perm_BX)
    np.put_along_axis(inv_BX, perm_BX, np.broadcast_to(np.arange(perm_BX.shape[1]), perm_BX.shape), axis=1)
    return inv_BX


def deepseek_placement(
    load_LE: np.ndarray, num_physical: int, num_ranks: int, num_groups: int, num_nodes: int
) -> np.ndarray:
    """DeepSeek's hierarchical EPLB (call with one group and one node for the global one).

    Groups are packed onto nodes (equal group counts), replicas are made within each node
    by repeatedly replicating the expert with the highest load per replica, and replicas
    are packed onto the node's ranks, heaviest first into the lightest rank with room.

    Args:
        load_LE: ``(L, E)`` float64 loads.
        num_physical: ``P``, divisible by ``num_ranks``.
        num_ranks: ``N``, divisible by ``num_nodes``.
        num_groups: ``G``, divides ``E`` and is divisible by ``num_nodes``.
        num_nodes: ``M``.

    Returns:
        ``(L, P)`` int64 physical-to-logical map.
    """
    weight_LE = load_LE.astype(np.float32)
    num_layers, num_logical = weight_LE.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_rank = num_physical // num_ranks

    # 1. groups onto nodes; node-major order of logical experts ("mlog")
    group_load_LG = weight_LE.reshape(num_layers, num_groups, group_size).sum(-1, dtype=np.float32)
    node_LG, rank_in_node_LG = _greedy_pack(group_load_LG, num_nodes)
    first_LG = (node_LG * groups_per_node + rank_in_node_LG) * group_size
    log2mlog_LE = (first_LG[:, :, None] + np.arange(group_size)).reshape(num_layers, num_logical)
    mlog2log_LE = _inverse(log2mlog_LE)

    # 2. replicas within each node: rows are (layer, node)
    mload_BE = np.take_along_axis(weight_LE, mlog2log_LE, axis=1).reshape(-1, experts_per_node)
    phy2mlog_BP, mcount_BE = _replicate(mload_BE, num_physical // num_nodes)

    # 3. replicas onto the node's ranks
    per_replica_BE = (torch.from_numpy(mload_BE) / torch.from_numpy(mcount_BE)).numpy()
    replica_load_BP = np.take_along_axis(per_replica_BE, phy2mlog_BP, axis=1)
    rank_BP, local_BP = _greedy_pack(replica_load_BP, num_ranks // num_nodes)
    pphy2phy_BP = _inverse(rank_BP * slots_per_rank + local_BP)
    pphy2mlog_BP = np.take_along_axis(phy2mlog_BP, pphy2phy_BP, axis=1)
    offset_M = np.arange(num_nodes) * experts_per_node
    pphy2mlog_LP = (pphy2mlog_BP.reshape(num_layers, num_nodes, -1) + offset_M[None, :, None]).reshape(
        num_layers, num_physical
    )
    return np.take_along_axis(mlog2log_LE, pphy2mlog_LP, axis=1)
