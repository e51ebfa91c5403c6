"""Placement-free checkpoints: expert weights and optimizer state in logical layout.

Under expert parallelism every rank holds different experts, but Lightning writes rank 0's
state only. :func:`save_expert_state` (run on every rank from the callback's
``on_save_checkpoint``) gathers each balanced layer's expert tensors, and the optimizer
state shaped like them, into one copy per logical expert ``(E, ...)``; only rank 0's copy
is written. :func:`load_expert_state` (from ``on_load_checkpoint``, after the model weights
were loaded and before the optimizers are restored) turns the optimizer state back into
this rank's slots ``(S, ...)`` under the current placement. Model weights go through the
layer's own load pre-hook, which accepts logical tensors.

Shapes (suffixes used in names below):
    E: logical experts per layer     P: physical slots (E + redundant)
    N: expert-parallel ranks         S = P // N: slots on one rank
    L: balanced layers

Physical slot ``p`` lives on rank ``p // S`` at local index ``p % S``.

Memory: :func:`gather_logical` all-gathers one tensor of one layer at a time (in chunks of
at most :data:`GATHER_BUFFER_BYTES`), so the accelerator's transient buffer is about
``min(P x one expert's slice of that tensor, GATHER_BUFFER_BYTES)``; the logical results go
to CPU as they are made, so host memory ends up holding every expert tensor and its
optimizer state once, on every rank, until the checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb._load_checks import _tensor_names, install_load_checks
from lightning_eplb._logical import _world, gather_logical, scatter_logical

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

__all__ = [
    "FORMAT_VERSION",
    "check_compatible",
    "gather_logical",
    "install_load_checks",
    "load_expert_state",
    "save_expert_state",
    "scatter_logical",
    "to_dense_state_dict",
]

FORMAT_VERSION = 1
"""Version of the ``checkpoint["eplb"]`` metadata written by :func:`save_expert_state`."""

_KEY = "eplb"

GATHER_BUFFER_BYTES = 256 * 2**20
"""Default bound on the transient gather buffers of :func:`save_expert_state` (256 MiB)."""

# ---------------------------------------------------------------------------- Lightning glue
_PLACEMENT_BUFFERS = ("physical_to_logical", "logical_to_physical", "logical_replica_count", "expert_load")
_LAYOUT_MARKER = "eplb_layout"  # lightning_eplb._moe_state.EPLB_LAYOUT_KEY


def _understands_layout_marker(layer: Any) -> bool:
    from lightning_eplb.moe import ExpertParallelMoE

    return isinstance(layer, ExpertParallelMoE)


def _layers(callback: Any) -> list[tuple[str, Any]]:
    layers = getattr(callback, "layers", None)
    if layers is None:
        raise ValueError(
            "the callback has no `layers`: call save/load_expert_state after the callback's setup"
        )
    return [(str(name), layer) for name, layer in layers]


def _group(layer: Any) -> dist.ProcessGroup | None:
    return getattr(layer, "process_group", None)


def _state_split(state: dict[str, Any], param: Tensor, where: str) -> tuple[list[str], str | None]:
    """Keys of ``state`` shaped like ``param``; an error text for state that cannot be converted.

    Same rule as :func:`lightning_eplb.migration.optimizer_state_tensors`: parameter-shaped
    tensors are per slot, one-element tensors and non-tensors (``step``) are shared.
    """
    keys = []
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        if value.shape == param.shape:
            keys.append(key)
        elif value.numel() != 1:
            return keys, (
                f"{where}: optimizer state {key!r} has shape {tuple(value.shape)}, neither a scalar nor the "
                f"parameter's shape {tuple(param.shape)}; per-expert state of another shape cannot be converted"
            )
    return sorted(keys, key=str), None


def _optimizer_param_index(optimizer: Any) -> dict[int, int]:
    """``id(param) -> index`` as ``torch.optim.Optimizer.state_dict()`` numbers parameters."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    index: dict[int, int] = {}
    start = 0
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"], start):
            index.setdefault(id(p), i)
        start += len(group["params"])
    return index


