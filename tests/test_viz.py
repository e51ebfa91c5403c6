"""Pictures: PNG files, TensorBoard logging, a clear message without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_eplb.placement import Placement

PNG = b"\x89PNG\r\n\x1a\n"


def _example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L=4 layers, E=8 experts, P=12 slots, N=4 ranks; loads spanning four orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    load = (10.0 ** (4 * torch.rand(4, 8, generator=gen, dtype=torch.float64))).round()
    load[1, 3] = 0.0
    old = Placement.contiguous(4, 8, 12, 4).physical_to_logical
    hot = load.argsort(dim=1, descending=True)[:, :4]
    new = torch.cat([torch.arange(8).expand(4, -1), hot], dim=1)  # replicas of the 4 hottest
    return load, old, new


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_eplb import viz

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-eplb\[viz\]'"):
        viz.expert_load_figure(torch.ones(2, 3))


def test_save_heatmaps_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.colors import LogNorm

    from lightning_eplb.viz import expert_load_figure, save_heatmaps

    load, old, new = _example()
    paths = save_heatmaps(load, old, new, 4, tmp_path / "png", step=30)
    assert [p.name for p in paths] == ["expert_load_step0000030.png", "rank_load_step0000030.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    assert isinstance(expert_load_figure(load).axes[0].images[0].norm, LogNorm)  # loads span 10^4
    assert not isinstance(
        expert_load_figure(torch.ones(2, 3) + torch.eye(2, 3)).axes[0].images[0].norm, LogNorm
    )


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def add_figure(self, tag: str, figure: Any, global_step: int, close: bool = True) -> None:
        assert figure.axes, "an empty figure"
        self.calls.append((tag, global_step))


def test_log_figures_tensorboard_or_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_eplb.viz import log_figures

    class RecordingBoard(TensorBoardLogger):
        recorder = _Recorder()

        @property
        def experiment(self) -> Any:
            return self.recorder

    load, old, new = _example()
    board = RecordingBoard(save_dir=tmp_path)
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[board], log_dir=str(tmp_path), default_root_dir="."
    )
    assert log_figures(trainer, load, old, new, 4, step=7) == []  # type: ignore[arg-type]
    assert board.recorder.calls == [("eplb/expert_load", 7), ("eplb/rank_load", 7)]

    csv = CSVLogger(save_dir=tmp_path / "csv")
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[csv], log_dir=str(tmp_path / "logs"), default_root_dir="."
    )
    paths = log_figures(trainer, load, old, new, 4, step=7)  # type: ignore[arg-type]
    assert [p.parent for p in paths] == [tmp_path / "logs" / "eplb"] * 2
    assert all(p.read_bytes()[:8] == PNG for p in paths)

    trainer.is_global_zero = False
    assert log_figures(trainer, load, old, new, 4, step=8) == []  # type: ignore[arg-type]


def test_simulation_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lightning_eplb.simulate import Rearrangement, SimulationResult
    from lightning_eplb.viz import save_simulation_plot

    result = SimulationResult(
        balancedness=torch.tensor([0.5, 0.5, 0.9, 0.8], dtype=torch.float64),
        static_balancedness=torch.full((4,), 0.5, dtype=torch.float64),
        rearrangements=(Rearrangement(2, 0.5, 0.95, 6, 4, 400, 0.01),),
        placement=Placement.contiguous(2, 4, 6, 2),
        num_ranks=2,
        num_physical=6,
        policy="balanced",
        step_interval=2,
        window=2,
    )
    path = save_simulation_plot(result, tmp_path / "a" / "sim.png")
    assert path.read_bytes()[:8] == PNG


def test_save_trace_heatmaps(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from lightning_eplb.trace import TraceWriter
    from lightning_eplb.viz import save_trace_heatmaps

    load, old, new = _example()
    with TraceWriter(tmp_path / "t.npz", num_layers=4, num_logical=8, num_physical=12, num_ranks=4) as w:
        w.add_window(5, load)
        w.add_rearrangement(5, old, new, 0.5, 0.9, bytes_moved=0, seconds=0.0)
        w.add_rearrangement(9, new, old, 0.9, 0.5, bytes_moved=0, seconds=0.0)  # no window at step 9: skipped
    paths = save_trace_heatmaps(tmp_path / "t.npz", tmp_path / "png")
    assert [p.name for p in paths] == ["expert_load_step0000005.png", "rank_load_step0000005.png"]
    assert save_trace_heatmaps(tmp_path / "t.npz", tmp_path / "png2", last=1) == []
