"""Cross-rank safety checks of :class:`~lightning_eplb.EplbCallback`: fingerprints that ranks
compare before they communicate, and agreement on the success of collective work.

A *fingerprint* is a short list of named integers (sizes, flags, and 56-bit digests of
tensors or strings). :func:`check_ranks_agree` compares it across ranks with **one**
``all_reduce`` (MAX) of ``2 * K`` int64 values (each value and its negation, so the maximum
and minimum come back together); only when something differs does it gather every rank's
readable values (the error path) to name what differs and which ranks hold which value.
Every rank receives the same reduced vector, so every rank raises the same error together.

:func:`failed_ranks` is the agreement step of a collective operation that can fail on one
rank: each rank contributes one flag, one ``all_reduce`` (SUM) of ``N`` int64 values tells
every rank which ranks failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "MigrationError",
    "RankDisagreementError",
    "check_ranks_agree",
    "collective_device",
    "differing_replicas",
    "digest",
    "failed_ranks",
    "failures",
]

Fingerprint = list[tuple[str, int, str]]
"""``(name, value, readable value)`` entries; ``value`` is an int in ``[-2**62, 2**62]``."""


class RankDisagreementError(RuntimeError):
    """Ranks hold different values of something that must be identical on every rank."""


class MigrationError(RuntimeError):
    """A migration failed on at least one rank.

    Attributes:
        half_done: True when expert tensors may already have been partly overwritten (the
            weights no longer match any placement); False when nothing was moved.
        ranks: the ranks that reported a failure (empty when unknown, e.g. a timeout).
    """

    def __init__(self, message: str, half_done: bool, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.half_done = half_done
        self.ranks = list(ranks)


def _distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where small collectives run: this rank's GPU under NCCL, else the CPU."""
    if _distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def digest(value: Any) -> int:
    """A 56-bit digest of a tensor (dtype, shape and bytes) or of ``repr(value)``.

    Example:
        >>> digest(torch.tensor([0, 1])) == digest(torch.tensor([0, 1]))
        True
        >>> digest(torch.tensor([0, 1])) == digest(torch.tensor([1, 0]))
        False
    """
    h = hashlib.blake2b(digest_size=7)
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode())
    return int.from_bytes(h.digest(), "little")


def entry(name: str, value: Any) -> tuple[str, int, str]:
    """One fingerprint entry: small ints as themselves, anything else as its :func:`digest`."""
    if isinstance(value, bool):
        return name, int(value), repr(value)
    if isinstance(value, int) and abs(value) < 2**62:
        return name, value, repr(value)
    if isinstance(value, Tensor):
        shown = (
            repr(value.tolist()) if value.numel() <= 16 else f"tensor{tuple(value.shape)} #{digest(value):x}"
        )
        return name, digest(value), shown
    return name, digest(value), repr(value)