def save_expert_state(
    callback: Any,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    checkpoint: dict,
    *,
    max_buffer_bytes: int | None = GATHER_BUFFER_BYTES,
) -> None:
    """Rewrite a checkpoint's expert weights and optimizer state into logical layout, in place.

    Collective: runs on every rank (Lightning calls ``on_save_checkpoint`` on all ranks; only
    rank 0 writes the file). Layer by layer, tensor by tensor, it replaces
    ``checkpoint["state_dict"][f"{layer}.{tensor}"]`` (local ``(S, ...)``) by the logical
    ``(E, ...)`` tensor on CPU, and likewise every parameter-shaped entry (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``, ...) of ``checkpoint["optimizer_states"][i]["state"]``;
    scalar entries such as ``step`` stay. The live model and optimizer are not touched.
    Adds ``checkpoint["eplb"]``::

        {"format_version": 1, "world_size": N, "placement": (L, P) int64,
         "layers": [{"name", "num_logical", "num_physical", "tensors": {tensor: logical shape},
                     "buffers": [placement buffer names]}],
         "optimizers": [[{"index", "layer", "tensor"}, ...] per optimizer]}

    where ``index`` numbers the optimizer's parameters as ``optimizer.state_dict()`` does.

    Args:
        callback: has ``layers``, a list of ``(qualified name, layer)`` of the balanced layers.
        trainer: its ``optimizers`` produced ``checkpoint["optimizer_states"]``.
        pl_module: the LightningModule whose ``state_dict()`` is ``checkpoint["state_dict"]``.
        checkpoint: Lightning's checkpoint dict, modified in place.
        max_buffer_bytes: bound on the transient gather buffers on the accelerator (see
            :func:`gather_logical`); results go to CPU memory.

    Raises:
        ValueError: if an expert tensor's key is missing from ``checkpoint["state_dict"]`` or
            optimizer state of an unsupported shape is found (on every rank alike).
    """
    if _KEY in checkpoint:
        return  # already converted (a second on_save_checkpoint on the same dict)
    layers = _layers(callback)
    state_dict = checkpoint.get("state_dict")
    if state_dict is None:
        raise ValueError("checkpoint has no 'state_dict'; cannot convert expert weights")
    num_ranks = 1
    meta_layers: list[dict[str, Any]] = []
    params: list[tuple[str, str, torch.nn.Module, Tensor]] = []  # (layer, tensor, layer module, param)
    for name, layer in layers:
        group = _group(layer)
        num_ranks, _ = _world(group)
        p2l_P = layer.physical_to_logical
        E = int(layer.num_logical_experts)
        shapes: dict[str, list[int]] = {}
        for tname, param in zip(_tensor_names(layer), layer.expert_tensors(), strict=True):
            key = f"{name}.{tname}" if name else tname
            if key not in state_dict:
                raise ValueError(
                    f"expert tensor {key!r} is not in checkpoint['state_dict'] (keys like {sorted(state_dict)[:3]}); "
                    "the LightningModule's state_dict must use the module's own parameter names"
                )
            state_dict[key] = gather_logical(
                param, p2l_P, group, num_logical=E, out_device="cpu", max_buffer_bytes=max_buffer_bytes
            )
            shapes[tname] = [E, *param.shape[1:]]
            params.append((name, tname, layer, param))
        buffers = [b for b, _ in layer.named_buffers(recurse=False) if b in _PLACEMENT_BUFFERS]
        if _understands_layout_marker(layer):
            # tells the layer's load pre-hook that w1/w3/w2 are logical even when E == S
            state_dict[f"{name}.{_LAYOUT_MARKER}" if name else _LAYOUT_MARKER] = "logical"
            buffers.append(_LAYOUT_MARKER)
        meta_layers.append(
            {
                "name": name,
                "num_logical": int(layer.num_logical_experts),
                "num_physical": int(layer.num_physical_experts),
                "tensors": shapes,
                "buffers": buffers,
            }
        )
    meta_opts = _save_optimizer_states(trainer, checkpoint, params, max_buffer_bytes)
    placement = (
        torch.stack([layer.physical_to_logical.detach().to("cpu", torch.int64) for _, layer in layers])
        if layers and len({int(layer.num_physical_experts) for _, layer in layers}) == 1
        else [layer.physical_to_logical.detach().to("cpu", torch.int64) for _, layer in layers]
    )
    checkpoint[_KEY] = {
        "format_version": FORMAT_VERSION,
        "world_size": num_ranks,
        "placement": placement,
        "layers": meta_layers,
        "optimizers": meta_opts,
    }


