"""Misconfigurations and ranks that disagree fail on every rank, fast, with a clear message.

One spawned pair of gloo processes runs every check (the README's "Failure behaviour" table)
by calling the callback's hooks directly with a stand-in trainer: the same code paths as
``Trainer.fit`` without Lightning's start-up. A check that hung would fail the test at the
process group's short timeout instead of passing.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_eplb import EplbCallback, ExpertParallelMoE
from lightning_eplb import _callback_utils as utils
from lightning_eplb._safety import (
    MigrationError,
    RankDisagreementError,
    check_ranks_agree,
    differing_replicas,
    entry,
)
from lightning_eplb.placement import Placement
from tests._dist import spawn

E, H, F = 4, 8, 8


class _Model(pl.LightningModule):
    def __init__(
        self, num_physical: tuple[int, ...] = (6, 6), ffn: int = F, groups: int = 1, **kw: Any
    ) -> None:
        super().__init__()
        self.moes = nn.ModuleList(
            ExpertParallelMoE(H, ffn, E, 2, p - E, num_expert_groups=groups, init_seed=i, **kw)
            for i, p in enumerate(num_physical)
        )


def _trainer(**kw: Any) -> SimpleNamespace:
    base = dict(
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        num_nodes=1,
        strategy=DDPStrategy(),
        log_every_n_steps=50,
        global_step=0,
        current_epoch=0,
        gradient_clip_val=None,
        gradient_clip_algorithm=None,
        accumulate_grad_batches=1,
        precision="32-true",
        max_steps=10,
        max_epochs=None,
        optimizers=[],
        loggers=[],
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _raises(kind: type[BaseException], pattern: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(kind, match=pattern) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _setup(cb: EplbCallback, model: pl.LightningModule, **kw: Any) -> None:
    cb.setup(_trainer(**kw), model, "fit")


def _run_misconfigurations(rank: int, world_size: int) -> None:
    # --- callback arguments: ValueError at construction (identical on every rank)
    _raises(ValueError, r"step_interval \(0\) must be an int >= 1", EplbCallback, step_interval=0)
    _raises(ValueError, r"policy \('greedy'\) must be one of", EplbCallback, policy="greedy")
    _raises(
        ValueError,
        r"min_improvement \(inf\) must be a finite number",
        EplbCallback,
        min_improvement=float("inf"),
    )
    _raises(ValueError, r"trace_every_n_steps \(5\) needs trace=True", EplbCallback, trace_every_n_steps=5)
    # --- layer arguments: ValueError at construction
    _raises(ValueError, r"top_k \(5\) must be <= num_experts \(4\)", ExpertParallelMoE, H, F, 4, 5)
    _raises(
        ValueError,
        r"num_experts \(4\) must be divisible by num_expert_groups \(3\)",
        ExpertParallelMoE,
        H,
        F,
        4,
        1,
        0,
        3,
    )
    _raises(ValueError, r"num_redundant_experts \(-1\) must be >= 0", ExpertParallelMoE, H, F, 4, 1, -1)
    # built after the process group exists: the layer splits its slots at once
    _raises(
        ValueError,
        r"num_physical_experts \(5\) .* divisible by the number of expert-parallel ranks \(2\)",
        ExpertParallelMoE,
        H,
        F,
        4,
        1,
        1,
    )
    # --- setup: MisconfigurationException naming the value and the rule
    model = _Model()
    _raises(
        MisconfigurationException, r"got FSDPStrategy", _setup, EplbCallback(), model, strategy=FSDPStrategy()
    )
    _raises(
        MisconfigurationException,
        r"world size \(2\) must be divisible by num_nodes \(4\)",
        _setup,
        EplbCallback(num_nodes=4),
        model,
    )
    plain = pl.LightningModule()
    plain.lin = nn.Linear(2, 2)
    _raises(MisconfigurationException, "found no balanceable MoE layer", _setup, EplbCallback(), plain)
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank joins every new_group
    mixed = _Model(process_group=singles[0] if rank == 0 else None)  # rank 0 on a subgroup only
    _raises(
        MisconfigurationException,
        r"expert-parallel groups must split the world into disjoint groups of one size, got \[0\], \[0, 1\]",
        _setup,
        EplbCallback(),
        mixed,
    )
    sub = _Model(process_group=singles[rank])  # expert parallelism of 1 inside data parallelism of 2
    cb = EplbCallback()
    _setup(cb, sub)
    assert (cb._layout.ep_size, cb._layout.dp_size, cb._num_ranks) == (1, 2, 1)
    assert sub.moes[0].num_local_experts == sub.moes[0].num_physical_experts
    # --- a custom policy returning a placement of the wrong shape: ValueError (a RuntimeError
    # naming rank 0 on a rank where the policy happened to succeed), nobody left in a collective
    cb = EplbCallback(step_interval=1, policy=lambda load, p, n, **k: Placement.contiguous(1, E, 2 * p, n))
    _setup(cb, model)
    model.moes[0](torch.randn(3, H))
    expected = r"custom policy returned a placement of shape \(1, 12\)|policy failed on rank 0"
    _raises(
        (ValueError, RuntimeError),
        expected,
        cb.on_train_batch_end,
        _trainer(global_step=1),
        model,
        None,
        None,
        0,
    )
    # --- factored optimizer state cannot move slot by slot: MigrationError on every rank, nothing moved
    model = _Model()
    cb = EplbCallback(step_interval=1)
    _setup(cb, model)
    params = list(model.parameters())
    opt = _Factored(params) if rank == 1 else torch.optim.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    old = torch.stack([m.physical_to_logical for m in model.moes])
    new = torch.roll(old, 1, dims=1)
    before = [t.clone() for t in params]
    where = "rank 1 \\(ValueError: _Factored state 'row_var'"
    with pytest.raises(MigrationError) as err:
        utils.migrate(_trainer(optimizers=[opt]), cb.layers, old, new, None, 1, True)
    assert re.search(where, str(err.value)) and not err.value.half_done, str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))  # nothing moved


class _Factored(torch.optim.Optimizer):
    """Keeps a factored second moment (a row statistic) like Adafactor, on every torch version."""

    def __init__(self, params: list) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["row_var"] = p.grad.square().mean(-1)


def _run_disagreements(rank: int, world_size: int) -> None:
    # --- callback arguments differ: named with each rank's value
    msg = _raises(
        RankDisagreementError,
        "window_size",
        _setup,
        EplbCallback(step_interval=4, window_size=4 + 4 * rank),
        _Model(),
    )
    assert "ranks [0]: 4; ranks [1]: 8" in msg and "step_interval" not in msg, msg
    _raises(
        RankDisagreementError,
        r"policy \(ranks \[0\]: 'balanced'; ranks \[1\]: 'deepseek'\)",
        _setup,
        EplbCallback(policy=["balanced", "deepseek"][rank]),
        _Model(),
    )
    # --- layer shapes differ (F) and number of layers differ
    _raises(
        RankDisagreementError,
        r"moes\.0 per-expert tensor shapes",
        _setup,
        EplbCallback(),
        _Model(ffn=F + rank),
    )
    _raises(
        RankDisagreementError,
        r"balanced layers",
        _setup,
        EplbCallback(),
        _Model(num_physical=(6,) * (1 + rank)),
    )
    # --- placements differ: a rank restored another placement
    model = _Model()
    if rank == 1:
        p = Placement.from_physical_to_logical(torch.tensor([[0, 1, 2, 3, 3, 2]]), E, 2)
        model.moes[1].set_placement(
            p.physical_to_logical[0], p.logical_to_physical[0], p.logical_replica_count[0]
        )
    _raises(RankDisagreementError, r"moes\.1\.physical_to_logical", _setup, EplbCallback(), model)
    # --- optimizers / accumulation / stopping rule differ: at on_train_start
    model = _Model()
    cb = EplbCallback(step_interval=2)
    _setup(cb, model)
    opt = (torch.optim.Adam if rank == 0 else torch.optim.SGD)(model.parameters(), lr=0.1)
    _raises(
        RankDisagreementError,
        r"optimizers \(type, holds expert parameters\)",
        cb.on_train_start,
        _trainer(optimizers=[opt]),
        model,
    )
    _raises(
        RankDisagreementError,
        r"max_steps \(ranks \[0\]: 10; ranks \[1\]: 11\)",
        cb.on_train_start,
        _trainer(max_steps=10 + rank),
        model,
    )
    cb.on_train_start(_trainer(), model)  # agreeing ranks pass
    # --- positions differ at a rearrangement: an uneven last batch (same step, other epoch
    # and batch), a rank that skipped a step (other step, rearranging every step)
    cb = EplbCallback(step_interval=2)
    _setup(cb, model)
    cb.on_train_batch_end(_trainer(global_step=1), model, None, None, 0)  # no rearrangement: no check
    msg = _raises(
        RankDisagreementError,
        "EPLB step 2: ranks disagree on epoch",
        cb.on_train_batch_end,
        _trainer(global_step=2, current_epoch=rank),
        model,
        None,
        None,
        1 - rank,
    )
    assert "batch index in the epoch (ranks [0]: 1; ranks [1]: 0)" in msg, msg
    cb = EplbCallback(step_interval=1)
    _setup(cb, model)
    _raises(
        RankDisagreementError,
        r"global step \(ranks \[0\]: 2; ranks \[1\]: 1\)",
        cb.on_train_batch_end,
        _trainer(global_step=2 - rank),
        model,
        None,
        None,
        3,
    )
    # --- the helper itself: a different number of items is caught too
    _raises(
        RankDisagreementError,
        r"test: ranks disagree on b \(only ranks \[1\] have it\)",
        check_ranks_agree,
        [entry("a", 1), entry("b", 2)][: 1 + rank],
        "test",
    )


def _run_all(rank: int, world_size: int) -> None:
    _run_misconfigurations(rank, world_size)
    _run_disagreements(rank, world_size)


def test_misconfigurations_and_disagreeing_ranks_raise_on_every_rank():
    """One spawned pair for both (each spawn costs seconds of imports); a short timeout turns
    a hang into a failure."""
    spawn(_run_all, world_size=2, timeout_s=20)


def test_single_process_checks_are_free():
    """Without a process group the checks are no-ops (no collective, nothing raised)."""
    check_ranks_agree([entry("a", 1)], "test")
    cb = EplbCallback(step_interval=1)
    model = _Model()
    _setup(cb, model)
    assert cb._window is not None


def test_differing_replicas_on_one_process() -> None:
    """Replicas held in one process: bit-identical passes; one changed element, or a change
    of sign (the same float sum, other bits), is named with its expert and slots."""
    layer = ExpertParallelMoE(8, 12, 4, 2, num_redundant_experts=4, init_seed=0)  # slots 4..7 replicate 0..3
    layers = [("moe", layer)]
    assert differing_replicas(layers) == []
    with torch.no_grad():
        layer.w2[6, 0, 0] = -layer.w2[6, 0, 0]  # expert 2's replica
    assert differing_replicas(layers) == ["moe: expert 2 in slots [2, 6]"]
    with torch.no_grad():
        layer.w2[6, 0, 0] = -layer.w2[6, 0, 0]
        layer.w1[1, 3, 5] = torch.nextafter(layer.w1[1, 3, 5], torch.tensor(1.0))  # one ulp
    assert differing_replicas(layers) == ["moe: expert 1 in slots [1, 5]"]
