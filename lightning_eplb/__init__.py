"""lightning_eplb: expert-parallel load balancing for training MoE models with PyTorch Lightning.

Public names are imported lazily so that ``import lightning_eplb`` stays cheap and a
placement-only user never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Placement": "lightning_eplb.placement",
    "rebalance": "lightning_eplb.placement",
    "migrate_experts": "lightning_eplb.migration",
    "MigrationStats": "lightning_eplb.migration",
    "plan_migration": "lightning_eplb.migration",
    "ExpertParallelMoE": "lightning_eplb.moe",
    "BalanceableMoE": "lightning_eplb.protocol",
    "is_balanceable": "lightning_eplb.protocol",
    "optimizer_state_tensors": "lightning_eplb.migration",
    "EplbCallback": "lightning_eplb.callback",
}

__all__ = [
    "BalanceableMoE",
    "EplbCallback",
    "ExpertParallelMoE",
    "MigrationStats",
    "Placement",
    "is_balanceable",
    "migrate_experts",
    "optimizer_state_tensors",
    "plan_migration",
    "rebalance",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from lightning_eplb.callback import EplbCallback
    from lightning_eplb.migration import (
        MigrationStats,
        migrate_experts,
        optimizer_state_tensors,
        plan_migration,
    )
    from lightning_eplb.moe import ExpertParallelMoE
    from lightning_eplb.placement import Placement, rebalance
    from lightning_eplb.protocol import BalanceableMoE, is_balanceable


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_eplb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