def _save_optimizer_states(
    trainer: Any,
    checkpoint: dict,
    params: Sequence[tuple[str, str, Any, Tensor]],
    max_buffer_bytes: int | None,
) -> list[list[dict[str, Any]]]:
    """Convert the parameter-shaped optimizer state of every expert tensor; return its index table."""
    opt_states = checkpoint.get("optimizer_states")
    optimizers = list(getattr(trainer, "optimizers", []) or [])
    meta: list[list[dict[str, Any]]] = []
    if opt_states is None:
        return meta
    if len(opt_states) != len(optimizers):
        raise ValueError(
            f"checkpoint has {len(opt_states)} optimizer states but the trainer has {len(optimizers)} optimizers"
        )
    for opt_i, (optimizer, opt_state) in enumerate(zip(optimizers, opt_states, strict=True)):
        index = _optimizer_param_index(optimizer)
        state = opt_state.get("state", {})
        entries, todo = [], []
        local_keys: list[list[str]] = []
        error = None
        for layer_name, tname, layer, param in params:
            if id(param) not in index:
                continue  # not trained by this optimizer
            i = index[id(param)]
            entries.append({"index": i, "layer": layer_name, "tensor": tname})
            keys, err = _state_split(state.get(i, {}), param, f"optimizer {opt_i}, {layer_name}.{tname}")
            error = error or err
            local_keys.append(keys)
            todo.append((i, layer, param))
        # Agree on the state keys of every tensor (a rank whose slots never got a gradient may
        # lack state) and on errors, so that no rank leaves the collectives early.
        union_keys, error = _agree(local_keys, error, _group(todo[0][1]) if todo else None)
        if error is not None:
            raise ValueError(error)
        for (i, layer, param), keys in zip(todo, union_keys, strict=True):
            if not keys:
                continue
            # torch's state_dict() shares each parameter's state dict with the live optimizer:
            # write into a copy, never into the optimizer.
            entry = dict(state.get(i, {}))
            state[i] = entry
            for key in keys:
                local = entry.get(key)
                if local is None:
                    local = torch.zeros_like(param)
                entry[key] = gather_logical(
                    local,
                    layer.physical_to_logical,
                    _group(layer),
                    num_logical=layer.num_logical_experts,
                    out_device="cpu",
                    max_buffer_bytes=max_buffer_bytes,
                )
        meta.append(entries)
    return meta


def _agree(
    local_keys: list[list[str]], error: str | None, group: dist.ProcessGroup | None
) -> tuple[list[list[str]], str | None]:
    """Union of every rank's state keys per tensor and the first error of any rank."""
    num_ranks, _ = _world(group)
    if num_ranks == 1:
        return local_keys, error
    everyone: list[Any] = [None] * num_ranks
    dist.all_gather_object(everyone, (local_keys, error), group=group)
    union = [sorted(set().union(*(keys[t] for keys, _ in everyone))) for t in range(len(local_keys))]
    errors = [err for _, err in everyone if err is not None]
    return union, (errors[0] if errors else None)


def load_expert_state(
    callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
) -> None:
    """Check a placement-free checkpoint against the model and put its optimizer state into
    this rank's slots, in place.

    Lightning calls the callback's ``on_load_checkpoint`` after the model weights were
    loaded (the layers' load pre-hooks already picked this rank's slots out of the logical
    weights) and before the optimizers are restored; this turns every logical ``(E, ...)``
    entry of ``checkpoint["optimizer_states"]`` that belongs to an expert tensor into the
    local ``(S, ...)`` layout of the layer's *current* ``physical_to_logical``, so that
    Lightning's ordinary optimizer restore loads it. Local: no communication. The checks
    read only the checkpoint and the model, so every rank fails or passes alike.

    Args:
        callback: has ``layers``, a list of ``(qualified name, layer)`` of the balanced layers.
        trainer: unused; part of the hook's signature.
        pl_module: unused; part of the hook's signature.
        checkpoint: the loaded checkpoint dict, modified in place.

    Raises:
        ValueError: naming what differs, if the checkpoint was not saved with
            :func:`save_expert_state`, has another format version, other layer names,
            another number of experts or other expert tensor shapes, or misses entries.
    """
    meta = checkpoint.get(_KEY)
    if meta is None:
        raise ValueError(
            "checkpoint has no 'eplb' entry: it was not saved with EplbCallback (or was saved with "
            "weights_only=True), so it holds rank 0's experts only; save it with the callback attached"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint['eplb'] has format_version {meta.get('format_version')!r}, this version of "
            f"lightning_eplb reads {FORMAT_VERSION}"
        )
    if meta.get("_converted"):
        return  # this dict was converted already
    layers = dict(_layers(callback))
    check_compatible(meta, _layers(callback), checkpoint.get("state_dict"))
    opt_states = checkpoint.get("optimizer_states")
    if opt_states is not None:
        saved = meta.get("optimizers", [])
        if len(saved) != len(opt_states):
            raise ValueError(
                f"checkpoint['eplb'] lists expert tensors for {len(saved)} optimizers but the checkpoint holds "
                f"{len(opt_states)} optimizer states"
            )
        shapes = {(m["name"], t): tuple(s) for m in meta["layers"] for t, s in m["tensors"].items()}
        for opt_i, (entries, opt_state) in enumerate(zip(saved, opt_states, strict=True)):
            state = opt_state.get("state", {})
            for entry in entries:
                layer = layers[entry["layer"]]
                num_ranks, rank = _world(_group(layer))
                logical_shape = shapes[(entry["layer"], entry["tensor"])]
                for key, value in state.get(entry["index"], {}).items():
                    if not isinstance(value, Tensor) or (
                        value.numel() == 1 and tuple(value.shape) != logical_shape
                    ):
                        continue
                    if tuple(value.shape) != logical_shape:
                        raise ValueError(
                            f"optimizer {opt_i}, {entry['layer']}.{entry['tensor']}: state {key!r} has shape "
                            f"{tuple(value.shape)}, expected the logical shape {logical_shape}"
                        )
                    state[entry["index"]][key] = scatter_logical(
                        value, layer.physical_to_logical, rank, num_ranks
                    )
    meta["_converted"] = True