def check_ranks_agree(
    fingerprint: Fingerprint,
    where: str,
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise :class:`RankDisagreementError` on every rank if any entry differs between ranks.

    Collective (every rank of ``group`` calls it with the same entry names in the same order;
    a different number of entries is itself detected). One ``all_reduce`` of 6 int64 values
    whatever the number of entries; nothing on one process.

    Args:
        fingerprint: ``(name, value, readable)`` entries, see :func:`entry`.
        where: what is being checked, for the message (e.g. ``"EplbCallback.setup"``).
        group: the process group (None: the default group).
        device: where the collective runs; default :func:`collective_device`.

    Raises:
        RankDisagreementError: naming each differing entry and every rank's value.
    """
    if not _distributed(group):
        return
    device = collective_device(group) if device is None else device
    # fixed size whatever the fingerprint (gloo aborts on all-reduces of different sizes)
    header = [
        len(fingerprint),
        digest([n for n, _, _ in fingerprint]),
        digest([v for _, v, _ in fingerprint]),
    ]
    reduced = torch.tensor(header + [-v for v in header], dtype=torch.int64).to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    reduced = reduced.cpu()
    if torch.equal(reduced[:3], -reduced[3:]):
        return
    # error path: every rank got the same reduced vector, so every rank is here
    tables: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(tables, [(n, v, s) for n, v, s in fingerprint], group=group)
    lines = []
    names = list(dict.fromkeys(n for t in tables for n, _, _ in t))
    by_name = [{n: (v, shown) for n, v, shown in t} for t in tables]
    for name in names:
        holders = [r for r, t in enumerate(by_name) if name in t]
        if len(holders) < len(tables):
            lines.append(f"{name} (only ranks {holders} have it)")
        elif len({t[name][0] for t in by_name}) > 1:
            by_value: dict[str, list[int]] = {}
            for r, t in enumerate(by_name):
                by_value.setdefault(t[name][1], []).append(r)
            lines.append(f"{name} (" + "; ".join(f"ranks {rs}: {v}" for v, rs in by_value.items()) + ")")
    if not lines:
        lines.append("the order of the checked items")
    raise RankDisagreementError(
        f"{where}: ranks disagree on {', '.join(lines)}. Every rank must run the same model, "
        "callback arguments, placement and schedule (same global step, epoch and batch)"
    )


def failed_ranks(
    failed: bool, group: dist.ProcessGroup | None = None, device: torch.device | None = None
) -> list[int]:
    """The ranks that report a failure: one ``all_reduce`` (SUM) of ``N`` int64. Collective.

    Args:
        failed: whether this rank failed.
        group: the process group (None: the default group).
        device: where the collective runs; default :func:`collective_device`.

    Returns:
        Sorted ranks (in ``group``) whose ``failed`` was True; ``[0]`` or ``[]`` on one process.
    """
    if not _distributed(group):
        return [0] if failed else []
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
    flags[dist.get_rank(group)] = int(failed)
    reduced = flags.to(collective_device(group) if device is None else device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return [r for r, f in enumerate(reduced.cpu().tolist()) if f]


def failures(
    error: BaseException | None, group: dist.ProcessGroup | None = None, device: torch.device | None = None
) -> dict[int, str]:
    """``{rank: "Type: message"}`` of every rank whose ``error`` is not None, on every rank.

    One :func:`failed_ranks` all-reduce; only when some rank failed, one
    ``all_gather_object`` of the messages (the error path). Collective.
    """
    ranks = failed_ranks(error is not None, group, device)
    if not ranks:
        return {}
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if not _distributed(group):
        return {0: str(mine)}
    messages: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, mine, group=group)
    return {r: str(messages[r]) for r in ranks}


def refuse_if_broken(broken: str | None) -> None:
    """Raise ``RuntimeError`` if a migration failed (``broken`` says where): expert tensors
    may be half-migrated, so no checkpoint may be written from them."""
    if broken is not None:
        raise RuntimeError(
            f"EplbCallback refuses to save a checkpoint: the migration at {broken}. Expert weights "
            "and optimizer state may be half-migrated; resume from the last checkpoint written before it"
        )


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def slot_checksums(tensors: Sequence[Tensor]) -> Tensor:
    """``(S, T)`` int64: per local slot and tensor, the sum of its elements' bit patterns
    (read as integers of the element's size), so equal bits give equal sums exactly.
    One slot at a time, so the int64 temporary stays one slot's size.

    Example:
        >>> w = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
        >>> c = slot_checksums([w])
        >>> bool(c[0, 0] == c[1, 0]), c.shape
        (True, torch.Size([3, 1]))
    """
    columns = []
    for t in tensors:
        rows = t.detach().reshape(t.shape[0], -1)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        as_int = rows.view(_INT_OF_SIZE[rows.element_size()]) if rows.is_floating_point() else rows
        columns.append(torch.stack([row.sum(dtype=torch.int64) for row in as_int]).cpu())
    return torch.stack(columns, dim=1) if columns else torch.zeros(0, 0, dtype=torch.int64)


def _gathered(sums: list[Tensor], group: dist.ProcessGroup | None) -> list[Tensor]:
    """Every rank's per-layer ``(S, T)`` checksums, ``(R, S, T)`` per layer, with one
    ``all_gather`` over ``group`` (``R`` its ranks; 1 when not distributed)."""
    if not _distributed(group):
        return [c.unsqueeze(0) for c in sums]
    mine = torch.cat([c.reshape(-1) for c in sums]).to(collective_device(group))
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    gathered = torch.stack(parts).cpu()  # (R, sum over layers of S * T)
    out, offset = [], 0
    for c in sums:
        out.append(gathered[:, offset : offset + c.numel()].reshape(len(parts), *c.shape))
        offset += c.numel()
    return out


def differing_replicas(
    layers: Sequence[tuple[str, Any]],
    group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> list[str]:
    """Replicas of one logical expert whose weights differ (on any rank). Collective.

    Replicas must start identical (the replica-gradient sync keeps them so, never makes
    them so): a layer whose ranks drew their experts from different seeds, or a user layer
    initialised per rank, would otherwise train several different "copies" of an expert
    silently. Every rank sends its ``(S, T)`` :func:`slot_checksums` per layer in one
    ``all_gather`` over the EP ``group``. With expert parallelism inside data parallelism
    (``dp_group``: the ranks holding the same slots in the other EP groups) the same
    checksums are compared across the copies too, and one :func:`failed_ranks` makes every
    rank return a non-empty answer when any EP group found something.

    Args:
        layers: ``(name, layer)`` of the balanced layers, as on every rank.
        group: the EP group (None: the default group).
        dp_group: the expert data-parallel group, or None.

    Returns:
        One line per layer with differing replicas or copies, naming the experts and their
        slots (or the ranks that found them elsewhere); empty on every rank when all agree.
    """
    sums = [slot_checksums(layer.expert_tensors()) for _, layer in layers]
    lines = []
    for (name, layer), sums_NST in zip(layers, _gathered(sums, group), strict=True):
        sums_PT = sums_NST.reshape(-1, sums_NST.shape[-1])  # slot order: rank after rank
        p2l_P = layer.physical_to_logical.detach().cpu().to(torch.int64)
        first_E = layer.logical_to_physical.detach().cpu().to(torch.int64)[:, 0]
        bad_P = (sums_PT != sums_PT[first_E[p2l_P]]).any(dim=1)
        experts = sorted(set(p2l_P[bad_P].tolist()))
        if experts:
            where = "; ".join(
                f"expert {e} in slots {(p2l_P == e).nonzero().view(-1).tolist()}" for e in experts[:5]
            )
            more = f" (and {len(experts) - 5} more)" if len(experts) > 5 else ""
            lines.append(f"{name or 'layer'}: {where}{more}")
    if dp_group is None or not _distributed(dp_group):
        return lines
    for (name, _), copies_DST in zip(layers, _gathered(sums, dp_group), strict=True):
        bad_S = (copies_DST != copies_DST[:1]).any(dim=2).any(dim=0)
        if bool(bad_S.any()):
            lines.append(
                f"{name or 'layer'}: local slots {bad_S.nonzero().view(-1).tolist()} differ between the "
                "data-parallel copies of the experts"
            )
    found_on = failed_ranks(bool(lines))  # each EP group saw its own replicas: agree
    return lines or ([f"found on ranks {found_on}"] if found_on else [])


# ---------------------------------------------------------------------------- callback fingerprints
def _policy_name(policy: Any) -> str:
    if isinstance(policy, str):
        return policy
    return f"{getattr(policy, '__module__', '?')}.{getattr(policy, '__qualname__', type(policy).__name__)}"


def setup_fingerprint(callback: Any, num_ranks: int) -> Fingerprint:
    """What must agree at ``setup``: world size, the callback's (resolved) arguments, the
    balanced layers' names, sizes ``(E, P, G, top_k)``, per-slot expert shapes ``(H, F)`` and
    dtypes, and their placement buffers."""
    cb = callback
    items = [
        entry("world size", num_ranks),
        entry("num_nodes", cb._num_nodes),
        entry("step_interval", cb.step_interval),
        entry("window_size", cb.window_size),
        entry("first_rearrangement_step", cb.first_rearrangement_step),
        entry("policy", _policy_name(cb.policy)),
        entry("min_improvement", cb.min_improvement),
        entry("log_every_n_steps", cb._log_every),
        entry("max_buffer_bytes", cb.max_buffer_bytes),
        entry("migrate_optimizer_state", cb.migrate_optimizer_state),
        entry("trace", cb.trace),
        entry("trace_every_n_steps", cb.trace_every_n_steps),
        entry("rearrange", cb.rearrange),
        entry("overlap_grad_sync", getattr(cb, "overlap_grad_sync", True)),
        entry("balanced layers", [name for name, _ in cb.layers]),
    ]
    for name, layer in cb.layers:
        sizes = (
            int(layer.num_logical_experts),
            int(layer.num_physical_experts),
            int(getattr(layer, "num_expert_groups", 1)),
            int(getattr(layer, "top_k", 0)),
        )
        shapes = [(tuple(t.shape[1:]), str(t.dtype)) for t in layer.expert_tensors()]
        items += [
            entry(f"{name or 'layer'} (experts, physical slots, groups, top_k)", sizes),
            entry(f"{name or 'layer'} per-expert tensor shapes", shapes),
            entry(f"{name or 'layer'}.physical_to_logical", layer.physical_to_logical),
            entry(f"{name or 'layer'}.logical_to_physical", layer.logical_to_physical),
            entry(f"{name or 'layer'}.logical_replica_count", layer.logical_replica_count),
        ]
    return items


def train_fingerprint(callback: Any, trainer: Any) -> Fingerprint:
    """What must agree at ``on_train_start``: optimizers (types, and which hold expert
    parameters), gradient accumulation and clipping, precision, and the stopping rule."""
    expert_ids = {id(p) for _, layer in callback.layers for p in layer.expert_tensors()}
    optimizers = [getattr(o, "_optimizer", o) for o in getattr(trainer, "optimizers", [])]
    kinds = [
        (type(o).__name__, any(id(p) in expert_ids for g in o.param_groups for p in g["params"]))
        for o in optimizers
    ]
    clip = (
        callback._clip_norm
        if callback._clip_norm is not None
        else getattr(trainer, "gradient_clip_val", None)
    )
    return [
        entry("optimizers (type, holds expert parameters)", kinds),
        entry("accumulate_grad_batches", int(getattr(trainer, "accumulate_grad_batches", 1))),
        entry("gradient_clip_val", clip),
        entry("precision", str(getattr(trainer, "precision", None))),
        entry("max_steps", int(getattr(trainer, "max_steps", -1))),
        entry("max_epochs", getattr(trainer, "max_epochs", None)),
    ]


def step_fingerprint(callback: Any, trainer: Any, batch_idx: int) -> Fingerprint:
    """What must agree at a rearrangement: where each rank is (global step, epoch, batch),
    the load window's step count, the placement, the rearrangement counters and the AMP
    loss scale (a rank that skipped an optimizer step on inf gradients has another)."""
    placement = [layer.physical_to_logical.detach().cpu() for _, layer in callback.layers]
    window = callback._window
    items = [
        entry("global step", int(trainer.global_step)),
        entry("epoch", int(getattr(trainer, "current_epoch", 0))),
        entry("batch index in the epoch", int(batch_idx)),
        entry("steps recorded in the load window", -1 if window is None else int(window.cursor)),
        entry(
            "placement (physical_to_logical of every layer)", torch.stack(placement) if placement else None
        ),
        entry("rearrangements done", int(callback.num_rearrangements)),
    ]
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is not None and hasattr(scaler, "get_scale"):
        items.append(entry("AMP loss scale", float(scaler.get_scale())))
    return items
