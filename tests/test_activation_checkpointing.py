"""Activation checkpointing (``torch.utils.checkpoint``) around ``ExpertParallelMoE``: the
forward it re-runs inside the backward routes the same tokens again, so it must not count
them again (load, ``forward_calls``), and training stays what it is without it: on one
process against the plain layer, and under ``Trainer.fit`` with EPLB on 2 gloo ranks
against the one-process reference (float64), with the same loads and decisions.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_eplb import EplbCallback, ExpertParallelMoE
from tests._dist import spawn
from tests.test_callback_train import (
    _decisions,
    _fit,
    _global_losses,
    _Net,
    counting_launches,
    reference_losses,
)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recomputed_forward_counts_once(use_reentrant: bool) -> None:
    torch.manual_seed(0)
    layer = ExpertParallelMoE(16, 24, 4, 2, num_redundant_experts=2, init_seed=0).double().train()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    load, grads = layer.expert_load.clone(), [p.grad.clone() for p in (x, *layer.parameters())]
    assert layer.forward_calls == 1 and int(load.sum()) == 10 * 2
    layer.zero_grad(set_to_none=True)
    layer.reset_expert_load()
    layer.forward_calls = 0
    x.grad = None
    checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    assert torch.equal(layer.expert_load, load)  # not twice: the re-run in the backward is not counted
    # the first forward of the reentrant variant runs without autograd: not an armed forward
    assert layer.forward_calls == (0 if use_reentrant else 1)
    for got, want in zip((x.grad, *(p.grad for p in layer.parameters())), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


class _Recomputed(_Net):
    """``_Net`` with each MoE layer under activation checkpointing."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for moe in self.moes:
            h = h + checkpoint(moe, h, use_reentrant=self.use_reentrant)
        return self.head(h)


def _run(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    out = {}
    for name, model in (
        ("plain", _Net()),
        ("recomputed", _Recomputed(use_reentrant=False)),
        ("reentrant", _Recomputed(use_reentrant=True)),
    ):
        cb = EplbCallback(step_interval=2, window_size=3, min_improvement=0.0, log_every_n_steps=1)
        with counting_launches() as launches:
            _fit(model, world_size, tmp, [cb])
        out[name] = {
            "losses": _global_losses(model),
            "decisions": _decisions(cb.rearrangements),
            "stats": cb.last_stats,
            "launches": len(launches),
        }
    if rank == 0:
        torch.save(out, os.path.join(tmp, "recomputed.pt"))


def test_training_with_activation_checkpointing_on_two_ranks(tmp_path) -> None:
    expected = reference_losses(str(tmp_path))
    spawn(_run, world_size=2, args=(str(tmp_path),), timeout_s=240, init=False)
    out = torch.load(tmp_path / "recomputed.pt")
    plain = out["plain"]
    for name in ("plain", "recomputed", "reentrant"):
        torch.testing.assert_close(out[name]["losses"], expected, rtol=1e-9, atol=0, msg=name)
        # the same tokens counted once: the same window, statistics and rearrangements
        assert out[name]["stats"] == plain["stats"], name
        assert out[name]["decisions"] == plain["decisions"], name
    # the replica sync still overlaps the backward under non-reentrant checkpointing (one
    # armed forward per layer); the reentrant variant's first forward has no autograd, so
    # its layers sync after the backward
    assert plain["launches"] == out["recomputed"]["launches"] == 8 * 2  # 8 steps x 2 layers
    assert out["reentrant"]["launches"] == 0