def check_compatible(meta: dict, layers: Sequence[tuple[str, Any]], state_dict: dict | None = None) -> None:
    """Raise ``ValueError`` naming the first difference between checkpoint metadata and the model.

    Args:
        meta: ``checkpoint["eplb"]`` as written by :func:`save_expert_state`.
        layers: ``(qualified name, layer)`` of the model's balanced layers.
        state_dict: ``checkpoint["state_dict"]``; when given, its expert entries must be
            present and logical ``(E, ...)``.
    """
    saved = {m["name"]: m for m in meta.get("layers", [])}
    current = [name for name, _ in layers]
    if list(saved) != current:
        missing = [n for n in current if n not in saved]
        extra = [n for n in saved if n not in current]
        raise ValueError(
            f"checkpoint has {len(saved)} balanced MoE layers {list(saved)}, the model has {len(current)} "
            f"{current}"
            + (f"; missing from the checkpoint: {missing}" if missing else "")
            + (f"; not in the model: {extra}" if extra else "")
        )
    for name, layer in layers:
        m = saved[name]
        if int(m["num_logical"]) != int(layer.num_logical_experts):
            raise ValueError(
                f"layer {name!r}: checkpoint has num_logical_experts={m['num_logical']}, "
                f"the model has {layer.num_logical_experts}"
            )
        tensors = dict(zip(_tensor_names(layer), layer.expert_tensors(), strict=True))
        if sorted(m["tensors"]) != sorted(tensors):
            raise ValueError(
                f"layer {name!r}: checkpoint has expert tensors {sorted(m['tensors'])}, the model has {sorted(tensors)}"
            )
        for tname, param in tensors.items():
            expected = (int(layer.num_logical_experts), *param.shape[1:])
            if tuple(m["tensors"][tname]) != expected:
                raise ValueError(
                    f"{name}.{tname}: checkpoint has logical shape {tuple(m['tensors'][tname])}, the model needs "
                    f"{expected} (E, then the per-expert shape)"
                )
            if state_dict is not None:
                key = f"{name}.{tname}" if name else tname
                if key not in state_dict:
                    raise ValueError(f"checkpoint['state_dict'] misses the expert tensor {key!r}")
                if tuple(state_dict[key].shape) != expected:
                    raise ValueError(
                        f"checkpoint['state_dict'][{key!r}] has shape {tuple(state_dict[key].shape)}, "
                        f"expected the logical shape {expected}"
                    )


def to_dense_state_dict(checkpoint: dict) -> dict[str, Any]:
    """The checkpoint's model state without the placement entries of the balanced layers.

    What remains loads into the same model with every
    :class:`~lightning_eplb.ExpertParallelMoE` replaced by a
    :class:`~lightning_eplb.dense.DenseMoE` of the same sizes (same parameter names
    ``gate.weight (E, H)``, ``w1 (E, F, H)``, ``w3 (E, F, H)``, ``w2 (E, H, F)``).

    Args:
        checkpoint: a checkpoint written with :func:`save_expert_state`.

    Returns:
        A new dict: ``checkpoint["state_dict"]`` less each balanced layer's placement buffers
        and layout marker. Tensors are shared, not copied.

    Raises:
        ValueError: if the checkpoint has no ``"eplb"`` metadata.
    """
    meta = checkpoint.get(_KEY)
    if meta is None:
        raise ValueError(
            "checkpoint has no 'eplb' entry: only checkpoints saved with EplbCallback are placement-free"
        )
    drop = {f"{m['name']}.{b}" if m["name"] else b for m in meta["layers"] for b in m.get("buffers", [])}
    return {k: v for k, v in checkpoint["state_dict"].items() if k not in drop}
