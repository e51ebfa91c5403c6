"""Extreme loads: no tokens, every token on one expert, NaN/inf/negative counts, counts that
overflow the window's int32 rows. One process: the flags travel in the same all-reduce as the
counts (tested on 2 ranks in tests/test_load.py), so every rank decides alike."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_eplb import EplbCallback, ExpertParallelMoE
from lightning_eplb.load import ExpertLoadWindow
from lightning_eplb.placement import Placement, rebalance

P2L = torch.tensor([[0, 1, 2, 3, 0, 1]])


def test_nan_inf_and_negative_counts_raise_while_in_the_window():
    w = ExpertLoadWindow(1, 4, 6, window_size=2)
    w.update(torch.tensor([[1.0, 2.0, float("nan"), 0.0, 0.0, 0.0]]), P2L)
    with pytest.raises(
        ValueError, match=r"NaN, inf or negative values in 1 rank-step\(s\) of the last 2 steps"
    ):
        w.compute()
    w.update(torch.tensor([[1.0, float("inf"), 0.0, 0.0, 0.0, 0.0]]), P2L)
    with pytest.raises(ValueError, match=r"in 2 rank-step\(s\)"):
        w.compute()
    w.update(torch.ones(1, 6), P2L)
    w.update(torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 1.0]]), P2L)  # both bad steps left the window
    load = w.compute()
    assert load.slot_LP.tolist() == [[4, 1, 1, 1, 1, 2]] and load.logical_LE.tolist() == [[5, 3, 1, 1]]
    w.update(torch.tensor([[0, -1, 0, 0, 0, 0]]), P2L)  # a signed integer counter gone negative
    with pytest.raises(ValueError, match="finite, >= 0"):
        w.compute()


def test_counts_above_int32_saturate_with_one_warning():
    w = ExpertLoadWindow(1, 4, 6, window_size=3)
    big = 2**31 + 5
    w.update(torch.tensor([[big, 0, 0, 0, 7, 0]]), P2L)
    w.update(torch.tensor([[2**30, 0, 0, 0, 2**30, 0]]), P2L)  # replicas sum past int32 in logical
    w.update(torch.tensor([[2**31 - 1, 0, 0, 0, 0, 0]]), P2L)
    with pytest.warns(UserWarning, match=r"above 2147483647 tokens per slot in one step were saturated"):
        load = w.compute()
    top = 2**31 - 1
    # window sums are int64: three near-limit steps add up without wrapping
    assert load.slot_LP[0, 0].item() == top + 2**30 + top and load.slot_LP[0, 4].item() == 7 + 2**30
    assert load.logical_LE[0, 0].item() == top + top + top  # each step's logical count capped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        w.compute()


def test_one_hot_load_gives_a_valid_placement_for_both_policies():
    load = torch.zeros(2, 8)
    load[:, 3] = 1e6  # every token on expert 3
    balanced, deepseek = rebalance(load, 16, 4, policy="balanced"), rebalance(load, 16, 4, policy="deepseek")
    for p in (balanced, deepseek):
        p.validate()
        assert (p.logical_replica_count[:, 3] == p.logical_replica_count.max(dim=1).values).all()
    # balanced: one replica of expert 3 on each rank, each takes a quarter: perfect
    assert balanced.balancedness(load) == 1.0
    # DeepSeek's algorithm gives the hot expert the 9 spare slots' worth of replicas, which 4
    # ranks hold 3/2/2/2: busiest rank 3/9 of the load, mean 2.25/9, balancedness 0.75
    assert deepseek.logical_replica_count[0, 3] == 9 and deepseek.balancedness(load) == pytest.approx(0.75)


class _Module:
    """Just enough of a LightningModule for the callback's rearrangement path."""

    def __init__(self, layer: ExpertParallelMoE) -> None:
        self.layer = layer

    def log(self, *args, **kwargs) -> None:
        pass


def _callback_with_window(layer: ExpertParallelMoE, policy="balanced") -> EplbCallback:
    cb = EplbCallback(step_interval=1, min_improvement=-1.0, policy=policy)
    cb.layers = [("moe", layer)]
    cb._window = ExpertLoadWindow(1, 4, 6, 1)
    return cb


def test_no_tokens_skips_the_rearrangement_with_one_warning():
    from types import SimpleNamespace

    layer = ExpertParallelMoE(8, 8, 4, 2, 2, init_seed=0)
    calls = []
    cb = _callback_with_window(
        layer, policy=lambda *a, **k: calls.append(1) or Placement.contiguous(1, 4, 6, 1)
    )
    trainer = SimpleNamespace(
        loggers=[], fit_loop=SimpleNamespace(epoch_loop=None), global_step=0, current_epoch=0, optimizers=[]
    )
    before = [t.detach().clone() for t in layer.expert_tensors()]
    for step in (1, 2):
        trainer.global_step = step
        if step == 1:
            with pytest.warns(
                UserWarning, match=r"no tokens were routed in the last 1 steps; keeping the placement"
            ):
                cb.on_train_batch_end(trainer, _Module(layer), None, None, step)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cb.on_train_batch_end(trainer, _Module(layer), None, None, step)
    assert calls == [] and [r["skipped"] for r in cb.rearrangements] == [1.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(before, layer.expert_tensors(), strict=True))
