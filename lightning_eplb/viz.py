"""Pictures of the balance: expert-load and rank-load heatmaps, simulation plots.

matplotlib is an optional dependency (``pip install 'lightning-eplb[viz]'``); it is imported
only when a figure is drawn. Figures are built with ``matplotlib.figure.Figure`` (no pyplot
state, safe in a training process). Shapes: ``L`` layers, ``E`` logical experts, ``P`` slots,
``N`` ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_eplb.placement import Placement

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

    from lightning_eplb.simulate import SimulationResult

__all__ = [
    "expert_load_figure",
    "log_figures",
    "rank_load_figure",
    "rearrangement_figures",
    "save_heatmaps",
    "save_simulation_plot",
    "save_trace_heatmaps",
    "simulation_figure",
]

_LOG_SPAN = 30.0  # use a log colour scale when max / smallest positive load exceeds this


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "lightning_eplb's pictures need matplotlib; install the viz extra: pip install 'lightning-eplb[viz]'"
        ) from err
    return Figure(layout="constrained", **kwargs)


def _load_LE(load: Tensor) -> Tensor:
    load_LE = torch.as_tensor(load).detach().to("cpu", torch.float64)
    if load_LE.dim() == 1:
        load_LE = load_LE.unsqueeze(0)
    if load_LE.dim() != 2:
        raise ValueError(f"load must have shape (L, E), got {tuple(load_LE.shape)}")
    return load_LE


def _step_suffix(step: int | None) -> str:
    return "" if step is None else f" (step {step})"


def expert_load_figure(load: Tensor, *, step: int | None = None, title: str = "Expert load") -> Figure:
    """Heatmap of tokens per layer (rows) and logical expert (columns).

    Args:
        load: ``(L, E)`` tokens per logical expert.
        step: optimizer step, shown in the title.
        title: figure title.

    The colour scale is logarithmic when loads span more than a factor 30 (zeros then show
    in the colormap's "under" colour).
    """
    fig = _figure()  # raises the ImportError naming the extra when matplotlib is missing
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    load_LE = _load_LE(load)
    L, E = load_LE.shape
    positive = load_LE[load_LE > 0]
    hi = float(load_LE.max()) if load_LE.numel() else 1.0
    lo = float(positive.min()) if positive.numel() else 0.0
    use_log = lo > 0 and hi / lo > _LOG_SPAN
    norm = LogNorm(vmin=lo, vmax=hi) if use_log else Normalize(vmin=0.0, vmax=max(hi, 1e-12))
    fig.set_size_inches(min(14.0, 4.0 + 0.04 * E), min(9.0, 2.5 + 0.09 * L))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(under="black", bad="black")
    image = ax.imshow(load_LE.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    share = load_LE.max(dim=1).values / load_LE.mean(dim=1).clamp_min(1e-12)
    ax.set_title(
        f"{title}{_step_suffix(step)}: {L} layers x {E} experts, hottest expert "
        f"{float(share.median()):.1f}x the layer mean (median over layers)",
        fontsize=10,
    )
    ax.set_xlabel("logical expert")
    ax.set_ylabel("MoE layer")
    fig.colorbar(
        image,
        ax=ax,
        label="tokens" + (" (log scale)" if use_log else ""),
        extend="min" if use_log and bool((load_LE == 0).any()) else "neither",
    )
    return fig


def rank_load_figure(
    load: Tensor,
    old_p2l_LP: Tensor,
    new_p2l_LP: Tensor,
    num_ranks: int,
    *,
    step: int | None = None,
) -> Figure:
    """Rank load before and after a rearrangement, relative to each layer's mean rank load.

    Two heatmaps (layers x ranks) share one diverging colour scale centred on 1.0 (a rank
    with exactly the layer's mean load); a third panel shows max / mean rank load per layer.

    Args:
        load: ``(L, E)`` tokens per logical expert (the window the placement was computed on).
        old_p2l_LP: ``(L, P)`` ``physical_to_logical`` before.
        new_p2l_LP: ``(L, P)`` ``physical_to_logical`` after.
        num_ranks: ``N``.
        step: optimizer step, shown in the title.
    """
    fig = _figure()
    from matplotlib.colors import TwoSlopeNorm

    load_LE = _load_LE(load)
    E = load_LE.shape[1]
    panels = []
    for name, p2l in (("before", old_p2l_LP), ("after", new_p2l_LP)):
        placement = Placement.from_physical_to_logical(torch.as_tensor(p2l), E, num_ranks)
        rank_LN = placement.rank_loads(load_LE)
        rel_LN = rank_LN / rank_LN.mean(dim=1, keepdim=True).clamp_min(1e-12)
        panels.append((name, rel_LN, placement.balancedness(load_LE)))
    L, N = panels[0][1].shape
    vmax = max(2.0, max(float(p[1].max()) for p in panels))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    fig.set_size_inches(min(15.0, 7.0 + 0.25 * N), min(9.0, 2.8 + 0.09 * L))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 3, 1.6]}, sharey=True)
    for ax, (name, rel_LN, bal) in zip(axes[:2], panels, strict=True):
        ax.imshow(rel_LN.numpy(), aspect="auto", interpolation="nearest", cmap="RdBu_r", norm=norm)
        ax.set_title(f"{name}: balancedness {bal:.3f}", fontsize=10)
        ax.set_xlabel("expert-parallel rank")
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(
        axes[0].images[0], ax=list(axes[:2]), label="rank load / layer mean (1.0 = even)", shrink=0.9
    )
    layers = torch.arange(L).numpy()
    for (name, rel_LN, _), color in zip(panels, ("tab:red", "tab:blue"), strict=True):
        axes[2].plot(
            rel_LN.max(dim=1).values.numpy(), layers, color=color, label=name, marker=".", markersize=3
        )
    axes[2].axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    axes[2].set_xlabel("max / mean rank load")
    axes[2].set_title("hottest rank", fontsize=10)
    axes[2].legend(fontsize=8, loc="best")
    axes[2].set_xlim(left=0.9)
    fig.suptitle(f"Rank load per layer, {N} ranks{_step_suffix(step)}", fontsize=11)
    return fig


def rearrangement_figures(
    load: Tensor, old_p2l_LP: Tensor, new_p2l_LP: Tensor, num_ranks: int, *, step: int | None = None
) -> dict[str, Figure]:
    """Both pictures of one rearrangement, keyed by TensorBoard tag (``eplb/expert_load``, ``eplb/rank_load``).

    Args: as :func:`rank_load_figure`.
    """
    return {
        "eplb/expert_load": expert_load_figure(load, step=step),
        "eplb/rank_load": rank_load_figure(load, old_p2l_LP, new_p2l_LP, num_ranks, step=step),
    }


def save_heatmaps(
    load: Tensor,
    old_p2l_LP: Tensor,
    new_p2l_LP: Tensor,
    num_ranks: int,
    out_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    dpi: int = 110,
) -> list[Path]:
    """Save :func:`rearrangement_figures` as PNG files in ``out_dir`` (created if needed).

    Files are named ``expert_load_step{step:07d}.png`` and ``rank_load_step{step:07d}.png``
    (without the step suffix when ``step`` is None).

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if step is None else f"_step{step:07d}"
    paths = []
    for tag, fig in rearrangement_figures(load, old_p2l_LP, new_p2l_LP, num_ranks, step=step).items():
        path = out / f"{tag.split('/')[-1]}{suffix}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def log_figures(
    trainer: pl.Trainer,
    load: Tensor,
    old_p2l_LP: Tensor,
    new_p2l_LP: Tensor,
    num_ranks: int,
    step: int,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Log the pictures of one rearrangement the way the trainer's loggers want them.

    With a ``TensorBoardLogger`` among ``trainer.loggers`` the figures go to it
    (``logger.experiment.add_figure`` under ``eplb/expert_load`` and ``eplb/rank_load``);
    otherwise they are saved as PNG in ``out_dir`` (default ``<trainer.log_dir>/eplb``). Does
    nothing on ranks other than global rank zero.

    Args:
        trainer: the running trainer.
        load, old_p2l_LP, new_p2l_LP, num_ranks: as :func:`rank_load_figure`.
        step: optimizer step (TensorBoard's ``global_step``).
        out_dir: where PNGs go when no TensorBoard logger is attached.

    Returns:
        The PNG paths written (empty when logged to TensorBoard or not on rank zero).
    """
    if not trainer.is_global_zero:
        return []
    from lightning.pytorch.loggers import TensorBoardLogger

    boards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if boards:
        for tag, fig in rearrangement_figures(load, old_p2l_LP, new_p2l_LP, num_ranks, step=step).items():
            for board in boards:
                board.experiment.add_figure(tag, fig, global_step=step, close=False)
        return []
    if out_dir is None:
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "eplb"
    return save_heatmaps(load, old_p2l_LP, new_p2l_LP, num_ranks, out_dir, step=step)


def save_trace_heatmaps(
    path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, last: int | None = None
) -> list[Path]:
    """Draw :func:`save_heatmaps` for the rearrangements recorded in a trace file.

    Each rearrangement is drawn on the load window recorded at its step (the callback records
    one with every rearrangement); rearrangements without one are skipped.

    Args:
        path: a trace written by :class:`lightning_eplb.trace.TraceWriter`.
        out_dir: folder for the PNG files.
        last: only the last ``last`` rearrangements (default: all).

    Returns:
        The written paths, two per drawn rearrangement.
    """
    from lightning_eplb.trace import read_trace

    trace = read_trace(path)
    steps = trace.steps.tolist()
    paths: list[Path] = []
    events = range(trace.num_rearrangements)
    for k in list(events)[-last:] if last else events:
        step = int(trace.rearrangement_steps[k])
        if step not in steps:
            continue
        load_LE = trace.loads[len(steps) - 1 - steps[::-1].index(step)]
        paths += save_heatmaps(
            load_LE, trace.placements_before[k], trace.placements[k], trace.num_ranks, out_dir, step=step
        )
    return paths


def simulation_figure(result: SimulationResult) -> Figure:
    """Balancedness over the replay (with and without EPLB) and slots moved per rearrangement."""
    fig = _figure(figsize=(10.0, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    steps = torch.arange(result.num_steps).numpy()
    top.plot(
        steps,
        result.static_balancedness.numpy(),
        color="tab:gray",
        linewidth=1.0,
        label=f"static, no EPLB (mean {result.mean_static_balancedness:.3f})",
    )
    top.plot(
        steps,
        result.balancedness.numpy(),
        color="tab:blue",
        linewidth=1.2,
        label=f"EPLB {result.policy} (mean {result.mean_balancedness:.3f})",
    )
    for r in result.rearrangements:
        top.axvline(r.step, color="tab:orange", linewidth=0.5, alpha=0.5)
    top.set_ylim(0.0, 1.02)
    top.set_ylabel("balancedness\n(mean / max rank load)")
    top.set_title(
        f"{result.num_ranks} ranks, {result.num_physical} slots, interval {result.step_interval}, "
        f"window {result.window}: {len(result.rearrangements)} rearrangements (orange)",
        fontsize=10,
    )
    top.legend(loc="lower right", fontsize=9)
    top.grid(alpha=0.3)
    if result.rearrangements:
        xs = [r.step for r in result.rearrangements]
        width = max(1.0, 0.6 * result.step_interval)
        bottom.bar(
            xs,
            [r.slots_changed for r in result.rearrangements],
            width=width,
            color="tab:orange",
            label="slots changed",
        )
        bottom.bar(
            xs,
            [r.slots_received for r in result.rearrangements],
            width=width * 0.5,
            color="tab:red",
            label="slots received over the network",
        )
        bottom.legend(loc="upper center", fontsize=8, ncol=2)
    total = result.placement.num_layers * result.placement.num_physical
    bottom.set_ylim(0, 1.35 * total)
    bottom.axhline(total, color="gray", linewidth=0.8, linestyle="--")
    bottom.set_ylabel(f"slots\n(of {total})")
    bottom.set_xlabel("replay step")
    bottom.grid(alpha=0.3)
    return fig


def save_simulation_plot(result: SimulationResult, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Save :func:`simulation_figure` as PNG at ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    simulation_figure(result).savefig(path, dpi=dpi)
    return path
