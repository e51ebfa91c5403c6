"""Expert parallelism inside data parallelism: 4 gloo ranks as 2 expert-parallel groups of 2
(layers built in ``configure_model`` on their EP subgroup), trained by ``Trainer.fit`` with
EPLB, equal the one-process model without EPLB step for step (float64): the placement
comes from the loads of all 4 ranks, each EP group migrates its own copy of the experts and
their Adam state, replica gradients are exchanged during the backward within each EP group
and then averaged over the copies (started right behind each layer's sums; after the
backward with ``overlap_grad_sync=False``), clipping sees each expert once. A placement-free checkpoint written there resumes on 2 ranks with the whole world as
the EP group and continues the same losses. Copies that differ between the EP groups are
refused when training starts.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_eplb import EplbCallback, ExpertParallelMoE, _ep_layout, _replica_sync
from lightning_eplb._ep_layout import nodes_per_ep_group
from tests._dist import spawn
from tests.test_callback_train import (
    LIGHTNING_RESUMES_BATCH_END_EXACTLY,
    TOP_K,
    E,
    F,
    H,
    _fit,
    _global_losses,
    _Net,
    _rotate,
    counting_launches,
    reference_losses,
)


class _SubgroupNet(_Net):
    """``_Net`` with its MoE layers built in ``configure_model`` on EP groups of ``ep`` ranks
    (gates copied from ``_Net``'s, experts from the same seeds)."""

    def __init__(self, ep: int) -> None:
        with mock.patch("torch.distributed.is_initialized", return_value=False):
            super().__init__()  # (the whole-world layers it builds are only read for their gates)
        self._gates = [m.gate.weight.detach().clone() for m in self.moes]
        self._ep = ep
        del self.moes

    def configure_model(self) -> None:
        if hasattr(self, "moes"):
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        groups = [dist.new_group(list(range(s, s + self._ep))) for s in range(0, world, self._ep)]
        group = groups[rank // self._ep]  # every rank creates every group, in the same order
        self.moes = nn.ModuleList(
            ExpertParallelMoE(H, F, E, TOP_K, num_redundant_experts=2, init_seed=10 + i, process_group=group)
            for i in range(2)
        )
        with torch.no_grad():
            for moe, gate in zip(self.moes, self._gates, strict=True):
                moe.gate.weight.copy_(gate)


def _lopsided(load, num_physical, num_ranks, *, previous, **kwargs):
    """EP rank 0 holds experts 0, 1, 2 once each; EP rank 1 holds expert 3 three times."""
    return torch.tensor([[0, 1, 2, 3, 3, 3]]).expand(load.shape[0], -1)


def _run(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    out: dict = {}
    # the real policy every 2 steps (window 3), checkpoints every 4 steps
    cb = EplbCallback(step_interval=2, window_size=3, min_improvement=0.0, log_every_n_steps=0)
    model = _SubgroupNet(ep=2)
    ckpt = ModelCheckpoint(dirpath=tmp, filename="ep2dp2-{step}", every_n_train_steps=4, save_top_k=-1)
    # averages started by the overlap (_replica_sync's binding) and after the backward
    # (_ep_layout's binding of the same function)
    during = mock.patch.object(_replica_sync, "start_average", wraps=_replica_sync.start_average)
    after = mock.patch.object(_ep_layout, "start_average", wraps=_replica_sync.start_average)
    with counting_launches() as launches, during as started, after as late:
        _fit(model, world_size, tmp, [cb, ckpt])
    out["launches"], out["averages"], out["late_averages"] = len(launches), started.call_count, late.call_count
    out["eplb"], out["records"] = _global_losses(model), cb.rearrangements
    out["layout"] = (cb._layout.ep_size, cb._layout.dp_size, model.moes[0].num_local_experts)
    # every slot moves every 2 steps: weights and Adam state travel within each EP group
    # (and the replica sync and the average over the copies after the backward, not overlapped)
    cb = EplbCallback(
        step_interval=2, policy=_rotate, min_improvement=-1.0, log_every_n_steps=0, overlap_grad_sync=False
    )
    model = _SubgroupNet(ep=2)
    after = mock.patch.object(_ep_layout, "start_average", wraps=_replica_sync.start_average)
    with counting_launches() as launches, after as late:
        _fit(model, world_size, tmp, [cb])
    out["rotate"], out["rotate_launches"], out["rotate_late"] = _global_losses(model), len(launches), late.call_count
    out["rotated"] = sum(r["slots_changed"] for r in cb.rearrangements)
    # a placement that leaves EP rank 0 without a replicated expert (expert 3 in all of EP
    # rank 1's slots): ranks 0 and 2 still average their copies during the backward
    cb = EplbCallback(step_interval=2, policy=_lopsided, min_improvement=-1.0, log_every_n_steps=0)
    model = _SubgroupNet(ep=2)
    _fit(model, world_size, tmp, [cb])
    out["lopsided"] = _global_losses(model)
    # the copies stay identical: the same slots hold the same bits in both EP groups
    w = torch.cat([p.detach().reshape(-1) for m in model.moes for p in m.expert_tensors()])
    if dist.get_backend() == "nccl":  # (Lightning's teardown moved the model back to the CPU)
        w = w.to(torch.device("cuda", torch.cuda.current_device()))
    copies = [torch.empty_like(w) for _ in range(world_size)]
    dist.all_gather(copies, w)
    out["copies_equal"] = torch.equal(copies[0], copies[2]) and torch.equal(copies[1], copies[3])
    # copies that differ between the EP groups (rank 2 holds rank 0's slots): refused at the
    # start of training on every rank
    model = _SubgroupNet(ep=2)
    model.configure_model()
    with torch.no_grad():
        model.moes[0].w2.add_(float(rank == 2))
    where = {
        0: r"moes\.0: local slots \[0, 1, 2\] differ between the data-parallel copies",
        1: r"found on ranks \[0, 2, 3\]",
        2: r"moes\.0: expert 0 in slots \[0, 4\].*\| moes\.0: local slots \[0, 1, 2\] differ",
        3: r"moes\.0: expert 0 in slots \[0, 4\]",
    }[rank]
    with pytest.raises(MisconfigurationException, match=r"replicas of one expert hold different weights: .*" + where):
        _fit(model, world_size, tmp, [EplbCallback(step_interval=2, log_every_n_steps=0)], max_steps=2)
    if rank == 0:
        torch.save(out, os.path.join(tmp, "ep2dp2.pt"))


def _resume_on_two(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    cb = EplbCallback(step_interval=2, window_size=3, min_improvement=0.0, log_every_n_steps=0)
    model = _SubgroupNet(ep=2)  # the same module order; its EP group is now the whole world
    _fit(model, world_size, tmp, [cb], ckpt_path=os.path.join(tmp, "ep2dp2-step=4.ckpt"))
    resumed = _global_losses(model)  # collective
    if rank == 0:
        torch.save({"resumed": resumed}, os.path.join(tmp, "resumed.pt"))


def test_expert_parallel_groups_inside_data_parallelism(tmp_path):
    expected = reference_losses(str(tmp_path))
    spawn(_run, world_size=4, args=(str(tmp_path),), timeout_s=240, init=False)
    out = torch.load(tmp_path / "ep2dp2.pt")
    assert out["layout"] == (2, 2, (E + 2) // 2)
    assert out["launches"] == 8 * 2  # overlapped: once per layer per optimizer step
    assert out["averages"] == 8 * 2  # the average over the copies too, behind each sync
    assert out["late_averages"] == 0  # ... and none left for after the backward
    assert out["rotate_launches"] == 0
    assert out["rotate_late"] == 8  # without the overlap: once per step, after the backward
    torch.testing.assert_close(out["eplb"], expected, rtol=1e-9, atol=0)
    assert [r["step"] for r in out["records"]] == [2.0, 4.0, 6.0, 8.0]
    assert any(r["slots_changed"] > 0 for r in out["records"] if not r["skipped"])
    torch.testing.assert_close(out["rotate"], expected, rtol=1e-9, atol=0)
    assert out["rotated"] == 4 * 2 * 6  # 4 rearrangements x 2 layers x 6 slots
    torch.testing.assert_close(out["lopsided"], expected, rtol=1e-9, atol=0)
    assert out["copies_equal"]
    spawn(_resume_on_two, world_size=2, args=(str(tmp_path),), timeout_s=120, init=False)
    if LIGHTNING_RESUMES_BATCH_END_EXACTLY:
        resumed = torch.load(tmp_path / "resumed.pt")["resumed"]
        torch.testing.assert_close(resumed, expected[4:], rtol=1e-9, atol=0)


def test_nodes_per_expert_parallel_group() -> None:
    """Hierarchical placement sees the nodes one EP group spans (ranks numbered node by node)."""
    assert nodes_per_ep_group(1, 8, 8) == 1  # one node, EP = world
    assert nodes_per_ep_group(4, 32, 32) == 4  # EP = world over 4 nodes (as before)
    assert nodes_per_ep_group(2, 16, 8) == 1  # one EP group per node
    assert nodes_per_ep_group(2, 16, 4) == 1  # two per node
    assert nodes_per_ep_group(8, 64, 16) == 2  # groups of two nodes
    with pytest.raises(MisconfigurationException, match="do not align with 4 nodes of 6 ranks"):
        nodes_per_ep_group(4, 24, 4)
