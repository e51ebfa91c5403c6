"""Checks that run inside ``load_state_dict``, before a checkpoint's weights reach the layers.

Lightning loads the model weights before any callback sees the checkpoint, so these checks
are a load-state-dict pre-hook on the LightningModule (installed by the callback's ``setup``
through :func:`install_load_checks`). Shapes: ``E`` logical experts, ``S`` local slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["install_load_checks"]


def _tensor_names(layer: Any) -> list[str]:
    """Attribute names (relative to ``layer``) of ``layer.expert_tensors()``, in that order."""
    names = {id(p): n for n, p in layer.named_parameters()}
    out = []
    for t in layer.expert_tensors():
        if id(t) not in names:
            raise ValueError(f"an expert tensor of {type(layer).__name__} is not one of its parameters")
        out.append(names[id(t)])
    return out


def install_load_checks(module: torch.nn.Module, layers: Sequence[tuple[str, Any]]) -> None:
    """Make ``module.load_state_dict`` check the balanced layers' entries first, with clear errors.

    Lightning loads the model weights before any callback sees the checkpoint, so a
    checkpoint of another model shape would otherwise fail inside ``load_state_dict`` (or,
    with ``strict_loading=False``, not at all). The hook accepts an expert tensor in logical
    ``(E, ...)`` or local ``(S, ...)`` layout and raises ``ValueError`` naming the key and
    the sizes that differ. Idempotent.

    Args:
        module: the root module (the LightningModule) whose ``state_dict`` keys are relative to it.
        layers: ``(qualified name, layer)`` of its balanced layers.
    """
    for wrapped in module._load_state_dict_pre_hooks.values():
        hook = getattr(wrapped, "hook", None)
        if isinstance(hook, _LoadChecks):
            hook.layer_names = [name for name, _ in layers]
            return
    # the private spelling: the public register_load_state_dict_pre_hook needs torch >= 2.5
    module._register_load_state_dict_pre_hook(_LoadChecks([name for name, _ in layers]), with_module=True)


class _LoadChecks:
    """The pre-hook of :func:`install_load_checks`; a class (not a closure) so the module still pickles."""

    def __init__(self, layer_names: list[str]) -> None:
        self.layer_names = layer_names

    def __call__(
        self,
        module: torch.nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        layers = [(name, module.get_submodule(name)) for name in self.layer_names]
        _check_layer_entries(state_dict, prefix, layers)


def _check_layer_entries(state_dict: dict[str, Any], prefix: str, layers: Sequence[tuple[str, Any]]) -> None:
    """Raise ``ValueError`` on balanced-layer entries that cannot belong to this model.

    A balanced layer in the checkpoint is recognised by its ``physical_to_logical`` buffer.
    A checkpoint without any (say a dense model's) is only checked for shapes, so partial
    loads with ``strict=False`` keep working (torch gives hooks ``strict=True`` always, so
    missing entries of such a checkpoint are left to ``load_state_dict`` itself).
    """
    known = {f"{prefix}{name}." if name else prefix for name, _ in layers}
    marker = "physical_to_logical"
    saved = {k[: -len(marker)] for k in state_dict if k.endswith(marker) and k.startswith(prefix)}
    extra = sorted(saved - known)
    if extra:
        raise ValueError(
            f"the checkpoint has MoE layers the model lacks: {[k.rstrip('.') for k in extra]} "
            f"(the model's balanced layers: {[n for n, _ in layers]})"
        )
    for name, layer in layers:
        base = f"{prefix}{name}." if name else prefix
        if saved and base not in saved:
            raise ValueError(
                f"the checkpoint lacks the MoE layer {name!r} (it holds {[k.rstrip('.') for k in sorted(saved)]})"
            )
        num_logical = int(layer.num_logical_experts)
        for tname, param in zip(_tensor_names(layer), layer.expert_tensors(), strict=True):
            key = base + tname
            value = state_dict.get(key)
            if value is None:
                if saved:
                    raise ValueError(
                        f"the checkpoint misses the expert tensor {key!r} of shape {(num_logical, *param.shape[1:])}"
                    )
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, expected a tensor")
            if tuple(value.shape[1:]) != tuple(param.shape[1:]) or value.shape[0] not in (
                num_logical,
                param.shape[0],
            ):
                raise ValueError(
                    f"{key}: the checkpoint holds shape {tuple(value.shape)}, the model needs logical "
                    f"{(num_logical, *param.shape[1:])} (num_experts={num_logical}, then the per-expert shape) "
                    f"or this rank's slots {tuple(param.shape)}"
                )
